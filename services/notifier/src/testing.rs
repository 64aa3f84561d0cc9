//! The notifier as tests start it (feature `testing`): the one test configuration and the
//! one way to start it.

use clap::Parser;
use common::{config::CommonConfig, testing::Running};
use tokio::sync::watch;

use crate::{App, config::NotifierConfig};

/// Settings as production has them, but on a random port and the test's prefix (`common`).
pub fn config(common: &CommonConfig) -> NotifierConfig {
    let mut config = NotifierConfig::try_parse_from(["notifier"]).expect("the defaults parse");
    config.common = common.clone();
    config.addr = "127.0.0.1:0".parse().expect("an address");
    // Tests open hundreds of sockets with one key at once; the limiter is tested in ingest.
    config.auth.requests_per_sec = 0;
    config
}

/// Builds a notifier with `config` and runs it until the returned [`Running`] stops; also
/// returns its hub's count of applied events ([`App::watch_applied`]).
pub async fn spawn(config: NotifierConfig) -> (Running, watch::Receiver<u64>) {
    common::telemetry::init(common::config::LogFormat::Text);
    // The detail view's client may speak HTTPS to ingest.
    common::tls::install_crypto_provider();
    let app = App::build(config).await.expect("notifier builds");
    let applied = app.watch_applied();
    let running = Running::spawn("notifier", app.port(), |stop| app.run_until_stopped(stop));
    (running, applied)
}
