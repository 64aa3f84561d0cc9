//! Following the notifier's WebSocket: frames as they come, and a resume with `since` (and the
//! stream it belongs to) after a disconnect.

use std::time::Duration;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, protocol::WebSocketConfig},
};
use wire::{
    CallId,
    live::{ClientMessage, LiveFrame, LiveQuery, WS_PATH},
};

/// More calls than this are subscribed to by message rather than in the URL.
const IDS_IN_URL: usize = 50;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

pub struct Live {
    base: String,
    /// Sent as `Authorization: Bearer` (a supervisor's key).
    key: Option<String>,
    socket: Option<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    /// The last stream sequence seen: where a reconnect resumes.
    last_seq: Option<u64>,
    /// The stream those sequences belong to (from the last snapshot).
    stream: Option<String>,
    /// The `seq` and `stream` of a snapshot whose pages are still arriving.
    pending: Option<(u64, String)>,
    /// The calls followed (all when empty).
    call_ids: Vec<String>,
    /// Grows while reconnects fail or end at once; reset by a frame.
    backoff: Duration,
}

impl Live {
    /// `notifier_url` may be http(s):// or ws(s)://.
    pub fn new(notifier_url: &str, key: Option<String>) -> Self {
        let base = notifier_url
            .trim_end_matches('/')
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        Self {
            base,
            key,
            socket: None,
            last_seq: None,
            stream: None,
            pending: None,
            call_ids: Vec::new(),
            backoff: FIRST_BACKOFF,
        }
    }

    /// Connects, following `call_ids` (every call when empty), resuming after the last
    /// sequence seen if there is one.
    pub async fn connect(&mut self, call_ids: &[String]) -> anyhow::Result<()> {
        self.call_ids = call_ids.to_vec();
        let in_url = if call_ids.len() > IDS_IN_URL {
            &call_ids[..1]
        } else {
            call_ids
        };
        let ids = in_url
            .iter()
            .map(|id| CallId::parse(id.as_str()).with_context(|| format!("call {id:?}")))
            .collect::<anyhow::Result<_>>()?;
        let query = LiveQuery {
            call_ids: (!in_url.is_empty()).then_some(ids),
            since: self.last_seq,
            stream: self.stream.clone(),
            token: None,
        }
        .to_query();
        let url = if query.is_empty() {
            format!("{}{WS_PATH}", self.base)
        } else {
            format!("{}{WS_PATH}?{query}", self.base)
        };
        // A snapshot of every call in the retention window can be large.
        // Small buffers (tungstenite's default is 128 KiB each way): `pbx bench-live` holds
        // thousands of sockets, and big messages are assembled outside the read buffer anyway.
        let config = WebSocketConfig::default()
            .max_message_size(Some(512 << 20))
            .max_frame_size(Some(512 << 20))
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let mut request = url
            .as_str()
            .into_client_request()
            .context("the notifier URL")?;
        if let Some(key) = &self.key {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {key}")
                    .parse()
                    .context("the supervisor key")?,
            );
        }
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), false)
                .await
                .with_context(|| {
                    format!(
                        "cannot reach the notifier at {}: is it running? try ./scripts/up",
                        self.base
                    )
                })?;
        if call_ids.len() > IDS_IN_URL {
            // Too many for a URL: subscribe by message (the answer is a snapshot of them).
            let subscribe = ClientMessage::Subscribe {
                call_ids: call_ids.to_vec(),
            };
            let subscribe = serde_json::to_string(&subscribe).context("a subscribe message")?;
            socket
                .send(Message::Text(subscribe.into()))
                .await
                .context("subscribing to the calls")?;
        }
        self.socket = Some(socket);
        Ok(())
    }

    /// The next snapshot, status, progress, lagged or error frame; `None` if the connection
    /// ended. Heartbeats, and frames this build does not understand, are skipped.
    pub async fn next(&mut self) -> Option<LiveFrame> {
        let socket = self.socket.as_mut()?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<LiveFrame>(&text) else {
                        continue;
                    };
                    self.backoff = FIRST_BACKOFF;
                    match &frame {
                        // A snapshot replaces the view: its sequence (and stream) is where we
                        // are now, even if lower than before (another replica, a new stream).
                        // A paged snapshot is a resume point only once its last page is
                        // in: a connection lost halfway starts over with a whole snapshot.
                        LiveFrame::Snapshot(snapshot) => {
                            self.pending = Some((snapshot.seq, snapshot.stream.clone()));
                            self.last_seq = None;
                            self.stream = None;
                            if !snapshot.more {
                                self.complete_snapshot();
                            }
                        }
                        LiveFrame::SnapshotPage(page) if !page.more => self.complete_snapshot(),
                        LiveFrame::Status(status) if self.pending.is_none() => {
                            let seq = status.seq;
                            self.last_seq = Some(self.last_seq.map_or(seq, |s| s.max(seq)));
                        }
                        LiveFrame::Heartbeat { .. } | LiveFrame::Unknown => continue,
                        _ => {}
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

    fn complete_snapshot(&mut self) {
        if let Some((seq, stream)) = self.pending.take() {
            self.last_seq = Some(seq);
            self.stream = Some(stream);
        }
    }

    /// Reconnects to the same calls (resuming after the last sequence seen), with a growing
    /// pause between tries (also when connections end as soon as they open), for up to
    /// `patience`.
    pub async fn reconnect(&mut self, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        let call_ids = self.call_ids.clone();
        loop {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
            match self.connect(&call_ids).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + self.backoff > deadline => return Err(e),
                Err(_) => {}
            }
        }
    }
}
