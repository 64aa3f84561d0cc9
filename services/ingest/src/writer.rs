//! The batching packet writer: the heart of ingest's write path.
//!
//! Every packet request hands its packet to a writer task (`INGEST_WRITERS` of them, each
//! owning the calls that hash to it) and waits for the verdict. The writer takes whatever has
//! queued up (up to `INGEST_MAX_BATCH`, without waiting for more: under light load a batch is
//! one packet and latency stays one transaction) and stores the whole batch in one
//! transaction whose main statement does the lock, insert, count and outbox at once
//! (`UNNEST` arrays), so thousands of concurrent packets cost a handful of round trips
//! instead of one commit each. After the commit, a task of the batch's own publishes its packets
//! to JetStream (concurrently) and only then answers the requests: `202` means committed and
//! acknowledged. No row lock is ever held across a network call, and the publish does not
//! depend on the client still being there.
//!
//! Nothing stored is left unpublished: the batch's transaction also writes one
//! `packet_outbox` row naming its new packets, deleted once JetStream has acknowledged them
//! all. The outbox relay (`crate::relay`) republishes whatever a crash, a NATS outage or a
//! client that gave up left behind. Events carry what Postgres stored (the first timestamp
//! of a retried packet, not the retry's).
//!
//! A call's counts are kept incrementally (see [`crate::gaps`]): a packet costs the same
//! whether its call has no gap or a hundred thousand; and the first missing ranges a lossy
//! call's packets are answered with are remembered between batches ([`crate::windows`]).
//!
//! Correctness under races comes from Postgres, not from this task: calls are created with
//! `INSERT .. ON CONFLICT DO NOTHING` (concurrent first packets, even on several replicas,
//! create one call), the batch locks its calls (`FOR NO KEY UPDATE`, existing calls in call-id
//! order) before checking they are `IN_PROGRESS`, so a completion either commits before the
//! batch (its packets get 409) or waits for it (its packets are in), and packets are unique per
//! (call, sequence). A call whose row another transaction holds is passed over by the batch
//! (`SKIP LOCKED`) and stored right after the batch commits, in a transaction that waits for
//! it alone, briefly: no writer ever waits for a lock while holding others, and one stuck call
//! never holds up the rest. Should Postgres still abort a batch as a deadlock or a
//! serialization failure, the writer runs it again.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use common::{
    AudioFormat, CallKey, CallState, Reason,
    calls::{
        self, Recorded,
        packets::{CallCounts, Locked, NewCall, NewRow, StoredBatch},
    },
    events::{PacketEvent, ProgressEvent},
    outbox::Publisher,
    store::{self, MissingRange},
};
use futures::future::join_all;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use time::OffsetDateTime;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    error::is_database_unavailable,
    gaps::{self, Before, Gap, GapChanges},
    windows::Windows,
};

/// Most missing ranges returned with one packet's answer, lowest first (`missing_packets`
/// counts them all; `GET /v1/call/{id}` lists more). A constant, so that the answer to a
/// packet of a very lossy call costs no more than any other.
pub const MAX_MISSING_RANGES_IN_RESPONSE: i64 = 100;

/// Highest sequence (and `total_packets`) accepted: 50 packets a second for over three weeks.
/// Far below `i64::MAX`, so sequence arithmetic never overflows and a call's audio stays a
/// size the transcriber can assemble.
pub const MAX_SEQUENCE: i64 = 100_000_000;

/// Packets queued for the writer tasks at most (shared among them); beyond that, requests
/// are answered 503 `overloaded` at once.
const QUEUE_CAPACITY: usize = 16_384;

/// A validated packet, ready to store.
#[derive(Debug, Clone)]
pub struct NewPacket {
    pub call_id: CallKey,
    pub sequence: i64,
    pub data: String,
    pub timestamp: f64,
    /// Carried on the JetStream publish, so the packet can be followed across services.
    pub request_id: Option<String>,
    /// The format the packet's data is in; `None` takes its call's (text for a new call). A
    /// packet declaring another format than its call's is refused.
    pub format: Option<AudioFormat>,
    /// The first sequence number of its call, should this packet create it; `None` takes
    /// `SEQUENCE_START` (a Twilio stream counts from 1 whatever it says).
    pub sequence_start: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Accepted,
    /// The same sequence with the same data was already stored.
    Duplicate,
}

/// The verdict on a packet that is (now or already) stored, and published.
#[derive(Debug, Clone)]
pub struct Stored {
    pub outcome: Outcome,
    pub received_at: OffsetDateTime,
    /// The PBX timestamp as stored: the first one sent, for a duplicate.
    pub sent_at: f64,
    /// The call's missing ranges after this batch, lowest first, at most
    /// [`MAX_MISSING_RANGES_IN_RESPONSE`].
    pub missing: Vec<MissingRange>,
    /// How many sequences the call is missing in all.
    pub missing_packets: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the same sequence was stored with different data")]
    Conflict,
    #[error("the call is {0}, not IN_PROGRESS")]
    NotInProgress(CallState),
    #[error("the call numbers its packets from {start}")]
    BeforeStart { start: i64 },
    #[error("the call's audio is {0}")]
    FormatMismatch(AudioFormat),
    /// A packet declaring no format, for a call of audio, whose data is not base64 of whole
    /// samples of it.
    #[error("the call's audio is {0}, and the data is not base64 of whole samples of it")]
    NotAudio(AudioFormat),
    #[error("database error: {message}")]
    Database { unavailable: bool, message: String },
    /// Stored, but JetStream did not acknowledge it (the outbox relay will publish it).
    #[error("stored, but not acknowledged by JetStream: {0}")]
    Unpublished(String),
    #[error("the writer is shutting down")]
    Closed,
    /// The call's row is held locked by another transaction for longer than a batch waits:
    /// not stored, retry later.
    #[error("the call is locked by another transaction")]
    CallLocked,
    /// Not answered within `INGEST_REQUEST_DEADLINE_MS`, or the queue is full: shed. It may
    /// still be stored (a retry is then a duplicate); it was not acknowledged.
    #[error("{0}")]
    Overloaded(String),
}

