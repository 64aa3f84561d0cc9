//! `pbx`: drive, watch and load Switchboard from a terminal, the way `nats` or `redis-cli`
//! serve their users. `pbx --help` lists the commands.

mod api;
mod cli;
mod live;
mod sentences;
mod simulate;
mod stats;
mod watch;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    common::tls::install_crypto_provider();
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // One clear line, then the causes.
            eprintln!("pbx: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
