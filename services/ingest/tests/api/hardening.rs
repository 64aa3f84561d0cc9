//! What a real deployment meets on its first day: PBXs that count from 1, very lossy calls,
//! packets stored while NATS is away, idle calls after an outage, settings that cannot work.

use std::time::Duration;

use common::{
    subjects::StreamKind,
    testing::{NatsServer, TestEnv, eventually},
};
use serde_json::{Value, json};

use crate::helpers::{call_id, spawn_app, spawn_app_with, status_and_body, test_config};

#[tokio::test]
async fn a_pbx_that_counts_from_one_sees_no_phantom_packet_zero() {
    let app = spawn_app_with(TestEnv::new().await, |c| c.sequence_start = 1).await;
    let id = call_id();
    for seq in 1..=5 {
        let (status, body) = status_and_body(app.post_packet(&id, seq, "w").await).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["missing"], json!([]), "{body}");
        assert_eq!(body["missing_packets"], 0);
    }
    let call = app.call(&id).await;
    assert_eq!(
        (call["missing_packets"].as_i64(), call["missing"].clone()),
        (Some(0), json!([]))
    );

    // Sequence 0 does not exist in this numbering.
    let (status, body) = status_and_body(app.post_packet(&id, 0, "w").await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "sequence");

    // Five packets numbered 1..=5 are a total of 5; a total of 4 contradicts them.
    let (status, body) =
        status_and_body(app.complete(&id, Some(json!({"total_packets": 4}))).await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "total_packets");
    let (status, body) =
        status_and_body(app.complete(&id, Some(json!({"total_packets": 7}))).await).await;
    assert_eq!(status, 200, "{body}");
    let call = app.call(&id).await;
    assert_eq!(call["missing_packets"], 2, "{call}");
    assert_eq!(call["missing"], json!([{"from": 6, "to": 7}]));
}

#[tokio::test]
async fn gaps_are_kept_exactly_as_packets_arrive_late_and_out_of_order() {
    let app = spawn_app().await;
    let id = call_id();
    for seq in [2, 3, 7, 10, 5] {
        assert_eq!(app.post_packet(&id, seq, "w").await.status(), 202);
    }
    let call = app.call(&id).await;
    assert_eq!(
        call["missing"],
        json!([{"from": 0, "to": 1}, {"from": 4, "to": 4}, {"from": 6, "to": 6}, {"from": 8, "to": 9}])
    );
    assert_eq!(call["missing_packets"], 6);
    // Late packets fill (and split) their gaps; a duplicate changes nothing.
    for seq in [0, 8, 5, 4] {
        assert_eq!(app.post_packet(&id, seq, "w").await.status(), 202);
    }
    let (_, body) = status_and_body(app.post_packet(&id, 6, "w").await).await;
    assert_eq!(
        body["missing"],
        json!([{"from": 1, "to": 1}, {"from": 9, "to": 9}])
    );
    assert_eq!(body["missing_packets"], 2);
    let gaps = app.count("SELECT count(*) FROM call_gaps").await;
    assert_eq!(gaps, 2);
}

