//! The live view's connection contract: the WebSocket path and its query parameters, in one
//! place. The notifier parses with [`LiveQuery::parse`]; `pbx` builds its URLs with
//! [`LiveQuery::to_query`]; the dashboard's script builds the same parameters (and is tested in
//! a real browser against the real notifier). A client resumes after a reconnect with the
//! `seq` and `stream` of the last frames it saw: `?since=<seq>&stream=<stream>`.

use std::collections::BTreeSet;

use crate::CallId;

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

/// `?call_id=a&call_id=b&since=N&stream=S`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LiveQuery {
    /// The calls to follow; `None` follows every call.
    pub call_ids: Option<BTreeSet<CallId>>,
    /// Resume after this stream sequence (the `seq` of the last frame seen).
    pub since: Option<u64>,
    /// The `stream` of the snapshot `since` belongs to. Another stream (recreated, restored)
    /// means the sequences are not comparable: the client gets a snapshot marked `reset`.
    pub stream: Option<String>,
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
                other => {
                    return Err(format!(
                        "unknown parameter `{other}`; expected call_id, since or stream"
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
        parts.join("&")
    }
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

    #[test]
    fn the_subscribe_set_is_bounded() {
        let ids: Vec<String> = (0..=MAX_SUBSCRIBED_CALLS)
            .map(|i| format!("c{i}"))
            .collect();
        let pairs: Vec<(&str, &str)> = ids.iter().map(|id| ("call_id", id.as_str())).collect();
        assert!(LiveQuery::parse(pairs).unwrap_err().contains("at most"));
    }
}
