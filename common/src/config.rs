//! Settings shared by every service. Each service flattens [`CommonConfig`] into its own
//! `clap` parser, so `--help` lists every environment variable with its default.
//! Everything a test must randomise (database, prefix, ports) is a setting.

use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::subjects::Prefix;

#[derive(Args, Debug, Clone)]
pub struct CommonConfig {
    /// Postgres connection URL. The database is created if it does not exist.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/switchboard"
    )]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// NATS server URL (JetStream must be enabled).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Root of every NATS subject and prefix of every stream name (`pbx` gives `pbx.packets.<call>`
    /// and `PBX_PACKETS`), so two deployments or two test runs can share one NATS.
    #[arg(long, env = "SWITCHBOARD_PREFIX", default_value = "pbx")]
    pub prefix: Prefix,

    /// Log format: `text` for people, `json` for log pipelines. Filter with RUST_LOG
    /// (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub streams: StreamSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the JetStream streams are provisioned. Defaults suit one NATS server on a laptop;
/// production on a NATS cluster sets `STREAM_REPLICAS=3` and storage limits.
#[derive(Args, Debug, Clone)]
pub struct StreamSettings {
    /// Replicas of every stream (1 for a single server, 3 on a cluster).
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// How long packet events are kept in the packets stream, in seconds.
    #[arg(long, env = "PACKETS_MAX_AGE_SECS", default_value_t = 86_400)]
    pub packets_max_age_secs: u64,

    /// Size cap of the packets stream in bytes (-1: unlimited); the oldest go first.
    #[arg(long, env = "PACKETS_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub packets_max_bytes: i64,

    /// How long status events are kept in the status stream, in seconds.
    #[arg(long, env = "STATUS_RETENTION_SECS", default_value_t = 86_400)]
    pub status_retention_secs: u64,

    /// How long dead letters are kept, in seconds.
    #[arg(long, env = "DLQ_MAX_AGE_SECS", default_value_t = 14 * 86_400)]
    pub dlq_max_age_secs: u64,
}

impl StreamSettings {
    pub fn packets_max_age(&self) -> Duration {
        Duration::from_secs(self.packets_max_age_secs)
    }
    pub fn status_retention(&self) -> Duration {
        Duration::from_secs(self.status_retention_secs)
    }
    pub fn dlq_max_age(&self) -> Duration {
        Duration::from_secs(self.dlq_max_age_secs)
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            packets_max_age_secs: 86_400,
            packets_max_bytes: -1,
            status_retention_secs: 86_400,
            dlq_max_age_secs: 14 * 86_400,
        }
    }
}

impl CommonConfig {
    /// Checks what `clap` cannot, so a bad setting stops the process at start-up with a
    /// message that says what to set.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.database_max_connections >= 2,
            "DATABASE_MAX_CONNECTIONS must be at least 2, got {}",
            self.database_max_connections
        );
        anyhow::ensure!(
            (1..=5).contains(&self.streams.replicas),
            "STREAM_REPLICAS must be between 1 and 5, got {}",
            self.streams.replicas
        );
        anyhow::ensure!(
            self.streams.packets_max_bytes == -1 || self.streams.packets_max_bytes > 0,
            "PACKETS_MAX_BYTES must be -1 (unlimited) or positive"
        );
        for (name, secs) in [
            ("PACKETS_MAX_AGE_SECS", self.streams.packets_max_age_secs),
            ("STATUS_RETENTION_SECS", self.streams.status_retention_secs),
            ("DLQ_MAX_AGE_SECS", self.streams.dlq_max_age_secs),
        ] {
            // Shorter than the duplicate windows would make JetStream refuse the stream.
            anyhow::ensure!(
                secs >= 600,
                "{name} must be at least 600 seconds, got {secs}"
            );
        }
        Ok(())
    }
}

/// The command line of a service that only serves: `<service> [serve]` runs it,
/// `<service> healthcheck` asks a running one whether it is healthy (container health checks).
#[derive(clap::Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct ServiceCli<C: Args> {
    #[command(subcommand)]
    pub command: Option<ServiceCommand>,
    #[command(flatten)]
    pub config: C,
}

impl<C: Args> ServiceCli<C> {
    /// Parses the process's arguments; `about` is the service's own description (the
    /// derive would otherwise take this crate's).
    pub fn parse_for(about: &'static str) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().about(about).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceCommand {
    /// Run the service (the default).
    Serve,
    /// Exit 0 if the service on its listen address answers /healthz.
    Healthcheck,
}
