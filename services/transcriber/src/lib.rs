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
//! - [`budget`]: the bound on audio in memory across the calls in flight.
//! - `testing` (feature `testing`): the one test configuration and the one way tests start it.

pub mod backoff;
pub mod budget;
pub mod claims;
pub mod config;
pub mod providers;
pub mod sentiment;
#[cfg(feature = "testing")]
pub mod testing;
pub mod worker;

use std::sync::Arc;

use anyhow::Context;
use axum::{Router, extract::State, response::Response, routing::get};
use common::{
    http,
    outbox::Publisher,
    service::{Infrastructure, Service},
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
    /// Connects ([`Infrastructure`]), puts the durable consumer in place and binds the
    /// listener. Fails fast with a message saying what to fix.
    pub async fn build(config: TranscriberConfig) -> anyhow::Result<App> {
        config.validate()?;
        let (infra, pool) = Infrastructure::connect_with_postgres(Service {
            name: "transcriber",
            common: &config.common,
            addr: config.addr,
            addr_setting: "TRANSCRIBER_ADDR",
        })
        .await?;
        let source = worker::WorkSource {
            js: infra.js.clone(),
            subjects: infra.subjects.clone(),
            config: config.clone(),
        };
        let consumer = worker::ensure_consumer(&infra.js, &infra.subjects, &config).await?;
        let provider = Arc::new(Provider::from_config(&config.ai)?);
        let worker = Arc::new(Worker::new(
            consumer,
            source,
            pool.clone(),
            provider,
            Publisher::new(infra.js, infra.subjects, pool.clone()),
            &config,
        ));
        let tasks = TaskHealth::default();
        let router = Router::new()
            .route("/readyz", get(readyz))
            .merge(http::operational_routes())
            .with_state(OpsState {
                pool,
                nats: infra.nats,
                tasks: tasks.clone(),
            });
        let router = http::with_request_ids(router);
        tracing::info!(
            provider = worker.provider().name(),
            concurrency = config.concurrency,
            max_attempts = config.max_attempts,
            "transcriber ready"
        );
        Ok(App {
            listener: infra.listener,
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
