use std::time::Duration;

use common::{CallState, testing::eventually};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

use crate::helpers::{event, next, notifier, send};

#[tokio::test]
async fn a_socket_gets_a_snapshot_then_every_change_in_order() {
    let n = notifier(|_| {}).await;
    n.publish(&event("c1", 1, CallState::InProgress)).await;
    n.publish(&event("other", 1, CallState::InProgress)).await;
    n.wait_applied(2).await;
    let mut ws = n.connect("").await;

    let snapshot = next(&mut ws).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["reset"], false);
    assert_eq!(snapshot["calls"].as_array().unwrap().len(), 2);
    let c1 = snapshot["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["call_id"] == "c1")
        .unwrap();
    assert_eq!(c1["state"], "IN_PROGRESS");
    let mut seq = snapshot["seq"].as_u64().unwrap();

    for (version, state) in [
        (2, CallState::Completed),
        (3, CallState::ProcessingAi),
        (4, CallState::Archived),
    ] {
        n.publish(&event("c1", version, state)).await;
        let frame = next(&mut ws).await;
        assert_eq!(frame["type"], "status");
        assert_eq!(frame["call_id"], "c1");
        assert_eq!(frame["state"], state.as_str());
        assert_eq!(frame["version"], version);
        let frame_seq = frame["seq"].as_u64().unwrap();
        assert!(frame_seq > seq, "sequences grow");
        seq = frame_seq;
    }
    // A late, older event never moves the call back.
    n.publish(&event("c1", 2, CallState::Completed)).await;
    n.publish(&event("c1", 5, CallState::Failed)).await;
    let frame = next(&mut ws).await;
    assert_eq!(
        (frame["version"].as_i64(), frame["state"].as_str()),
        (Some(5), Some("FAILED"))
    );
}

