use crate::helpers::{spawn_app, status_and_body};

#[tokio::test]
async fn health_and_readiness_report_ok_when_postgres_and_nats_are_up() {
    let app = spawn_app().await;

    let (status, body) = status_and_body(app.get("/healthz").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    let (status, body) = status_and_body(app.get("/readyz").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["postgres", "nats", "background_tasks"]);
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text() {
    let app = spawn_app().await;
    app.post_packet("m1", 0, "x").await;

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("switchboard_ingest_packets_total"), "{text}");
    assert!(text.contains("switchboard_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/v1/call/stream/{call_id}\""),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_and_swagger_ui_are_served_without_network() {
    let app = spawn_app().await;

    let (status, spec) = status_and_body(app.get("/openapi.json").await).await;
    assert_eq!(status, 200);
    for path in [
        "/v1/call/stream/{call_id}",
        "/v1/call/{call_id}/complete",
        "/v1/call/{call_id}",
        "/v1/calls",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} documented");
    }

    let page = app.get("/docs/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    let initializer = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(initializer.status(), 200);
    assert!(initializer.text().await.unwrap().contains("/openapi.json"));
    let bundle = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(
        bundle.status(),
        200,
        "the bundle is vendored into the binary"
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;

    let response = app.get("/healthz").await;

    assert!(response.headers().get("x-request-id").is_some());
}

#[tokio::test]
async fn stopping_finishes_cleanly_and_in_time() {
    let mut app = spawn_app().await;
    app.post_packet("s1", 0, "x").await;

    app.stop().await;

    assert!(
        app.client.get(app.url("/healthz")).send().await.is_err(),
        "no longer listening"
    );
}
