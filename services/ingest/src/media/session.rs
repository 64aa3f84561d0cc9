//! One call's audio arriving over a telephony stream, on its way into the same
//! store-then-publish path as the JSON API's packets ([`crate::writer`]), and the end of the
//! stream completing the call.
//!
//! These protocols have no acknowledgements and no retries: a frame refused is a frame lost.
//! So a [`CallStream`] retries what the writer could not store for now (Postgres or NATS
//! down, ingest shedding) for up to [`WRITE_RETRY_FOR`], keeps up to
//! [`MAX_WRITES_IN_FLIGHT`] writes going at once so a slow batch never stalls the socket, and
//! stops reading the socket (TCP back-pressure) beyond that.
//!
//! Several streams may carry one call (Twilio's duplicate `<Stream>`, a PBX forking twice):
//! their frames meet in the writer's dedup rules (the same sequence with the same audio is a
//! duplicate), and the call is completed when the last of its streams on this replica ends,
//! with the highest sequence any of them sent as its total.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{AudioFormat, CallKey, Reason};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    error::ApiError,
    lifecycle::{self, LifecycleError},
    routes::AppState,
    writer::{NewPacket, Outcome, PacketWriter, WriteError},
};

/// Every telephony stream numbers its packets from 1 (Twilio's `chunk` does; the others are
/// counted here), whatever `SEQUENCE_START` says for the JSON API.
pub const MEDIA_SEQUENCE_START: i64 = 1;

/// How long a frame the writer could not store for now (Postgres or NATS down, ingest
/// shedding) is retried before it is counted lost.
pub const WRITE_RETRY_FOR: Duration = Duration::from_secs(30);

/// Writes of one stream in flight at most; past it, the socket is not read.
pub const MAX_WRITES_IN_FLIGHT: usize = 64;

/// Which adapter a stream came in through (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Twilio,
    AudioSocket,
    L16,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Twilio => "twilio",
            Protocol::AudioSocket => "audiosocket",
            Protocol::L16 => "l16",
        }
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The PBX said so (`stop`, hangup, a close frame).
    Ended,
    /// The connection was lost (or ingest is shutting down) without the PBX saying so.
    Lost,
    /// The PBX reported an error (AudioSocket `0xff`).
    Error(String),
}

impl End {
    fn reason(&self) -> Reason {
        match self {
            End::Ended => Reason::StreamEnded,
            End::Lost => Reason::StreamLost,
            End::Error(_) => Reason::PbxError,
        }
    }

    fn label(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// The telephony streams open in this process: which calls they carry (so a call is
/// completed by the last of its streams), and their tasks (so shutdown waits for them).
#[derive(Clone)]
pub struct MediaStreams {
    open: Arc<Mutex<HashMap<CallKey, Open>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Open {
    streams: usize,
    highest: Option<i64>,
}

impl MediaStreams {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            open: Arc::default(),
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    /// Cancelled when ingest shuts down: every stream then ends as [`End::Lost`].
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tracks a stream's task, so that [`Self::wait`] waits for it.
    pub fn track<F: Future<Output = ()>>(&self, task: F) -> impl Future<Output = ()> + use<F> {
        self.tracker.track_future(task)
    }

    /// After the shutdown token fired: waits (up to `within`) for every stream to store what
    /// it has and complete its call.
    pub async fn wait(&self, within: Duration) {
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                streams = self.tracker.len(),
                "telephony streams still open at shutdown"
            );
        }
    }
}

/// One stream of one call.
pub struct CallStream {
    app: AppState,
    key: CallKey,
    format: AudioFormat,
    protocol: Protocol,
    highest: Option<i64>,
    /// The writes under way, each a task of its own so it runs as soon as it is handed over.
    writes: JoinSet<()>,
    registered: bool,
}

impl CallStream {
    /// Opens a stream of `key`'s audio in `format`: refused (429) when the call is new and
    /// its tenant already streams `MAX_STREAMING_CALLS_PER_TENANT` calls.
    pub async fn open(
        app: &AppState,
        key: CallKey,
        format: AudioFormat,
        protocol: Protocol,
    ) -> Result<CallStream, ApiError> {
        app.streaming.admit(&key).await?;
        app.media
            .open
            .lock()
            .expect("not poisoned")
            .entry(key.clone())
            .or_default()
            .streams += 1;
        metrics::counter!("switchboard_ingest_media_streams_total", "protocol" => protocol.as_str(), "event" => "opened")
            .increment(1);
        tracing::info!(call.id = %key, protocol = protocol.as_str(), %format, "media stream opened");
        Ok(CallStream {
            app: app.clone(),
            key,
            format,
            protocol,
            highest: None,
            writes: JoinSet::new(),
            registered: true,
        })
    }

