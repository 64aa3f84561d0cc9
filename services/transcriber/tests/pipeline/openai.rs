use std::time::Duration;

use axum::http::{StatusCode, header};
use common::{CallState, subjects::StreamKind, testing::eventually};
use transcriber::config::ProviderKind;

use crate::helpers::{mulaw_frame, stack, start_fake};

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

    stack
        .mulaw_call("stt-1", &[&mulaw_frame(), &mulaw_frame()])
        .await;
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
        text.contains("name=\"file\"; filename=\"stt-1.wav\""),
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

    stack.mulaw_call("bad-audio-1", &[&mulaw_frame()]).await;
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
async fn a_text_call_is_a_permanent_error_for_a_speech_provider() {
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
        call["last_error"].as_str().unwrap().contains("text"),
        "{call}"
    );
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "nothing sent to the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_capped_at_the_backoff_max() {
    let (url, fake) = start_fake(vec![
        (StatusCode::TOO_MANY_REQUESTS, Some("99999999999"), "{}"),
        (StatusCode::OK, None, r#"{"text":"thanks for waiting"}"#),
    ])
    .await;
    let stack = stack(|c| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url;
        c.backoff_base_ms = 10;
        c.backoff_max_ms = 300;
    })
    .await;

    stack.mulaw_call("patient-1", &[&mulaw_frame()]).await;
    let call = stack
        .wait_for("patient-1", CallState::Archived, Duration::from_secs(20))
        .await;

    assert_eq!(call["ai_attempts"], 2);
    assert_eq!(fake.seen.lock().unwrap().len(), 2);
    let (finished_at, next_attempt_at): (time::OffsetDateTime, time::OffsetDateTime) =
        sqlx::query_as(
            "SELECT finished_at, next_attempt_at FROM transcription_attempts \
             WHERE call_id = 'acme.patient-1' AND attempt = 1",
        )
        .fetch_one(&stack.env.pool)
        .await
        .unwrap();
    // The delay is the capped hint (300 ms), not the 10 ms backoff nor 3000 years.
    let waited = next_attempt_at - finished_at;
    assert!(
        waited > time::Duration::milliseconds(200) && waited <= time::Duration::milliseconds(301),
        "next attempt scheduled {waited} after the first ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_asked_once_even_when_the_dead_letter_cannot_be_published_at_first() {
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
    let js = stack.env.jetstream().await;
    js.delete_stream(stack.env.subjects().stream_name(StreamKind::DeadLetters))
        .await
        .unwrap();

    stack.mulaw_call("dlq-down-1", &[&mulaw_frame()]).await;
    // The give-up is recorded, the dead letter fails, the call is released for a redelivery.
    eventually(
        "the give-up recorded and the call released",
        Duration::from_secs(20),
        || async {
            let (give_up, held): (Option<String>, bool) = sqlx::query_as(
                "SELECT ai_give_up, ai_lease_until IS NOT NULL FROM calls \
                 WHERE call_id = 'acme.dlq-down-1'",
            )
            .fetch_one(&stack.env.pool)
            .await
            .unwrap();
            (give_up.as_deref() == Some("permanent") && !held).then_some(())
        },
    )
    .await;
    common::nats::ensure_streams(&js, &stack.env.subjects(), &stack.env.config.streams)
        .await
        .unwrap();
    let call = stack
        .wait_for("dlq-down-1", CallState::Failed, Duration::from_secs(20))
        .await;

    assert_eq!(fake.seen.lock().unwrap().len(), 1, "the AI was asked once");
    assert_eq!(call["ai_attempts"], 1);
    let last = call["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "ai_permanent_error", "{last}");
    let dead = eventually("the dead letter", Duration::from_secs(5), || async {
        let m = stack.env.stream_messages(StreamKind::DeadLetters).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(dead.len(), 1);
    stack.wait_work_queue_empty().await;
    assert_eq!(
        stack
            .scalar(
                "SELECT count(*) FROM calls WHERE call_id = $1 AND ai_give_up IS NULL",
                "dlq-down-1"
            )
            .await,
        1,
        "the mark is cleared once FAILED"
    );
}
