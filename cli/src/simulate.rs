//! `pbx simulate`: N realistic calls streamed through ingest with the protocol a PBX would use
//! (the JSON API, Twilio Media Streams, AudioSocket or an L16 WebSocket; see
//! [`crate::protocols`]), paced like 20 ms frames, with optional loss, duplicates, reordering,
//! duplicate streams, dropped connections and odd framing; completed (HTTP) or ended by the
//! stream itself (the media protocols), and followed on the notifier until every one is
//! ARCHIVED or FAILED; then a summary, and a check that nothing was lost: the packets each call
//! counts and reports missing, and for calls that carry audio the WAV file ingest renders,
//! sample for sample, against what was sent ([`expected`]).
//!
//! # Layout
//! - [`plan`]: each call's script, decided up front from the seed.
//! - [`expected`]: the audio ingest must end up with, and the check of what it answers.

mod expected;
mod plan;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{StreamExt, stream};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{SeedableRng, rngs::StdRng};
use serde::Serialize;
use wire::{
    CallState, MissingRange,
    audio::{AudioFormat, Encoding},
    events::StatusEvent,
    live::LiveFrame,
    media::audiosocket,
};

use crate::{
    api::Ingest,
    cli::Endpoints,
    live::Live,
    protocols::{self, Protocol, Target, http::Receipts, twilio},
    stats::Percentiles,
};
use plan::{Plan, Setup};

/// Audio problems listed in the summary (all are counted).
const PROBLEMS_LISTED: usize = 10;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Calls to stream.
    #[arg(long, default_value_t = 10)]
    pub calls: usize,
    /// Packets (20 ms frames) per call: 50 per second of audio.
    #[arg(long, default_value_t = 250)]
    pub packets: usize,
    /// Calls streaming at the same time.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Packets per second per call: 50 is real time (20 ms frames); 0 is as fast as possible.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// How the calls are streamed: the JSON API, Twilio Media Streams, Asterisk AudioSocket
    /// (TCP) or an L16 WebSocket (jambonz `listen`, FreeSWITCH `mod_audio_fork`).
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// HTTP only: send audio in this encoding (mulaw, alaw or slin), base64 in `data` and
    /// declared on every packet, instead of the words of a sentence.
    #[arg(long, value_parser = parse_encoding)]
    pub encoding: Option<Encoding>,
    /// Samples a second of linear PCM (audiosocket, l16, http with --encoding slin); 8000
    /// when not given. AudioSocket has kinds for 8000, 12000, 16000, 24000, 32000, 44100,
    /// 48000, 96000 and 192000.
    #[arg(long)]
    pub sample_rate: Option<u32>,
    /// Probability that a packet is lost (never sent).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Probability that a packet is sent twice (on the same stream).
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Probability that a packet is sent after the one that follows it.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// Probability that a call is streamed twice at once, on a second connection sending the
    /// same frames, as PBXs sometimes do (twilio, audiosocket, l16).
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_stream: f64,
    /// Probability that a call's connection is dropped mid-call, after its first frame, with
    /// no stop, hangup or close frame (twilio, audiosocket, l16).
    #[arg(long, default_value_t = 0.0)]
    pub disconnect: f64,
    /// Cut the audio byte stream into frames of random sizes (1-1000 bytes, odd ones
    /// included) instead of 20 ms frames (audiosocket, l16).
    #[arg(long)]
    pub odd_frames: bool,
    /// The AudioSocket listener ingest runs for the tenant (host:port).
    #[arg(long, env = "PBX_AUDIOSOCKET_ADDR", default_value = "127.0.0.1:9092")]
    pub audiosocket_addr: String,
    /// Write the audio each call must end up with in ingest to `<DIR>/<call id>.wav`.
    #[arg(long, value_name = "DIR")]
    pub save_audio: Option<PathBuf>,
    /// How long to wait for every call to reach ARCHIVED or FAILED, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// The first sequence number: 0, or 1 for an ingest run with `SEQUENCE_START=1` (as a
    /// PBX that counts from 1 would send). HTTP only.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1))]
    pub sequence_start: i64,
    /// Seed for the calls' content, losses, duplicates and reordering (the Twilio and
    /// AudioSocket call ids also depend on the id prefix, so runs do not collide).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of the call ids (default: `sim-<unix time>`).
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_encoding(s: &str) -> Result<Encoding, String> {
    Encoding::parse(s).ok_or_else(|| format!("expected mulaw, alaw, slin or text, got {s:?}"))
}

