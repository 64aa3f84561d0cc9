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
    if let Some(ServiceCommand::Own(IngestCommand::Keys { command })) = &cli.command {
        // No log output: stdout is the answer (the new key alone on its last line).
        ingest::keys::run(&cli.config, command, &mut std::io::stdout()).await?;
        return Ok(ExitCode::SUCCESS);
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
