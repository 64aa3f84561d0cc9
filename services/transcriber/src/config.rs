//! The transcriber's settings: environment variables first, laptop-friendly defaults,
//! checked at start-up with messages that say what to set.

use std::{net::SocketAddr, ops::RangeInclusive, str::FromStr, time::Duration};

use clap::{Parser, ValueEnum};
use common::config::CommonConfig;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "transcriber",
    version,
    about = "Switchboard transcriber: transcribes and scores every completed call.",
    long_about = "Switchboard transcriber: transcribes and sentiment-scores every completed \
        call through an AI provider, retrying through JetStream redelivery. Every option can \
        be set by the environment variable shown; RUST_LOG filters logs (default `info`)."
)]
pub struct TranscriberConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address of the health, readiness and metrics endpoints.
    #[arg(long, env = "TRANSCRIBER_ADDR", default_value = "0.0.0.0:8081")]
    pub addr: SocketAddr,

    /// Calls transcribed at once by this process. AI requests are waiting, not work: hundreds
    /// fit one replica (memory is bounded by TRANSCRIBE_MAX_AUDIO_IN_FLIGHT_BYTES).
    #[arg(long, env = "TRANSCRIBE_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,

    /// Stored audio of the calls in flight, at most, in bytes: a call waits (acknowledging
    /// progress) until its audio fits, so memory stays bounded whatever the concurrency.
    /// Peak memory is about three times this (the packets, the decoded audio, the request).
    /// At least AI_MAX_AUDIO_BYTES, so that every call it accepts can go.
    #[arg(long, env = "TRANSCRIBE_MAX_AUDIO_IN_FLIGHT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_audio_in_flight_bytes: u64,

    /// Durable name of the JetStream consumer the replicas share.
    #[arg(long, env = "TRANSCRIBE_CONSUMER", default_value = "transcriber")]
    pub consumer: String,

    /// Seconds JetStream waits for an acknowledgement before redelivering. A worker sends
    /// progress while it works, so this only bounds how long a dead worker's call waits.
    #[arg(long, env = "TRANSCRIBE_ACK_WAIT_SECS", default_value_t = 60)]
    pub ack_wait_secs: u64,

    /// Attempts before a call is marked FAILED and dead-lettered.
    #[arg(long, env = "TRANSCRIBE_MAX_ATTEMPTS", default_value_t = 12)]
    pub max_attempts: i32,

    /// Delay before the retry after attempt n: BASE x 2^(n-1) ms, capped, +-20% jitter.
    #[arg(long, env = "TRANSCRIBE_BACKOFF_BASE_MS", default_value_t = 1_000)]
    pub backoff_base_ms: u64,

    /// Cap of the retry delay, in milliseconds.
    #[arg(long, env = "TRANSCRIBE_BACKOFF_MAX_MS", default_value_t = 120_000)]
    pub backoff_max_ms: u64,

    /// On SIGTERM, how long in-flight calls may finish before they are handed back.
    #[arg(long, env = "TRANSCRIBE_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Unacknowledged work items the consumer allows across all replicas (calls waiting for
    /// a retry count too).
    #[arg(long, env = "TRANSCRIBE_MAX_ACK_PENDING", default_value_t = 20_000)]
    pub max_ack_pending: i64,

    #[command(flatten)]
    pub ai: AiConfig,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AiConfig {
    /// `simulated` (the flaky test API) or `openai` (any OpenAI-compatible speech-to-text).
    #[arg(long, env = "AI_PROVIDER", value_enum, default_value_t = ProviderKind::Simulated)]
    pub provider: ProviderKind,

    /// Simulated provider: probability that a request fails with a retryable 503.
    #[arg(long, env = "AI_FAILURE_RATE", default_value_t = 0.25)]
    pub failure_rate: f64,

    /// Simulated provider: latency of each request, uniform in MIN-MAX milliseconds.
    #[arg(long, env = "AI_LATENCY_MS", default_value = "1000-3000")]
    pub latency_ms: LatencyRange,

    /// Simulated provider: seed for reproducible failures and latencies (random if unset).
    #[arg(long, env = "AI_SEED")]
    pub seed: Option<u64>,

    /// `openai` provider: base URL; requests go to {AI_BASE_URL}/v1/audio/transcriptions.
    #[arg(long, env = "AI_BASE_URL", default_value = "https://api.openai.com")]
    pub base_url: String,

    /// `openai` provider: model name.
    #[arg(long, env = "AI_MODEL", default_value = "whisper-1")]
    pub model: String,

    /// `openai` provider: API key, sent as a bearer token (keep it in a secret).
    #[arg(long, env = "AI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// `openai` provider: the sample rate of the WAV files sent, in Hz (16000 for
    /// whisper.cpp's server, which takes no other). Empty: each call's own rate (its audio
    /// format is recorded per call: `GET /v1/call/{id}` shows it).
    #[arg(long, env = "AI_SAMPLE_RATE", default_value = "", hide_default_value = true,
          value_parser = parse_optional_rate)]
    pub sample_rate: OptionalRate,

    /// Bound on every provider request, in milliseconds.
    #[arg(long, env = "AI_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,

    /// Most provider requests a second from this replica (0: no limit). Set it to the
    /// provider's rate limit divided by the replicas: calls past it wait their turn (their
    /// work items kept alive with progress acknowledgements) instead of being refused with
    /// 429s and retried later.
    #[arg(long, env = "AI_MAX_REQUESTS_PER_SEC", default_value_t = 0)]
    pub max_requests_per_sec: u32,

    /// The largest call audio handled, in bytes: a call whose stored packet data is larger is
    /// failed (`audio_too_large`) before it is loaded, and the `openai` provider refuses to
    /// build a larger WAV file. The default is OpenAI's limit on one request (25 MiB).
    #[arg(long, env = "AI_MAX_AUDIO_BYTES", default_value_t = DEFAULT_MAX_AUDIO_BYTES)]
    pub max_audio_bytes: u64,
}

