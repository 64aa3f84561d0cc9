//! The reconciler: puts back what JetStream lost. The outbox relay covers what was never
//! acknowledged; this covers what was acknowledged and then lost with its stream (deleted by an
//! operator, purged, or lost with a JetStream node). Every `RECONCILE_INTERVAL_SECS` it
//! re-creates any missing stream, then looks for calls waiting on the transcriber (`COMPLETED`,
//! or `PROCESSING_AI` with no live lease and no retry to come) whose work item is no longer in
//! the work stream, and publishes it again: the same `Nats-Msg-Id`, so a copy inside the
//! duplicate window is dropped, and the transcriber's claim makes any second delivery a no-op.
//! Every ingest replica runs one; two finding the same call publish one message between them.

use std::time::Duration;

use common::{calls, config::StreamSettings, outbox::Publisher};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Calls looked at in one pass at most (each costs one JetStream lookup).
const PASS: i64 = 500;

pub struct Reconciler {
    /// Where the previous pass stopped (`None`: start from the oldest), so that a backlog of
    /// calls legitimately waiting is walked past rather than looked at every pass.
    pub cursor: tokio::sync::Mutex<Option<(time::OffsetDateTime, String)>>,
    pub publisher: Publisher,
    pub pool: PgPool,
    pub streams: StreamSettings,
    /// How often to look.
    pub interval: Duration,
    /// Calls changed more recently than this are left alone (their work item may be in
    /// flight).
    pub grace: Duration,
}

impl Reconciler {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        common::tasks::every(self.interval, shutdown, || async {
            match self.reconcile_once().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    work_items.republished = n,
                    "reconciler republished work items JetStream had lost"
                ),
                Err(e) => tracing::warn!(error.message = %e, "reconciler pass failed"),
            }
        })
        .await
    }

    /// One pass: returns how many work items were published again.
    pub async fn reconcile_once(&self) -> anyhow::Result<usize> {
        self.publisher.create_missing_streams(&self.streams).await?;
        let mut republished = 0;
        let mut cursor = self.cursor.lock().await;
        let candidates =
            calls::published::work_item_candidates(&self.pool, self.grace, cursor.as_ref(), PASS)
                .await?;
        // A short page is the end: the next pass starts from the oldest again.
        *cursor = if candidates.len() < PASS as usize {
            None
        } else {
            candidates.last().map(|(_, place)| place.clone())
        };
        for (item, _) in candidates {
            if self.publisher.work_item_in_stream(&item).await? {
                continue;
            }
            if self.publisher.work_item(&item, None).await {
                republished += 1;
            }
        }
        metrics::counter!("switchboard_work_items_reconciled_total").increment(republished as u64);
        Ok(republished)
    }
}
