use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::{CallId, CallState, events::StatusEvent, nats, testing::TestEnv};
use futures::{SinkExt, StreamExt};
use notifier::{App, config::NotifierConfig};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Notifier {
    pub env: TestEnv,
    pub url: String,
    config: NotifierConfig,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    js: async_nats::jetstream::Context,
}

pub fn config(env: &TestEnv) -> NotifierConfig {
    let mut config = NotifierConfig::try_parse_from(["notifier"]).unwrap();
    config.common = env.config.clone();
    config.addr = "127.0.0.1:0".parse().unwrap();
    config
}

pub async fn notifier(customize: impl FnOnce(&mut NotifierConfig)) -> Notifier {
    common::telemetry::init(common::config::LogFormat::Text);
    let env = TestEnv::new().await;
    start(env, customize).await
}

pub async fn start(env: TestEnv, customize: impl FnOnce(&mut NotifierConfig)) -> Notifier {
    common::tls::install_crypto_provider();
    let mut config = config(&env);
    customize(&mut config);
    let app = App::build(config.clone()).await.expect("notifier builds");
    let url = format!("127.0.0.1:{}", app.port());
    config.addr = format!("127.0.0.1:{}", app.port()).parse().unwrap();
    let stop = CancellationToken::new();
    let task = Some(tokio::spawn(app.run_until_stopped(stop.clone())));
    let js = env.jetstream().await;
    Notifier {
        env,
        url,
        config,
        stop,
        task,
        js,
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn event(call: &str, version: i64, state: CallState) -> StatusEvent {
    StatusEvent {
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
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().expect("the notifier stops cleanly");
        }
        let app = App::build(self.config.clone())
            .await
            .expect("notifier builds again on the same address");
        self.stop = CancellationToken::new();
        self.task = Some(tokio::spawn(app.run_until_stopped(self.stop.clone())));
    }

    /// Publishes a status event the way ingest and the transcriber do.
    pub async fn publish(&self, event: &StatusEvent) {
        nats::publish(
            &self.js,
            self.env.subjects().call_status(&event.call_id),
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
        common::testing::eventually(
            "the hub to apply the events",
            Duration::from_secs(10),
            || async {
                (self.metric("switchboard_notifier_events_total").await >= count as f64)
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn connect(&self, query: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws{query}", self.url))
            .await
            .expect("websocket connects");
        ws
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.url))
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