#[tokio::test]
async fn sockets_can_be_limited_by_query_and_by_subscribe_messages() {
    let n = notifier(|_| {}).await;
    n.publish(&event("a", 1, CallState::InProgress)).await;
    n.publish(&event("b", 1, CallState::InProgress)).await;
    n.wait_applied(2).await;

    let mut only_a = n.connect("?call_id=a").await;
    let snapshot = next(&mut only_a).await;
    let ids: Vec<&str> = snapshot["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a"]);

    let mut switcher = n.connect("").await;
    assert_eq!(
        next(&mut switcher).await["calls"].as_array().unwrap().len(),
        2
    );
    send(&mut switcher, r#"{"type":"subscribe","call_ids":["b"]}"#).await;
    let view = next(&mut switcher).await;
    assert_eq!(view["type"], "snapshot");
    assert_eq!(view["reset"], true);
    assert_eq!(view["calls"].as_array().unwrap().len(), 1);
    assert_eq!(view["calls"][0]["call_id"], "b");

    // Unknown messages get an error frame; the connection stays.
    send(&mut switcher, r#"{"type":"dance"}"#).await;
    let error = next(&mut switcher).await;
    assert_eq!(error["type"], "error");
    assert!(error["message"].as_str().unwrap().contains("subscribe"));

    n.publish(&event("a", 2, CallState::Completed)).await;
    n.publish(&event("b", 2, CallState::Completed)).await;
    let to_a = next(&mut only_a).await;
    assert_eq!(to_a["call_id"], "a");
    let to_switcher = next(&mut switcher).await;
    assert_eq!(to_switcher["call_id"], "b");

    send(&mut switcher, r#"{"type":"unsubscribe","call_ids":["b"]}"#).await;
    assert_eq!(
        next(&mut switcher).await["calls"].as_array().unwrap().len(),
        0
    );
    n.publish(&event("b", 3, CallState::ProcessingAi)).await;
    n.publish(&event("a", 3, CallState::ProcessingAi)).await;
    assert_eq!(next(&mut only_a).await["version"], 3);
    // The switcher follows nothing now: the only thing it could get is a ping.
    let quiet = tokio::time::timeout(Duration::from_millis(300), switcher.next()).await;
    assert!(
        quiet.is_err(),
        "nothing for a socket that follows no call: {quiet:?}"
    );
}

#[tokio::test]
async fn a_resume_with_since_gets_exactly_the_changes_it_missed() {
    let n = notifier(|_| {}).await;
    n.publish(&event("r1", 1, CallState::InProgress)).await;
    n.wait_applied(1).await;
    let mut ws = n.connect("").await;
    next(&mut ws).await;
    n.publish(&event("r1", 2, CallState::Completed)).await;
    let seen = next(&mut ws).await["seq"].as_u64().unwrap();
    drop(ws);

    // While the client is away:
    n.publish(&event("r1", 3, CallState::ProcessingAi)).await;
    n.publish(&event("r2", 1, CallState::InProgress)).await;
    n.publish(&event("r1", 4, CallState::Archived)).await;

    let mut ws = n.connect(&format!("?since={seen}")).await;
    let missed: Vec<(String, i64)> = {
        let mut frames = Vec::new();
        for _ in 0..3 {
            let f = next(&mut ws).await;
            assert_eq!(f["type"], "status", "a replay, not a snapshot: {f}");
            frames.push((
                f["call_id"].as_str().unwrap().to_owned(),
                f["version"].as_i64().unwrap(),
            ));
        }
        frames
    };
    assert_eq!(
        missed,
        [("r1".into(), 3), ("r2".into(), 1), ("r1".into(), 4)]
    );
    // Then live, with nothing repeated.
    n.publish(&event("r2", 2, CallState::Completed)).await;
    let live = next(&mut ws).await;
    assert_eq!(
        (live["call_id"].as_str(), live["version"].as_i64()),
        (Some("r2"), Some(2))
    );
}

#[tokio::test]
async fn a_resume_from_too_long_ago_gets_a_fresh_snapshot_marked_reset() {
    let n = notifier(|c| c.replay_events = 2).await;
    for i in 0..5 {
        n.publish(&event(&format!("old-{i}"), 1, CallState::InProgress))
            .await;
    }
    n.wait_applied(5).await;

    let mut ws = n.connect("?since=1").await;
    let frame = next(&mut ws).await;

    assert_eq!(frame["type"], "snapshot");
    assert_eq!(frame["reset"], true);
    assert_eq!(frame["calls"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn bad_query_parameters_are_refused_with_a_json_error() {
    let n = notifier(|_| {}).await;
    for query in ["?since=abc", "?call_id=a.b", "?colour=red"] {
        let response = reqwest::get(format!("http://{}/ws{query}", n.url))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_parameter", "{query}");
    }
    let plain = reqwest::Client::new()
        .get(format!("http://{}/ws", n.url))
        .bearer_auth(&n.key)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 426);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "websocket_required");
}

#[tokio::test]
async fn sigterm_sends_every_socket_a_going_away_close_and_exits_in_time() {
    let mut n = notifier(|_| {}).await;
    let mut ws = n.connect("").await;
    next(&mut ws).await;

    n.service.shutdown.cancel();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a close frame")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Away);
    tokio::time::timeout(Duration::from_secs(10), n.service.task.take().unwrap())
        .await
        .expect("the notifier exits within its deadline")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let n = notifier(|c| c.ping_interval_secs = 1).await;
    // Reads nothing, so never answers a ping.
    let mute = n.connect("").await;
    // Reads, and so answers pings (tungstenite replies to them).
    let mut alive = n.connect("").await;
    next(&mut alive).await;
    eventually("two clients connected", Duration::from_secs(5), || async {
        (n.metric("switchboard_notifier_clients").await == 2.0).then_some(())
    })
    .await;

    let reader = tokio::spawn(async move {
        while let Some(Ok(_)) = alive.next().await {}
        "closed"
    });
    eventually(
        "the mute peer to be closed",
        Duration::from_secs(10),
        || async { (n.metric("switchboard_notifier_clients").await == 1.0).then_some(()) },
    )
    .await;
    assert!(!reader.is_finished(), "the answering peer stays connected");
    drop(mute);
}

#[tokio::test]
async fn a_client_resumes_exactly_on_another_replica() {
    let first = notifier(|_| {}).await;
    // A second replica behind the same load balancer: same NATS, same prefix.
    let config = first.env.config.clone();
    let mut second =
        crate::helpers::start(common::testing::TestEnv::new().await, |c| c.common = config).await;
    // Its key is in the other test database: sign in with one of the shared database.
    second.key = first.key.clone();
    first
        .publish(&event("lb-1", 1, CallState::InProgress))
        .await;
    first.wait_applied(1).await;
    let mut ws = first.connect("").await;
    let seen = next(&mut ws).await["seq"].as_u64().unwrap();
    drop(ws);

    first.publish(&event("lb-1", 2, CallState::Completed)).await;
    first
        .publish(&event("lb-2", 1, CallState::InProgress))
        .await;
    second.wait_applied(3).await;
    let mut ws = second.connect(&format!("?since={seen}")).await;

    let a = next(&mut ws).await;
    let b = next(&mut ws).await;
    assert_eq!(
        (
            a["type"].as_str(),
            a["call_id"].as_str(),
            a["version"].as_i64()
        ),
        (Some("status"), Some("lb-1"), Some(2))
    );
    assert_eq!(
        (
            b["type"].as_str(),
            b["call_id"].as_str(),
            b["version"].as_i64()
        ),
        (Some("status"), Some("lb-2"), Some(1))
    );
}

#[tokio::test]
async fn progress_reports_reach_the_sockets_that_follow_the_call() {
    let n = notifier(|_| {}).await;
    n.publish(&event("p1", 1, CallState::InProgress)).await;
    n.wait_applied(1).await;
    let mut following = n.connect("?call_id=p1").await;
    let mut elsewhere = n.connect("?call_id=other").await;
    next(&mut following).await;
    next(&mut elsewhere).await;

    let client = n.env.nats().await;
    let report = serde_json::json!({
        "tenant": "acme", "call_id": "p1", "packets_received": 120, "missing_packets": 3,
        "last_sequence": 122, "at": "2026-11-25T17:00:00Z"
    });
    // Plain NATS, fire and forget: keep publishing until the notifier's subscription is in
    // place and the frame arrives.
    let subject = n.env.subjects().call_progress(&n.env.key("p1"));
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            client
                .publish(subject.clone(), report.to_string().into())
                .await
                .ok();
        }
    });
    let frame = next(&mut following).await;
    publisher.abort();

    assert_eq!(frame["type"], "progress");
    assert_eq!(frame["packets_received"], 120);
    assert_eq!(frame["missing_packets"], 3);
    let quiet = tokio::time::timeout(Duration::from_millis(300), elsewhere.next()).await;
    assert!(
        quiet.is_err(),
        "a socket following another call gets nothing: {quiet:?}"
    );
}

