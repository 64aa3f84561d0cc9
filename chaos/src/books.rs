//! The books: after a scenario, what Postgres and JetStream hold is checked against what the
//! clients were told. Every acknowledged packet is stored once and published once (by
//! `Nats-Msg-Id`); every stored packet is published; every completed call is final with one
//! transcript write and at most one dead letter; every transition's status event is in the
//! status stream once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures::StreamExt;
use serde::Serialize;
use wire::subjects::StreamKind;

use crate::{
    load::LoadReport,
    stack::{Stack, key},
};

#[derive(Debug, Default, Serialize, Clone)]
pub struct Books {
    pub packets_acknowledged: u64,
    /// Acknowledged but not in Postgres.
    pub packets_lost: u64,
    /// Rows in `packets` whose call counts a different number.
    pub counter_mismatches: u64,
    pub packets_stored: u64,
    /// Stored packets with no message in the packets stream.
    pub packets_unpublished: u64,
    /// Packets with more than one message in the packets stream.
    pub packets_published_twice: u64,
    pub calls_completed: u64,
    pub calls_archived: u64,
    pub calls_failed: u64,
    /// Completed calls not `ARCHIVED` or `FAILED` at the end.
    pub calls_unfinished: u64,
    /// Calls with more than one transcript write (transition to `ARCHIVED`).
    pub calls_transcribed_twice: u64,
    /// Calls with more than one dead letter.
    pub calls_dead_lettered_twice: u64,
    pub status_events: u64,
    /// Transitions whose status event is not in the status stream.
    pub status_events_missing: u64,
    pub status_events_twice: u64,
    /// AI requests per call (the fake provider's count), and calls asked more than once.
    pub ai_requests: u64,
    pub calls_with_repeated_ai_requests: u64,
    /// Calls whose AI requests outnumber their counted attempts.
    pub attempts_uncounted: u64,
    /// Calls that took more than one attempt.
    pub calls_retried: u64,
    /// AI requests whose audio did not carry the packets as sent.
    pub ai_requests_unreadable: u64,
}

impl Books {
    /// The promises every scenario must keep; each broken one as a sentence.
    pub fn broken(&self) -> Vec<String> {
        let mut broken = Vec::new();
        let mut check = |count: u64, what: &str| {
            if count > 0 {
                broken.push(format!("{count} {what}"));
            }
        };
        check(self.packets_lost, "acknowledged packets lost");
        check(self.counter_mismatches, "calls whose packet count is wrong");
        check(self.packets_unpublished, "stored packets not in JetStream");
        check(self.packets_published_twice, "packets in JetStream twice");
        check(self.calls_unfinished, "completed calls not final");
        check(self.calls_transcribed_twice, "calls transcribed twice");
        check(self.calls_dead_lettered_twice, "calls dead-lettered twice");
        check(self.status_events_missing, "status events missing");
        check(self.status_events_twice, "status events published twice");
        check(self.attempts_uncounted, "calls with uncounted AI attempts");
        check(
            self.ai_requests_unreadable,
            "AI requests whose audio was not what was sent",
        );
        broken
    }
}

