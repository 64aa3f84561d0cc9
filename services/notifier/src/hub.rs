//! The hub: one JetStream subscription per process, fanned out to every socket.
//!
//! An ordered consumer reads `<PREFIX>_STATUS` from its first retained event, then live. The
//! hub keeps, in memory, the latest event of every call (the snapshot), the most recent events
//! (for exact resumes after a reconnect) and a broadcast channel to the sockets. Every event is
//! serialised once, not once per socket.
//!
//! Consistency: the feeder applies an event and broadcasts it under the write lock; a socket
//! takes its snapshot (or replay) and subscribes under the read lock. So a socket sees every
//! event exactly once: those up to its start in the snapshot or replay, the rest live.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
};
use common::{
    CallId, CallKey, TenantId,
    events::{ProgressEvent, StatusEvent},
    subjects::{StreamKind, Subjects},
};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// One status event as the sockets send it.
#[derive(Debug)]
pub struct Update {
    /// Its sequence in the status stream: what clients resume from.
    pub seq: u64,
    pub call: CallKey,
    pub version: i64,
    pub at: OffsetDateTime,
    /// `{"type":"status", ...}` with its `seq`: the frame sent live. Serialised once; a
    /// snapshot entry is the same object without the `type` (see [`Update::entry`]), so the
    /// hub keeps one copy of each event's text.
    pub frame: String,
}

/// How every status frame starts; a snapshot entry is `{` and what follows it.
const STATUS_FRAME_START: &str = "{\"type\":\"status\",";

impl Update {
    fn new(seq: u64, event: StatusEvent) -> Self {
        let mut value = serde_json::to_value(&event).expect("a status event serialises");
        value["seq"] = seq.into();
        let json = value.to_string();
        let frame = format!("{STATUS_FRAME_START}{}", &json[1..]);
        Self {
            seq,
            call: event.key(),
            version: event.version,
            at: event.at,
            frame,
        }
    }

    /// Appends the event as a snapshot entry (a JSON object without `type`).
    pub fn push_entry(&self, out: &mut String) {
        out.push('{');
        out.push_str(&self.frame[STATUS_FRAME_START.len()..]);
    }
}

/// A progress report as the sockets send it: `{"type":"progress", ...}`.
#[derive(Debug)]
pub struct Progress {
    pub call: CallKey,
    pub frame: String,
}

/// Which calls a socket sees: those of its tenant (every tenant's when authentication is
/// off), all of them or a set.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: every tenant (`SWITCHBOARD_AUTH=off` only).
    pub tenant: Option<TenantId>,
    pub calls: Calls,
}

/// Which of its tenant's calls a socket follows.
#[derive(Debug, Clone, Default)]
pub enum Calls {
    #[default]
    All,
    Only(HashSet<CallId>),
}

impl Filter {
    pub fn matches(&self, call: &CallKey) -> bool {
        self.tenant.as_ref().is_none_or(|t| t == call.tenant())
            && match &self.calls {
                Calls::All => true,
                Calls::Only(ids) => ids.contains(call.call_id()),
            }
    }
}

/// The state of every (filtered) call at one point of one stream.
#[derive(Debug)]
pub struct Snapshot {
    /// The stream sequence it is current at.
    pub seq: u64,
    /// The identity of the stream `seq` belongs to.
    pub stream: String,
    /// The latest event of each call, in stream order.
    pub calls: Vec<Arc<Update>>,
}

/// How a socket starts.
#[derive(Debug)]
pub enum Start {
    /// The current state of every (filtered) call.
    Snapshot { snapshot: Snapshot, reset: bool },
    /// Exactly the (filtered) events after the client's `since`.
    Replay(Vec<Arc<Update>>),
}

