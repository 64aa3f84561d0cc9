//! `pbx bench-live`: the notifier's fan-out, measured from outside.
//!
//! Opens `--sockets` WebSockets on the notifier (through the same [`Live`] client `pbx watch`
//! uses, so the URLs are the real ones), each following the run's `--events` calls. Once every
//! socket has its snapshot, it starts the calls one at a time through ingest: each first packet
//! makes one status event, which the notifier fans out to every socket. A socket's latency is
//! from just before the packet is sent to the moment it has parsed the event, so it includes
//! ingest's commit, the JetStream round trip and the hub. The next event waits until every
//! socket has the previous one (or `--timeout` passes, and the missing are counted).

use std::{process::ExitCode, time::Duration};

use futures::{StreamExt, stream};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use wire::live::LiveFrame;

use crate::{api::Ingest, cli::Endpoints, live::Live};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// WebSockets to open (each needs a file descriptor here and on the notifier: raise
    /// `ulimit -n` for more than about a thousand).
    #[arg(long, default_value_t = 1_000)]
    pub sockets: usize,
    /// Events to fan out, one after another (each a new call's first status event).
    #[arg(long, default_value_t = 5)]
    pub events: usize,
    /// Sockets connecting at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// How long to wait for every socket to receive one event, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub sockets: usize,
    pub events: usize,
    /// Seconds to open every socket and receive its snapshot.
    pub connect_secs: f64,
    /// Deliveries expected (`sockets × events`) and received.
    pub expected: u64,
    pub delivered: u64,
    pub latency_ms: crate::bench::Latency,
    /// Each event's own percentiles, in order.
    pub per_event: Vec<crate::bench::Latency>,
}

pub async fn run(
    ingest: &Ingest,
    endpoints: &Endpoints,
    options: Options,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(options.sockets >= 1, "--sockets must be at least 1");
    anyhow::ensure!(
        (1..=50).contains(&options.events),
        "--events must be between 1 and 50 (every socket follows each event's call by id)"
    );
    let run_id = format!(
        "fanout-{:x}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
    );
    let calls: Vec<String> = (0..options.events)
        .map(|i| format!("{run_id}-{i}"))
        .collect();
    let (received_tx, received) = mpsc::unbounded_channel::<(usize, Instant)>();

    let connecting = Instant::now();
    let opened: Vec<anyhow::Result<Live>> = stream::iter(0..options.sockets)
        .map(|_| {
            open(
                &endpoints.notifier_url,
                endpoints.credentials().read,
                &calls,
            )
        })
        .buffer_unordered(options.connect_concurrency.max(1))
        .collect()
        .await;
    let connect_secs = connecting.elapsed().as_secs_f64();
    let mut readers = Vec::with_capacity(opened.len());
    for live in opened {
        readers.push(tokio::spawn(follow(
            live?,
            calls.clone(),
            received_tx.clone(),
        )));
    }
    drop(received_tx);

    let measured = fan_out(ingest, &calls, &options, received).await;
    for reader in readers {
        reader.abort();
    }
    let (histogram, delivered, per_event) = measured?;
    let report = Report {
        sockets: options.sockets,
        events: options.events,
        connect_secs,
        expected: (options.sockets * options.events) as u64,
        delivered,
        latency_ms: crate::bench::Latency::of(&histogram),
        per_event,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.delivered == report.expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Starts each call through ingest in turn and collects its deliveries: every latency, how
/// many arrived, and each event's own percentiles.
async fn fan_out(
    ingest: &Ingest,
    calls: &[String],
    options: &Options,
    mut received: mpsc::UnboundedReceiver<(usize, Instant)>,
) -> anyhow::Result<(Histogram<u64>, u64, Vec<crate::bench::Latency>)> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut delivered = 0u64;
    let mut per_event = Vec::with_capacity(calls.len());
    let timeout = Duration::from_secs_f64(options.timeout);
    for (event, call) in calls.iter().enumerate() {
        let mut this_event = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let sent = Instant::now();
        let status = ingest
            .send_packet(call, 0, "AAAA", 0.0, wire::audio::AudioFormat::TEXT)
            .await;
        anyhow::ensure!(
            status == Ok(202),
            "starting {call} through ingest: {status:?}"
        );
        let deadline = sent + timeout;
        let mut got = 0;
        while got < options.sockets {
            match tokio::time::timeout_at(deadline, received.recv()).await {
                Ok(Some((index, at))) if index == event => {
                    got += 1;
                    let micros = (at - sent).as_micros().max(1) as u64;
                    histogram.saturating_record(micros);
                    this_event.saturating_record(micros);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        delivered += got as u64;
        per_event.push(crate::bench::Latency::of(&this_event));
        ingest.complete(call, 1).await.ok();
    }
    Ok((histogram, delivered, per_event))
}

fn render(report: &Report) -> String {
    let l = &report.latency_ms;
    format!(
        "{} sockets (opened in {:.1} s), {} events: delivered {} of {}\n  \
         latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\n",
        report.sockets,
        report.connect_secs,
        report.events,
        report.delivered,
        report.expected,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max
    )
}

/// One socket following `calls`, once its snapshot is complete.
async fn open(notifier_url: &str, key: Option<String>, calls: &[String]) -> anyhow::Result<Live> {
    let mut live = Live::new(notifier_url, key);
    live.connect(calls).await?;
    loop {
        match live.next().await {
            Some(LiveFrame::Snapshot(s)) if !s.more => return Ok(live),
            Some(LiveFrame::SnapshotPage(p)) if !p.more => return Ok(live),
            Some(LiveFrame::Error { message }) => {
                anyhow::bail!("the notifier refused a socket: {message}")
            }
            Some(_) => {}
            None => anyhow::bail!("the notifier closed a socket before its snapshot"),
        }
    }
}

/// Reports, for each call's first status event, which call it was and when it arrived.
async fn follow(
    mut live: Live,
    calls: Vec<String>,
    received: mpsc::UnboundedSender<(usize, Instant)>,
) {
    let mut seen = vec![false; calls.len()];
    while let Some(frame) = live.next().await {
        let LiveFrame::Status(status) = frame else {
            continue;
        };
        let at = Instant::now();
        let Some(index) = calls
            .iter()
            .position(|c| c == status.event.call_id.as_str())
        else {
            continue;
        };
        if !std::mem::replace(&mut seen[index], true) && received.send((index, at)).is_err() {
            return;
        }
    }
}
