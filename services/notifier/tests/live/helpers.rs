use std::time::Duration;

use bytes::Bytes;
use common::{
    CallId, CallState, Role, TenantId,
    events::StatusEvent,
    nats,
    testing::{Running, TEST_TENANT, TestEnv},
};
use futures::{SinkExt, StreamExt};
use notifier::config::NotifierConfig;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::{net::TcpStream, sync::watch};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Notifier {
    /// Declared first so that the notifier is told to stop (dropped) before the test's
    /// streams go.
    pub service: Running,
    /// The hub's count of applied events ([`notifier::App::watch_applied`]).
    applied: watch::Receiver<u64>,
    pub env: TestEnv,
    /// `127.0.0.1:<port>`.
    pub url: String,
    config: NotifierConfig,
    js: async_nats::jetstream::Context,
    /// A `supervisor` key of the test tenant: what [`Notifier::connect`] signs in with.
    pub key: String,
}

pub async fn notifier(customize: impl FnOnce(&mut NotifierConfig)) -> Notifier {
    let env = TestEnv::new().await;
    start(env, customize).await
}

pub async fn start(env: TestEnv, customize: impl FnOnce(&mut NotifierConfig)) -> Notifier {
    let mut config = notifier::testing::config(&env.config);
    customize(&mut config);
    let (service, applied) = notifier::testing::spawn(config.clone()).await;
    // A restart binds the same address again.
    config.addr = format!("127.0.0.1:{}", service.port).parse().unwrap();
    let js = env.jetstream().await;
    let key = env.api_key(Role::Supervisor).await;
    Notifier {
        key,
        url: config.addr.to_string(),
        service,
        applied,
        env,
        config,
        js,
    }
}

pub fn event(call: &str, version: i64, state: CallState) -> StatusEvent {
    StatusEvent {
        tenant: TenantId::parse(TEST_TENANT).unwrap(),
        call_id: CallId::parse(call).unwrap(),
        state,
        previous_state: None,
        version,
        at: OffsetDateTime::now_utc(),
        reason: "test".into(),
        packets_received: version,
        missing_packets: 0,
        ai_attempts: 0,
        last_error: None,
        transcript: None,
        transcript_chars: None,
        transcript_truncated: false,
        sentiment: None,
        next_attempt_at: None,
    }
}

impl Notifier {
    /// Stops the notifier (every socket gets its close frame) and starts a new one on the
    /// same address, as a restart or a redeploy would: clients reconnect to the same URL.
    pub async fn restart(&mut self) {
        self.service.stop(Duration::from_secs(30)).await;
        (self.service, self.applied) = notifier::testing::spawn(self.config.clone()).await;
    }

    /// Publishes a status event the way ingest and the transcriber do.
    pub async fn publish(&self, event: &StatusEvent) {
        nats::publish(
            &self.js,
            self.env.subjects().call_status(&event.key()),
            &event.msg_id(),
            Bytes::from(serde_json::to_vec(event).unwrap()),
            None,
        )
        .await
        .expect("status event published");
    }

    /// Waits until the hub has applied `count` events (a connection made before that gets a
    /// snapshot without them, and the events right after it, live).
    pub async fn wait_applied(&self, count: usize) {
        let mut applied = self.applied.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            applied.wait_for(|n| *n >= count as u64),
        )
        .await
        .expect("timed out after 10s waiting for the hub to apply the events")
        .expect("the notifier is running");
    }

    /// A socket signed in with [`Notifier::key`], as `pbx watch` connects.
    pub async fn connect(&self, query: &str) -> Ws {
        let key = self.key.clone();
        self.try_connect(query, Some(&key), None)
            .await
            .expect("websocket connects")
    }

    /// A socket with `key` as its Bearer header (none: `None`) and `origin` as a browser's
    /// `Origin`; the HTTP status of a refused upgrade as the error.
    pub async fn try_connect(
        &self,
        query: &str,
        key: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Ws, u16> {
        use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest};
        let mut request = format!("ws://{}/ws{query}", self.url)
            .into_client_request()
            .unwrap();
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(ws),
            Err(Error::Http(response)) => Err(response.status().as_u16()),
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let admin = self.env.api_key(Role::Admin).await;
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.url))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The next JSON text frame (pings skipped), or a panic after 10 s.
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("frame readable");
        match message {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] != "heartbeat" {
                    return frame;
                }
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// The next text frame as it came (pings and heartbeats skipped), for size checks.
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within 30 s")
            .expect("socket open")
            .expect("frame readable");
        if let Message::Text(text) = message
            && !text.starts_with("{\"type\":\"heartbeat\"")
        {
            return text.to_string();
        }
    }
}
