use crate::helpers::stack;

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_one_it_was_given() {
    let stack = stack(|_| {}).await;
    let url = stack.transcribers[0].service.url();

    let response = stack
        .client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-request-id").is_some());

    let response = stack
        .client
        .get(format!("{url}/readyz"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42");
}
