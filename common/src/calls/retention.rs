//! `CALL_RETENTION_DAYS`: final calls that began before a cutoff are deleted with their
//! history, a bounded batch per statement. (Their packets and audio go by dropping whole
//! partitions: [`crate::partitions`].)

use sqlx::PgPool;
use time::OffsetDateTime;

use crate::CallState;

/// Rows and bytes (`pg_column_size` of each row) one [`delete_calls`] batch removed, per table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// (table, rows, bytes), for `calls`, `call_transitions`, `transcription_attempts` and
    /// `call_gaps`.
    pub tables: Vec<(&'static str, u64, u64)>,
}

impl Deleted {
    /// Calls deleted.
    pub fn calls(&self) -> u64 {
        self.tables
            .iter()
            .find(|(table, ..)| *table == "calls")
            .map_or(0, |(_, rows, _)| *rows)
    }
}

/// Deletes up to `limit` final (`ARCHIVED` or `FAILED`) and compacted calls that began
/// before `before`, oldest first, with their transitions, attempts and gaps, in one statement.
/// Calls held by another transaction (a re-drive, say) are passed over and taken by a later
/// batch; a call still being worked on is never deleted, and one not compacted yet waits for
/// the compactor (which deletes the rows of a call past the audio retention), so no packet row
/// outlives its call.
pub async fn delete_calls(
    pool: &PgPool,
    before: OffsetDateTime,
    limit: i64,
) -> Result<Deleted, sqlx::Error> {
    let (
        calls,
        calls_bytes,
        transitions,
        transitions_bytes,
        attempts,
        attempts_bytes,
        gaps,
        gaps_bytes,
    ): (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "WITH doomed AS ( \
             SELECT call_id FROM calls WHERE created_at < $1 AND state IN ($3, $4) \
                    AND audio_compacted_at IS NOT NULL \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED \
         ), t AS ( \
             DELETE FROM call_transitions x USING doomed d WHERE x.call_id = d.call_id \
             RETURNING pg_column_size(x.*) AS size \
         ), a AS ( \
             DELETE FROM transcription_attempts x USING doomed d WHERE x.call_id = d.call_id \
             RETURNING pg_column_size(x.*) AS size \
         ), g AS ( \
             DELETE FROM call_gaps x USING doomed d WHERE x.call_id = d.call_id \
             RETURNING pg_column_size(x.*) AS size \
         ), c AS ( \
             DELETE FROM calls x USING doomed d WHERE x.call_id = d.call_id \
             RETURNING pg_column_size(x.*) AS size \
         ) \
         SELECT (SELECT count(*) FROM c), (SELECT COALESCE(sum(size), 0)::int8 FROM c), \
                (SELECT count(*) FROM t), (SELECT COALESCE(sum(size), 0)::int8 FROM t), \
                (SELECT count(*) FROM a), (SELECT COALESCE(sum(size), 0)::int8 FROM a), \
                (SELECT count(*) FROM g), (SELECT COALESCE(sum(size), 0)::int8 FROM g)",
    )
    .bind(before)
    .bind(limit)
    .bind(CallState::Archived.as_str())
    .bind(CallState::Failed.as_str())
    .fetch_one(pool)
    .await?;
    let n = |v: i64| v.max(0) as u64;
    Ok(Deleted {
        tables: vec![
            ("calls", n(calls), n(calls_bytes)),
            ("call_transitions", n(transitions), n(transitions_bytes)),
            ("transcription_attempts", n(attempts), n(attempts_bytes)),
            ("call_gaps", n(gaps), n(gaps_bytes)),
        ],
    })
}
