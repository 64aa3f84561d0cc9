//! The one error type of the ingest API. Each variant's doc says the status it becomes; the
//! body is always [`common::http::ErrorBody`]. Internal details never reach the client.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    CallId, CallState,
    call_id::InvalidCallId,
    http::{ErrorBody, ErrorResponse as _},
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// 415 `unsupported_media_type`.
    #[error("the request body must be JSON, sent with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// 413 `payload_too_large`.
    #[error("{message}")]
    PayloadTooLarge {
        field: Option<&'static str>,
        message: String,
    },
    /// 422 `missing_field`, `unknown_field` or `invalid_field`.
    #[error("{message}")]
    InvalidField {
        code: &'static str,
        field: String,
        message: String,
    },
    /// 400 `invalid_call_id`.
    #[error("invalid call_id: {0}")]
    InvalidCallId(#[from] InvalidCallId),
    /// 400 `invalid_parameter`.
    #[error("{message}")]
    InvalidParameter { field: String, message: String },
    /// 404 `call_not_found`.
    #[error("no call with id {0:?}")]
    CallNotFound(CallId),
    /// 404 `not_found`.
    #[error("no such route: {0}")]
    RouteNotFound(String),
    /// 409 `sequence_conflict`.
    #[error(
        "call {call_id} already has a packet with sequence {sequence} and different data; \
         a retry must resend the same data"
    )]
    SequenceConflict { call_id: CallId, sequence: i64 },
    /// 409 `call_not_in_progress`.
    #[error("call {call_id} is {state}, not IN_PROGRESS: it no longer takes packets")]
    CallNotInProgress { call_id: CallId, state: CallState },
    /// 409 `format_conflict`: the packet declares another audio format than its call's.
    #[error(
        "call {call_id} carries {format} audio (set by its first packet); this packet \
         declares {declared}"
    )]
    FormatConflict {
        call_id: CallId,
        format: common::AudioFormat,
        declared: common::AudioFormat,
    },
    /// 409 `not_audio`: the call's packets are free-form text (sent without `encoding`).
    #[error(
        "call {0} was streamed as text (its first packet declared no audio encoding), so it \
         has no audio to play"
    )]
    NotAudio(CallId),
    /// 410 `audio_expired`: the call's audio was deleted after `AUDIO_RETENTION_DAYS`.
    #[error(
        "the audio of call {0} has been deleted (AUDIO_RETENTION_DAYS); its transcript remains"
    )]
    AudioExpired(CallId),
    /// 409 `call_not_failed`: only a `FAILED` call can be retried.
    #[error("call {call_id} is {state}, not FAILED: only failed calls can be retried")]
    CallNotFailed { call_id: CallId, state: CallState },
    /// 429 `too_many_streaming_calls`, with `Retry-After`: the first packet of a new call
    /// while the tenant already streams `MAX_STREAMING_CALLS_PER_TENANT` calls.
    #[error(
        "this tenant already streams {cap} calls (MAX_STREAMING_CALLS_PER_TENANT); complete \
         some, or retry after Retry-After"
    )]
    TooManyStreamingCalls { cap: u32 },
    /// 503 `service_unavailable`, with `Retry-After`: a dependency is down; retrying is safe.
    #[error("{dependency} is unavailable; retry shortly (retries are safe)")]
    Unavailable {
        dependency: &'static str,
        detail: String,
    },
    /// 503 `overloaded`, with `Retry-After`: shed rather than queued without end (the
    /// deadline passed or the queue is full); retrying is safe.
    #[error("ingest is overloaded: {detail}; retry after Retry-After (retries are safe)")]
    Overloaded { detail: String },
    /// 500 `internal_error`: logged with its cause chain, never shown.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            code: "invalid_field",
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn database(e: sqlx::Error) -> Self {
        if is_database_unavailable(&e) {
            ApiError::Unavailable {
                dependency: "postgres",
                detail: e.to_string(),
            }
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("database query failed"))
        }
    }

    /// A failure to get a connection or start a transaction: whatever Postgres said, it is
    /// unavailable to us right now.
    pub fn database_connect(e: sqlx::Error) -> Self {
        ApiError::Unavailable {
            dependency: "postgres",
            detail: e.to_string(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::InvalidField { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiError::InvalidCallId(_) => (StatusCode::BAD_REQUEST, "invalid_call_id"),
            ApiError::InvalidParameter { .. } => (StatusCode::BAD_REQUEST, "invalid_parameter"),
            ApiError::CallNotFound(_) => (StatusCode::NOT_FOUND, "call_not_found"),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::SequenceConflict { .. } => (StatusCode::CONFLICT, "sequence_conflict"),
            ApiError::CallNotInProgress { .. } => (StatusCode::CONFLICT, "call_not_in_progress"),
            ApiError::CallNotFailed { .. } => (StatusCode::CONFLICT, "call_not_failed"),
            ApiError::FormatConflict { .. } => (StatusCode::CONFLICT, "format_conflict"),
            ApiError::NotAudio(_) => (StatusCode::CONFLICT, "not_audio"),
            ApiError::AudioExpired(_) => (StatusCode::GONE, "audio_expired"),
            ApiError::Unavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
            }
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::TooManyStreamingCalls { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_streaming_calls")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            ApiError::PayloadTooLarge { field, .. } => field.map(str::to_owned),
            ApiError::InvalidField { field, .. } | ApiError::InvalidParameter { field, .. } => {
                Some(field.clone())
            }
            ApiError::InvalidCallId(_) | ApiError::CallNotFound(_) => Some("call_id".into()),
            ApiError::SequenceConflict { .. } => Some("sequence".into()),
            ApiError::FormatConflict { .. } => Some("encoding".into()),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Internal(e) => {
                tracing::error!(error.message = %e, error.cause_chain = ?e, "request failed");
            }
            ApiError::Unavailable { dependency, detail } => {
                tracing::warn!(dependency, error.message = %detail, "dependency unavailable");
            }
            _ => {}
        }
        let mut body = ErrorBody::new(code, self.to_string());
        if let Some(field) = self.field() {
            body = body.with_field(field);
        }
        let mut response = body.into_response_with(status);
        if let ApiError::CallNotInProgress { state, .. } | ApiError::CallNotFailed { state, .. } =
            &self
        {
            // Name the state in a header too, for clients that only look at headers.
            if let Ok(v) = HeaderValue::from_str(state.as_str()) {
                response.headers_mut().insert("x-call-state", v);
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<common::calls::TransitionError> for ApiError {
    fn from(e: common::calls::TransitionError) -> Self {
        match e {
            common::calls::TransitionError::Database(e) => ApiError::database(e),
            // A move the state machine forbids is a bug here, never the client's mistake.
            common::calls::TransitionError::Illegal(e) => ApiError::Internal(e.into()),
        }
    }
}

/// The one place a lifecycle error becomes an HTTP answer.
impl From<crate::lifecycle::LifecycleError> for ApiError {
    fn from(e: crate::lifecycle::LifecycleError) -> Self {
        use crate::lifecycle::LifecycleError as E;
        match e {
            E::NotFound(key) => ApiError::CallNotFound(key.call_id().clone()),
            e @ E::TotalTooSmall { .. } => ApiError::invalid_field("total_packets", e.to_string()),
            E::NotFailed { call_id, state } => ApiError::CallNotFailed {
                call_id: call_id.call_id().clone(),
                state,
            },
            E::Connect(e) => ApiError::database_connect(e),
            E::Store(e) => e.into(),
        }
    }
}

/// A call whose time has no `packets` partition (the sweeper has not added it yet): a state
/// of the database that passes and the client cannot fix, so a 503, not a 500.
fn is_missing_partition(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of relation")
}

/// Whether a database error means "Postgres is not there or overloaded right now" (503, the
/// client retries) rather than a bug (500).
pub fn is_database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| {
                // 08: connection exception, 53: insufficient resources, 57: operator
                // intervention (shutdown), 40: serialization failure / deadlock.
                ["08", "53", "57", "40"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }) || is_missing_partition(db.as_ref())
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