impl WriteError {
    fn from_failure(failure: &BatchFailure) -> Self {
        WriteError::Database {
            unavailable: failure.is_unavailable(),
            message: failure.error.to_string(),
        }
    }
}

/// Why a batch was not stored.
#[derive(Debug)]
struct BatchFailure {
    error: sqlx::Error,
    /// Failed before the transaction began: no connection could be had, whatever the
    /// error says, so the database is unavailable to us (503, not 500).
    connecting: bool,
}

impl BatchFailure {
    fn is_unavailable(&self) -> bool {
        self.connecting || is_database_unavailable(&self.error)
    }

    /// A deadlock (40P01) or serialization failure (40001): running it again will do.
    fn is_conflict(&self) -> bool {
        matches!(&self.error, sqlx::Error::Database(e) if matches!(e.code().as_deref(), Some("40P01") | Some("40001")))
    }
}

impl From<sqlx::Error> for BatchFailure {
    fn from(error: sqlx::Error) -> Self {
        Self {
            error,
            connecting: false,
        }
    }
}

type Reply = oneshot::Sender<Result<Stored, WriteError>>;

struct Job {
    packet: NewPacket,
    reply: Reply,
}

/// The handle requests use. The writer tasks end once every handle is dropped and their
/// queues are drained, so shutting the server down lets queued packets finish.
#[derive(Clone)]
pub struct PacketWriter {
    /// One queue per writer task; a call's packets always go to the same one
    /// ([`shard_of`]), so they are stored in the order they came.
    shards: Arc<[mpsc::Sender<Job>]>,
    /// `INGEST_REQUEST_DEADLINE_MS`: how long a packet may take from arriving to its answer.
    deadline: Duration,
}

/// What a writer task works with.
#[derive(Clone)]
struct Writer {
    pool: PgPool,
    publisher: Publisher,
    max_batch: usize,
    /// `SEQUENCE_START`: the first sequence number of the calls this writer creates.
    sequence_start: i64,
    /// Outbox rows whose packets JetStream has acknowledged, back to the writer, which deletes
    /// them in its next batch's transaction: no commit of their own on the hot path.
    acknowledged: mpsc::UnboundedSender<Vec<i64>>,
}

/// How the writer is set up.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Most packets in one transaction (`INGEST_MAX_BATCH`).
    pub max_batch: usize,
    /// Writer tasks, each with its own transaction in flight (`INGEST_WRITERS`).
    pub writers: usize,
    /// `SEQUENCE_START`.
    pub sequence_start: i64,
    /// `INGEST_REQUEST_DEADLINE_MS`.
    pub deadline: Duration,
}

impl PacketWriter {
    /// Starts `settings.writers` writer tasks; the handle returned ends when all have.
    pub fn spawn(
        pool: PgPool,
        publisher: Publisher,
        settings: WriterSettings,
    ) -> (Self, JoinHandle<()>) {
        let writers = settings.writers.max(1);
        let mut shards = Vec::with_capacity(writers);
        let mut tasks = Vec::with_capacity(writers);
        for _ in 0..writers {
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY / writers);
            let (acknowledged, acknowledged_rx) = mpsc::unbounded_channel();
            let writer = Writer {
                pool: pool.clone(),
                publisher: publisher.clone(),
                max_batch: settings.max_batch,
                sequence_start: settings.sequence_start,
                acknowledged,
            };
            shards.push(tx);
            tasks.push(tokio::spawn(run(rx, acknowledged_rx, writer)));
        }
        let all = tokio::spawn(async move {
            for task in tasks {
                if let Err(e) = task.await
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        });
        (
            Self {
                shards: shards.into(),
                deadline: settings.deadline,
            },
            all,
        )
    }

