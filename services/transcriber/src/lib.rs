//! # transcriber
//!
//! Gets every completed call transcribed and sentiment-scored by a slow, flaky AI provider,
//! with retries driven by JetStream redelivery.
//!
//! Consumes: work items on `<prefix>.calls.completed.<call_id>` (durable pull consumer
//! `transcriber`). Produces: call transitions in Postgres and status events.
//!
//! This crate is the skeleton the transcriber issue fills in: it connects, provisions the
//! streams and serves `/healthz`, `/readyz` and `/metrics`.
//!
//! # Layout
//! - [`config`]: settings (`--help` lists them).

pub mod config;

use anyhow::Context;
use axum::{Router, extract::State, response::Response, routing::get};
use common::{db, http, nats, subjects::Subjects};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::TranscriberConfig;

#[derive(Clone)]
struct OpsState {
    pool: PgPool,
    nats: async_nats::Client,
}

/// A built transcriber: connected, bound, not yet running.
pub struct App {
    listener: TcpListener,
    router: Router,
}

impl App {
    pub async fn build(config: TranscriberConfig) -> anyhow::Result<App> {
        config.common.validate()?;
        common::telemetry::prometheus();
        let c = &config.common;
        let pool = db::connect(&c.database_url, c.database_max_connections).await?;
        let client = nats::connect(&c.nats_url, "switchboard-transcriber").await?;
        let js = nats::jetstream(client.clone());
        nats::ensure_streams(&js, &Subjects::new(c.prefix.clone()), &c.streams)
            .await
            .context("provisioning JetStream streams")?;
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {} (TRANSCRIBER_ADDR)", config.addr))?;
        let router = Router::new()
            .route("/readyz", get(readyz))
            .merge(http::operational_routes())
            .with_state(OpsState { pool, nats: client });
        Ok(App { listener, router })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("bound").port()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "transcriber listening");
        http::serve(self.listener, self.router, shutdown)
            .await
            .context("serving HTTP")
    }
}

async fn readyz(State(state): State<OpsState>) -> Response {
    http::readiness(vec![
        http::check_postgres(&state.pool).await,
        http::check_nats(&state.nats),
    ])
}
