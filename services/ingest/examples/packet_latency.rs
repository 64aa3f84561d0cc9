//! Measures ingest's packet latency and throughput against a running ingest
//! (`./scripts/up` first). Results go in `docs/benchmarks.md`.
//!
//! ```text
//! cargo run --release -p ingest --example packet_latency -- [URL] [REQUESTS] [CONCURRENCY]
//! ```
//! With concurrency 1 the requests are sequential (one packet in flight: the latency a
//! single PBX stream sees); with more, each worker streams its own call, like many calls at once.

use std::time::{Duration, Instant};

use futures::future::join_all;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let requests: usize = args.next().map_or(Ok(5000), |s| s.parse())?;
    let concurrency: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    common::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let run = common_suffix();
    let per_worker = requests / concurrency;
    // 160 bytes: one 20 ms frame of 8 kHz mu-law, base64-encoded is ~216 characters.
    let data = "A".repeat(216);

    let started = Instant::now();
    let workers = (0..concurrency).map(|w| {
        let client = client.clone();
        let url = url.clone();
        let data = data.clone();
        let call = format!("bench-{run}-{w}");
        async move {
            let mut latencies = Vec::with_capacity(per_worker);
            for seq in 0..per_worker {
                let body = serde_json::json!({"sequence": seq, "data": data, "timestamp": seq as f64 * 0.02});
                let t = Instant::now();
                let response = client
                    .post(format!("{url}/v1/call/stream/{call}"))
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 202, "got {}", response.status());
                latencies.push(t.elapsed());
            }
            client.post(format!("{url}/v1/call/{call}/complete")).send().await?;
            anyhow::Ok(latencies)
        }
    });
    let mut latencies: Vec<Duration> = Vec::with_capacity(requests);
    for result in join_all(workers).await {
        latencies.extend(result?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{} packets, concurrency {concurrency}: {:.0} packets/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    Ok(())
}

fn common_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}