#[tokio::test]
async fn a_very_lossy_call_answers_a_bounded_list_and_the_whole_count() {
    let app = spawn_app().await;
    let id = call_id();
    // Every other packet of 600: 300 gaps.
    let mut last = None;
    for seq in (1..600).step_by(2) {
        let (status, body) = status_and_body(app.post_packet(&id, seq, "w").await).await;
        assert_eq!(status, 202);
        last = Some(body);
    }
    let body = last.unwrap();
    assert_eq!(body["missing_packets"], 300);
    let listed = body["missing"].as_array().unwrap();
    assert_eq!(listed.len(), 100, "the answer lists the first 100 ranges");
    assert_eq!(listed[0], json!({"from": 0, "to": 0}));
    assert_eq!(listed[99], json!({"from": 198, "to": 198}));
    let call = app.call(&id).await;
    assert_eq!(call["missing_packets"], 300);
    assert_eq!(call["missing"].as_array().unwrap().len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_stored_while_nats_is_down_is_published_even_if_the_pbx_never_retries() {
    let mut nats = NatsServer::start();
    let app = spawn_app_with(TestEnv::with_nats_url(&nats.url()).await, |_| {}).await;
    let id = call_id();
    assert_eq!(app.post_packet(&id, 0, "a").await.status(), 202);
    nats.stop();
    let response = app
        .post_json(
            &format!("/v1/call/stream/{id}"),
            json!({"sequence": 1, "data": "b", "timestamp": 1111.0}),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        app.stored_packets(&id).await.len(),
        2,
        "stored before NATS was asked"
    );
    nats.resume();

    // No retry: the outbox relay publishes it, as stored.
    let messages = eventually(
        "the packet event to be republished",
        Duration::from_secs(30),
        || async {
            let messages = app.messages(StreamKind::Packets).await;
            (messages.len() == 2).then_some(messages)
        },
    )
    .await;
    assert_eq!(messages[1].1["sequence"], 1);
    assert_eq!(messages[1].1["timestamp"], 1111.0);
    assert_eq!(messages[1].2, format!("acme.{id}:1"));
    eventually(
        "the outbox to be empty",
        Duration::from_secs(30),
        || async { (app.count("SELECT count(*) FROM packet_outbox").await == 0).then_some(()) },
    )
    .await;

    // A late retry with another timestamp is a duplicate; the event keeps the first one.
    let (status, body) = status_and_body(
        app.post_json(
            &format!("/v1/call/stream/{id}"),
            json!({"sequence": 1, "data": "b", "timestamp": 2222.0}),
        )
        .await,
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("duplicate")));
    let messages = app.messages(StreamKind::Packets).await;
    assert_eq!(messages.len(), 2, "published once");
    assert_eq!(messages[1].1["timestamp"], 1111.0);
}

#[tokio::test]
async fn a_duplicate_is_published_with_what_was_stored_first() {
    use futures::StreamExt;
    let app = spawn_app().await;
    let id = call_id();
    let path = format!("/v1/call/stream/{id}");
    let first = json!({"sequence": 0, "data": "x", "timestamp": 10.0});
    assert_eq!(app.post_json(&path, first).await.status(), 202);
    // Every publish reaches plain subscribers, even one JetStream drops as a copy: this is
    // what a duplicate's publish carries.
    let nats = app.env.nats().await;
    let mut published = nats
        .subscribe(app.env.subjects().packets(&app.env.key(&id)))
        .await
        .unwrap();
    nats.flush().await.unwrap();

    let retry = json!({"sequence": 0, "data": "x", "timestamp": 20.0});
    let (status, body) = status_and_body(app.post_json(&path, retry).await).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("duplicate")));

    let message = tokio::time::timeout(Duration::from_secs(10), published.next())
        .await
        .expect("the duplicate is published")
        .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        event["timestamp"], 10.0,
        "the stored timestamp, not the retry's"
    );
    let messages = app.messages(StreamKind::Packets).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].1["timestamp"], 10.0);
}

