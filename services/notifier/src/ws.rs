//! `GET /ws`: one task per socket. It starts with a snapshot (or, with `?since=N`, exactly the
//! events after N), then forwards the hub's events that match its filter, in stream order.
//!
//! Protection: each socket can fall at most `NOTIFIER_CLIENT_QUEUE` events behind (the
//! broadcast ring is its bounded queue, shared memory, never growing); past that it is told
//! `{"type":"lagged"}` and resynchronised with a fresh snapshot. A client that does not take a
//! frame within `NOTIFIER_SEND_TIMEOUT_SECS` is closed (1008). A ping goes out every
//! `NOTIFIER_PING_INTERVAL_SECS`; a peer that has not answered the previous one is closed.
//! On shutdown every socket gets a close frame 1001 (going away).

use std::{collections::HashSet, sync::Arc, time::Duration};

use axum::{
    extract::{
        Query, State, WebSocketUpgrade,
        rejection::QueryRejection,
        ws::{
            CloseFrame, Message, Utf8Bytes, WebSocket, close_code,
            rejection::WebSocketUpgradeRejection,
        },
    },
    http::StatusCode,
    response::Response,
};
use common::{CallId, http::ErrorBody};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde::Deserialize;
use tokio::{sync::broadcast::error::RecvError, time::timeout};

use crate::{
    AppState,
    hub::{Fanout, Filter, Start, Update},
};

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Subscribe { call_ids: Vec<String> },
    Unsubscribe { call_ids: Vec<String> },
}

/// `?call_id=a&call_id=b&since=N`, parsed by hand: axum's `Query` has no repeated keys.
#[derive(Debug, Default)]
struct Params {
    call_ids: Option<HashSet<CallId>>,
    since: Option<u64>,
    /// The `stream` of the snapshot `since` came from; another stream means a reset.
    stream: Option<String>,
}

fn parse_params(raw: &[(String, String)]) -> Result<Params, String> {
    let mut params = Params::default();
    for (key, value) in raw {
        match key.as_str() {
            "call_id" => {
                let id = CallId::parse(value.clone()).map_err(|e| format!("call_id: {e}"))?;
                params.call_ids.get_or_insert_with(HashSet::new).insert(id);
            }
            "since" => {
                params.since = Some(value.parse().map_err(|_| {
                    format!("since must be a stream sequence number, got {value:?}")
                })?);
            }
            other => {
                return Err(format!(
                    "unknown parameter `{other}`; expected call_id or since"
                ));
            }
        }
    }
    Ok(params)
}

pub async fn upgrade(
    State(app): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let params = query
        .map_err(|e| e.body_text())
        .and_then(|Query(raw)| parse_params(&raw));
    match (params, ws) {
        (Err(message), _) => {
            ErrorBody::new("invalid_parameter", message).into_response_with(StatusCode::BAD_REQUEST)
        }
        (Ok(_), Err(rejection)) => ErrorBody::new(
            "websocket_required",
            format!("/ws speaks WebSocket only: {}", rejection.body_text()),
        )
        .into_response_with(StatusCode::UPGRADE_REQUIRED),
        (Ok(params), Ok(ws)) => ws.on_upgrade(move |socket| {
            let tracker = app.sockets.clone();
            tracker.track_future(run(socket, app, params))
        }),
    }
}

struct Socket {
    sink: SplitSink<WebSocket, Message>,
    hub: Arc<crate::hub::Hub>,
    send_timeout: Duration,
    /// Told to clients in snapshots: how often to expect a heartbeat, how long calls stay.
    heartbeat_secs: u64,
    retention_secs: u64,
    /// The highest stream sequence this client has been given: nothing at or below it is
    /// sent again (after a resynchronisation the live queue may still hold such events).
    last_sent: u64,
}

#[derive(Debug)]
enum Gone {
    /// The client went away or broke the connection.
    Client,
    /// The client could not keep up.
    TooSlow,
}

impl Socket {
    async fn send(&mut self, text: String) -> Result<(), Gone> {
        match timeout(
            self.send_timeout,
            self.sink.send(Message::Text(Utf8Bytes::from(text))),
        )
        .await
        {
            Ok(Ok(())) => {
                metrics::counter!("switchboard_notifier_frames_sent_total").increment(1);
                Ok(())
            }
            Ok(Err(_)) => Err(Gone::Client),
            Err(_) => Err(Gone::TooSlow),
        }
    }

