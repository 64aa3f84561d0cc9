//! The notifier's settings: environment variables first, laptop-friendly defaults.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use common::config::CommonConfig;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "notifier",
    version,
    about = "Switchboard notifier: live call states over WebSockets and a dashboard.",
    long_about = "Switchboard notifier: follows every call's status events and serves them over \
        WebSockets (`/ws`) and a supervisor dashboard (`/`). Every option can be set by the \
        environment variable shown; RUST_LOG filters logs (default `info`). DATABASE_URL is \
        accepted for uniformity but not used: the notifier needs NATS only."
)]
pub struct NotifierConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address of the WebSocket, dashboard, health and metrics endpoints.
    #[arg(long, env = "NOTIFIER_ADDR", default_value = "0.0.0.0:8082")]
    pub addr: SocketAddr,

    /// Seconds between pings; a peer that has not answered the previous one is closed.
    #[arg(long, env = "NOTIFIER_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,

    /// Events a socket may fall behind before it is told it lagged and resynchronised
    /// (its bounded queue).
    #[arg(long, env = "NOTIFIER_CLIENT_QUEUE", default_value_t = 4096)]
    pub client_queue: usize,

    /// Seconds a client may take to accept one frame before it is closed as too slow.
    #[arg(long, env = "NOTIFIER_SEND_TIMEOUT_SECS", default_value_t = 10)]
    pub send_timeout_secs: u64,

    /// Recent events kept in memory for exact resumes (`?since=N`); a client further behind
    /// gets a fresh snapshot marked `reset`.
    #[arg(long, env = "NOTIFIER_REPLAY_EVENTS", default_value_t = 200_000)]
    pub replay_events: usize,

    /// Ingest's HTTP API, as the notifier reaches it: the dashboard's detail view shows a
    /// call's whole transcript from there (events carry a preview).
    #[arg(
        long,
        env = "NOTIFIER_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,

    /// On SIGTERM, how long sockets get to receive their close frame.
    #[arg(long, env = "NOTIFIER_SHUTDOWN_GRACE_SECS", default_value_t = 5)]
    pub shutdown_grace_secs: u64,
}

impl NotifierConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        anyhow::ensure!(
            self.ping_interval_secs >= 1,
            "NOTIFIER_PING_INTERVAL_SECS must be at least 1"
        );
        anyhow::ensure!(
            (16..=1_000_000).contains(&self.client_queue),
            "NOTIFIER_CLIENT_QUEUE must be between 16 and 1000000"
        );
        anyhow::ensure!(
            self.send_timeout_secs >= 1,
            "NOTIFIER_SEND_TIMEOUT_SECS must be at least 1"
        );
        anyhow::ensure!(
            self.ingest_url.starts_with("http://") || self.ingest_url.starts_with("https://"),
            "NOTIFIER_INGEST_URL must be an http:// or https:// URL, got {:?}",
            self.ingest_url
        );
        anyhow::ensure!(
            self.replay_events >= 1,
            "NOTIFIER_REPLAY_EVENTS must be at least 1"
        );
        Ok(())
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
