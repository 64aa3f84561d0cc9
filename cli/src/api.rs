//! A thin client of the ingest API whose errors are one clear line.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::credentials::Credentials;
use wire::{
    api::{
        CallDetail, CallPage, CallSummary, CompleteBody, CompleteResponse, ErrorBody, PacketBody,
        PacketReceipt, PacketStatus,
    },
    audio::AudioFormat,
};

#[derive(Clone)]
pub struct Ingest {
    client: reqwest::Client,
    base: String,
    credentials: Credentials,
}

/// Which of the [`Credentials`] a request sends.
#[derive(Clone, Copy)]
enum Acting {
    /// Streaming and completing: the PBX's key.
    Pbx,
    /// Reading and re-driving: the supervisor's key.
    Supervisor,
}

impl Ingest {
    pub fn new(base: &str, credentials: Credentials) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            credentials,
        })
    }

    /// The API's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The key that streams calls (a PBX's), for the media protocols that carry it themselves.
    pub fn stream_key(&self) -> Option<&str> {
        self.credentials.stream.as_deref()
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        acting: Acting,
    ) -> reqwest::RequestBuilder {
        let key = match acting {
            Acting::Pbx => &self.credentials.stream,
            Acting::Supervisor => &self.credentials.read,
        };
        let request = self.client.request(method, url);
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() || e.is_timeout() {
            anyhow::anyhow!(
                "cannot reach ingest at {}: is it running? try ./scripts/up",
                self.base
            )
        } else {
            anyhow::Error::new(e).context(format!("talking to ingest at {}", self.base))
        }
    }

    /// Reads a success as `T`, and turns an API error body into one line:
    /// `409 call_not_failed: ...`.
    async fn check<T: DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
        if response.status().is_success() {
            return response
                .json()
                .await
                .context("ingest answered with a body pbx does not understand");
        }
        Err(Self::failure(response).await)
    }

    /// An API error answer as one line: `409 call_not_failed: ...`.
    async fn failure(response: reqwest::Response) -> anyhow::Error {
        let status = response.status();
        let (code, message) = match response.json::<ErrorBody>().await {
            Ok(ErrorBody { error }) => (error.code, error.message),
            Err(_) => ("error".to_owned(), "(no message)".to_owned()),
        };
        anyhow::anyhow!("{} {code}: {message}", status.as_u16())
    }

    /// The fields of a packet in `format`: none for text (the API's default), otherwise the
    /// encoding and rate, declared on every packet.
    fn packet_body(sequence: i64, data: &str, timestamp: f64, format: AudioFormat) -> PacketBody {
        PacketBody {
            sequence,
            data: data.to_owned(),
            timestamp,
            encoding: format.is_sound().then(|| format.encoding()),
            sample_rate: format.sample_rate(),
        }
    }

    /// Sends one packet once, with no retry: the answer's status, or why there was none (for
    /// `pbx bench`, which counts what a PBX would see).
    pub async fn send_packet(
        &self,
        call_id: &str,
        sequence: i64,
        data: &str,
        timestamp: f64,
        format: AudioFormat,
    ) -> Result<u16, String> {
        let body = Self::packet_body(sequence, data, timestamp, format);
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("{}/v1/call/stream/{call_id}", self.base),
                Acting::Pbx,
            )
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        // Read the body, so the connection goes back to the pool.
        response.bytes().await.ok();
        Ok(status)
    }

    /// Sends one packet, retrying 503s as a PBX should; returns the outcome and the time
    /// the successful request took.
    pub async fn packet(
        &self,
        call_id: &str,
        sequence: i64,
        data: &str,
        timestamp: f64,
        format: AudioFormat,
    ) -> anyhow::Result<(PacketStatus, Duration)> {
        let body = Self::packet_body(sequence, data, timestamp, format);
        let url = format!("{}/v1/call/stream/{call_id}", self.base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let response = self
                .request(reqwest::Method::POST, &url, Acting::Pbx)
                .json(&body)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            // Unavailable or over the key's rate: wait as told, as a PBX should.
            if matches!(response.status().as_u16(), 429 | 503) && attempt < 20 {
                tokio::time::sleep(retry_after(&response)).await;
                continue;
            }
            let elapsed = started.elapsed();
            let receipt: PacketReceipt = Self::check(response)
                .await
                .with_context(|| format!("packet {sequence} of {call_id}"))?;
            return Ok((receipt.status, elapsed));
        }
    }

    pub async fn complete(
        &self,
        call_id: &str,
        total_packets: i64,
    ) -> anyhow::Result<CompleteResponse> {
        let body = CompleteBody {
            total_packets: Some(total_packets),
        };
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("{}/v1/call/{call_id}/complete", self.base),
                Acting::Pbx,
            )
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(response)
            .await
            .with_context(|| format!("completing {call_id}"))
    }

    pub async fn call(&self, call_id: &str) -> anyhow::Result<CallDetail> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("{}/v1/call/{call_id}", self.base),
                Acting::Supervisor,
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(response).await
    }

    /// The call's audio as the WAV file ingest renders (16-bit mono PCM at the call's rate);
    /// an error line such as `409 not_audio: ...` for a text call, `410 audio_expired` or 404.
    /// The call's audio as a WAV file. Ingest serves a few downloads at once and answers the
    /// rest 503 with `Retry-After`: waited for, as told.
    pub async fn audio_wav(&self, call_id: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}/v1/call/{call_id}/audio.wav", self.base);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let response = self
                .request(reqwest::Method::GET, &url, Acting::Supervisor)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            if !matches!(response.status().as_u16(), 429 | 503) || attempt >= 30 {
                break response;
            }
            tokio::time::sleep(retry_after(&response)).await;
        };
        if !response.status().is_success() {
            return Err(Self::failure(response).await);
        }
        let wav = response
            .bytes()
            .await
            .with_context(|| format!("reading the audio of {call_id}"))?;
        Ok(wav.to_vec())
    }

    pub async fn calls(&self, state: Option<&str>, limit: u32) -> anyhow::Result<CallPage> {
        // States are plain words and limit a number: nothing here needs escaping.
        let mut url = format!("{}/v1/calls?limit={limit}", self.base);
        if let Some(state) = state {
            anyhow::ensure!(
                state.chars().all(|c| c.is_ascii_alphabetic() || c == '_'),
                "--state takes a state name such as ARCHIVED, got {state:?}"
            );
            url.push_str(&format!("&state={}", state.to_ascii_uppercase()));
        }
        let response = self
            .request(reqwest::Method::GET, &url, Acting::Supervisor)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(response).await
    }

    pub async fn retry(&self, call_id: &str) -> anyhow::Result<CallSummary> {
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("{}/v1/call/{call_id}/retry", self.base),
                Acting::Supervisor,
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(response).await
    }
}

/// How long a 429 or 503 says to wait (`Retry-After` in seconds; 1 s when it says nothing).
fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds)
}