#[tokio::test]
async fn a_packet_size_nats_would_refuse_is_refused_at_start_up_naming_both_settings() {
    let env = TestEnv::new().await;
    let mut config = test_config(&env);
    config.max_packet_bytes = 4 * 1024 * 1024; // NATS's default max_payload is 1 MiB
    let error = match ingest::App::build(config).await {
        Ok(_) => panic!("ingest started with packets NATS cannot carry"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("MAX_PACKET_BYTES"), "{error}");
    assert!(error.contains("max_payload"), "{error}");
}

/// Idle calls with `last_packet_at` an hour ago.
async fn idle_calls(app: &crate::helpers::TestApp, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|_| call_id()).collect();
    for id in &ids {
        assert_eq!(app.post_packet(id, 0, "w").await.status(), 202);
    }
    sqlx::query("UPDATE calls SET last_packet_at = now() - interval '1 hour'")
        .execute(&app.env.pool)
        .await
        .unwrap();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_idle_calls_and_complete_each_once() {
    let app = spawn_app().await;
    idle_calls(&app, 120).await;
    let publisher = common::outbox::Publisher::new(
        app.env.jetstream().await,
        app.env.subjects(),
        app.env.pool.clone(),
    );
    let idle = Duration::from_secs(60);
    // Two replicas' reapers at once, in passes of 25.
    let pool = app.env.pool.clone();
    let replica = |publisher: common::outbox::Publisher| {
        let pool = pool.clone();
        async move {
            let mut done = 0;
            loop {
                let n = ingest::reaper::reap_once(&pool, &publisher, idle, 25)
                    .await
                    .unwrap();
                if n == 0 {
                    return done;
                }
                done += n;
            }
        }
    };
    let (a, b) = tokio::join!(replica(publisher.clone()), replica(publisher.clone()));
    assert_eq!(a + b, 120, "every call completed once ({a} + {b})");
    assert_eq!(
        app.count("SELECT count(*) FROM call_transitions WHERE reason = 'idle_timeout'")
            .await,
        120
    );
    assert_eq!(
        app.count("SELECT count(*) FROM calls WHERE state = 'COMPLETED'")
            .await,
        120
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_costs_the_reaper_one_timeout_per_pass_not_one_per_call() {
    let mut nats = NatsServer::start();
    let app = spawn_app_with(TestEnv::with_nats_url(&nats.url()).await, |_| {}).await;
    idle_calls(&app, 50).await;
    let publisher = common::outbox::Publisher::new(
        app.env.jetstream().await,
        app.env.subjects(),
        app.env.pool.clone(),
    );
    nats.stop();
    // One publish timeout is 3 s; one per call would be minutes. This bounds a hang, it
    // does not time performance.
    let completed = tokio::time::timeout(
        Duration::from_secs(30),
        ingest::reaper::reap_once(&app.env.pool, &publisher, Duration::from_secs(60), 200),
    )
    .await
    .expect("a pass does not wait on NATS call by call")
    .unwrap();
    assert_eq!(completed, 50);
    nats.resume();
    // The outbox publishes the work items once NATS is back.
    eventually(
        "every work item published",
        Duration::from_secs(60),
        || async { (app.messages(StreamKind::Work).await.len() == 50).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn readiness_names_the_background_tasks() {
    let app = spawn_app().await;
    let (status, body) = status_and_body(app.get("/readyz").await).await;
    assert_eq!(status, 200);
    let tasks = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "background_tasks")
        .cloned();
    assert_eq!(tasks.unwrap()["ok"], true);
}

/// The request id a PBX sends (or ingest assigns) travels on what the request causes: the
/// packet event, the `first_packet` status event, the work item and the `COMPLETED` event.
#[tokio::test]
async fn the_request_id_travels_on_every_event_a_request_causes() {
    let app = spawn_app().await;
    let id = call_id();
    let send = |path: String, body: serde_json::Value, request: &'static str| {
        app.client
            .post(app.url(&path))
            .header("x-request-id", request)
            .json(&body)
            .send()
    };
    let packet = json!({"sequence": 0, "data": "a", "timestamp": 1.0});
    let response = send(format!("/v1/call/stream/{id}"), packet, "req-packet")
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let response = send(format!("/v1/call/{id}/complete"), json!({}), "req-complete")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let header = |m: &async_nats::jetstream::message::StreamMessage| {
        m.headers
            .get(common::nats::REQUEST_ID_HEADER)
            .map(|v| v.as_str().to_owned())
    };
    let packets = app.env.stream_messages(StreamKind::Packets).await;
    assert_eq!(header(&packets[0]).as_deref(), Some("req-packet"));
    let work = app.env.stream_messages(StreamKind::Work).await;
    assert_eq!(header(&work[0]).as_deref(), Some("req-complete"));
    let statuses = eventually("both status events", Duration::from_secs(10), || async {
        let s = app.env.stream_messages(StreamKind::Status).await;
        (s.len() == 2).then_some(s)
    })
    .await;
    let by_state: Vec<(String, Option<String>)> = statuses
        .iter()
        .map(|m| {
            let event: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (event["state"].as_str().unwrap().to_owned(), header(m))
        })
        .collect();
    assert!(
        by_state.contains(&("IN_PROGRESS".into(), Some("req-packet".into()))),
        "{by_state:?}"
    );
    assert!(
        by_state.contains(&("COMPLETED".into(), Some("req-complete".into()))),
        "{by_state:?}"
    );
}

/// A lossy call's packets arriving at two replicas in turn (a load balancer spreading one
/// PBX stream): each writer remembers the call's first gaps between batches, and must notice
/// that the other replica wrote the call meanwhile. Every answer lists exactly the gaps the
/// call has after that packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stay_exact_when_two_replicas_write_one_lossy_call() {
    let app = spawn_app().await;
    let other = ingest::testing::spawn(test_config(&app.env)).await;
    let id = call_id();
    // 0, 2, 4, ... (119 gaps: more than an answer lists), then some filled in from the top
    // (beyond the first 100) and some from the bottom (inside them), a third of them through
    // the other replica.
    let mut sequences: Vec<i64> = (0..240).step_by(2).collect();
    sequences.extend((1..240).rev().step_by(2).take(30));
    sequences.extend((1..80).step_by(2).take(30));
    let mut received = std::collections::BTreeSet::new();
    for (i, seq) in sequences.into_iter().enumerate() {
        let url = if i % 3 == 0 {
            format!("{}/v1/call/stream/{id}", other.url())
        } else {
            app.url(&format!("/v1/call/stream/{id}"))
        };
        let response = app
            .client
            .post(url)
            .json(&json!({"sequence": seq, "data": "x", "timestamp": seq as f64 * 0.02}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_body(response).await;
        assert_eq!(status, 202, "{body}");
        received.insert(seq);
        let highest = *received.last().unwrap();
        let truth: Vec<Value> = (0..highest)
            .filter(|s| !received.contains(s))
            .map(|s| json!({"from": s, "to": s}))
            .take(100)
            .collect();
        assert_eq!(
            body["missing"].as_array().unwrap(),
            &truth,
            "after sequence {seq} (packet {i})"
        );
    }
}

/// Overload is answered, not queued without end: with the writer stuck (Postgres holds the
/// packets table locked), packets get `503 overloaded` with `Retry-After` once
/// `INGEST_REQUEST_DEADLINE_MS` has passed, and the retries after the jam clears are stored
/// once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_answers_503_overloaded_within_the_deadline() {
    let app = spawn_app_with(TestEnv::new().await, |c| c.request_deadline_ms = 300).await;
    let (first, other) = (call_id(), call_id());
    assert_eq!(app.post_packet(&first, 0, "a").await.status(), 202);
    let mut jam = app.env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE packets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *jam)
        .await
        .unwrap();

    let (stuck, behind) = tokio::join!(
        app.post_packet(&first, 1, "b"),
        app.post_packet(&other, 0, "c")
    );
    for response in [stuck, behind] {
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("INGEST_REQUEST_DEADLINE_MS"),
            "{body}"
        );
    }

    jam.rollback().await.unwrap();
    // The PBX retries: each packet is stored exactly once (one may have been stored when the
    // lock went: its retry is then a duplicate).
    let (status, body) = status_and_body(app.post_packet(&first, 1, "b").await).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = status_and_body(app.post_packet(&other, 0, "c").await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.stored_packets(&first).await.len(), 2);
    assert_eq!(app.stored_packets(&other).await.len(), 1);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("switchboard_ingest_shed_total{reason=\"deadline\"}"),
        "{metrics}"
    );
}

/// A call whose row another transaction holds (a stuck completion, a long manual
/// transaction) costs its own packets a quick 503 and nobody else anything: the other calls'
/// packets in the same batches are stored, and once the lock goes the call streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_locked_elsewhere_does_not_hold_up_the_other_calls() {
    let app = spawn_app().await;
    let (held, other) = (call_id(), call_id());
    assert_eq!(app.post_packet(&held, 0, "a").await.status(), 202);
    let mut jam = app.env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM calls WHERE call_id = $1 FOR UPDATE")
        .bind(app.env.key(&held).as_str())
        .execute(&mut *jam)
        .await
        .unwrap();

    for seq in 0..5 {
        let (locked, flowing) = tokio::join!(
            app.post_packet(&held, seq + 1, "b"),
            app.post_packet(&other, seq, "c")
        );
        let (status, body) = status_and_body(flowing).await;
        assert_eq!(status, 202, "the other call flows: {body}");
        assert_eq!(locked.status(), 503);
        assert_eq!(locked.headers()["retry-after"], "1");
    }
    assert_eq!(app.stored_packets(&held).await.len(), 1);

    jam.rollback().await.unwrap();
    let (status, body) = status_and_body(app.post_packet(&held, 1, "b").await).await;
    // Within a second of being found held, the call is not waited for: retry until it is.
    let (status, body) = if status == 202 {
        (status, body)
    } else {
        eventually(
            "the call to take packets again",
            Duration::from_secs(10),
            || async {
                let (status, body) = status_and_body(app.post_packet(&held, 1, "b").await).await;
                (status == 202).then_some((status, body))
            },
        )
        .await
    };
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.stored_packets(&held).await.len(), 2);
}