impl Options {
    /// The options checked, as the plans use them.
    fn setup(&self) -> anyhow::Result<Setup> {
        for (name, p) in [
            ("--loss", self.loss),
            ("--duplicates", self.duplicates),
            ("--reorder", self.reorder),
            ("--duplicate-stream", self.duplicate_stream),
            ("--disconnect", self.disconnect),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "{name} must be a probability between 0 and 1, got {p}"
            );
        }
        anyhow::ensure!(self.calls >= 1, "--calls must be at least 1");
        anyhow::ensure!(self.packets >= 1, "--packets must be at least 1");
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        let media = self.protocol.is_media();
        anyhow::ensure!(
            media || (self.duplicate_stream == 0.0 && self.disconnect == 0.0),
            "--duplicate-stream and --disconnect need a streaming --protocol (twilio, audiosocket or l16)"
        );
        anyhow::ensure!(
            !self.odd_frames || self.protocol.is_byte_stream(),
            "--odd-frames needs --protocol audiosocket or l16 (the others carry whole frames)"
        );
        anyhow::ensure!(
            !media || (self.encoding.is_none() && self.sequence_start == 0),
            "--encoding and --sequence-start apply to --protocol http (Twilio is mulaw, \
             AudioSocket and L16 are slin, each numbered its own way)"
        );
        let format = self.format()?;
        anyhow::ensure!(
            self.save_audio.is_none() || format.is_sound(),
            "--save-audio needs calls with audio: a streaming --protocol, or --encoding"
        );
        Ok(Setup {
            protocol: self.protocol,
            format,
            packets: self.packets,
            first: match self.protocol {
                Protocol::Http => self.sequence_start,
                Protocol::Twilio => 1,
                Protocol::Audiosocket | Protocol::L16 => 0,
            },
            loss: self.loss,
            duplicates: self.duplicates,
            reorder: self.reorder,
            duplicate_stream: self.duplicate_stream,
            disconnect: self.disconnect,
            odd_frames: self.odd_frames,
        })
    }

    /// The calls' audio format: the protocol's, or for HTTP `--encoding` (text by default).
    fn format(&self) -> anyhow::Result<AudioFormat> {
        let pcm_rate = Some(self.sample_rate.unwrap_or(8_000));
        let format = match self.protocol {
            Protocol::Http => match self.encoding.unwrap_or(Encoding::Text) {
                Encoding::Slin => AudioFormat::new(Encoding::Slin, pcm_rate),
                encoding => AudioFormat::new(encoding, self.sample_rate),
            },
            Protocol::Twilio => AudioFormat::new(Encoding::Mulaw, self.sample_rate),
            Protocol::Audiosocket | Protocol::L16 => AudioFormat::new(Encoding::Slin, pcm_rate),
        }
        .map_err(|e| anyhow::anyhow!("--sample-rate for --protocol {}: {e}", self.protocol))?;
        if self.protocol == Protocol::Audiosocket {
            let rate = format.sample_rate().unwrap_or_default();
            anyhow::ensure!(
                audiosocket::audio_kind(rate).is_some(),
                "AudioSocket has no audio kind for --sample-rate {rate}: use 8000, 12000, \
                 16000, 24000, 32000, 44100, 48000, 96000 or 192000"
            );
        }
        Ok(format)
    }
}

