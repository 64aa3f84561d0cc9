use common::subjects::StreamKind;
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app, spawn_app_with, status_and_body};

struct Case {
    what: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    body: &str,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        what,
        path: "/v1/call/stream/call-1".into(),
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
        status,
        code,
        field,
    }
}

async fn send(app: &TestApp, case: &Case) -> (u16, Value) {
    let mut request = app.client.post(app.url(&case.path)).body(case.body.clone());
    if let Some(ct) = case.content_type {
        request = request.header("content-type", ct);
    }
    status_and_body(request.send().await.unwrap()).await
}

async fn assert_refused_and_nothing_kept(app: &TestApp, cases: Vec<Case>) {
    for case in &cases {
        let (status, body) = send(app, case).await;
        assert_eq!(status, case.status, "{}: {body}", case.what);
        assert_eq!(body["error"]["code"], case.code, "{}: {body}", case.what);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}: a message for people: {body}",
            case.what
        );
        if let Some(field) = case.field {
            assert_eq!(body["error"]["field"], field, "{}: {body}", case.what);
        }
    }
    assert_eq!(
        app.count("SELECT count(*) FROM packets").await,
        0,
        "nothing stored"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM calls").await,
        0,
        "no call created"
    );
    assert!(
        app.messages(StreamKind::Packets).await.is_empty(),
        "nothing published"
    );
}

#[tokio::test]
async fn each_bad_packet_gets_its_status_and_code_and_nothing_is_stored_or_published() {
    let app = spawn_app().await;
    let good = r#"{"sequence": 1, "data": "x", "timestamp": 1.5}"#;
    let mut cases = vec![
        case(
            "malformed JSON",
            r#"{"sequence": 1,"#,
            400,
            "malformed_json",
            None,
        ),
        case(
            "not an object",
            "[1, 2]",
            422,
            "invalid_field",
            Some("body"),
        ),
        case("empty body", "", 400, "malformed_json", None),
        case(
            "missing sequence",
            r#"{"data": "x", "timestamp": 1}"#,
            422,
            "missing_field",
            Some("sequence"),
        ),
        case(
            "missing data",
            r#"{"sequence": 1, "timestamp": 1}"#,
            422,
            "missing_field",
            Some("data"),
        ),
        case(
            "missing timestamp",
            r#"{"sequence": 1, "data": "x"}"#,
            422,
            "missing_field",
            Some("timestamp"),
        ),
        case(
            "sequence as a string",
            r#"{"sequence": "1", "data": "x", "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("sequence"),
        ),
        case(
            "fractional sequence",
            r#"{"sequence": 1.5, "data": "x", "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("sequence"),
        ),
        case(
            "negative sequence",
            r#"{"sequence": -1, "data": "x", "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("sequence"),
        ),
        case(
            "sequence beyond 64 bits",
            r#"{"sequence": 18446744073709551616, "data": "x", "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("sequence"),
        ),
        case(
            "data not a string",
            r#"{"sequence": 1, "data": 5, "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("data"),
        ),
        case(
            "data null",
            r#"{"sequence": 1, "data": null, "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("data"),
        ),
        case(
            "NUL in data",
            r#"{"sequence": 1, "data": "a\u0000b", "timestamp": 1}"#,
            422,
            "invalid_field",
            Some("data"),
        ),
        case(
            "negative timestamp",
            r#"{"sequence": 1, "data": "x", "timestamp": -0.5}"#,
            422,
            "invalid_field",
            Some("timestamp"),
        ),
        case(
            "timestamp as a string",
            r#"{"sequence": 1, "data": "x", "timestamp": "now"}"#,
            422,
            "invalid_field",
            Some("timestamp"),
        ),
        case(
            "unknown field",
            r#"{"sequence": 1, "data": "x", "timestamp": 1, "codec": "ulaw"}"#,
            422,
            "unknown_field",
            Some("codec"),
        ),
    ];
    cases.push(Case {
        content_type: None,
        ..case("no content type", good, 415, "unsupported_media_type", None)
    });
    cases.push(Case {
        content_type: Some("text/plain"),
        ..case(
            "text content type",
            good,
            415,
            "unsupported_media_type",
            None,
        )
    });
    for (what, id) in [
        ("call id with a dot", "a.b"),
        ("call id with a star", "a*"),
        ("call id with a gt", "a%3E"),
        ("call id with a space", "a%20b"),
        ("call id with a non-ASCII letter", "caf%C3%A9"),
    ] {
        cases.push(Case {
            path: format!("/v1/call/stream/{id}"),
            ..case(what, good, 400, "invalid_call_id", Some("call_id"))
        });
    }
    cases.push(Case {
        path: format!("/v1/call/stream/{}", "x".repeat(129)),
        ..case(
            "call id too long",
            good,
            400,
            "invalid_call_id",
            Some("call_id"),
        )
    });
    cases.push(Case {
        path: "/v1/call/stream/".into(),
        ..case(
            "empty call id",
            good,
            400,
            "invalid_call_id",
            Some("call_id"),
        )
    });

    assert_refused_and_nothing_kept(&app, cases).await;
}

