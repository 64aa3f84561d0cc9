//! Calls: read one, list them, complete one.

use axum::{Json, extract::State, http::HeaderMap};
use common::http::request_id;
use common::{
    CallState,
    auth::http::{Caller, need},
    store::{self, CallRow, ListCursor},
};
use time::OffsetDateTime;
use wire::api::{CallDetail, CallPage, CallSummary, CompleteBody, CompleteResponse};

use super::AppState;
use crate::{
    error::ApiError,
    extract::{CallIdPath, OptionalJson, QueryParams},
    lifecycle::{self, Completion},
};

/// Most missing ranges listed by `GET /v1/call/{call_id}`.
const MAX_MISSING_RANGES: i64 = 100_000;
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

/// A stored call as the API shows it.
fn summary(row: CallRow) -> CallSummary {
    let format = row.format();
    CallSummary {
        encoding: format.encoding(),
        sample_rate: format.sample_rate(),
        sentiment: row.sentiment(),
        call_id: row.key.call_id().to_string(),
        state: row.state,
        version: row.version,
        packets_received: row.packets_received,
        first_sequence: row.first_sequence,
        last_sequence: row.last_sequence,
        total_packets: row.total_packets,
        missing_packets: row.missing_packets,
        ai_attempts: row.ai_attempts,
        transcript: row.transcript,
        last_error: row.last_error,
        created_at: row.created_at,
        updated_at: row.updated_at,
        last_packet_at: row.last_packet_at,
        completed_at: row.completed_at,
        next_attempt_at: row.next_attempt_at,
    }
}

/// One call's state, counts, missing ranges, AI results and history.
#[utoipa::path(get, path = "/v1/call/{call_id}", tag = "calls",
    params(("call_id" = String, Path, description = "1-128 characters of [A-Za-z0-9_-]", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$")),
    responses(
        (status = 200, body = CallDetail),
        (status = 400, body = common::http::ErrorBody),
        (status = 404, description = "`call_not_found`", body = common::http::ErrorBody),
    ))]
pub async fn get_call(
    caller: Caller<need::Read>,
    State(app): State<AppState>,
    CallIdPath(call_id): CallIdPath,
) -> Result<Json<CallDetail>, ApiError> {
    let key = caller.principal().call(call_id.clone());
    let row = store::get_call(&app.pool, &key)
        .await
        .map_err(ApiError::database)?
        .ok_or_else(|| ApiError::CallNotFound(call_id.clone()))?;
    let (missing, history) = tokio::try_join!(
        store::missing_ranges(&app.pool, &key, MAX_MISSING_RANGES),
        store::history(&app.pool, &key),
    )
    .map_err(ApiError::database)?;
    Ok(Json(CallDetail {
        call: summary(row),
        missing,
        history,
    }))
}

/// End a call: `IN_PROGRESS -> COMPLETED`, and a work item for the transcriber.
///
/// Idempotent: repeating it answers with the current state and publishes nothing. The
/// work item reaches JetStream even if NATS is down now (the call row is its outbox).
#[utoipa::path(post, path = "/v1/call/{call_id}/complete", tag = "calls",
    params(("call_id" = String, Path, description = "1-128 characters of [A-Za-z0-9_-]", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$")),
    request_body(content = Option<CompleteBody>, description = "Optional"),
    responses(
        (status = 200, body = CompleteResponse),
        (status = 400, body = common::http::ErrorBody),
        (status = 404, description = "`call_not_found`", body = common::http::ErrorBody),
        (status = 422, description = "Invalid `total_packets`", body = common::http::ErrorBody),
        (status = 503, body = common::http::ErrorBody),
    ))]
pub async fn complete_call(
    caller: Caller<need::Stream>,
    State(app): State<AppState>,
    CallIdPath(call_id): CallIdPath,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<CompleteBody>,
) -> Result<Json<CompleteResponse>, ApiError> {
    let total_packets = body.and_then(|b| b.total_packets);
    if let Some(total) = total_packets
        && !(0..=crate::writer::MAX_SEQUENCE + 1).contains(&total)
    {
        return Err(ApiError::invalid_field(
            "total_packets",
            format!(
                "total_packets must be an integer from 0 to {}, got {total}",
                crate::writer::MAX_SEQUENCE + 1
            ),
        ));
    }
    let completion = lifecycle::complete_call(
        &app.pool,
        &app.publisher,
        &caller.principal().call(call_id),
        total_packets,
        request_id(&headers),
    )
    .await?;
    let (changed, row) = match completion {
        Completion::Completed(row) => (true, row),
        Completion::AlreadyDone(row) => (false, row),
    };
    Ok(Json(CompleteResponse {
        changed,
        call: summary(row),
    }))
}

