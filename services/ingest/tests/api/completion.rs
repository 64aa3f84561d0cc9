use std::time::Duration;

use common::{subjects::StreamKind, testing::eventually};
use serde_json::json;

use crate::helpers::{call_id, spawn_app, spawn_app_with, status_and_body};

#[tokio::test]
async fn completing_a_call_publishes_one_work_item_and_a_status_event() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;

    let (status, body) = status_and_body(app.complete(&id, None).await).await;

    assert_eq!(status, 200);
    assert_eq!(body["changed"], true);
    assert_eq!(body["state"], "COMPLETED");
    assert_eq!(body["version"], 2);
    let work = app.messages(StreamKind::Work).await;
    assert_eq!(work.len(), 1);
    assert_eq!(
        work[0].0,
        format!("{}.calls.completed.acme.{id}", app.env.config.prefix)
    );
    assert_eq!(work[0].1["call_id"], id.as_str());
    assert_eq!(work[0].1["version"], 2);
    let statuses = eventually("two status events", Duration::from_secs(5), || async {
        let m = app.messages(StreamKind::Status).await;
        (m.len() == 2).then_some(m)
    })
    .await;
    let completed = statuses
        .iter()
        .find(|m| m.1["version"] == 2)
        .expect("the COMPLETED event");
    assert_eq!(completed.1["state"], "COMPLETED");
    assert_eq!(completed.1["previous_state"], "IN_PROGRESS");
    assert_eq!(completed.1["reason"], "completed_by_pbx");
    let history = app.call(&id).await["history"].clone();
    assert_eq!(history.as_array().unwrap().len(), 2);
    assert_eq!(history[1]["from_state"], "IN_PROGRESS");
    assert_eq!(history[1]["to_state"], "COMPLETED");
}

#[tokio::test]
async fn a_repeated_completion_answers_the_current_state_and_publishes_nothing_new() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;
    app.complete(&id, None).await;

    let (status, body) = status_and_body(app.complete(&id, None).await).await;

    assert_eq!(status, 200);
    assert_eq!(body["changed"], false);
    assert_eq!(body["state"], "COMPLETED");
    assert_eq!(body["version"], 2);
    assert_eq!(app.messages(StreamKind::Work).await.len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM call_transitions").await, 2);
}

#[tokio::test]
async fn total_packets_makes_trailing_losses_count_as_missing() {
    let app = spawn_app().await;
    let id = call_id();
    for seq in [0, 1, 3, 4] {
        app.post_packet(&id, seq, "x").await;
    }

    let (status, body) =
        status_and_body(app.complete(&id, Some(json!({"total_packets": 8}))).await).await;

    assert_eq!(status, 200);
    assert_eq!(body["total_packets"], 8);
    assert_eq!(body["missing_packets"], 4);
    let call = app.call(&id).await;
    assert_eq!(
        call["missing"],
        json!([{"from": 2, "to": 2}, {"from": 5, "to": 7}])
    );
}

#[tokio::test]
async fn a_silent_call_is_completed_by_the_idle_timeout() {
    let app = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.call_idle_timeout_secs = 1;
    })
    .await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;

    let call = eventually(
        "the idle call to complete",
        Duration::from_secs(10),
        || async {
            let call = app.call(&id).await;
            (call["state"] == "COMPLETED").then_some(call)
        },
    )
    .await;

    assert_eq!(call["history"][1]["reason"], "idle_timeout");
    assert_eq!(app.messages(StreamKind::Work).await.len(), 1);
}

#[tokio::test]
async fn calls_are_listed_newest_first_by_state_and_page_by_page() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.post_packet(&format!("list-{i}"), 0, "x").await;
    }
    app.complete("list-1", None).await;
    app.complete("list-3", None).await;

    let (status, page1) = status_and_body(app.get("/v1/calls?limit=2").await).await;
    assert_eq!(status, 200);
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["call_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&page1), ["list-4", "list-3"]);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) =
        status_and_body(app.get(&format!("/v1/calls?limit=2&cursor={cursor}")).await).await;
    assert_eq!(ids(&page2), ["list-2", "list-1"]);
    let cursor = page2["next_cursor"].as_str().unwrap().to_owned();
    let (_, page3) =
        status_and_body(app.get(&format!("/v1/calls?limit=2&cursor={cursor}")).await).await;
    assert_eq!(ids(&page3), ["list-0"]);
    assert_eq!(page3["next_cursor"], serde_json::Value::Null);

    let (_, completed) = status_and_body(app.get("/v1/calls?state=COMPLETED").await).await;
    assert_eq!(ids(&completed), ["list-3", "list-1"]);
}
