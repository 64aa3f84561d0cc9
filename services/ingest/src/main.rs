use clap::Parser;
use ingest::{
    App,
    config::{Cli, Command},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
            Ok(())
        }
        Command::Serve => {
            let shutdown = common::shutdown::on_signal();
            App::build(cli.config)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
    }
}
