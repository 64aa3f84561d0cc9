//! The batching packet writer: the heart of ingest's write path.
//!
//! Every packet request hands its packet to one writer task per process and waits for the
//! verdict. The writer takes whatever has queued up (up to `INGEST_MAX_BATCH`, without
//! waiting for more: under light load a batch is one packet and latency stays one
//! transaction) and stores the whole batch in one transaction of a few set-based statements
//! (`UNNEST` arrays), so thousands of concurrent packets cost a handful of round trips
//! instead of one commit each. Publishing to JetStream happens after the commit, in the
//! request handlers, concurrently: no row lock is ever held across a network call.
//!
//! Correctness under races comes from Postgres, not from this task: calls are created with
//! `INSERT .. ON CONFLICT DO NOTHING` (concurrent first packets, even on several replicas,
//! create one call), the batch locks its calls (`FOR NO KEY UPDATE`, existing calls in call-id
//! order) before checking they are `IN_PROGRESS`, so a completion either commits before the
//! batch (its packets get 409) or waits for it (its packets are in), and packets are unique per
//! (call, sequence). Calls created concurrently by two replicas can still be locked in
//! opposite orders; Postgres then aborts one batch as a deadlock and the writer runs it again.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use common::{
    CallId, CallState,
    events::ProgressEvent,
    outbox::Publisher,
    store::{self, CallRow, MissingRange, Recorded},
};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use crate::error::is_database_unavailable;

/// Most missing ranges returned with one packet's answer (the full list is on
/// `GET /v1/call/{id}`); bounds the response size of a call with heavy loss.
pub const MAX_MISSING_RANGES_IN_RESPONSE: i64 = 1000;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Accepted,
    /// The same sequence with the same data was already stored.
    Duplicate,
}

/// The verdict on a packet that is (now or already) stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub outcome: Outcome,
    pub received_at: OffsetDateTime,
    /// The call's missing ranges after this batch, lowest first, at most
    /// [`MAX_MISSING_RANGES_IN_RESPONSE`].
    pub missing: Vec<MissingRange>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the same sequence was stored with different data")]
    Conflict,
    #[error("the call is {0}, not IN_PROGRESS")]
    NotInProgress(CallState),
    #[error("database error: {message}")]
    Database { unavailable: bool, message: String },
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

struct Job {
    packet: NewPacket,
    reply: oneshot::Sender<Result<Stored, WriteError>>,
}

/// The handle requests use. The writer task ends once every handle is dropped and the
/// queue is drained, so shutting the server down lets queued packets finish.
#[derive(Clone)]
pub struct PacketWriter {
    tx: mpsc::Sender<Job>,
}

impl PacketWriter {
    pub fn spawn(pool: PgPool, publisher: Publisher, max_batch: usize) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let task = tokio::spawn(run(rx, pool, publisher, max_batch));
        (Self { tx }, task)
    }

    /// Stores one packet (batched with its neighbours) and returns the verdict.
    pub async fn write(&self, packet: NewPacket) -> Result<Stored, WriteError> {
        let (reply, verdict) = oneshot::channel();
        self.tx
            .send(Job { packet, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        verdict.await.map_err(|_| WriteError::Closed)?
    }
}

async fn run(mut rx: mpsc::Receiver<Job>, pool: PgPool, publisher: Publisher, max_batch: usize) {
    let mut jobs = Vec::with_capacity(max_batch);
    let mut progress = HashSet::new();
    let mut report = tokio::time::interval(PROGRESS_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // `recv_many` is cancel-safe: a tick never loses packets.
            received = rx.recv_many(&mut jobs, max_batch) => {
                if received == 0 {
                    break;
                }
                let batch = std::mem::replace(&mut jobs, Vec::with_capacity(max_batch));
                progress.extend(batch.iter().map(|j| j.packet.call_id.to_string()));
                write_batch(&pool, &publisher, batch).await;
            }
            _ = report.tick(), if !progress.is_empty() => {
                let due: Vec<String> = progress.drain().collect();
                let (pool, publisher) = (pool.clone(), publisher.clone());
                // Off the write path: a report is a nicety, never a delay for packets.
                tokio::spawn(async move {
                    if let Err(e) = publish_progress(&pool, &publisher, &due).await {
                        tracing::debug!(error.message = %e, "progress report skipped");
                    }
                });
            }
        }
    }
    tracing::debug!("packet writer stopped");
}

