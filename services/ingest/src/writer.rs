//! The batching packet writer: the heart of ingest's write path.
//!
//! Every packet request hands its packet to one writer task per process and waits for the
//! verdict. The writer takes whatever has queued up (up to `INGEST_MAX_BATCH`, without
//! waiting for more: under light load a batch is one packet and latency stays one
//! transaction) and stores the whole batch in one transaction of a few set-based statements
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
//! whether its call has no gap or a hundred thousand.
//!
//! Correctness under races comes from Postgres, not from this task: calls are created with
//! `INSERT .. ON CONFLICT DO NOTHING` (concurrent first packets, even on several replicas,
//! create one call), the batch locks its calls (`FOR NO KEY UPDATE`, existing calls in call-id
//! order) before checking they are `IN_PROGRESS`, so a completion either commits before the
//! batch (its packets get 409) or waits for it (its packets are in), and packets are unique per
//! (call, sequence). Calls created concurrently by two replicas can still be locked in
//! opposite orders; Postgres then aborts one batch as a deadlock and the writer runs it again.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use common::{
    CallId, CallState, Reason,
    calls::{self, Recorded, packets::CallCounts},
    events::{PacketEvent, ProgressEvent},
    outbox::Publisher,
    store::{self, MissingRange},
};
use futures::future::join_all;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    error::is_database_unavailable,
    gaps::{self, Before},
};

/// Most missing ranges returned with one packet's answer, lowest first (`missing_packets`
/// counts them all; `GET /v1/call/{id}` lists more). A constant, so that the answer to a
/// packet of a very lossy call costs no more than any other.
pub const MAX_MISSING_RANGES_IN_RESPONSE: i64 = 100;

/// Highest sequence (and `total_packets`) accepted: 50 packets a second for over three weeks.
/// Far below `i64::MAX`, so sequence arithmetic never overflows and a call's audio stays a
/// size the transcriber can assemble.
pub const MAX_SEQUENCE: i64 = 100_000_000;

/// Packets queued for the writer at most; beyond that, requests wait (backpressure).
const QUEUE_CAPACITY: usize = 16_384;

/// A validated packet, ready to store.
#[derive(Debug, Clone)]
pub struct NewPacket {
    pub call_id: CallId,
    pub sequence: i64,
    pub data: String,
    pub timestamp: f64,
    /// Carried on the JetStream publish, so the packet can be followed across services.
    pub request_id: Option<String>,
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
    #[error("database error: {message}")]
    Database { unavailable: bool, message: String },
    /// Stored, but JetStream did not acknowledge it (the outbox relay will publish it).
    #[error("stored, but not acknowledged by JetStream: {0}")]
    Unpublished(String),
    #[error("the writer is shutting down")]
    Closed,
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

/// The handle requests use. The writer task ends once every handle is dropped and the
/// queue is drained, so shutting the server down lets queued packets finish.
#[derive(Clone)]
pub struct PacketWriter {
    tx: mpsc::Sender<Job>,
}

/// What the writer task works with.
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

impl PacketWriter {
    pub fn spawn(
        pool: PgPool,
        publisher: Publisher,
        max_batch: usize,
        sequence_start: i64,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (acknowledged, acknowledged_rx) = mpsc::unbounded_channel();
        let writer = Writer {
            pool,
            publisher,
            max_batch,
            sequence_start,
            acknowledged,
        };
        let task = tokio::spawn(run(rx, acknowledged_rx, writer));
        (Self { tx }, task)
    }

