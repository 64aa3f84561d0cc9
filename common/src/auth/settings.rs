//! The authentication settings every service that serves requests shares.

use clap::{Args, ValueEnum};

/// `SWITCHBOARD_AUTH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Every `/v1` request needs a key (`Authorization: Bearer <key>`).
    Required,
    /// No keys: everything is tenant `default` with every permission. For a closed lab only;
    /// the service warns at start-up.
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct AuthSettings {
    /// `required`: every API request needs a key; `off`: none (a closed lab only).
    #[arg(long = "auth", env = "SWITCHBOARD_AUTH", value_enum, default_value_t = AuthMode::Required)]
    pub mode: AuthMode,

    /// Packets a key may send per second (its burst is one second's worth); past it, 429
    /// with Retry-After. 0: no limit.
    #[arg(long, env = "RATE_LIMIT_PACKETS_PER_SEC", default_value_t = 25_000)]
    pub packets_per_sec: u32,

    /// Other requests a key may make per second (completions, reads, tokens, live-view
    /// connections; the burst is two seconds' worth). 0: no limit.
    #[arg(long, env = "RATE_LIMIT_REQUESTS_PER_SEC", default_value_t = 200)]
    pub requests_per_sec: u32,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Required,
            packets_per_sec: 25_000,
            requests_per_sec: 200,
        }
    }
}

impl AuthSettings {
    /// Logs the warning `SWITCHBOARD_AUTH=off` deserves, once, at start-up.
    pub fn warn_if_off(&self, service: &str) {
        if self.mode == AuthMode::Off {
            tracing::warn!(
                service,
                "SWITCHBOARD_AUTH=off: no API key is checked and every request acts as tenant \
                 `default` with every permission; use this only on a closed network"
            );
        }
    }
}
