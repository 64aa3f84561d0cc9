//! Keys, roles, tenants and limits through the real API: every `/v1` route without a key,
//! with a revoked key, with a role that may not, and across tenants; the rate limit's 429 and
//! the cap on a tenant's streaming calls; `ingest keys` as an operator runs it.

use std::time::Duration;

use common::{
    Role,
    testing::{TestEnv, bearer_headers, eventually},
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, call_id, spawn_app, spawn_app_with, status_and_body};

/// Every `/v1` route, as (method, path, body).
fn routes(call: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (
            Method::POST,
            format!("/v1/call/stream/{call}"),
            Some(json!({"sequence": 0, "data": "x", "timestamp": 1.0})),
        ),
        (Method::POST, format!("/v1/call/{call}/complete"), None),
        (Method::GET, format!("/v1/call/{call}"), None),
        (Method::POST, format!("/v1/call/{call}/retry"), None),
        (Method::GET, "/v1/calls".into(), None),
    ]
}

async fn send(
    app: &TestApp,
    key: Option<&str>,
    (method, path, body): &(Method, String, Option<Value>),
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new().request(method.clone(), app.url(path));
    if let Some(key) = key {
        request = request.headers(bearer_headers(key));
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let (status, body) = status_and_body(response).await;
    (status, body, headers)
}

#[tokio::test]
async fn every_v1_route_refuses_a_missing_malformed_or_unknown_key_with_401() {
    let app = spawn_app().await;
    let call = call_id();
    for route in routes(&call) {
        let (status, body, headers) = send(&app, None, &route).await;
        assert_eq!(status, 401, "{} {} without a key: {body}", route.0, route.1);
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(body["error"]["field"], "Authorization");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let (status, body, _) = send(&app, Some("sbk_not-a-real-key"), &route).await;
        assert_eq!(status, 401, "{} {} with a made-up key", route.0, route.1);
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // A scheme other than Bearer.
    let response = reqwest::Client::new()
        .get(app.url("/v1/calls"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Nothing was created by any of it.
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 0);
    // Health stays open; metrics need an admin key.
    for open in ["/healthz", "/readyz"] {
        let status = reqwest::get(app.url(open)).await.unwrap().status();
        assert_eq!(status, 200, "{open}");
    }
    assert_eq!(
        reqwest::get(app.url("/metrics")).await.unwrap().status(),
        401
    );
    let metrics = app.get("/metrics").await;
    assert_eq!(metrics.status(), 200, "an admin key reads /metrics");
}

#[tokio::test]
async fn each_role_may_do_exactly_its_part() {
    let app = spawn_app().await;
    let pbx = app.env.api_key(Role::Pbx).await;
    let supervisor = app.env.api_key(Role::Supervisor).await;
    let call = call_id();
    let [stream, complete, read, retry, list] = routes(&call).try_into().unwrap();

    // The PBX streams and completes; it may not read, re-drive or see metrics.
    assert_eq!(send(&app, Some(&pbx), &stream).await.0, 202);
    assert_eq!(send(&app, Some(&pbx), &complete).await.0, 200);
    for route in [&read, &retry, &list] {
        let (status, body, _) = send(&app, Some(&pbx), route).await;
        assert_eq!(status, 403, "a pbx key on {} {}", route.0, route.1);
        assert_eq!(body["error"]["code"], "forbidden");
    }
    // The supervisor reads and re-drives; it may not stream or complete. The 403 comes
    // before the body is looked at: a bad body still gets 403.
    assert_eq!(send(&app, Some(&supervisor), &read).await.0, 200);
    assert_eq!(send(&app, Some(&supervisor), &list).await.0, 200);
    let (status, body, _) = send(&app, Some(&supervisor), &retry).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("call_not_failed"))
    );
    for route in [&stream, &complete] {
        let (status, _, _) = send(&app, Some(&supervisor), route).await;
        assert_eq!(status, 403, "a supervisor key on {} {}", route.0, route.1);
    }
    let bad_body = (
        stream.0.clone(),
        stream.1.clone(),
        Some(json!({"nonsense": true})),
    );
    assert_eq!(send(&app, Some(&supervisor), &bad_body).await.0, 403);
    let metrics = reqwest::Client::new()
        .get(app.url("/metrics"))
        .bearer_auth(&supervisor)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 403, "only admin keys read /metrics");
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_every_route_within_seconds() {
    let app = spawn_app().await;
    let (id, key) = common::auth::create_key(&app.env.pool, &app.env.tenant(), Role::Admin)
        .await
        .unwrap();
    let call = call_id();
    let all = routes(&call);
    for route in &all {
        let (status, body, _) = send(&app, Some(&key), route).await;
        assert!(
            status < 400 || status == 409,
            "{} {} before: {status} {body}",
            route.0,
            route.1
        );
    }
    assert!(common::auth::revoke_key(&app.env.pool, id).await.unwrap());
    // Within 5 s (the bound) every route refuses it.
    eventually(
        "the revoked key to be refused",
        Duration::from_secs(5),
        || async { (send(&app, Some(&key), &all[4]).await.0 == 401).then_some(()) },
    )
    .await;
    for route in &all {
        let (status, body, _) = send(&app, Some(&key), route).await;
        assert_eq!(status, 401, "{} {} after: {body}", route.0, route.1);
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    assert!(
        !common::auth::revoke_key(&app.env.pool, 999_999)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_tenants_calls_are_its_own_and_others_are_not_found() {
    let app = spawn_app().await;
    let acme = app.env.api_key(Role::Admin).await;
    let globex = app.env.api_key_for("globex", Role::Admin).await;
    let call = call_id();
    let [stream, complete, read, retry, list] = routes(&call).try_into().unwrap();

    // Both stream the same call id: two calls.
    assert_eq!(send(&app, Some(&acme), &stream).await.0, 202);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 1);
    for route in [&read, &complete, &retry] {
        let (status, body, _) = send(&app, Some(&globex), route).await;
        assert_eq!(
            status, 404,
            "globex on acme's call: {} {}",
            route.0, route.1
        );
        assert_eq!(body["error"]["code"], "call_not_found");
    }
    let (_, page, _) = send(&app, Some(&globex), &list).await;
    assert_eq!(
        page["calls"],
        json!([]),
        "globex lists none of acme's calls"
    );
    assert_eq!(send(&app, Some(&globex), &stream).await.0, 202);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 2);
    // Completing globex's call leaves acme's streaming.
    assert_eq!(send(&app, Some(&globex), &complete).await.0, 200);
    let (_, mine, _) = send(&app, Some(&acme), &read).await;
    assert_eq!(mine["state"], "IN_PROGRESS");
    assert_eq!(mine["call_id"], call.as_str());
    // The tenant is a token of every subject: one tenant's traffic is one wildcard away.
    let subjects: Vec<String> = app
        .messages(common::subjects::StreamKind::Packets)
        .await
        .into_iter()
        .map(|(subject, _, _)| subject)
        .collect();
    let prefix = app.env.config.prefix.as_str();
    assert!(
        subjects.contains(&format!("{prefix}.packets.acme.{call}")),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&format!("{prefix}.packets.globex.{call}")),
        "{subjects:?}"
    );
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let app = spawn_app_with(TestEnv::new().await, |c| {
        c.auth.packets_per_sec = 5;
        c.auth.requests_per_sec = 2;
    })
    .await;
    let call = call_id();
    let mut statuses = Vec::new();
    for sequence in 0..20 {
        let response = app.post_packet(&call, sequence, "x").await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let (_, body) = status_and_body(response).await;
            assert_eq!(body["error"]["code"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    assert!(
        statuses.contains(&202) && statuses.contains(&429),
        "{statuses:?}"
    );
    // Another key has a budget of its own.
    let other = app.env.api_key(Role::Pbx).await;
    let fresh = (
        Method::POST,
        format!("/v1/call/stream/{}", call_id()),
        Some(json!({"sequence": 0, "data": "x", "timestamp": 1.0})),
    );
    assert_eq!(send(&app, Some(&other), &fresh).await.0, 202);
    // Other requests have their own, smaller, budget.
    let reads: Vec<u16> = futures::future::join_all(
        (0..10).map(|_| async { app.get("/v1/calls").await.status().as_u16() }),
    )
    .await;
    assert!(reads.contains(&429), "{reads:?}");
}

#[tokio::test]
async fn a_tenant_streams_at_most_its_cap_of_calls_and_never_loses_one_already_streaming() {
    let app = spawn_app_with(TestEnv::new().await, |c| {
        c.max_streaming_calls_per_tenant = 2;
    })
    .await;
    let (a, b, c) = (call_id(), call_id(), call_id());
    assert_eq!(app.post_packet(&a, 0, "x").await.status(), 202);
    assert_eq!(app.post_packet(&b, 0, "x").await.status(), 202);
    let refused = app.post_packet(&c, 0, "x").await;
    assert!(refused.headers().contains_key("retry-after"));
    let (status, body) = status_and_body(refused).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_streaming_calls"))
    );
    // The calls already streaming go on; another tenant has a cap of its own.
    assert_eq!(app.post_packet(&a, 1, "y").await.status(), 202);
    let globex = app.env.api_key_for("globex", Role::Pbx).await;
    let theirs = (
        Method::POST,
        format!("/v1/call/stream/{c}"),
        Some(json!({"sequence": 0, "data": "x", "timestamp": 1.0})),
    );
    assert_eq!(send(&app, Some(&globex), &theirs).await.0, 202);
    // Once one ends, a new call may start.
    assert_eq!(app.complete(&a, None).await.status(), 200);
    assert_eq!(app.post_packet(&c, 0, "x").await.status(), 202);
}

#[tokio::test]
async fn with_authentication_off_every_request_is_tenant_default() {
    let app = spawn_app_with(TestEnv::new().await, |c| {
        c.auth.mode = common::auth::settings::AuthMode::Off;
    })
    .await;
    let call = call_id();
    let stream = &routes(&call)[0];
    assert_eq!(send(&app, None, stream).await.0, 202);
    let stored: String = sqlx::query_scalar("SELECT call_id FROM calls")
        .fetch_one(&app.env.pool)
        .await
        .unwrap();
    assert_eq!(stored, format!("default.{call}"));
}

/// `ingest keys` as an operator runs it: the key alone on the last line, listed by its first
/// characters only, revoked by id.
#[tokio::test]
async fn ingest_keys_creates_lists_and_revokes() {
    use clap::Parser;
    #[derive(Parser)]
    struct Keys {
        #[command(subcommand)]
        command: ingest::config::KeysCommand,
    }
    let env = TestEnv::new().await;
    let mut config = ingest::testing::config(&env.config);
    config.common.database_url = env.config.database_url.clone();
    let run = |args: &[&str]| {
        let mut argv = vec!["keys"];
        argv.extend_from_slice(args);
        match Keys::try_parse_from(std::iter::once("keys").chain(args.iter().copied())) {
            Ok(keys) => (config.clone(), keys.command),
            Err(e) => panic!("{argv:?}: {e}"),
        }
    };
    let mut out = Vec::new();
    let (c, command) = run(&["create", "--tenant", "initech", "--role", "supervisor"]);
    ingest::keys::run(&c, &command, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let key = text.lines().last().unwrap().to_owned();
    assert!(key.starts_with("sbk_") && key.len() == 47, "{text}");
    let principal = common::auth::Keys::new(env.pool.clone())
        .authenticate(&key)
        .await
        .unwrap();
    assert_eq!(
        (principal.tenant.as_str(), principal.role),
        ("initech", Role::Supervisor)
    );

    let mut out = Vec::new();
    let (c, command) = run(&["list"]);
    ingest::keys::run(&c, &command, &mut out).await.unwrap();
    let listing = String::from_utf8(out).unwrap();
    assert!(
        listing.contains("initech") && listing.contains(&key[..8]),
        "{listing}"
    );
    assert!(!listing.contains(&key), "a listing never shows a whole key");

    let mut out = Vec::new();
    let (c, command) = run(&["revoke", &principal.key_id.to_string()]);
    ingest::keys::run(&c, &command, &mut out).await.unwrap();
    assert!(
        common::auth::Keys::new(env.pool.clone())
            .authenticate(&key)
            .await
            .is_err()
    );
    let (c, command) = run(&["revoke", "424242"]);
    assert!(
        ingest::keys::run(&c, &command, &mut Vec::new())
            .await
            .is_err()
    );
}