/// What the notifier told us about a call.
#[derive(Debug, Clone)]
struct Final {
    state: CallState,
    attempts: i64,
    seen_at: Instant,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub protocol: Protocol,
    pub calls: usize,
    pub final_states: BTreeMap<String, usize>,
    pub unfinished: usize,
    pub packets_planned: u64,
    /// HTTP: requests sent. Media protocols: frames sent on each call's first connection.
    pub packets_sent: u64,
    /// HTTP: packets ingest answered as stored. Twilio: the distinct chunks sent (which the
    /// call must count). AudioSocket, L16: 0 (no receipts; their audio is checked instead).
    pub packets_accepted: u64,
    /// HTTP only: packets ingest answered as already stored.
    pub duplicates_reported: u64,
    pub packets_dropped_by_simulator: u64,
    /// HTTP only: each packet's request to its answer.
    pub ingest_latency: Percentiles,
    /// From the call's completion (HTTP) or its stream's end to ARCHIVED or FAILED.
    pub completion_to_final: Percentiles,
    pub attempts: BTreeMap<i64, usize>,
    /// Packets accepted (above) that the call does not count.
    pub lost_packets: i64,
    /// Calls whose reported missing sequences differ from what was dropped (HTTP), from the
    /// chunks never sent below the highest sent (Twilio), or are not none (byte streams).
    pub missing_mismatches: usize,
    /// Calls with audio whose WAV file was fetched from ingest and compared.
    pub audio_checked: usize,
    /// Of those, calls whose audio is not exactly what was sent (or could not be fetched).
    pub audio_mismatches: usize,
    /// The first few of those, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audio_problems: Vec<String>,
    pub duration_secs: f64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.unfinished == 0
            && self.lost_packets == 0
            && self.missing_mismatches == 0
            && self.audio_mismatches == 0
    }
}

