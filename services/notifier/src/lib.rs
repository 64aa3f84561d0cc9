//! # notifier
//!
//! The supervisors' live view: follows every call's status events and serves them over
//! WebSockets and a dashboard page.
//!
//! Consumes: `<prefix>.calls.status.*`. Produces: WebSocket frames.
//!
//! This crate is the skeleton the notifier issue fills in: it connects, provisions the
//! streams and serves `/healthz`, `/readyz` and `/metrics`.
//!
//! # Layout
//! - [`config`]: settings (`--help` lists them).

pub mod config;

use anyhow::Context;
use axum::{Router, extract::State, response::Response, routing::get};
use common::{http, nats, subjects::Subjects};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::NotifierConfig;

/// A built notifier: connected, bound, not yet running.
pub struct App {
    listener: TcpListener,
    router: Router,
}

impl App {
    pub async fn build(config: NotifierConfig) -> anyhow::Result<App> {
        config.common.validate()?;
        common::telemetry::prometheus();
        let c = &config.common;
        let client = nats::connect(&c.nats_url, "switchboard-notifier").await?;
        let js = nats::jetstream(client.clone());
        nats::ensure_streams(&js, &Subjects::new(c.prefix.clone()), &c.streams)
            .await
            .context("provisioning JetStream streams")?;
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {} (NOTIFIER_ADDR)", config.addr))?;
        let router = Router::new()
            .route("/readyz", get(readyz))
            .merge(http::operational_routes())
            .with_state(client);
        Ok(App { listener, router })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("bound").port()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "notifier listening");
        http::serve(self.listener, self.router, shutdown)
            .await
            .context("serving HTTP")
    }
}

async fn readyz(State(client): State<async_nats::Client>) -> Response {
    http::readiness(vec![http::check_nats(&client)])
}