/// OpenAI's limit on the file of one `/v1/audio/transcriptions` request (25 MiB; 27 minutes
/// of 8 kHz 16-bit mono).
pub const DEFAULT_MAX_AUDIO_BYTES: u64 = 25 * 1024 * 1024;

/// The largest `TRANSCRIBE_BACKOFF_MAX_MS`: a day. Retry times are computed as "now + delay",
/// which must stay a representable date.
const BACKOFF_MAX_MS_LIMIT: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    Simulated,
    Openai,
}

/// `AI_SAMPLE_RATE`: a rate in Hz, or none (each call's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionalRate(pub Option<u32>);

fn parse_optional_rate(value: &str) -> Result<OptionalRate, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(OptionalRate(None));
    }
    match value.parse::<u32>() {
        Ok(rate)
            if (common::sound::MIN_SAMPLE_RATE..=common::sound::MAX_SAMPLE_RATE)
                .contains(&rate) =>
        {
            Ok(OptionalRate(Some(rate)))
        }
        _ => Err(format!(
            "{value:?} is not a sample rate from {} to {} Hz (or empty: each call's own)",
            common::sound::MIN_SAMPLE_RATE,
            common::sound::MAX_SAMPLE_RATE
        )),
    }
}

/// `MIN-MAX` milliseconds (or a single value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyRange(pub RangeInclusive<u64>);

impl FromStr for LatencyRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not MIN-MAX milliseconds, e.g. 1000-3000"))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (parse(lo)?, parse(hi)?),
            None => (parse(s)?, parse(s)?),
        };
        if lo > hi {
            return Err(format!(
                "AI_LATENCY_MS {s:?} is the wrong way round: write MIN-MAX, e.g. {hi}-{lo}"
            ));
        }
        Ok(LatencyRange(lo..=hi))
    }
}

