//! The notifier's settings: environment variables first, laptop-friendly defaults.

use std::net::SocketAddr;

use clap::Parser;
use common::config::CommonConfig;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "notifier",
    version,
    about = "Switchboard notifier: live call states over WebSockets and a dashboard."
)]
pub struct NotifierConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address of the WebSocket, dashboard, health and metrics endpoints.
    #[arg(long, env = "NOTIFIER_ADDR", default_value = "0.0.0.0:8082")]
    pub addr: SocketAddr,
}
