//! The live view's contract: the WebSocket path and its query parameters, and the frames the
//! notifier sends ([`LiveFrame`]), in one place. The notifier parses with [`LiveQuery::parse`];
//! `pbx` builds its URLs with [`LiveQuery::to_query`] and reads [`LiveFrame`]s; the dashboard's
//! script builds the same parameters (and is tested in a real browser against the real
//! notifier). A client resumes after a reconnect with the `seq` and `stream` of the last frames
//! it saw: `?since=<seq>&stream=<stream>`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    CallId,
    events::{ProgressEvent, StatusEvent},
};

/// Where the notifier serves the live view.
pub const WS_PATH: &str = "/ws";

/// Most calls one socket may follow by id (in the URL and by `subscribe` messages together).
pub const MAX_SUBSCRIBED_CALLS: usize = 10_000;

/// Largest message a client may send, in bytes (a `subscribe` of
/// [`MAX_SUBSCRIBED_CALLS`] ids of 40 characters fits).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 512 * 1024;

/// Calls per snapshot frame. A snapshot of more calls comes in pages, newest first: a
/// `snapshot` frame (with `total` and `more: true`) then `snapshot_page` frames (same `seq`,
/// `more: false` on the last), so no frame grows with the number of calls and a page can
/// show the newest calls before the rest have arrived.
pub const SNAPSHOT_PAGE_CALLS: usize = 1000;

/// `?call_id=a&call_id=b&since=N&stream=S&token=T`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LiveQuery {
    /// The calls to follow; `None` follows every call.
    pub call_ids: Option<BTreeSet<CallId>>,
    /// Resume after this stream sequence (the `seq` of the last frame seen).
    pub since: Option<u64>,
    /// The `stream` of the snapshot `since` belongs to. Another stream (recreated, restored)
    /// means the sequences are not comparable: the client gets a snapshot marked `reset`.
    pub stream: Option<String>,
    /// A credential for clients that cannot send an `Authorization` header (a browser's
    /// WebSocket): a short-lived token from `POST /v1/auth/token`. Others send
    /// `Authorization: Bearer <key>` and leave this out.
    pub token: Option<String>,
}