impl TranscriberConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        let ai = &self.ai;
        anyhow::ensure!(
            (0.0..=1.0).contains(&ai.failure_rate),
            "AI_FAILURE_RATE must be between 0 and 1, got {}",
            ai.failure_rate
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.concurrency),
            "TRANSCRIBE_CONCURRENCY must be between 1 and 10000, got {}",
            self.concurrency
        );
        anyhow::ensure!(
            self.max_attempts >= 1,
            "TRANSCRIBE_MAX_ATTEMPTS must be at least 1, got {}",
            self.max_attempts
        );
        anyhow::ensure!(
            self.backoff_base_ms >= 1 && self.backoff_base_ms <= self.backoff_max_ms,
            "TRANSCRIBE_BACKOFF_BASE_MS ({}) must be at least 1 and at most TRANSCRIBE_BACKOFF_MAX_MS ({})",
            self.backoff_base_ms,
            self.backoff_max_ms
        );
        anyhow::ensure!(
            self.backoff_max_ms <= BACKOFF_MAX_MS_LIMIT,
            "TRANSCRIBE_BACKOFF_MAX_MS must be at most {BACKOFF_MAX_MS_LIMIT} (a day), got {}",
            self.backoff_max_ms
        );
        anyhow::ensure!(ai.timeout_ms >= 1, "AI_TIMEOUT_MS must be at least 1");
        anyhow::ensure!(
            (1..=i64::MAX as u64).contains(&ai.max_audio_bytes),
            "AI_MAX_AUDIO_BYTES must be at least 1, got {}",
            ai.max_audio_bytes
        );
        anyhow::ensure!(
            self.max_audio_in_flight_bytes >= ai.max_audio_bytes,
            "TRANSCRIBE_MAX_AUDIO_IN_FLIGHT_BYTES ({}) must be at least AI_MAX_AUDIO_BYTES ({}), \
             or the largest calls could never be loaded",
            self.max_audio_in_flight_bytes,
            ai.max_audio_bytes
        );
        anyhow::ensure!(
            self.ack_wait() > self.ai_timeout(),
            "TRANSCRIBE_ACK_WAIT_SECS ({} s) must be longer than AI_TIMEOUT_MS ({} ms), or \
             JetStream would redeliver calls whose AI request is still allowed to run",
            self.ack_wait_secs,
            ai.timeout_ms
        );
        anyhow::ensure!(
            self.max_ack_pending >= self.concurrency as i64,
            "TRANSCRIBE_MAX_ACK_PENDING must be at least TRANSCRIBE_CONCURRENCY"
        );
        anyhow::ensure!(
            !self.consumer.is_empty(),
            "TRANSCRIBE_CONSUMER must not be empty"
        );
        if ai.provider == ProviderKind::Openai {
            anyhow::ensure!(
                ai.base_url.starts_with("http://") || ai.base_url.starts_with("https://"),
                "AI_BASE_URL must start with http:// or https://, got {:?}",
                ai.base_url
            );
        }
        Ok(())
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    pub fn ai_timeout(&self) -> Duration {
        Duration::from_millis(self.ai.timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> anyhow::Result<TranscriberConfig> {
        let mut all = vec!["transcriber"];
        all.extend_from_slice(args);
        let config = TranscriberConfig::try_parse_from(all)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).unwrap();
        assert_eq!(c.ai.latency_ms, LatencyRange(1000..=3000));
        assert_eq!(c.ai.failure_rate, 0.25);
    }

    /// A provider outage of five minutes (scripts/chaos, scenario 7) must not fail calls: the
    /// default retries span more than that even when the jitter shortens every wait.
    #[test]
    fn the_default_retries_outlast_a_five_minute_outage() {
        let c = config(&[]).unwrap();
        let backoff = crate::backoff::Backoff {
            base: std::time::Duration::from_millis(c.backoff_base_ms),
            max: std::time::Duration::from_millis(c.backoff_max_ms),
        };
        let waits: std::time::Duration = (1..c.max_attempts).map(|n| backoff.nominal(n)).sum();
        let shortest = waits.mul_f64(1.0 - crate::backoff::JITTER);
        assert!(shortest.as_secs() > 5 * 60, "{shortest:?}");
    }

    #[test]
    fn bad_settings_are_refused_with_a_message_naming_them() {
        for (args, names) in [
            (vec!["--failure-rate", "1.5"], "AI_FAILURE_RATE"),
            (vec!["--ack-wait-secs", "10"], "TRANSCRIBE_ACK_WAIT_SECS"),
            (vec!["--max-attempts", "0"], "TRANSCRIBE_MAX_ATTEMPTS"),
            (
                vec!["--backoff-base-ms", "190000"],
                "TRANSCRIBE_BACKOFF_BASE_MS",
            ),
            (
                vec!["--backoff-max-ms", "90000000"],
                "TRANSCRIBE_BACKOFF_MAX_MS",
            ),
            (vec!["--max-audio-bytes", "0"], "AI_MAX_AUDIO_BYTES"),
        ] {
            let err = config(&args).unwrap_err().to_string();
            assert!(err.contains(names), "{args:?}: {err}");
        }
        let err = config(&["--latency-ms", "3000-1000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong way round"), "{err}");
    }
}
