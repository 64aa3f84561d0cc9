//! Getting recorded events out of Postgres and into JetStream.
//!
//! Packet events are named by `packet_outbox` (one row per writer batch, deleted once every
//! packet of the batch is acknowledged). Status events live in `call_transitions` (one row per transition, `published_at` NULL
//! until JetStream acknowledges it) and work items in `calls` (`work_item_published_at` NULL
//! while a `COMPLETED` call's work item is unacknowledged). Whoever commits a transition
//! publishes right away through [`Publisher`]; the [`Relay`] republishes, every few seconds,
//! whatever is still unacknowledged (NATS was down, the process died). Each event carries a
//! `Nats-Msg-Id`, so a republish inside the stream's duplicate window is dropped by JetStream:
//! delivery is at least once, and consumers order by `version`.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::join_all;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{
    CallId,
    events::{PacketEvent, StatusEvent, WorkItem},
    nats,
    store::Recorded,
    subjects::Subjects,
};

/// Publishes status events and work items and marks them published in Postgres.
#[derive(Clone)]
pub struct Publisher {
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub pool: PgPool,
}

impl Publisher {
    pub fn new(js: jetstream::Context, subjects: Subjects, pool: PgPool) -> Self {
        Self { js, subjects, pool }
    }

    /// Publishes one packet event with its `Nats-Msg-Id` (`<call_id>:<sequence>`) and waits
    /// for the acknowledgement. Marking it published is the caller's (its batch's outbox row).
    pub async fn packet(
        &self,
        event: &PacketEvent,
        request_id: Option<&str>,
    ) -> Result<(), String> {
        let payload = Bytes::from(serde_json::to_vec(event).map_err(|e| e.to_string())?);
        nats::publish(
            &self.js,
            self.subjects.packets(&event.call_id),
            &PacketEvent::msg_id(&event.call_id, event.sequence),
            payload,
            request_id,
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Publishes status events (concurrently) and marks those JetStream acknowledged.
    /// Returns how many were acknowledged; the rest are left to the relay and logged.
    pub async fn statuses(&self, events: &[(i64, &StatusEvent)]) -> usize {
        if events.is_empty() {
            return 0;
        }
        let results = join_all(events.iter().map(|(id, event)| async move {
            let payload = Bytes::from(serde_json::to_vec(event).expect("serializable"));
            let result = nats::publish(
                &self.js,
                self.subjects.call_status(&event.call_id),
                &event.msg_id(),
                payload,
                None,
            )
            .await;
            (*id, event, result)
        }))
        .await;
        let mut published = Vec::with_capacity(results.len());
        for (id, event, result) in results {
            match result {
                Ok(()) => published.push(id),
                Err(e) => tracing::warn!(
                    call.id = %event.call_id, call.version = event.version,
                    error.message = %e, "status event not published yet; the outbox relay will retry"
                ),
            }
        }
        metrics::counter!("switchboard_status_events_published_total")
            .increment(published.len() as u64);
        if let Err(e) =
            sqlx::query("UPDATE call_transitions SET published_at = now() WHERE id = ANY($1)")
                .bind(&published)
                .execute(&self.pool)
                .await
        {
            // Harmless: the relay will publish them again and JetStream will drop the copies.
            tracing::warn!(error.message = %e, "cannot mark status events published");
        }
        published.len()
    }

    /// Publishes the status events of freshly committed transitions.
    pub async fn recorded(&self, recorded: &[Recorded]) -> usize {
        let events: Vec<_> = recorded
            .iter()
            .map(|r| (r.transition_id, &r.event))
            .collect();
        self.statuses(&events).await
    }

    /// Publishes a work item for the transcriber and marks it published. Returns whether
    /// JetStream acknowledged it.
    pub async fn work_item(&self, item: &WorkItem) -> bool {
        let payload = Bytes::from(serde_json::to_vec(item).expect("serializable"));
        let subject = self.subjects.call_completed(&item.call_id);
        if let Err(e) = nats::publish(&self.js, subject, &item.msg_id(), payload, None).await {
            tracing::warn!(
                call.id = %item.call_id, error.message = %e,
                "work item not published yet; the outbox relay will retry"
            );
            return false;
        }
        metrics::counter!("switchboard_work_items_published_total").increment(1);
        if let Err(e) = sqlx::query(
            "UPDATE calls SET work_item_published_at = now() \
             WHERE call_id = $1 AND version = $2 AND state = 'COMPLETED'",
        )
        .bind(item.call_id.as_str())
        .bind(item.version)
        .execute(&self.pool)
        .await
        {
            tracing::warn!(call.id = %item.call_id, error.message = %e, "cannot mark work item published");
        }
        true
    }
}

/// Republishes what the database recorded but JetStream has not acknowledged.
pub struct Relay {
    pub publisher: Publisher,
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
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match self.relay_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(outbox.republished = n, "outbox relay republished events"),
                Err(e) => tracing::warn!(error.message = %e, "outbox relay pass failed"),
            }
        }
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
        let mut tx = self.publisher.pool.begin().await?;
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
            let stored: Vec<(String, i64, String, f64, OffsetDateTime)> = sqlx::query_as(
                "SELECT p.call_id, p.sequence, p.data, p.sent_at, p.received_at FROM packets p \
                 JOIN UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
                   ON p.call_id = k.call_id AND p.sequence = k.sequence",
            )
            .bind(&call_ids)
            .bind(&sequences)
            .fetch_all(&mut *tx)
            .await?;
            let results = join_all(stored.into_iter().map(
                |(call_id, sequence, data, sent, at)| async move {
                    let event = PacketEvent {
                        call_id: CallId::parse(call_id).map_err(|e| e.to_string())?,
                        sequence,
                        data,
                        timestamp: sent,
                        received_at: at,
                    };
                    self.publisher.packet(&event, None).await
                },
            ))
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
        let grace = self.grace.as_secs_f64();
        let statuses: Vec<(i64, sqlx::types::Json<StatusEvent>)> = sqlx::query_as(
            "SELECT id, event FROM call_transitions \
             WHERE published_at IS NULL AND at < now() - make_interval(secs => $1) \
             ORDER BY id LIMIT $2",
        )
        .bind(grace)
        .bind(RELAY_BATCH)
        .fetch_all(&self.publisher.pool)
        .await?;
        let events: Vec<_> = statuses.iter().map(|(id, e)| (*id, &e.0)).collect();
        let mut published = self.publisher.statuses(&events).await;

        let work: Vec<(String, i64, OffsetDateTime)> = sqlx::query_as(
            "SELECT call_id, version, COALESCE(completed_at, updated_at) FROM calls \
             WHERE state = 'COMPLETED' AND work_item_published_at IS NULL \
               AND updated_at < now() - make_interval(secs => $1) \
             ORDER BY updated_at LIMIT $2",
        )
        .bind(grace)
        .bind(RELAY_BATCH)
        .fetch_all(&self.publisher.pool)
        .await?;
        for (call_id, version, completed_at) in work {
            let item = WorkItem {
                call_id: CallId::parse(call_id)?,
                version,
                completed_at,
            };
            if self.publisher.work_item(&item).await {
                published += 1;
            }
        }
        Ok(published)
    }
}