/// How often the calls that received packets get a progress report: once per period, so at
/// most once a second per call, and the last packets of a burst are reported too.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

async fn publish_progress(
    pool: &PgPool,
    publisher: &Publisher,
    calls: &[String],
) -> anyhow::Result<()> {
    let rows: Vec<CallRow> = sqlx::query_as(concat!(
        "SELECT ",
        common::call_columns_sql!(),
        " FROM calls WHERE call_id = ANY($1) AND state = $2"
    ))
    .bind(calls)
    .bind(CallState::InProgress.as_str())
    .fetch_all(pool)
    .await?;
    let client = publisher.js.client();
    for row in rows {
        let event = ProgressEvent {
            call_id: row.call_id.clone(),
            packets_received: row.packets_received,
            missing_packets: row.missing_packets,
            last_sequence: row.last_sequence,
            at: time::OffsetDateTime::now_utc(),
        };
        let payload = serde_json::to_vec(&event)?;
        client
            .publish(
                publisher.subjects.call_progress(&row.call_id),
                payload.into(),
            )
            .await?;
    }
    Ok(())
}

async fn write_batch(pool: &PgPool, publisher: &Publisher, jobs: Vec<Job>) {
    let started = Instant::now();
    let (packets, replies): (Vec<NewPacket>, Vec<_>) =
        jobs.into_iter().map(|job| (job.packet, job.reply)).unzip();
    let results = match commit_with_retry(pool, &packets).await {
        Ok(batch) => {
            announce(publisher, batch.created);
            batch.results
        }
        Err(failure) if packets.len() > 1 && !failure.is_unavailable() => {
            // Validation should make this impossible, but if one packet is poison, store
            // the others one by one instead of failing them all (and forever, on retry).
            tracing::error!(
                error.message = %failure.error, batch.size = packets.len(),
                "batch failed; retrying its packets one by one"
            );
            let mut results = Vec::with_capacity(packets.len());
            for packet in &packets {
                match commit_batch(pool, std::slice::from_ref(packet)).await {
                    Ok(mut batch) => {
                        announce(publisher, batch.created);
                        results.push(batch.results.pop().expect("one result per packet"));
                    }
                    Err(failure) => results.push(Err(WriteError::from_failure(&failure))),
                }
            }
            results
        }
        Err(failure) => vec![Err(WriteError::from_failure(&failure)); packets.len()],
    };
    metrics::histogram!("switchboard_ingest_batch_size").record(packets.len() as f64);
    metrics::histogram!("switchboard_ingest_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    for (reply, result) in replies.into_iter().zip(results) {
        // The request may have gone (client disconnected): the packet is stored regardless.
        reply.send(result).ok();
    }
}

/// Publishes the status events of calls the batch created, without holding up the writer.
fn announce(publisher: &Publisher, created: Vec<Recorded>) {
    if created.is_empty() {
        return;
    }
    let publisher = publisher.clone();
    tokio::spawn(async move {
        publisher.recorded(&created).await;
    });
}

struct BatchOutcome {
    /// One per packet, in order.
    results: Vec<Result<Stored, WriteError>>,
    /// Calls this batch created, with their status events to publish.
    created: Vec<Recorded>,
}

/// A batch that loses a deadlock (two replicas creating the same new calls in opposite
/// orders, which Postgres resolves by aborting one of them) is simply run again.
async fn commit_with_retry(
    pool: &PgPool,
    packets: &[NewPacket],
) -> Result<BatchOutcome, BatchFailure> {
    let mut tries = 0;
    loop {
        match commit_batch(pool, packets).await {
            Err(failure) if tries < 3 && failure.is_conflict() => {
                tries += 1;
                metrics::counter!("switchboard_ingest_batch_retries_total").increment(1);
                tracing::info!(error.message = %failure.error, "packet batch lost a lock conflict; running it again");
            }
            result => return result,
        }
    }
}

