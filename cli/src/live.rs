//! Following the notifier's WebSocket: frames as they come, and a resume with `since` after
//! a disconnect.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

pub struct Live {
    base: String,
    socket: Option<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    /// The last stream sequence seen: where a reconnect resumes.
    last_seq: Option<u64>,
}

impl Live {
    /// `notifier_url` may be http(s):// or ws(s)://.
    pub fn new(notifier_url: &str) -> Self {
        let base = notifier_url
            .trim_end_matches('/')
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        Self {
            base,
            socket: None,
            last_seq: None,
        }
    }

    pub async fn connect(&mut self, call_ids: &[String]) -> anyhow::Result<()> {
        let mut query: Vec<String> = call_ids.iter().map(|id| format!("call_id={id}")).collect();
        if let Some(seq) = self.last_seq {
            query.push(format!("since={seq}"));
        }
        let url = if query.is_empty() {
            format!("{}/ws", self.base)
        } else {
            format!("{}/ws?{}", self.base, query.join("&"))
        };
        let (socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the notifier at {}: is it running? try ./scripts/up",
                    self.base
                )
            })?;
        self.socket = Some(socket);
        Ok(())
    }

    /// The next snapshot, status or lagged frame; `None` if the connection ended.
    pub async fn next(&mut self) -> Option<Value> {
        let socket = self.socket.as_mut()?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).ok()?;
                    if let Some(seq) = frame["seq"].as_u64() {
                        self.last_seq = Some(self.last_seq.map_or(seq, |s| s.max(seq)));
                    }
                    return Some(frame);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    self.socket = None;
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reconnects (resuming after the last sequence seen), trying for up to `patience`.
    pub async fn reconnect(
        &mut self,
        call_ids: &[String],
        patience: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut wait = Duration::from_millis(200);
        loop {
            match self.connect(call_ids).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + wait > deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
