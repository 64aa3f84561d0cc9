//! `pbx simulate`: N realistic calls streamed through ingest (paced like 20 ms frames, with
//! optional loss, duplicates and reordering), completed, and followed on the notifier until
//! every one is ARCHIVED or FAILED; then a summary, and a check that nothing was lost.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::IsTerminal,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{StreamExt, stream};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use wire::{CallState, MissingRange, api::PacketStatus, events::StatusEvent, live::LiveFrame};

use crate::{api::Ingest, cli::Endpoints, live::Live, sentences, stats::Percentiles};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Calls to stream.
    #[arg(long, default_value_t = 10)]
    pub calls: usize,
    /// Packets per call (50 per second of audio).
    #[arg(long, default_value_t = 250)]
    pub packets: usize,
    /// Calls streaming at the same time.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Packets per second per call: 50 is real time (20 ms frames); 0 is as fast as possible.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Probability that a packet is lost (never sent).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Probability that a packet is sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Probability that a packet is sent after the one that follows it.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// How long to wait for every call to reach ARCHIVED or FAILED, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// The first sequence number: 0, or 1 for an ingest run with `SEQUENCE_START=1` (as a
    /// PBX that counts from 1 would send).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1))]
    pub sequence_start: i64,
    /// Seed for the calls' content, losses, duplicates and reordering.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of the call ids (default: `sim-<unix time>`).
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Options {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, p) in [
            ("--loss", self.loss),
            ("--duplicates", self.duplicates),
            ("--reorder", self.reorder),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "{name} must be a probability between 0 and 1, got {p}"
            );
        }
        anyhow::ensure!(self.calls >= 1, "--calls must be at least 1");
        anyhow::ensure!(self.packets >= 1, "--packets must be at least 1");
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        Ok(())
    }
}

/// One call's script: what is sent, in which order, and what is dropped.
struct Plan {
    call_id: String,
    sends: Vec<(i64, &'static str, bool)>,
    dropped: BTreeSet<i64>,
}

fn plan(call_id: String, options: &Options, rng: &mut StdRng) -> Plan {
    let words = sentences::pick(rng);
    let mut sends = Vec::with_capacity(options.packets);
    let mut dropped = BTreeSet::new();
    let start = options.sequence_start;
    for position in 0..options.packets {
        let data = sentences::packet_data(&words, position, options.packets);
        let seq = start + position as i64;
        if rng.random_bool(options.loss) {
            dropped.insert(seq);
            continue;
        }
        sends.push((seq, data, rng.random_bool(options.duplicates)));
    }
    if sends.is_empty()
        && let Some(last) = dropped.pop_last()
    {
        // A call needs one packet to exist: keep the last one.
        let data = sentences::packet_data(&words, (last - start) as usize, options.packets);
        sends.push((last, data, false));
    }
    let mut i = 0;
    while i + 1 < sends.len() {
        if rng.random_bool(options.reorder) {
            sends.swap(i, i + 1);
            i += 2;
        } else {
            i += 1;
        }
    }
    Plan {
        call_id,
        sends,
        dropped,
    }
}

#[derive(Debug, Default)]
struct CallResult {
    /// Sequences ingest accepted (stored for the first time).
    accepted: BTreeSet<i64>,
    duplicates_reported: u64,
    sent: u64,
    latencies: Vec<Duration>,
    completed_at: Option<Instant>,
}

/// What the notifier told us about a call.
#[derive(Debug, Clone)]
struct Final {
    state: CallState,
    attempts: i64,
    seen_at: Instant,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub calls: usize,
    pub final_states: BTreeMap<String, usize>,
    pub unfinished: usize,
    pub packets_planned: u64,
    pub packets_sent: u64,
    pub packets_accepted: u64,
    pub duplicates_reported: u64,
    pub packets_dropped_by_simulator: u64,
    pub ingest_latency: Percentiles,
    pub completion_to_final: Percentiles,
    pub attempts: BTreeMap<i64, usize>,
    /// Packets ingest accepted that the call does not count.
    pub lost_packets: i64,
    /// Calls whose reported missing sequences differ from what was dropped.
    pub missing_mismatches: usize,
    pub duration_secs: f64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.unfinished == 0 && self.lost_packets == 0 && self.missing_mismatches == 0
    }
}

