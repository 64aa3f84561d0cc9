//! The live view's doors: no credential, another tenant's key, a foreign page's Origin, the
//! dashboard's token exchange, and a revoked key's open socket.

use std::time::Duration;

use common::{CallState, Role, TenantId};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{event, next, notifier};

#[tokio::test]
async fn a_socket_without_a_valid_supervisor_credential_is_refused() {
    let n = notifier(|_| {}).await;
    assert_eq!(n.try_connect("", None, None).await.err(), Some(401));
    assert_eq!(
        n.try_connect("", Some("sbk_made-up"), None).await.err(),
        Some(401)
    );
    assert_eq!(
        n.try_connect("?token=sbt_made-up", None, None).await.err(),
        Some(401)
    );
    let pbx = n.env.api_key(Role::Pbx).await;
    assert_eq!(n.try_connect("", Some(&pbx), None).await.err(), Some(403));
    let admin = n.env.api_key(Role::Admin).await;
    assert!(n.try_connect("", Some(&admin), None).await.is_ok());
}

#[tokio::test]
async fn a_page_of_a_foreign_origin_is_refused_and_listed_origins_are_not() {
    let n = notifier(|c| {
        c.allowed_origins = "https://ops.example.com".parse_origins();
    })
    .await;
    let key = n.key.clone();
    let own = format!("http://{}", n.url);
    assert!(n.try_connect("", Some(&key), Some(&own)).await.is_ok());
    assert!(
        n.try_connect("", Some(&key), Some("https://ops.example.com"))
            .await
            .is_ok()
    );
    assert_eq!(
        n.try_connect("", Some(&key), Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    // Refused before the credential is even looked at.
    assert_eq!(
        n.try_connect("", None, Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
}

#[tokio::test]
async fn a_supervisor_sees_only_its_tenants_calls() {
    let n = notifier(|_| {}).await;
    let mut theirs = event("shared-id", 1, CallState::InProgress);
    theirs.tenant = TenantId::parse("globex").unwrap();
    n.publish(&theirs).await;
    n.publish(&event("ours-1", 1, CallState::InProgress)).await;
    n.wait_applied(2).await;

    let mut acme = n.connect("").await;
    let snapshot = next(&mut acme).await;
    let ids: Vec<&Value> = snapshot["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["call_id"])
        .collect();
    assert_eq!(ids, [&json!("ours-1")], "{snapshot}");

    // Globex's supervisor, signed in as the dashboard is: with a token minted from its key.
    let globex_key = n.env.api_key_for("globex", Role::Supervisor).await;
    let token = sign_in(&n, &globex_key).await;
    assert_eq!(token["tenant"], "globex");
    let token = token["token"].as_str().unwrap();
    let mut globex = n
        .try_connect(&format!("?token={token}"), None, None)
        .await
        .unwrap();
    let snapshot = next(&mut globex).await;
    assert_eq!(snapshot["calls"].as_array().unwrap().len(), 1);
    assert_eq!(snapshot["calls"][0]["tenant"], "globex");

    // Live: each sees its own tenant's next event only, even for the same call id.
    let mut later = event("shared-id", 2, CallState::Completed);
    later.tenant = TenantId::parse("globex").unwrap();
    n.publish(&later).await;
    n.publish(&event("ours-1", 2, CallState::Completed)).await;
    let seen = next(&mut acme).await;
    assert_eq!(
        (seen["call_id"].as_str(), seen["tenant"].as_str()),
        (Some("ours-1"), Some("acme"))
    );
    let seen = next(&mut globex).await;
    assert_eq!(
        (seen["call_id"].as_str(), seen["tenant"].as_str()),
        (Some("shared-id"), Some("globex"))
    );
}

#[tokio::test]
async fn the_dashboard_exchanges_a_key_for_a_token_that_opens_the_live_view() {
    let n = notifier(|_| {}).await;
    let http = reqwest::Client::new();
    let token_url = format!("http://{}/v1/auth/token", n.url);
    let answer = sign_in(&n, &n.key).await;
    let token = answer["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("sbt_"), "{answer}");
    assert_eq!(
        (answer["tenant"].as_str(), answer["role"].as_str()),
        (Some("acme"), Some("supervisor"))
    );
    let mut ws = n
        .try_connect(&format!("?token={token}"), None, None)
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["type"], "snapshot");
    // A token refreshes itself; a pbx key gets no token; no key, 401.
    let refreshed = http
        .post(&token_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let pbx = n.env.api_key(Role::Pbx).await;
    assert_eq!(
        http.post(&token_url)
            .bearer_auth(&pbx)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(http.post(&token_url).send().await.unwrap().status(), 401);
    // The page is served with a strict policy.
    let page = http.get(format!("http://{}/", n.url)).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
}

#[tokio::test]
async fn revoking_a_key_closes_its_open_sockets_and_its_tokens() {
    let n = notifier(|_| {}).await;
    let (id, key) = common::auth::create_key(&n.env.pool, &n.env.tenant(), Role::Supervisor)
        .await
        .unwrap();
    let token = sign_in(&n, &key).await;
    let token = token["token"].as_str().unwrap().to_owned();
    let mut by_key = n.try_connect("", Some(&key), None).await.unwrap();
    let mut by_token = n
        .try_connect(&format!("?token={token}"), None, None)
        .await
        .unwrap();
    assert_eq!(next(&mut by_key).await["type"], "snapshot");
    assert_eq!(next(&mut by_token).await["type"], "snapshot");
    assert!(common::auth::revoke_key(&n.env.pool, id).await.unwrap());
    for ws in [&mut by_key, &mut by_token] {
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Close(frame) = message {
                    return frame.map(|f| u16::from(f.code));
                }
            }
            None
        })
        .await
        .expect("closed within 10 s");
        assert_eq!(code, Some(4401));
    }
    assert_eq!(
        n.try_connect(&format!("?token={token}"), None, None)
            .await
            .err(),
        Some(401)
    );
}

/// The answer to `POST /v1/auth/token` with `key`, as the dashboard signs in.
async fn sign_in(n: &crate::helpers::Notifier, key: &str) -> Value {
    reqwest::Client::new()
        .post(format!("http://{}/v1/auth/token", n.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

trait ParseOrigins {
    fn parse_origins(&self) -> notifier::origins::AllowedOrigins;
}

impl ParseOrigins for &str {
    fn parse_origins(&self) -> notifier::origins::AllowedOrigins {
        notifier::origins::AllowedOrigins::parse(self).unwrap()
    }
}