/// The resume URL exactly as `pbx` builds it (`wire::live::LiveQuery`, which is
/// `common::live::LiveQuery` here), with the `stream` the snapshot named: an exact replay, not
/// a refusal.
#[tokio::test]
async fn a_resume_with_since_and_stream_as_clients_build_it_is_exact() {
    let n = notifier(|_| {}).await;
    n.publish(&event("s1", 1, CallState::InProgress)).await;
    n.wait_applied(1).await;
    let mut ws = n.connect("").await;
    let snapshot = next(&mut ws).await;
    let stream = snapshot["stream"].as_str().unwrap().to_owned();
    let seen = snapshot["seq"].as_u64().unwrap();
    drop(ws);
    n.publish(&event("s1", 2, CallState::Completed)).await;

    let query = common::live::LiveQuery {
        since: Some(seen),
        stream: Some(stream),
        ..Default::default()
    };
    let mut ws = n.connect(&format!("?{}", query.to_query())).await;
    let frame = next(&mut ws).await;

    assert_eq!(frame["type"], "status", "{frame}");
    assert_eq!(
        (frame["call_id"].as_str(), frame["version"].as_i64()),
        (Some("s1"), Some(2))
    );
}

/// A status stream deleted and created again starts its sequences over: connected sockets
/// are closed so that they resume, and a resume with the old stream's `since` and `stream`
/// gets a snapshot marked `reset` holding the new stream's events (never a silent skip).
#[tokio::test]
async fn a_recreated_status_stream_resets_clients_instead_of_skipping_events() {
    let n = notifier(|_| {}).await;
    for i in 1..=5 {
        n.publish(&event("old", i, CallState::InProgress)).await;
    }
    n.wait_applied(5).await;
    let mut ws = n.connect("").await;
    let snapshot = next(&mut ws).await;
    let old_stream = snapshot["stream"].as_str().unwrap().to_owned();
    assert_eq!(snapshot["seq"], 5);

    let js = n.env.jetstream().await;
    let name = n
        .env
        .subjects()
        .stream_name(common::subjects::StreamKind::Status);
    js.delete_stream(&name).await.unwrap();
    common::nats::ensure_streams(&js, &n.env.subjects(), &n.env.config.streams)
        .await
        .unwrap();
    n.publish(&event("new", 1, CallState::InProgress)).await;

    // The connected socket is told to reconnect.
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1012);

    let query = common::live::LiveQuery {
        since: Some(5),
        stream: Some(old_stream.clone()),
        ..Default::default()
    };
    let mut ws = n.connect(&format!("?{}", query.to_query())).await;
    let frame = next(&mut ws).await;
    assert_eq!(frame["type"], "snapshot", "{frame}");
    assert_eq!(frame["reset"], true);
    assert_ne!(frame["stream"].as_str(), Some(old_stream.as_str()));
    let calls: Vec<&str> = frame["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["new"], "only the new stream's calls: {frame}");
}

