use std::process::ExitCode;

use common::config::{ServiceCli, ServiceCommand};
use ingest::{
    App,
    config::{IngestCommand, IngestConfig},
};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = ServiceCli::<IngestConfig, IngestCommand>::parse();
    if cli.is_healthcheck() {
        return Ok(common::http::exit_code(
            common::http::probe_health(cli.config.addr).await,
        ));
    }
    common::telemetry::init(cli.config.common.log_format);
    if cli.command == Some(ServiceCommand::Own(IngestCommand::Migrate)) {
        cli.config.validate()?;
        common::service::postgres(&cli.config.common).await?;
        tracing::info!("migrations applied");
        return Ok(ExitCode::SUCCESS);
    }
    let shutdown = common::shutdown::on_signal();
    App::build(cli.config)
        .await?
        .run_until_stopped(shutdown)
        .await?;
    Ok(ExitCode::SUCCESS)
}
