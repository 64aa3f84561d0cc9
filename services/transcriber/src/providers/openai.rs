//! Any OpenAI-compatible speech-to-text server: `POST {AI_BASE_URL}/v1/audio/transcriptions`
//! (multipart: `file`, `model`), as served by OpenAI, Groq, whisper.cpp's server or speaches.
//!
//! 429 honours `Retry-After`; 408, 5xx, timeouts and connection errors are retryable; any other
//! 4xx is permanent. `AI_TIMEOUT_MS` bounds every request.

use std::time::Duration;

use reqwest::{
    StatusCode,
    header::RETRY_AFTER,
    multipart::{Form, Part},
};
use serde::Deserialize;

use super::{CallAudio, ProviderError, audio};
use crate::config::{AiConfig, AudioEncoding};

pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    encoding: AudioEncoding,
    sample_rate: u32,
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
            encoding: ai.audio_encoding,
            sample_rate: ai.sample_rate,
        })
    }

    pub async fn transcribe(&self, call: &CallAudio) -> Result<String, ProviderError> {
        let wav =
            audio::wav(call, self.encoding, self.sample_rate).map_err(ProviderError::Permanent)?;
        let file = Part::bytes(wav)
            .file_name("call.wav")
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
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
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
