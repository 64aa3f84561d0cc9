use std::process::ExitCode;

use common::config::ServiceCli;
use transcriber::{App, config::TranscriberConfig};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = ServiceCli::<TranscriberConfig>::parse();
    if cli.is_healthcheck() {
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