    /// Stores one packet (batched with its neighbours), publishes it, and returns the verdict,
    /// within the deadline. Overload is answered at once rather than queued without end: a
    /// full queue, or a verdict not ready in time, is [`WriteError::Overloaded`] (the PBX
    /// retries after `Retry-After`; a packet stored meanwhile makes that retry a duplicate).
    pub async fn write(&self, packet: NewPacket) -> Result<Stored, WriteError> {
        let (reply, verdict) = oneshot::channel();
        let shard = &self.shards[shard_of(packet.call_id.as_str(), self.shards.len())];
        match shard.try_send(Job { packet, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("switchboard_ingest_shed_total", "reason" => "queue_full")
                    .increment(1);
                return Err(WriteError::Overloaded(format!(
                    "{} packets are already waiting to be stored",
                    QUEUE_CAPACITY / self.shards.len()
                )));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(WriteError::Closed),
        }
        match tokio::time::timeout(self.deadline, verdict).await {
            Ok(verdict) => verdict.map_err(|_| WriteError::Closed)?,
            Err(_) => {
                metrics::counter!("switchboard_ingest_shed_total", "reason" => "deadline")
                    .increment(1);
                Err(WriteError::Overloaded(format!(
                    "not stored and acknowledged within {} ms (INGEST_REQUEST_DEADLINE_MS)",
                    self.deadline.as_millis()
                )))
            }
        }
    }
}

/// The writer task a call's packets go to. Calls on different tasks never share a row lock, so
/// the tasks' transactions run side by side without waiting for each other.
fn shard_of(call_id: &str, shards: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(call_id, &mut hasher);
    (std::hash::Hasher::finish(&hasher) % shards as u64) as usize
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    mut acknowledged: mpsc::UnboundedReceiver<Vec<i64>>,
    writer: Writer,
) {
    let mut jobs = Vec::with_capacity(writer.max_batch);
    let mut progress = HashSet::new();
    let mut memory = Memory::default();
    // Acknowledged outbox rows not deleted yet.
    let mut done: Vec<i64> = Vec::new();
    let mut report = tokio::time::interval(PROGRESS_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each batch's publishing runs on its own task; shutdown waits for them.
    let publishing = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            // `recv_many` is cancel-safe: a tick never loses packets.
            received = rx.recv_many(&mut jobs, writer.max_batch) => {
                if received == 0 {
                    break;
                }
                let mut batch = std::mem::replace(&mut jobs, Vec::with_capacity(writer.max_batch));
                // Nobody waits for these any more (their deadline passed, or the client
                // went): storing them now would only delay the packets behind them.
                let waiting = batch.len();
                batch.retain(|job| !job.reply.is_closed());
                if batch.len() < waiting {
                    metrics::counter!("switchboard_ingest_shed_total", "reason" => "abandoned")
                        .increment((waiting - batch.len()) as u64);
                }
                if batch.is_empty() {
                    continue;
                }
                progress.extend(batch.iter().map(|j| j.packet.call_id.to_string()));
                let deletes = std::mem::take(&mut done);
                done = write_batch(&writer, &mut memory, &publishing, batch, deletes).await;
            }
            Some(ids) = acknowledged.recv() => done.extend(ids),
            _ = report.tick() => {
                memory.windows.prune(Instant::now() - WINDOW_IDLE);
                if progress.is_empty() && done.is_empty() {
                    continue;
                }
                let due: Vec<String> = progress.drain().collect();
                let deletes = std::mem::take(&mut done);
                let writer = writer.clone();
                // Off the write path: a report is a nicety, never a delay for packets; and
                // acknowledged outbox rows that no batch carried (quiet times) go now.
                tokio::spawn(async move {
                    clear_outbox(&writer, deletes).await;
                    if due.is_empty() {
                        return;
                    }
                    if let Err(e) = publish_progress(&writer.pool, &writer.publisher, &due).await {
                        tracing::debug!(error.message = %e, "progress report skipped");
                    }
                });
            }
        }
    }
    publishing.close();
    publishing.wait().await;
    acknowledged.close();
    while let Some(ids) = acknowledged.recv().await {
        done.extend(ids);
    }
    clear_outbox(&writer, done).await;
    tracing::debug!("packet writer stopped");
}

/// Deletes acknowledged outbox rows outside a batch (quiet times, shutdown). Rows it could
/// not delete go back to the writer for its next batch, when it has a next one.
async fn clear_outbox(writer: &Writer, ids: Vec<i64>) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = sqlx::query("DELETE FROM packet_outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&writer.pool)
        .await
    {
        tracing::warn!(error.message = %e, "cannot clear the packet outbox yet");
        writer.acknowledged.send(ids).ok();
    }
}

/// How often the calls that received packets get a progress report: once per period, so at
/// most once a second per call, and the last packets of a burst are reported too.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

async fn publish_progress(
    pool: &PgPool,
    publisher: &Publisher,
    calls: &[String],
) -> anyhow::Result<()> {
    for row in store::calls_in_state(pool, calls, CallState::InProgress).await? {
        let event = ProgressEvent {
            tenant: row.key.tenant().clone(),
            call_id: row.key.call_id().clone(),
            packets_received: row.packets_received,
            missing_packets: row.missing_packets,
            last_sequence: row.last_sequence,
            at: time::OffsetDateTime::now_utc(),
        };
        publisher.progress(&event).await?;
    }
    Ok(())
}

/// Commits one batch (deleting the acknowledged outbox rows `deletes` in the same
/// transaction), then hands it to a task of its own that publishes and answers. Returns the
/// deletes still to do (the batch failed).
async fn write_batch(
    writer: &Writer,
    memory: &mut Memory,
    publishing: &tokio_util::task::TaskTracker,
    jobs: Vec<Job>,
    deletes: Vec<i64>,
) -> Vec<i64> {
    let started = Instant::now();
    let (packets, replies): (Vec<NewPacket>, Vec<Reply>) =
        jobs.into_iter().map(|job| (job.packet, job.reply)).unzip();
    let (results, outbox, deleted) = store_batch(writer, memory, &packets, &deletes).await;
    metrics::histogram!("switchboard_ingest_batch_size").record(packets.len() as f64);
    metrics::histogram!("switchboard_ingest_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    publishing.spawn(publish_and_answer(
        writer.clone(),
        packets,
        replies,
        results,
        outbox,
    ));
    if deleted { Vec::new() } else { deletes }
}

/// Stores a batch: in one transaction, or (if one packet is poison) one by one. Returns a
/// verdict per packet, the outbox rows written, and whether `deletes` were deleted.
async fn store_batch(
    writer: &Writer,
    memory: &mut Memory,
    packets: &[NewPacket],
    deletes: &[i64],
) -> (Vec<Result<Stored, WriteError>>, Vec<i64>, bool) {
    match commit_with_retry(writer, memory, packets, deletes).await {
        Ok(mut batch) => {
            announce(
                &writer.publisher,
                packets,
                std::mem::take(&mut batch.created),
            );
            if !batch.held.is_empty() {
                store_held_calls(writer, memory, packets, &mut batch).await;
            }
            (batch.results, batch.outbox, true)
        }
        Err(failure) if packets.len() > 1 && !failure.is_unavailable() => {
            // Validation should make this impossible, but if one packet is poison, store
            // the others one by one instead of failing them all (and forever, on retry).
            tracing::error!(
                error.message = %failure.error, batch.size = packets.len(),
                "batch failed; retrying its packets one by one"
            );
            let mut results = Vec::with_capacity(packets.len());
            let mut outbox = Vec::new();
            for packet in packets {
                let one = std::slice::from_ref(packet);
                match commit_batch(writer, memory, one, &[], None).await {
                    Ok(mut batch) => {
                        announce(
                            &writer.publisher,
                            std::slice::from_ref(packet),
                            batch.created,
                        );
                        outbox.extend(batch.outbox);
                        results.push(batch.results.pop().expect("one result per packet"));
                    }
                    Err(failure) => {
                        memory.windows.clear();
                        results.push(Err(WriteError::from_failure(&failure)));
                    }
                }
            }
            (results, outbox, false)
        }
        Err(failure) => (
            vec![Err(WriteError::from_failure(&failure)); packets.len()],
            Vec::new(),
            false,
        ),
    }
}

