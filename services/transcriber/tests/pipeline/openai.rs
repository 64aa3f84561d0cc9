use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{CallState, subjects::StreamKind, testing::eventually};
use transcriber::config::ProviderKind;

use crate::helpers::stack;

/// A local OpenAI-compatible server that answers from a script and records what it got.
#[derive(Clone)]
struct FakeStt {
    script: Arc<Vec<(StatusCode, Option<&'static str>, &'static str)>>,
    seen: Arc<Mutex<Vec<(Instant, HeaderMap, Bytes)>>>,
}

async fn transcriptions(State(fake): State<FakeStt>, headers: HeaderMap, body: Bytes) -> Response {
    let n = {
        let mut seen = fake.seen.lock().unwrap();
        seen.push((Instant::now(), headers, body));
        seen.len() - 1
    };
    let (status, retry_after, body) = fake.script[n.min(fake.script.len() - 1)];
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.parse().unwrap());
    }
    response
}

async fn start_fake(
    script: Vec<(StatusCode, Option<&'static str>, &'static str)>,
) -> (String, FakeStt) {
    let fake = FakeStt {
        script: Arc::new(script),
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/audio/transcriptions", post(transcriptions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, fake)
}

fn mulaw_frame() -> String {
    STANDARD.encode([0xFFu8; 160])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_provider_sends_a_well_formed_request_and_honours_retry_after() {
    let (url, fake) = start_fake(vec![
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("2"),
            r#"{"error":{"message":"slow down"}}"#,
        ),
        (
            StatusCode::OK,
            None,
            r#"{"text":"I am very happy with the service"}"#,
        ),
    ])
    .await;
    let stack = stack(|c| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url;
        c.ai.model = "whisper-test".into();
        c.ai.api_key = Some("test-key".into());
        c.backoff_base_ms = 10;
        // Retry-After is honoured up to the cap.
        c.backoff_max_ms = 10_000;
    })
    .await;

    stack.call("stt-1", &[&mulaw_frame(), &mulaw_frame()]).await;
    let call = stack
        .wait_for("stt-1", CallState::Archived, Duration::from_secs(30))
        .await;

    assert_eq!(call["transcript"], "I am very happy with the service");
    assert_eq!(call["sentiment"]["label"], "positive");
    assert_eq!(call["ai_attempts"], 2);
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (first_at, headers, body) = &seen[0];
    assert_eq!(headers[header::AUTHORIZATION], "Bearer test-key");
    let content_type = headers[header::CONTENT_TYPE].to_str().unwrap();
    assert!(
        content_type.starts_with("multipart/form-data; boundary="),
        "{content_type}"
    );
    let text = String::from_utf8_lossy(body);
    assert!(
        text.contains("name=\"model\"\r\n\r\nwhisper-test\r\n"),
        "model field: {text:.300}"
    );
    assert!(
        text.contains("name=\"file\"; filename=\"call.wav\""),
        "file field"
    );
    let riff = body
        .windows(4)
        .position(|w| w == b"RIFF")
        .expect("a WAV file in the body");
    assert_eq!(&body[riff + 8..riff + 16], b"WAVEfmt ");
    let data_len = u32::from_le_bytes(body[riff + 40..riff + 44].try_into().unwrap());
    assert_eq!(data_len, 2 * 160 * 2, "two 20 ms frames of 16-bit samples");
    // 429 with Retry-After: 2 outweighs the 10 ms backoff.
    let gap = seen[1].0 - *first_at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_provider_error_fails_the_call_at_once() {
    let (url, fake) = start_fake(vec![(
        StatusCode::BAD_REQUEST,
        None,
        r#"{"error":{"message":"unsupported audio"}}"#,
    )])
    .await;
    let stack = stack(|c| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url;
    })
    .await;

    stack.call("bad-audio-1", &[&mulaw_frame()]).await;
    let call = stack
        .wait_for("bad-audio-1", CallState::Failed, Duration::from_secs(20))
        .await;

    assert_eq!(call["ai_attempts"], 1);
    assert!(
        call["last_error"].as_str().unwrap().contains("400"),
        "{call}"
    );
    assert_eq!(fake.seen.lock().unwrap().len(), 1, "no retries");
    let dead = eventually("the dead letter", Duration::from_secs(5), || async {
        let m = stack.env.stream_messages(StreamKind::DeadLetters).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let letter: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(letter["permanent"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_data_that_is_not_audio_is_a_permanent_error() {
    let (url, fake) = start_fake(vec![(StatusCode::OK, None, r#"{"text":"never"}"#)]).await;
    let stack = stack(|c| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url;
    })
    .await;

    stack
        .call("not-audio-1", &["plain words, not base64!"])
        .await;
    let call = stack
        .wait_for("not-audio-1", CallState::Failed, Duration::from_secs(20))
        .await;

    assert!(
        call["last_error"].as_str().unwrap().contains("base64"),
        "{call}"
    );
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "nothing sent to the provider"
    );
}