/// Past `INGEST_MAX_IN_FLIGHT` requests being served, one more is answered `503 overloaded`
/// at once (it does not wait for the writer), naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_in_flight_limit_is_answered_503_at_once() {
    let app = spawn_app_with(TestEnv::new().await, |c| {
        c.max_in_flight = 1;
        c.request_deadline_ms = 2_000;
    })
    .await;
    let (stuck, other) = (call_id(), call_id());
    assert_eq!(app.post_packet(&stuck, 0, "a").await.status(), 202);
    let mut jam = app.env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE packets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *jam)
        .await
        .unwrap();
    // Two at once, while the writer is stuck: one takes the only place and waits for the
    // writer until its deadline; the other is answered at once.
    let timed = |call: String, seq: i64| {
        let app = &app;
        async move {
            let started = std::time::Instant::now();
            let (status, body) = status_and_body(app.post_packet(&call, seq, "b").await).await;
            (status, body, started.elapsed())
        }
    };
    let (first, second) = tokio::join!(timed(stuck.clone(), 1), timed(other.clone(), 0));
    let by_limit = |body: &Value| {
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("INGEST_MAX_IN_FLIGHT"))
    };
    let (shed, waited) = if by_limit(&first.1) {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(shed.0, 503, "{}", shed.1);
    assert!(by_limit(&shed.1), "{}", shed.1);
    assert_eq!(shed.1["error"]["code"], "overloaded", "{}", shed.1);
    assert!(shed.2 < Duration::from_secs(1), "shed after {:?}", shed.2);
    // The other waited for the stuck writer until its deadline.
    assert_eq!(waited.0, 503, "{}", waited.1);
    assert!(!by_limit(&waited.1), "{}", waited.1);
    jam.rollback().await.unwrap();
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("switchboard_ingest_shed_total{reason=\"in_flight\"}"),
        "{metrics}"
    );
}

