//! Any OpenAI-compatible speech-to-text server: `POST {AI_BASE_URL}/v1/audio/transcriptions`
//! (multipart: `file`, `model`), as served by OpenAI, Groq, whisper.cpp's server or speaches.
//!
//! 429 honours `Retry-After` (seconds or an HTTP date); 408, 5xx, timeouts and connection errors are retryable; any other
//! 4xx is permanent. `AI_TIMEOUT_MS` bounds every request.

use std::time::Duration;

use reqwest::{
    StatusCode,
    header::RETRY_AFTER,
    multipart::{Form, Part},
};
use serde::Deserialize;
use time::{OffsetDateTime, PrimitiveDateTime};

use super::{CallAudio, ProviderError, audio};
use crate::config::AiConfig;

pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    /// `AI_SAMPLE_RATE`: the rate every file is sent at, or each call's own.
    sample_rate: Option<u32>,
    max_audio_bytes: u64,
}

#[derive(Deserialize)]
struct Transcription {
    text: String,
}

impl OpenAi {
    pub fn new(ai: &AiConfig) -> anyhow::Result<Self> {
        common::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(ai.timeout_ms))
            .connect_timeout(Duration::from_millis(ai.timeout_ms.min(10_000)))
            .user_agent(concat!(
                "switchboard-transcriber/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()?;
        Ok(Self {
            client,
            url: format!(
                "{}/v1/audio/transcriptions",
                ai.base_url.trim_end_matches('/')
            ),
            model: ai.model.clone(),
            api_key: ai.api_key.clone(),
            sample_rate: ai.sample_rate.0,
            max_audio_bytes: ai.max_audio_bytes,
        })
    }

    pub async fn transcribe(&self, call: &CallAudio) -> Result<String, ProviderError> {
        // Decoding and resampling an hour of audio is seconds of CPU: not on the async threads,
        // where it would stall the lease renewals of the other calls.
        let (call_copy, rate, max) = (call.clone(), self.sample_rate, self.max_audio_bytes);
        let wav = tokio::task::spawn_blocking(move || audio::wav_for(&call_copy, rate, max))
            .await
            .map_err(|e| ProviderError::Permanent(format!("building the WAV file failed: {e}")))?
            .map_err(ProviderError::Permanent)?;
        let file = Part::bytes(wav)
            .file_name(format!("{}.wav", call.call_id))
            .mime_str("audio/wav")
            .map_err(|e| ProviderError::Permanent(e.to_string()))?;
        let form = Form::new()
            .text("model", self.model.clone())
            .text("response_format", "json")
            .part("file", file);
        let mut request = self.client.post(&self.url).multipart(form);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ProviderError::Retryable {
            message: format!("request to {} failed: {e}", self.url),
            retry_after: None,
        })?;
        let status = response.status();
        if status.is_success() {
            let body: Transcription =
                response
                    .json()
                    .await
                    .map_err(|e| ProviderError::Retryable {
                        message: format!("unreadable transcription response: {e}"),
                        retry_after: None,
                    })?;
            return Ok(body.text);
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, OffsetDateTime::now_utc()));
        let body = response.text().await.unwrap_or_default();
        let message = format!("{status}: {}", body.chars().take(300).collect::<String>());
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            Err(ProviderError::Retryable {
                message,
                retry_after,
            })
        } else {
            Err(ProviderError::Permanent(message))
        }
    }
}

/// HTTP's preferred date form (RFC 9110 `IMF-fixdate`), e.g. `Wed, 21 Oct 2015 07:28:00 GMT`.
const IMF_FIXDATE: &str =
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT";

/// A `Retry-After` value as a delay from `now`: delta-seconds, or an HTTP date. Whatever the
/// provider sends cannot fail a request: any number of seconds is taken (too many digits for a
/// `u64` is "as long as possible"; the worker caps the delay at `TRANSCRIBE_BACKOFF_MAX_MS`), a
/// date in the past means "now", and anything else is ignored (`None`: the schedule decides).
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let format = time::format_description::parse_borrowed::<2>(IMF_FIXDATE)
        .expect("a valid format description");
    let at = PrimitiveDateTime::parse(value, &format).ok()?.assume_utc();
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_445_412_480).unwrap() // Wed, 21 Oct 2015 07:28:00
    }

    #[test]
    fn retry_after_in_seconds_is_taken_whatever_its_size() {
        let parse = |v| parse_retry_after(v, now());
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999"),
            Some(Duration::from_secs(99_999_999_999))
        );
        assert_eq!(
            parse("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse("99999999999999999999999999"), Some(Duration::MAX));
    }

    #[test]
    fn retry_after_as_an_http_date_is_the_time_until_then() {
        let parse = |v| parse_retry_after(v, now());
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            parse("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(Duration::from_secs(253_402_300_799 - 1_445_412_480))
        );
    }

    #[test]
    fn retry_after_that_is_neither_is_ignored() {
        for value in [
            "",
            "-5",
            "1.5",
            "soon",
            "Wed, 21 Oct 2015 25:00:00 GMT",
            "+3",
        ] {
            assert_eq!(parse_retry_after(value, now()), None, "{value:?}");
        }
    }
}
