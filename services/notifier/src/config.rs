//! The notifier's settings: environment variables first, laptop-friendly defaults.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use common::{auth::settings::AuthSettings, config::CommonConfig};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "notifier",
    version,
    about = "Switchboard notifier: live call states over WebSockets and a dashboard.",
    long_about = "Switchboard notifier: follows every call's status events and serves them over \
        WebSockets (`/ws`) and a supervisor dashboard (`/`). Every option can be set by the \
        environment variable shown; RUST_LOG filters logs (default `info`). DATABASE_URL is \
        where API keys are checked."
)]
pub struct NotifierConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    #[command(flatten)]
    pub auth: AuthSettings,

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

    /// A second address serving `/metrics` (and health) without a key, for a Prometheus on a
    /// private network; `/metrics` then leaves the main address. Empty: `/metrics` is on the
    /// main address and needs an `admin` key.
    #[arg(long, env = "ADMIN_ADDR", default_value = "", hide_default_value = true,
          value_parser = common::config::parse_optional_addr)]
    pub admin_addr: common::config::OptionalAddr,

    /// Browser origins besides the dashboard's own that may open the live view
    /// (comma-separated, e.g. `https://ops.example.com`); a page of any other origin gets 403.
    /// Empty: same-origin only.
    #[arg(long, env = "ALLOWED_ORIGINS", default_value = "", hide_default_value = true,
          value_parser = crate::origins::AllowedOrigins::parse)]
    pub allowed_origins: crate::origins::AllowedOrigins,

    /// How long a dashboard token (`POST /v1/auth/token`) is valid, in seconds; the page
    /// exchanges it for a fresh one before then.
    #[arg(long, env = "AUTH_TOKEN_TTL_SECS", default_value_t = 900)]
    pub token_ttl_secs: u64,

    /// Longest any HTTP request may take, in seconds (408 past it); the live view's socket,
    /// once upgraded, is not bound by it.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

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
            (60..=86_400).contains(&self.token_ttl_secs),
            "AUTH_TOKEN_TTL_SECS must be between 60 and 86400, got {}",
            self.token_ttl_secs
        );
        anyhow::ensure!(
            (1..=3_600).contains(&self.request_timeout_secs),
            "REQUEST_TIMEOUT_SECS must be between 1 and 3600, got {}",
            self.request_timeout_secs
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
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
