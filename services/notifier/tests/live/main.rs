//! The notifier against real NATS JetStream, each test with its own subject prefix, talking to
//! it over real WebSockets (and, for the dashboard, a real headless Chromium).

mod auth;
mod browser;
mod cdp;
mod fanout;
mod helpers;
mod operations;
mod sockets;
