//! The sweeper: keeps the time partitions of `packets` and `call_audio` and enforces
//! retention. Every replica runs one; a Postgres advisory lock lets one pass at a time do the
//! work, the others skip theirs. A pass:
//!
//! 1. adds partitions until [`AHEAD`] partition widths past now (ingest also does this
//!    before it serves), so a packet never finds none;
//! 2. deletes final, compacted calls older than `CALL_RETENTION_DAYS` with their history, in
//!    batches ([`DELETE_BATCH`] per statement, at most [`DELETE_BATCHES_PER_PASS`] per pass);
//! 3. drops the `call_audio` partitions wholly older than the audio retention
//!    (`AUDIO_RETENTION_DAYS`, or `CALL_RETENTION_DAYS` if shorter);
//! 4. drops the `packets` partitions that hold nothing any more: ended more than
//!    [`PACKETS_GRACE`] (or more, [`Policy::grace`]) ago with every call of theirs compacted (normally, the day after the
//!    day). A call still streaming or waiting for the AI keeps its partition however old; the
//!    rows of a final call past the audio retention are deleted by the compactor, unread;
//! 5. drops what an interrupted pass left detached.
//!
//! Time is the database's (calls are filed by Postgres's `now()`). Nothing here makes ingest
//! wait: partitions are attached and detached with locks inserts do not wait for, each under
//! a short `lock_timeout` (`common::partitions`), and deletes take only final calls, whose
//! rows a packet writer locks only to answer a late retry of a finished call.

use std::time::Duration;

use common::{
    calls::retention,
    partitions::{self, Dropped, Partition},
};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Partitions are kept this many widths ahead of now.
pub const AHEAD: u32 = 3;

/// A packets partition is dropped for being fully compacted only this long after its range
/// ended (at least; [`Policy::grace`]): a transaction still filing a call into it would have
/// begun before the range ended (a call's `created_at` is its transaction's start), and one
/// running this long has had its packets answered 503 long ago (`INGEST_REQUEST_DEADLINE_MS`),
/// so no acknowledged packet can be in a partition this old that the check missed.
pub const PACKETS_GRACE: Duration = Duration::from_secs(120);

/// Calls one retention statement deletes at most.
pub const DELETE_BATCH: i64 = 1_000;

/// Retention statements one pass runs at most; the next pass goes on.
pub const DELETE_BATCHES_PER_PASS: usize = 20;

/// The advisory lock of a sweeper pass (any fixed number: "SWEEP" in ASCII).
const LOCK_KEY: i64 = 0x53_57_45_45_50;

/// What the sweeper keeps and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Partition width (`PARTITION_INTERVAL_SECS`).
    pub interval: Duration,
    /// How long compacted audio is kept (already the shorter of the two retentions).
    pub audio_retention: Option<Duration>,
    /// How long final calls are kept.
    pub call_retention: Option<Duration>,
    /// How long after its range a settled packets partition is dropped: [`PACKETS_GRACE`], or
    /// twice the request deadline if longer.
    pub grace: Duration,
}

impl Policy {
    /// How often a pass runs: four times per partition width, between 5 s and a minute.
    pub fn every(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_secs(5), Duration::from_secs(60))
    }
}

