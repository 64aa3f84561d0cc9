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

use sqlx::PgPool;
use time::OffsetDateTime;

use crate::{
    CallState,
    audio::{self, Record, StoredPacket},
};

/// What one [`compact`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Calls compacted (with or without a record).
    pub calls: u64,
    /// Packet rows deleted.
    pub packets: u64,
    /// Bytes of packet data (as it arrived) moved into records.
    pub bytes: u64,
    /// Bytes those records' compressed audio takes.
    pub stored_bytes: u64,
    /// Calls whose audio was already past retention: their rows deleted, no record written.
    pub expired: u64,
}

/// Compacts up to `limit` final calls not compacted yet, oldest first, that no other
/// transaction holds (`SKIP LOCKED`: replicas share the work, and a call being re-driven is
/// simply taken next time), one call's rows in memory at a time. A call that began more than
/// `audio_kept_for` ago gets no record: its audio is past retention, and its record's
/// partition may be gone.
pub async fn compact(
    pool: &PgPool,
    limit: i64,
    audio_kept_for: Option<Duration>,
) -> Result<Compacted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claimed: Vec<(String, OffsetDateTime, bool)> = sqlx::query_as(
        "SELECT call_id, created_at, \
                ($2::float8 IS NULL OR created_at >= now() - make_interval(secs => $2)) AS kept \
         FROM calls \
         WHERE audio_compacted_at IS NULL AND state IN ($3, $4) \
         ORDER BY created_at LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(audio_kept_for.map(|d| d.as_secs_f64()))
    .bind(CallState::Archived.as_str())
    .bind(CallState::Failed.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Compacted::default();
    for (call_id, created_at, kept) in &claimed {
        let mut rows: Vec<StoredPacket> = sqlx::query_as(
            "DELETE FROM packets WHERE call_id = $1 AND call_created_at = $2 \
             RETURNING call_id, sequence, data, sent_at, received_at",
        )
        .bind(call_id)
        .bind(created_at)
        .fetch_all(&mut *tx)
        .await?;
        done.calls += 1;
        done.packets += rows.len() as u64;
        if !kept {
            done.expired += 1;
            continue;
        }
        rows.sort_unstable_by_key(|p| p.sequence);
        let record = Record::build(call_id, &rows);
        drop(rows);
        audio::insert_record(&mut tx, *created_at, &record).await?;
        done.bytes += record.data_bytes as u64;
        done.stored_bytes += record.audio.len() as u64;
    }
    if !claimed.is_empty() {
        let ids: Vec<&str> = claimed.iter().map(|(id, ..)| id.as_str()).collect();
        sqlx::query("UPDATE calls SET audio_compacted_at = now() WHERE call_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(done)
}
