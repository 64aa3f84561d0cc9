//! The JetStream side: pulling work items, running one attempt per delivery, and answering
//! JetStream with the outcome. Retries are redeliveries: a failed attempt naks its message
//! with the backoff delay and JetStream brings it back; nothing sleeps inside a delivery.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
};
use common::{
    calls::ai::GiveUp,
    events::{DeadLetter, WorkItem},
    outbox::Publisher,
    subjects::{StreamKind, Subjects},
};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    backoff::Backoff,
    budget::{AudioBudget, Held},
    claims::{self, Claim, Claims, FinishError},
    config::TranscriberConfig,
    providers::{CallAudio, Provider, ProviderError},
    sentiment,
};

/// How long to wait before looking again when our own infrastructure (Postgres, NATS)
/// failed mid-delivery. Not an AI attempt: the counter does not move.
const INFRA_RETRY: Duration = Duration::from_secs(5);

/// Why a call's audio cannot be sent: the transcriber gives up on it without asking the AI.
enum Unsendable {
    /// Larger than `AI_MAX_AUDIO_BYTES` (its size in bytes).
    TooLarge(i64),
    /// Compacted and since expired (`AUDIO_RETENTION_DAYS`).
    Expired,
}

/// How long one pull request waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// What JetStream is told about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done with it (success, or a duplicate of finished work).
    Ack,
    /// Bring it back after this delay (`None`: at once).
    Retry(Option<Duration>),
    /// Never deliver it again (the call was dead-lettered, or the message is unusable).
    Term,
    /// Say nothing: another worker took the call over (this delivery's lease ran out), and
    /// answering could settle the message it is still working on.
    Silent,
}

/// Pulls work items and runs one attempt per delivery. Built once per process from the
/// settings ([`Worker::new`]); everything it holds is its own.
pub struct Worker {
    consumer: PullConsumer,
    /// To make the consumer again when pulls fail (the stream or consumer was deleted).
    source: WorkSource,
    /// The call's side in Postgres (claims, leases, attempts; `TRANSCRIBE_MAX_ATTEMPTS`).
    claims: Claims,
    provider: Arc<Provider>,
    publisher: Publisher,
    backoff: Backoff,
    /// `TRANSCRIBE_CONCURRENCY`: attempts in flight at most.
    concurrency: usize,
    ai_timeout: Duration,
    /// `AI_MAX_AUDIO_BYTES`: calls with more packet data are failed before they are loaded.
    max_audio_bytes: u64,
    /// `TRANSCRIBE_MAX_AUDIO_IN_FLIGHT_BYTES`: the audio all attempts in flight may hold.
    budget: AudioBudget,
    /// How often a worker tells JetStream (and Postgres) it is still on a call.
    progress_every: Duration,
    shutdown_grace: Duration,
    /// `AI_MAX_REQUESTS_PER_SEC`, when set: provider requests wait for their turn.
    rate_limit: Option<RateLimit>,
}

/// At most so many provider requests a second, in bursts of at most that many.
type RateLimit = governor::DefaultDirectRateLimiter;

fn rate_limit(per_sec: u32) -> Option<RateLimit> {
    std::num::NonZeroU32::new(per_sec)
        .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)))
}

/// On shutdown, the open pull request may still bring messages (until it expires): hand each
/// back at once instead of leaving it to wait out its ack wait.
async fn hand_back_pulled(batch: &mut jetstream::consumer::pull::Batch) {
    let deadline = Instant::now() + PULL_EXPIRES;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, batch.next()).await {
        if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error.message = %e, "cannot hand a pulled message back");
        }
    }
}

/// How a pulled batch ended.
enum Pulled {
    /// Every message started.
    Done,
    /// The pull broke off (the consumer or stream may be gone).
    Failed,
    /// Shutdown: what was pulled and not started went back to JetStream.
    Shutdown,
}

/// Where the work comes from: the work stream and the durable consumer on it, made again if
/// someone deleted them (the ingest reconciler then republishes the lost work items).
pub struct WorkSource {
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub config: TranscriberConfig,
}