/// Publishes every stored packet of a batch (duplicates too: their first attempt may have
/// missed JetStream, and `Nats-Msg-Id` makes the copy a no-op), answers each request, and
/// hands the batch's outbox rows back for deletion once every new packet is acknowledged.
async fn publish_and_answer(
    writer: Writer,
    packets: Vec<NewPacket>,
    replies: Vec<Reply>,
    results: Vec<Result<Stored, WriteError>>,
    outbox: Vec<i64>,
) {
    // Each request is answered as soon as its own packet is acknowledged, not when the
    // slowest of the batch is.
    let answered = join_all(packets.iter().zip(results).zip(replies).map(
        |((packet, result), reply)| {
            let publisher = &writer.publisher;
            async move {
                let started = Instant::now();
                let result = match result {
                    Ok(stored) => match publish_packet(publisher, packet, &stored).await {
                        Ok(()) => Ok(stored),
                        Err(e) => Err(WriteError::Unpublished(e)),
                    },
                    Err(e) => Err(e),
                };
                metrics::histogram!("switchboard_ingest_publish_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                let acknowledged = !matches!(result, Err(WriteError::Unpublished(_)));
                // The request may have gone (client disconnected): the packet is stored and
                // published regardless.
                reply.send(result).ok();
                acknowledged
            }
        },
    ))
    .await;
    let all_acknowledged = answered.into_iter().all(|acknowledged| acknowledged);
    if all_acknowledged && !outbox.is_empty() {
        // The writer deletes them with its next batch (the relay leaves young rows alone).
        writer.acknowledged.send(outbox).ok();
    }
}

/// One packet event, as stored, with its `Nats-Msg-Id`.
async fn publish_packet(
    publisher: &Publisher,
    packet: &NewPacket,
    stored: &Stored,
) -> Result<(), String> {
    let event = PacketEvent {
        tenant: packet.call_id.tenant().clone(),
        call_id: packet.call_id.call_id().clone(),
        sequence: packet.sequence,
        data: packet.data.clone(),
        timestamp: stored.sent_at,
        received_at: stored.received_at,
    };
    publisher.packet(&event, packet.request_id.as_deref()).await
}

/// Publishes the status events of calls the batch created, without holding up the writer,
/// each with the request id of the packet that created it.
fn announce(publisher: &Publisher, packets: &[NewPacket], created: Vec<Recorded>) {
    if created.is_empty() {
        return;
    }
    let request_ids: HashMap<String, Option<String>> = created
        .iter()
        .map(|r| {
            let id = packets
                .iter()
                .find(|p| p.call_id == r.call.key)
                .and_then(|p| p.request_id.clone());
            (r.call.key.to_string(), id)
        })
        .collect();
    let publisher = publisher.clone();
    tokio::spawn(async move {
        join_all(created.iter().map(|recorded| {
            let request_id = request_ids[recorded.call.key.as_str()].as_deref();
            publisher.recorded(std::slice::from_ref(recorded), request_id)
        }))
        .await;
    });
}

struct BatchOutcome {
    /// One per packet, in order.
    results: Vec<Result<Stored, WriteError>>,
    /// Calls this batch created, with their status events to publish.
    created: Vec<Recorded>,
    /// The batch's `packet_outbox` rows (one, or none if it stored nothing new; two when
    /// some of its calls were stored after waiting for their locks).
    outbox: Vec<i64>,
    /// The packets (indexes) of calls passed over because another transaction held them:
    /// answered [`WriteError::CallLocked`] unless [`store_held_calls`] stores them.
    held: Vec<usize>,
}

/// A batch that loses a deadlock (two replicas creating the same new calls in opposite
/// orders, which Postgres resolves by aborting one of them) is simply run again.
async fn commit_with_retry(
    writer: &Writer,
    memory: &mut Memory,
    packets: &[NewPacket],
    deletes: &[i64],
) -> Result<BatchOutcome, BatchFailure> {
    let mut tries = 0;
    loop {
        match commit_batch(writer, memory, packets, deletes, None).await {
            Err(failure) if tries < 3 && failure.is_conflict() => {
                // What the failed try remembered of its calls' gaps did not happen.
                memory.windows.clear();
                tries += 1;
                metrics::counter!("switchboard_ingest_batch_retries_total").increment(1);
                tracing::info!(error.message = %failure.error, "packet batch lost a lock conflict; running it again");
            }
            result => {
                if result.is_err() {
                    // Whatever the batch changed did not happen: what was remembered of
                    // its calls' gaps may be ahead of the database.
                    memory.windows.clear();
                }
                return result;
            }
        }
    }
}

/// A packet's key: (call, sequence).
type Key = (String, i64);

/// What is stored under a key the batch did not insert: (data, sent_at, received_at).
type Existing = (String, f64, OffsetDateTime);

/// The batch's transaction: one that passes over calls held elsewhere (`wait` `None`), or
/// one that waits for them at most `wait` (`lock_timeout`).
async fn begin(
    writer: &Writer,
    wait: Option<Duration>,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Locked), BatchFailure> {
    let mut tx = writer.pool.begin().await.map_err(|error| BatchFailure {
        error,
        connecting: true,
    })?;
    let Some(wait) = wait else {
        return Ok((tx, Locked::Skip));
    };
    sqlx::query(AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = {}",
        wait.as_millis().max(1)
    )))
    .execute(&mut *tx)
    .await?;
    Ok((tx, Locked::Wait))
}