    async fn snapshot(&mut self, seq: u64, calls: &[Arc<Update>], reset: bool) -> Result<(), Gone> {
        let mut text = format!(
            "{{\"type\":\"snapshot\",\"seq\":{seq},\"reset\":{reset},\"stream\":\"{}\",\
             \"heartbeat_secs\":{},\"retention_secs\":{},\"calls\":[",
            self.hub.stream_id(),
            self.heartbeat_secs,
            self.retention_secs
        );
        for (i, call) in calls.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&call.json);
        }
        text.push_str("]}");
        metrics::counter!("switchboard_notifier_snapshots_total").increment(1);
        self.send(text).await?;
        self.last_sent = self.last_sent.max(seq);
        Ok(())
    }

    async fn update(&mut self, update: &Update) -> Result<(), Gone> {
        if update.seq <= self.last_sent {
            return Ok(());
        }
        self.send(update.frame.clone()).await?;
        self.last_sent = update.seq;
        Ok(())
    }

    async fn error(&mut self, message: &str) -> Result<(), Gone> {
        let text = serde_json::json!({"type": "error", "message": message}).to_string();
        self.send(text).await
    }

    /// Sends a close frame, without waiting long for a client that is not reading.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = timeout(Duration::from_secs(1), self.sink.send(frame)).await;
    }
}

async fn run(socket: WebSocket, app: AppState, params: Params) {
    let clients = metrics::gauge!("switchboard_notifier_clients");
    clients.increment(1.0);
    let (sink, mut stream) = socket.split();
    let mut socket = Socket {
        sink,
        hub: app.hub.clone(),
        send_timeout: app.send_timeout,
        heartbeat_secs: app.ping_interval.as_secs(),
        retention_secs: app.retention.as_secs(),
        last_sent: 0,
    };
    let shutdown = app.shutdown.clone();
    tokio::select! {
        _ = app.hub.wait_ready() => {}
        _ = shutdown.cancelled() => {
            socket.close(close_code::AWAY, "server shutting down").await;
            clients.decrement(1.0);
            return;
        }
    }
    let mut filter = params.call_ids.map_or(Filter::All, Filter::Only);
    let (start, mut rx) = app
        .hub
        .join(&filter, params.since, params.stream.as_deref());
    if params.since.is_some() {
        metrics::counter!("switchboard_notifier_resumes_total").increment(1);
    }
    let started = match &start {
        Start::Snapshot { seq, calls, reset } => socket.snapshot(*seq, calls, *reset).await,
        Start::Replay(updates) => {
            socket.last_sent = params.since.unwrap_or(0);
            let mut result = Ok(());
            for update in updates {
                result = socket.update(update).await;
                if result.is_err() {
                    break;
                }
            }
            result
        }
    };
    let mut ping = tokio::time::interval(app.ping_interval);
    ping.reset();
    let mut awaiting_pong = false;
    let outcome: Result<(), Gone> = match started {
        Err(gone) => Err(gone),
        Ok(()) => loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    socket.close(close_code::AWAY, "server shutting down").await;
                    break Ok(());
                }
                received = rx.recv() => match received {
                    Ok(Fanout::Status(update)) => {
                        if filter.matches(&update.call_id)
                            && let Err(gone) = socket.update(&update).await
                        {
                            break Err(gone);
                        }
                    }
                    Ok(Fanout::Progress(progress)) => {
                        if filter.matches(&progress.call_id)
                            && let Err(gone) = socket.send(progress.frame.clone()).await
                        {
                            break Err(gone);
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        metrics::counter!("switchboard_notifier_lagged_total").increment(1);
                        let lagged = serde_json::json!({"type": "lagged", "missed": missed}).to_string();
                        let (seq, calls) = app.hub.snapshot(&filter);
                        if let Err(gone) = socket.send(lagged).await {
                            break Err(gone);
                        }
                        if let Err(gone) = socket.snapshot(seq, &calls, true).await {
                            break Err(gone);
                        }
                    }
                    Err(RecvError::Closed) => break Ok(()),
                },
                incoming = stream.next() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Err(Gone::Client),
                    Some(Ok(Message::Pong(_))) => awaiting_pong = false,
                    Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
                    Some(Ok(Message::Binary(_))) => {
                        if let Err(gone) = socket.error("binary frames are not understood; send JSON text").await {
                            break Err(gone);
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        let reply = handle_client_message(&text, &mut filter);
                        let result = match reply {
                            Ok(()) => {
                                // The view changed: replace it with a fresh snapshot.
                                let (seq, calls) = app.hub.snapshot(&filter);
                                socket.snapshot(seq, &calls, true).await
                            }
                            Err(message) => socket.error(&message).await,
                        };
                        if let Err(gone) = result {
                            break Err(gone);
                        }
                    }
                },
                _ = ping.tick() => {
                    if awaiting_pong {
                        socket.close(close_code::POLICY, "no pong: connection presumed dead").await;
                        break Err(Gone::Client);
                    }
                    if timeout(app.send_timeout, socket.sink.send(Message::Ping(Default::default()))).await.is_err() {
                        break Err(Gone::TooSlow);
                    }
                    awaiting_pong = true;
                    // Pings are invisible to browser code: a heartbeat frame lets the
                    // dashboard notice a dead connection that never reported closing.
                    let heartbeat = format!("{{\"type\":\"heartbeat\",\"seq\":{}}}", socket.last_sent);
                    if let Err(gone) = socket.send(heartbeat).await {
                        break Err(gone);
                    }
                }
            }
        },
    };
    if let Err(Gone::TooSlow) = outcome {
        tracing::info!("closing a client that could not keep up");
        metrics::counter!("switchboard_notifier_slow_clients_closed_total").increment(1);
        socket
            .close(
                close_code::POLICY,
                "too slow: could not keep up with the event stream",
            )
            .await;
    }
    clients.decrement(1.0);
}

