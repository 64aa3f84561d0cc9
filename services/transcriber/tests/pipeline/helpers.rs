use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD};

use common::{
    CallState,
    events::WorkItem,
    nats,
    testing::{Running, TestEnv, eventually},
};
use serde_json::{Value, json};
use transcriber::{config::TranscriberConfig, providers::Provider};

/// An ingest (to create and complete calls through the real API) and a transcriber, sharing
/// one test database and prefix.
pub struct Stack {
    // The services are declared first so that they are told to stop (dropped) before the
    // test's database and streams go.
    pub transcribers: Vec<Transcriber>,
    _ingest: Running,
    pub env: TestEnv,
    pub ingest_url: String,
    pub client: reqwest::Client,
}

pub struct Transcriber {
    pub provider: Arc<Provider>,
    pub service: Running,
}

impl Transcriber {
    /// SIGTERM, as the process would get it; returns how long it took to exit.
    pub async fn terminate(&mut self) -> Duration {
        self.service.stop(Duration::from_secs(30)).await
    }

    pub fn requests(&self) -> u64 {
        match &*self.provider {
            Provider::Simulated(p) => p.requests(),
            Provider::OpenAi(_) => panic!("not the simulated provider"),
        }
    }
}

/// Transcriber settings for tests ([`transcriber::testing::config`]): quick AI, quick
/// retries, short ack wait.
pub fn transcriber_config(env: &TestEnv) -> TranscriberConfig {
    transcriber::testing::config(&env.config)
}

pub async fn stack(customize: impl FnOnce(&mut TranscriberConfig)) -> Stack {
    let mut stack = ingest_only().await;
    stack.add_transcriber(customize).await;
    stack
}

pub async fn ingest_only() -> Stack {
    let env = TestEnv::new().await;
    let ingest = ingest::testing::spawn(ingest::testing::config(&env.config)).await;
    common::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .default_headers(env.auth_headers(common::Role::Admin).await)
        .build()
        .unwrap();
    Stack {
        env,
        ingest_url: ingest.url(),
        client,
        _ingest: ingest,
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
        let (service, provider) = transcriber::testing::spawn(config).await;
        self.transcribers.push(Transcriber { provider, service });
        self.transcribers.len() - 1
    }

    /// Streams `words` as packets 0.. of `call_id` and completes the call.
    pub async fn call(&self, call_id: &str, words: &[&str]) {
        for (seq, word) in words.iter().enumerate() {
            self.packet(call_id, seq as i64, word).await;
        }
        self.complete(call_id).await;
    }

    /// A call of G.711 µ-law frames (base64), declared as such.
    pub async fn mulaw_call(&self, call_id: &str, frames: &[&str]) {
        for (seq, frame) in frames.iter().enumerate() {
            let body =
                json!({"sequence": seq, "data": frame, "timestamp": 1.0, "encoding": "mulaw"});
            self.send_packet(call_id, &body).await;
        }
        self.complete(call_id).await;
    }

    pub async fn packet(&self, call_id: &str, sequence: i64, data: &str) {
        let body = json!({"sequence": sequence, "data": data, "timestamp": 1.0});
        self.send_packet(call_id, &body).await;
    }

    async fn send_packet(&self, call_id: &str, body: &serde_json::Value) {
        let response = self
            .client
            .post(format!("{}/v1/call/stream/{call_id}", self.ingest_url))
            .json(body)
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

    /// The call's current round: its version when it last became `COMPLETED` (the `version`
    /// of its work item).
    pub async fn round(&self, call_id: &str) -> i64 {
        self.scalar(
            "SELECT max(version) FROM call_transitions \
             WHERE call_id = $1 AND to_state = 'COMPLETED'",
            call_id,
        )
        .await
    }

    /// Publishes a work item for round `version` of `call_id` under a message id of its own
    /// (past JetStream's deduplication), as a late duplicate would arrive.
    pub async fn publish_work_item(&self, call_id: &str, version: i64, msg_id: &str) {
        let key = self.env.key(call_id);
        let item = WorkItem {
            tenant: key.tenant().clone(),
            call_id: key.call_id().clone(),
            version,
            completed_at: time::OffsetDateTime::now_utc(),
        };
        let js = self.env.jetstream().await;
        nats::publish(
            &js,
            self.env.subjects().call_completed(&key),
            msg_id,
            Bytes::from(serde_json::to_vec(&item).unwrap()),
            None,
        )
        .await
        .unwrap();
    }

    /// `sql` with `$1` bound to the stored key of `call_id`.
    pub async fn scalar(&self, sql: &'static str, call_id: &str) -> i64 {
        sqlx::query_scalar(sql)
            .bind(self.env.key(call_id).as_str())
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }
}

/// A local OpenAI-compatible server that answers from a script and records what it got.
#[derive(Clone)]
pub struct FakeStt {
    script: Arc<Vec<(StatusCode, Option<&'static str>, &'static str)>>,
    pub seen: Arc<Mutex<Vec<(Instant, HeaderMap, Bytes)>>>,
}

async fn transcriptions(State(fake): State<FakeStt>, headers: HeaderMap, body: Bytes) -> Response {
    let n = {
        let mut seen = fake.seen.lock().unwrap();
        seen.push((Instant::now(), headers, body));
        seen.len() - 1
    };
    let (status, retry_after, body) = fake.script[n.min(fake.script.len() - 1)];
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.parse().unwrap());
    }
    response
}

pub async fn start_fake(
    script: Vec<(StatusCode, Option<&'static str>, &'static str)>,
) -> (String, FakeStt) {
    let fake = FakeStt {
        script: Arc::new(script),
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/audio/transcriptions", post(transcriptions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, fake)
}

pub fn mulaw_frame() -> String {
    STANDARD.encode([0xFFu8; 160])
}