/// One transaction: create the calls this writer has not seen yet, then one statement that
/// locks the calls, inserts the new packets, counts them and writes the outbox row (deleting
/// the acknowledged ones, `deletes`); then, only when needed, read what was already stored
/// under the keys not inserted, update the gaps of calls whose packets came out of order,
/// read the missing ranges to answer with, and record creations. A clean batch of known
/// calls is three round trips (`BEGIN`, the statement, `COMMIT`). Then the verdicts, computed
/// without the database.
async fn commit_batch(
    writer: &Writer,
    memory: &mut Memory,
    packets: &[NewPacket],
    deletes: &[i64],
    wait: Option<Duration>,
) -> Result<BatchOutcome, BatchFailure> {
    let (mut tx, locked) = begin(writer, wait).await?;
    // Sorted: every writer locks calls in the same order.
    let mut call_ids: Vec<&str> = packets.iter().map(|p| p.call_id.as_str()).collect();
    call_ids.sort_unstable();
    call_ids.dedup();
    let unknown: Vec<&str> = call_ids
        .iter()
        .copied()
        .filter(|id| !memory.known.contains(id))
        .collect();
    let created = if unknown.is_empty() {
        Vec::new()
    } else {
        let new_calls = new_calls(packets, &unknown, writer.sequence_start);
        calls::packets::create(&mut tx, &new_calls).await?
    };
    let first = first_of_each_key(packets);
    let mut firsts: Vec<usize> = first.values().copied().collect();
    firsts.sort_unstable();
    let rows: Vec<NewRow> = firsts
        .iter()
        .map(|&i| NewRow {
            call_id: packets[i].call_id.as_str(),
            sequence: packets[i].sequence,
            data: &packets[i].data,
            sent_at: packets[i].timestamp,
            format: packets[i].format,
        })
        .collect();
    let batch = calls::packets::store(&mut tx, &call_ids, &rows, deletes, locked).await?;
    let held = held_packets(packets, &batch);
    if !held.is_empty() && locked == Locked::Wait {
        // Waited for, and not there: a call this writer knew is gone (deleted for
        // CALL_RETENTION_DAYS: it was final, so its packets are refused anyway). Forget what it knew; the batch is run again packet by packet, creating
        // what is missing.
        memory.known.clear();
        return Err(BatchFailure::from(sqlx::Error::RowNotFound));
    }
    let mut applied = Applied::from(batch);
    let changes = update_gaps(&mut tx, &applied).await?;
    let lookups: Vec<&Key> = first
        .keys()
        .filter(|k| !applied.inserted.contains_key(*k))
        .collect();
    let existing = lookup_existing(&mut tx, &lookups).await?;
    let missing = missing_for_answers(&mut tx, &applied, &changes, &mut memory.windows).await?;
    let recorded =
        calls::completion::record_creations(&mut tx, &created, Reason::FirstPacket).await?;
    tx.commit().await?;
    memory.known.extend(call_ids);
    let found = Found {
        highest_before: std::mem::take(&mut applied.highest_before),
        inserted: std::mem::take(&mut applied.inserted),
        existing,
        missing,
    };
    Ok(BatchOutcome {
        results: verdicts(packets, &first, &applied.calls, &found),
        created: recorded,
        outbox: applied.outbox,
        held,
    })
}

/// How to create the calls among `unknown` (sorted): as the first of their packets in the
/// batch says.
fn new_calls<'a>(
    packets: &'a [NewPacket],
    unknown: &[&'a str],
    sequence_start: i64,
) -> Vec<NewCall<'a>> {
    let mut firsts: HashMap<&str, &NewPacket> = HashMap::new();
    for p in packets {
        firsts.entry(p.call_id.as_str()).or_insert(p);
    }
    unknown
        .iter()
        .map(|&call_id| {
            let first = firsts[call_id];
            NewCall {
                call_id,
                sequence_start: first.sequence_start.unwrap_or(sequence_start),
                format: first.format.unwrap_or(AudioFormat::TEXT),
            }
        })
        .collect()
}

/// The packets (indexes) whose calls the batch's statement left out.
fn held_packets(packets: &[NewPacket], batch: &StoredBatch) -> Vec<usize> {
    let stored: HashSet<&str> = batch.calls.iter().map(|c| c.call_id.as_str()).collect();
    (0..packets.len())
        .filter(|&i| !stored.contains(packets[i].call_id.as_str()))
        .collect()
}

/// The packets of a batch whose calls its main statement passed over because another
/// transaction held their rows (a completion, another replica's batch, or a lock nobody lets
/// go of): stored after the batch committed, in a transaction of their own that waits for
/// each lock at most [`HELD_CALL_WAIT`] and holds no other (so two writers never wait for
/// each other). A call still held then keeps its packets answered 503 (`Retry-After`) and is
/// not waited for again for [`HELD_CALL_MEMORY`]; after that it is only probed
/// ([`HELD_CALL_PROBE`]) until a probe finds it free, so that a call stuck for long costs the
/// batches around it a twentieth of a second a second, not a fifth.
async fn store_held_calls(
    writer: &Writer,
    memory: &mut Memory,
    packets: &[NewPacket],
    batch: &mut BatchOutcome,
) {
    let now = Instant::now();
    memory
        .held
        .retain(|_, since| now.duration_since(*since) < HELD_CALL_FORGOTTEN);
    let recent = |id: &str| {
        memory
            .held
            .get(id)
            .is_some_and(|since| now.duration_since(*since) < HELD_CALL_MEMORY)
    };
    let (waiting, recent): (Vec<usize>, Vec<usize>) = batch
        .held
        .iter()
        .partition(|&&i| !recent(packets[i].call_id.as_str()));
    if !recent.is_empty() {
        metrics::counter!("switchboard_ingest_shed_total", "reason" => "call_locked")
            .increment(recent.len() as u64);
    }
    if waiting.is_empty() {
        return;
    }
    // Calls found held before are probed; a call seen held for the first time is waited for.
    let suspects = waiting
        .iter()
        .all(|&i| memory.held.contains_key(packets[i].call_id.as_str()));
    let wait = if suspects {
        HELD_CALL_PROBE
    } else {
        HELD_CALL_WAIT
    };
    let subset: Vec<NewPacket> = waiting.iter().map(|&i| packets[i].clone()).collect();
    match commit_batch(writer, memory, &subset, &[], Some(wait)).await {
        Ok(outcome) => {
            for (&i, result) in waiting.iter().zip(outcome.results) {
                batch.results[i] = result;
            }
            batch.outbox.extend(outcome.outbox);
            announce(&writer.publisher, &subset, outcome.created);
            for packet in &subset {
                memory.held.remove(packet.call_id.as_str());
            }
        }
        Err(failure) => {
            memory.windows.clear();
            let still_held = matches!(&failure.error, sqlx::Error::Database(e)
                if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE));
            if still_held {
                let calls: HashSet<&str> = subset.iter().map(|p| p.call_id.as_str()).collect();
                tracing::warn!(calls = ?calls, "calls held locked elsewhere; their packets are answered 503 for now");
                metrics::counter!("switchboard_ingest_shed_total", "reason" => "call_locked")
                    .increment(subset.len() as u64);
                memory
                    .held
                    .extend(calls.into_iter().map(|id| (id.to_owned(), now)));
            } else {
                for &i in &waiting {
                    batch.results[i] = Err(WriteError::from_failure(&failure));
                }
            }
        }
    }
}