/// Past `INGEST_MAX_CONNECTIONS` open connections, a new connection's API requests are
/// answered `503 overloaded` with `Connection: close` (health is still served on it), and
/// once a connection closes the next one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_is_answered_503_and_closed() {
    let app = spawn_app_with(TestEnv::new().await, |c| c.max_connections = 1).await;
    let call = call_id();
    // The test's own client holds the one place with its kept-alive connection.
    let holder = reqwest::Client::builder()
        .default_headers(app.env.auth_headers(common::Role::Admin).await)
        .build()
        .unwrap();
    let url = app.url(&format!("/v1/call/stream/{call}"));
    let packet = |seq: i64| serde_json::json!({"sequence": seq, "data": "a", "timestamp": 1.0});
    let held = holder.post(&url).json(&packet(0)).send().await.unwrap();
    assert_eq!(held.status(), 202);
    held.bytes().await.unwrap();

    let other = reqwest::Client::builder()
        .default_headers(app.env.auth_headers(common::Role::Admin).await)
        .build()
        .unwrap();
    let response = other.post(&url).json(&packet(1)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("INGEST_MAX_CONNECTIONS"),
        "{body}"
    );
    let health = other.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    drop(holder);
    let stored = eventually(
        "a new connection served once the first closed",
        Duration::from_secs(10),
        || async {
            let response = other.post(&url).json(&packet(1)).send().await.ok()?;
            (response.status() == 202).then_some(())
        },
    )
    .await;
    let () = stored;
    assert_eq!(app.stored_packets(&call).await.len(), 2);
}
