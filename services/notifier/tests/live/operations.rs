use crate::helpers::notifier;

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_one_it_was_given() {
    let n = notifier(|_| {}).await;
    let client = reqwest::Client::new();

    let response = client
        .get(format!("http://{}/healthz", n.url))
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-request-id").is_some());

    let response = client
        .get(format!("http://{}/", n.url))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42");
}
