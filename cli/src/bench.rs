//! `pbx bench`: load for ingest, measured honestly.
//!
//! Open loop by default: packets are due at a fixed rate (`--rate` per second over all
//! calls), each call sending its packets in sequence like a PBX stream, and a packet's latency
//! counts from when it was due, not from when it could finally be sent. A slow server
//! therefore shows up as latency instead of quietly slowing the load down (the "coordinated
//! omission" a closed loop suffers). `--closed` gives the other figure: `--calls` streams, each
//! sending its next packet as soon as the previous is answered, for the maximum throughput.
//! Latencies go into an HDR histogram (microseconds, 3 significant digits).

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use futures::{StreamExt, future::join_all, stream};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use wire::audio::AudioFormat;

use crate::api::Ingest;

/// Completions in flight at once at the end of a run.
const COMPLETING_AT_ONCE: usize = 64;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Calls streaming at once (open loop: the rate is shared among them; closed loop: one
    /// request in flight each).
    #[arg(long, default_value_t = 100)]
    pub calls: usize,
    /// Packets per second over all calls (open loop). 50 per call is real time.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u32,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Which sequences each call sends.
    #[arg(long, value_enum, default_value_t = Pattern::InSequence)]
    pub pattern: Pattern,
    /// Closed loop: each call sends as soon as its previous packet is answered.
    #[arg(long)]
    pub closed: bool,
    /// Bytes of `data` per packet (216 is a 20 ms frame of 8 kHz mu-law, base64), rounded up
    /// to a multiple of 4: the packets declare `encoding: mulaw`, which ingest checks is
    /// canonical base64.
    #[arg(long, default_value_t = 216)]
    pub packet_bytes: usize,
    /// Audio to send instead of the generated speech-like signal: raw 8 kHz G.711 mu-law
    /// (`sox speech.wav -r 8000 -c 1 -e mu-law -t raw speech.ul`), 160 bytes (20 ms) a packet,
    /// base64; each call starts at its own place in it and wraps around.
    #[arg(long)]
    pub audio_file: Option<std::path::PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// 0, 1, 2, ...: a clean stream.
    InSequence,
    /// 0, 2, 4, ...: every other packet lost, so every packet opens a gap.
    Lossy,
}

impl Options {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.calls >= 1, "--calls must be at least 1");
        anyhow::ensure!(self.rate >= 1, "--rate must be at least 1");
        anyhow::ensure!(
            self.duration > 0.0 && self.duration <= 3600.0,
            "--duration must be between 0 and 3600 seconds"
        );
        anyhow::ensure!(
            (1..=65_536).contains(&self.packet_bytes),
            "--packet-bytes must be between 1 and 65536"
        );
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub pattern: Pattern,
    pub calls: usize,
    /// Packets per second asked for (open loop only).
    pub rate: Option<u32>,
    pub duration_secs: f64,
    pub sent: u64,
    /// Answered 202 (stored and acknowledged by JetStream).
    pub accepted: u64,
    /// Everything else, by HTTP status (`connection` when there was no answer).
    pub errors: BTreeMap<String, u64>,
    pub throughput_per_sec: f64,
    pub latency_ms: Latency,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One call's share of the run.
struct Tally {
    histogram: Histogram<u64>,
    /// The highest sequence sent, per call (to complete the calls with their total).
    highest: Vec<(String, i64)>,
    sent: u64,
    accepted: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            // 1 µs to 10 minutes, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            highest: Vec::new(),
            sent: 0,
            accepted: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, outcome: Result<u16, String>, latency: Duration) {
        self.sent += 1;
        match outcome {
            Ok(202) => {
                self.accepted += 1;
                let micros = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                self.histogram.saturating_record(micros);
            }
            Ok(status) => *self.errors.entry(status.to_string()).or_default() += 1,
            Err(_) => *self.errors.entry("connection".into()).or_default() += 1,
        }
    }

    /// Notes that `sequence` was sent on `call` (one call per tally until they are merged).
    fn sent_to(&mut self, call: &str, sequence: i64) {
        match self.highest.last_mut() {
            Some((_, last)) => *last = (*last).max(sequence),
            None => self.highest.push((call.to_owned(), sequence)),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.histogram.add(&other.histogram).expect("same bounds");
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.highest.extend(other.highest);
        for (status, n) in other.errors {
            *self.errors.entry(status).or_default() += n;
        }
    }
}

