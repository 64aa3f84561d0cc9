use std::collections::HashSet;

use common::subjects::StreamKind;
use futures::future::join_all;

use crate::helpers::{call_id, spawn_app, spawn_app_with, status_and_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_packets_of_a_new_call_at_the_same_instant_create_one_call_and_store_both() {
    let app = spawn_app().await;
    let id = call_id();

    let (a, b) = tokio::join!(app.post_packet(&id, 0, "a"), app.post_packet(&id, 1, "b"));

    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    assert_eq!(app.stored_packets(&id).await.len(), 2);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM call_transitions").await, 1);
    assert_eq!(app.call(&id).await["packets_received"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_packets_of_one_call_are_all_stored_exactly_once() {
    let app = spawn_app().await;
    let id = call_id();

    let responses = join_all((0..50).map(|seq| app.post_packet(&id, seq, "x"))).await;

    assert!(responses.iter().all(|r| r.status() == 202));
    assert_eq!(app.stored_packets(&id).await.len(), 50);
    let call = app.call(&id).await;
    assert_eq!(call["packets_received"], 50);
    assert_eq!(call["missing_packets"], 0);
    assert_eq!(app.messages(StreamKind::Packets).await.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_packets_on_two_replicas_create_each_call_once() {
    let first = spawn_app().await;
    // A second replica: same database, same prefix.
    let mut second = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.common = first.env.config.clone();
    })
    .await;
    // Its client's key is in the other test database: use the one of the shared database.
    second.client = first.client.clone();
    let ids: Vec<String> = (0..20).map(|_| call_id()).collect();

    let requests = ids.iter().flat_map(|id| {
        [
            first.post_packet(id, 0, "x"),
            second.post_packet(id, 1, "y"),
            first.post_packet(id, 2, "z"),
        ]
    });
    let responses = join_all(requests).await;

    assert!(responses.iter().all(|r| r.status() == 202));
    assert_eq!(first.count("SELECT count(*) FROM calls").await, 20);
    assert_eq!(first.count("SELECT count(*) FROM packets").await, 60);
    assert_eq!(
        first
            .count("SELECT count(*) FROM call_transitions WHERE to_state = 'IN_PROGRESS'")
            .await,
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_racing_packets_keeps_exactly_the_packets_it_accepted() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "first").await;

    let packets = join_all((1..200).map(|seq| app.post_packet(&id, seq, "x")));
    let (responses, completion) = tokio::join!(packets, app.complete(&id, None));

    assert_eq!(completion.status(), 200);
    let mut accepted = HashSet::from([0]);
    for (seq, response) in (1..200).zip(responses) {
        let (status, body) = status_and_body(response).await;
        match status {
            202 => {
                accepted.insert(seq);
            }
            409 => assert_eq!(body["error"]["code"], "call_not_in_progress"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let stored: HashSet<i64> = app
        .stored_packets(&id)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(stored, accepted, "exactly the accepted packets are stored");
    assert_eq!(
        app.call(&id).await["packets_received"],
        accepted.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_completions_make_one_transition_and_one_work_item() {
    let app = spawn_app().await;
    let id = call_id();
    app.post_packet(&id, 0, "a").await;

    let (a, b) = tokio::join!(app.complete(&id, None), app.complete(&id, None));

    let (sa, a) = status_and_body(a).await;
    let (sb, b) = status_and_body(b).await;
    assert_eq!((sa, sb), (200, 200));
    let changed: Vec<bool> = [&a, &b]
        .iter()
        .map(|r| r["changed"].as_bool().unwrap())
        .collect();
    assert_eq!(changed.iter().filter(|c| **c).count(), 1, "{a} {b}");
    assert_eq!(
        app.count("SELECT count(*) FROM call_transitions WHERE to_state = 'COMPLETED'")
            .await,
        1
    );
    assert_eq!(app.messages(StreamKind::Work).await.len(), 1);
}
