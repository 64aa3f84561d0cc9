use common::subjects::StreamKind;
use serde_json::json;

use crate::helpers::{call_id, spawn_app, status_and_body};

#[tokio::test]
async fn an_accepted_packet_is_in_postgres_and_in_the_packets_stream() {
    let app = spawn_app().await;
    let id = call_id();

    let (status, body) = status_and_body(app.post_packet(&id, 0, "hello").await).await;

    assert_eq!(status, 202);
    assert_eq!(
        body,
        json!({"call_id": id, "sequence": 0, "status": "accepted", "missing": [], "missing_packets": 0})
    );
    assert_eq!(app.stored_packets(&id).await, vec![(0, "hello".to_owned())]);
    let messages = app.messages(StreamKind::Packets).await;
    assert_eq!(messages.len(), 1);
    let (subject, payload, msg_id) = &messages[0];
    assert_eq!(
        subject,
        &format!("{}.packets.acme.{id}", app.env.config.prefix)
    );
    assert_eq!(msg_id, &format!("acme.{id}:0"));
    assert_eq!(payload["data"], "hello");
    assert_eq!(payload["sequence"], 0);
}

#[tokio::test]
async fn the_first_packet_creates_the_call_in_progress_and_announces_it() {
    let app = spawn_app().await;
    let id = call_id();

    app.post_packet(&id, 0, "a").await;

    let call = app.call(&id).await;
    assert_eq!(call["state"], "IN_PROGRESS");
    assert_eq!(call["version"], 1);
    assert_eq!(call["packets_received"], 1);
    assert_eq!(call["history"][0]["to_state"], "IN_PROGRESS");
    assert_eq!(call["history"][0]["from_state"], serde_json::Value::Null);
    let status = common::testing::eventually(
        "creation status event",
        std::time::Duration::from_secs(5),
        || async {
            let messages = app.messages(StreamKind::Status).await;
            (!messages.is_empty()).then_some(messages)
        },
    )
    .await;
    let (subject, event, msg_id) = &status[0];
    assert_eq!(
        subject,
        &format!("{}.calls.status.acme.{id}", app.env.config.prefix)
    );
    assert_eq!(msg_id, &format!("acme.{id}:1"));
    assert_eq!(event["state"], "IN_PROGRESS");
    assert_eq!(event["previous_state"], serde_json::Value::Null);
    assert_eq!(event["version"], 1);
    assert_eq!(event["reason"], "first_packet");
}

#[tokio::test]
async fn duplicate_packet_is_accepted_once_and_reported_as_duplicate() {
    let app = spawn_app().await;
    let id = call_id();

    let (first, _) = status_and_body(app.post_packet(&id, 0, "same").await).await;
    let (second, body) = status_and_body(app.post_packet(&id, 0, "same").await).await;

    assert_eq!((first, second), (202, 202));
    assert_eq!(body["status"], "duplicate");
    assert_eq!(app.stored_packets(&id).await.len(), 1);
    assert_eq!(app.call(&id).await["packets_received"], 1);
    // Republished with the same Nats-Msg-Id: JetStream kept one copy.
    assert_eq!(app.messages(StreamKind::Packets).await.len(), 1);
}

#[tokio::test]
async fn same_sequence_with_different_data_is_a_conflict_and_keeps_the_original() {
    let app = spawn_app().await;
    let id = call_id();

    app.post_packet(&id, 4, "original").await;
    let (status, body) = status_and_body(app.post_packet(&id, 4, "changed").await).await;

    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "sequence_conflict");
    assert_eq!(body["error"]["field"], "sequence");
    assert_eq!(
        app.stored_packets(&id).await,
        vec![(4, "original".to_owned())]
    );
    assert_eq!(app.messages(StreamKind::Packets).await.len(), 1);
}

#[tokio::test]
async fn gaps_late_and_out_of_order_packets_are_accepted_and_reported_as_missing_ranges() {
    let app = spawn_app().await;
    let id = call_id();
    let missing = |body: serde_json::Value| body["missing"].clone();

    let (_, b) = status_and_body(app.post_packet(&id, 0, "a").await).await;
    assert_eq!(missing(b), json!([]));
    let (_, b) = status_and_body(app.post_packet(&id, 5, "f").await).await;
    assert_eq!(missing(b), json!([{"from": 1, "to": 4}]));
    let (_, b) = status_and_body(app.post_packet(&id, 9, "j").await).await;
    assert_eq!(
        missing(b),
        json!([{"from": 1, "to": 4}, {"from": 6, "to": 8}])
    );
    // Late packets fill the gaps.
    let (s, b) = status_and_body(app.post_packet(&id, 2, "c").await).await;
    assert_eq!(s, 202);
    assert_eq!(
        missing(b),
        json!([{"from": 1, "to": 1}, {"from": 3, "to": 4}, {"from": 6, "to": 8}])
    );
    for seq in [1, 3, 4, 6, 7, 8] {
        app.post_packet(&id, seq, "x").await;
    }

    let call = app.call(&id).await;
    assert_eq!(call["missing"], json!([]));
    assert_eq!(call["missing_packets"], 0);
    assert_eq!(call["packets_received"], 10);
    assert_eq!(call["first_sequence"], 0);
    assert_eq!(call["last_sequence"], 9);
}

#[tokio::test]
async fn a_call_that_starts_late_reports_its_first_sequences_missing() {
    let app = spawn_app().await;
    let id = call_id();

    let (status, body) = status_and_body(app.post_packet(&id, 3, "d").await).await;

    assert_eq!(status, 202);
    assert_eq!(body["missing"], json!([{"from": 0, "to": 2}]));
}

#[tokio::test]
async fn a_packet_for_a_completed_call_is_refused_naming_its_state() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;
    assert_eq!(app.complete(&id, None).await.status(), 200);

    let (status, body) = status_and_body(app.post_packet(&id, 1, "b").await).await;

    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "call_not_in_progress");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("COMPLETED"),
        "{body}"
    );
    assert_eq!(app.stored_packets(&id).await.len(), 1);
    assert_eq!(app.messages(StreamKind::Packets).await.len(), 1);
}

#[tokio::test]
async fn a_retry_of_a_stored_packet_after_completion_is_still_a_duplicate() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;
    app.complete(&id, None).await;

    let (status, body) = status_and_body(app.post_packet(&id, 0, "a").await).await;

    assert_eq!(status, 202);
    assert_eq!(body["status"], "duplicate");
}

#[tokio::test]
async fn a_streaming_call_reports_its_packet_counts_on_its_progress_subject() {
    use futures::StreamExt;
    let app = spawn_app().await;
    let id = call_id();
    let client = app.env.nats().await;
    let mut progress = client
        .subscribe(app.env.subjects().all_progress())
        .await
        .unwrap();
    client.flush().await.unwrap();

    app.post_packet(&id, 0, "a").await;
    app.post_packet(&id, 2, "c").await;

    let report = tokio::time::timeout(std::time::Duration::from_secs(10), progress.next())
        .await
        .expect("a progress report")
        .unwrap();
    assert_eq!(
        report.subject.as_str(),
        format!("{}.calls.progress.acme.{id}", app.env.config.prefix)
    );
    let event: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(event["call_id"], id.as_str());
    assert!(event["packets_received"].as_i64().unwrap() >= 1, "{event}");
    // Progress is not history: nothing of it is in the status stream.
    assert_eq!(app.call(&id).await["version"], 1);
}
