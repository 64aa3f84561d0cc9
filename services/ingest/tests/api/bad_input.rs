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
            // Declared JSON, but only whitespace: not JSON (an empty body would be no body).
            app.client
                .post(app.url("/v1/call/c1/complete"))
                .header("content-type", "application/json")
                .body("\t")
                .send()
                .await
                .unwrap(),
            400,
            "malformed_json",
            None,
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

/// Fuzz-style: 10,000 generated requests to the packet route (arbitrary bytes, valid bodies
/// with fields swapped for values of every JSON type, extreme numbers, missing and unknown
/// fields, arbitrary call ids and content types). None may get a 5xx, and every refusal is a
/// JSON error naming its code; accepted ones are 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_packet_requests_get_no_5xx() {
    use futures::StreamExt;
    use rand::{SeedableRng, rngs::StdRng};

    let app = spawn_app().await;
    let seed: u64 = rand::random();
    let requests: Vec<(String, Option<&'static str>, Vec<u8>)> = {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..10_000).map(|_| generated_request(&mut rng)).collect()
    };
    let outcomes: Vec<(u16, String, String)> = futures::stream::iter(requests)
        .map(|(path, content_type, body)| {
            let app = &app;
            async move {
                let mut request = app.client.post(app.url(&path)).body(body.clone());
                if let Some(content_type) = content_type {
                    request = request.header("content-type", content_type);
                }
                let response = request.send().await.expect("an answer");
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                (
                    status,
                    text,
                    format!("{path} {:?}", String::from_utf8_lossy(&body)),
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (status, text, request) in outcomes {
        *by_status.entry(status).or_default() += 1;
        assert!(status < 500, "seed {seed}: {status} for {request}: {text}");
        if status != 202 {
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("seed {seed}: not JSON for {request}: {text}"));
            assert!(
                body["error"]["code"].is_string(),
                "seed {seed}: {request}: {body}"
            );
            assert!(
                body["error"]["message"].is_string(),
                "seed {seed}: {request}: {body}"
            );
        }
    }
    // The generator reaches both sides.
    assert!(
        by_status.get(&202).copied().unwrap_or(0) > 100,
        "{by_status:?}"
    );
    assert!(
        by_status.keys().any(|s| (400..500).contains(s)),
        "{by_status:?}"
    );
}

/// One generated request: (path, content type, body).
fn generated_request(rng: &mut impl rand::Rng) -> (String, Option<&'static str>, Vec<u8>) {
    const CALL_IDS: [&str; 8] = [
        "fuzz-ok",
        "fuzz-ok-2",
        "a",
        "%00",
        "..%2F..",
        "x%20y",
        "ça-va",
        "-_-",
    ];
    let call_id = match rng.random_range(0..10) {
        0 => "z".repeat(rng.random_range(100..200)),
        1 => (0..rng.random_range(1..20))
            .map(|_| char::from(rng.random_range(33u8..127)))
            .filter(|c| !matches!(c, '/' | '?' | '#'))
            .collect(),
        n => CALL_IDS[n % CALL_IDS.len()].to_owned(),
    };
    let content_type = match rng.random_range(0..12) {
        0 => None,
        1 => Some("text/plain"),
        2 => Some("application/json; charset=latin1"),
        _ => Some("application/json"),
    };
    let body = match rng.random_range(0..6) {
        0 => (0..rng.random_range(0..300))
            .map(|_| rng.random())
            .collect(),
        _ => generated_json(rng).into_bytes(),
    };
    (format!("/v1/call/stream/{call_id}"), content_type, body)
}

/// A packet body, each field valid or replaced by something else.
fn generated_json(rng: &mut impl rand::Rng) -> String {
    let values = [
        "0",
        "1",
        "-1",
        "42",
        "1e308",
        "-1e308",
        "1.5",
        "9223372036854775807",
        "99999999999999999999",
        "null",
        "true",
        "\"\"",
        "\"AAAA\"",
        "\"\\u0000\"",
        "[]",
        "{}",
        "[1,2]",
        "\"1\"",
        "1e-400",
        "\"\u{1F600}\"",
    ];
    let mut pick = |valid: String| {
        if rng.random_bool(0.6) {
            Some(valid)
        } else if rng.random_bool(0.1) {
            None
        } else {
            Some(values[rng.random_range(0..values.len())].to_owned())
        }
    };
    let sequence = pick(rng_sequence());
    let data = pick("\"AAAA\"".into());
    let timestamp = pick("1764086400.5".into());
    let mut fields: Vec<String> = [
        ("sequence", sequence),
        ("data", data),
        ("timestamp", timestamp),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("\"{k}\":{v}")))
    .collect();
    if rng.random_bool(0.05) {
        fields.push("\"extra\":1".into());
    }
    format!("{{{}}}", fields.join(","))
}

fn rng_sequence() -> String {
    rand::random_range(0..1_000i64).to_string()
}
