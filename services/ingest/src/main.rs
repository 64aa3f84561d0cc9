use std::process::ExitCode;

use clap::Parser;
use ingest::{
    App,
    config::{Cli, Command},
};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        return Ok(common::http::exit_code(
            common::http::probe_health(cli.config.addr).await,
        ));
    }
    common::telemetry::init(cli.config.common.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            cli.config.validate()?;
            let pool = common::db::connect(
                &cli.config.common.database_url,
                cli.config.common.database_max_connections,
            )
            .await?;
            common::db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            let shutdown = common::shutdown::on_signal();
            App::build(cli.config)
                .await?
                .run_until_stopped(shutdown)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck => unreachable!("answered before logging starts"),
    }
}
