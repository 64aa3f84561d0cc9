use std::time::Duration;

use common::{
    subjects::StreamKind,
    testing::{NatsServer, TestEnv, eventually},
};

use crate::helpers::{call_id, spawn_app, spawn_app_with, status_and_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_while_nats_is_down_still_produces_the_work_item_once_nats_is_back() {
    let mut nats = NatsServer::start();
    let app = spawn_app_with(TestEnv::with_nats_url(&nats.url()).await, |_| {}).await;
    let id = call_id();
    assert_eq!(app.post_packet(&id, 0, "a").await.status(), 202);

    nats.stop();
    let (status, body) = status_and_body(app.complete(&id, None).await).await;
    assert_eq!(
        status, 200,
        "the completion is committed even without NATS: {body}"
    );
    assert_eq!(body["state"], "COMPLETED");
    nats.resume();

    let work = eventually(
        "the work item to be republished",
        Duration::from_secs(30),
        || async {
            let work = app.messages(StreamKind::Work).await;
            (!work.is_empty()).then_some(work)
        },
    )
    .await;
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].1["call_id"], id.as_str());
    eventually(
        "the COMPLETED status event too",
        Duration::from_secs(30),
        || async {
            let statuses = app.messages(StreamKind::Status).await;
            statuses
                .iter()
                .any(|m| m.1["state"] == "COMPLETED")
                .then_some(())
        },
    )
    .await;
    // The relay marks a work item published right after JetStream acknowledges it.
    eventually(
        "the work item to be marked published",
        Duration::from_secs(30),
        || async {
            (app.count("SELECT count(*) FROM calls WHERE work_item_published_at IS NULL")
                .await
                == 0)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_while_nats_is_down_gets_503_and_its_retry_is_published_once() {
    let mut nats = NatsServer::start();
    let app = spawn_app_with(TestEnv::with_nats_url(&nats.url()).await, |_| {}).await;
    let id = call_id();
    assert_eq!(app.post_packet(&id, 0, "a").await.status(), 202);

    nats.stop();
    let response = app.post_packet(&id, 1, "b").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let (_, body) = status_and_body(response).await;
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("nats"),
        "{body}"
    );
    nats.resume();

    // The PBX retries until it gets its 202.
    let (status, body) = eventually("the retry to succeed", Duration::from_secs(30), || async {
        let (status, body) = status_and_body(app.post_packet(&id, 1, "b").await).await;
        (status == 202).then_some((status, body))
    })
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        body["status"], "duplicate",
        "it was stored by the first attempt"
    );
    let sequences: Vec<i64> = app
        .messages(StreamKind::Packets)
        .await
        .iter()
        .map(|m| m.1["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, [0, 1], "each packet published exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_while_postgres_is_unavailable_gets_503_and_nothing_is_published() {
    let app = spawn_app().await;
    let id = call_id();
    let database = app.env.database_name().to_owned();
    let admin = app.env.admin_pool().await;
    let sql = |allow: bool| format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {allow}");
    sqlx::query(sqlx::AssertSqlSafe(sql(false)))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&admin)
        .await
        .unwrap();

    let response = app.post_packet(&id, 0, "a").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let (_, body) = status_and_body(response).await;
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert!(app.messages(StreamKind::Packets).await.is_empty());

    sqlx::query(sqlx::AssertSqlSafe(sql(true)))
        .execute(&admin)
        .await
        .unwrap();
    let (status, body) = eventually("the retry to succeed", Duration::from_secs(30), || async {
        let (status, body) = status_and_body(app.post_packet(&id, 0, "a").await).await;
        (status == 202).then_some((status, body))
    })
    .await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "accepted");
    assert_eq!(app.messages(StreamKind::Packets).await.len(), 1);
}
