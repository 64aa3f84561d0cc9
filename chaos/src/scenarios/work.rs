//! Scenarios 7-9: the work after a call ends: the AI provider, the work queue, duplicates.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use wire::subjects::StreamKind;

use super::{Outcome, Run, secs, settle, settle_load};
use crate::{
    load::Load,
    stack::{Stack, StackOptions},
};

/// 7: the provider answers 503 to everything for `ai_down`, with the transcriber's default
/// retry policy; then it is back.
pub async fn ai_down(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(7);
    let stack = Stack::start(&run.ctx(), "s7", StackOptions::default()).await?;
    stack.ai.set_down(true);
    let report = Load::start(stack.ingest.url(), &stack.api_key, run.short_calls("s7"))
        .finish()
        .await;
    let down_until = Instant::now() + run.scale.ai_down;
    let mut failed_early: i64 = 0;
    while Instant::now() < down_until {
        tokio::time::sleep(Duration::from_secs(1).min(down_until - Instant::now())).await;
        failed_early = sqlx::query_scalar("SELECT count(*) FROM calls WHERE state = 'FAILED'")
            .fetch_one(&stack.pool)
            .await?;
        if failed_early > 0 {
            break;
        }
    }
    stack.ai.set_down(false);
    outcome.figure("provider down", secs(run.scale.ai_down));
    outcome.figure("requests refused while down", stack.ai.refused());
    outcome.require(
        failed_early == 0,
        format!("{failed_early} calls FAILED while the provider was down"),
    );
    outcome.load(&report);
    let max_attempts: i32 = sqlx::query_scalar("SELECT coalesce(max(ai_attempts), 0) FROM calls")
        .fetch_one(&stack.pool)
        .await?;
    outcome.figure(
        "most attempts of a call (at the end of the outage)",
        max_attempts,
    );
    // The longest backoff (120 s, +20% jitter) plus the work itself.
    settle(
        run,
        stack,
        &mut outcome,
        &[&report],
        Duration::from_secs(200),
    )
    .await?;
    if let Some(books) = outcome.books.clone() {
        let all = books.calls_archived == books.calls_completed;
        outcome.require(all, "not every call ARCHIVED after the provider came back");
    }
    Ok(outcome)
}

/// 8: the work-queue stream (and the transcriber's consumer with it) deleted while it holds
/// the work items of completed calls; the reconciler must put them back.
pub async fn delete_work_stream(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(8);
    let mut stack = Stack::start(&run.ctx(), "s8", StackOptions::default()).await?;
    // Nobody consumes the work items while they are deleted.
    stack.transcribers[0].terminate().await?;
    let report = Load::start(stack.ingest.url(), &stack.api_key, run.short_calls("s8"))
        .finish()
        .await;
    let calls = u64::from(report.plan.calls);
    let js = common::nats::jetstream(common::nats::connect(&stack.nats_url, "chaos").await?);
    let name = stack.subjects.stream_name(StreamKind::Work);
    wait_for_messages(&js, &name, calls, Duration::from_secs(30)).await?;
    js.delete_stream(&name).await?;
    let deleted = Instant::now();
    let back = wait_for_messages(&js, &name, calls, Duration::from_secs(120)).await;
    let recreated = deleted.elapsed();
    outcome.figure("deletion to every work item back", secs(recreated));
    outcome.require(
        back.is_ok() && recreated <= Duration::from_secs(60),
        format!(
            "the work items were not back within a minute ({:.0} s)",
            recreated.as_secs_f64()
        ),
    );
    stack.transcribers[0].start().await?;
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(120)).await?;
    Ok(outcome)
}

async fn wait_for_messages(
    js: &async_nats::jetstream::Context,
    stream: &str,
    count: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut s) = js.get_stream(stream).await
            && s.info().await?.state.messages >= count
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{stream} did not hold {count} messages within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 9: every work item and status event is published a second time under another message id
/// (JetStream's dedup cannot catch it), as a broker redelivery or a publisher's retry would.
pub async fn deliver_twice(run: &mut Run) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(9);
    let stack = Stack::start(&run.ctx(), "s9", StackOptions::default()).await?;
    stack.ai.set_latency(Duration::from_millis(200));
    let client = common::nats::connect(&stack.nats_url, "chaos-duplicator").await?;
    let js = common::nats::jetstream(client.clone());
    let mut originals = client
        .subscribe(format!("{}.calls.>", stack.prefix))
        .await?;
    let copies = Arc::new(AtomicU64::new(0));
    let copied = copies.clone();
    let duplicator = tokio::spawn(async move {
        while let Some(message) = originals.next().await {
            let Some(headers) = message.headers.clone() else {
                continue;
            };
            if headers.get("Chaos-Copy").is_some() || message.subject.contains(".progress.") {
                continue;
            }
            let id = headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            let mut headers = headers;
            headers.insert("Nats-Msg-Id", format!("copy-{id}").as_str());
            headers.insert("Chaos-Copy", "1");
            let publish = js
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await;
            if let Ok(ack) = publish
                && ack.await.is_ok()
            {
                copied.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let report = Load::start(stack.ingest.url(), &stack.api_key, run.short_calls("s9"))
        .finish()
        .await;
    settle_load(run, stack, &mut outcome, &report, Duration::from_secs(120)).await?;
    duplicator.abort();
    let copies = copies.load(Ordering::SeqCst);
    outcome.figure("copies published", copies);
    outcome.require(copies > 0, "no copy was published");
    if let Some(books) = outcome.books.clone() {
        let repeated = books.calls_with_repeated_ai_requests;
        outcome.figure("calls asked of the AI twice", repeated);
        outcome.require(
            repeated == 0,
            format!("{repeated} calls sent to the AI twice"),
        );
    }
    Ok(outcome)
}