pub async fn run(
    ingest: &Ingest,
    endpoints: &Endpoints,
    options: Options,
) -> anyhow::Result<ExitCode> {
    options.validate()?;
    let started = Instant::now();
    let seed = options.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let prefix = options.id_prefix.clone().unwrap_or_else(|| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        format!("sim-{now}")
    });
    let plans: Vec<Plan> = (0..options.calls)
        .map(|i| plan(format!("{prefix}-{i}"), &options, &mut rng))
        .collect();
    let planned: u64 = plans
        .iter()
        .map(|p| p.sends.len() as u64 + p.dropped.len() as u64)
        .sum();
    let to_send: u64 = plans
        .iter()
        .map(|p| p.sends.iter().map(|s| 1 + s.2 as u64).sum::<u64>())
        .sum();

    // Follow the notifier first, so no change is missed.
    let finals: Arc<Mutex<HashMap<String, Final>>> = Arc::default();
    let mut live = Live::new(&endpoints.notifier_url, endpoints.credentials().read);
    let ids: Vec<String> = plans.iter().map(|p| p.call_id.clone()).collect();
    live.connect(&ids).await?;
    let (packets_bar, calls_bar) = progress_bars(to_send, options.calls as u64, options.json);
    let follower = follow(
        live,
        format!("{prefix}-"),
        finals.clone(),
        calls_bar.clone(),
    );
    let calls = stream_all(ingest, plans, &options, &packets_bar).await?;

    // Wait for every call to be final.
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs);
    while finals.lock().unwrap().len() < options.calls && Instant::now() < deadline {
        anyhow::ensure!(
            !follower.is_finished(),
            "lost the notifier at {} and could not reconnect for 60 s",
            endpoints.notifier_url
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    follower.abort();
    calls_bar.finish();

    let finals = finals.lock().unwrap().clone();
    let summary = summarise(ingest, &calls, &finals, planned, started).await?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary, seed));
    }
    Ok(if summary.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// A bar for packets sent and one for calls finished (hidden when stderr is not a terminal or
/// the output is JSON).
fn progress_bars(packets: u64, calls: u64, json: bool) -> (ProgressBar, ProgressBar) {
    let target = if std::io::stderr().is_terminal() && !json {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bars = MultiProgress::with_draw_target(target);
    let style = ProgressStyle::with_template("{prefix:>9} {bar:40.cyan/blue} {pos}/{len} {msg}")
        .expect("valid template");
    let packets_bar = bars.add(
        ProgressBar::new(packets)
            .with_style(style.clone())
            .with_prefix("packets"),
    );
    let calls_bar = bars.add(
        ProgressBar::new(calls)
            .with_style(style)
            .with_prefix("finished"),
    );
    (packets_bar, calls_bar)
}

/// Records every final state the notifier reports for calls of `prefix`, reconnecting (and
/// resuming) when the connection drops; ends if it cannot reconnect for a minute.
fn follow(
    mut live: Live,
    prefix: String,
    finals: Arc<Mutex<HashMap<String, Final>>>,
    calls_bar: ProgressBar,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match live.next().await {
                Some(frame) => record(&frame, &prefix, &finals, &calls_bar),
                None => {
                    if live.reconnect(Duration::from_secs(60)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// What each call's streaming did, by call id: the sequences dropped and the result.
type Streamed = HashMap<String, (BTreeSet<i64>, CallResult)>;

/// Streams every planned call, `--concurrency` at a time, and completes each.
async fn stream_all(
    ingest: &Ingest,
    plans: Vec<Plan>,
    options: &Options,
    packets_bar: &ProgressBar,
) -> anyhow::Result<Streamed> {
    let period = (options.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(options.rate)));
    let results: Vec<(String, BTreeSet<i64>, anyhow::Result<CallResult>)> = stream::iter(plans)
        .map(|plan| async move {
            let result =
                stream_call(ingest, &plan, period, options.packets as i64, packets_bar).await;
            (plan.call_id, plan.dropped, result)
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    packets_bar.finish();
    let mut calls = HashMap::new();
    for (call_id, dropped, result) in results {
        calls.insert(call_id, (dropped, result?));
    }
    Ok(calls)
}

fn record(
    frame: &LiveFrame,
    prefix: &str,
    finals: &Mutex<HashMap<String, Final>>,
    bar: &ProgressBar,
) {
    let entries: Vec<&StatusEvent> = match frame {
        LiveFrame::Snapshot(snapshot) => snapshot.calls.iter().map(|c| &c.event).collect(),
        LiveFrame::SnapshotPage(page) => page.calls.iter().map(|c| &c.event).collect(),
        LiveFrame::Status(status) => vec![&status.event],
        _ => return,
    };
    for call in entries {
        let id = call.call_id.as_str();
        if !id.starts_with(prefix) {
            continue;
        }
        let mut finals = finals.lock().unwrap();
        if matches!(call.state, CallState::Archived | CallState::Failed) {
            // The first time only: a later snapshot repeats it and must not move the time.
            finals.entry(id.to_owned()).or_insert_with(|| {
                bar.inc(1);
                Final {
                    state: call.state,
                    attempts: i64::from(call.ai_attempts),
                    seen_at: Instant::now(),
                }
            });
        } else if finals.remove(id).is_some() {
            // Re-driven after FAILED: not final any more.
            bar.set_position(bar.position().saturating_sub(1));
        }
    }
}

async fn stream_call(
    ingest: &Ingest,
    plan: &Plan,
    period: Option<Duration>,
    total_packets: i64,
    bar: &ProgressBar,
) -> anyhow::Result<CallResult> {
    let mut result = CallResult::default();
    let start = tokio::time::Instant::now();
    for (i, (seq, data, twice)) in plan.sends.iter().enumerate() {
        if let Some(period) = period {
            tokio::time::sleep_until(start + period * i as u32).await;
        }
        let timestamp = *seq as f64 * 0.02;
        for _ in 0..(1 + *twice as usize) {
            let (outcome, latency) = ingest.packet(&plan.call_id, *seq, data, timestamp).await?;
            result.sent += 1;
            result.latencies.push(latency);
            match outcome {
                PacketStatus::Accepted => {
                    result.accepted.insert(*seq);
                }
                PacketStatus::Duplicate => result.duplicates_reported += 1,
            }
            bar.inc(1);
        }
    }
    ingest.complete(&plan.call_id, total_packets).await?;
    result.completed_at = Some(Instant::now());
    Ok(result)
}

/// Checks every call against what ingest stored, and adds it all up.
async fn summarise(
    ingest: &Ingest,
    calls: &HashMap<String, (BTreeSet<i64>, CallResult)>,
    finals: &HashMap<String, Final>,
    planned: u64,
    started: Instant,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        calls: calls.len(),
        final_states: BTreeMap::new(),
        unfinished: 0,
        packets_planned: planned,
        packets_sent: 0,
        packets_accepted: 0,
        duplicates_reported: 0,
        packets_dropped_by_simulator: 0,
        ingest_latency: Percentiles::default(),
        completion_to_final: Percentiles::default(),
        attempts: BTreeMap::new(),
        lost_packets: 0,
        missing_mismatches: 0,
        duration_secs: 0.0,
    };
    let mut latencies = Vec::new();
    let mut completion = Vec::new();
    for (call_id, (dropped, result)) in calls {
        summary.packets_sent += result.sent;
        summary.packets_accepted += result.accepted.len() as u64;
        summary.duplicates_reported += result.duplicates_reported;
        summary.packets_dropped_by_simulator += dropped.len() as u64;
        latencies.extend_from_slice(&result.latencies);
        match finals.get(call_id) {
            Some(f) => {
                *summary
                    .final_states
                    .entry(f.state.as_str().to_owned())
                    .or_default() += 1;
                *summary.attempts.entry(f.attempts).or_default() += 1;
                if let Some(done) = result.completed_at {
                    completion.push(f.seen_at.saturating_duration_since(done));
                }
            }
            None => summary.unfinished += 1,
        }
        let stored = ingest
            .call(call_id)
            .await
            .with_context(|| format!("reading back {call_id}"))?;
        let received = stored.call.packets_received;
        summary.lost_packets += (result.accepted.len() as i64 - received).max(0);
        if missing_sequences(&stored.missing) != *dropped {
            summary.missing_mismatches += 1;
        }
    }
    summary.ingest_latency = Percentiles::of(&latencies);
    summary.completion_to_final = Percentiles::of(&completion);
    summary.duration_secs = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn missing_sequences(missing: &[MissingRange]) -> BTreeSet<i64> {
    missing.iter().flat_map(|r| r.from..=r.to).collect()
}

fn render(s: &Summary, seed: u64) -> String {
    let states: Vec<String> = s
        .final_states
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let attempts: Vec<String> = s
        .attempts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    format!(
        "\nSimulated {} calls in {:.1} s (seed {seed})\n\
         \x20 final states         {}{}\n\
         \x20 packets              {} planned, {} dropped by the simulator, {} sent, {} accepted, {} reported duplicate\n\
         \x20 ingest latency       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
         \x20 completion -> final  p50 {:.2} s, p99 {:.2} s\n\
         \x20 AI attempts          {}\n\
         \x20 lost                 {} packets; {} calls whose missing ranges differ from what was dropped\n",
        s.calls,
        s.duration_secs,
        if states.is_empty() {
            "none".into()
        } else {
            states.join(", ")
        },
        if s.unfinished > 0 {
            format!(", {} unfinished", s.unfinished)
        } else {
            String::new()
        },
        s.packets_planned,
        s.packets_dropped_by_simulator,
        s.packets_sent,
        s.packets_accepted,
        s.duplicates_reported,
        s.ingest_latency.p50_ms,
        s.ingest_latency.p99_ms,
        s.ingest_latency.max_ms,
        s.completion_to_final.p50_ms / 1e3,
        s.completion_to_final.p99_ms / 1e3,
        if attempts.is_empty() {
            "none".into()
        } else {
            attempts.join(", ")
        },
        s.lost_packets,
        s.missing_mismatches,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(loss: f64, duplicates: f64, reorder: f64) -> Options {
        Options {
            calls: 1,
            packets: 200,
            concurrency: 1,
            rate: 0,
            loss,
            duplicates,
            reorder,
            timeout_secs: 1,
            sequence_start: 0,
            seed: None,
            id_prefix: None,
            json: true,
        }
    }

    #[test]
    fn a_plan_sends_every_packet_once_unless_told_otherwise() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = plan("c".into(), &options(0.0, 0.0, 0.0), &mut rng);
        assert!(p.dropped.is_empty());
        let seqs: Vec<i64> = p.sends.iter().map(|s| s.0).collect();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>());
        assert!(p.sends.iter().all(|s| !s.2));
    }

    #[test]
    fn loss_duplicates_and_reordering_happen_and_account_for_every_packet() {
        let mut rng = StdRng::seed_from_u64(2);
        let p = plan("c".into(), &options(0.1, 0.1, 0.1), &mut rng);
        assert!(!p.dropped.is_empty());
        assert!(p.sends.iter().any(|s| s.2));
        assert!(
            p.sends.windows(2).any(|w| w[0].0 > w[1].0),
            "some reordering"
        );
        let mut all: Vec<i64> = p
            .sends
            .iter()
            .map(|s| s.0)
            .chain(p.dropped.iter().copied())
            .collect();
        all.sort();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_plan_can_count_from_one() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut counting_from_one = options(0.2, 0.0, 0.0);
        counting_from_one.sequence_start = 1;
        let p = plan("c".into(), &counting_from_one, &mut rng);
        let mut all: Vec<i64> = p
            .sends
            .iter()
            .map(|s| s.0)
            .chain(p.dropped.iter().copied())
            .collect();
        all.sort();
        assert_eq!(all, (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn a_call_always_sends_at_least_one_packet() {
        let mut rng = StdRng::seed_from_u64(3);
        let p = plan("c".into(), &options(1.0, 0.0, 0.0), &mut rng);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.dropped.len(), 199);
    }

    #[test]
    fn missing_ranges_expand_to_sequences() {
        let missing = [
            MissingRange { from: 2, to: 3 },
            MissingRange { from: 7, to: 7 },
        ];
        assert_eq!(missing_sequences(&missing), BTreeSet::from([2, 3, 7]));
    }
}
