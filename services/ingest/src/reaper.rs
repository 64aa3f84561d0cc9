//! Completes calls that stopped receiving packets (`CALL_IDLE_TIMEOUT_SECS`). Every replica
//! runs one; the compare-and-set in [`crate::lifecycle::complete_call`] makes sure each call
//! is completed once, whichever replica gets there first.

use std::time::Duration;

use common::{CallId, outbox::Publisher};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{self, IDLE_TIMEOUT};

/// Calls completed per pass at most.
const PASS_LIMIT: i64 = 500;

pub async fn run(publisher: Publisher, idle_timeout: Duration, shutdown: CancellationToken) {
    // Look four times per timeout, so a call is completed at most 25% late.
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = reap_once(&publisher, idle_timeout).await {
            tracing::warn!(error.message = %e, "idle reaper pass failed");
        }
    }
}

/// Completes the calls idle for longer than `idle_timeout`; returns how many it completed.
pub async fn reap_once(publisher: &Publisher, idle_timeout: Duration) -> anyhow::Result<usize> {
    let idle: Vec<String> = sqlx::query_scalar(
        "SELECT call_id FROM calls WHERE state = $3 \
         AND last_packet_at < now() - make_interval(secs => $1) \
         ORDER BY last_packet_at LIMIT $2",
    )
    .bind(idle_timeout.as_secs_f64())
    .bind(PASS_LIMIT)
    .bind(common::CallState::InProgress.as_str())
    .fetch_all(&publisher.pool)
    .await?;
    let mut completed = 0;
    for id in idle {
        let call_id = CallId::parse(id)?;
        match lifecycle::complete_call(publisher, &call_id, None, IDLE_TIMEOUT, Some(idle_timeout))
            .await
        {
            Ok(lifecycle::Completion::Completed(_)) => completed += 1,
            Ok(lifecycle::Completion::AlreadyDone(_) | lifecycle::Completion::NoLongerIdle) => {}
            Err(e) => {
                tracing::warn!(call.id = %call_id, error.message = %e, "cannot complete idle call")
            }
        }
    }
    Ok(completed)
}
