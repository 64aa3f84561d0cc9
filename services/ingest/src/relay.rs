//! The outbox relay: republishes, every `OUTBOX_RELAY_INTERVAL_MS`, what the database recorded
//! but JetStream has not acknowledged (NATS was down, the process died, a client gave up
//! after a 503): packet events named by `packet_outbox`, status events in
//! `call_transitions`, work items of `COMPLETED` calls. Every ingest replica runs one; rows
//! younger than the grace period are left to the process that committed them.

use std::time::Duration;

use common::{CallKey, calls, events::PacketEvent, outbox::Publisher};
use futures::future::join_all;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Republishes what the database recorded but JetStream has not acknowledged.
pub struct Relay {
    pub publisher: Publisher,
    /// Where the outbox rows are.
    pub pool: PgPool,
    /// How often to look.
    pub interval: Duration,
    /// Leave events younger than this to the process that committed them.
    pub grace: Duration,
}

/// Rows one pass of the relay handles at most.
const RELAY_BATCH: i64 = 500;

/// Packet outbox rows (writer batches, up to `INGEST_MAX_BATCH` packets each) one pass
/// handles at most.
const PACKET_OUTBOX_BATCH: i64 = 20;

impl Relay {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        common::tasks::every(self.interval, shutdown, || async {
            match self.relay_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(outbox.republished = n, "outbox relay republished events"),
                Err(e) => tracing::warn!(error.message = %e, "outbox relay pass failed"),
            }
        })
        .await
    }

    /// One pass: returns how many events JetStream acknowledged.
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let packets = self.relay_packets().await?;
        Ok(packets + self.relay_statuses_and_work().await?)
    }

    /// Packet events whose batch's outbox row is still there (a crash between commit and
    /// publish, NATS down, a client that gave up): published again as stored, with their
    /// `Nats-Msg-Id`, and the row removed once every one is acknowledged.
    async fn relay_packets(&self) -> anyhow::Result<usize> {
        let mut published = 0;
        // Pass after pass while there is a backlog (after an outage), so that rows are
        // republished well inside the stream's duplicate window where possible.
        loop {
            let (acknowledged, claimed) = self.relay_packet_rows().await?;
            published += acknowledged;
            if claimed < PACKET_OUTBOX_BATCH as usize || acknowledged == 0 {
                return Ok(published);
            }
        }
    }

    /// One pass over at most [`PACKET_OUTBOX_BATCH`] outbox rows that no other relay holds
    /// (`SKIP LOCKED`: replicas share the backlog instead of all republishing the same rows).
    /// Returns the events acknowledged and the rows claimed.
    async fn relay_packet_rows(&self) -> anyhow::Result<(usize, usize)> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, Vec<String>, Vec<i64>)> = sqlx::query_as(
            "SELECT id, call_ids, sequences FROM packet_outbox \
             WHERE at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(self.grace.as_secs_f64())
        .bind(PACKET_OUTBOX_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let claimed = rows.len();
        let mut published = 0;
        for (id, call_ids, sequences) in rows {
            let ids: Vec<&str> = call_ids.iter().map(String::as_str).collect();
            let stored = common::audio::stored_packets(&mut tx, &ids, &sequences).await?;
            let results = join_all(stored.into_iter().map(|packet| async move {
                let key = CallKey::try_from(packet.call_id).map_err(|e| e.to_string())?;
                let event = PacketEvent {
                    tenant: key.tenant().clone(),
                    call_id: key.call_id().clone(),
                    sequence: packet.sequence,
                    data: packet.data,
                    timestamp: packet.sent_at,
                    received_at: packet.received_at,
                };
                self.publisher.packet(&event, None).await
            }))
            .await;
            let acknowledged = results.iter().filter(|r| r.is_ok()).count();
            published += acknowledged;
            metrics::counter!("switchboard_packet_events_republished_total")
                .increment(acknowledged as u64);
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                tracing::warn!(outbox.id = id, error.message = %e, "packet events not republished yet");
                continue;
            }
            sqlx::query("DELETE FROM packet_outbox WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((published, claimed))
    }

    /// Status events and work items not acknowledged yet.
    async fn relay_statuses_and_work(&self) -> anyhow::Result<usize> {
        let pool = &self.pool;
        let statuses =
            calls::published::unpublished_statuses(pool, self.grace, RELAY_BATCH).await?;
        let events: Vec<_> = statuses.iter().map(|(id, e)| (*id, e)).collect();
        let mut published = self.publisher.statuses(&events, None).await;
        let items = calls::published::unpublished_work_items(pool, self.grace, RELAY_BATCH).await?;
        for item in items {
            if self.publisher.work_item(&item, None).await {
                published += 1;
            }
        }
        Ok(published)
    }
}