#[tokio::test]
async fn oversized_data_and_oversized_bodies_are_refused_with_413() {
    let app = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.max_packet_bytes = 1024
    })
    .await;
    let data = "x".repeat(1025);
    let too_much_data = format!(r#"{{"sequence": 1, "data": "{data}", "timestamp": 1}}"#);
    let huge_body = format!(
        r#"{{"sequence": 1, "data": "x", "timestamp": 1, "pad": "{}"}}"#,
        "y".repeat(20_000)
    );

    assert_refused_and_nothing_kept(
        &app,
        vec![
            case(
                "data over MAX_PACKET_BYTES",
                &too_much_data,
                413,
                "payload_too_large",
                Some("data"),
            ),
            case(
                "body over the limit",
                &huge_body,
                413,
                "payload_too_large",
                None,
            ),
        ],
    )
    .await;

    // Exactly at the limit is fine.
    let (status, _) = status_and_body(app.post_packet("call-1", 0, &"x".repeat(1024)).await).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn bad_completions_and_queries_get_clear_errors() {
    let app = spawn_app().await;
    app.post_packet("c1", 5, "x").await;

    let checks: Vec<(reqwest::Response, u16, &str, Option<&str>)> = vec![
        (
            app.complete("nope", None).await,
            404,
            "call_not_found",
            Some("call_id"),
        ),
        (
            app.complete("c1", Some(serde_json::json!({"total_packets": -1})))
                .await,
            422,
            "invalid_field",
            Some("total_packets"),
        ),
        (
            app.complete("c1", Some(serde_json::json!({"total_packets": 3})))
                .await,
            422,
            "invalid_field",
            Some("total_packets"),
        ),
        (
            app.complete("c1", Some(serde_json::json!({"total_packets": "9"})))
                .await,
            422,
            "invalid_field",
            Some("total_packets"),
        ),
        (
            app.complete("c1", Some(serde_json::json!({"total": 9})))
                .await,
            422,
            "unknown_field",
            Some("total"),
        ),
        (
            app.complete("a.b", None).await,
            400,
            "invalid_call_id",
            Some("call_id"),
        ),
        (
            app.get("/v1/call/nope").await,
            404,
            "call_not_found",
            Some("call_id"),
        ),
        (
            app.get("/v1/call/a*b").await,
            400,
            "invalid_call_id",
            Some("call_id"),
        ),
        (
            app.get("/v1/calls?state=DONE").await,
            400,
            "invalid_parameter",
            Some("state"),
        ),
        (
            app.get("/v1/calls?limit=0").await,
            400,
            "invalid_parameter",
            Some("limit"),
        ),
        (
            app.get("/v1/calls?limit=501").await,
            400,
            "invalid_parameter",
            Some("limit"),
        ),
        (
            app.get("/v1/calls?limit=ten").await,
            400,
            "invalid_parameter",
            Some("limit"),
        ),
        (
            app.get("/v1/calls?cursor=garbage").await,
            400,
            "invalid_parameter",
            Some("cursor"),
        ),
        (
            app.get("/v1/calls?sort=asc").await,
            400,
            "invalid_parameter",
            Some("sort"),
        ),
        (app.get("/v1/nothing-here").await, 404, "not_found", None),
    ];
    for (response, status, code, field) in checks {
        let url = response.url().to_string();
        let (got, body) = status_and_body(response).await;
        assert_eq!(got, status, "{url}: {body}");
        assert_eq!(body["error"]["code"], code, "{url}: {body}");
        if let Some(field) = field {
            assert_eq!(body["error"]["field"], field, "{url}: {body}");
        }
    }
    // None of the refused completions completed the call.
    assert_eq!(app.call("c1").await["state"], "IN_PROGRESS");
    let (status, body) = status_and_body(
        app.client
            .delete(app.url("/v1/call/c1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}
