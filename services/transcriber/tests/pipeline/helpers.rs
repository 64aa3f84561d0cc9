use std::{sync::Arc, time::Duration};

use clap::Parser;
use common::{
    CallState,
    testing::{TestEnv, eventually},
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use transcriber::{App, config::TranscriberConfig, providers::Provider};

/// An ingest (to create and complete calls through the real API) and a transcriber, sharing
/// one test database and prefix.
pub struct Stack {
    pub env: TestEnv,
    pub ingest_url: String,
    pub client: reqwest::Client,
    ingest_stop: CancellationToken,
    pub transcribers: Vec<Transcriber>,
}

pub struct Transcriber {
    pub provider: Arc<Provider>,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Transcriber {
    /// SIGTERM, as the process would get it; returns how long it took to exit.
    pub async fn terminate(&mut self) -> Duration {
        let started = std::time::Instant::now();
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("transcriber exits")
                .unwrap()
                .unwrap();
        }
        started.elapsed()
    }

    pub fn requests(&self) -> u64 {
        match &*self.provider {
            Provider::Simulated(p) => p.requests(),
            Provider::OpenAi(_) => panic!("not the simulated provider"),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.ingest_stop.cancel();
        for t in &self.transcribers {
            t.stop.cancel();
        }
    }
}

/// Transcriber settings for tests: quick AI, quick retries, short ack wait.
pub fn transcriber_config(env: &TestEnv) -> TranscriberConfig {
    let mut config = TranscriberConfig::try_parse_from(["transcriber"]).expect("defaults");
    config.common = env.config.clone();
    config.addr = "127.0.0.1:0".parse().unwrap();
    config.ai.failure_rate = 0.0;
    config.ai.latency_ms = "1-5".parse().unwrap();
    config.ai.timeout_ms = 1_500;
    config.ack_wait_secs = 2;
    config.backoff_base_ms = 20;
    config.backoff_max_ms = 200;
    config.shutdown_grace_secs = 5;
    config
}

pub async fn stack(customize: impl FnOnce(&mut TranscriberConfig)) -> Stack {
    let mut stack = ingest_only().await;
    stack.add_transcriber(customize).await;
    stack
}

pub async fn ingest_only() -> Stack {
    common::telemetry::init(common::config::LogFormat::Text);
    let env = TestEnv::new().await;
    let mut config = ingest::config::Cli::try_parse_from(["ingest"])
        .unwrap()
        .config;
    config.common = env.config.clone();
    config.addr = "127.0.0.1:0".parse().unwrap();
    config.outbox_relay_interval_ms = 200;
    let app = ingest::App::build(config).await.expect("ingest builds");
    let ingest_url = format!("http://127.0.0.1:{}", app.port());
    let ingest_stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(ingest_stop.clone()));
    Stack {
        env,
        ingest_url,
        client: {
            common::tls::install_crypto_provider();
            reqwest::Client::new()
        },
        ingest_stop,
        transcribers: Vec::new(),
    }
}

impl Stack {
    pub async fn add_transcriber(
        &mut self,
        customize: impl FnOnce(&mut TranscriberConfig),
    ) -> usize {
        let mut config = transcriber_config(&self.env);
        customize(&mut config);
        let app = App::build(config).await.expect("transcriber builds");
        let provider = app.provider();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        self.transcribers.push(Transcriber {
            provider,
            stop,
            task: Some(task),
        });
        self.transcribers.len() - 1
    }

    /// Streams `words` as packets 0.. of `call_id` and completes the call.
    pub async fn call(&self, call_id: &str, words: &[&str]) {
        for (seq, word) in words.iter().enumerate() {
            self.packet(call_id, seq as i64, word).await;
        }
        self.complete(call_id).await;
    }

    pub async fn packet(&self, call_id: &str, sequence: i64, data: &str) {
        let response = self
            .client
            .post(format!("{}/v1/call/stream/{call_id}", self.ingest_url))
            .json(&json!({"sequence": sequence, "data": data, "timestamp": 1.0}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }

    pub async fn complete(&self, call_id: &str) {
        let response = self
            .client
            .post(format!("{}/v1/call/{call_id}/complete", self.ingest_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.ingest_url))
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn get_call(&self, call_id: &str) -> Value {
        self.client
            .get(format!("{}/v1/call/{call_id}", self.ingest_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the call is in `state`, and returns it.
    pub async fn wait_for(&self, call_id: &str, state: CallState, within: Duration) -> Value {
        eventually(&format!("{call_id} to be {state}"), within, || async {
            let call = self.get_call(call_id).await;
            (call["state"] == state.as_str()).then_some(call)
        })
        .await
    }

    /// Waits until every work item is settled (a work-queue stream drops acknowledged ones).
    pub async fn wait_work_queue_empty(&self) {
        eventually(
            "the work queue to empty",
            Duration::from_secs(20),
            || async {
                self.env
                    .stream_messages(common::subjects::StreamKind::Work)
                    .await
                    .is_empty()
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn scalar(&self, sql: &'static str, call_id: &str) -> i64 {
        sqlx::query_scalar(sql)
            .bind(call_id)
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }
}
