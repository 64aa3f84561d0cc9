use clap::Parser;
use notifier::{App, config::NotifierConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = NotifierConfig::parse();
    common::telemetry::init(config.common.log_format);
    let shutdown = common::shutdown::on_signal();
    App::build(config).await?.run_until_stopped(shutdown).await
}
