use std::process::ExitCode;

use clap::Parser;
use transcriber::{App, config::TranscriberConfig};

/// `transcriber [serve]` runs the service; `transcriber healthcheck` probes a running one on
/// TRANSCRIBER_ADDR (for container health checks).
#[derive(Parser, Debug)]
#[command(name = "transcriber", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: TranscriberConfig,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Exit 0 if the transcriber on TRANSCRIBER_ADDR answers /healthz.
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
