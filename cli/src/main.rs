//! `pbx`: drive, watch and load Switchboard from a terminal, the way `nats` or `redis-cli`
//! serve their users. `pbx --help` lists the commands.

mod api;
mod audio;
mod bench;
mod bench_live;
mod cli;
mod credentials;
mod live;
mod protocols;
mod sentences;
mod signal;
mod simulate;
mod stats;
mod watch;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // reqwest is built with `rustls-no-provider`: use ring, as the services do, rather than
    // aws-lc-rs (a C build). Err only if a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
