//! A final call's packet rows become one `call_audio` record, in one statement (so in one
//! transaction): the rows are deleted and their data, timestamps and received ranges written
//! as the record, and the call is marked compacted. Readers go through [`crate::audio`], which
//! reads either form. Packets are frozen once a call has left `IN_PROGRESS` (the writer
//! inserts only for `IN_PROGRESS` calls, under their row lock), so a final call's rows are all
//! it will ever have, even if it is re-driven.

use std::time::Duration;

use sqlx::PgPool;

use crate::CallState;

/// What one [`compact`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Calls compacted (with or without a record).
    pub calls: u64,
    /// Packet rows deleted.
    pub packets: u64,
    /// Bytes of audio data moved into records.
    pub bytes: u64,
    /// Calls whose audio was already past retention: their rows deleted, no record written.
    pub expired: u64,
}

/// Compacts up to `limit` final calls not compacted yet, oldest first, that no other
/// transaction holds (`SKIP LOCKED`: replicas share the work, and a call being re-driven is
/// simply taken next time). A call that began more than `audio_kept_for` ago gets no record:
/// its audio is past retention, and its record's partition may be gone.
pub async fn compact(
    pool: &PgPool,
    limit: i64,
    audio_kept_for: Option<Duration>,
) -> Result<Compacted, sqlx::Error> {
    let rows: Vec<(bool, i64, i64)> = sqlx::query_as(
        "WITH claimed AS ( \
             SELECT call_id, created_at, \
                    ($2::float8 IS NULL OR created_at >= now() - make_interval(secs => $2)) AS kept \
             FROM calls \
             WHERE audio_compacted_at IS NULL AND state IN ($3, $4) \
             ORDER BY created_at LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED \
         ), removed AS ( \
             DELETE FROM packets p USING claimed c \
             WHERE p.call_id = c.call_id AND p.call_created_at = c.created_at \
             RETURNING p.call_id, p.sequence, p.data, p.sent_at, p.received_at \
         ), recorded AS ( \
             INSERT INTO call_audio (call_id, call_created_at, received, packets, data, lengths, \
                                     sent_at, received_at) \
             SELECT c.call_id, c.created_at, \
                    COALESCE(range_agg(int8range(r.sequence, r.sequence + 1)), '{}'), \
                    count(r.sequence), \
                    COALESCE(string_agg(convert_to(r.data, 'UTF8'), ''::bytea ORDER BY r.sequence), ''::bytea), \
                    COALESCE(array_agg(octet_length(r.data) ORDER BY r.sequence) \
                             FILTER (WHERE r.sequence IS NOT NULL), '{}'), \
                    COALESCE(array_agg(r.sent_at ORDER BY r.sequence) \
                             FILTER (WHERE r.sequence IS NOT NULL), '{}'), \
                    COALESCE(array_agg(r.received_at ORDER BY r.sequence) \
                             FILTER (WHERE r.sequence IS NOT NULL), '{}') \
             FROM claimed c LEFT JOIN removed r USING (call_id) \
             WHERE c.kept \
             GROUP BY c.call_id, c.created_at \
             RETURNING call_id \
         ), marked AS ( \
             UPDATE calls SET audio_compacted_at = now() FROM claimed \
             WHERE calls.call_id = claimed.call_id \
         ) \
         SELECT c.kept, \
                (SELECT count(*) FROM removed WHERE removed.call_id = c.call_id), \
                (SELECT COALESCE(sum(octet_length(data)), 0)::int8 FROM removed \
                 WHERE removed.call_id = c.call_id) \
         FROM claimed c",
    )
    .bind(limit)
    .bind(audio_kept_for.map(|d| d.as_secs_f64()))
    .bind(CallState::Archived.as_str())
    .bind(CallState::Failed.as_str())
    .fetch_all(pool)
    .await?;
    let mut done = Compacted::default();
    for (kept, packets, bytes) in rows {
        done.calls += 1;
        done.packets += packets as u64;
        if kept {
            done.bytes += bytes as u64;
        } else {
            done.expired += 1;
        }
    }
    Ok(done)
}
