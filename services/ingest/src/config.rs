//! Ingest's settings: environment variables first, each with a default that works on a laptop.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use common::{Role, TenantId, auth::settings::AuthSettings, config::CommonConfig};

/// Ingest's own subcommands, beside `serve` and `healthcheck`
/// ([`common::config::ServiceCli`]).
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum IngestCommand {
    /// Apply the database migrations and exit (ingest also runs them at start-up).
    Migrate,
    /// Manage API keys (uses DATABASE_URL; applies the migrations first).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// `ingest keys ...`.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum KeysCommand {
    /// Make a key; the tenant is created if new. The key is printed once, alone on the last
    /// line of stdout, and stored only as a hash: keep it.
    Create {
        /// The tenant the key acts for (1-32 of a-z, 0-9, '_', '-').
        #[arg(long)]
        tenant: TenantId,
        /// `pbx` (stream and complete calls), `supervisor` (read calls, the live view,
        /// re-drive) or `admin` (all of it, and /metrics).
        #[arg(long)]
        role: Role,
    },
    /// List the keys (id, tenant, role, first characters, created, revoked).
    List,
    /// Revoke a key by id: it stops working within seconds on every replica, and so do the
    /// tokens minted from it.
    Revoke { id: i64 },
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ingest",
    version,
    about = "Switchboard ingest: the HTTP API a PBX streams call audio packets to.",
    long_about = "Switchboard ingest: the HTTP API a PBX streams call audio packets to.\n\n\
        Stores every packet in Postgres, publishes it to NATS JetStream, tracks each call's \
        state and hands finished calls to the transcriber. Every option can be set by the \
        environment variable shown; RUST_LOG filters logs (default `info`)."
)]
pub struct IngestConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    #[command(flatten)]
    pub auth: AuthSettings,

    /// Address the HTTP API listens on.
    #[arg(long, env = "INGEST_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// A second address serving `/metrics` (and health) without a key, for a Prometheus on a
    /// private network; `/metrics` then leaves the API's address. Empty: `/metrics` is on the
    /// API's address and needs an `admin` key.
    #[arg(long, env = "ADMIN_ADDR", default_value = "", hide_default_value = true,
          value_parser = common::config::parse_optional_addr)]
    pub admin_addr: common::config::OptionalAddr,

    /// Serve the OpenAPI document and Swagger UI at `/docs` and `/openapi.json` (without a
    /// key: they describe the API, nothing in it).
    #[arg(long, env = "API_DOCS", default_value_t = true, action = clap::ArgAction::Set)]
    pub api_docs: bool,

    /// Longest any request may take, body upload included, in seconds; past it the client is
    /// answered 408 `request_timeout`. Packets have their own, shorter,
    /// `INGEST_REQUEST_DEADLINE_MS`.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Where to take Asterisk AudioSocket connections (`0.0.0.0:9092`); empty: off.
    /// AudioSocket carries no credentials: restrict who may reach it (docs/telephony.md).
    #[arg(long, env = "AUDIOSOCKET_ADDR", default_value = "", hide_default_value = true,
          value_parser = common::config::parse_optional_addr)]
    pub audiosocket_addr: common::config::OptionalAddr,

    /// The key (a `pbx` key) whose tenant owns every call taken on `AUDIOSOCKET_ADDR`;
    /// required there unless `SWITCHBOARD_AUTH=off`.
    #[arg(long, env = "AUDIOSOCKET_API_KEY", hide_env_values = true)]
    pub audiosocket_api_key: Option<String>,

    /// The Twilio account's auth token: when set, the `X-Twilio-Signature` of every
    /// `/v1/media/twilio` upgrade must match it (the tenant's key still comes as the stream's
    /// `key` parameter).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<String>,

    /// Calls one tenant may stream at once; the first packet of one more is answered 429
    /// `too_many_streaming_calls`. Packets of calls already streaming are never refused.
    /// 0: no cap.
    #[arg(long, env = "MAX_STREAMING_CALLS_PER_TENANT", default_value_t = 5_000)]
    pub max_streaming_calls_per_tenant: u32,

    /// A call that receives no packet for this many seconds is completed automatically.
    #[arg(long, env = "CALL_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub call_idle_timeout_secs: u64,

    /// Largest `data` of one packet, in bytes; larger packets are refused with 413.
    #[arg(long, env = "MAX_PACKET_BYTES", default_value_t = 65_536)]
    pub max_packet_bytes: usize,

    /// How often unpublished status events and work items are republished (milliseconds).
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 2_000)]
    pub outbox_relay_interval_ms: u64,

    /// The first sequence number of a call: 0, or 1 for PBXs that count from 1 (Twilio's media
    /// chunks, the original FastAPI service). Missing ranges, `total_packets` and the
    /// transcriber's audio all count from here; a sequence below it is refused (422).
    #[arg(long, env = "SEQUENCE_START", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1))]
    pub sequence_start: i64,

    /// Most packets written to Postgres in one transaction.
    #[arg(long, env = "INGEST_MAX_BATCH", default_value_t = 1_000)]
    pub max_batch: usize,

    /// Packet writer tasks, each with one transaction in flight (a call's packets always go
    /// to the same one). More overlap one batch's round trips with another's work, at the
    /// price of smaller batches; each takes a Postgres connection while it writes. On two
    /// cores shared with Postgres one is fastest (docs/benchmarks.md); raise it where Postgres
    /// has cores to spare.
    #[arg(long, env = "INGEST_WRITERS", default_value_t = 1)]
    pub writers: usize,

    /// How long a packet may take from arriving to being stored and acknowledged, in
    /// milliseconds; past it the PBX is answered 503 with `Retry-After` (overload, a stuck
    /// database) instead of waiting. Packets waiting in the queue past it are not stored.
    #[arg(long, env = "INGEST_REQUEST_DEADLINE_MS", default_value_t = 5_000)]
    pub request_deadline_ms: u64,

    /// API requests served at once; one more is answered at once with 503 `overloaded` and
    /// `Retry-After`, before its body is read. Bounds the queueing an accepted packet sees.
    /// A connection carries one request at a time: this acts below `INGEST_MAX_CONNECTIONS`.
    #[arg(long, env = "INGEST_MAX_IN_FLIGHT", default_value_t = 1_024)]
    pub max_in_flight: usize,

    /// Open connections served; the API requests of any more are answered 503 `overloaded`
    /// with `Retry-After` and `Connection: close`. Each open connection costs about 50 KB; one
    /// that sends nothing for 60 s is closed (over the cap: 5 s).
    #[arg(long, env = "INGEST_MAX_CONNECTIONS", default_value_t = 2_048)]
    pub max_connections: usize,

    /// How often the reconciler re-creates missing streams and republishes work items
    /// JetStream lost (seconds).
    #[arg(long, env = "RECONCILE_INTERVAL_SECS", default_value_t = 15)]
    pub reconcile_interval_secs: u64,

    /// Days a call's compacted audio is kept (decimals allowed: 0.5 is 12 hours); then the
    /// partition holding it is dropped, so audio goes between this and one
    /// `PARTITION_INTERVAL_SECS` later. Unset or empty: kept forever.
    #[arg(long, env = "AUDIO_RETENTION_DAYS", default_value = "", hide_default_value = true,
          value_parser = parse_retention_days)]
    pub audio_retention_days: RetentionDays,

    /// Days a final call (its row, history, attempts and gaps) is kept after it began, then
    /// deleted in batches; its audio goes with it. Unset or empty: kept forever.
    #[arg(long, env = "CALL_RETENTION_DAYS", default_value = "", hide_default_value = true,
          value_parser = parse_retention_days)]
    pub call_retention_days: RetentionDays,

    /// Compact final calls: their packet rows become one compressed record each. `false` keeps
    /// the rows (and their partitions) of every call, and retention then removes only calls
    /// already compacted.
    #[arg(long, env = "AUDIO_COMPACTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub audio_compaction: bool,

    /// Width of the time partitions of `packets` and `call_audio`, in seconds: at least 60 and
    /// a whole divisor of a day. Calls are filed by the time they began.
    #[arg(long, env = "PARTITION_INTERVAL_SECS", default_value_t = 86_400)]
    pub partition_interval_secs: u64,
}

