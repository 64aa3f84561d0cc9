//! The floors a packet's path stands on, measured on this machine: how fast Postgres and
//! JetStream take data when nothing but the data is in the way. `scripts/bench` runs it and
//! divides each stage's figure by its floor.
//!
//! ```text
//! cargo run --release -p ingest --example floors -- [--seconds S] [--json]
//! ```
//! Reads `DATABASE_URL` and `NATS_URL`. Everything it makes (one table, one stream, both named
//! after the process id) is removed at the end.
//!
//! - **Postgres, `INSERT … SELECT FROM UNNEST`, 1,000 rows a transaction**: rows shaped like
//!   `packets` (primary key, 216-byte `data`), one connection, each batch committed
//!   (`synchronous_commit` as configured). The most a set-based writer can hope for.
//! - **Postgres, one row a commit, 16 connections**: commits a second, what a writer without
//!   batching gets (and what bounds the transcriber, which commits per call).
//! - **JetStream, 256 publishes in flight**: 350-byte messages (a packet event's size) with a
//!   `Nats-Msg-Id` each, to a file-backed stream with a duplicate window, as ingest publishes.
//! - **JetStream, one publish at a time**: each acknowledged before the next is sent.

use std::time::{Duration, Instant};

use async_nats::{
    HeaderMap,
    jetstream::{self, stream},
};
use futures::{StreamExt, stream::FuturesUnordered};
use serde::Serialize;
use sqlx::PgPool;

/// Rows per `UNNEST` batch.
const BATCH_ROWS: usize = 1_000;
/// Connections committing single rows side by side.
const COMMITTERS: usize = 16;
/// JetStream publishes kept in flight.
const IN_FLIGHT: usize = 256;

#[derive(Debug, Serialize)]
struct Floors {
    postgres_unnest_rows_per_sec: f64,
    postgres_single_row_commits_per_sec: f64,
    postgres_single_row_commit_connections: usize,
    jetstream_pipelined_publishes_per_sec: f64,
    jetstream_sequential_publishes_per_sec: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut seconds = 5.0;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().unwrap_or_default().parse()?,
            "--json" => json = true,
            other => anyhow::bail!("unknown argument {other:?} (use --seconds S, --json)"),
        }
    }
    let per_floor = Duration::from_secs_f64(seconds);
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let pool = common::db::connect(&database_url, COMMITTERS as u32).await?;
    let client = common::nats::connect(&nats_url, "switchboard-floors").await?;
    let js = common::nats::jetstream(client);
    let tag = std::process::id();

    let floors = Floors {
        postgres_unnest_rows_per_sec: postgres_floor(&pool, tag, per_floor, BATCH_ROWS, 1).await?,
        postgres_single_row_commits_per_sec: postgres_floor(&pool, tag, per_floor, 1, COMMITTERS)
            .await?,
        postgres_single_row_commit_connections: COMMITTERS,
        jetstream_pipelined_publishes_per_sec: jetstream_floor(&js, tag, per_floor, IN_FLIGHT)
            .await?,
        jetstream_sequential_publishes_per_sec: jetstream_floor(&js, tag, per_floor, 1).await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&floors)?);
    } else {
        println!("{floors:#?}");
    }
    Ok(())
}

/// Rows a second into a fresh `packets`-shaped table, `batch` rows a transaction, from
/// `writers` connections at once.
async fn postgres_floor(
    pool: &PgPool,
    tag: u32,
    duration: Duration,
    batch: usize,
    writers: usize,
) -> anyhow::Result<f64> {
    let table = format!("floor_packets_{tag}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (call_id text NOT NULL, sequence int8 NOT NULL, data text NOT NULL, \
         sent_at float8 NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), \
         PRIMARY KEY (call_id, sequence))"
    )))
    .execute(pool)
    .await?;
    let insert = format!(
        "INSERT INTO {table} (call_id, sequence, data, sent_at) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::float8[])"
    );
    let started = Instant::now();
    let counts = futures::future::try_join_all((0..writers).map(|writer| {
        let (insert, pool) = (insert.clone(), pool.clone());
        async move {
            let data = vec!["A".repeat(216); batch];
            let sent = vec![0.0f64; batch];
            let mut rows = 0usize;
            while started.elapsed() < duration {
                // 50 calls per writer, each in sequence: the shape of live traffic.
                let calls: Vec<String> = (rows..rows + batch)
                    .map(|i| format!("call-{writer}-{}", i % 50))
                    .collect();
                let seqs: Vec<i64> = (rows..rows + batch).map(|i| (i / 50) as i64).collect();
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .bind(&calls)
                    .bind(&seqs)
                    .bind(&data)
                    .bind(&sent)
                    .execute(&pool)
                    .await?;
                rows += batch;
            }
            anyhow::Ok(rows)
        }
    }))
    .await?;
    let rate = counts.iter().sum::<usize>() as f64 / started.elapsed().as_secs_f64();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await?;
    Ok(rate)
}

/// Acknowledged publishes a second with `in_flight` outstanding at once.
async fn jetstream_floor(
    js: &jetstream::Context,
    tag: u32,
    duration: Duration,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let name = format!("FLOOR_{tag}");
    let subject = format!("floor{tag}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{subject}.>")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from("A".repeat(350));
    let publish = |n: usize| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("floor-{n}").as_str());
        let (js, payload) = (js.clone(), payload.clone());
        let subject = format!("{subject}.call-{}", n % 50);
        async move {
            js.publish_with_headers(subject, headers, payload)
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    let mut pending = FuturesUnordered::new();
    let mut sent = 0;
    let mut acked = 0;
    let started = Instant::now();
    while started.elapsed() < duration {
        while pending.len() < in_flight {
            pending.push(publish(sent));
            sent += 1;
        }
        if let Some(result) = pending.next().await {
            result?;
            acked += 1;
        }
    }
    while let Some(result) = pending.next().await {
        result?;
        acked += 1;
    }
    let rate = acked as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    Ok(rate)
}
