//! A final call's packet rows become one `call_audio` record ([`crate::audio::Record`]), in
//! one transaction: the call is locked, its rows deleted (their `RETURNING` is the record's
//! input), the record written and the call marked compacted. Readers go through
//! [`crate::audio`], which reads either form. Packets are frozen once a call has left
//! `IN_PROGRESS` (the writer inserts only for `IN_PROGRESS` calls, under their row lock), so a
//! final call's rows are all it will ever have, even if it is re-driven.
//!
//! The record is built here, not in SQL, to compress it: Postgres's own TOAST compression
//! (pglz, lz4) is dictionary-only and finds almost nothing in base64 text or audio, where zstd's
//! entropy coding does (docs/benchmarks.md, "Data lifecycle").

use std::time::Duration;

use futures::TryStreamExt;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

use crate::{
    CallState,
    audio::{self, Record, StoredPacket},
};

/// The largest call compacted, in bytes of packet data (about 5 hours of one 20 ms frame of
/// 8 kHz mu-law every 20 ms): a record is built in memory, and must fit a `bytea`. A larger
/// call keeps its rows (and its partition) until it is past `AUDIO_RETENTION_DAYS`.
pub const MAX_CALL_BYTES: i64 = 256 * 1024 * 1024;

/// What one [`compact`] pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Calls compacted (with or without a record).
    pub calls: u64,
    /// Packet rows turned into records.
    pub packets: u64,
    /// Bytes of packet data (as it arrived) moved into records.
    pub bytes: u64,
    /// Bytes those records' compressed audio takes.
    pub stored_bytes: u64,
    /// Calls whose audio was already past retention: their rows deleted, no record written.
    pub expired: u64,
    /// The rows and bytes of data those expired calls had.
    pub expired_packets: u64,
    pub expired_bytes: u64,
    /// Calls left as rows this pass: larger than [`MAX_CALL_BYTES`], or their compaction
    /// failed (rolled back alone, the others go on). The caller leaves them out for a while.
    pub skipped: Vec<String>,
}

/// Compacts up to `limit` final calls not compacted yet, oldest first, that no other
/// transaction holds (`SKIP LOCKED`: replicas share the work, and a call being re-driven is
/// simply taken next time) and that are not in `exclude`; one call's rows in memory at a
/// time. A call that began more than `audio_kept_for` ago gets no record: its audio is past
/// retention (and its record's partition may be gone), so its rows are only deleted.
pub async fn compact(
    pool: &PgPool,
    limit: i64,
    audio_kept_for: Option<Duration>,
    exclude: &[String],
) -> Result<Compacted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claimed: Vec<(String, OffsetDateTime, bool)> = sqlx::query_as(
        "SELECT call_id, created_at, \
                ($2::float8 IS NULL OR created_at >= now() - make_interval(secs => $2)) AS kept \
         FROM calls \
         WHERE audio_compacted_at IS NULL AND state IN ($3, $4) AND call_id <> ALL($5) \
         ORDER BY created_at LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(audio_kept_for.map(|d| d.as_secs_f64()))
    .bind(CallState::Archived.as_str())
    .bind(CallState::Failed.as_str())
    .bind(exclude)
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Compacted::default();
    let mut compacted: Vec<&str> = Vec::with_capacity(claimed.len());
    for (call_id, created_at, kept) in &claimed {
        sqlx::raw_sql("SAVEPOINT compact_call")
            .execute(&mut *tx)
            .await?;
        let outcome = if *kept {
            compact_call(&mut tx, call_id, *created_at, &mut done).await
        } else {
            expire_call(&mut tx, call_id, *created_at, &mut done).await
        };
        match outcome {
            Ok(true) => compacted.push(call_id),
            failed => {
                if let Err(e) = failed {
                    tracing::warn!(call.id = %call_id, error.message = %e, "call not compacted; left as rows for now");
                }
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT compact_call")
                    .execute(&mut *tx)
                    .await?;
                done.skipped.push(call_id.clone());
            }
        }
    }
    if !compacted.is_empty() {
        sqlx::query("UPDATE calls SET audio_compacted_at = now() WHERE call_id = ANY($1)")
            .bind(&compacted)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    done.calls = compacted.len() as u64;
    Ok(done)
}

/// Turns one call's rows into its record; `false` if it is too large (its rows deleted so far
/// are restored by the caller's rollback to the savepoint).
async fn compact_call(
    tx: &mut PgConnection,
    call_id: &str,
    created_at: OffsetDateTime,
    done: &mut Compacted,
) -> Result<bool, sqlx::Error> {
    // One pass over the rows: they are deleted and read back as a stream, and a call found
    // too large on the way is given up (the caller rolls its savepoint back: the rows stay).
    let mut rows: Vec<StoredPacket> = Vec::new();
    let mut size = 0i64;
    let mut deleted = sqlx::query_as::<_, StoredPacket>(
        "DELETE FROM packets WHERE call_id = $1 AND call_created_at = $2 \
         RETURNING call_id, sequence, data, sent_at, received_at",
    )
    .bind(call_id)
    .bind(created_at)
    .fetch(&mut *tx);
    while let Some(row) = deleted.try_next().await? {
        size += row.data.len() as i64;
        if size > MAX_CALL_BYTES {
            tracing::warn!(call.id = %call_id, audio.bytes = size, "call too large to compact; left as rows");
            return Ok(false);
        }
        rows.push(row);
    }
    drop(deleted);
    rows.sort_unstable_by_key(|p| p.sequence);
    let record = Record::build(call_id, &rows);
    drop(rows);
    audio::insert_record(tx, created_at, &record).await?;
    done.packets += record.lengths.len() as u64;
    done.bytes += record.data_bytes as u64;
    done.stored_bytes += record.audio.len() as u64;
    Ok(true)
}

/// Deletes the rows of a call whose audio is past retention, without reading them.
async fn expire_call(
    tx: &mut PgConnection,
    call_id: &str,
    created_at: OffsetDateTime,
    done: &mut Compacted,
) -> Result<bool, sqlx::Error> {
    let (rows, bytes): (i64, i64) = sqlx::query_as(
        "WITH gone AS (DELETE FROM packets WHERE call_id = $1 AND call_created_at = $2 \
                       RETURNING octet_length(data) AS size) \
         SELECT count(*), COALESCE(sum(size), 0)::int8 FROM gone",
    )
    .bind(call_id)
    .bind(created_at)
    .fetch_one(&mut *tx)
    .await?;
    done.expired += 1;
    done.expired_packets += rows as u64;
    done.expired_bytes += bytes as u64;
    Ok(true)
}