/// Thousands of streaming calls report progress; a client must not be pushed into a
/// lagged → snapshot loop by them: progress has its own ring, status events keep theirs.
#[tokio::test]
async fn a_flood_of_progress_reports_never_makes_a_client_lag_on_status_events() {
    let n = notifier(|c| c.client_queue = 16).await;
    n.publish(&event("flood", 1, CallState::InProgress)).await;
    n.wait_applied(1).await;
    let mut ws = n.connect("").await;
    next(&mut ws).await;

    let client = n.env.nats().await;
    // Wait until the notifier's progress subscription is in place (one report arrives).
    let subject = n.env.subjects().call_progress(&n.env.key("flood"));
    let report = |i: i64| {
        serde_json::json!({
            "tenant": "acme", "call_id": "flood", "packets_received": i, "missing_packets": 0,
            "last_sequence": i, "at": "2026-11-25T17:00:00Z"
        })
        .to_string()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        client
            .publish(subject.clone(), report(0).into())
            .await
            .unwrap();
        let frame = tokio::time::timeout(Duration::from_millis(200), next(&mut ws)).await;
        if frame.is_ok_and(|f| f["type"] == "progress") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress frame arrived"
        );
    }
    // Far more reports than the client's queue, without the client reading.
    for i in 1..=2000 {
        client
            .publish(subject.clone(), report(i).into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    n.publish(&event("flood", 2, CallState::Completed)).await;

    loop {
        let frame = next(&mut ws).await;
        assert_ne!(
            frame["type"], "lagged",
            "progress pushed the client into a lag"
        );
        assert_ne!(
            frame["type"], "snapshot",
            "progress forced a resynchronisation"
        );
        if frame["type"] == "status" {
            assert_eq!(frame["version"], 2);
            break;
        }
    }
}

/// A client's subscribe set and its messages are bounded, with a clear error frame.
#[tokio::test]
async fn oversized_subscriptions_and_messages_get_a_clear_error() {
    let n = notifier(|_| {}).await;
    let mut ws = n.connect("").await;
    next(&mut ws).await;

    let ids: Vec<String> = (0..=common::live::MAX_SUBSCRIBED_CALLS)
        .map(|i| format!("c{i}"))
        .collect();
    let subscribe = serde_json::json!({"type": "subscribe", "call_ids": ids}).to_string();
    send(&mut ws, &subscribe).await;
    let frame = next(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert!(
        frame["message"].as_str().unwrap().contains("at most"),
        "{frame}"
    );

    let huge = format!(
        r#"{{"type":"subscribe","call_ids":["{}"]}}"#,
        "a".repeat(common::live::MAX_CLIENT_MESSAGE_BYTES)
    );
    send(&mut ws, &huge).await;
    let frame = next(&mut ws).await;
    assert_eq!(frame["type"], "error", "{frame}");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1009);
}