/// A retention setting: a number of days, or none (keep forever).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RetentionDays(pub Option<f64>);

/// A retention in days: a positive number (decimals allowed) of at most 100 years; empty (as
/// Compose and Kubernetes pass an unset value) means none.
fn parse_retention_days(value: &str) -> Result<RetentionDays, String> {
    if value.trim().is_empty() {
        return Ok(RetentionDays(None));
    }
    let days: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a number of days (e.g. 30, or 0.5)"))?;
    if !(days > 0.0 && days <= 36_500.0) {
        return Err(format!(
            "{value} days: must be more than 0 and at most 36500 (leave it unset to keep forever)"
        ));
    }
    Ok(RetentionDays(Some(days)))
}

impl IngestConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        anyhow::ensure!(
            self.call_idle_timeout_secs >= 1,
            "CALL_IDLE_TIMEOUT_SECS must be at least 1"
        );
        anyhow::ensure!(
            self.audiosocket_addr.0.is_none()
                || self
                    .audiosocket_api_key
                    .as_deref()
                    .is_some_and(|k| !k.is_empty())
                || self.auth.mode == common::auth::settings::AuthMode::Off,
            "AUDIOSOCKET_ADDR is set but AUDIOSOCKET_API_KEY is not: AudioSocket carries no \
             credentials, so the listener's key names the tenant of its calls (create one with \
             `ingest keys create --tenant T --role pbx`)"
        );
        anyhow::ensure!(
            (1..=16 * 1024 * 1024).contains(&self.max_packet_bytes),
            "MAX_PACKET_BYTES must be between 1 and 16777216, got {}",
            self.max_packet_bytes
        );
        anyhow::ensure!(
            self.outbox_relay_interval_ms >= 50,
            "OUTBOX_RELAY_INTERVAL_MS must be at least 50"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.max_batch),
            "INGEST_MAX_BATCH must be between 1 and 10000"
        );
        anyhow::ensure!(
            (1..=3_600).contains(&self.reconcile_interval_secs),
            "RECONCILE_INTERVAL_SECS must be between 1 and 3600, got {}",
            self.reconcile_interval_secs
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_connections),
            "INGEST_MAX_CONNECTIONS must be between 1 and 1000000, got {}",
            self.max_connections
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_in_flight),
            "INGEST_MAX_IN_FLIGHT must be between 1 and 1000000, got {}",
            self.max_in_flight
        );
        anyhow::ensure!(
            (10..=600_000).contains(&self.request_deadline_ms),
            "INGEST_REQUEST_DEADLINE_MS must be between 10 and 600000, got {}",
            self.request_deadline_ms
        );
        anyhow::ensure!(
            (1..=3_600).contains(&self.request_timeout_secs)
                && self.request_timeout_secs * 1_000 > self.request_deadline_ms,
            "REQUEST_TIMEOUT_SECS must be between 1 and 3600 and longer than \
             INGEST_REQUEST_DEADLINE_MS ({} ms), got {}",
            self.request_deadline_ms,
            self.request_timeout_secs
        );
        anyhow::ensure!(
            (1..=64).contains(&self.writers),
            "INGEST_WRITERS must be between 1 and 64, got {}",
            self.writers
        );
        anyhow::ensure!(
            self.writers < self.common.database_max_connections as usize,
            "INGEST_WRITERS ({}) must be less than DATABASE_MAX_CONNECTIONS ({}): each writer holds a \
             connection while it writes, and requests need some too",
            self.writers,
            self.common.database_max_connections
        );
        anyhow::ensure!(
            self.partition_interval_secs >= 60 && 86_400 % self.partition_interval_secs == 0,
            "PARTITION_INTERVAL_SECS must be at least 60 and divide a day (86400) evenly, got {}",
            self.partition_interval_secs
        );
        Ok(())
    }

    pub fn partition_interval(&self) -> Duration {
        Duration::from_secs(self.partition_interval_secs)
    }

    /// How long compacted audio is kept: `AUDIO_RETENTION_DAYS`, and never longer than
    /// `CALL_RETENTION_DAYS` (audio does not outlive its call).
    pub fn audio_retention(&self) -> Option<Duration> {
        let days = match (self.audio_retention_days.0, self.call_retention_days.0) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        days.map(days_to_duration)
    }

    /// What the sweeper keeps, and for how long.
    pub fn sweeper_policy(&self) -> crate::sweeper::Policy {
        crate::sweeper::Policy {
            interval: self.partition_interval(),
            audio_retention: self.audio_retention(),
            call_retention: self.call_retention(),
            grace: crate::sweeper::PACKETS_GRACE.max(2 * self.request_deadline()),
        }
    }

    /// How long a final call is kept after it began: `CALL_RETENTION_DAYS`.
    pub fn call_retention(&self) -> Option<Duration> {
        self.call_retention_days.0.map(days_to_duration)
    }

    pub fn call_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.call_idle_timeout_secs)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn request_deadline(&self) -> Duration {
        Duration::from_millis(self.request_deadline_ms)
    }

    pub fn outbox_relay_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_relay_interval_ms)
    }

    /// Request bodies are capped at a bound derived from `MAX_PACKET_BYTES`: room for the
    /// envelope and for JSON escapes in `data` (up to 6 bytes per character).
    pub fn body_limit(&self) -> usize {
        self.max_packet_bytes.saturating_mul(6).saturating_add(4096)
    }
}

