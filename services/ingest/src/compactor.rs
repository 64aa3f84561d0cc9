//! Compacts final calls: their packet rows become one `call_audio` record each
//! (`common::calls::compaction`), a bounded batch of calls per transaction, oldest first.
//! Every replica runs one; they share the work (`SKIP LOCKED`). It touches only final calls,
//! whose rows no packet writer locks, so it never holds up a streaming call.

use std::time::Duration;

use common::calls::compaction::{self, Compacted};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Calls one transaction compacts at most: a few minutes of audio each, so a batch deletes
/// some tens of thousands of rows and commits in tens of milliseconds.
pub const BATCH_CALLS: i64 = 16;

/// How often the compactor looks for final calls when the last pass found none to do.
pub const INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(
    pool: PgPool,
    audio_retention: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    common::tasks::every(INTERVAL, shutdown.clone(), || async {
        // A full batch means there may be more: go on at once (a backlog, an upgrade).
        while !shutdown.is_cancelled() {
            match compact_once(&pool, audio_retention).await {
                Ok(done) if done.calls as i64 == BATCH_CALLS => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error.message = %e, "compaction pass failed");
                    break;
                }
            }
        }
    })
    .await
}

/// Compacts one batch of at most [`BATCH_CALLS`] final calls, and counts it in the metrics.
pub async fn compact_once(
    pool: &PgPool,
    audio_retention: Option<Duration>,
) -> Result<Compacted, sqlx::Error> {
    let done = compaction::compact(pool, BATCH_CALLS, audio_retention).await?;
    if done.calls > 0 {
        metrics::counter!("switchboard_compacted_calls_total").increment(done.calls);
        metrics::counter!("switchboard_compacted_packets_total").increment(done.packets);
        metrics::counter!("switchboard_compacted_bytes_total").increment(done.bytes);
        metrics::counter!("switchboard_compacted_stored_bytes_total").increment(done.stored_bytes);
        tracing::debug!(
            calls = done.calls,
            packets = done.packets,
            bytes = done.bytes,
            stored_bytes = done.stored_bytes,
            expired = done.expired,
            "compacted final calls"
        );
    }
    Ok(done)
}