/// Re-drive a failed call: `FAILED -> COMPLETED`, attempts reset, a new work item.
#[utoipa::path(post, path = "/v1/call/{call_id}/retry", tag = "calls",
    params(("call_id" = String, Path, description = "1-128 characters of [A-Za-z0-9_-]", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$")),
    responses(
        (status = 200, body = CallSummary),
        (status = 400, body = common::http::ErrorBody),
        (status = 404, description = "`call_not_found`", body = common::http::ErrorBody),
        (status = 409, description = "`call_not_failed`", body = common::http::ErrorBody),
        (status = 503, body = common::http::ErrorBody),
    ))]
pub async fn retry_call(
    caller: Caller<need::Retry>,
    State(app): State<AppState>,
    CallIdPath(call_id): CallIdPath,
    headers: HeaderMap,
) -> Result<Json<CallSummary>, ApiError> {
    let key = caller.principal().call(call_id);
    let row = lifecycle::retry_call(&app.pool, &app.publisher, &key, request_id(&headers)).await?;
    Ok(Json(summary(row)))
}

/// Calls, newest first, optionally in one state.
#[utoipa::path(get, path = "/v1/calls", tag = "calls",
    params(
        ("state" = Option<String>, Query, description = "Only calls in this state (empty: every state)", pattern = "^(IN_PROGRESS|COMPLETED|PROCESSING_AI|ARCHIVED|FAILED)?$"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page", pattern = "^([0-9]{1,20}\\.[A-Za-z0-9_-]{1,128})?$"),
    ),
    responses((status = 200, body = CallPage), (status = 400, body = common::http::ErrorBody)))]
pub async fn list_calls(
    caller: Caller<need::Read>,
    State(app): State<AppState>,
    QueryParams(params): QueryParams,
) -> Result<Json<CallPage>, ApiError> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !["state", "limit", "cursor"].contains(&k.as_str()))
    {
        return Err(ApiError::InvalidParameter {
            field: unknown.clone(),
            message: format!(
                "unknown query parameter `{unknown}`; expected state, limit or cursor"
            ),
        });
    }
    let state = params
        .get("state")
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<CallState>())
        .transpose()
        .map_err(|e| ApiError::InvalidParameter {
            field: "state".into(),
            message: e.to_string(),
        })?;
    let limit = match params.get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::InvalidParameter {
                field: "limit".into(),
                message: format!("limit must be an integer from 1 to {MAX_PAGE}, got {raw:?}"),
            })?,
    };
    let cursor = params
        .get("cursor")
        .filter(|c| !c.is_empty())
        .map(|c| {
            decode_cursor(c).ok_or_else(|| ApiError::InvalidParameter {
                field: "cursor".into(),
                message: "cursor is not one this server issued; start again without it".into(),
            })
        })
        .transpose()?;
    // One extra row tells whether there is a next page.
    let tenant = &caller.principal().tenant;
    let mut rows = store::list_calls(&app.pool, tenant, state, limit + 1, cursor.as_ref())
        .await
        .map_err(ApiError::database)?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(CallPage {
        calls: rows.into_iter().map(summary).collect(),
        next_cursor,
    }))
}

/// `<created_at as Unix nanoseconds>.<call_id>`: `.` never occurs in a call id.
fn encode_cursor(row: &CallRow) -> String {
    format!(
        "{}.{}",
        row.created_at.unix_timestamp_nanos(),
        row.key.call_id()
    )
}