/// How often the hub checks that the status stream is still the one it follows.
const STREAM_CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    latest: HashMap<CallKey, Arc<Update>>,
    /// The same events as `latest`, by stream sequence: a snapshot is a walk in order, with
    /// no sorting under the lock.
    by_seq: BTreeMap<u64, Arc<Update>>,
    recent: VecDeque<Arc<Update>>,
    /// The oldest sequence a resume can start after: every event from `floor` on is in
    /// `recent` (or was dropped as stale, which a client would drop too).
    floor: u64,
    last_seq: u64,
    /// Identifies the stream the sequences belong to (its creation time): a client resuming
    /// with sequences of another stream gets a fresh snapshot.
    stream_id: String,
}

/// What a socket receives after it joined: status events in stream order, and progress
/// reports. Two rings on purpose: progress reports (thousands of streaming calls, once a
/// second each) must never push the status events a lagging client recovers from out of its
/// ring. A client that falls behind on progress just skips reports (the next one supersedes
/// them); one that falls behind on status events gets a fresh snapshot.
pub struct Subscription {
    pub status: broadcast::Receiver<Arc<Update>>,
    pub progress: broadcast::Receiver<Arc<Progress>>,
}

pub struct Hub {
    state: RwLock<State>,
    status_tx: broadcast::Sender<Arc<Update>>,
    progress_tx: broadcast::Sender<Arc<Progress>>,
    replay_capacity: usize,
    ready: watch::Sender<bool>,
    /// Bumped when the status stream turns out to be another one (deleted and recreated,
    /// restored): connected sockets close so their clients resume and get a `reset` snapshot.
    generation: watch::Sender<u64>,
    /// How many events [`Hub::apply`] has applied (stale ones are not counted).
    applied: watch::Sender<u64>,
}