impl WorkSource {
    /// The consumer, after making sure the streams and the consumer exist.
    pub async fn consumer(&self) -> anyhow::Result<PullConsumer> {
        common::nats::create_missing_streams(&self.js, &self.subjects, &self.config.common.streams)
            .await?;
        ensure_consumer(&self.js, &self.subjects, &self.config).await
    }
}

/// Creates the durable consumer, or updates it so that changed settings take effect.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    config: &TranscriberConfig,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(subjects.stream_name(StreamKind::Work))
        .await
        .context("looking up the work stream")?;
    let consumer_config = pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some("Switchboard transcriber: completed calls to transcribe".into()),
        filter_subject: subjects.stream_subjects(StreamKind::Work),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait(),
        // The attempt counter in Postgres decides when to give up, not the delivery count.
        max_deliver: -1,
        max_ack_pending: config.max_ack_pending,
        ..Default::default()
    };
    // nats-server 2.9 treats a create with a changed (editable) configuration as an update.
    stream
        .create_consumer(consumer_config)
        .await
        .with_context(|| format!("creating or updating consumer {}", config.consumer))
}

/// A work item as delivered: the item, and the id of the request that caused it (the
/// `X-Request-Id` header ingest published it with), carried on everything this delivery
/// publishes so one call can be followed through the three services.
pub struct Work {
    item: WorkItem,
    request_id: Option<String>,
}

impl Work {
    fn from_message(message: &jetstream::Message) -> Result<Work, serde_json::Error> {
        let item = serde_json::from_slice(&message.payload)?;
        let request_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(common::nats::REQUEST_ID_HEADER))
            .map(|v| v.as_str().to_owned());
        Ok(Work { item, request_id })
    }

    fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

/// A delivery is its work item wherever one is asked for (claims, attempts).
impl std::ops::Deref for Work {
    type Target = WorkItem;
    fn deref(&self) -> &WorkItem {
        &self.item
    }
}

impl Worker {
    pub fn new(
        consumer: PullConsumer,
        source: WorkSource,
        pool: sqlx::PgPool,
        provider: Arc<Provider>,
        publisher: Publisher,
        config: &TranscriberConfig,
    ) -> Self {
        Worker {
            consumer,
            source,
            claims: Claims::new(pool, config.ack_wait(), config.max_attempts),
            provider,
            publisher,
            backoff: Backoff {
                base: Duration::from_millis(config.backoff_base_ms),
                max: Duration::from_millis(config.backoff_max_ms),
            },
            concurrency: config.concurrency,
            ai_timeout: config.ai_timeout(),
            max_audio_bytes: config.ai.max_audio_bytes,
            budget: AudioBudget::new(config.max_audio_in_flight_bytes),
            progress_every: config.ack_wait() / 3,
            shutdown_grace: config.shutdown_grace(),
            rate_limit: rate_limit(config.ai.max_requests_per_sec),
        }
    }

    /// Publishes the status event of a change this delivery just committed, if it made one,
    /// with the delivery's request id.
    async fn announce(&self, item: &Work, recorded: Option<&common::calls::Recorded>) {
        if let Some(recorded) = recorded {
            self.publisher
                .recorded(std::slice::from_ref(recorded), item.request_id())
                .await;
        }
    }

