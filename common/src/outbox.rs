//! Getting recorded events out of Postgres and into JetStream: the [`Publisher`] every
//! service publishes through. Each event carries a `Nats-Msg-Id`, so a republish inside the
//! stream's duplicate window is dropped by JetStream: delivery is at least once, and consumers
//! order by `version`.
//!
//! Packet events are named by `packet_outbox` (one row per writer batch, deleted once every
//! packet of the batch is acknowledged); status events live in `call_transitions`
//! (`published_at` NULL until JetStream acknowledges them) and work items in `calls`
//! (`work_item_published_at` NULL while a `COMPLETED` call's work item is unacknowledged).
//! Whoever commits publishes right away; ingest's outbox relay republishes, every few
//! seconds, whatever is still unacknowledged (NATS was down, the process died).

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::join_all;
use sqlx::PgPool;

use crate::{
    calls::{self, Recorded},
    config::StreamSettings,
    events::{DeadLetter, PacketEvent, ProgressEvent, StatusEvent, WorkItem},
    nats,
    subjects::{StreamKind, Subjects},
};

/// Publishes Switchboard's events to their subjects, and marks in Postgres what JetStream
/// acknowledged. The one way the services publish: nothing else holds the JetStream context.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    subjects: Subjects,
    /// For the outbox marks only.
    pool: PgPool,
}

impl Publisher {
    pub fn new(js: jetstream::Context, subjects: Subjects, pool: PgPool) -> Self {
        Self { js, subjects, pool }
    }

    /// A call the AI pipeline gave up on, to its dead-letter subject.
    pub async fn dead_letter(
        &self,
        letter: &DeadLetter,
        request_id: Option<&str>,
    ) -> Result<(), jetstream::context::PublishError> {
        let payload = Bytes::from(serde_json::to_vec(letter).expect("a dead letter serializes"));
        let subject = self.subjects.dlq_transcribe(&letter.key());
        nats::publish(&self.js, subject, &letter.msg_id(), payload, request_id).await
    }

    /// A progress report on core NATS: not kept, not acknowledged (each supersedes the last).
    pub async fn progress(&self, event: &ProgressEvent) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(event)?;
        self.js
            .client()
            .publish(self.subjects.call_progress(&event.key()), payload.into())
            .await?;
        Ok(())
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
            self.subjects.packets(&event.key()),
            &PacketEvent::msg_id(&event.key(), event.sequence),
            payload,
            request_id,
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Publishes status events (concurrently) and marks those JetStream acknowledged.
    /// Returns how many were acknowledged; the rest are left to the relay and logged.
    /// `request_id` is the request that caused them, carried as a NATS header.
    pub async fn statuses(
        &self,
        events: &[(i64, &StatusEvent)],
        request_id: Option<&str>,
    ) -> usize {
        if events.is_empty() {
            return 0;
        }
        let results = join_all(events.iter().map(|(id, event)| async move {
            let payload = Bytes::from(serde_json::to_vec(event).expect("serializable"));
            let result = nats::publish(
                &self.js,
                self.subjects.call_status(&event.key()),
                &event.msg_id(),
                payload,
                request_id,
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
                    call.id = %event.key(), call.version = event.version,
                    error.message = %e, "status event not published yet; the outbox relay will retry"
                ),
            }
        }
        metrics::counter!("switchboard_status_events_published_total")
            .increment(published.len() as u64);
        if let Err(e) = calls::published::mark_statuses(&self.pool, &published).await {
            // Harmless: the relay will publish them again and JetStream will drop the copies.
            tracing::warn!(error.message = %e, "cannot mark status events published");
        }
        published.len()
    }

    /// Publishes the status events of freshly committed transitions.
    pub async fn recorded(&self, recorded: &[Recorded], request_id: Option<&str>) -> usize {
        let events: Vec<_> = recorded
            .iter()
            .map(|r| (r.transition_id, &r.event))
            .collect();
        self.statuses(&events, request_id).await
    }

    /// Whether the work stream still holds a message for `item`'s call (a work-queue stream
    /// keeps each until the transcriber acknowledges it, after the call is final).
    pub async fn work_item_in_stream(&self, item: &WorkItem) -> anyhow::Result<bool> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .js
            .get_stream(self.subjects.stream_name(StreamKind::Work))
            .await?;
        match stream
            .get_last_raw_message_by_subject(&self.subjects.call_completed(&item.key()))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates any stream that is missing (someone deleted it); leaves the others alone.
    pub async fn create_missing_streams(&self, settings: &StreamSettings) -> anyhow::Result<()> {
        nats::create_missing_streams(&self.js, &self.subjects, settings).await
    }

    /// Publishes a work item for the transcriber and marks it published. Returns whether
    /// JetStream acknowledged it.
    pub async fn work_item(&self, item: &WorkItem, request_id: Option<&str>) -> bool {
        let payload = Bytes::from(serde_json::to_vec(item).expect("serializable"));
        let subject = self.subjects.call_completed(&item.key());
        if let Err(e) = nats::publish(&self.js, subject, &item.msg_id(), payload, request_id).await
        {
            tracing::warn!(
                call.id = %item.key(), error.message = %e,
                "work item not published yet; the outbox relay will retry"
            );
            return false;
        }
        metrics::counter!("switchboard_work_items_published_total").increment(1);
        if let Err(e) = calls::published::mark_work_item(&self.pool, item).await {
            tracing::warn!(call.id = %item.key(), error.message = %e, "cannot mark work item published");
        }
        true
    }
}