/// Applies a client's message to its filter, or says what is wrong with it.
fn handle_client_message(text: &str, filter: &mut Filter) -> Result<(), String> {
    let message: ClientMessage = serde_json::from_str(text).map_err(|e| {
        format!(
            "not understood ({e}); send {{\"type\": \"subscribe\" | \"unsubscribe\", \"call_ids\": [..]}}"
        )
    })?;
    let parse = |ids: Vec<String>| -> Result<Vec<CallId>, String> {
        ids.into_iter()
            .map(|id| CallId::parse(id).map_err(|e| format!("call_ids: {e}")))
            .collect()
    };
    match message {
        ClientMessage::Subscribe { call_ids } => {
            let ids = parse(call_ids)?;
            match filter {
                // Following everything already; subscribing narrows the view to these calls.
                Filter::All => *filter = Filter::Only(ids.into_iter().collect()),
                Filter::Only(set) => set.extend(ids),
            }
        }
        ClientMessage::Unsubscribe { call_ids } => {
            let ids = parse(call_ids)?;
            if let Filter::Only(set) = filter {
                for id in &ids {
                    set.remove(id);
                }
            } else {
                return Err(
                    "unsubscribe needs a subscription: this socket follows every call".into(),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_checked() {
        let p = parse_params(&[
            ("call_id".into(), "a".into()),
            ("call_id".into(), "b".into()),
            ("since".into(), "7".into()),
        ])
        .unwrap();
        assert_eq!(p.call_ids.unwrap().len(), 2);
        assert_eq!(p.since, Some(7));
        assert!(parse_params(&[("since".into(), "-1".into())]).is_err());
        assert!(parse_params(&[("call_id".into(), "a.b".into())]).is_err());
        assert!(parse_params(&[("foo".into(), "1".into())]).is_err());
    }

    #[test]
    fn subscriptions_narrow_and_widen_the_filter() {
        let mut filter = Filter::All;
        handle_client_message(r#"{"type":"subscribe","call_ids":["a"]}"#, &mut filter).unwrap();
        assert!(filter.matches(&CallId::parse("a").unwrap()));
        assert!(!filter.matches(&CallId::parse("b").unwrap()));
        handle_client_message(r#"{"type":"subscribe","call_ids":["b"]}"#, &mut filter).unwrap();
        assert!(filter.matches(&CallId::parse("b").unwrap()));
        handle_client_message(r#"{"type":"unsubscribe","call_ids":["a"]}"#, &mut filter).unwrap();
        assert!(!filter.matches(&CallId::parse("a").unwrap()));
        assert!(handle_client_message(r#"{"type":"dance"}"#, &mut filter).is_err());
        assert!(handle_client_message("not json", &mut filter).is_err());
    }
}