/// Postgres's `lock_not_available` (a `lock_timeout` ran out).
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// How long a batch waits for a call another transaction holds (a completion holds it for
/// about a millisecond, another replica's batch for a few).
const HELD_CALL_WAIT: Duration = Duration::from_millis(200);

/// How long a call found held that long is not waited for again.
const HELD_CALL_MEMORY: Duration = Duration::from_secs(1);

/// How long a batch waits for a call found held before: long enough for a lock that has just
/// gone, short enough that a lock nobody lets go of costs the writer little.
const HELD_CALL_PROBE: Duration = Duration::from_millis(50);

/// A call found held is probed rather than waited for until this long after it was last
/// found held (or until a probe finds it free). Short: a call held once and free since must
/// soon be waited for again like any other, as a brief lock (a completion, another
/// replica's batch) may outlast a probe.
const HELD_CALL_FORGOTTEN: Duration = Duration::from_secs(10);

/// What a writer task remembers between batches: nothing it could not read again.
#[derive(Default)]
struct Memory {
    known: KnownCalls,
    windows: Windows,
    /// Calls found locked elsewhere for longer than a batch waits, and when they last were.
    held: HashMap<String, Instant>,
}

/// A lossy call's remembered gaps are forgotten after this long without a packet.
const WINDOW_IDLE: Duration = Duration::from_secs(60);

/// The calls one writer task has seen exist: their batches skip the create statement. A
/// plain set, cleared when it grows past [`KNOWN_CALLS_MAX`] (a clear costs one
/// `INSERT .. ON CONFLICT DO NOTHING` per call on its next batch, nothing else).
#[derive(Default)]
struct KnownCalls(HashSet<String>);

/// Calls a writer task remembers at most.
const KNOWN_CALLS_MAX: usize = 100_000;

impl KnownCalls {
    fn contains(&self, call_id: &str) -> bool {
        self.0.contains(call_id)
    }