    pub fn key(&self) -> &CallKey {
        &self.key
    }

    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// Hands packet `sequence` (`data`: base64 of the call's format) to the writer; waits
    /// only when [`MAX_WRITES_IN_FLIGHT`] writes are already under way.
    pub async fn packet(&mut self, sequence: i64, data: String, timestamp: f64) {
        while self.writes.try_join_next().is_some() {}
        while self.writes.len() >= MAX_WRITES_IN_FLIGHT {
            self.writes.join_next().await;
        }
        self.highest = self.highest.max(Some(sequence));
        let packet = NewPacket {
            call_id: self.key.clone(),
            sequence,
            data,
            timestamp,
            request_id: None,
            format: Some(self.format),
            sequence_start: Some(MEDIA_SEQUENCE_START),
        };
        self.writes.spawn(write_with_retry(
            self.app.writer.clone(),
            packet,
            self.protocol,
        ));
    }

    /// Waits for every write, then, if this was the call's last stream here, completes the
    /// call with the highest sequence any of its streams sent as its total.
    pub async fn finish(mut self, end: End) {
        while self.writes.join_next().await.is_some() {}
        let last = self.deregister();
        metrics::counter!("switchboard_ingest_media_streams_total", "protocol" => self.protocol.as_str(), "event" => end.label())
            .increment(1);
        tracing::info!(
            call.id = %self.key,
            protocol = self.protocol.as_str(),
            highest = self.highest,
            end = end.label(),
            "media stream ended"
        );
        let Some(highest) = last else {
            return;
        };
        let total = highest - MEDIA_SEQUENCE_START + 1;
        complete_with_retry(&self.app, &self.key, total, &end).await;
    }

    /// Leaves the registry; the highest sequence of all the call's streams if this was its
    /// last one here (and any packet was sent).
    fn deregister(&mut self) -> Option<i64> {
        if !std::mem::take(&mut self.registered) {
            return None;
        }
        let mut open = self.app.media.open.lock().expect("not poisoned");
        let entry = open.entry(self.key.clone()).or_default();
        entry.streams = entry.streams.saturating_sub(1);
        entry.highest = entry.highest.max(self.highest);
        if entry.streams > 0 {
            return None;
        }
        open.remove(&self.key).and_then(|o| o.highest)
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        // A stream dropped without `finish` (its task panicked): its call is left to the idle
        // reaper, but the call's other streams must still be able to complete it.
        self.deregister();
    }
}

/// One packet into the writer, retried while the failure is temporary.
async fn write_with_retry(writer: PacketWriter, packet: NewPacket, protocol: Protocol) {
    let deadline = Instant::now() + WRITE_RETRY_FOR;
    let mut delay = Duration::from_millis(50);
    let outcome = loop {
        let error = match writer.write(packet.clone()).await {
            Ok(stored) => match stored.outcome {
                Outcome::Accepted => break "accepted",
                Outcome::Duplicate => break "duplicate",
            },
            // Stored: the outbox relay publishes it.
            Err(WriteError::Unpublished(_)) => break "accepted",
            Err(e) => e,
        };
        let temporary = matches!(
            error,
            WriteError::Database { .. } | WriteError::Overloaded(_) | WriteError::CallLocked
        );
        if temporary && Instant::now() + delay < deadline {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
            continue;
        }
        let outcome = match error {
            WriteError::Conflict => "conflict",
            WriteError::NotInProgress(_) => "not_in_progress",
            WriteError::FormatMismatch(_) | WriteError::NotAudio(_) => "format_conflict",
            _ => "lost",
        };
        tracing::warn!(
            call.id = %packet.call_id,
            sequence = packet.sequence,
            protocol = protocol.as_str(),
            error.message = %error,
            outcome,
            "media frame not stored"
        );
        break outcome;
    };
    metrics::counter!("switchboard_ingest_media_packets_total", "protocol" => protocol.as_str(), "outcome" => outcome)
        .increment(1);
}

/// Completes the call as its stream ended; while Postgres is unreachable, retried for
/// [`WRITE_RETRY_FOR`] (then the idle reaper completes it).
async fn complete_with_retry(app: &AppState, key: &CallKey, total: i64, end: &End) {
    let error = match end {
        End::Error(e) => Some(e.as_str()),
        _ => None,
    };
    let deadline = Instant::now() + WRITE_RETRY_FOR;
    let mut delay = Duration::from_millis(100);
    loop {
        let result =
            lifecycle::complete_stream(&app.pool, &app.publisher, key, total, end.reason(), error)
                .await;
        match result {
            Ok(_) => return,
            Err(LifecycleError::Connect(_) | LifecycleError::Store(_))
                if Instant::now() + delay < deadline =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(call.id = %key, error.message = %e, "could not complete a streamed call; the idle reaper will");
                return;
            }
        }
    }
}