impl Hub {
    /// `client_queue`: how far (in events) a socket may fall behind before it lags.
    pub fn new(client_queue: usize, replay_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::default(),
            status_tx: broadcast::channel(client_queue).0,
            progress_tx: broadcast::channel(client_queue).0,
            replay_capacity,
            ready: watch::Sender::new(false),
            generation: watch::Sender::new(0),
            applied: watch::Sender::new(0),
        })
    }

    /// Whether the hub has caught up with the stream as it was at start-up.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the hub has caught up (snapshots before that would be incomplete).
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        ready.wait_for(|r| *r).await.ok();
    }

    /// Changes whenever the hub starts over on a different status stream.
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Counts the events applied: a hook for tests, which wait for their events before
    /// connecting (a process-wide metric would count every hub of a test process).
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Applies one event from the stream. An event whose version is not newer than the one
    /// already known for its call (late or repeated) is dropped, never moving a call back.
    pub fn apply(&self, seq: u64, event: StatusEvent) {
        let mut state = self.state.write().expect("hub lock");
        state.last_seq = state.last_seq.max(seq);
        if state
            .latest
            .get(&event.key())
            .is_some_and(|known| known.version >= event.version)
        {
            metrics::counter!("switchboard_notifier_stale_events_total").increment(1);
            return;
        }
        let update = Arc::new(Update::new(seq, event));
        if let Some(replaced) = state.latest.insert(update.call.clone(), update.clone()) {
            state.by_seq.remove(&replaced.seq);
        }
        state.by_seq.insert(seq, update.clone());
        state.recent.push_back(update.clone());
        while state.recent.len() > self.replay_capacity {
            if let Some(evicted) = state.recent.pop_front() {
                state.floor = evicted.seq + 1;
            }
        }
        // No receivers is fine: nobody is connected.
        let _ = self.status_tx.send(update);
        metrics::counter!("switchboard_notifier_events_total").increment(1);
        self.applied.send_modify(|n| *n += 1);
    }

    /// Fans a progress report out as it is (the next status event supersedes it).
    pub fn progress(&self, event: ProgressEvent) {
        let mut value = serde_json::to_value(&event).expect("a progress event serialises");
        value["type"] = "progress".into();
        let _ = self.progress_tx.send(Arc::new(Progress {
            call: event.key(),
            frame: value.to_string(),
        }));
    }

    /// Follows the progress subject (plain NATS) until `shutdown`.
    pub async fn follow_progress(
        self: Arc<Self>,
        client: async_nats::Client,
        subjects: Subjects,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut progress = client
            .subscribe(subjects.all_progress())
            .await
            .context("subscribing to progress reports")?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = progress.next() => match message {
                    Some(message) => {
                        if let Ok(event) = serde_json::from_slice::<ProgressEvent>(&message.payload) {
                            self.progress(event);
                        }
                    }
                    None => anyhow::bail!("the progress subscription ended"),
                },
            }
        }
    }

    /// Where a new socket starts, and its subscription to what follows. `stream` is the
    /// stream identity the client's `since` belongs to, when it knows it.
    pub fn join(
        &self,
        filter: &Filter,
        since: Option<u64>,
        stream: Option<&str>,
    ) -> (Start, Subscription) {
        let state = self.state.read().expect("hub lock");
        let subscription = Subscription {
            status: self.status_tx.subscribe(),
            progress: self.progress_tx.subscribe(),
        };
        let same_stream = stream.is_none_or(|id| id == state.stream_id);
        let start = match since {
            Some(n) if same_stream && n <= state.last_seq && n + 1 >= state.floor => Start::Replay(
                state
                    .recent
                    .iter()
                    .filter(|u| u.seq > n && filter.matches(&u.call))
                    .cloned()
                    .collect(),
            ),
            since => Start::Snapshot {
                snapshot: snapshot_of(&state, filter),
                reset: since.is_some(),
            },
        };
        (start, subscription)
    }

    /// A fresh snapshot (after a lag or a change of subscriptions).
    pub fn snapshot(&self, filter: &Filter) -> Snapshot {
        let state = self.state.read().expect("hub lock");
        snapshot_of(&state, filter)
    }

    /// Forgets calls whose latest event is older than `retention` (the stream forgets them too).
    pub fn prune(&self, retention: Duration) {
        let cutoff = OffsetDateTime::now_utc() - retention;
        let mut state = self.state.write().expect("hub lock");
        let state = &mut *state;
        state.latest.retain(|_, u| u.at >= cutoff);
        state.by_seq.retain(|_, u| u.at >= cutoff);
    }

    /// Follows the status stream until `shutdown`: the process's one subscription. If the
    /// subscription fails it is set up again (with backoff) and resumes after the last event
    /// applied; `/readyz` reports not ready meanwhile.
    pub async fn follow(
        self: Arc<Self>,
        js: jetstream::Context,
        subjects: Subjects,
        retention: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = tokio::time::Instant::now();
            match self.follow_once(&js, &subjects, retention, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.ready.send_replace(false);
                    if started.elapsed() > Duration::from_secs(60) {
                        // It had been working: this is a new outage, not the same one.
                        backoff = Duration::from_millis(500);
                    }
                    tracing::warn!(
                        error.message = %e, error.cause_chain = ?e, retry_in_ms = backoff.as_millis() as u64,
                        "status subscription lost; following again"
                    );
                    metrics::counter!("switchboard_notifier_resubscriptions_total").increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Prepares to follow the stream `stream_id` whose first retained event is `first`:
    /// on a stream other than the one the hub holds (recreated, restored, or the first one),
    /// the hub starts over and connected sockets are told to reconnect. Returns the sequence
    /// to resume after.
    fn start_on(&self, stream_id: &str, first: u64) -> u64 {
        let mut state = self.state.write().expect("hub lock");
        if state.stream_id != stream_id {
            if !state.stream_id.is_empty() {
                tracing::warn!(
                    stream.old = %state.stream_id, stream.new = %stream_id,
                    "the status stream was recreated; starting over and resetting clients"
                );
                self.generation.send_modify(|g| *g += 1);
            }
            *state = State {
                stream_id: stream_id.to_owned(),
                floor: first,
                last_seq: first.saturating_sub(1),
                ..State::default()
            };
        }
        state.last_seq
    }

    async fn follow_once(
        &self,
        js: &jetstream::Context,
        subjects: &Subjects,
        retention: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut stream = js
            .get_stream(subjects.stream_name(StreamKind::Status))
            .await
            .context("looking up the status stream")?;
        let info = stream.info().await.context("status stream info")?.clone();
        let stream_state = info.state.clone();
        // A stream recreated since we last read it (purged, restored) starts its sequences
        // again: everything we hold is from another stream.
        let stream_id = info.created.unix_timestamp_nanos().to_string();
        let resume_after = self.start_on(&stream_id, stream_state.first_sequence);
        let caught_up_at = stream_state.last_sequence;
        let deliver_policy = if resume_after >= stream_state.first_sequence {
            DeliverPolicy::ByStartSequence {
                start_sequence: resume_after + 1,
            }
        } else {
            DeliverPolicy::All
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subjects.all_status(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .context("creating the ordered consumer on the status stream")?;
        let mut messages = consumer
            .messages()
            .await
            .context("subscribing to status events")?;
        if resume_after >= caught_up_at {
            self.ready.send_replace(true);
        }
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        let mut check = tokio::time::interval(STREAM_CHECK_EVERY);
        check.reset();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = prune.tick() => { self.prune(retention); continue; }
                _ = check.tick() => {
                    // An ordered consumer would follow a recreated stream from our old
                    // sequence, silently skipping its first events: look, and start over.
                    let info = stream.info().await.context("checking the status stream")?;
                    let now = info.created.unix_timestamp_nanos().to_string();
                    anyhow::ensure!(now == stream_id, "the status stream was recreated");
                    continue;
                }
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                // Set up again by `follow`, which resumes after the last event applied (or
                // starts over on a recreated stream) rather than trusting the consumer's own
                // recovery to be on the same stream.
                Some(Err(e)) => return Err(e).context("status subscription error"),
                None => anyhow::bail!("the status subscription ended"),
            };
            let Ok(info) = message.info() else { continue };
            let seq = info.stream_sequence;
            match serde_json::from_slice::<StatusEvent>(&message.payload) {
                Ok(event) => self.apply(seq, event),
                Err(e) => {
                    tracing::warn!(stream.sequence = seq, error.message = %e, "unreadable status event skipped");
                }
            }
            if seq >= caught_up_at && !self.is_ready() {
                tracing::info!(stream.sequence = seq, "caught up with the status stream");
                self.ready.send_replace(true);
            }
        }
    }
}

/// The latest event of each (filtered) call, in stream order, with the sequence and stream
/// they are current at: all three read under one lock, so they always belong together. Only
/// pointers are cloned; the text of a snapshot is built by the socket, outside the lock.
fn snapshot_of(state: &State, filter: &Filter) -> Snapshot {
    let calls = match (&filter.tenant, &filter.calls) {
        (Some(tenant), Calls::Only(ids)) => {
            let mut calls: Vec<Arc<Update>> = ids
                .iter()
                .filter_map(|id| {
                    let key = CallKey::new(tenant.clone(), id.clone());
                    state.latest.get(&key).cloned()
                })
                .collect();
            calls.sort_by_key(|u| u.seq);
            calls
        }
        // One walk in stream order, keeping the socket's tenant's calls.
        _ => state
            .by_seq
            .values()
            .filter(|u| filter.matches(&u.call))
            .cloned()
            .collect(),
    };
    Snapshot {
        seq: state.last_seq,
        stream: state.stream_id.clone(),
        calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::CallState;

    fn event(call: &str, version: i64, state: CallState) -> StatusEvent {
        StatusEvent {
            tenant: TenantId::parse("acme").unwrap(),
            call_id: CallId::parse(call).unwrap(),
            state,
            previous_state: None,
            version,
            at: OffsetDateTime::now_utc(),
            reason: "test".into(),
            packets_received: 0,
            missing_packets: 0,
            ai_attempts: 0,
            last_error: None,
            transcript: None,
            transcript_chars: None,
            transcript_truncated: false,
            sentiment: None,
            next_attempt_at: None,
        }
    }

    #[test]
    fn a_late_or_repeated_event_never_moves_a_call_back() {
        let hub = Hub::new(16, 100);
        hub.apply(1, event("a", 1, CallState::InProgress));
        hub.apply(2, event("a", 2, CallState::Completed));
        hub.apply(3, event("a", 1, CallState::InProgress));
        hub.apply(4, event("a", 2, CallState::Completed));
        let Snapshot { seq, calls, .. } = hub.snapshot(&Filter::default());
        assert_eq!(seq, 4);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].version, 2);
        assert!(calls[0].frame.contains("\"state\":\"COMPLETED\""));
        let mut entry = String::new();
        calls[0].push_entry(&mut entry);
        let entry: serde_json::Value = serde_json::from_str(&entry).unwrap();
        assert_eq!(entry["seq"], 2);
        assert!(entry.get("type").is_none());
        assert!(calls[0].frame.starts_with("{\"type\":\"status\","));
    }

    /// The frames are written by hand for speed; the client's typed view of them (`wire`'s
    /// `LiveFrame`) must read them as they are.
    #[test]
    fn status_entries_and_progress_frames_read_as_the_typed_live_frames() {
        use common::live::LiveFrame;
        let hub = Hub::new(16, 100);
        let (_, mut subscription) = hub.join(&Filter::default(), None, None);
        let update = Update::new(7, event("a", 3, CallState::Completed));
        let LiveFrame::Status(status) = serde_json::from_str(&update.frame).unwrap() else {
            panic!("a status frame: {}", update.frame);
        };
        assert_eq!((status.seq, status.event.version), (7, 3));
        let mut entry = String::new();
        update.push_entry(&mut entry);
        let page =
            format!("{{\"type\":\"snapshot_page\",\"seq\":7,\"calls\":[{entry}],\"more\":false}}");
        let LiveFrame::SnapshotPage(page) = serde_json::from_str(&page).unwrap() else {
            panic!("a snapshot page: {page}");
        };
        assert_eq!(page.calls, [status]);

        hub.progress(ProgressEvent {
            tenant: TenantId::parse("acme").unwrap(),
            call_id: CallId::parse("a").unwrap(),
            packets_received: 5,
            missing_packets: 1,
            last_sequence: Some(5),
            at: OffsetDateTime::now_utc(),
        });
        let progress = subscription.progress.try_recv().unwrap();
        let LiveFrame::Progress(progress) = serde_json::from_str(&progress.frame).unwrap() else {
            panic!("a progress frame: {}", progress.frame);
        };
        assert_eq!(progress.packets_received, 5);
    }

    #[test]
    fn the_applied_count_counts_events_applied_and_not_stale_ones() {
        let hub = Hub::new(16, 100);
        let applied = hub.watch_applied();
        hub.apply(1, event("a", 1, CallState::InProgress));
        hub.apply(2, event("a", 1, CallState::InProgress));
        hub.apply(3, event("b", 1, CallState::InProgress));
        assert_eq!(*applied.borrow(), 2);
    }

    #[test]
    fn resumes_replay_exactly_what_followed_or_reset_when_too_old() {
        let hub = Hub::new(16, 3);
        for (seq, call) in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")] {
            hub.apply(seq, event(call, 1, CallState::InProgress));
        }
        // Only events 3..=5 are kept: resuming after 2 is exact, after 1 is not.
        match hub.join(&Filter::default(), Some(2), None).0 {
            Start::Replay(updates) => {
                assert_eq!(updates.iter().map(|u| u.seq).collect::<Vec<_>>(), [3, 4, 5])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            hub.join(&Filter::default(), Some(1), None).0,
            Start::Snapshot { reset: true, .. }
        ));
        assert!(matches!(
            hub.join(&Filter::default(), Some(99), None).0,
            Start::Snapshot { reset: true, .. }
        ));
        assert!(matches!(
            hub.join(&Filter::default(), Some(4), Some("another-stream"))
                .0,
            Start::Snapshot { reset: true, .. }
        ));
        match hub.join(&Filter::default(), Some(5), None).0 {
            Start::Replay(updates) => assert!(updates.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
