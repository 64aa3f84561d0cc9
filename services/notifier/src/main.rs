use std::process::ExitCode;

use clap::Parser;
use notifier::{App, config::NotifierConfig};

/// `notifier [serve]` runs the service; `notifier healthcheck` probes a running one on
/// NOTIFIER_ADDR (for container health checks).
#[derive(Parser, Debug)]
#[command(name = "notifier", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: NotifierConfig,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Exit 0 if the notifier on NOTIFIER_ADDR answers /healthz.
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        return Ok(common::http::exit_code(
            common::http::probe_health(cli.config.addr).await,
        ));
    }
    common::telemetry::init(cli.config.common.log_format);
    let shutdown = common::shutdown::on_signal();
    App::build(cli.config)
        .await?
        .run_until_stopped(shutdown)
        .await?;
    Ok(ExitCode::SUCCESS)
}