pub async fn run(ingest: &Ingest, options: Options) -> anyhow::Result<ExitCode> {
    options.validate()?;
    let run_id = format!(
        "bench-{:x}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
    );
    let frames = match &options.audio_file {
        Some(path) => crate::audio::frames_of_file(path, options.packet_bytes)?,
        // A minute of distinct speech-like frames, each call starting at its own place.
        None => crate::audio::speech_like_frames(3_000, options.packet_bytes),
    };
    let duration = Duration::from_secs_f64(options.duration);
    let started = Instant::now();
    let tallies = join_all((0..options.calls).map(|i| {
        let call = format!("{run_id}-{i}");
        let (ingest, frames, options) = (ingest, &frames[..], &options);
        async move {
            if options.closed {
                closed_call(ingest, &call, frames, options, i, started + duration).await
            } else {
                open_call(ingest, &call, frames, options, i, started, duration).await
            }
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let mut total = Tally::new();
    for tally in tallies {
        total.merge(tally);
    }
    // Leave nothing streaming: complete the calls with their totals (not measured), a few
    // at a time (thousands of connections at once would be refused).
    let highest = std::mem::take(&mut total.highest);
    let not_completed = stream::iter(&highest)
        .map(|(call, last)| ingest.complete(call, last + 1))
        .buffer_unordered(COMPLETING_AT_ONCE)
        .filter(|result| std::future::ready(result.is_err()))
        .count()
        .await;
    if not_completed > 0 {
        eprintln!(
            "pbx bench: {not_completed} of {} calls could not be completed; the idle timeout will complete them",
            highest.len()
        );
    }
    let report = report(&options, total, elapsed);
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The `k`-th packet of a call: its sequence under the pattern.
fn sequence(pattern: Pattern, k: u64) -> i64 {
    let k = k as i64;
    match pattern {
        Pattern::InSequence => k,
        Pattern::Lossy => 2 * k,
    }
}

/// The `k`-th packet's data of call `index`: the frames in order, each call from its own start
/// (about 2 s apart).
fn frame(frames: &[String], index: usize, k: u64) -> &str {
    &frames[(index * 97 + k as usize) % frames.len()]
}

/// Open loop: call `index` of `calls` sends its `k`-th packet when packet number
/// `k * calls + index` of the whole run is due (rate-spaced from `start`), in sequence.
async fn open_call(
    ingest: &Ingest,
    call: &str,
    frames: &[String],
    options: &Options,
    index: usize,
    start: Instant,
    duration: Duration,
) -> Tally {
    let mut tally = Tally::new();
    let every = 1.0 / f64::from(options.rate);
    for k in 0u64.. {
        let due = Duration::from_secs_f64((k * options.calls as u64 + index as u64) as f64 * every);
        if due >= duration {
            break;
        }
        let due = start + due;
        tokio::time::sleep_until(due).await;
        let data = frame(frames, index, k);
        let outcome = ingest
            .send_packet(
                call,
                sequence(options.pattern, k),
                data,
                k as f64 * 0.02,
                AudioFormat::MULAW,
            )
            .await;
        tally.record(outcome, due.elapsed());
        tally.sent_to(call, sequence(options.pattern, k));
    }
    tally
}

/// Closed loop: send, wait for the answer, send the next, until `until`.
async fn closed_call(
    ingest: &Ingest,
    call: &str,
    frames: &[String],
    options: &Options,
    index: usize,
    until: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut k = 0;
    while Instant::now() < until {
        let sent = Instant::now();
        let data = frame(frames, index, k);
        let outcome = ingest
            .send_packet(
                call,
                sequence(options.pattern, k),
                data,
                k as f64 * 0.02,
                AudioFormat::MULAW,
            )
            .await;
        tally.record(outcome, sent.elapsed());
        tally.sent_to(call, sequence(options.pattern, k));
        k += 1;
    }
    tally
}

impl Latency {
    /// Percentiles of a histogram of microseconds, in milliseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        }
    }
}

fn report(options: &Options, total: Tally, elapsed: Duration) -> Report {
    Report {
        mode: if options.closed { "closed" } else { "open" },
        pattern: options.pattern,
        calls: options.calls,
        rate: (!options.closed).then_some(options.rate),
        duration_secs: elapsed.as_secs_f64(),
        sent: total.sent,
        accepted: total.accepted,
        throughput_per_sec: total.accepted as f64 / elapsed.as_secs_f64(),
        latency_ms: Latency::of(&total.histogram),
        errors: total.errors,
    }
}

fn render(r: &Report) -> String {
    let l = &r.latency_ms;
    let errors = if r.errors.is_empty() {
        "none".to_owned()
    } else {
        r.errors
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{} loop, {}, {} calls{} for {:.1} s\n\
         \x20 sent {}, accepted {} ({:.0} packets/s)\n\
         \x20 latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\n\
         \x20 errors {errors}\n",
        r.mode,
        match r.pattern {
            Pattern::InSequence => "in sequence",
            Pattern::Lossy => "lossy",
        },
        r.calls,
        r.rate
            .map(|rate| format!(" at {rate} packets/s"))
            .unwrap_or_default(),
        r.duration_secs,
        r.sent,
        r.accepted,
        r.throughput_per_sec,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_counted_only_for_accepted_packets_and_errors_by_status() {
        let mut tally = Tally::new();
        tally.record(Ok(202), Duration::from_millis(2));
        tally.record(Ok(202), Duration::from_millis(4));
        tally.record(Ok(503), Duration::from_millis(1));
        tally.record(Err("refused".into()), Duration::ZERO);
        assert_eq!((tally.sent, tally.accepted), (4, 2));
        assert_eq!(tally.errors.get("503"), Some(&1));
        assert_eq!(tally.errors.get("connection"), Some(&1));
        assert_eq!(tally.histogram.len(), 2);
        let mut other = Tally::new();
        other.record(Ok(202), Duration::from_millis(8));
        tally.merge(other);
        assert_eq!(tally.accepted, 3);
        assert!((tally.histogram.max() as i64 - 8000).abs() < 10);
    }

    #[test]
    fn the_lossy_pattern_skips_every_other_sequence() {
        let seqs: Vec<i64> = (0..4).map(|k| sequence(Pattern::Lossy, k)).collect();
        assert_eq!(seqs, [0, 2, 4, 6]);
        assert_eq!(sequence(Pattern::InSequence, 3), 3);
    }
}
