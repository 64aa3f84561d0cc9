//! The matrix: one function per fault, each on a stack of its own, each ending with the books.

mod overload;
mod processes;
mod servers;
mod work;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    books::{self, Books},
    infra::{Nats, Postgres},
    load::{Load, LoadPlan, LoadReport, Mode},
    stack::{Servers, Stack},
};

/// How big a run is: `full` is the documented matrix, `ci` the small one CI runs.
#[derive(Debug, Clone)]
pub struct Scale {
    pub calls: u32,
    /// Packets per call in the streaming scenarios (50 per second of audio).
    pub packets: u32,
    pub nats_down: Duration,
    pub postgres_down: Duration,
    pub lock_held: Duration,
    pub ai_down: Duration,
    pub overload: Duration,
}

impl Scale {
    pub fn full() -> Self {
        Self {
            calls: 40,
            packets: 1_000,
            nats_down: Duration::from_secs(10),
            postgres_down: Duration::from_secs(10),
            lock_held: Duration::from_secs(30),
            ai_down: Duration::from_secs(300),
            overload: Duration::from_secs(30),
        }
    }

    pub fn ci() -> Self {
        Self {
            calls: 16,
            packets: 400,
            nats_down: Duration::from_secs(5),
            postgres_down: Duration::from_secs(5),
            lock_held: Duration::from_secs(10),
            ai_down: Duration::from_secs(30),
            overload: Duration::from_secs(10),
        }
    }
}

/// The run's servers, binaries and scale.
pub struct Run {
    pub bin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub postgres: Postgres,
    pub nats: Nats,
    pub scale: Scale,
}

impl Run {
    pub fn ctx(&self) -> Servers<'_> {
        Servers {
            bin_dir: &self.bin_dir,
            run_dir: &self.run_dir,
            postgres: &self.postgres,
            nats_url: self.nats.url(),
        }
    }

    /// The streaming load of a scenario: every call at once, in real time (50 packets/s).
    pub fn plan(&self, scenario: &str) -> LoadPlan {
        LoadPlan {
            id_prefix: format!("chaos-{scenario}"),
            calls: self.scale.calls,
            packets: self.scale.packets,
            rate: 50,
            mode: Mode::Paced,
            first_number: 1,
        }
    }

    /// Calls streamed flat out and completed, for the scenarios that fault the AI side.
    pub fn short_calls(&self, scenario: &str) -> LoadPlan {
        LoadPlan {
            id_prefix: format!("chaos-{scenario}"),
            calls: self.scale.calls,
            packets: 100,
            rate: 0,
            mode: Mode::Paced,
            first_number: 1,
        }
    }
}

/// What a scenario showed.
#[derive(Debug, Serialize, Clone)]
pub struct Outcome {
    pub number: u8,
    pub fault: &'static str,
    pub promise: &'static str,
    pub books: Option<Books>,
    /// Scenario-specific figures, in order.
    pub figures: Vec<(String, String)>,
    /// Every broken promise, as a sentence; empty when it held.
    pub broken: Vec<String>,
    pub seconds: f64,
}

impl Outcome {
    fn new(number: u8) -> Self {
        let (fault, promise) = SCENARIOS[usize::from(number) - 1];
        Self {
            number,
            fault,
            promise,
            books: None,
            figures: Vec::new(),
            broken: Vec::new(),
            seconds: 0.0,
        }
    }

    pub fn held(&self) -> bool {
        self.broken.is_empty()
    }

    fn figure(&mut self, name: &str, value: impl std::fmt::Display) {
        self.figures.push((name.to_owned(), value.to_string()));
    }

    fn require(&mut self, ok: bool, broken: impl Into<String>) {
        if !ok {
            self.broken.push(broken.into());
        }
    }

    /// The books, and the load's answers: nothing but the expected ones.
    fn books(&mut self, books: Books) {
        self.broken.extend(books.broken());
        self.books = Some(books);
    }