    /// Stores one packet (batched with its neighbours), publishes it, and returns the verdict.
    pub async fn write(&self, packet: NewPacket) -> Result<Stored, WriteError> {
        let (reply, verdict) = oneshot::channel();
        self.tx
            .send(Job { packet, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        verdict.await.map_err(|_| WriteError::Closed)?
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    mut acknowledged: mpsc::UnboundedReceiver<Vec<i64>>,
    writer: Writer,
) {
    let mut jobs = Vec::with_capacity(writer.max_batch);
    let mut progress = HashSet::new();
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
                let batch = std::mem::replace(&mut jobs, Vec::with_capacity(writer.max_batch));
                progress.extend(batch.iter().map(|j| j.packet.call_id.to_string()));
                let deletes = std::mem::take(&mut done);
                done = write_batch(&writer, &publishing, batch, deletes).await;
            }
            Some(ids) = acknowledged.recv() => done.extend(ids),
            _ = report.tick(), if !progress.is_empty() || !done.is_empty() => {
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
            call_id: row.call_id.clone(),
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
    publishing: &tokio_util::task::TaskTracker,
    jobs: Vec<Job>,
    deletes: Vec<i64>,
) -> Vec<i64> {
    let started = Instant::now();
    let (packets, replies): (Vec<NewPacket>, Vec<Reply>) =
        jobs.into_iter().map(|job| (job.packet, job.reply)).unzip();
    let (results, outbox, deleted) = store_batch(writer, &packets, &deletes).await;
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
    packets: &[NewPacket],
    deletes: &[i64],
) -> (Vec<Result<Stored, WriteError>>, Vec<i64>, bool) {
    match commit_with_retry(writer, packets, deletes).await {
        Ok(batch) => {
            announce(&writer.publisher, packets, batch.created);
            (batch.results, batch.outbox.into_iter().collect(), true)
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
                match commit_batch(writer, std::slice::from_ref(packet), &[]).await {
                    Ok(mut batch) => {
                        announce(
                            &writer.publisher,
                            std::slice::from_ref(packet),
                            batch.created,
                        );
                        outbox.extend(batch.outbox);
                        results.push(batch.results.pop().expect("one result per packet"));
                    }
                    Err(failure) => results.push(Err(WriteError::from_failure(&failure))),
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
        call_id: packet.call_id.clone(),
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
                .find(|p| p.call_id == r.call.call_id)
                .and_then(|p| p.request_id.clone());
            (r.call.call_id.to_string(), id)
        })
        .collect();
    let publisher = publisher.clone();
    tokio::spawn(async move {
        join_all(created.iter().map(|recorded| {
            let request_id = request_ids[recorded.call.call_id.as_str()].as_deref();
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
    /// The batch's `packet_outbox` row, if it stored anything new.
    outbox: Option<i64>,
}

/// A batch that loses a deadlock (two replicas creating the same new calls in opposite
/// orders, which Postgres resolves by aborting one of them) is simply run again.
async fn commit_with_retry(
    writer: &Writer,
    packets: &[NewPacket],
    deletes: &[i64],
) -> Result<BatchOutcome, BatchFailure> {
    let mut tries = 0;
    loop {
        match commit_batch(writer, packets, deletes).await {
            Err(failure) if tries < 3 && failure.is_conflict() => {
                tries += 1;
                metrics::counter!("switchboard_ingest_batch_retries_total").increment(1);
                tracing::info!(error.message = %failure.error, "packet batch lost a lock conflict; running it again");
            }
            result => return result,
        }
    }
}

/// A packet's key: (call, sequence).
type Key = (String, i64);

/// What is stored under a key the batch did not insert: (data, sent_at, received_at).
type Existing = (String, f64, OffsetDateTime);

/// One transaction, one phase per statement: lock (or create) the calls, insert the new
/// packets, read what was already stored under the other keys, update the counters and gaps,
/// read the missing ranges to answer with, record creations, write the outbox row (and delete
/// the acknowledged ones, `deletes`). Then the verdicts, computed without the database.
async fn commit_batch(
    writer: &Writer,
    packets: &[NewPacket],
    deletes: &[i64],
) -> Result<BatchOutcome, BatchFailure> {
    let mut tx = writer.pool.begin().await.map_err(|error| BatchFailure {
        error,
        connecting: true,
    })?;
    let (mut calls, created) =
        lock_or_create_calls(&mut tx, packets, writer.sequence_start).await?;
    let first = first_of_each_key(packets);
    let candidates: Vec<usize> = {
        let mut c: Vec<usize> = first
            .values()
            .copied()
            .filter(|&i| {
                let call = &calls[packets[i].call_id.as_str()];
                call.state == CallState::InProgress && packets[i].sequence >= call.sequence_start
            })
            .collect();
        c.sort_unstable();
        c
    };
    let inserted = insert_packets(&mut tx, packets, &candidates).await?;
    let highest_before: HashMap<String, Option<i64>> = calls
        .iter()
        .map(|(id, c)| (id.clone(), c.last_sequence))
        .collect();
    let lookups: Vec<&Key> = first
        .keys()
        .filter(|k| !inserted.contains_key(*k))
        .collect();
    let existing = lookup_existing(&mut tx, &lookups).await?;
    update_counts(&mut tx, &mut calls, &inserted).await?;
    let missing = missing_for_answers(&mut tx, &calls).await?;
    let recorded =
        calls::completion::record_creations(&mut tx, &created, Reason::FirstPacket).await?;
    let outbox = write_outbox(&mut tx, &inserted, deletes).await?;
    tx.commit().await?;
    Ok(BatchOutcome {
        results: verdicts(
            packets,
            &first,
            &calls,
            &Found {
                highest_before,
                inserted,
                existing,
                missing,
            },
        ),
        created: recorded,
        outbox,
    })
}

/// Locks the batch's calls that exist, creates the others, and locks those too. Locking
/// first keeps the common case (every call exists) free of INSERT .. ON CONFLICT's
/// speculative insertions. Returns every call's counts and the ids this batch created.
async fn lock_or_create_calls(
    tx: &mut PgConnection,
    packets: &[NewPacket],
    sequence_start: i64,
) -> Result<(HashMap<String, CallCounts>, Vec<String>), sqlx::Error> {
    // Sorted: every writer locks calls in the same order.
    let mut call_ids: Vec<&str> = packets.iter().map(|p| p.call_id.as_str()).collect();
    call_ids.sort_unstable();
    call_ids.dedup();
    let mut calls = calls::packets::lock(tx, &call_ids).await?;
    let mut created = Vec::new();
    if calls.len() < call_ids.len() {
        let new_ids: Vec<&str> = call_ids
            .iter()
            .copied()
            .filter(|id| !calls.contains_key(*id))
            .collect();
        created = calls::packets::create(tx, &new_ids, sequence_start).await?;
        // Those another replica created meanwhile exist now: lock them too.
        calls.extend(calls::packets::lock(tx, &new_ids).await?);
    }
    Ok((calls, created))
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

/// Inserts the candidates; returns the keys actually inserted (not already stored) with
/// their `received_at`.
async fn insert_packets(
    tx: &mut PgConnection,
    packets: &[NewPacket],
    candidates: &[usize],
) -> Result<HashMap<Key, OffsetDateTime>, sqlx::Error> {
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let column = |f: fn(&NewPacket) -> &str| -> Vec<&str> {
        candidates.iter().map(|&i| f(&packets[i])).collect()
    };
    let ids = column(|p| p.call_id.as_str());
    let data = column(|p| p.data.as_str());
    let seqs: Vec<i64> = candidates.iter().map(|&i| packets[i].sequence).collect();
    let sent: Vec<f64> = candidates.iter().map(|&i| packets[i].timestamp).collect();
    let rows: Vec<(String, i64, OffsetDateTime)> = sqlx::query_as(
        "INSERT INTO packets (call_id, sequence, data, sent_at) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::float8[]) \
         ON CONFLICT (call_id, sequence) DO NOTHING \
         RETURNING call_id, sequence, received_at",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&data)
    .bind(&sent)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().map(|(c, s, at)| ((c, s), at)).collect())
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
    let rows = stored_packets(tx, &ids, &seqs).await?;
    Ok(rows
        .into_iter()
        .map(|p| ((p.call_id, p.sequence), (p.data, p.sent_at, p.received_at)))
        .collect())
}

/// A packet as stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredPacket {
    pub call_id: String,
    pub sequence: i64,
    pub data: String,
    /// The PBX timestamp of the first copy stored.
    pub sent_at: f64,
    pub received_at: OffsetDateTime,
}

/// The stored packets among the keys (`call_ids[i]`, `sequences[i]`).
pub(crate) async fn stored_packets(
    tx: &mut PgConnection,
    call_ids: &[&str],
    sequences: &[i64],
) -> Result<Vec<StoredPacket>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.call_id, p.sequence, p.data, p.sent_at, p.received_at FROM packets p \
         JOIN UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
           ON p.call_id = k.call_id AND p.sequence = k.sequence",
    )
    .bind(call_ids)
    .bind(sequences)
    .fetch_all(tx)
    .await
}

/// Adds the inserted packets to their calls' counters and gaps, and `calls` with them.
async fn update_counts(
    tx: &mut PgConnection,
    calls: &mut HashMap<String, CallCounts>,
    inserted: &HashMap<Key, OffsetDateTime>,
) -> Result<(), sqlx::Error> {
    if inserted.is_empty() {
        return Ok(());
    }
    let mut stored: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (call_id, seq) in inserted.keys() {
        stored.entry(call_id.clone()).or_default().push(*seq);
    }
    for seqs in stored.values_mut() {
        seqs.sort_unstable();
    }
    let before: HashMap<String, Before> = stored
        .keys()
        .map(|id| {
            let call = &calls[id];
            let before = Before {
                highest: call.last_sequence,
                start: call.sequence_start,
            };
            (id.clone(), before)
        })
        .collect();
    gaps::apply(tx, &before, &stored).await?;
    let (ids, seqs): (Vec<&str>, Vec<i64>) = inserted.keys().map(|(c, s)| (c.as_str(), *s)).unzip();
    let rows = calls::packets::add_packets(tx, &ids, &seqs).await?;
    for row in rows {
        if let Some(call) = calls.get_mut(&row.call_id) {
            call.packets_received = row.packets_received;
            call.last_sequence = row.last_sequence;
        }
    }
    Ok(())
}

/// The first missing ranges of each call that misses anything: an index range scan of at
/// most [`MAX_MISSING_RANGES_IN_RESPONSE`] rows per lossy call, nothing for a clean one.
async fn missing_for_answers(
    tx: &mut PgConnection,
    calls: &HashMap<String, CallCounts>,
) -> Result<HashMap<String, Vec<MissingRange>>, sqlx::Error> {
    let lossy: Vec<&str> = calls
        .iter()
        .filter(|(_, c)| c.missing_packets() > 0)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut missing: HashMap<String, Vec<MissingRange>> = HashMap::new();
    if lossy.is_empty() {
        return Ok(missing);
    }
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT c.id, g.first_missing, g.last_missing FROM unnest($1::text[]) AS c(id) \
         CROSS JOIN LATERAL (SELECT first_missing, last_missing FROM call_gaps \
             WHERE call_id = c.id ORDER BY first_missing LIMIT $2) g \
         ORDER BY c.id, g.first_missing",
    )
    .bind(&lossy)
    .bind(MAX_MISSING_RANGES_IN_RESPONSE)
    .fetch_all(tx)
    .await?;
    for (id, from, to) in rows {
        missing
            .entry(id)
            .or_default()
            .push(MissingRange { from, to });
    }
    // A completed call's declared packets after its highest sequence are missing too.
    for (id, call) in calls {
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

/// The batch's outbox row: its new packets, until JetStream has acknowledged them. Also
/// deletes the rows of earlier batches that have been acknowledged since.
async fn write_outbox(
    tx: &mut PgConnection,
    inserted: &HashMap<Key, OffsetDateTime>,
    deletes: &[i64],
) -> Result<Option<i64>, sqlx::Error> {
    if !deletes.is_empty() {
        sqlx::query("DELETE FROM packet_outbox WHERE id = ANY($1)")
            .bind(deletes)
            .execute(&mut *tx)
            .await?;
    }
    if inserted.is_empty() {
        return Ok(None);
    }
    let (ids, seqs): (Vec<&str>, Vec<i64>) = inserted.keys().map(|(c, s)| (c.as_str(), *s)).unzip();
    sqlx::query_scalar(
        "INSERT INTO packet_outbox (call_ids, sequences) VALUES ($1, $2) RETURNING id",
    )
    .bind(&ids)
    .bind(&seqs)
    .fetch_one(tx)
    .await
    .map(Some)
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
            let call = &calls[call_id];
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
                None => Err(WriteError::NotInProgress(call.state)),
            }
        })
        .collect()
}

/// Logs a structured warning when a packet is not the one after the highest seen so far.
/// Such packets are still accepted: a PBX must never be blocked by its own network.
fn warn_if_out_of_order(call_id: &CallId, sequence: i64, last: &mut Option<i64>, start: i64) {
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
            call_id: CallId::parse(call).unwrap(),
            sequence,
            data: data.into(),
            timestamp,
            request_id: None,
        }
    }

    fn call(state: CallState, start: i64, last: Option<i64>, received: i64) -> CallCounts {
        CallCounts {
            state,
            sequence_start: start,
            last_sequence: last,
            packets_received: received,
            total_packets: None,
        }
    }

    fn key(call: &str, sequence: i64) -> Key {
        (call.to_owned(), sequence)
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
            .map(|(id, c)| ((*id).to_owned(), c.clone()))
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
