//! The AI provider of a run: an OpenAI-compatible `POST /v1/audio/transcriptions` that the
//! transcriber's real `openai` provider talks to. It can be taken down (503) and slowed, and it
//! counts requests per call, which is how the books know "one AI request per call".
//!
//! The call is read from the audio itself: the load writes the call's number into the first
//! four bytes of every packet, declared `slin` at 8000 Hz, so the transcriber puts the packets'
//! bytes unchanged after the WAV header. The multipart body is searched for the WAV by hand:
//! a test server needs no multipart parser for one fixed layout.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use bytes::Bytes;

#[derive(Default)]
pub struct AiState {
    down: AtomicBool,
    latency_ms: AtomicU64,
    in_flight: AtomicUsize,
    refused: AtomicU64,
    /// Requests that arrived (refused ones too), by the call number read from the audio.
    requests: Mutex<HashMap<u32, u32>>,
    unreadable: AtomicU64,
}

#[derive(Clone)]
pub struct FakeAi {
    state: Arc<AiState>,
    port: u16,
}

impl FakeAi {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(AiState::default());
        let app = Router::new()
            .route("/v1/audio/transcriptions", post(transcribe))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        Ok(Self { state, port })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    pub fn unreadable(&self) -> u64 {
        self.state.unreadable.load(Ordering::SeqCst)
    }

    /// Requests served per call number.
    pub fn requests(&self) -> HashMap<u32, u32> {
        self.state.requests.lock().expect("not poisoned").clone()
    }
}

async fn transcribe(State(state): State<Arc<AiState>>, body: Bytes) -> impl IntoResponse {
    let Some(call) = call_number(&body) else {
        state.unreadable.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            r#"{"error":{"message":"chaos: no WAV with a call number"}}"#.to_owned(),
        );
    };
    *state
        .requests
        .lock()
        .expect("not poisoned")
        .entry(call)
        .or_default() += 1;
    if state.down.load(Ordering::SeqCst) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"message":"chaos: the provider is down"}}"#.to_owned(),
        );
    }
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    let latency = state.latency_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(latency)).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let text = serde_json::json!({ "text": format!("chaos call {call} transcribed") });
    (StatusCode::OK, text.to_string())
}

/// The call number: the first four bytes of the first packet in the WAV's samples (after its
/// 44-byte header). Missing packets are silence (zeros), and call numbers start at 1, so the
/// first packet that arrived is the first frame that is not all zeros.
fn call_number(body: &[u8]) -> Option<u32> {
    let riff = body.windows(4).position(|w| w == b"RIFF")?;
    let samples = body.get(riff + 44..)?;
    let frame = samples
        .chunks(crate::load::PACKET_BYTES)
        .find(|frame| frame.iter().any(|b| *b != 0))?;
    Some(u32::from_le_bytes(frame.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_call_number_is_read_after_the_wav_header() {
        let mut body = b"--boundary\r\ncontent-type: audio/wav\r\n\r\nRIFF".to_vec();
        body.extend_from_slice(&[0; 40]);
        // A missing first packet (silence), then the call's packet.
        body.extend_from_slice(&[0; crate::load::PACKET_BYTES]);
        body.extend_from_slice(&7u32.to_le_bytes());
        body.extend_from_slice(&[1; 156]);
        assert_eq!(super::call_number(&body), Some(7));
        assert_eq!(super::call_number(b"RIFF too short"), None);
    }
}
