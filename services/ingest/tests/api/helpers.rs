use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use common::{
    subjects::StreamKind,
    testing::{Running, TestEnv},
};
use ingest::config::IngestConfig;
use serde_json::{Value, json};

/// A running ingest on a random port, with its own database and prefix.
pub struct TestApp {
    /// Declared first so that ingest is told to stop (dropped) before the test's database
    /// and streams go.
    pub service: Running,
    pub env: TestEnv,
    pub address: String,
    pub client: reqwest::Client,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestEnv::new().await, |_| {}).await
}

/// Starts ingest against `env`, after `customize` has adjusted its settings.
pub async fn spawn_app_with(env: TestEnv, customize: impl FnOnce(&mut IngestConfig)) -> TestApp {
    let mut config = test_config(&env);
    customize(&mut config);
    let service = ingest::testing::spawn(config).await;
    common::tls::install_crypto_provider();
    // An admin key of the test's tenant: every route is open to it. Tests of keys and roles
    // build clients of their own.
    let client = reqwest::Client::builder()
        .default_headers(env.auth_headers(common::Role::Admin).await)
        .build()
        .unwrap();
    TestApp {
        env,
        address: service.url(),
        client,
        service,
    }
}

/// Ingest's test settings ([`ingest::testing::config`]) on this test's database and prefix.
pub fn test_config(env: &TestEnv) -> IngestConfig {
    ingest::testing::config(&env.config)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post_packet(&self, call_id: &str, sequence: i64, data: &str) -> reqwest::Response {
        self.post_json(
            &format!("/v1/call/stream/{call_id}"),
            json!({"sequence": sequence, "data": data, "timestamp": 1_764_086_400.0 + sequence as f64 * 0.02}),
        )
        .await
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn complete(&self, call_id: &str, body: Option<Value>) -> reqwest::Response {
        let request = self
            .client
            .post(self.url(&format!("/v1/call/{call_id}/complete")));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        request.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn call(&self, call_id: &str) -> Value {
        let response = self.get(&format!("/v1/call/{call_id}")).await;
        assert_eq!(response.status(), 200, "GET call {call_id}");
        response.json().await.unwrap()
    }

    pub async fn stored_packets(&self, call_id: &str) -> Vec<(i64, String)> {
        sqlx::query_as("SELECT sequence, data FROM packets WHERE call_id = $1 ORDER BY sequence")
            .bind(self.env.key(call_id).as_str())
            .fetch_all(&self.env.pool)
            .await
            .unwrap()
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    /// (subject, JSON payload, Nats-Msg-Id) of every message in one of this test's streams.
    pub async fn messages(&self, kind: StreamKind) -> Vec<(String, Value, String)> {
        self.env
            .stream_messages(kind)
            .await
            .into_iter()
            .map(|m: StreamMessage| {
                let id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                (
                    m.subject.to_string(),
                    serde_json::from_slice(&m.payload).unwrap(),
                    id,
                )
            })
            .collect()
    }

    /// Stops the server and waits for it to finish, as SIGTERM would.
    pub async fn stop(&mut self) {
        self.service.stop(Duration::from_secs(10)).await;
    }
}

pub async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A call id nobody else uses.
pub fn call_id() -> String {
    format!("call-{}", common::testing::random_suffix())
}
