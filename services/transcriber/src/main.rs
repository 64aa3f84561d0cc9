use clap::Parser;
use transcriber::{App, config::TranscriberConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = TranscriberConfig::parse();
    common::telemetry::init(config.common.log_format);
    let shutdown = common::shutdown::on_signal();
    App::build(config).await?.run_until_stopped(shutdown).await
}
