//! Scenarios 1-3: a Switchboard process killed with SIGKILL under load.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncBufReadExt, BufReader};
use wire::live::LiveFrame;

use super::{Outcome, Run, secs, settle, settle_load};
use crate::{
    load::Load,
    stack::{Stack, StackOptions},
};

const RESTART_AFTER: Duration = Duration::from_secs(2);

/// 1: ingest dies with requests in flight and comes back 2 s later.
pub async fn kill_ingest(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(1);
    let mut stack = Stack::start(&run.ctx(), "s1", StackOptions::default()).await?;
    let load = super::load_a_third(&stack, run.plan("s1")).await;
    let killed_at = load.started.elapsed();
    stack.ingest.kill().await?;
    tokio::time::sleep(RESTART_AFTER).await;
    stack.ingest.start().await?;
    let report = load.finish().await;
    let recovered = report.first_ack_after(killed_at + RESTART_AFTER);
    outcome.figure(
        "kill to first 202",
        recovered.map_or("never".into(), |at| secs(at - killed_at)),
    );
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(180)).await?;
    Ok(outcome)
}

/// 2: two transcribers; one is killed while the AI is answering its calls.
pub async fn kill_transcriber(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(2);
    let options = StackOptions {
        transcribers: 2,
        // A dead worker's call is redelivered after the ack wait: keep the scenario short
        // (the ack wait must outlast an AI request).
        env: vec![
            ("TRANSCRIBE_ACK_WAIT_SECS", "10".into()),
            ("AI_TIMEOUT_MS", "5000".into()),
        ],
        ..Default::default()
    };
    let mut stack = Stack::start(&run.ctx(), "s2", options).await?;
    stack.ai.set_latency(Duration::from_secs(2));
    let report = Load::start(stack.ingest.url(), &stack.api_key, run.short_calls("s2"))
        .finish()
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.ai.in_flight() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outcome.figure("AI requests in flight at the kill", stack.ai.in_flight());
    stack.transcribers[0].kill().await?;
    tokio::time::sleep(RESTART_AFTER).await;
    stack.transcribers[0].start().await?;
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(180)).await?;
    if let Some(books) = outcome.books.clone() {
        let (retried, repeated) = (books.calls_retried, books.calls_with_repeated_ai_requests);
        outcome.figure("calls with a second attempt", retried);
        outcome.figure("calls asked of the AI twice", repeated);
        let archived = books.calls_archived == books.calls_completed;
        outcome.require(
            archived,
            "not every call ARCHIVED (the AI never fails here)",
        );
        // The killed replica had calls at the AI: they must have been taken over.
        outcome.require(
            retried > 0,
            "the kill interrupted no call: no call took a second attempt",
        );
    }
    Ok(outcome)
}

/// What `pbx watch --json` printed: status events per call, and snapshots that started over.
#[derive(Default)]
struct Watched {
    versions: BTreeMap<String, Vec<i64>>,
    resets: u64,
    lagged: u64,
}

/// 3: the notifier dies while `pbx watch` follows every call; it must resume where it was.
pub async fn kill_notifier(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(3);
    let options = StackOptions {
        notifier: true,
        ..Default::default()
    };
    let mut stack = Stack::start(&run.ctx(), "s3", options).await?;
    let notifier_url = stack.notifier.as_ref().expect("started").url();
    let mut watch = tokio::process::Command::new(run.bin_dir.join("pbx"))
        .args(["watch", "--json"])
        .env("PBX_NOTIFIER_URL", &notifier_url)
        .env("PBX_API_KEY", &stack.api_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let watched = Arc::new(Mutex::new(Watched::default()));
    let lines = BufReader::new(watch.stdout.take().expect("piped")).lines();
    let reader = tokio::spawn(read_frames(lines, watched.clone()));
    let load = super::load_a_third(&stack, run.plan("s3")).await;
    let notifier = stack.notifier.as_mut().expect("started");
    notifier.kill().await?;
    tokio::time::sleep(RESTART_AFTER).await;
    notifier.start().await?;
    let report = load.finish().await;
    outcome.load(&report);
    super::books::wait_final(&stack, Duration::from_secs(180)).await?;
    let missing = wait_watched(&stack, &watched, Duration::from_secs(30)).await?;
    watch.start_kill().ok();
    reader.abort();
    let (repeated, resets, lagged) = {
        let w = watched.lock().expect("not poisoned");
        let repeated: usize = w
            .versions
            .values()
            .map(|v| v.len() - v.iter().collect::<BTreeSet<_>>().len())
            .sum();
        (repeated, w.resets, w.lagged)
    };
    outcome.figure("events missed by pbx watch", missing);
    outcome.figure("events repeated", repeated);
    outcome.require(missing == 0, format!("pbx watch missed {missing} events"));
    outcome.require(
        repeated == 0,
        format!("pbx watch saw {repeated} events twice"),
    );
    outcome.require(
        resets == 0,
        format!("{resets} fresh snapshots instead of a resume"),
    );
    outcome.require(lagged == 0, format!("{lagged} lagged frames"));
    settle(
        run,
        stack,
        &mut outcome,
        &[&report],
        Duration::from_secs(30),
    )
    .await?;
    Ok(outcome)
}

async fn read_frames(
    mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    watched: Arc<Mutex<Watched>>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(frame) = serde_json::from_str::<LiveFrame>(&line) else {
            continue;
        };
        let mut w = watched.lock().expect("not poisoned");
        match frame {
            LiveFrame::Status(status) => w
                .versions
                .entry(status.event.key().to_string())
                .or_default()
                .push(status.event.version),
            LiveFrame::Snapshot(s) if s.reset => w.resets += 1,
            LiveFrame::Lagged { .. } => w.lagged += 1,
            _ => {}
        }
    }
}

/// Waits until `pbx watch` has printed every transition in Postgres; returns how many it has
/// not printed when the wait ends.
async fn wait_watched(
    stack: &Stack,
    watched: &Mutex<Watched>,
    within: Duration,
) -> anyhow::Result<usize> {
    let transitions: Vec<(String, i64)> =
        sqlx::query_as("SELECT call_id, version FROM call_transitions")
            .fetch_all(&stack.pool)
            .await?;
    let deadline = Instant::now() + within;
    loop {
        let missing = {
            let w = watched.lock().expect("not poisoned");
            transitions
                .iter()
                .filter(|(call, version)| {
                    !w.versions
                        .get(call)
                        .is_some_and(|seen| seen.contains(version))
                })
                .count()
        };
        if missing == 0 || Instant::now() > deadline {
            return Ok(missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