fn decode_cursor(raw: &str) -> Option<ListCursor> {
    let (nanos, call_id) = raw.split_once('.')?;
    let created_at = OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().ok()?).ok()?;
    // Only times this server could have issued (Postgres refuses some the `time` crate takes).
    if !(1970..=9999).contains(&created_at.year()) {
        return None;
    }
    common::CallId::parse(call_id).ok()?;
    Some(ListCursor {
        created_at,
        call_id: call_id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_cursors_are_refused() {
        for raw in [
            "",
            "x",
            "12",
            "12.",
            "abc.call",
            "1.a b",
            "-200000000000000000000.x",
        ] {
            assert!(decode_cursor(raw).is_none(), "{raw:?}");
        }
        let c = decode_cursor("1764086400123456000.call-1").unwrap();
        assert_eq!(c.call_id, "call-1");
        assert_eq!(c.created_at.unix_timestamp_nanos(), 1764086400123456000);
    }
}

/// Largest WAV file served: what the format's 32-bit sizes allow.
const MAX_WAV_BYTES: u64 = u32::MAX as u64;

/// The call's audio as a 16-bit mono PCM WAV file at its own sample rate, missing packets as
/// silence (as long as its first packet each), streamed from Postgres as it is read.
///
/// A call streaming now plays what has arrived so far. The file is the one the transcriber
/// sends (before any `AI_SAMPLE_RATE` resampling).
#[utoipa::path(get, path = "/v1/call/{call_id}/audio.wav", tag = "calls",
    params(("call_id" = String, Path, description = "1-128 characters of [A-Za-z0-9_-]", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$")),
    responses(
        (status = 200, description = "`audio/wav`: RIFF/WAVE, PCM, 16-bit, mono, at the call's rate", content_type = "audio/wav", body = Vec<u8>),
        (status = 400, body = common::http::ErrorBody),
        (status = 404, description = "`call_not_found`", body = common::http::ErrorBody),
        (status = 409, description = "`not_audio`: the call's packets are text", body = common::http::ErrorBody),
        (status = 410, description = "`audio_expired`: deleted after `AUDIO_RETENTION_DAYS`", body = common::http::ErrorBody),
        (status = 503, description = "`overloaded`: as many downloads as ingest serves at once are in progress; retry after `Retry-After`", body = common::http::ErrorBody),
    ))]
pub async fn audio_wav(
    caller: Caller<need::Read>,
    State(app): State<AppState>,
    CallIdPath(call_id): CallIdPath,
) -> Result<axum::response::Response, ApiError> {
    use axum::{body::Body, http::header};
    use common::audio::{playback, wav::WavError};
    use futures::StreamExt;

    let key = caller.principal().call(call_id.clone());
    let Ok(permit) = app.playbacks.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded {
            detail: "as many audio downloads as ingest serves at once (a quarter of \
                     DATABASE_MAX_CONNECTIONS) are in progress"
                .into(),
        });
    };
    let playback = playback::open(&app.pool, key.as_str(), MAX_WAV_BYTES)
        .await
        .map_err(|e| match e {
            playback::PlaybackError::NotFound => ApiError::CallNotFound(call_id.clone()),
            playback::PlaybackError::Expired => ApiError::AudioExpired(call_id.clone()),
            playback::PlaybackError::Wav(WavError::NotAudio) => ApiError::NotAudio(call_id.clone()),
            playback::PlaybackError::Wav(WavError::TooLarge { bytes, limit }) => {
                ApiError::PayloadTooLarge {
                    field: None,
                    message: format!(
                        "the call's audio would be a {bytes}-byte WAV file, more than the format's {limit}"
                    ),
                }
            }
            playback::PlaybackError::Database(e) => ApiError::database(e),
        })?;
    let length = playback.layout.file_bytes();
    let header = bytes::Bytes::copy_from_slice(&playback.layout.header());
    // The permit goes with the body: released when the download ends, however it ends.
    let chunks = futures::stream::unfold(
        (playback.chunks, permit),
        |(mut chunks, permit)| async move {
            let chunk = chunks.recv().await?;
            if let Err(e) = &chunk {
                tracing::warn!(error.message = %e, "a WAV download ended short");
            }
            Some((chunk, (chunks, permit)))
        },
    );
    let body = futures::stream::once(async move { Ok(header) }).chain(chunks);
    let response = axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "audio/wav")
        .header(header::CONTENT_LENGTH, length)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{call_id}.wav\""),
        )
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(response)
}
