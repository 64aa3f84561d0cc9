//! Does a very lossy call slow the others down? Streams a clean call (sequential, like one PBX
//! stream) beside a lossy call that sends every other sequence, twice: first with the lossy
//! call fresh, then after it has accumulated GAPS gaps. The clean call's latency should not
//! move. Against a running ingest (`./scripts/up` first); results go in `docs/benchmarks.md`.
//!
//! ```text
//! cargo run --release -p ingest --example gap_isolation -- [URL] [GAPS] [PACKETS]
//! ```

use std::time::{Duration, Instant};

use futures::future::join_all;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let gaps: i64 = args.next().map_or(Ok(100_000), |s| s.parse())?;
    let packets: usize = args.next().map_or(Ok(3_000), |s| s.parse())?;
    common::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let data = "A".repeat(216);
    let send = |call: String, seq: i64| {
        let (client, url, data) = (client.clone(), url.clone(), data.clone());
        async move {
            let body =
                serde_json::json!({"sequence": seq, "data": data, "timestamp": seq as f64 * 0.02});
            let started = Instant::now();
            let response = client
                .post(format!("{url}/v1/call/stream/{call}"))
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(response.status() == 202, "got {}", response.status());
            anyhow::Ok(started.elapsed())
        }
    };
    // One stream, in order (clean), or every other sequence from `from` (lossy).
    let stream = |call: String, from: i64, step: i64, count: usize| {
        let send = &send;
        async move {
            let mut latencies = Vec::with_capacity(count);
            for i in 0..count as i64 {
                latencies.push(send(call.clone(), from + i * step).await?);
            }
            anyhow::Ok(latencies)
        }
    };

    for (label, lossy_gaps) in [("lossy call fresh", 0), ("lossy call with gaps", gaps)] {
        let lossy = format!("lossy-{run}-{lossy_gaps}");
        // Build the gaps first, 64 streams at once (every other sequence: one gap each).
        let started = Instant::now();
        for chunk in (0..lossy_gaps).collect::<Vec<_>>().chunks(64 * 100) {
            join_all(chunk.chunks(100).map(|part| {
                let (lossy, part) = (lossy.clone(), part.to_vec());
                async move {
                    for g in part {
                        send(lossy.clone(), 2 * g + 1).await?;
                    }
                    anyhow::Ok(())
                }
            }))
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        }
        if lossy_gaps > 0 {
            println!(
                "built {lossy_gaps} gaps in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let clean = format!("clean-{run}-{lossy_gaps}");
        let (clean_latencies, lossy_latencies) = tokio::try_join!(
            stream(clean, 0, 1, packets),
            stream(lossy.clone(), 2 * lossy_gaps + 1, 2, packets),
        )?;
        println!(
            "{label}: clean call {}; lossy call {}",
            summary(clean_latencies),
            summary(lossy_latencies)
        );
    }
    Ok(())
}

fn summary(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    )
}
