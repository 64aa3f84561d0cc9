//! The transcriber as tests start it (feature `testing`): the one test configuration and the
//! one way to start it, for the transcriber's own tests and the notifier's.

use std::sync::Arc;

use clap::Parser;
use common::{config::CommonConfig, testing::Running};

use crate::{App, config::TranscriberConfig, providers::Provider};

/// Settings for tests: the test's database and prefix (`common`), a random port, a quick
/// simulated AI that never fails, quick retries and a short ack wait.
pub fn config(common: &CommonConfig) -> TranscriberConfig {
    let mut config =
        TranscriberConfig::try_parse_from(["transcriber"]).expect("the defaults parse");
    config.common = common.clone();
    config.addr = "127.0.0.1:0".parse().expect("an address");
    config.ai.failure_rate = 0.0;
    config.ai.latency_ms = "1-5".parse().expect("a latency range");
    config.ai.timeout_ms = 1_500;
    config.ack_wait_secs = 2;
    config.backoff_base_ms = 20;
    config.backoff_max_ms = 200;
    config.shutdown_grace_secs = 5;
    config
}

/// Builds a transcriber with `config` and runs it until the returned [`Running`] stops; the
/// provider is returned too, so tests can count its requests.
pub async fn spawn(config: TranscriberConfig) -> (Running, Arc<Provider>) {
    common::telemetry::init(common::config::LogFormat::Text);
    let app = App::build(config).await.expect("transcriber builds");
    let provider = app.provider();
    let running = Running::spawn("transcriber", app.port(), |stop| {
        app.run_until_stopped(stop)
    });
    (running, provider)
}