fn days_to_duration(days: f64) -> Duration {
    Duration::from_secs_f64(days * 86_400.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<IngestConfig, clap::Error> {
        IngestConfig::try_parse_from(std::iter::once("ingest").chain(args.iter().copied()))
    }

    #[test]
    fn retention_is_off_unless_set_and_empty_means_unset() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            (config.audio_retention(), config.call_retention()),
            (None, None)
        );
        let config = parse(&["--audio-retention-days", "", "--call-retention-days", " "]).unwrap();
        assert_eq!(
            (config.audio_retention(), config.call_retention()),
            (None, None)
        );
    }

    #[test]
    fn retention_takes_decimal_days_and_audio_never_outlives_its_call() {
        let config = parse(&["--audio-retention-days", "0.5"]).unwrap();
        assert_eq!(config.audio_retention(), Some(Duration::from_secs(43_200)));
        let config =
            parse(&["--audio-retention-days", "30", "--call-retention-days", "7"]).unwrap();
        assert_eq!(
            config.audio_retention(),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            config.call_retention(),
            Some(Duration::from_secs(7 * 86_400))
        );
        let config = parse(&["--call-retention-days", "2"]).unwrap();
        assert_eq!(
            config.audio_retention(),
            Some(Duration::from_secs(2 * 86_400))
        );
    }

    #[test]
    fn bad_retentions_and_partition_widths_are_refused_naming_the_setting() {
        for bad in ["0", "-1", "abc", "NaN", "40000"] {
            let arg = format!("--audio-retention-days={bad}");
            let error = parse(&[&arg]).unwrap_err().to_string();
            assert!(error.contains("audio-retention-days"), "{bad}: {error}");
        }
        for bad in [7, 59, 7_000, 172_800] {
            let config = parse(&["--partition-interval-secs", &bad.to_string()]).unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("PARTITION_INTERVAL_SECS"), "{bad}: {error}");
        }
        for good in [60, 3_600, 86_400] {
            let config = parse(&["--partition-interval-secs", &good.to_string()]).unwrap();
            assert!(config.validate().is_ok(), "{good}");
        }
    }
}