/// What one pass did (`None` from [`sweep`] when another replica's pass was running).
#[derive(Debug, Default)]
pub struct Swept {
    /// (table, partition) added.
    pub added: Vec<(&'static str, String)>,
    pub dropped: Vec<Dropped>,
    /// Calls deleted for retention.
    pub calls_deleted: u64,
}

pub async fn run(pool: PgPool, policy: Policy, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::tasks::every(policy.every(), shutdown, || async {
        let pass = async {
            let now = partitions::database_now(&mut *pool.acquire().await?).await?;
            sweep(&pool, policy, now).await
        };
        if let Err(e) = pass.await {
            tracing::warn!(error.message = %e, "sweeper pass failed; trying again next pass");
        }
    })
    .await
}

/// How long ingest waits at start-up for the partitions it needs (another replica's pass may
/// be adding them).
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Makes sure the partitions due now exist (one pass's first step alone): ingest runs it
/// before it serves. If another replica's pass holds the lock, waits until that pass has
/// added them.
pub async fn add_partitions(pool: &PgPool, policy: Policy) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let now = partitions::database_now(&mut *pool.acquire().await?).await?;
        if let Some(mut conn) = lock(pool).await? {
            let added = add_ahead(&mut conn, policy, now).await;
            unlock(conn).await;
            return added.map(drop);
        }
        let mut conn = pool.acquire().await?;
        if partitions::covered(&mut conn, now + policy.interval).await? {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < START_WAIT,
            "no partition of packets or call_audio for the next {:?}, and another replica's \
             sweeper has held its lock for {START_WAIT:?}",
            policy.interval
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// One pass as of `now` (tests pass a later `now` to age the data); `None` if another
/// replica's pass was running.
pub async fn sweep(
    pool: &PgPool,
    policy: Policy,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Swept>> {
    let Some(mut conn) = lock(pool).await? else {
        return Ok(None);
    };
    let swept = async {
        let mut swept = Swept {
            added: add_ahead(&mut conn, policy, now).await?,
            ..Swept::default()
        };
        if let Some(keep) = policy.call_retention {
            swept.calls_deleted = delete_calls(pool, now - keep).await?;
        }
        swept.dropped = drop_expired(&mut conn, policy, now).await?;
        anyhow::Ok(swept)
    }
    .await;
    unlock(conn).await;
    swept.map(Some)
}

/// A connection of its own holding the sweeper's advisory lock, or `None` if another pass
/// holds it. It carries session settings and the lock, so it never goes back to the pool:
/// [`unlock`] closes it (and a dropped one is closed by Postgres, lock and all).
async fn lock(pool: &PgPool) -> anyhow::Result<Option<PgConnection>> {
    let mut conn = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    Ok(locked.then_some(conn))
}

/// Ends the session, which releases the lock.
async fn unlock(conn: PgConnection) {
    use sqlx::Connection;
    let _ = conn.close().await;
}

async fn add_ahead(
    conn: &mut PgConnection,
    policy: Policy,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let until = now + policy.interval * AHEAD;
    let added = partitions::add_ahead(conn, now, until, policy.interval).await?;
    for (table, name) in &added {
        metrics::counter!("switchboard_partitions_added_total", "table" => *table).increment(1);
        tracing::info!(table, partition = %name, "partition added");
    }
    Ok(added)
}

/// Deletes final calls that began before `before`, batch after batch, up to
/// [`DELETE_BATCHES_PER_PASS`] batches.
async fn delete_calls(pool: &PgPool, before: OffsetDateTime) -> anyhow::Result<u64> {
    let mut calls = 0;
    for _ in 0..DELETE_BATCHES_PER_PASS {
        let deleted = retention::delete_calls(pool, before, DELETE_BATCH).await?;
        for (table, rows, bytes) in &deleted.tables {
            metrics::counter!("switchboard_expired_rows_total", "table" => *table).increment(*rows);
            metrics::counter!("switchboard_expired_bytes_total", "table" => *table)
                .increment(*bytes);
        }
        calls += deleted.calls();
        if deleted.calls() < DELETE_BATCH as u64 {
            break;
        }
    }
    if calls > 0 {
        tracing::info!(calls, "calls past CALL_RETENTION_DAYS deleted");
    }
    Ok(calls)
}

/// Detaches a partition and drops it; `None` if it turned out to be needed after all. A
/// packets partition is checked again once detached: `DETACH .. CONCURRENTLY` has waited for
/// every transaction that was using the table, so a call one of them filed in its range after
/// the first check (a transaction running for longer than the grace) is visible now, and the
/// partition goes back instead of being dropped with its packets.
async fn retire(
    conn: &mut PgConnection,
    table: &'static str,
    partition: &Partition,
) -> Result<Option<Dropped>, sqlx::Error> {
    let detached = partitions::detach(conn, table, partition).await?;
    if table == "packets"
        && partitions::has_uncompacted_calls(conn, partition.lower, partition.upper).await?
    {
        tracing::warn!(partition = %partition.name,
            "a call was filed into a partition being retired; attached back");
        partitions::reattach(conn, table, partition).await?;
        return Ok(None);
    }
    partitions::drop_detached(conn, &detached.name).await?;
    Ok(Some(detached))
}

/// Drops the partitions that may go (module docs, steps 3 to 5). A partition whose lock is
/// not free at once is left for the next pass.
async fn drop_expired(
    conn: &mut PgConnection,
    policy: Policy,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<Dropped>> {
    let audio_cutoff = policy.audio_retention.map(|keep| now - keep);
    // (table, partition, whether its contents expired: counted in the expiry metrics; a
    // settled packets partition holds only what was compacted, already counted).
    let mut doomed: Vec<(&'static str, Partition, bool)> = Vec::new();
    for partition in partitions::list(conn, "call_audio").await? {
        let expired = audio_cutoff.is_some_and(|cutoff| partition.upper <= cutoff);
        if expired || partition.detach_pending {
            doomed.push(("call_audio", partition, true));
        }
    }
    for partition in partitions::list(conn, "packets").await? {
        let settled = partition.upper + policy.grace <= now
            && !partitions::has_uncompacted_calls(conn, partition.lower, partition.upper).await?;
        if settled || partition.detach_pending {
            doomed.push(("packets", partition, false));
        }
    }
    let mut dropped = Vec::new();
    for (table, partition, expired) in doomed {
        match retire(conn, table, &partition).await {
            Ok(Some(d)) => {
                metrics::counter!("switchboard_partitions_dropped_total", "table" => table)
                    .increment(1);
                if expired {
                    metrics::counter!("switchboard_expired_rows_total", "table" => table)
                        .increment(d.rows);
                    metrics::counter!("switchboard_expired_bytes_total", "table" => table)
                        .increment(d.bytes);
                }
                tracing::info!(table, partition = %d.name, rows = d.rows, bytes = d.bytes, "partition dropped");
                dropped.push(d);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::info!(table, partition = %partition.name, error.message = %e,
                    "partition not dropped this pass");
            }
        }
    }
    for (table, name) in partitions::orphans(conn).await? {
        match partitions::drop_orphan(conn, &name).await {
            Ok(bytes) => {
                tracing::info!(table, partition = %name, bytes, "detached partition dropped");
                dropped.push(Dropped {
                    table,
                    name,
                    rows: 0,
                    bytes,
                });
            }
            Err(e) => {
                tracing::info!(table, partition = %name, error.message = %e,
                    "detached partition not dropped this pass");
            }
        }
    }
    Ok(dropped)
}
