//! Scenarios 4-6: the servers under Switchboard go away or slow down under load.

use std::time::Duration;

use super::{Outcome, Run, secs, settle_load};
use crate::{
    load::{Load, LoadReport},
    stack::{Stack, StackOptions},
};

/// Ingest's `INGEST_REQUEST_DEADLINE_MS` (its default), and the slack allowed over it.
const DEADLINE: Duration = Duration::from_secs(5);
const SLACK: Duration = Duration::from_secs(1);

fn outage_figures(outcome: &mut Outcome, report: &LoadReport, up_at: Duration) {
    let recovered = report.first_ack_after(up_at);
    outcome.figure(
        "back up to first 202",
        recovered.map_or("never".into(), |at| secs(at - up_at)),
    );
    outcome.figure("slowest 503", secs(report.answers.slowest_503));
    outcome.require(
        report.answers.answers_503 > 0,
        "no 503 while down: was the load running?",
    );
    outcome.require(
        report.answers.slowest_503 <= DEADLINE + SLACK,
        format!(
            "a 503 took {:.1} s, past the {} s deadline",
            report.answers.slowest_503.as_secs_f64(),
            DEADLINE.as_secs()
        ),
    );
}

/// The server an outage stops.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    /// 4: NATS stopped (SIGTERM) mid-load, started again on the same store.
    Nats,
    /// 5: Postgres stopped with `-m immediate` (a crash: no checkpoint), started again.
    Postgres,
}

/// Scenarios 4 and 5: a server under Switchboard stops mid-load and comes back.
pub async fn outage(run: &mut Run, server: Server) -> anyhow::Result<Outcome> {
    let (number, name) = match server {
        Server::Nats => (4, "s4"),
        Server::Postgres => (5, "s5"),
    };
    let mut outcome = Outcome::new(number);
    let stack = Stack::start(&run.ctx(), name, StackOptions::default()).await?;
    let load = super::load_a_third(&stack, run.plan(name)).await;
    let down_at = load.started.elapsed();
    match server {
        // The servers' tools block (pg_ctl, waiting for a port): off the load's threads.
        Server::Nats => {
            tokio::task::block_in_place(|| run.nats.stop())?;
            tokio::time::sleep(run.scale.nats_down).await;
            tokio::task::block_in_place(|| run.nats.start())?;
        }
        Server::Postgres => {
            tokio::task::block_in_place(|| run.postgres.stop_immediate())?;
            tokio::time::sleep(run.scale.postgres_down).await;
            tokio::task::block_in_place(|| run.postgres.start())?;
        }
    }
    let up_at = load.started.elapsed();
    outcome.figure("down", secs(up_at - down_at));
    let report = load.finish().await;
    outage_figures(&mut outcome, &report, up_at);
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(180)).await?;
    Ok(outcome)
}

/// 6: a transaction holds the rows of two streaming calls for `lock_held`; their packets must
/// be answered 503 within the deadline, and the other calls must not stall.
pub async fn lock_calls(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(6);
    let stack = Stack::start(&run.ctx(), "s6", StackOptions::default()).await?;
    let plan = run.plan("s6");
    let first = plan.first_number;
    let held: Vec<String> = (first..first + 2).map(|n| plan.call_id(n)).collect();
    let load = Load::start(stack.ingest.url(), &stack.api_key, plan.clone());
    // Every call exists once each has sent a second of audio.
    load.until_acked(u64::from(plan.calls) * 50).await;
    let mut tx = stack.pool.begin().await?;
    let held_keys: Vec<String> = held.iter().map(|id| crate::stack::key(id)).collect();
    let locked = sqlx::query("SELECT call_id FROM calls WHERE call_id = ANY($1) FOR UPDATE")
        .bind(&held_keys)
        .fetch_all(&mut *tx)
        .await?;
    anyhow::ensure!(
        locked.len() == held.len(),
        "locked {} of the calls {held:?}",
        locked.len()
    );
    let locked_at = load.started.elapsed();
    tokio::time::sleep(run.scale.lock_held).await;
    tx.rollback().await?;
    let released_at = load.started.elapsed();
    let report = load.finish().await;

    // The other calls: the longest wait between two of their 202s while the lock was held.
    let mut longest = Duration::ZERO;
    for call in report.calls.iter().filter(|c| !held.contains(&c.call_id)) {
        let during: Vec<Duration> = call
            .acked
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at >= locked_at && *at <= released_at)
            .collect();
        for pair in during.windows(2) {
            longest = longest.max(pair[1] - pair[0]);
        }
    }
    let held_acks = report
        .calls
        .iter()
        .filter(|c| held.contains(&c.call_id))
        .flat_map(|c| c.acked.iter())
        .filter(|(_, at)| *at > locked_at + SLACK && *at < released_at)
        .count();
    outcome.figure("lock held", secs(released_at - locked_at));
    outcome.figure("longest pause of another call", secs(longest));
    outcome.figure("slowest 503", secs(report.answers.slowest_503));
    outcome.require(
        longest < Duration::from_secs(1),
        format!(
            "another call paused {:.1} s while the lock was held",
            longest.as_secs_f64()
        ),
    );
    outcome.require(
        held_acks == 0,
        format!("{held_acks} packets of held calls acknowledged while held"),
    );
    outcome.require(
        report.answers.answers_503 > 0 && report.answers.slowest_503 <= DEADLINE + SLACK,
        format!(
            "the held calls were not answered 503 within the deadline ({} 503s, slowest {:.1} s)",
            report.answers.answers_503,
            report.answers.slowest_503.as_secs_f64()
        ),
    );
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(180)).await?;
    Ok(outcome)
}