    fn extend(&mut self, call_ids: Vec<&str>) {
        if self.0.len() + call_ids.len() > KNOWN_CALLS_MAX {
            self.0.clear();
        }
        self.0.extend(call_ids.into_iter().map(str::to_owned));
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A batch's statement, as the rest of the transaction and the verdicts use it.
struct Applied {
    /// Every call of the batch, with its counters after the batch.
    calls: HashMap<String, CallCounts>,
    /// Each call's highest sequence before the batch.
    highest_before: HashMap<String, Option<i64>>,
    /// Each call's `packets_received` before the batch.
    received_before: HashMap<String, i64>,
    /// The keys inserted, with their `received_at`.
    inserted: HashMap<Key, OffsetDateTime>,
    /// Per call that got packets, the sequences inserted (ascending)...
    stored: BTreeMap<String, Vec<i64>>,
    /// ... and what its gaps depend on from before the batch: as `gaps::apply` takes them.
    gaps_before: HashMap<String, Before>,
    outbox: Vec<i64>,
}

impl From<StoredBatch> for Applied {
    fn from(batch: StoredBatch) -> Self {
        let mut applied = Applied {
            calls: HashMap::with_capacity(batch.calls.len()),
            highest_before: HashMap::with_capacity(batch.calls.len()),
            received_before: HashMap::with_capacity(batch.calls.len()),
            inserted: HashMap::new(),
            stored: BTreeMap::new(),
            gaps_before: HashMap::new(),
            outbox: batch.outbox,
        };
        for call in batch.calls {
            let before = call.before;
            applied
                .highest_before
                .insert(call.call_id.clone(), before.last_sequence);
            applied
                .received_before
                .insert(call.call_id.clone(), before.packets_received);
            if !call.inserted.is_empty() {
                let seqs = call.inserted.iter().map(|(s, _)| *s).collect();
                applied.stored.insert(call.call_id.clone(), seqs);
                let was = Before {
                    highest: before.last_sequence,
                    start: before.sequence_start,
                };
                applied.gaps_before.insert(call.call_id.clone(), was);
            }
            for (sequence, at) in call.inserted {
                applied
                    .inserted
                    .insert((call.call_id.clone(), sequence), at);
            }
            let after = CallCounts {
                packets_received: call.packets_received,
                last_sequence: call.last_sequence,
                ..before
            };
            applied.calls.insert(call.call_id, after);
        }
        applied
    }
}

/// Updates the gaps of the calls the batch stored packets for (nothing at all when every
/// call's packets came in order).
async fn update_gaps(
    tx: &mut PgConnection,
    applied: &Applied,
) -> Result<HashMap<String, GapChanges>, sqlx::Error> {
    if applied.stored.is_empty() {
        return Ok(HashMap::new());
    }
    gaps::apply(tx, &applied.gaps_before, &applied.stored).await
}

/// The first packet of each (call, sequence) in the batch is the one that may be stored; any
/// later one in the batch is judged against what ends up stored.
fn first_of_each_key(packets: &[NewPacket]) -> HashMap<Key, usize> {
    let mut first = HashMap::with_capacity(packets.len());
    for (i, p) in packets.iter().enumerate() {
        first
            .entry((p.call_id.to_string(), p.sequence))
            .or_insert(i);
    }
    first
}

/// What is already stored under the keys not inserted: duplicates and conflicts.
async fn lookup_existing(
    tx: &mut PgConnection,
    keys: &[&Key],
) -> Result<HashMap<Key, Existing>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (ids, seqs): (Vec<&str>, Vec<i64>) = keys.iter().map(|(c, s)| (c.as_str(), *s)).unzip();
    let rows = common::audio::stored_packets(tx, &ids, &seqs).await?;
    Ok(rows
        .into_iter()
        .map(|p| ((p.call_id, p.sequence), (p.data, p.sent_at, p.received_at)))
        .collect())
}

/// The first missing ranges of each call that misses anything: from what the writer task
/// remembers of the call ([`Windows`]) when nothing else has written it since, else an
/// index range scan of at most [`MAX_MISSING_RANGES_IN_RESPONSE`] rows; nothing for a clean
/// call.
async fn missing_for_answers(
    tx: &mut PgConnection,
    applied: &Applied,
    changes: &HashMap<String, GapChanges>,
    windows: &mut Windows,
) -> Result<HashMap<String, Vec<MissingRange>>, sqlx::Error> {
    let mut gaps: HashMap<String, Vec<Gap>> = HashMap::new();
    let mut to_read: Vec<&str> = Vec::new();
    for (id, call) in &applied.calls {
        if call.missing_packets() == 0 {
            windows.forget(id);
            continue;
        }
        let before = applied.received_before[id];
        match windows.advance(id, before, call.packets_received, changes.get(id)) {
            Some(window) => {
                gaps.insert(id.clone(), window);
            }
            None => to_read.push(id),
        }
    }
    if !to_read.is_empty() {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT c.id, g.first_missing, g.last_missing FROM unnest($1::text[]) AS c(id) \
             CROSS JOIN LATERAL (SELECT first_missing, last_missing FROM call_gaps \
                 WHERE call_id = c.id ORDER BY first_missing LIMIT $2) g \
             ORDER BY c.id, g.first_missing",
        )
        .bind(&to_read)
        .bind(MAX_MISSING_RANGES_IN_RESPONSE)
        .fetch_all(tx)
        .await?;
        for id in &to_read {
            gaps.entry((*id).to_owned()).or_default();
        }
        for (id, first, last) in rows {
            gaps.entry(id).or_default().push(Gap { first, last });
        }
        for id in to_read {
            windows.fill(id, applied.calls[id].packets_received, gaps[id].clone());
        }
    }
    let mut missing: HashMap<String, Vec<MissingRange>> = gaps
        .into_iter()
        .map(|(id, gaps)| {
            let ranges = gaps
                .into_iter()
                .map(|g| MissingRange {
                    from: g.first,
                    to: g.last,
                })
                .collect();
            (id, ranges)
        })
        .collect();
    // A completed call's declared packets after its highest sequence are missing too.
    for (id, call) in &applied.calls {
        let (Some(total), ranges) = (call.total_packets, missing.entry(id.clone()).or_default())
        else {
            continue;
        };
        let from = call.last_sequence.map_or(call.sequence_start, |l| l + 1);
        let to = call.sequence_start + total - 1;
        if to >= from && (ranges.len() as i64) < MAX_MISSING_RANGES_IN_RESPONSE {
            ranges.push(MissingRange { from, to });
        }
    }
    Ok(missing)
}

/// What a batch's transaction found and did, for the verdicts.
struct Found {
    /// Each call's highest sequence before the batch.
    highest_before: HashMap<String, Option<i64>>,
    /// The keys inserted now, with their `received_at`.
    inserted: HashMap<Key, OffsetDateTime>,
    /// What was already stored under the other keys.
    existing: HashMap<Key, Existing>,
    /// The missing ranges to answer with, per call.
    missing: HashMap<String, Vec<MissingRange>>,
}

/// One verdict per packet, in request order, from what the transaction found and did.
fn verdicts(
    packets: &[NewPacket],
    first: &HashMap<Key, usize>,
    calls: &HashMap<String, CallCounts>,
    found: &Found,
) -> Vec<Result<Stored, WriteError>> {
    let Found {
        highest_before,
        inserted,
        existing,
        missing,
    } = found;
    let mut last_seen: HashMap<&str, Option<i64>> = HashMap::new();
    packets
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let call_id = p.call_id.as_str();
            let Some(call) = calls.get(call_id) else {
                // Held locked elsewhere: left out of this batch.
                return Err(WriteError::CallLocked);
            };
            if let Some(format) = p.format
                && format != call.format
            {
                return Err(WriteError::FormatMismatch(call.format));
            }
            let key = (call_id.to_owned(), p.sequence);
            let first_index = first[&key];
            let stored = |outcome, sent_at, received_at| Stored {
                outcome,
                received_at,
                sent_at,
                missing: missing.get(call_id).cloned().unwrap_or_default(),
                missing_packets: call.missing_packets(),
            };
            if let Some(received_at) = inserted.get(&key) {
                if first_index == i {
                    let seen = last_seen
                        .entry(call_id)
                        .or_insert_with(|| highest_before.get(call_id).copied().flatten());
                    warn_if_out_of_order(&p.call_id, p.sequence, seen, call.sequence_start);
                    return Ok(stored(Outcome::Accepted, p.timestamp, *received_at));
                }
                let original = &packets[first_index];
                return if original.data == p.data {
                    Ok(stored(Outcome::Duplicate, original.timestamp, *received_at))
                } else {
                    Err(WriteError::Conflict)
                };
            }
            match existing.get(&key) {
                Some((data, sent_at, received_at)) if *data == p.data => {
                    Ok(stored(Outcome::Duplicate, *sent_at, *received_at))
                }
                Some(_) => Err(WriteError::Conflict),
                None if p.sequence < call.sequence_start && call.state == CallState::InProgress => {
                    Err(WriteError::BeforeStart {
                        start: call.sequence_start,
                    })
                }
                // In progress, not stored and not stored before: its data was not its call's audio.
                None if call.state == CallState::InProgress && call.format.is_sound() => {
                    Err(WriteError::NotAudio(call.format))
                }
                None => Err(WriteError::NotInProgress(call.state)),
            }
        })
        .collect()
}

