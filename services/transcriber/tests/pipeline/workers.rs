use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use axum::http::StatusCode;
use bytes::Bytes;
use common::{CallState, nats, subjects::StreamKind, testing::eventually};
use tokio_util::sync::CancellationToken;
use transcriber::config::ProviderKind;

use crate::helpers::{ingest_only, mulaw_frame, stack, start_fake, transcriber_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_work_item_delivered_twice_makes_one_ai_request() {
    let stack = stack(|c| c.ai.latency_ms = "300-300".parse().unwrap()).await;
    stack.call("twice-1", &["once", "only"]).await;
    // The same work item again, past JetStream's dedup (as after the dedup window).
    let original = eventually("the work item", Duration::from_secs(5), || async {
        stack
            .env
            .stream_messages(StreamKind::Work)
            .await
            .into_iter()
            .next()
    })
    .await;
    let js = stack.env.jetstream().await;
    nats::publish(
        &js,
        original.subject.to_string(),
        "a-different-msg-id",
        Bytes::from(original.payload.to_vec()),
        None,
    )
    .await
    .unwrap();

    stack
        .wait_for("twice-1", CallState::Archived, Duration::from_secs(20))
        .await;
    stack.wait_work_queue_empty().await;

    assert_eq!(stack.transcribers[0].requests(), 1, "one AI request");
    assert_eq!(
        stack.scalar("SELECT count(*) FROM call_transitions WHERE call_id = $1 AND to_state = 'ARCHIVED'", "twice-1").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_mid_call_is_replaced_and_the_call_is_transcribed_once() {
    let mut stack = ingest_only().await;
    // Worker A runs in a runtime of its own, so the test can kill it like a crashed process:
    // its tasks are dropped mid-call, nothing is acknowledged or handed back.
    let mut config = transcriber_config(&stack.env);
    config.ai.latency_ms = "60000-60000".parse().unwrap();
    config.ai.timeout_ms = 1_500;
    let killed = CancellationToken::new();
    let kill = killed.clone();
    let worker_a = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = transcriber::App::build(config).await.unwrap();
            tokio::select! {
                _ = app.run_until_stopped(CancellationToken::new()) => {}
                _ = kill.cancelled() => {}
            }
        });
        runtime.shutdown_background();
    });
    stack.call("crash-1", &["still", "here"]).await;
    stack
        .wait_for("crash-1", CallState::ProcessingAi, Duration::from_secs(10))
        .await;
    killed.cancel();
    worker_a.join().unwrap();

    stack.add_transcriber(|_| {}).await;
    let call = stack
        .wait_for("crash-1", CallState::Archived, Duration::from_secs(20))
        .await;

    assert_eq!(call["transcript"], "still here");
    assert_eq!(call["ai_attempts"], 2, "A's unfinished attempt, then B's");
    assert_eq!(
        stack.scalar("SELECT count(*) FROM call_transitions WHERE call_id = $1 AND to_state = 'ARCHIVED'", "crash-1").await,
        1
    );
    let outcomes: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT outcome FROM transcription_attempts WHERE call_id = 'acme.crash-1' ORDER BY attempt",
    )
    .fetch_all(&stack.env.pool)
    .await
    .unwrap();
    assert_eq!(outcomes, [None, Some("succeeded".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_a_call_past_the_grace_period_is_handed_back_and_finished_elsewhere() {
    let mut stack = stack(|c| {
        c.ai.latency_ms = "60000-60000".parse().unwrap();
        c.ai.timeout_ms = 90_000;
        c.ack_wait_secs = 120;
        c.shutdown_grace_secs = 1;
    })
    .await;
    stack.call("handback-1", &["hand", "back"]).await;
    stack
        .wait_for(
            "handback-1",
            CallState::ProcessingAi,
            Duration::from_secs(10),
        )
        .await;

    let took = stack.transcribers[0].terminate().await;
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );

    // Handed back: the next worker starts at once instead of waiting out the 120 s ack wait.
    stack.add_transcriber(|_| {}).await;
    let call = stack
        .wait_for("handback-1", CallState::Archived, Duration::from_secs(20))
        .await;
    assert_eq!(
        call["ai_attempts"], 1,
        "the handed-back attempt does not count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_in_flight_calls_finish_within_the_grace_period() {
    let mut stack = stack(|c| c.ai.latency_ms = "800-800".parse().unwrap()).await;
    stack.call("finish-1", &["almost", "done"]).await;
    stack
        .wait_for("finish-1", CallState::ProcessingAi, Duration::from_secs(10))
        .await;

    stack.transcribers[0].terminate().await;

    let call = stack.get_call("finish-1").await;
    assert_eq!(call["state"], "ARCHIVED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ack_wait_updates_the_existing_consumer() {
    let mut stack = stack(|c| c.ack_wait_secs = 2).await;
    stack.add_transcriber(|c| c.ack_wait_secs = 7).await;

    let js = stack.env.jetstream().await;
    let stream = js
        .get_stream(stack.env.subjects().stream_name(StreamKind::Work))
        .await
        .unwrap();
    let mut consumer: PullConsumer = stream.get_consumer("transcriber").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(info.config.max_deliver, -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_packet_load_keeps_the_call_and_is_not_taken_over() {
    let stack = stack(|_| {}).await;
    stack.packet("slow-load-1", 0, "slow").await;
    stack.packet("slow-load-1", 1, "disk").await;
    // Reads of packets wait until the test lets them, as on a very slow disk.
    let mut blocker = stack.env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE packets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    stack.complete("slow-load-1").await;
    stack
        .wait_for(
            "slow-load-1",
            CallState::ProcessingAi,
            Duration::from_secs(10),
        )
        .await;
    let first_lease: time::OffsetDateTime =
        sqlx::query_scalar("SELECT ai_lease_until FROM calls WHERE call_id = 'acme.slow-load-1'")
            .fetch_one(&stack.env.pool)
            .await
            .unwrap();

    // Well past the claim's lease (and the 2 s ack wait), still held by its first attempt.
    eventually(
        "the lease renewed past its first term",
        Duration::from_secs(10),
        || async {
            let renewed: bool = sqlx::query_scalar(
                "SELECT now() > $1 + interval '1 second' AND ai_lease_until > now() \
                    AND ai_attempts = 1 \
                 FROM calls WHERE call_id = 'acme.slow-load-1'",
            )
            .bind(first_lease)
            .fetch_one(&stack.env.pool)
            .await
            .unwrap();
            renewed.then_some(())
        },
    )
    .await;
    blocker.rollback().await.unwrap();
    let call = stack
        .wait_for("slow-load-1", CallState::Archived, Duration::from_secs(20))
        .await;

    assert_eq!(call["transcript"], "slow disk");
    assert_eq!(call["ai_attempts"], 1, "never taken over");
    assert_eq!(stack.transcribers[0].requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_item_delivered_before_its_retry_is_due_waits_for_it() {
    let (url, fake) = start_fake(vec![
        (StatusCode::SERVICE_UNAVAILABLE, Some("2"), "{}"),
        (StatusCode::OK, None, r#"{"text":"right on time"}"#),
    ])
    .await;
    let stack = stack(|c| {
        c.ai.provider = ProviderKind::Openai;
        c.ai.base_url = url;
        c.backoff_base_ms = 10;
        c.backoff_max_ms = 10_000;
    })
    .await;
    stack.mulaw_call("early-1", &[&mulaw_frame()]).await;
    eventually("the retry scheduled", Duration::from_secs(10), || async {
        let waiting: bool = sqlx::query_scalar(
            "SELECT next_attempt_at IS NOT NULL AND ai_lease_until IS NULL \
             FROM calls WHERE call_id = 'acme.early-1'",
        )
        .fetch_one(&stack.env.pool)
        .await
        .unwrap();
        waiting.then_some(())
    })
    .await;

    // The same round's work item again, long before the retry is due.
    let round = stack.round("early-1").await;
    stack
        .publish_work_item("early-1", round, "early-duplicate")
        .await;
    stack
        .wait_for("early-1", CallState::Archived, Duration::from_secs(20))
        .await;
    stack.wait_work_queue_empty().await;

    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one retry");
    let gap = seen[1].0 - seen[0].0;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    let early: i64 = stack
        .scalar(
            "SELECT count(*) FROM transcription_attempts a, transcription_attempts b \
             WHERE a.call_id = $1 AND b.call_id = a.call_id AND a.attempt = 1 \
               AND b.attempt = 2 AND b.started_at < a.next_attempt_at",
            "early-1",
        )
        .await;
    assert_eq!(early, 0, "attempt 2 did not start before it was due");
}

/// With room for one call's audio at a time, calls wait for the budget (acknowledging
/// progress, so none is redelivered) instead of loading all at once, and all get done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_the_audio_budget_and_all_get_done() {
    let stack = stack(|c| {
        c.ai.latency_ms = "300-300".parse().unwrap();
        c.ai.max_audio_bytes = 100;
        c.max_audio_in_flight_bytes = 100;
        c.concurrency = 4;
    })
    .await;
    let word = "x".repeat(40);
    for call in ["budget-1", "budget-2", "budget-3"] {
        stack.call(call, &[&word, &word]).await;
    }
    for call in ["budget-1", "budget-2", "budget-3"] {
        let done = stack
            .wait_for(call, CallState::Archived, Duration::from_secs(30))
            .await;
        assert_eq!(
            done["ai_attempts"], 1,
            "no call was taken over while it waited"
        );
    }
    assert_eq!(stack.transcribers[0].requests(), 3);
    let metrics = common::telemetry::prometheus().render();
    let waits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("switchboard_transcriber_audio_budget_waits_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(waits >= 1.0, "a call waited for the budget:\n{metrics}");
}
