use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use clap::Parser;
use common::{subjects::StreamKind, testing::TestEnv};
use ingest::{App, config::Cli, config::IngestConfig};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running ingest on a random port, with its own database and prefix.
pub struct TestApp {
    pub env: TestEnv,
    pub address: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestEnv::new().await, |_| {}).await
}

/// Starts ingest against `env`, after `customize` has adjusted its settings.
pub async fn spawn_app_with(env: TestEnv, customize: impl FnOnce(&mut IngestConfig)) -> TestApp {
    common::telemetry::init(common::config::LogFormat::Text);
    let mut config = test_config(&env);
    customize(&mut config);
    let app = App::build(config).await.expect("ingest builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        env,
        address,
        client: {
            common::tls::install_crypto_provider();
            reqwest::Client::new()
        },
        shutdown,
        server: Some(server),
    }
}

/// Settings as production has them, but on a random port, this test's database and prefix,
/// and a quick outbox relay.
pub fn test_config(env: &TestEnv) -> IngestConfig {
    let mut config = Cli::try_parse_from(["ingest"])
        .expect("defaults parse")
        .config;
    config.common = env.config.clone();
    config.addr = "127.0.0.1:0".parse().unwrap();
    config.outbox_relay_interval_ms = 200;
    config.call_idle_timeout_secs = 3600;
    config.max_packet_bytes = 65_536;
    config
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
            .bind(call_id)
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
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("ingest stops within 10 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
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
