use std::time::Duration;

use axum::http::StatusCode;
use common::{CallState, subjects::StreamKind, testing::eventually};
use futures::future::join_all;
use time::OffsetDateTime;
use transcriber::config::{ProviderKind, TranscriberConfig};

use crate::helpers::{ingest_only, mulaw_frame, stack, start_fake};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_request_fails_the_call_fails_after_max_attempts_with_growing_gaps() {
    let stack = stack(|c| {
        c.ai.failure_rate = 1.0;
        c.max_attempts = 5;
        c.backoff_base_ms = 100;
        c.backoff_max_ms = 10_000;
    })
    .await;

    stack.call("doomed-1", &["hello"]).await;
    let call = stack
        .wait_for("doomed-1", CallState::Failed, Duration::from_secs(30))
        .await;

    assert_eq!(call["ai_attempts"], 5);
    assert_eq!(call["last_error"], "503 Service Unavailable");
    let attempts: Vec<(i32, OffsetDateTime, Option<String>)> = sqlx::query_as(
        "SELECT attempt, started_at, outcome FROM transcription_attempts \
         WHERE call_id = 'acme.doomed-1' ORDER BY attempt",
    )
    .fetch_all(&stack.env.pool)
    .await
    .unwrap();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.2.as_deref().unwrap()).collect();
    assert_eq!(outcomes, ["retry", "retry", "retry", "retry", "failed"]);
    // The gap before attempt n+1 is the backoff after attempt n: 100 ms x 2^(n-1), +-20%,
    // plus the time an attempt takes (1-5 ms here) and JetStream's redelivery.
    for (n, pair) in attempts.windows(2).enumerate() {
        let gap = (pair[1].1 - pair[0].1).as_seconds_f64();
        let nominal = 0.1 * 2f64.powi(n as i32);
        assert!(
            gap >= nominal * 0.8 && gap <= nominal * 1.2 + 0.5,
            "gap after attempt {} was {gap:.3} s, scheduled {nominal:.3} s +-20%",
            n + 1
        );
    }
    // Retries were announced, each with a new version and the next attempt's time.
    let history = call["history"].as_array().unwrap();
    let retries = history
        .iter()
        .filter(|h| h["reason"] == "ai_retry_scheduled")
        .count();
    assert_eq!(retries, 4);
    let dead = eventually("the dead letter", Duration::from_secs(5), || async {
        let m = stack.env.stream_messages(StreamKind::DeadLetters).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(letter["call_id"], "doomed-1");
    assert_eq!(letter["attempts"], 5);
    assert_eq!(letter["permanent"], false);
    assert_eq!(
        dead[0].subject.as_str(),
        format!("{}.dlq.transcribe.acme.doomed-1", stack.env.config.prefix)
    );
    // Terminated: the work queue is empty, nothing will redeliver it.
    stack.wait_work_queue_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quarter_of_requests_failing_every_call_is_archived_exactly_once() {
    const CALLS: usize = 300;
    let stack = stack(|c| {
        c.ai.failure_rate = 0.25;
        c.ai.seed = Some(7);
        c.concurrency = 16;
        c.max_attempts = 12;
        c.backoff_base_ms = 10;
        c.backoff_max_ms = 100;
    })
    .await;

    let ids: Vec<String> = (0..CALLS).map(|i| format!("bulk-{i}")).collect();
    for chunk in ids.chunks(50) {
        join_all(chunk.iter().map(|id| stack.call(id, &["hello", "there"]))).await;
    }

    eventually("every call archived", Duration::from_secs(120), || async {
        let archived: i64 =
            sqlx::query_scalar("SELECT count(*) FROM calls WHERE state = 'ARCHIVED'")
                .fetch_one(&stack.env.pool)
                .await
                .unwrap();
        (archived == CALLS as i64).then_some(())
    })
    .await;
    let archivals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM call_transitions WHERE to_state = 'ARCHIVED'")
            .fetch_one(&stack.env.pool)
            .await
            .unwrap();
    assert_eq!(archivals, CALLS as i64, "each call archived exactly once");
    let successes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transcription_attempts WHERE outcome = 'succeeded'",
    )
    .fetch_one(&stack.env.pool)
    .await
    .unwrap();
    assert_eq!(
        successes, CALLS as i64,
        "one successful AI request per call"
    );
    let retries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transcription_attempts WHERE outcome = 'retry'")
            .fetch_one(&stack.env.pool)
            .await
            .unwrap();
    assert!(retries > 0, "a 25% failure rate produced retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_retried_by_an_operator_is_archived() {
    let mut stack = ingest_only().await;
    let failing = stack
        .add_transcriber(|c| {
            c.ai.failure_rate = 1.0;
            c.max_attempts = 2;
        })
        .await;
    stack.call("redrive-1", &["please", "work"]).await;
    stack
        .wait_for("redrive-1", CallState::Failed, Duration::from_secs(20))
        .await;
    let (status, body) = stack.post("/v1/call/redrive-1/complete").await;
    assert_eq!((status, body["changed"].as_bool()), (200, Some(false)));

    // The AI recovers; the operator re-drives the call.
    stack.transcribers[failing].terminate().await;
    stack.add_transcriber(|_| {}).await;
    let (status, body) = stack.post("/v1/call/redrive-1/retry").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "COMPLETED");
    assert_eq!(body["ai_attempts"], 0);

    let call = stack
        .wait_for("redrive-1", CallState::Archived, Duration::from_secs(20))
        .await;
    assert_eq!(call["transcript"], "please work");
    assert_eq!(call["ai_attempts"], 1);
    assert_eq!(call["last_error"], serde_json::Value::Null);

    let (status, body) = stack.post("/v1/call/redrive-1/retry").await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "call_not_failed");
    let (status, body) = stack.post("/v1/call/nobody/retry").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("call_not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_larger_than_the_audio_bound_fails_at_once_without_being_sent() {
    let stack = stack(|c| c.ai.max_audio_bytes = 100).await;
    let word = "x".repeat(40);

    // 80 bytes of packet data fit; 120 do not.
    stack.call("fits-1", &[&word, &word]).await;
    stack
        .wait_for("fits-1", CallState::Archived, Duration::from_secs(20))
        .await;
    stack.call("huge-1", &[&word, &word, &word]).await;
    let call = stack
        .wait_for("huge-1", CallState::Failed, Duration::from_secs(20))
        .await;

    assert_eq!(stack.transcribers[0].requests(), 1, "only fits-1 was sent");
    assert_eq!(call["ai_attempts"], 1);
    let error = call["last_error"].as_str().unwrap();
    assert!(
        error.contains("120 bytes") && error.contains("AI_MAX_AUDIO_BYTES"),
        "{error}"
    );
    let last = call["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "audio_too_large", "{last}");
    let dead = eventually("the dead letter", Duration::from_secs(5), || async {
        let m = stack.env.stream_messages(StreamKind::DeadLetters).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(letter["call_id"], "huge-1");
    assert_eq!(letter["permanent"], true);
    stack.wait_work_queue_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_of_a_re_driven_call_is_its_own_and_a_late_item_of_an_earlier_round_is_dropped()
{
    let (url, fake) = start_fake(vec![(
        StatusCode::BAD_REQUEST,
        None,
        r#"{"error":{"message":"unsupported audio"}}"#,
    )])
    .await;
    let openai = |c: &mut TranscriberConfig| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url.clone();
        // One message at a time, in stream order: the late item is looked at first.
        c.concurrency = 1;
    };
    let mut stack = ingest_only().await;
    let first = stack.add_transcriber(openai).await;
    stack.mulaw_call("rounds-1", &[&mulaw_frame()]).await;
    stack
        .wait_for("rounds-1", CallState::Failed, Duration::from_secs(20))
        .await;
    stack.wait_work_queue_empty().await;
    let round_1 = stack.round("rounds-1").await;
    stack.transcribers[first].terminate().await;

    // Round 1's work item turns up again, late, just before an operator re-drives the call.
    stack
        .publish_work_item("rounds-1", round_1, "late-round-1")
        .await;
    let (status, body) = stack.post("/v1/call/rounds-1/retry").await;
    assert_eq!((status, body["state"].as_str()), (200, Some("COMPLETED")));
    let round_2 = stack.round("rounds-1").await;
    assert!(round_2 > round_1);
    stack.add_transcriber(openai).await;
    stack.wait_work_queue_empty().await;
    stack
        .wait_for("rounds-1", CallState::Failed, Duration::from_secs(20))
        .await;

    assert_eq!(fake.seen.lock().unwrap().len(), 2, "one request per round");
    let attempts: Vec<(i64, i32, Option<String>)> = sqlx::query_as(
        "SELECT work_version, attempt, outcome FROM transcription_attempts \
         WHERE call_id = 'acme.rounds-1' ORDER BY work_version, attempt",
    )
    .fetch_all(&stack.env.pool)
    .await
    .unwrap();
    let failed = Some("failed".to_owned());
    assert_eq!(
        attempts,
        [(round_1, 1, failed.clone()), (round_2, 1, failed)],
        "the late item started nothing"
    );
    let dead = eventually("two dead letters", Duration::from_secs(5), || async {
        let m = stack.env.stream_messages(StreamKind::DeadLetters).await;
        (m.len() >= 2).then_some(m)
    })
    .await;
    let versions: Vec<i64> = dead
        .iter()
        .map(|m| {
            let letter: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            letter["work_version"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(versions, [round_1, round_2], "one dead letter per round");
}

/// The work stream deleted under waiting calls (an operator's mistake, a lost JetStream node):
/// ingest's reconciler makes the stream again and puts back the work items of the calls still
/// waiting, once each, and a transcriber started afterwards finishes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_puts_back_work_items_lost_with_their_stream() {
    let mut stack = ingest_only().await;
    let ids = ["lost-1", "lost-2", "lost-3"];
    for id in ids {
        stack.call(id, &["hello", "again"]).await;
    }
    let pool = stack.env.pool.clone();
    eventually(
        "the work items published",
        Duration::from_secs(10),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM calls WHERE work_item_published_at IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 3).then_some(())
        },
    )
    .await;
    let js = stack.env.jetstream().await;
    js.delete_stream(stack.env.subjects().stream_name(StreamKind::Work))
        .await
        .unwrap();

    let reconciler = ingest::reconciler::Reconciler {
        cursor: Default::default(),
        publisher: common::outbox::Publisher::new(js, stack.env.subjects(), pool.clone()),
        pool: pool.clone(),
        streams: stack.env.config.streams.clone(),
        interval: Duration::from_secs(1),
        grace: Duration::ZERO,
    };
    assert_eq!(reconciler.reconcile_once().await.unwrap(), 3);
    // Found in the stream now: nothing more to put back.
    assert_eq!(reconciler.reconcile_once().await.unwrap(), 0);

    stack.add_transcriber(|_| {}).await;
    for id in ids {
        let call = stack
            .wait_for(id, CallState::Archived, Duration::from_secs(30))
            .await;
        assert_eq!(call["ai_attempts"], 1, "{call}");
    }
    assert_eq!(reconciler.reconcile_once().await.unwrap(), 0);
}

/// A running transcriber whose work stream is deleted makes its consumer again and goes on
/// with the calls completed afterwards (their work items wait in the outbox until the stream
/// is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcriber_follows_its_work_stream_being_deleted_and_made_again() {
    let stack = stack(|_| {}).await;
    stack.call("before", &["one"]).await;
    stack
        .wait_for("before", CallState::Archived, Duration::from_secs(20))
        .await;
    let js = stack.env.jetstream().await;
    js.delete_stream(stack.env.subjects().stream_name(StreamKind::Work))
        .await
        .unwrap();

    stack.call("after", &["two"]).await;
    let call = stack
        .wait_for("after", CallState::Archived, Duration::from_secs(60))
        .await;
    assert_eq!(call["transcript"], "two");
}

/// A call `call_id` of `packets` (sequence, word) that an AI failing every request sent to
/// FAILED and that ingest's compactor then turned into its record; returns the stack with a
/// working transcriber in the failing one's place, and that transcriber's index.
async fn failed_and_compacted(
    call_id: &str,
    packets: &[(i64, &str)],
) -> (crate::helpers::Stack, usize) {
    let mut stack = ingest_only().await;
    let failing = stack
        .add_transcriber(|c| {
            c.ai.failure_rate = 1.0;
            c.max_attempts = 1;
        })
        .await;
    for (seq, word) in packets {
        stack.packet(call_id, *seq, word).await;
    }
    stack.complete(call_id).await;
    stack
        .wait_for(call_id, CallState::Failed, Duration::from_secs(20))
        .await;
    eventually("the call compacted", Duration::from_secs(20), || async {
        let rows = stack
            .scalar("SELECT count(*) FROM packets WHERE call_id = $1", call_id)
            .await;
        let records = stack
            .scalar(
                "SELECT count(*) FROM call_audio WHERE call_id = $1",
                call_id,
            )
            .await;
        (rows == 0 && records == 1).then_some(())
    })
    .await;
    stack.transcribers[failing].terminate().await;
    let working = stack.add_transcriber(|_| {}).await;
    (stack, working)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_compacted_and_re_driven_from_its_compacted_record() {
    // Out of order, with a gap at 2 and characters of several bytes.
    let (stack, _) =
        failed_and_compacted("compact-1", &[(0, "héllo"), (3, "wörld"), (1, "thère")]).await;
    let (status, body) = stack.post("/v1/call/compact-1/retry").await;
    assert_eq!(status, 200, "{body}");
    let call = stack
        .wait_for("compact-1", CallState::Archived, Duration::from_secs(20))
        .await;
    // The simulated provider joins the packets' words in order and marks gaps: the record
    // gave it exactly the packets that were sent.
    assert_eq!(call["transcript"], "héllo thère […] wörld");
    assert_eq!(call["packets_received"], 3);
    assert_eq!(call["missing"], serde_json::json!([{"from": 2, "to": 2}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_audio_expired_fails_at_once_when_re_driven() {
    let (stack, working) = failed_and_compacted("expired-1", &[(0, "gone"), (1, "soon")]).await;
    // What AUDIO_RETENTION_DAYS does to the record (its partition dropped).
    sqlx::query("DELETE FROM call_audio WHERE call_id = 'acme.expired-1'")
        .execute(&stack.env.pool)
        .await
        .unwrap();
    let (status, body) = stack.post("/v1/call/expired-1/retry").await;
    assert_eq!(status, 200, "{body}");
    let call = stack
        .wait_for("expired-1", CallState::Failed, Duration::from_secs(20))
        .await;
    assert!(
        call["last_error"].as_str().unwrap().contains("expired"),
        "{call}"
    );
    assert_eq!(
        stack.transcribers[working].requests(),
        0,
        "nothing was sent to the AI"
    );
}
