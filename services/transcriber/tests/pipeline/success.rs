use std::time::Duration;

use common::{CallState, subjects::StreamKind};

use crate::helpers::stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_call_is_archived_with_its_transcript_and_sentiment() {
    let stack = stack(|_| {}).await;
    let words = ["thank", "you", "so", "much,", "this", "was", "wonderful!"];

    stack.call("happy-1", &words).await;
    let call = stack
        .wait_for("happy-1", CallState::Archived, Duration::from_secs(20))
        .await;

    assert_eq!(call["transcript"], "thank you so much, this was wonderful!");
    assert_eq!(call["sentiment"]["label"], "positive");
    assert!(call["sentiment"]["score"].as_f64().unwrap() > 0.5);
    assert_eq!(call["ai_attempts"], 1);
    assert_eq!(call["last_error"], serde_json::Value::Null);
    let states: Vec<&str> = call["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["IN_PROGRESS", "COMPLETED", "PROCESSING_AI", "ARCHIVED"]
    );
    // The work item is acknowledged (a work-queue stream then drops it) and every state was
    // announced.
    stack.wait_work_queue_empty().await;
    let announced =
        common::testing::eventually("four status events", Duration::from_secs(5), || async {
            let m = stack.env.stream_messages(StreamKind::Status).await;
            (m.len() == 4).then_some(m)
        })
        .await;
    let last: serde_json::Value = serde_json::from_slice(&announced[3].payload).unwrap();
    assert_eq!(last["state"], "ARCHIVED");
    assert_eq!(last["sentiment"]["label"], "positive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_packets_are_marked_in_the_simulated_transcript() {
    let stack = stack(|_| {}).await;
    stack.packet("gaps-1", 0, "hello").await;
    stack.packet("gaps-1", 2, "world").await;
    stack.complete("gaps-1").await;

    let call = stack
        .wait_for("gaps-1", CallState::Archived, Duration::from_secs(20))
        .await;

    assert_eq!(call["transcript"], "hello […] world");
}

/// The request that completed a call is followed to its end: the transcriber's status events
/// carry the work item's `X-Request-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_of_the_completion_travels_on_the_transcribers_events() {
    let stack = stack(|_| {}).await;
    stack.packet("traced-1", 0, "hello").await;
    let response = stack
        .client
        .post(format!("{}/v1/call/traced-1/complete", stack.ingest_url))
        .header("x-request-id", "req-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stack
        .wait_for("traced-1", CallState::Archived, Duration::from_secs(20))
        .await;

    let statuses = common::testing::eventually(
        "the transcriber's status events",
        Duration::from_secs(10),
        || async {
            let all = stack.env.stream_messages(StreamKind::Status).await;
            let theirs: Vec<_> = all
                .into_iter()
                .filter(|m| {
                    let e: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    matches!(e["state"].as_str(), Some("PROCESSING_AI" | "ARCHIVED"))
                })
                .collect();
            (theirs.len() == 2).then_some(theirs)
        },
    )
    .await;
    for message in statuses {
        let header = message
            .headers
            .get(common::nats::REQUEST_ID_HEADER)
            .map(|v| v.as_str().to_owned());
        assert_eq!(header.as_deref(), Some("req-trace-1"));
    }
}

/// `AI_MAX_REQUESTS_PER_SEC`: past the burst, provider requests wait their turn (the calls
/// are not failed or refused meanwhile). 4 a second and 9 calls, the AI answering at once:
/// the last call is archived at least a second after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_rate_limit_spaces_requests_and_every_call_still_finishes() {
    let stack = stack(|c| {
        c.ai.max_requests_per_sec = 4;
        c.ai.latency_ms = "0-0".parse().unwrap();
    })
    .await;
    let ids: Vec<String> = (0..9).map(|i| format!("rate-{i}")).collect();
    for id in &ids {
        stack.call(id, &["hello"]).await;
    }
    for id in &ids {
        let call = stack
            .wait_for(id, CallState::Archived, Duration::from_secs(30))
            .await;
        assert_eq!(call["ai_attempts"], 1, "{call}");
    }
    let span: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(at) - min(at))::float8 \
         FROM call_transitions WHERE to_state = 'ARCHIVED'",
    )
    .fetch_one(&stack.env.pool)
    .await
    .unwrap();
    assert!(
        span >= 1.0,
        "9 requests at 4 a second (bursts of 4) span at least 1.25 s, not {span:.3} s"
    );
}