async fn commit_batch(pool: &PgPool, packets: &[NewPacket]) -> Result<BatchOutcome, BatchFailure> {
    let mut tx = pool.begin().await.map_err(|error| BatchFailure {
        error,
        connecting: true,
    })?;

    // Sorted: every writer locks calls in the same order.
    let mut call_ids: Vec<&str> = packets.iter().map(|p| p.call_id.as_str()).collect();
    call_ids.sort_unstable();
    call_ids.dedup();

    // Lock the calls that exist, then create the others. Locking first keeps the common
    // case (every call exists) free of INSERT .. ON CONFLICT's speculative insertions.
    let mut locked: Vec<(String, String, Option<i64>)> = lock_calls(&mut tx, &call_ids).await?;
    let mut created: Vec<String> = Vec::new();
    if locked.len() < call_ids.len() {
        let new_ids: Vec<&str> = call_ids
            .iter()
            .copied()
            .filter(|id| !locked.iter().any(|(l, _, _)| l == id))
            .collect();
        created = sqlx::query_scalar(
            "INSERT INTO calls (call_id, state) SELECT id, $2 FROM unnest($1::text[]) AS id \
             ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
        )
        .bind(&new_ids)
        .bind(CallState::INITIAL.as_str())
        .fetch_all(&mut *tx)
        .await?;
        // Those another replica created meanwhile exist now: lock them too.
        locked.extend(lock_calls(&mut tx, &new_ids).await?);
    }
    let mut calls: HashMap<&str, (CallState, Option<i64>)> = HashMap::with_capacity(locked.len());
    for (id, state, last) in &locked {
        let state = state
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        calls.insert(id.as_str(), (state, *last));
    }
    let state_of = |call_id: &str| calls.get(call_id).map_or(CallState::INITIAL, |c| c.0);

    // The first packet of each (call, sequence) in the batch is the one that may be stored;
    // any later one in the batch is judged against what ends up stored.
    let mut first: HashMap<(&str, i64), usize> = HashMap::with_capacity(packets.len());
    for (i, p) in packets.iter().enumerate() {
        first.entry((p.call_id.as_str(), p.sequence)).or_insert(i);
    }
    let mut candidates: Vec<usize> = first
        .values()
        .copied()
        .filter(|&i| state_of(packets[i].call_id.as_str()) == CallState::InProgress)
        .collect();
    candidates.sort_unstable();

    let mut inserted: HashMap<(String, i64), OffsetDateTime> = HashMap::new();
    if !candidates.is_empty() {
        let ids: Vec<&str> = candidates
            .iter()
            .map(|&i| packets[i].call_id.as_str())
            .collect();
        let seqs: Vec<i64> = candidates.iter().map(|&i| packets[i].sequence).collect();
        let data: Vec<&str> = candidates
            .iter()
            .map(|&i| packets[i].data.as_str())
            .collect();
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
        .fetch_all(&mut *tx)
        .await?;
        inserted = rows.into_iter().map(|(c, s, at)| ((c, s), at)).collect();
    }

    // What is already stored under the keys we did not insert: duplicates and conflicts.
    let lookups: Vec<(&str, i64)> = first
        .keys()
        .filter(|(c, s)| !inserted.contains_key(&((*c).to_owned(), *s)))
        .copied()
        .collect();
    let mut existing: HashMap<(String, i64), (String, OffsetDateTime)> = HashMap::new();
    if !lookups.is_empty() {
        let (ids, seqs): (Vec<&str>, Vec<i64>) = lookups.into_iter().unzip();
        let rows: Vec<(String, i64, String, OffsetDateTime)> = sqlx::query_as(
            "SELECT p.call_id, p.sequence, p.data, p.received_at FROM packets p \
             JOIN UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
               ON p.call_id = k.call_id AND p.sequence = k.sequence",
        )
        .bind(&ids)
        .bind(&seqs)
        .fetch_all(&mut *tx)
        .await?;
        existing = rows
            .into_iter()
            .map(|(c, s, d, at)| ((c, s), (d, at)))
            .collect();
    }

    if !inserted.is_empty() {
        let (ids, seqs): (Vec<&str>, Vec<i64>) =
            inserted.keys().map(|(c, s)| (c.as_str(), *s)).unzip();
        sqlx::query(
            "UPDATE calls c SET packets_received = c.packets_received + v.n, \
                 received = c.received + v.ranges, \
                 first_sequence = LEAST(c.first_sequence, v.lo), \
                 last_sequence = GREATEST(c.last_sequence, v.hi), \
                 last_packet_at = now() \
             FROM (SELECT call_id, count(*) AS n, range_agg(int8range(seq, seq + 1)) AS ranges, \
                          min(seq) AS lo, max(seq) AS hi \
                   FROM UNNEST($1::text[], $2::int8[]) AS u(call_id, seq) GROUP BY call_id) v \
             WHERE c.call_id = v.call_id",
        )
        .bind(&ids)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    }

    let missing_rows: Vec<(String, i64, i64)> = sqlx::query_as(concat!(
        "SELECT c.call_id, lower(m.r), upper(m.r) - 1 FROM calls c CROSS JOIN LATERAL ",
        "(SELECT r FROM unnest(",
        common::missing_ranges_sql!(),
        ") AS r ORDER BY lower(r) LIMIT $2) AS m WHERE c.call_id = ANY($1) ",
        "ORDER BY c.call_id, lower(m.r)"
    ))
    .bind(&call_ids)
    .bind(MAX_MISSING_RANGES_IN_RESPONSE)
    .fetch_all(&mut *tx)
    .await?;
    let mut missing: HashMap<String, Vec<MissingRange>> = HashMap::new();
    for (id, from, to) in missing_rows {
        missing
            .entry(id)
            .or_default()
            .push(MissingRange { from, to });
    }

    let mut recorded = Vec::new();
    if !created.is_empty() {
        let rows: Vec<CallRow> = sqlx::query_as(concat!(
            "SELECT ",
            common::call_columns_sql!(),
            " FROM calls WHERE call_id = ANY($1)"
        ))
        .bind(&created)
        .fetch_all(&mut *tx)
        .await?;
        let changed = rows
            .into_iter()
            .map(|row| (None, row, "first_packet"))
            .collect();
        recorded = store::record_transitions(&mut tx, changed).await?;
    }

    tx.commit().await?;

    // Verdicts, in request order.
    let mut last_seen: HashMap<&str, Option<i64>> =
        calls.iter().map(|(id, (_, last))| (*id, *last)).collect();
    let results = packets
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let call_id = p.call_id.as_str();
            let key = (call_id.to_owned(), p.sequence);
            let missing = || missing.get(call_id).cloned().unwrap_or_default();
            if first[&(call_id, p.sequence)] == i
                && let Some(received_at) = inserted.get(&key)
            {
                warn_if_out_of_order(&p.call_id, p.sequence, last_seen.get_mut(call_id));
                return Ok(Stored {
                    outcome: Outcome::Accepted,
                    received_at: *received_at,
                    missing: missing(),
                });
            }
            let stored = match (inserted.get(&key), existing.get(&key)) {
                (Some(at), _) => Some((packets[first[&(call_id, p.sequence)]].data.as_str(), *at)),
                (None, Some((data, at))) => Some((data.as_str(), *at)),
                (None, None) => None,
            };
            match stored {
                Some((data, received_at)) if data == p.data => Ok(Stored {
                    outcome: Outcome::Duplicate,
                    received_at,
                    missing: missing(),
                }),
                Some(_) => Err(WriteError::Conflict),
                None => Err(WriteError::NotInProgress(state_of(call_id))),
            }
        })
        .collect();
    Ok(BatchOutcome {
        results,
        created: recorded,
    })
}

/// Locks the calls among `ids` that exist (in id order: two writers never deadlock) and
/// returns (call_id, state, last_sequence) for each.
async fn lock_calls(
    tx: &mut sqlx::PgConnection,
    ids: &[&str],
) -> Result<Vec<(String, String, Option<i64>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT call_id, state, last_sequence FROM calls WHERE call_id = ANY($1) \
         ORDER BY call_id FOR NO KEY UPDATE",
    )
    .bind(ids)
    .fetch_all(tx)
    .await
}

/// Logs a structured warning when a packet is not the one after the highest seen so far.
/// Such packets are still accepted: a PBX must never be blocked by its own network.
fn warn_if_out_of_order(call_id: &CallId, sequence: i64, last_seen: Option<&mut Option<i64>>) {
    let Some(last) = last_seen else { return };
    let expected = last.map_or(0, |l| l + 1);
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