/// Waits until every call of the load that was completed is `ARCHIVED` or `FAILED` (or the
/// deadline passes); returns how long it took.
pub async fn wait_final(stack: &Stack, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM calls WHERE state NOT IN ('ARCHIVED', 'FAILED')",
        )
        .fetch_one(&stack.pool)
        .await?;
        if open == 0 || Instant::now() > deadline {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Message ids (`Nats-Msg-Id`) in a stream, with how often each occurs.
pub async fn message_ids(
    js: &jetstream::Context,
    stack: &Stack,
    kind: StreamKind,
) -> anyhow::Result<HashMap<String, u32>> {
    let mut ids = HashMap::new();
    let Ok(mut stream) = js.get_stream(stack.subjects.stream_name(kind)).await else {
        return Ok(ids);
    };
    let last = stream.info().await?.state.last_sequence;
    if last == 0 {
        return Ok(ids);
    }
    let consumer = stream
        .create_consumer(OrderedConfig::default())
        .await
        .context("an ordered consumer to read the stream")?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .context("reading the stream stalled")?
    {
        let message = message?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        *ids.entry(id).or_default() += 1;
        if message.info().map_err(anyhow::Error::msg)?.stream_sequence >= last {
            break;
        }
    }
    Ok(ids)
}

/// Checks the books of a scenario: `loads` are what clients were told (if the load was this
/// tool's own; `pbx bench` loads are checked by store against stream only).
pub async fn check(stack: &Stack, loads: &[&LoadReport]) -> anyhow::Result<Books> {
    let mut books = Books::default();
    // Final calls' packets may be compacted already: both forms count.
    let stored = common::audio::all_stored_keys(&stack.pool).await?;
    books.packets_stored = stored.len() as u64;
    let stored_set: HashSet<(String, i64)> = stored.iter().cloned().collect();
    for load in loads {
        for call in &load.calls {
            books.packets_acknowledged += call.acked.len() as u64;
            books.packets_lost += call
                .acked
                .iter()
                .filter(|(seq, _)| !stored_set.contains(&(key(&call.call_id), *seq)))
                .count() as u64;
        }
    }
    books.counter_mismatches = sqlx::query_scalar(
        "SELECT count(*) FROM calls c
         WHERE c.packets_received <> (SELECT count(*) FROM packets p WHERE p.call_id = c.call_id) \
             + COALESCE((SELECT a.packets FROM call_audio a WHERE a.call_id = c.call_id), 0)",
    )
    .fetch_one(&stack.pool)
    .await
    .map(|n: i64| n as u64)?;

    let js = common::nats::jetstream(
        common::nats::connect(&stack.nats_url, "switchboard-chaos-books").await?,
    );
    let published = message_ids(&js, stack, StreamKind::Packets).await?;
    for (call_id, seq) in &stored {
        match published.get(&format!("{call_id}:{seq}")) {
            None => books.packets_unpublished += 1,
            Some(n) if *n > 1 => books.packets_published_twice += 1,
            Some(_) => {}
        }
    }
    check_calls(stack, &js, &mut books).await?;
    check_ai(stack, loads, &mut books).await?;
    Ok(books)
}

async fn check_calls(
    stack: &Stack,
    js: &jetstream::Context,
    books: &mut Books,
) -> anyhow::Result<()> {
    let calls: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT call_id, state, ai_attempts FROM calls WHERE completed_at IS NOT NULL",
    )
    .fetch_all(&stack.pool)
    .await?;
    books.calls_completed = calls.len() as u64;
    for (_, state, attempts) in &calls {
        match state.as_str() {
            "ARCHIVED" => books.calls_archived += 1,
            "FAILED" => books.calls_failed += 1,
            _ => books.calls_unfinished += 1,
        }
        if *attempts > 1 {
            books.calls_retried += 1;
        }
    }
    // A transcript is written by an attempt that succeeded (fenced on its attempt number):
    // two succeeded attempts of one call would be two writes. (`ARCHIVED` is final, so the
    // history alone could never show it twice.)
    books.calls_transcribed_twice = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT call_id FROM transcription_attempts
         WHERE outcome = 'succeeded' GROUP BY call_id HAVING count(*) > 1) twice",
    )
    .fetch_one(&stack.pool)
    .await
    .map(|n: i64| n as u64)?;

    let transitions: Vec<(String, i64)> =
        sqlx::query_as("SELECT call_id, version FROM call_transitions")
            .fetch_all(&stack.pool)
            .await?;
    let events = message_ids(js, stack, StreamKind::Status).await?;
    books.status_events = transitions.len() as u64;
    for (call_id, version) in &transitions {
        match events.get(&format!("{call_id}:{version}")) {
            None => books.status_events_missing += 1,
            Some(n) if *n > 1 => books.status_events_twice += 1,
            Some(_) => {}
        }
    }
    let letters = message_ids(js, stack, StreamKind::DeadLetters).await?;
    let mut per_call: BTreeMap<String, u32> = BTreeMap::new();
    for (id, n) in letters {
        let call = id
            .rsplit_once(':')
            .map_or(id.as_str(), |(c, _)| c)
            .to_owned();
        *per_call.entry(call).or_default() += n;
    }
    // One dead letter per round that failed: none for a call that never failed, two for one
    // re-driven and failed again.
    let rounds: HashMap<String, i64> = sqlx::query_as(
        "SELECT call_id, count(*) FILTER (WHERE to_state = 'FAILED') FROM call_transitions GROUP BY call_id",
    )
    .fetch_all(&stack.pool)
    .await?
    .into_iter()
    .collect();
    books.calls_dead_lettered_twice = per_call
        .iter()
        .filter(|(call, n)| i64::from(**n) > rounds.get(*call).copied().unwrap_or(0))
        .count() as u64;
    Ok(())
}

async fn check_ai(stack: &Stack, loads: &[&LoadReport], books: &mut Books) -> anyhow::Result<()> {
    let requests = stack.ai.requests();
    books.ai_requests = requests.values().map(|n| u64::from(*n)).sum();
    books.calls_with_repeated_ai_requests = requests.values().filter(|n| **n > 1).count() as u64;
    books.ai_requests_unreadable = stack.ai.unreadable();
    let attempts: HashMap<String, i32> = sqlx::query_as("SELECT call_id, ai_attempts FROM calls")
        .fetch_all(&stack.pool)
        .await?
        .into_iter()
        .collect();
    for load in loads {
        for call in &load.calls {
            let asked = requests.get(&call.number).copied().unwrap_or(0);
            let counted = attempts.get(&key(&call.call_id)).copied().unwrap_or(0);
            if i64::from(asked) > i64::from(counted) {
                books.attempts_uncounted += 1;
            }
        }
    }
    Ok(())
}
