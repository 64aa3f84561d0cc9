//! # transcriber
//!
//! Gets every completed call transcribed and sentiment-scored by a slow, flaky AI provider,
//! with no human retrying anything. Retries are JetStream redeliveries (nak with a delay);
//! the attempt counter in Postgres decides when to give up.
//!
//! Consumes: work items on `<prefix>.calls.completed.<call_id>` through the durable pull
//! consumer `TRANSCRIBE_CONSUMER` (default `transcriber`), shared by all replicas.
//! Produces: `COMPLETED -> PROCESSING_AI -> ARCHIVED | FAILED` in Postgres, status events on
//! `<prefix>.calls.status.<call_id>`, dead letters on `<prefix>.dlq.transcribe.<call_id>`.
//!
//! # Layout
//! - [`config`]: settings (`--help` lists them), validated at start-up.
//! - [`worker`]: pulling, one attempt per delivery, ack / nak-with-delay / term.
//! - [`claims`]: the Postgres side: claim with a lease, record each attempt's end.
//! - [`providers`]: `simulated` (the flaky test API) and `openai` (OpenAI-compatible STT).
//! - [`backoff`]: the retry schedule. [`sentiment`]: VADER scores.

pub mod backoff;
pub mod claims;
pub mod config;
pub mod providers;
pub mod sentiment;
pub mod worker;

use std::sync::Arc;

use anyhow::Context;
use axum::{Router, extract::State, response::Response, routing::get};
use common::{
    db, http, nats,
    outbox::Publisher,
    subjects::Subjects,
    tasks::{CriticalTasks, TaskHealth},
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{config::TranscriberConfig, providers::Provider, worker::Worker};

#[derive(Clone)]
struct OpsState {
    pool: PgPool,
    nats: async_nats::Client,
    /// Whether the worker is still running.
    tasks: TaskHealth,
}

/// A built transcriber: connected, consumer in place, bound, not yet pulling.
pub struct App {
    listener: TcpListener,
    router: Router,
    worker: Arc<Worker>,
    tasks: TaskHealth,
}

impl App {
    pub async fn build(config: TranscriberConfig) -> anyhow::Result<App> {
        config.validate()?;
        common::telemetry::prometheus();
        let c = &config.common;
        let pool = db::connect(&c.database_url, c.database_max_connections).await?;
        db::migrate(&pool).await?;
        let client = nats::connect(&c.nats_url, "switchboard-transcriber").await?;
        let js = nats::jetstream(client.clone());
        let subjects = Subjects::new(c.prefix.clone());
        nats::ensure_streams(&js, &subjects, &c.streams)
            .await
            .context("provisioning JetStream streams")?;
        let consumer = worker::ensure_consumer(&js, &subjects, &config).await?;
        let provider = Arc::new(Provider::from_config(&config.ai)?);
        let worker = Arc::new(Worker::new(
            consumer,
            pool.clone(),
            provider,
            Publisher::new(js, subjects, pool.clone()),
            &config,
        ));
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {} (TRANSCRIBER_ADDR)", config.addr))?;
        let tasks = TaskHealth::default();
        let router = Router::new()
            .route("/readyz", get(readyz))
            .merge(http::operational_routes())
            .with_state(OpsState {
                pool,
                nats: client,
                tasks: tasks.clone(),
            });
        tracing::info!(
            provider = worker.provider().name(),
            concurrency = config.concurrency,
            max_attempts = config.max_attempts,
            "transcriber ready"
        );
        Ok(App {
            listener,
            router,
            worker,
            tasks,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("bound").port()
    }

    /// The provider in use (tests count its requests).
    pub fn provider(&self) -> Arc<Provider> {
        self.worker.provider().clone()
    }

    /// Pulls and serves until `shutdown` fires, then drains as [`Worker::run`] describes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "transcriber listening");
        // A transcriber whose worker stopped would look healthy while transcribing nothing.
        let mut tasks = CriticalTasks::new(self.tasks, shutdown.clone());
        tasks.spawn("worker", self.worker.clone().run(shutdown.clone()));
        let served = http::serve(self.listener, self.router, shutdown).await;
        let worker = tasks.join().await;
        tracing::info!("transcriber stopped");
        served.context("serving HTTP")?;
        worker
    }
}

async fn readyz(State(state): State<OpsState>) -> Response {
    http::readiness(vec![
        http::check_postgres(&state.pool).await,
        http::check_nats(&state.nats),
        state.tasks.check(),
    ])
}
