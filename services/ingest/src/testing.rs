//! Ingest as tests start it (feature `testing`): the one test configuration and the one way
//! to start it, for ingest's own tests and for the transcriber's and notifier's, which drive
//! calls through the real API.

use clap::Parser;
use common::{config::CommonConfig, testing::Running};

use crate::{App, config::IngestConfig};

/// Settings as production has them, but on a random port, the test's database and prefix
/// (`common`), a quick outbox relay and no idle reaping.
pub fn config(common: &CommonConfig) -> IngestConfig {
    let mut config = IngestConfig::try_parse_from(["ingest"]).expect("the defaults parse");
    config.common = common.clone();
    config.addr = "127.0.0.1:0".parse().expect("an address");
    config.outbox_relay_interval_ms = 200;
    config.call_idle_timeout_secs = 3600;
    config.max_packet_bytes = 65_536;
    config
}

/// Builds ingest with `config` and runs it until the returned [`Running`] stops.
pub async fn spawn(config: IngestConfig) -> Running {
    common::telemetry::init(common::config::LogFormat::Text);
    let app = App::build(config).await.expect("ingest builds");
    Running::spawn("ingest", app.port(), |stop| app.run_until_stopped(stop))
}