impl LiveQuery {
    /// Parses query pairs; the error names the parameter and the problem.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<LiveQuery, String> {
        let mut query = LiveQuery::default();
        for (key, value) in pairs {
            match key {
                "call_id" => {
                    let id = CallId::parse(value).map_err(|e| format!("call_id: {e}"))?;
                    let ids = query.call_ids.get_or_insert_with(BTreeSet::new);
                    ids.insert(id);
                    if ids.len() > MAX_SUBSCRIBED_CALLS {
                        return Err(format!(
                            "call_id: at most {MAX_SUBSCRIBED_CALLS} calls per connection"
                        ));
                    }
                }
                "since" => {
                    query.since = Some(value.parse().map_err(|_| {
                        format!("since must be a stream sequence number, got {value:?}")
                    })?);
                }
                "stream" => {
                    if value.is_empty() || value.len() > 64 {
                        return Err(format!(
                            "stream must be the `stream` of a snapshot (1 to 64 characters), got {value:?}"
                        ));
                    }
                    query.stream = Some(value.to_owned());
                }
                "token" => {
                    let url_safe = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                    if value.is_empty() || value.len() > 128 || !value.chars().all(url_safe) {
                        return Err("token must be a token from POST /v1/auth/token".into());
                    }
                    query.token = Some(value.to_owned());
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}`; expected call_id, since, stream or token"
                    ));
                }
            }
        }
        if query.stream.is_some() && query.since.is_none() {
            return Err("stream goes with since: it names the stream `since` belongs to".into());
        }
        Ok(query)
    }

    /// The query string (without `?`; empty when there is nothing to say). Call ids and
    /// stream identities are URL-safe by construction (letters, digits, `_`, `-`).
    pub fn to_query(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for id in self.call_ids.iter().flatten() {
            parts.push(format!("call_id={id}"));
        }
        if let Some(since) = self.since {
            parts.push(format!("since={since}"));
            if let Some(stream) = &self.stream {
                parts.push(format!("stream={}", encode(stream)));
            }
        }
        if let Some(token) = &self.token {
            parts.push(format!("token={}", encode(token)));
        }
        parts.join("&")
    }
}

/// What a client may send on the live socket: `{"type":"subscribe","call_ids":[..]}`. The
/// answer to either is a snapshot (marked `reset`) of the calls now followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Follow these calls too (a socket that followed every call follows only these).
    Subscribe { call_ids: Vec<String> },
    /// Stop following these calls.
    Unsubscribe { call_ids: Vec<String> },
}

/// One frame from the notifier, tagged by `type`.
///
/// The notifier writes these itself, serialising each event once for every socket (see its
/// `hub` and `ws` modules); this type is what they mean, and a test here parses frames exactly
/// as the notifier builds them. A `seq` is a sequence of the status stream named by the last
/// snapshot's `stream`: what a client resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveFrame {
    /// The state of every followed call, newest first; the first page when `more`.
    Snapshot(Snapshot),
    /// A further page of the snapshot with the same `seq`; the last one has `more: false`.
    SnapshotPage(SnapshotPage),
    /// A call changed state (or noted a change, e.g. a retry scheduled).
    Status(SequencedStatus),
    /// Packet counts of a streaming call; not part of its history (no `seq`).
    Progress(ProgressEvent),
    /// Sent every `heartbeat_secs`, so that a client notices a dead connection.
    Heartbeat {
        /// The highest sequence this client has been sent.
        seq: u64,
    },
    /// The client fell behind by `missed` events; a snapshot marked `reset` follows.
    Lagged { missed: u64 },
    /// The notifier did not understand a client message (the connection stays open).
    Error { message: String },
    /// A frame of a type this build does not know (from a newer notifier): skip it.
    #[serde(other)]
    Unknown,
}

/// `{"type":"snapshot", ...}`: the first (often only) page of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream sequence the snapshot is current at.
    pub seq: u64,
    /// `true` when the client asked to resume (`since`) and could not: start the view over.
    pub reset: bool,
    /// The identity of the status stream `seq` belongs to (pass back as `stream`).
    pub stream: String,
    /// How often a heartbeat comes, in seconds.
    pub heartbeat_secs: u64,
    /// How long a call stays in the live view after its last change, in seconds.
    pub retention_secs: u64,
    /// Calls in the whole snapshot, over all its pages.
    pub total: u64,
    /// This page's calls, newest first (at most [`SNAPSHOT_PAGE_CALLS`]).
    pub calls: Vec<SequencedStatus>,
    /// Whether `snapshot_page` frames follow.
    pub more: bool,
}

/// `{"type":"snapshot_page", ...}`: the next calls of the snapshot with this `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub seq: u64,
    pub calls: Vec<SequencedStatus>,
    pub more: bool,
}

/// A status event with its sequence in the status stream: a `status` frame, or an entry of a
/// snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequencedStatus {
    #[serde(flatten)]
    pub event: StatusEvent,
    pub seq: u64,
}

/// Percent-encodes anything but unreserved characters (a stream id is digits today).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<LiveQuery, String> {
        LiveQuery::parse(pairs.iter().copied())
    }

    #[test]
    fn what_a_client_builds_the_server_parses() {
        let query = LiveQuery {
            call_ids: Some(["a", "b"].map(|id| CallId::parse(id).unwrap()).into()),
            since: Some(42),
            stream: Some("1764086400123456789".into()),
            token: None,
        };
        let text = query.to_query();
        assert_eq!(
            text,
            "call_id=a&call_id=b&since=42&stream=1764086400123456789"
        );
        let pairs: Vec<(&str, &str)> = text
            .split('&')
            .map(|p| p.split_once('=').unwrap())
            .collect();
        assert_eq!(LiveQuery::parse(pairs).unwrap(), query);
        assert_eq!(LiveQuery::default().to_query(), "");
    }

    #[test]
    fn bad_parameters_are_named() {
        assert!(parse(&[("since", "-1")]).unwrap_err().contains("since"));
        assert!(
            parse(&[("call_id", "a.b")])
                .unwrap_err()
                .contains("call_id")
        );
        assert!(parse(&[("foo", "1")]).unwrap_err().contains("foo"));
        assert!(parse(&[("stream", "1")]).unwrap_err().contains("since"));
        assert!(parse(&[("since", "1"), ("stream", "")]).is_err());
    }

    /// Frames written exactly as the notifier's builders write them (`hub::Update::new`,
    /// `Hub::progress`, `ws::Socket::{snapshot, ping, error}` and the lagged notice).
    const STATUS: &str = r#"{"type":"status","ai_attempts":0,"at":"2025-11-25T16:00:00.123456Z","call_id":"c1","last_error":null,"missing_packets":2,"next_attempt_at":null,"packets_received":8,"previous_state":null,"reason":"first_packet","sentiment":null,"seq":7,"state":"IN_PROGRESS","tenant":"acme","transcript":null,"transcript_chars":null,"transcript_truncated":false,"version":1}"#;
    const ENTRY: &str = r#"{"ai_attempts":1,"at":"2025-11-25T16:00:03Z","call_id":"c2","last_error":null,"missing_packets":0,"next_attempt_at":null,"packets_received":250,"previous_state":"PROCESSING_AI","reason":"ai_succeeded","sentiment":{"label":"positive","score":0.61},"seq":9,"state":"ARCHIVED","tenant":"acme","transcript":"thank you for calling","transcript_chars":21,"transcript_truncated":false,"version":4}"#;
    const PROGRESS: &str = r#"{"at":"2025-11-25T16:00:02.5Z","call_id":"c1","last_sequence":9,"missing_packets":2,"packets_received":8,"tenant":"acme","type":"progress"}"#;

    fn snapshot(more: bool) -> String {
        format!(
            "{{\"type\":\"snapshot\",\"seq\":9,\"reset\":false,\"stream\":\"1764086400123456789\",\
             \"heartbeat_secs\":30,\"retention_secs\":86400,\"total\":2,\"calls\":[{ENTRY},{}],\"more\":{more}}}",
            &STATUS.replacen("\"type\":\"status\",", "", 1)
        )
    }

    #[test]
    fn every_frame_the_notifier_builds_is_understood() {
        let LiveFrame::Status(status) = serde_json::from_str(STATUS).unwrap() else {
            panic!("a status frame");
        };
        assert_eq!((status.seq, status.event.version), (7, 1));
        assert_eq!(status.event.call_id.as_str(), "c1");

        let LiveFrame::Snapshot(snap) = serde_json::from_str(&snapshot(true)).unwrap() else {
            panic!("a snapshot frame");
        };
        assert_eq!(
            (snap.seq, snap.total, snap.more, snap.reset),
            (9, 2, true, false)
        );
        assert_eq!(snap.stream, "1764086400123456789");
        assert_eq!((snap.heartbeat_secs, snap.retention_secs), (30, 86400));
        assert_eq!(snap.calls.iter().map(|c| c.seq).collect::<Vec<_>>(), [9, 7]);
        assert_eq!(
            snap.calls[0].event.sentiment.as_ref().unwrap().label,
            "positive"
        );

        let page =
            format!("{{\"type\":\"snapshot_page\",\"seq\":9,\"calls\":[{ENTRY}],\"more\":false}}");
        let LiveFrame::SnapshotPage(page) = serde_json::from_str(&page).unwrap() else {
            panic!("a snapshot page");
        };
        assert_eq!((page.seq, page.calls.len(), page.more), (9, 1, false));

        let LiveFrame::Progress(progress) = serde_json::from_str(PROGRESS).unwrap() else {
            panic!("a progress frame");
        };
        assert_eq!(progress.last_sequence, Some(9));

        let simple = [
            (
                r#"{"type":"heartbeat","seq":9}"#,
                LiveFrame::Heartbeat { seq: 9 },
            ),
            (
                r#"{"type":"lagged","missed":12}"#,
                LiveFrame::Lagged { missed: 12 },
            ),
            (
                r#"{"type":"error","message":"not understood"}"#,
                LiveFrame::Error {
                    message: "not understood".into(),
                },
            ),
            (r#"{"type":"from_the_future","x":1}"#, LiveFrame::Unknown),
        ];
        for (text, frame) in simple {
            assert_eq!(
                serde_json::from_str::<LiveFrame>(text).unwrap(),
                frame,
                "{text}"
            );
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            STATUS.to_owned(),
            snapshot(false),
            PROGRESS.to_owned(),
            r#"{"type":"heartbeat","seq":9}"#.to_owned(),
            r#"{"type":"lagged","missed":12}"#.to_owned(),
            r#"{"type":"error","message":"no"}"#.to_owned(),
        ];
        for text in frames {
            let frame: LiveFrame = serde_json::from_str(&text).unwrap();
            let again = serde_json::to_string(&frame).unwrap();
            assert_eq!(serde_json::from_str::<LiveFrame>(&again).unwrap(), frame);
            // The same JSON, whatever the order of its keys.
            let as_value = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
            assert_eq!(as_value(&again), as_value(&text), "{text}");
        }
    }

    #[test]
    fn the_subscribe_set_is_bounded() {
        let ids: Vec<String> = (0..=MAX_SUBSCRIBED_CALLS)
            .map(|i| format!("c{i}"))
            .collect();
        let pairs: Vec<(&str, &str)> = ids.iter().map(|id| ("call_id", id.as_str())).collect();
        assert!(LiveQuery::parse(pairs).unwrap_err().contains("at most"));
    }
}
