//! `GET /ws`: one task per socket. It starts with a snapshot (or, with `?since=N`, exactly the
//! events after N), then forwards the hub's events that match its filter, in stream order.
//!
//! Protection: each socket can fall at most `NOTIFIER_CLIENT_QUEUE` events behind (the
//! broadcast ring is its bounded queue, shared memory, never growing); past that it is told
//! `{"type":"lagged"}` and resynchronised with a fresh snapshot. A client that does not take a
//! frame within `NOTIFIER_SEND_TIMEOUT_SECS` is closed (1008). A ping goes out every
//! `NOTIFIER_PING_INTERVAL_SECS`; a peer that has not answered the previous one is closed.
//! On shutdown every socket gets a close frame 1001 (going away).

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{
        Query, State, WebSocketUpgrade,
        rejection::QueryRejection,
        ws::{
            CloseFrame, Message, Utf8Bytes, WebSocket, close_code,
            rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use common::{
    CallId, Permission,
    auth::{
        self, AuthError, Principal,
        http::{self as auth_http, RateClass},
        settings::AuthMode,
    },
    http::{ErrorBody, ErrorResponse as _},
    live::{
        ClientMessage, LiveQuery, MAX_CLIENT_MESSAGE_BYTES, MAX_SUBSCRIBED_CALLS,
        SNAPSHOT_PAGE_CALLS,
    },
};
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::{
    sync::{broadcast::error::RecvError, watch},
    time::timeout,
};

use crate::{
    AppState,
    hub::{Calls, Filter, Snapshot, Start, Subscription, Update},
};

/// `?call_id=a&call_id=b&since=N&stream=S`: the contract lives in `wire::live`. Parsed from
/// pairs: axum's `Query` has no repeated keys.
fn parse_params(raw: &[(String, String)]) -> Result<LiveQuery, String> {
    LiveQuery::parse(raw.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

pub async fn upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The Origin first: a page of another site learns nothing, not even whether a token works.
    if let Err(refused) = app.origins.check(&headers) {
        return refused;
    }
    let params = match query
        .map_err(|e| e.body_text())
        .and_then(|Query(raw)| parse_params(&raw))
    {
        Ok(params) => params,
        Err(message) => {
            return ErrorBody::new("invalid_parameter", message)
                .into_response_with(StatusCode::BAD_REQUEST);
        }
    };
    // A key in the header (pbx, scripts) or a token in the URL (browsers cannot set headers
    // on a WebSocket).
    let credential = match auth_http::bearer(&headers) {
        Ok(header) => header.map(str::to_owned).or_else(|| params.token.clone()),
        Err(refused) => return refused.into_response(),
    };
    let principal = match app
        .auth
        .authorize(credential.as_deref(), Permission::Read, RateClass::Requests)
        .await
    {
        Ok(principal) => principal,
        Err(refused) => return refused.into_response(),
    };
    match ws {
        Err(rejection) => common::http::websocket_required(common::live::WS_PATH, &rejection),
        Ok(ws) => {
            ws.max_message_size(MAX_CLIENT_MESSAGE_BYTES)
                // tungstenite's defaults (128 KiB each way per socket) held 1.4 GB at 10,000
                // sockets, and faulting them in on the first event took 1.3 s. Frames are
                // written as they come anyway (each is flushed), and client messages are small.
                .read_buffer_size(SOCKET_READ_BUFFER)
                .write_buffer_size(0)
                .on_upgrade(move |socket| {
                    let tracker = app.sockets.clone();
                    let caller = SocketCaller {
                        principal,
                        credential,
                    };
                    tracker.track_future(run(socket, app, params, caller))
                })
        }
    }
}

/// Who a socket serves, and the credential it came with: checked again every
/// [`auth::RECHECK_AFTER`], so a revoked key (or an expired token) ends its sockets too.
struct SocketCaller {
    principal: std::sync::Arc<Principal>,
    credential: Option<String>,
}

/// The close code of a socket whose credential stopped being valid (4000-4999 is for
/// applications): the dashboard asks for a fresh token, or for the key again.
const CLOSE_CREDENTIAL_REVOKED: u16 = 4401;

/// Bytes read from a socket at a time (its messages may still be up to
/// `MAX_CLIENT_MESSAGE_BYTES`: the buffer grows for one that needs it).
const SOCKET_READ_BUFFER: usize = 4 * 1024;

struct Socket {
    sink: SplitSink<WebSocket, Message>,
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
    /// We end the connection with this close code and reason.
    Closing(u16, &'static str),
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

    /// Sends the state of every (followed) call at `seq`: newest first, in pages of
    /// [`SNAPSHOT_PAGE_CALLS`] (see `wire::live`).
    async fn snapshot(&mut self, snapshot: &Snapshot, reset: bool) -> Result<(), Gone> {
        let Snapshot { seq, stream, calls } = snapshot;
        let seq = *seq;
        let total = calls.len();
        let mut pages = calls.rchunks(SNAPSHOT_PAGE_CALLS).peekable();
        let mut text = format!(
            "{{\"type\":\"snapshot\",\"seq\":{seq},\"reset\":{reset},\"stream\":\"{}\",\
             \"heartbeat_secs\":{},\"retention_secs\":{},\"total\":{total},",
            stream, self.heartbeat_secs, self.retention_secs
        );
        loop {
            let page = pages.next().unwrap_or_default();
            let more = pages.peek().is_some();
            text.push_str("\"calls\":[");
            text.reserve(page.iter().map(|c| c.frame.len()).sum());
            for (i, call) in page.iter().rev().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                call.push_entry(&mut text);
            }
            text.push_str(&format!("],\"more\":{more}}}"));
            metrics::histogram!("switchboard_notifier_snapshot_frame_bytes")
                .record(text.len() as f64);
            self.send(std::mem::take(&mut text)).await?;
            if !more {
                break;
            }
            text = format!("{{\"type\":\"snapshot_page\",\"seq\":{seq},");
        }
        metrics::counter!("switchboard_notifier_snapshots_total").increment(1);
        // The snapshot's sequence is the hub's latest: nothing at or below it is sent again.
        self.last_sent = seq;
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

    /// Replays the events after `since` (the client's resume point), in order.
    async fn replay(&mut self, since: u64, updates: &[Arc<Update>]) -> Result<(), Gone> {
        self.last_sent = since;
        for update in updates {
            self.update(update).await?;
        }
        Ok(())
    }

    /// A ping, and a heartbeat frame: pings are invisible to browser code, so the heartbeat
    /// lets the dashboard notice a dead connection that never reported closing.
    async fn ping(&mut self) -> Result<(), Gone> {
        if timeout(
            self.send_timeout,
            self.sink.send(Message::Ping(Default::default())),
        )
        .await
        .is_err()
        {
            return Err(Gone::TooSlow);
        }
        let heartbeat = format!("{{\"type\":\"heartbeat\",\"seq\":{}}}", self.last_sent);
        self.send(heartbeat).await
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

async fn run(socket: WebSocket, app: AppState, params: LiveQuery, caller: SocketCaller) {
    let clients = metrics::gauge!("switchboard_notifier_clients");
    clients.increment(1.0);
    let (sink, stream) = socket.split();
    let mut socket = Socket {
        sink,
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
    let mut filter = Filter {
        tenant: (app.auth.mode() == AuthMode::Required).then(|| caller.principal.tenant.clone()),
        calls: params
            .call_ids
            .map_or(Calls::All, |ids| Calls::Only(ids.into_iter().collect())),
    };
    // Watched from before the join, so a recreation right after it is not missed.
    let generation = app.hub.watch_generation();
    let joined_generation = *generation.borrow();
    let (start, subscription) = app
        .hub
        .join(&filter, params.since, params.stream.as_deref());
    if params.since.is_some() {
        metrics::counter!("switchboard_notifier_resumes_total").increment(1);
    }
    let started = match start {
        Start::Snapshot { snapshot, reset } => socket.snapshot(&snapshot, reset).await,
        Start::Replay(updates) => socket.replay(params.since.unwrap_or(0), &updates).await,
    };
    let outcome = match started {
        Err(gone) => Err(gone),
        Ok(()) => {
            let live = Live {
                app: &app,
                stream,
                subscription,
                generation,
                joined_generation,
                credential: caller.credential,
            };
            live.run(&mut socket, &mut filter).await
        }
    };
    match outcome {
        Err(Gone::TooSlow) => {
            tracing::info!("closing a client that could not keep up");
            metrics::counter!("switchboard_notifier_slow_clients_closed_total").increment(1);
            socket
                .close(
                    close_code::POLICY,
                    "too slow: could not keep up with the event stream",
                )
                .await;
        }
        Err(Gone::Closing(code, reason)) => socket.close(code, reason).await,
        Err(Gone::Client) | Ok(()) => {}
    }
    clients.decrement(1.0);
}

/// A joined socket's live phase: what it waits for, and what it does with each.
struct Live<'a> {
    app: &'a AppState,
    stream: SplitStream<WebSocket>,
    subscription: Subscription,
    /// The hub's stream generation, and its value when this socket joined; a change means
    /// the status stream was recreated and our sequences mean nothing any more.
    generation: watch::Receiver<u64>,
    joined_generation: u64,
    /// Checked again every [`auth::RECHECK_AFTER`] (`None` with authentication off).
    credential: Option<String>,
}

impl Live<'_> {
    async fn run(mut self, socket: &mut Socket, filter: &mut Filter) -> Result<(), Gone> {
        let mut ping = tokio::time::interval(self.app.ping_interval);
        ping.reset();
        let mut awaiting_pong = false;
        let mut recheck = tokio::time::interval(auth::RECHECK_AFTER);
        recheck.reset();
        loop {
            tokio::select! {
                _ = recheck.tick(), if self.credential.is_some() => {
                    let secret = self.credential.as_deref().unwrap_or_default();
                    if let Err(AuthError::Invalid) = self.app.auth.keys().authenticate(secret).await {
                        return Err(Gone::Closing(CLOSE_CREDENTIAL_REVOKED, "credential revoked or expired"));
                    }
                }
                _ = self.app.shutdown.cancelled() => {
                    return Err(Gone::Closing(close_code::AWAY, "server shutting down"));
                }
                Ok(()) = self.generation.changed() => {
                    if *self.generation.borrow_and_update() != self.joined_generation {
                        // Sequences restarted: the client must resume, and will get a
                        // snapshot marked `reset` for the stream it knew.
                        return Err(Gone::Closing(close_code::RESTART, "status stream recreated: reconnect with since and stream"));
                    }
                }
                received = self.subscription.status.recv() => match received {
                    Ok(update) => {
                        if filter.matches(&update.call) {
                            socket.update(&update).await?;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        metrics::counter!("switchboard_notifier_lagged_total").increment(1);
                        let lagged = serde_json::json!({"type": "lagged", "missed": missed}).to_string();
                        socket.send(lagged).await?;
                        let snapshot = self.app.hub.snapshot(filter);
                        socket.snapshot(&snapshot, true).await?;
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                received = self.subscription.progress.recv() => match received {
                    Ok(progress) => {
                        if filter.matches(&progress.call) {
                            socket.send(progress.frame.clone()).await?;
                        }
                    }
                    // Progress reports supersede each other: skipping some loses nothing.
                    Err(RecvError::Lagged(skipped)) => {
                        metrics::counter!("switchboard_notifier_progress_skipped_total").increment(skipped);
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                incoming = self.stream.next() => self.incoming(socket, filter, incoming, &mut awaiting_pong).await?,
                _ = ping.tick() => {
                    if awaiting_pong {
                        return Err(Gone::Closing(close_code::POLICY, "no pong: connection presumed dead"));
                    }
                    socket.ping().await?;
                    awaiting_pong = true;
                }
            }
        }
    }

    /// A frame from the client.
    async fn incoming(
        &self,
        socket: &mut Socket,
        filter: &mut Filter,
        incoming: Option<Result<Message, axum::Error>>,
        awaiting_pong: &mut bool,
    ) -> Result<(), Gone> {
        match incoming {
            None | Some(Ok(Message::Close(_))) => Err(Gone::Client),
            Some(Err(e)) => {
                // Most often a message over the size limit: say so before closing, since a
                // close reason is easy to miss.
                let message = format!(
                    "connection error: {e} (messages are limited to {MAX_CLIENT_MESSAGE_BYTES} bytes)"
                );
                socket.error(&message).await.ok();
                Err(Gone::Closing(
                    close_code::SIZE,
                    "message too large or malformed",
                ))
            }
            Some(Ok(Message::Pong(_))) => {
                *awaiting_pong = false;
                Ok(())
            }
            Some(Ok(Message::Ping(_))) => Ok(()), // answered by the WebSocket layer
            Some(Ok(Message::Binary(_))) => {
                socket
                    .error("binary frames are not understood; send JSON text")
                    .await
            }
            Some(Ok(Message::Text(text))) => match handle_client_message(&text, filter) {
                Ok(()) => {
                    // The view changed: replace it with a fresh snapshot.
                    let snapshot = self.app.hub.snapshot(filter);
                    socket.snapshot(&snapshot, true).await
                }
                Err(message) => socket.error(&message).await,
            },
        }
    }
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
            let following = match &filter.calls {
                Calls::All => 0,
                Calls::Only(set) => set.len(),
            };
            if following + ids.len() > MAX_SUBSCRIBED_CALLS {
                return Err(format!(
                    "call_ids: a connection follows at most {MAX_SUBSCRIBED_CALLS} calls \
                     ({following} already, {} asked); nothing changed",
                    ids.len()
                ));
            }
            match &mut filter.calls {
                // Following everything already; subscribing narrows the view to these calls.
                Calls::All => filter.calls = Calls::Only(ids.into_iter().collect()),
                Calls::Only(set) => set.extend(ids),
            }
        }
        ClientMessage::Unsubscribe { call_ids } => {
            let ids = parse(call_ids)?;
            if let Calls::Only(set) = &mut filter.calls {
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
            ("stream".into(), "1764086400123456789".into()),
        ])
        .unwrap();
        assert_eq!(p.call_ids.unwrap().len(), 2);
        assert_eq!(p.since, Some(7));
        assert_eq!(p.stream.as_deref(), Some("1764086400123456789"));
        assert!(parse_params(&[("since".into(), "-1".into())]).is_err());
        assert!(parse_params(&[("call_id".into(), "a.b".into())]).is_err());
        assert!(parse_params(&[("foo".into(), "1".into())]).is_err());
    }

    #[test]
    fn subscriptions_narrow_and_widen_the_filter() {
        let mut filter = Filter::default();
        let key = |id: &str| common::CallKey::try_from(format!("acme.{id}")).unwrap();
        handle_client_message(r#"{"type":"subscribe","call_ids":["a"]}"#, &mut filter).unwrap();
        assert!(filter.matches(&key("a")));
        assert!(!filter.matches(&key("b")));
        handle_client_message(r#"{"type":"subscribe","call_ids":["b"]}"#, &mut filter).unwrap();
        assert!(filter.matches(&key("b")));
        handle_client_message(r#"{"type":"unsubscribe","call_ids":["a"]}"#, &mut filter).unwrap();
        assert!(!filter.matches(&key("a")));
        assert!(handle_client_message(r#"{"type":"dance"}"#, &mut filter).is_err());
        assert!(handle_client_message("not json", &mut filter).is_err());
    }
}
