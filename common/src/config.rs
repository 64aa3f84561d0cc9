//! Settings shared by every service. Each service flattens [`CommonConfig`] into its own
//! `clap` parser, so `--help` lists every environment variable with its default.
//! Everything a test must randomise (database, prefix, ports) is a setting.

use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::subjects::Prefix;

/// `Debug` is written by hand: the URLs may carry passwords, which must never reach a log.
#[derive(Args, Clone)]
pub struct CommonConfig {
    /// Postgres connection URL. The database is created if it does not exist.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/switchboard"
    )]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// NATS server URL (JetStream must be enabled).
    #[arg(
        long,
        env = "NATS_URL",
        hide_env_values = true,
        default_value = "nats://127.0.0.1:4222"
    )]
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

impl std::fmt::Debug for CommonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonConfig")
            .field("database_url", &crate::db::redact(&self.database_url))
            .field("database_max_connections", &self.database_max_connections)
            .field("nats_url", &crate::db::redact(&self.nats_url))
            .field("prefix", &self.prefix)
            .field("log_format", &self.log_format)
            .field("streams", &self.streams)
            .finish()
    }
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

/// An address that may be left empty (Compose and Kubernetes pass an unset value as empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionalAddr(pub Option<std::net::SocketAddr>);

pub fn parse_optional_addr(value: &str) -> Result<OptionalAddr, String> {
    if value.trim().is_empty() {
        return Ok(OptionalAddr(None));
    }
    value
        .trim()
        .parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|_| format!("`{value}` is not an address like 0.0.0.0:9090"))
}

/// The command line of every service: `<service> [serve]` runs it, `<service> healthcheck`
/// asks a running one whether it is healthy (container health checks), and `X` adds the
/// service's own subcommands (ingest's `migrate`; [`NoCommands`] for none).
#[derive(clap::Parser, Debug)]
pub struct ServiceCli<C: Args, X: Subcommand = NoCommands> {
    #[command(subcommand)]
    pub command: Option<ServiceCommand<X>>,
    #[command(flatten)]
    pub config: C,
}

impl<C: Args + Parser, X: Subcommand> ServiceCli<C, X> {
    /// Parses the process's arguments, exiting with clap's message on a bad one.
    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first is the program's name). The name, version and descriptions
    /// are the service's own, from its configuration's `#[command(...)]` (the derive on this
    /// struct would take this crate's).
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let service = C::command();
        let (about, long_about) = (
            service.get_about().cloned(),
            service.get_long_about().cloned(),
        );
        let mut command = ServiceCommand::<X>::augment_subcommands(service);
        // Deriving `Subcommand` makes the enums' doc comments the command's description:
        // put the service's own back.
        if let Some(about) = about {
            command = command.about(about);
        }
        if let Some(long_about) = long_about {
            command = command.long_about(long_about);
        }
        let matches = command.try_get_matches_from(args)?;
        Self::from_arg_matches(&matches)
    }

    /// Whether to answer `healthcheck` rather than start (it runs before logging starts).
    pub fn is_healthcheck(&self) -> bool {
        matches!(self.command, Some(ServiceCommand::Healthcheck))
    }
}

#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceCommand<X: Subcommand = NoCommands> {
    /// The service's own subcommands (listed first).
    #[command(flatten)]
    Own(X),
    /// Run the service (the default).
    Serve,
    /// Exit 0 if the service on its listen address answers /healthz.
    Healthcheck,
}

/// No subcommands of the service's own.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCommands {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(
        name = "svc",
        version,
        about = "A service.",
        long_about = "A service, at length."
    )]
    struct SvcConfig {
        #[arg(long, env = "SVC_ADDR", default_value = "0.0.0.0:1")]
        addr: String,
    }

    #[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
    enum Extra {
        /// Do the extra thing.
        Extra,
    }

    #[derive(clap::Parser, Debug)]
    struct WithCommon {
        #[command(flatten)]
        common: CommonConfig,
    }

    #[test]
    fn connection_passwords_never_reach_debug_output_or_help() {
        let parsed = <WithCommon as clap::Parser>::try_parse_from([
            "svc",
            "--database-url",
            "postgres://sb:hunter2@db:5432/switchboard",
            "--nats-url",
            "nats://ops:s3cret@nats:4222",
        ])
        .unwrap();
        let debug = format!("{:?}", parsed.common);
        assert!(
            !debug.contains("hunter2") && !debug.contains("s3cret"),
            "{debug}"
        );
        assert!(
            debug.contains("postgres://sb:***@db:5432/switchboard"),
            "{debug}"
        );
        // --help names the variables but never shows the values they are set to.
        let command = <WithCommon as clap::CommandFactory>::command();
        for hidden in ["database_url", "nats_url"] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == hidden)
                .unwrap();
            assert!(arg.is_hide_env_values_set(), "--help would show {hidden}");
        }
    }

    #[test]
    fn a_service_command_line_has_serve_healthcheck_and_its_own_subcommands() {
        let parse = |args: &[&str]| ServiceCli::<SvcConfig, Extra>::try_parse_from(args);
        assert_eq!(parse(&["svc"]).unwrap().command, None);
        assert_eq!(
            parse(&["svc", "serve"]).unwrap().command,
            Some(ServiceCommand::Serve)
        );
        assert!(parse(&["svc", "healthcheck"]).unwrap().is_healthcheck());
        assert_eq!(
            parse(&["svc", "extra"]).unwrap().command,
            Some(ServiceCommand::Own(Extra::Extra))
        );
        assert_eq!(parse(&["svc", "--addr", "x"]).unwrap().config.addr, "x");
        assert!(parse(&["svc", "nonsense"]).is_err());
        let plain = ServiceCli::<SvcConfig>::try_parse_from(["svc", "extra"]);
        assert!(plain.is_err(), "no subcommands of its own");
    }

    #[test]
    fn help_and_version_are_the_services_own() {
        let help = ServiceCli::<SvcConfig, Extra>::try_parse_from(["svc", "--help"])
            .unwrap_err()
            .to_string();
        assert!(help.starts_with("A service, at length."), "{help}");
        assert!(help.contains("[env: SVC_ADDR="), "{help}");
        for subcommand in ["serve", "healthcheck", "extra"] {
            assert!(help.contains(subcommand), "{subcommand}: {help}");
        }
        let version = ServiceCli::<SvcConfig>::try_parse_from(["svc", "--version"])
            .unwrap_err()
            .to_string();
        assert!(version.starts_with("svc "), "{version}");
    }
}
