//! Completes calls that stopped receiving packets (`CALL_IDLE_TIMEOUT_SECS`). Every replica
//! runs one. A pass claims a batch of idle calls with `FOR NO KEY UPDATE SKIP LOCKED`, so
//! replicas share the work (each takes calls the others are not holding) instead of all
//! walking the same oldest calls, completes them in one transaction through the same
//! compare-and-set as the completion endpoint, and publishes their work items and status
//! events concurrently after the commit. A NATS outage therefore costs a pass one publish
//! timeout, not one per call: what JetStream does not acknowledge waits in the outbox.

use std::time::Duration;

use common::{
    CallState, Reason,
    calls::{self, Changes},
    outbox::Publisher,
};
use futures::future::join_all;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::lifecycle;

/// Calls one pass completes at most. Small enough that the row locks a pass holds (a packet
/// arriving for one of them waits for the pass) last a few milliseconds.
pub const PASS_LIMIT: i64 = 50;

pub async fn run(
    pool: PgPool,
    publisher: Publisher,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Look four times per timeout, so a call is completed at most 25% late.
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    common::tasks::every(every, shutdown.clone(), || async {
        // A full pass means there may be more: go on at once (a backlog after an outage).
        loop {
            match reap_once(&pool, &publisher, idle_timeout, PASS_LIMIT).await {
                Ok(n) if n as i64 == PASS_LIMIT && !shutdown.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error.message = %e, "idle reaper pass failed");
                    break;
                }
            }
        }
    })
    .await
}

/// Completes up to `limit` calls idle for longer than `idle_timeout` that no other
/// transaction holds; returns how many it completed.
pub async fn reap_once(
    pool: &PgPool,
    publisher: &Publisher,
    idle_timeout: Duration,
    limit: i64,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let idle = calls::completion::lock_idle(&mut tx, idle_timeout, limit).await?;
    let mut completed = Vec::with_capacity(idle.len());
    for call_id in idle {
        // The rows are locked and were idle under the lock: each moves, once.
        let recorded = calls::transition(
            &mut tx,
            &call_id,
            CallState::InProgress,
            CallState::Completed,
            Reason::IdleTimeout,
            Changes::default(),
        )
        .await?;
        completed.extend(recorded);
    }
    tx.commit().await?;
    join_all(completed.iter().map(|recorded| {
        lifecycle::announce_completed(publisher, recorded, Reason::IdleTimeout, None)
    }))
    .await;
    Ok(completed.len())
}