pub async fn run(
    ingest: &Ingest,
    endpoints: &Endpoints,
    options: Options,
) -> anyhow::Result<ExitCode> {
    let setup = options.setup()?;
    let started = Instant::now();
    let seed = options.seed.unwrap_or_else(rand::random);
    let (plans, account_sid) = plan_all(&options, &setup, seed);
    if let Some(dir) = &options.save_audio {
        save_audio(dir, &plans, &setup)?;
    }
    let target = Target::new(
        ingest.base(),
        ingest.stream_key(),
        &options.audiosocket_addr,
        account_sid,
    );

    // Follow the notifier first, so no change is missed.
    let finals: Arc<Mutex<HashMap<String, Final>>> = Arc::default();
    let mut live = Live::new(&endpoints.notifier_url, endpoints.credentials().read);
    let ids: Vec<String> = plans.iter().map(|p| p.call_id.clone()).collect();
    live.connect(&ids).await?;
    let to_send = plans.iter().map(|p| p.units_sent(&setup)).sum();
    let (packets_bar, calls_bar) = progress_bars(to_send, options.calls as u64, options.json);
    let follower = follow(
        live,
        ids.into_iter().collect(),
        finals.clone(),
        calls_bar.clone(),
    );
    let calls = stream_all(ingest, &target, &plans, &setup, &options, &packets_bar).await?;

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
    let mut summary = summarise(ingest, &plans, &setup, &calls, &finals).await?;
    check_audio(ingest, &plans, &setup, options.concurrency, &mut summary).await;
    summary.duration_secs = started.elapsed().as_secs_f64();
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

/// Every call's script, and the Twilio account they belong to. Content and mishaps come from
/// the seed alone; the ids (Twilio's sids, AudioSocket's UUIDs) from the seed and the id
/// prefix, so a run repeated with the same seed streams new calls, not ones already over.
fn plan_all(options: &Options, setup: &Setup, seed: u64) -> (Vec<Plan>, String) {
    let prefix = options.id_prefix.clone().unwrap_or_else(|| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        format!("sim-{now}")
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = StdRng::seed_from_u64(seed ^ fnv1a(prefix.as_bytes()));
    let account_sid = twilio::sid("AC", &mut ids);
    let call_ids = plan::call_ids(setup.protocol, &prefix, options.calls, &mut ids);
    let plans = call_ids
        .into_iter()
        .map(|call_id| plan::plan(call_id, setup, &mut rng, &mut ids))
        .collect();
    (plans, account_sid)
}

/// FNV-1a: a hash that is the same in every build (std's may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes each call's expected audio to `<dir>/<call id>.wav`.
fn save_audio(dir: &Path, plans: &[Plan], setup: &Setup) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for plan in plans {
        let Some(audio) = expected::expected(plan, setup) else {
            continue;
        };
        let path = dir.join(format!("{}.wav", plan.call_id));
        let wav = wire::audio::wav(&audio.samples, audio.rate)
            .with_context(|| format!("{} is too long for a WAV file", plan.call_id))?;
        std::fs::write(&path, wav).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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

/// Records every final state the notifier reports for the run's calls (`ids`: Twilio's call
/// sids and AudioSocket's UUIDs share no prefix), reconnecting (and resuming) when the
/// connection drops; ends if it cannot reconnect for a minute.
fn follow(
    mut live: Live,
    ids: HashSet<String>,
    finals: Arc<Mutex<HashMap<String, Final>>>,
    calls_bar: ProgressBar,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match live.next().await {
                Some(frame) => record(&frame, &ids, &finals, &calls_bar),
                None => {
                    if live.reconnect(Duration::from_secs(60)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

fn record(
    frame: &LiveFrame,
    ids: &HashSet<String>,
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
        if !ids.contains(id) {
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

/// What each call's streaming did, by call id.
type Streamed = HashMap<String, Receipts>;

/// Streams every planned call, `--concurrency` at a time.
async fn stream_all(
    ingest: &Ingest,
    target: &Target,
    plans: &[Plan],
    setup: &Setup,
    options: &Options,
    packets_bar: &ProgressBar,
) -> anyhow::Result<Streamed> {
    let period = (options.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(options.rate)));
    let results: Vec<(String, anyhow::Result<Receipts>)> = stream::iter(plans)
        .map(|plan| async move {
            let result = stream_call(ingest, target, plan, setup, period, packets_bar).await;
            (plan.call_id.clone(), result)
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    packets_bar.finish();
    let mut calls = HashMap::new();
    for (call_id, result) in results {
        calls.insert(call_id, result?);
    }
    Ok(calls)
}

/// One call, through the HTTP API (completed at the end) or a media protocol (whose end, or
/// dropped connection, ends the call on the server).
async fn stream_call(
    ingest: &Ingest,
    target: &Target,
    plan: &Plan,
    setup: &Setup,
    period: Option<Duration>,
    bar: &ProgressBar,
) -> anyhow::Result<Receipts> {
    if setup.protocol == Protocol::Http {
        let packets = plan.http_packets(setup);
        let total = setup.packets as i64;
        return protocols::http::stream_call(
            ingest,
            &plan.call_id,
            &packets,
            setup.format,
            period,
            total,
            bar,
        )
        .await;
    }
    let sent = protocols::send(setup.protocol, target, &plan.stream(setup), period, bar)
        .await
        .with_context(|| format!("streaming {} over {}", plan.call_id, setup.protocol))?;
    Ok(Receipts {
        accepted: match setup.protocol {
            Protocol::Twilio => plan.chunks_sent(),
            _ => BTreeSet::new(),
        },
        sent: sent.units as u64,
        completed_at: Some(sent.ended_at),
        ..Receipts::default()
    })
}

/// Checks every call against what ingest stored, and adds it all up.
async fn summarise(
    ingest: &Ingest,
    plans: &[Plan],
    setup: &Setup,
    calls: &Streamed,
    finals: &HashMap<String, Final>,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        protocol: setup.protocol,
        calls: plans.len(),
        ..Summary::default()
    };
    let mut latencies = Vec::new();
    let mut completion = Vec::new();
    for plan in plans {
        let result = &calls[&plan.call_id];
        summary.packets_planned += (plan.sends.len() + plan.dropped.len()) as u64;
        summary.packets_dropped_by_simulator += plan.dropped.len() as u64;
        summary.packets_sent += result.sent;
        summary.packets_accepted += result.accepted.len() as u64;
        summary.duplicates_reported += result.duplicates_reported;
        latencies.extend_from_slice(&result.latencies);
        match finals.get(&plan.call_id) {
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
            .call(&plan.call_id)
            .await
            .with_context(|| format!("reading back {}", plan.call_id))?;
        let received = stored.call.packets_received;
        summary.lost_packets += (result.accepted.len() as i64 - received).max(0);
        if missing_sequences(&stored.missing) != plan.expected_missing(setup) {
            summary.missing_mismatches += 1;
        }
    }
    summary.ingest_latency = Percentiles::of(&latencies);
    summary.completion_to_final = Percentiles::of(&completion);
    Ok(summary)
}

/// Fetches each audio call's WAV file from ingest and compares it, sample for sample, with
/// what was sent.
async fn check_audio(
    ingest: &Ingest,
    plans: &[Plan],
    setup: &Setup,
    concurrency: usize,
    summary: &mut Summary,
) {
    if !setup.format.is_sound() {
        return;
    }
    let mut problems: Vec<String> = stream::iter(plans)
        .map(|plan| async move {
            let expected = expected::expected(plan, setup)?;
            let outcome = match ingest.audio_wav(&plan.call_id).await {
                Ok(wav) => expected::check(&expected, &wav),
                Err(e) => Err(format!("{e:#}")),
            };
            outcome.err().map(|why| format!("{}: {why}", plan.call_id))
        })
        .buffer_unordered(concurrency)
        .filter_map(std::future::ready)
        .collect()
        .await;
    problems.sort();
    summary.audio_checked = plans.len();
    summary.audio_mismatches = problems.len();
    problems.truncate(PROBLEMS_LISTED);
    summary.audio_problems = problems;
}

fn missing_sequences(missing: &[MissingRange]) -> BTreeSet<i64> {
    missing.iter().flat_map(|r| r.from..=r.to).collect()
}

fn render(s: &Summary, seed: u64) -> String {
    let listed = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let states = listed(
        s.final_states
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect(),
    );
    let attempts = listed(
        s.attempts
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect(),
    );
    let unfinished = if s.unfinished > 0 {
        format!(", {} unfinished", s.unfinished)
    } else {
        String::new()
    };
    // Only the JSON API answers each packet; a media stream's frames get no answer of their own.
    let latency = if s.protocol == Protocol::Http {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.ingest_latency.p50_ms, s.ingest_latency.p99_ms, s.ingest_latency.max_ms
        )
    } else {
        "none to measure: a stream's frames get no answer (see audio below)".to_owned()
    };
    let mut out = format!(
        "\nSimulated {} {} calls in {:.1} s (seed {seed})\n\
         \x20 final states         {states}{unfinished}\n\
         \x20 packets              {} planned, {} dropped by the simulator, {} sent, {} accepted, {} reported duplicate\n\
         \x20 ingest latency       {latency}\n\
         \x20 completion -> final  p50 {:.2} s, p99 {:.2} s\n\
         \x20 AI attempts          {attempts}\n\
         \x20 lost                 {} packets; {} calls whose missing ranges differ from what was dropped\n",
        s.calls,
        s.protocol.as_str(),
        s.duration_secs,
        s.packets_planned,
        s.packets_dropped_by_simulator,
        s.packets_sent,
        s.packets_accepted,
        s.duplicates_reported,
        s.completion_to_final.p50_ms / 1e3,
        s.completion_to_final.p99_ms / 1e3,
        s.lost_packets,
        s.missing_mismatches,
    );
    if s.audio_checked > 0 {
        out.push_str(&format!(
            "  audio                {} calls checked, {} differ from what was sent\n",
            s.audio_checked, s.audio_mismatches
        ));
        for problem in &s.audio_problems {
            out.push_str(&format!("    {problem}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        options: Options,
    }

    fn options(args: &[&str]) -> Options {
        Command::try_parse_from(std::iter::once("simulate").chain(args.iter().copied()))
            .unwrap()
            .options
    }

    #[test]
    fn http_is_text_by_default_and_audio_when_asked() {
        let text = options(&[]).setup().unwrap();
        assert_eq!(
            (text.protocol, text.format),
            (Protocol::Http, AudioFormat::TEXT)
        );
        let slin = options(&["--encoding", "slin", "--sample-rate", "16000"]);
        assert_eq!(
            slin.setup().unwrap().format,
            AudioFormat::slin(16_000).unwrap()
        );
        let mulaw = options(&["--encoding", "mulaw"]).setup().unwrap();
        assert_eq!(mulaw.format, AudioFormat::MULAW);
        assert!(
            options(&["--encoding", "mulaw", "--sample-rate", "16000"])
                .setup()
                .is_err()
        );
        assert!(
            options(&["--sample-rate", "16000"]).setup().is_err(),
            "text has no rate"
        );
    }

    #[test]
    fn each_media_protocol_has_its_format_and_numbering() {
        let twilio = options(&["--protocol", "twilio"]).setup().unwrap();
        assert_eq!((twilio.format, twilio.first), (AudioFormat::MULAW, 1));
        let l16 = options(&["--protocol", "l16", "--sample-rate", "11025"])
            .setup()
            .unwrap();
        assert_eq!(
            (l16.format, l16.first),
            (AudioFormat::slin(11_025).unwrap(), 0)
        );
        let socket = options(&["--protocol", "audiosocket", "--sample-rate", "44100"]);
        assert_eq!(
            socket.setup().unwrap().format,
            AudioFormat::slin(44_100).unwrap()
        );
        let refused: &[&[&str]] = &[
            &["--protocol", "audiosocket", "--sample-rate", "11025"],
            &["--protocol", "twilio", "--sample-rate", "16000"],
            &["--protocol", "twilio", "--odd-frames"],
            &["--protocol", "twilio", "--encoding", "slin"],
            &["--protocol", "l16", "--sequence-start", "1"],
            &["--disconnect", "0.1"],
            &["--duplicate-stream", "0.1"],
            &["--save-audio", "/tmp/x"],
            &["--protocol", "l16", "--disconnect", "1.5"],
        ];
        for args in refused {
            assert!(options(args).setup().is_err(), "{args:?}");
        }
    }

    #[test]
    fn call_ids_are_twilio_sids_uuids_or_the_prefix_and_differ_by_prefix() {
        let mut o = options(&["--protocol", "twilio", "--calls", "3", "--seed", "1"]);
        o.id_prefix = Some("a".into());
        let (twilio_a, account) = plan_all(&o, &o.setup().unwrap(), 1);
        assert!(account.starts_with("AC") && account.len() == 34);
        assert!(twilio_a.iter().all(|p| p.call_id.starts_with("CA")));
        assert!(
            twilio_a
                .iter()
                .all(|p| p.media.stream_sids[0].starts_with("MZ"))
        );
        o.id_prefix = Some("b".into());
        let (twilio_b, _) = plan_all(&o, &o.setup().unwrap(), 1);
        assert_ne!(twilio_a[0].call_id, twilio_b[0].call_id);
        assert_eq!(
            twilio_a[0].sends, twilio_b[0].sends,
            "the content is the seed's"
        );
        o.protocol = Protocol::Audiosocket;
        let (socket, _) = plan_all(&o, &o.setup().unwrap(), 1);
        assert!(socket.iter().all(|p| p.call_id.len() == 36));
        o.protocol = Protocol::L16;
        let (l16, _) = plan_all(&o, &o.setup().unwrap(), 1);
        assert_eq!(l16[2].call_id, "b-2");
    }

    #[test]
    fn saved_audio_is_one_wav_file_a_call_named_by_its_id() {
        let o = options(&["--protocol", "l16", "--calls", "2", "--packets", "5"]);
        let setup = o.setup().unwrap();
        let (plans, _) = plan_all(&o, &setup, 3);
        let dir = std::env::temp_dir().join(format!("pbx-save-audio-{}", std::process::id()));
        save_audio(&dir, &plans, &setup).unwrap();
        for plan in &plans {
            let wav = std::fs::read(dir.join(format!("{}.wav", plan.call_id))).unwrap();
            let (rate, samples) = wire::audio::parse_wav(&wav).unwrap();
            assert_eq!((rate, samples.len()), (8_000, 5 * 160));
        }
        std::fs::remove_dir_all(dir).ok();
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
