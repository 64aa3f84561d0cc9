//! Compacts final calls: their packet rows become one `call_audio` record each
//! (`common::calls::compaction`), a bounded batch of calls per transaction, oldest first.
//! Every replica runs one; they share the work (`SKIP LOCKED`). It touches only final calls,
//! so it never holds up a streaming call's packets, and it drains a backlog at most half of
//! the time (it rests as long as each full batch took). `AUDIO_COMPACTION=false` turns it off.

use std::time::Duration;

use common::calls::compaction::{self, Compacted};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Calls one transaction compacts at most: a few minutes of audio each, so a batch deletes
/// some tens of thousands of rows and commits in tens of milliseconds.
pub const BATCH_CALLS: i64 = 16;

/// How often the compactor looks for final calls when the last pass found none to do.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How long a call the compactor skipped (too large, or its compaction failed) is left out
/// before it is tried again.
pub const SKIP_FOR: Duration = Duration::from_secs(3_600);

pub async fn run(
    pool: PgPool,
    audio_retention: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let skipped = std::sync::Mutex::new(Skipped::default());
    common::tasks::every(INTERVAL, shutdown.clone(), || async {
        // A full batch means there may be more: go on at once (a backlog, an upgrade).
        while !shutdown.is_cancelled() {
            let exclude = skipped.lock().expect("not poisoned").current();
            let started = std::time::Instant::now();
            match compact_once(&pool, audio_retention, &exclude).await {
                Ok(done) => {
                    let full = (done.calls + done.skipped.len() as u64) as i64 == BATCH_CALLS;
                    skipped.lock().expect("not poisoned").add(done.skipped);
                    if !full {
                        break;
                    }
                    // Draining a backlog: at most half of the time, so that packets (the
                    // work that cannot wait) keep the other half of what this costs.
                    tokio::time::sleep(started.elapsed()).await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "compaction pass failed");
                    break;
                }
            }
        }
    })
    .await
}

/// Calls left out of compaction for [`SKIP_FOR`], so that one that cannot be compacted never
/// holds up the others (they are taken oldest first).
#[derive(Default)]
struct Skipped {
    since: std::collections::HashMap<String, std::time::Instant>,
}

impl Skipped {
    fn current(&mut self) -> Vec<String> {
        self.since.retain(|_, at| at.elapsed() < SKIP_FOR);
        self.since.keys().cloned().collect()
    }

    fn add(&mut self, calls: Vec<String>) {
        let now = std::time::Instant::now();
        self.since.extend(calls.into_iter().map(|id| (id, now)));
    }
}

/// Compacts one batch of at most [`BATCH_CALLS`] final calls (leaving out `exclude`), and
/// counts it in the metrics.
pub async fn compact_once(
    pool: &PgPool,
    audio_retention: Option<Duration>,
    exclude: &[String],
) -> Result<Compacted, sqlx::Error> {
    let done = compaction::compact(pool, BATCH_CALLS, audio_retention, exclude).await?;
    metrics::counter!("switchboard_compaction_skipped_total").increment(done.skipped.len() as u64);
    if done.calls > 0 {
        metrics::counter!("switchboard_compacted_calls_total").increment(done.calls);
        metrics::counter!("switchboard_compacted_packets_total").increment(done.packets);
        metrics::counter!("switchboard_compacted_bytes_total").increment(done.bytes);
        metrics::counter!("switchboard_compacted_stored_bytes_total").increment(done.stored_bytes);
        metrics::counter!("switchboard_expired_rows_total", "table" => "packets")
            .increment(done.expired_packets);
        metrics::counter!("switchboard_expired_bytes_total", "table" => "packets")
            .increment(done.expired_bytes);
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
