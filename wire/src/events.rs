//! The payloads Switchboard publishes, as JSON. Each type also says which `Nats-Msg-Id` it is
//! published with: JetStream drops a second publish of the same id inside the stream's
//! duplicate window, which is what makes every retry safe.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{CallId, CallKey, CallState, TenantId};

/// One accepted audio packet, on `<prefix>.packets.<tenant>.<call_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PacketEvent {
    /// The tenant the call belongs to (`default` in events from before tenants).
    #[serde(default)]
    pub tenant: TenantId,
    pub call_id: CallId,
    pub sequence: i64,
    pub data: String,
    /// The PBX's timestamp, as sent.
    pub timestamp: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

impl PacketEvent {
    /// `<tenant>.<call_id>:<sequence>`: a client retry of the same packet is stored and
    /// published once.
    pub fn msg_id(call: &CallKey, sequence: i64) -> String {
        format!("{call}:{sequence}")
    }

    pub fn key(&self) -> CallKey {
        CallKey::new(self.tenant.clone(), self.call_id.clone())
    }
}

/// A finished call waiting to be transcribed, on `<prefix>.calls.completed.<tenant>.<call_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The tenant the call belongs to (`default` in events from before tenants).
    #[serde(default)]
    pub tenant: TenantId,
    pub call_id: CallId,
    /// The call's version when it became `COMPLETED`; an operator retry completes it again at
    /// a higher version, which is a new work item.
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub completed_at: OffsetDateTime,
}

impl WorkItem {
    /// `<tenant>.<call_id>:<version>`.
    pub fn msg_id(&self) -> String {
        format!("{}.{}:{}", self.tenant, self.call_id, self.version)
    }

    pub fn key(&self) -> CallKey {
        CallKey::new(self.tenant.clone(), self.call_id.clone())
    }
}

/// Sentiment of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sentiment {
    /// `positive`, `neutral` or `negative`.
    pub label: String,
    /// From -1 (most negative) to 1 (most positive).
    pub score: f64,
}

/// A change of a call's state, on `<prefix>.calls.status.<tenant>.<call_id>`. Published at least once;
/// `version` grows by one with every transition, so a consumer drops an event whose version
/// it has already seen instead of moving a call backwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusEvent {
    /// The tenant the call belongs to (`default` in events from before tenants).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tenant: TenantId,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub call_id: CallId,
    pub state: CallState,
    /// `null` for the event that creates the call.
    pub previous_state: Option<CallState>,
    pub version: i64,
    /// When the transition was committed.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
    /// Why the call moved, e.g. `first_packet`, `completed_by_pbx`, `idle_timeout`.
    pub reason: String,
    pub packets_received: i64,
    /// How many sequence numbers are missing below the highest seen (or `total_packets`).
    pub missing_packets: i64,
    pub ai_attempts: i32,
    /// The last error, cut to [`ERROR_PREVIEW_CHARS`] characters (`GET /v1/call/{id}` has it
    /// whole).
    pub last_error: Option<String>,
    /// The start of the transcript: at most [`TRANSCRIPT_PREVIEW_CHARS`] characters, so that
    /// events and snapshots stay small however long calls are. The whole transcript is on
    /// `GET /v1/call/{call_id}`.
    pub transcript: Option<String>,
    /// The whole transcript's length in characters (`null` when there is none yet).
    #[serde(default)]
    pub transcript_chars: Option<i64>,
    /// Whether `transcript` is only the start of it.
    #[serde(default)]
    pub transcript_truncated: bool,
    pub sentiment: Option<Sentiment>,
    /// While `PROCESSING_AI` after a retryable AI failure: when the next attempt is due.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// Characters of a transcript a status event carries. Ten thousand calls in a snapshot stay
/// within a few megabytes, and every event stays far below NATS's payload limit.
pub const TRANSCRIPT_PREVIEW_CHARS: usize = 200;

/// Characters of an error message a status event carries.
pub const ERROR_PREVIEW_CHARS: usize = 300;

impl StatusEvent {
    /// `<tenant>.<call_id>:<version>`.
    pub fn msg_id(&self) -> String {
        format!("{}.{}:{}", self.tenant, self.call_id, self.version)
    }

    pub fn key(&self) -> CallKey {
        CallKey::new(self.tenant.clone(), self.call_id.clone())
    }
}

/// The first `max` characters of `text`, and whether anything was cut.
pub fn preview(text: &str, max: usize) -> (String, bool) {
    match text.char_indices().nth(max) {
        Some((cut, _)) => (text[..cut].to_owned(), true),
        None => (text.to_owned(), false),
    }
}

/// A call the AI pipeline gave up on, on `<prefix>.dlq.transcribe.<tenant>.<call_id>`, kept in its own
/// stream for operators (re-drive with `POST /v1/call/{call_id}/retry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The tenant the call belongs to (`default` in events from before tenants).
    #[serde(default)]
    pub tenant: TenantId,
    pub call_id: CallId,
    /// The work item's version (the call's version when it became `COMPLETED`).
    pub work_version: i64,
    pub attempts: i32,
    pub last_error: String,
    /// `true` when the provider refused the call for good; `false` when attempts ran out.
    pub permanent: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
}

impl DeadLetter {
    /// `<tenant>.<call_id>:<work_version>`.
    pub fn msg_id(&self) -> String {
        format!("{}.{}:{}", self.tenant, self.call_id, self.work_version)
    }

    pub fn key(&self) -> CallKey {
        CallKey::new(self.tenant.clone(), self.call_id.clone())
    }
}

/// How far a streaming call has got, on `<prefix>.calls.progress.<tenant>.<call_id>` (core NATS, at
/// most about once a second per call). Not an event of the call's history: no version, not
/// kept; the dashboard uses it to show packet counts live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// The tenant the call belongs to (`default` in events from before tenants).
    #[serde(default)]
    pub tenant: TenantId,
    pub call_id: CallId,
    pub packets_received: i64,
    pub missing_packets: i64,
    pub last_sequence: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl ProgressEvent {
    pub fn key(&self) -> CallKey {
        CallKey::new(self.tenant.clone(), self.call_id.clone())
    }
}
