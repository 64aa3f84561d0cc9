//! Scenario 10: three times the sustainable packet rate, offered open-loop (every packet sent
//! when due, answered or not, never retried), while the kernel keeps ingest's peak memory.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::{Outcome, Run, settle};
use crate::{
    load::{Load, LoadPlan, Mode},
    stack::{Stack, StackOptions},
};

/// Ingest's memory may not pass this under overload: its queues are bounded.
const MEMORY_BOUND: u64 = 256 * 1024 * 1024;
/// Packets of a call awaiting their answers at most (see `Mode::Window`), at least.
const WINDOW: usize = 4;
/// The calls together may have at least this many packets awaiting answers: twice ingest's
/// default `INGEST_MAX_IN_FLIGHT`, whatever the machine's sustainable rate (a slower machine
/// means fewer calls for three times its rate, each with a larger window).
const OFFERED_IN_FLIGHT: usize = 2 * 2_048;

#[derive(Debug, Deserialize)]
struct BenchReport {
    throughput_per_sec: f64,
}

/// The sustainable rate: `pbx bench --closed`, 256 calls, 5 s (as `docs/benchmarks.md`).
async fn sustainable(run: &Run, stack: &Stack) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new(run.bin_dir.join("pbx"))
        .args([
            "bench",
            "--closed",
            "--calls",
            "256",
            "--duration",
            "5",
            "--json",
        ])
        .env("PBX_INGEST_URL", stack.ingest.url())
        .env("PBX_API_KEY", &stack.api_key)
        .output()
        .await?;
    let report: BenchReport = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "pbx bench printed no report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok(report.throughput_per_sec.max(100.0))
}

pub async fn overload(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(10);
    let stack = Stack::start(&run.ctx(), "s10", StackOptions::default()).await?;
    let rate = sustainable(run, &stack).await?;
    outcome.figure(
        "sustainable (pbx bench --closed, 256 calls)",
        format!("{rate:.0} packets/s"),
    );
    // Real-time calls (50 packets/s each), as many as make three times the sustainable rate.
    let calls = ((rate * 3.0) / 50.0).ceil() as u32;
    let seconds = run.scale.overload.as_secs() as u32;
    let window = WINDOW.max(OFFERED_IN_FLIGHT.div_ceil(calls as usize));
    let plan = LoadPlan {
        id_prefix: "chaos-s10-over".into(),
        calls,
        packets: 50 * seconds,
        rate: 50,
        mode: Mode::Window(window),
        first_number: 1,
    };
    let offered = plan.calls * plan.packets;
    let overload = Load::start(stack.ingest.url(), &stack.api_key, plan)
        .finish()
        .await;
    // The kernel's high-water mark of ingest's resident memory (VmHWM): the peak, not a sample.
    let peak = stack.ingest.memory().map_or(0, |(_, peak)| peak);
    let recovery = Load::start(
        stack.ingest.url(),
        &stack.api_key,
        LoadPlan {
            id_prefix: "chaos-s10-after".into(),
            calls: 50,
            packets: 250,
            rate: 50,
            mode: Mode::Paced,
            first_number: 1_000_000,
        },
    )
    .finish()
    .await;

    let a = &overload.answers;
    outcome.figure(
        "offered",
        format!("{offered} packets in {seconds} s ({calls} calls x 50/s, {window} in flight per call at most)"),
    );
    outcome.figure(
        "accepted",
        format!(
            "{} ({:.0}/s)",
            a.accepted,
            a.accepted as f64 / f64::from(seconds)
        ),
    );
    outcome.figure("shed with 503", a.answers_503);
    outcome.figure("no answer", a.connection_errors + a.timeouts);
    outcome.figure(
        "accepted latency p99 / max",
        format!("{:.0} / {:.0} ms", a.p99_ms(), a.max_ms()),
    );
    outcome.figure("ingest peak RSS", format!("{:.1} MB", peak as f64 / 1e6));
    outcome.figure(
        "after: 503s at a sixth of the rate",
        recovery.answers.answers_503,
    );
    outcome.figure("after: p99", format!("{:.1} ms", recovery.answers.p99_ms()));
    outcome.require(
        a.answers_503 > 0,
        "nothing was shed: the load never overloaded ingest",
    );
    outcome.require(
        a.without_retry_after == 0,
        format!("{} 503s without Retry-After", a.without_retry_after),
    );
    outcome.require(
        a.other.is_empty(),
        format!("answers other than 202 and 503: {:?}", a.other),
    );
    outcome.require(
        a.connection_errors + a.timeouts == 0,
        format!(
            "{} requests got no answer",
            a.connection_errors + a.timeouts
        ),
    );
    outcome.require(
        peak > 0 && peak <= MEMORY_BOUND,
        format!(
            "ingest peaked at {:.0} MB (bound 256 MB)",
            peak as f64 / 1e6
        ),
    );
    outcome.require(
        a.max_ms() <= 6_000.0,
        format!(
            "an accepted packet took {:.0} ms, past the 5 s deadline",
            a.max_ms()
        ),
    );
    outcome.require(
        recovery.answers.answers_503 == 0,
        "still shedding after the overload",
    );
    outcome.require(
        recovery.errors().is_empty(),
        format!("not recovered: {:?}", recovery.errors().first()),
    );
    settle(
        run,
        stack,
        &mut outcome,
        &[&overload, &recovery],
        Duration::from_secs(180),
    )
    .await?;
    Ok(outcome)
}