/// Logs a structured warning when a packet is not the one after the highest seen so far.
/// Such packets are still accepted: a PBX must never be blocked by its own network.
fn warn_if_out_of_order(call_id: &CallKey, sequence: i64, last: &mut Option<i64>, start: i64) {
    let expected = last.map_or(start, |l| l + 1);
    if sequence != expected {
        tracing::warn!(
            call.id = %call_id,
            packet.expected = expected,
            packet.sequence = sequence,
            "packet out of order (or packets missing); accepted"
        );
        metrics::counter!("switchboard_ingest_out_of_order_packets_total").increment(1);
    }
    *last = Some(last.map_or(sequence, |l| l.max(sequence)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(call: &str, sequence: i64, data: &str, timestamp: f64) -> NewPacket {
        NewPacket {
            call_id: CallKey::try_from(format!("acme.{call}")).unwrap(),
            sequence,
            data: data.into(),
            timestamp,
            request_id: None,
            format: None,
            sequence_start: None,
        }
    }

    fn call(state: CallState, start: i64, last: Option<i64>, received: i64) -> CallCounts {
        CallCounts {
            state,
            sequence_start: start,
            last_sequence: last,
            packets_received: received,
            total_packets: None,
            format: AudioFormat::TEXT,
        }
    }

    fn key(call: &str, sequence: i64) -> Key {
        (format!("acme.{call}"), sequence)
    }

    /// Runs `verdicts` on a batch as the transaction would have left it.
    fn judge(
        packets: &[NewPacket],
        calls: &[(&str, CallCounts)],
        inserted: &[(&str, i64)],
        existing: &[(&str, i64, &str, f64)],
    ) -> Vec<Result<Stored, WriteError>> {
        let at = OffsetDateTime::UNIX_EPOCH;
        let found = Found {
            highest_before: HashMap::new(),
            inserted: inserted.iter().map(|(c, s)| (key(c, *s), at)).collect(),
            existing: existing
                .iter()
                .map(|(c, s, d, t)| (key(c, *s), ((*d).to_owned(), *t, at)))
                .collect(),
            missing: HashMap::new(),
        };
        let calls = calls
            .iter()
            .map(|(id, c)| (format!("acme.{id}"), c.clone()))
            .collect();
        verdicts(packets, &first_of_each_key(packets), &calls, &found)
    }

    fn outcome(result: &Result<Stored, WriteError>) -> String {
        match result {
            Ok(stored) => format!("{:?} {}", stored.outcome, stored.sent_at),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn a_batch_tells_new_packets_from_repeats_and_conflicts_within_itself() {
        let packets = [
            packet("a", 0, "x", 1.0),
            packet("a", 0, "x", 2.0), // the same packet again in the batch
            packet("a", 1, "y", 3.0),
            packet("a", 1, "z", 4.0), // the same sequence with other data
        ];
        let calls = [("a", call(CallState::InProgress, 0, Some(1), 2))];
        let results = judge(&packets, &calls, &[("a", 0), ("a", 1)], &[]);
        let outcomes: Vec<String> = results.iter().map(outcome).collect();
        assert_eq!(
            outcomes,
            ["Accepted 1", "Duplicate 1", "Accepted 3", "Conflict"],
            "a repeat carries the first copy's timestamp"
        );
    }

    #[test]
    fn packets_stored_before_are_duplicates_with_what_was_stored_or_conflicts() {
        let packets = [packet("a", 0, "x", 9.0), packet("a", 1, "other", 9.0)];
        let calls = [("a", call(CallState::InProgress, 0, Some(1), 2))];
        let existing = [("a", 0, "x", 1.0), ("a", 1, "y", 2.0)];
        let results = judge(&packets, &calls, &[], &existing);
        let outcomes: Vec<String> = results.iter().map(outcome).collect();
        assert_eq!(outcomes, ["Duplicate 1", "Conflict"]);
    }

    #[test]
    fn a_packet_for_a_finished_call_or_below_its_start_is_refused() {
        let packets = [packet("done", 5, "x", 1.0), packet("from1", 0, "x", 1.0)];
        let calls = [
            ("done", call(CallState::Completed, 0, Some(4), 5)),
            ("from1", call(CallState::InProgress, 1, Some(3), 3)),
        ];
        let results = judge(&packets, &calls, &[], &[]);
        assert!(matches!(
            results[0],
            Err(WriteError::NotInProgress(CallState::Completed))
        ));
        assert!(matches!(
            results[1],
            Err(WriteError::BeforeStart { start: 1 })
        ));
    }

    #[test]
    fn every_answer_carries_its_calls_missing_count() {
        let packets = [packet("lossy", 9, "x", 1.0)];
        // Sequences 0..=9 expected, 4 received.
        let calls = [("lossy", call(CallState::InProgress, 0, Some(9), 4))];
        let results = judge(&packets, &calls, &[("lossy", 9)], &[]);
        assert_eq!(results[0].as_ref().unwrap().missing_packets, 6);
    }
}