    /// The AI provider calls are sent to.
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }

    /// Pulls and processes work until `shutdown` fires; then stops pulling, lets in-flight
    /// calls finish for `shutdown_grace`, and hands the rest back to JetStream.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let tasks = TaskTracker::new();
        // Fired when the grace period is over: unfinished attempts are handed back.
        let hand_back = CancellationToken::new();
        let mut consumer = self.consumer.clone();
        'pull: loop {
            // Pull only as many messages as there are free slots, so every message pulled
            // starts at once (none waits out its ack wait in a local queue).
            let first = tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            let mut permits = vec![first];
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            let pulled = consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let failed = match pulled {
                Ok(mut batch) => {
                    let started =
                        self.start_all(&mut batch, permits, &tasks, &hand_back, &shutdown);
                    match started.await {
                        Pulled::Shutdown => break 'pull,
                        Pulled::Done => false,
                        Pulled::Failed => true,
                    }
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "pull request failed; retrying");
                    true
                }
            };
            if failed {
                match self.pause_and_recover(&shutdown).await {
                    Some(recovered) => consumer = recovered,
                    None if shutdown.is_cancelled() => break 'pull,
                    None => {}
                }
            }
        }
        tasks.close();
        tracing::info!(
            in_flight = tasks.len(),
            "transcriber stopping: no more pulls"
        );
        if tokio::time::timeout(self.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tasks.len(),
                "grace period over; handing unfinished calls back to JetStream"
            );
            hand_back.cancel();
            tasks.wait().await;
        }
        Ok(())
    }

    /// Starts a task for each message of a pulled batch, each with one of `permits`.
    async fn start_all(
        self: &Arc<Self>,
        batch: &mut jetstream::consumer::pull::Batch,
        mut permits: Vec<tokio::sync::OwnedSemaphorePermit>,
        tasks: &TaskTracker,
        hand_back: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Pulled {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    hand_back_pulled(batch).await;
                    return Pulled::Shutdown;
                }
                next = batch.next() => next,
            };
            match next {
                None => return Pulled::Done,
                Some(Err(e)) => {
                    tracing::warn!(error.message = %e, "pull batch error");
                    return Pulled::Failed;
                }
                Some(Ok(message)) => {
                    let permit = permits.pop().expect("one permit per message pulled");
                    let worker = self.clone();
                    let hand_back = hand_back.clone();
                    tasks.spawn(async move {
                        worker.deliver(message, hand_back).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// After a failed pull: waits a second, then makes sure the work stream and the consumer
    /// exist (an operator may have deleted them) and returns a fresh consumer; `None` on
    /// shutdown or if that failed too (the next pull tries again).
    async fn pause_and_recover(&self, shutdown: &CancellationToken) -> Option<PullConsumer> {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match self.source.consumer().await {
            Ok(consumer) => Some(consumer),
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot make the work consumer again yet");
                None
            }
        }
    }

    /// One delivery, in its own span, answered to JetStream (unless it is `Silent`).
    async fn deliver(&self, message: jetstream::Message, hand_back: CancellationToken) {
        let (delivered, stream_sequence) = message
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or_default();
        // `<prefix>.calls.completed.<tenant>.<call_id>`: the call's key is the last two tokens.
        let call_id = message
            .subject
            .splitn(4, '.')
            .nth(3)
            .unwrap_or_default()
            .to_owned();
        let request_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(common::nats::REQUEST_ID_HEADER))
            .map_or("", |v| v.as_str())
            .to_owned();
        let span = tracing::info_span!(
            "delivery",
            call.id = %call_id,
            delivery.attempt = delivered,
            stream.sequence = stream_sequence,
            request.id = %request_id,
            ai.attempt = tracing::field::Empty,
        );
        async {
            let outcome = self.process(&message, &hand_back).await;
            let kind = match outcome {
                Outcome::Ack => AckKind::Ack,
                Outcome::Retry(delay) => AckKind::Nak(delay),
                Outcome::Term => AckKind::Term,
                Outcome::Silent => {
                    tracing::warn!(
                        "another worker took the call over; leaving this delivery alone"
                    );
                    return;
                }
            };
            if let Err(e) = message.ack_with(kind).await {
                // JetStream will redeliver after the ack wait; the claim logic copes.
                tracing::warn!(error.message = %e, ?outcome, "cannot answer JetStream");
            }
        }
        .instrument(span)
        .await
    }

    pub async fn process(
        &self,
        message: &jetstream::Message,
        hand_back: &CancellationToken,
    ) -> Outcome {
        let item = match Work::from_message(message) {
            Ok(item) => item,
            Err(e) => {
                tracing::error!(error.message = %e, "unreadable work item; terminating it");
                return Outcome::Term;
            }
        };
        let claim = match self.claims.claim(&item).await {
            Ok(claim) => claim,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot claim the call; will look again");
                return Outcome::Retry(Some(INFRA_RETRY));
            }
        };
        match claim {
            Claim::Unknown => {
                tracing::error!("work item for a call that does not exist; terminating it");
                Outcome::Term
            }
            Claim::Skip(state) => {
                tracing::info!(call.state = %state, "call already handled; skipping duplicate work item");
                metrics::counter!("switchboard_transcriber_duplicates_total").increment(1);
                Outcome::Ack
            }
            Claim::Stale { round } => {
                tracing::info!(
                    work.version = item.version,
                    call.round = round,
                    "work item from an earlier round of a re-driven call; dropping it"
                );
                metrics::counter!("switchboard_transcriber_stale_work_items_total").increment(1);
                Outcome::Ack
            }
            Claim::Busy { retry_in } => {
                tracing::info!(
                    retry_in_ms = retry_in.as_millis() as u64,
                    "call held by another worker"
                );
                Outcome::Retry(Some(retry_in))
            }
            Claim::NotYetDue { due_in } => {
                tracing::info!(
                    retry_in_ms = due_in.as_millis() as u64,
                    "delivered before the call's next attempt is due; waiting for it"
                );
                metrics::counter!("switchboard_transcriber_early_deliveries_total").increment(1);
                Outcome::Retry(Some(due_in))
            }
            Claim::Exhausted {
                attempts,
                last_error,
                why,
            } => self.finish_give_up(&item, attempts, &last_error, why).await,
            Claim::Claimed { attempt, recorded } => {
                tracing::Span::current().record("ai.attempt", attempt);
                self.announce(&item, recorded.as_deref()).await;
                self.attempt(message, &item, attempt, hand_back).await
            }
        }
    }

    /// One AI attempt on a claimed call.
    async fn attempt(
        &self,
        message: &jetstream::Message,
        item: &Work,
        attempt: i32,
        hand_back: &CancellationToken,
    ) -> Outcome {
        metrics::counter!("switchboard_transcriber_attempts_total").increment(1);
        // The budget is held until the AI has answered: the audio is in memory till then.
        let (audio, _budget) = match self.load(message, item, attempt, hand_back).await {
            Ok(loaded) => loaded,
            Err(outcome) => return outcome,
        };
        let in_flight = metrics::gauge!("switchboard_transcriber_calls_in_flight");
        in_flight.increment(1.0);
        let request = async {
            if let Some(limit) = &self.rate_limit {
                let waiting = Instant::now();
                limit.until_ready().await;
                metrics::histogram!("switchboard_transcriber_ai_rate_limit_wait_seconds")
                    .record(waiting.elapsed().as_secs_f64());
            }
            let started = Instant::now();
            let result = tokio::time::timeout(self.ai_timeout, self.provider.transcribe(&audio))
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::Retryable {
                        message: format!("timed out after {} ms", self.ai_timeout.as_millis()),
                        retry_after: None,
                    })
                });
            metrics::histogram!("switchboard_transcriber_ai_latency_seconds", "provider" => self.provider.name())
                .record(started.elapsed().as_secs_f64());
            result
        };
        let result = tokio::select! {
            result = self.with_progress(message, item, attempt, request) => Some(result),
            _ = hand_back.cancelled() => None,
        };
        in_flight.decrement(1.0);
        match result {
            None => self.hand_back(item, attempt, None).await,
            Some(result) => self.answer(item, attempt, result).await,
        }
    }

    /// Measures the call's audio, waits until it fits the budget of audio in flight, then
    /// loads it; all the while sending progress like the AI request does (a slow load or a
    /// long wait must not let the lease or the ack wait run out: another worker would start on
    /// the call). A call too large to send is given up on without being loaded.
    async fn load(
        &self,
        message: &jetstream::Message,
        item: &Work,
        attempt: i32,
        hand_back: &CancellationToken,
    ) -> Result<(CallAudio, Held), Outcome> {
        let loading = async {
            let bytes = self.claims.audio_bytes(item).await?;
            if u64::try_from(bytes).unwrap_or(0) > self.max_audio_bytes {
                return Ok(Err(Unsendable::TooLarge(bytes)));
            }
            let held = self.budget.take(bytes.max(0) as u64).await;
            match self.claims.load_audio(item).await? {
                Some(audio) => Ok::<_, sqlx::Error>(Ok((audio, held))),
                None => Ok(Err(Unsendable::Expired)),
            }
        };
        let loaded = tokio::select! {
            loaded = self.with_progress(message, item, attempt, loading) => loaded,
            _ = hand_back.cancelled() => return Err(self.hand_back(item, attempt, None).await),
        };
        match loaded {
            Ok(Ok(loaded)) => Ok(loaded),
            Ok(Err(Unsendable::TooLarge(bytes))) => {
                let error = format!(
                    "the call's audio ({bytes} bytes of packet data) is larger than \
                     AI_MAX_AUDIO_BYTES ({})",
                    self.max_audio_bytes
                );
                tracing::warn!(audio.bytes = bytes, "call too large to transcribe");
                metrics::counter!("switchboard_transcriber_failures_total", "kind" => "audio_too_large")
                    .increment(1);
                Err(self
                    .give_up(item, attempt, &error, GiveUp::AudioTooLarge)
                    .await)
            }
            Ok(Err(Unsendable::Expired)) => {
                let error = "the call's audio has expired (AUDIO_RETENTION_DAYS): \
                             there is nothing left to transcribe";
                tracing::warn!("call's audio expired; giving up");
                metrics::counter!("switchboard_transcriber_failures_total", "kind" => "audio_expired")
                    .increment(1);
                Err(self.give_up(item, attempt, error, GiveUp::Permanent).await)
            }
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot load the call's packets");
                Err(self.hand_back(item, attempt, Some(INFRA_RETRY)).await)
            }
        }
    }

    /// Acts on the provider's answer to attempt `attempt`.
    async fn answer(
        &self,
        item: &Work,
        attempt: i32,
        result: Result<String, ProviderError>,
    ) -> Outcome {
        if let Err(e) = &result {
            metrics::counter!("switchboard_transcriber_failures_total", "kind" => e.kind())
                .increment(1);
        }
        match result {
            Ok(transcript) => self.succeed(item, attempt, transcript).await,
            Err(ProviderError::Permanent(error)) => {
                tracing::warn!(error.message = %error, "permanent AI error");
                self.give_up(item, attempt, &error, GiveUp::Permanent).await
            }
            Err(ProviderError::Retryable { message, .. })
                if attempt >= self.claims.max_attempts() =>
            {
                tracing::warn!(error.message = %message, attempt, "AI failed; no attempts left");
                self.give_up(item, attempt, &message, GiveUp::Exhausted)
                    .await
            }
            Err(ProviderError::Retryable {
                message,
                retry_after,
            }) => self.retry(item, attempt, &message, retry_after).await,
        }
    }

    /// Records the failed attempt and when the next is due, and asks JetStream to bring the
    /// message back then: after the backoff, or the provider's `Retry-After` (capped).
    async fn retry(
        &self,
        item: &Work,
        attempt: i32,
        message: &str,
        retry_after: Option<Duration>,
    ) -> Outcome {
        let scheduled = self.backoff.delay(attempt, &mut rand::rng());
        let delay = self.backoff.honouring(retry_after, scheduled);
        tracing::info!(
            error.message = %message, attempt, retry_in_ms = delay.as_millis() as u64,
            "AI failed; retrying by redelivery"
        );
        match self
            .claims
            .schedule_retry(item, attempt, message, delay)
            .await
        {
            Ok(recorded) => {
                self.announce(item, recorded.as_ref()).await;
                metrics::counter!("switchboard_transcriber_retries_total").increment(1);
                Outcome::Retry(Some(delay))
            }
            Err(FinishError::LeaseLost) => Outcome::Silent,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot record the retry");
                self.hand_back(item, attempt, Some(INFRA_RETRY)).await
            }
        }
    }

    async fn succeed(&self, item: &Work, attempt: i32, transcript: String) -> Outcome {
        let sentiment = sentiment::analyse(&transcript);
        match self
            .claims
            .archive(item, attempt, transcript, sentiment)
            .await
        {
            Ok(recorded) => {
                self.announce(item, recorded.as_ref()).await;
                tracing::info!(attempt, "call archived");
                metrics::counter!("switchboard_transcriber_successes_total").increment(1);
                Outcome::Ack
            }
            Err(FinishError::LeaseLost) => Outcome::Silent,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot store the transcript; will retry");
                self.hand_back(item, attempt, Some(INFRA_RETRY)).await
            }
        }
    }

    /// Gives up on the call after attempt `attempt`. The decision is recorded first
    /// (`calls.ai_give_up`, fenced on the attempt): from then on every redelivery finishes
    /// the give-up (the claim answers [`Claim::Exhausted`]) and none asks the AI again, even
    /// when the dead letter or `FAILED` cannot be written now. If the decision itself cannot
    /// be recorded, the attempt is handed back uncounted, as if it had not happened.
    async fn give_up(&self, item: &Work, attempt: i32, error: &str, why: GiveUp) -> Outcome {
        match self.claims.mark_give_up(item, attempt, error, why).await {
            Ok(()) => self.finish_give_up(item, attempt, error, why).await,
            Err(FinishError::LeaseLost) => Outcome::Silent,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot record the give-up; handing the attempt back");
                self.hand_back(item, attempt, Some(INFRA_RETRY)).await
            }
        }
    }

    /// The rest of a decided give-up: dead letter, then `FAILED`, then (only then) terminate
    /// the message. The dead letter's message id is the call and its round, so publishing it
    /// again after a failure further on stores it once. If a step fails, the call is released
    /// and the redelivery lands here again, through [`Claim::Exhausted`].
    async fn finish_give_up(
        &self,
        item: &Work,
        attempts: i32,
        error: &str,
        why: GiveUp,
    ) -> Outcome {
        let letter = DeadLetter {
            tenant: item.tenant.clone(),
            call_id: item.call_id.clone(),
            work_version: item.version,
            attempts,
            last_error: error.to_owned(),
            permanent: why.permanent(),
            failed_at: OffsetDateTime::now_utc(),
        };
        if let Err(e) = self.publisher.dead_letter(&letter, item.request_id()).await {
            tracing::warn!(error.message = %e, "cannot publish the dead letter; will retry");
            return self.release(item, attempts).await;
        }
        metrics::counter!("switchboard_transcriber_dead_letters_total").increment(1);
        match self.claims.fail(item, attempts, error, why).await {
            Ok(recorded) => {
                self.announce(item, recorded.as_ref()).await;
                tracing::warn!(attempts, reason = %claims::failed_reason(why), error.message = %error, "call FAILED and dead-lettered");
                Outcome::Term
            }
            Err(FinishError::LeaseLost) => Outcome::Silent,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot mark the call FAILED; will retry");
                self.release(item, attempts).await
            }
        }
    }

    /// Hands the attempt back uncounted, for redelivery after `delay`: at once on shutdown,
    /// after a short wait when our own infrastructure failed.
    async fn hand_back(&self, item: &Work, attempt: i32, delay: Option<Duration>) -> Outcome {
        if let Err(e) = self.claims.abandon(item, attempt).await {
            tracing::warn!(error.message = %e, "cannot hand the attempt back; its lease will expire");
            return Outcome::Retry(Some(INFRA_RETRY));
        }
        Outcome::Retry(delay)
    }

    /// After a failed step of a give-up: releases the call (still counted, still marked) so
    /// that the redelivery, shortly, finishes the give-up without waiting out the lease.
    async fn release(&self, item: &Work, attempt: i32) -> Outcome {
        match self.claims.release(item, attempt).await {
            Ok(()) => Outcome::Retry(Some(INFRA_RETRY)),
            Err(FinishError::LeaseLost) => Outcome::Silent,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot release the lease; it will expire");
                Outcome::Retry(Some(INFRA_RETRY))
            }
        }
    }

    /// Runs `work`, telling JetStream and Postgres every `progress_every` that this worker
    /// is still on the call, so a long AI request is not redelivered while it runs.
    async fn with_progress<T>(
        &self,
        message: &jetstream::Message,
        item: &Work,
        attempt: i32,
        work: impl Future<Output = T>,
    ) -> T {
        let mut work = std::pin::pin!(work);
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.progress_every, self.progress_every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(error.message = %e, "cannot send progress");
                    }
                    if let Err(e) = self.claims.renew(item, attempt).await {
                        tracing::warn!(error.message = %e, "cannot renew the lease");
                    }
                }
            }
        }
    }
}
