//! The transcriber's settings: environment variables first, laptop-friendly defaults.

use std::net::SocketAddr;

use clap::Parser;
use common::config::CommonConfig;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "transcriber",
    version,
    about = "Switchboard transcriber: transcribes and scores every completed call."
)]
pub struct TranscriberConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address of the health, readiness and metrics endpoints.
    #[arg(long, env = "TRANSCRIBER_ADDR", default_value = "0.0.0.0:8081")]
    pub addr: SocketAddr,
}