    fn load(&mut self, report: &LoadReport) {
        let a = &report.answers;
        self.figure("packets answered 202", a.accepted + a.duplicate);
        self.figure("retries answered duplicate", a.retried_duplicates);
        self.figure("503 answers", a.answers_503);
        self.figure("connection errors", a.connection_errors);
        self.figure(
            "202 latency p99 / max",
            format!("{:.1} / {:.0} ms", a.p99_ms(), a.max_ms()),
        );
        let errors = report.errors();
        self.require(
            errors.is_empty(),
            format!(
                "{} requests failed, e.g. {}",
                errors.len(),
                errors.first().map_or("", String::as_str)
            ),
        );
        self.require(
            a.without_retry_after == 0,
            format!("{} 503s without Retry-After", a.without_retry_after),
        );
        self.require(
            a.timeouts == 0,
            format!("{} requests hung past 15 s", a.timeouts),
        );
        let incomplete = report.calls.iter().filter(|c| !c.completed).count();
        self.require(
            incomplete == 0,
            format!("{incomplete} calls never completed"),
        );
    }
}

/// Fault and promise of each scenario, as the issue states them.
pub const SCENARIOS: [(&str, &str); 10] = [
    (
        "`kill -9` ingest, restarted after 2 s",
        "no acknowledged packet lost or stored twice; retries answered `duplicate`",
    ),
    (
        "`kill -9` a transcriber mid-AI (two replicas)",
        "every call final exactly once; attempts counted",
    ),
    (
        "`kill -9` the notifier",
        "`pbx watch` resumes; no event missed or repeated",
    ),
    (
        "NATS stopped, started again",
        "503 + `Retry-After` while down; every acked packet and completion published",
    ),
    (
        "Postgres immediate stop and start",
        "503 while down, never 500 or a hang; nothing acknowledged lost",
    ),
    (
        "Postgres slow: row locks held on `calls`",
        "503 within the deadline for the held calls; the rest keep flowing",
    ),
    (
        "the AI provider down",
        "calls wait with backoff and finish after; none FAILED early",
    ),
    (
        "the work-queue stream deleted",
        "the reconciler re-creates the work items within a minute",
    ),
    (
        "every work item and status event delivered twice",
        "one AI request and one transcript per call",
    ),
    (
        "overload: 3x the sustainable packet rate",
        "503 + `Retry-After` sheds it; memory and accepted latency bounded; recovers by itself",
    ),
];

/// Runs one scenario; an error running it is itself a broken promise.
pub async fn run(run: &mut Run, number: u8) -> Outcome {
    let started = Instant::now();
    let result = match number {
        1 => processes::kill_ingest(run).await,
        2 => processes::kill_transcriber(run).await,
        3 => processes::kill_notifier(run).await,
        4 => servers::outage(run, servers::Server::Nats).await,
        5 => servers::outage(run, servers::Server::Postgres).await,
        6 => servers::lock_calls(run).await,
        7 => work::ai_down(run).await,
        8 => work::delete_work_stream(run).await,
        9 => work::deliver_twice(run).await,
        10 => overload::overload(run).await,
        _ => Err(anyhow::anyhow!("there is no scenario {number} (1-10)")),
    };
    let mut outcome = result.unwrap_or_else(|e| {
        let mut o = Outcome::new(number.clamp(1, 10));
        o.broken.push(format!("the scenario could not run: {e:#}"));
        o
    });
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

/// The end of most scenarios: wait for every call to be final, check the books, stop.
async fn settle(
    run: &Run,
    stack: Stack,
    outcome: &mut Outcome,
    loads: &[&LoadReport],
    within: Duration,
) -> anyhow::Result<()> {
    let took = books::wait_final(&stack, within).await?;
    outcome.figure("then all final in", format!("{:.1} s", took.as_secs_f64()));
    let books = books::check(&stack, loads).await?;
    outcome.books(books);
    stack.stop(&run.ctx()).await
}

/// [`settle`] after a load of the scenario's own: its answers first.
async fn settle_load(
    run: &Run,
    stack: Stack,
    outcome: &mut Outcome,
    report: &LoadReport,
    within: Duration,
) -> anyhow::Result<()> {
    outcome.load(report);
    settle(run, stack, outcome, &[report], within).await
}

/// Starts `plan` on the stack and returns once a third of its packets are acknowledged: the
/// moment the streaming scenarios inject their fault.
async fn load_a_third(stack: &Stack, plan: LoadPlan) -> Load {
    let total = u64::from(plan.calls * plan.packets);
    let load = Load::start(stack.ingest.url(), &stack.api_key, plan);
    load.until_acked(total / 3).await;
    load
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
