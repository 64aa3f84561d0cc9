//! `POST /v1/call/stream/{call_id}`: one audio packet.

use axum::{Json, extract::State, http::HeaderMap, http::StatusCode};
use common::{
    AudioFormat, CallId, CallKey, Encoding,
    auth::http::{Caller, need},
    call_id::InvalidCallId,
};
use wire::api::{PacketBody, PacketReceipt, PacketStatus};

use super::AppState;
pub use crate::writer::MAX_SEQUENCE;
use crate::{
    config::IngestConfig,
    error::ApiError,
    extract::{AppJson, CallIdPath},
    writer::{NewPacket, Outcome, WriteError},
};

/// Stream one packet.
///
/// `202` means the packet is committed in Postgres and its event is acknowledged by
/// JetStream on `<prefix>.packets.<call_id>` (`Nats-Msg-Id: <call_id>:<sequence>`).
/// The first packet of an unknown call creates the call. Retrying after a `503` or a
/// timeout is always safe.
#[utoipa::path(post, path = "/v1/call/stream/{call_id}", tag = "packets",
    params(("call_id" = String, Path, description = "1-128 characters of [A-Za-z0-9_-]", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$")),
    request_body = PacketBody,
    responses(
        (status = 202, description = "Stored and published (or a duplicate of a stored packet)", body = PacketReceipt),
        (status = 400, description = "Malformed JSON or invalid call_id", body = common::http::ErrorBody),
        (status = 409, description = "`sequence_conflict`, `call_not_in_progress` or `format_conflict`", body = common::http::ErrorBody),
        (status = 413, description = "`data` or the body is too large", body = common::http::ErrorBody),
        (status = 415, description = "Not JSON", body = common::http::ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid", body = common::http::ErrorBody),
        (status = 503, description = "Postgres or NATS unavailable, or ingest overloaded (`overloaded`: not answered within `INGEST_REQUEST_DEADLINE_MS`, or over `INGEST_MAX_IN_FLIGHT` requests or `INGEST_MAX_CONNECTIONS` connections); retry after `Retry-After`", body = common::http::ErrorBody),
    ))]
pub async fn stream_packet(
    caller: Caller<need::Packets>,
    State(app): State<AppState>,
    CallIdPath(call_id): CallIdPath,
    headers: HeaderMap,
    AppJson(body): AppJson<PacketBody>,
) -> Result<(StatusCode, Json<PacketReceipt>), ApiError> {
    let key = caller.principal().call(call_id.clone());
    let mut packet = validate(key, body, &app.config)?;
    packet.request_id = common::http::request_id(&headers).map(str::to_owned);
    let sequence = packet.sequence;
    let declared = packet.format.unwrap_or(AudioFormat::TEXT);
    app.streaming.admit(&packet.call_id).await?;

    let started = tokio::time::Instant::now();
    let stored = app.writer.write(packet).await.map_err(|e| {
        metrics::counter!("switchboard_ingest_packets_total", "outcome" => outcome_label(&e))
            .increment(1);
        write_error(e, &call_id, sequence, declared)
    })?;
    metrics::histogram!("switchboard_ingest_store_duration_seconds")
        .record(started.elapsed().as_secs_f64());

    let status = match stored.outcome {
        Outcome::Accepted => PacketStatus::Accepted,
        Outcome::Duplicate => PacketStatus::Duplicate,
    };
    let label = match status {
        PacketStatus::Accepted => "accepted",
        PacketStatus::Duplicate => "duplicate",
    };
    metrics::counter!("switchboard_ingest_packets_total", "outcome" => label).increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(PacketReceipt {
            call_id: call_id.to_string(),
            sequence,
            status,
            missing: stored.missing,
            missing_packets: stored.missing_packets,
        }),
    ))
}

/// The answer to a packet the writer did not store (or could not publish).
fn write_error(e: WriteError, call_id: &CallId, sequence: i64, declared: AudioFormat) -> ApiError {
    match e {
        WriteError::Conflict => ApiError::SequenceConflict {
            call_id: call_id.clone(),
            sequence,
        },
        WriteError::NotInProgress(state) => ApiError::CallNotInProgress {
            call_id: call_id.clone(),
            state,
        },
        WriteError::NotAudio(format) => ApiError::invalid_field(
            "data",
            format!(
                "call {call_id} carries {format} audio: data must be canonical base64 of whole \
                 samples of it"
            ),
        ),
        WriteError::FormatMismatch(format) => ApiError::FormatConflict {
            call_id: call_id.clone(),
            format,
            declared,
        },
        WriteError::BeforeStart { start } => ApiError::invalid_field(
            "sequence",
            format!("this call numbers its packets from {start}; got sequence {sequence}"),
        ),
        WriteError::Database {
            unavailable: true,
            message,
        } => ApiError::Unavailable {
            dependency: "postgres",
            detail: message,
        },
        WriteError::Database { message, .. } => {
            ApiError::Internal(anyhow::anyhow!(message).context("storing a packet batch"))
        }
        // Stored: the retry is answered `duplicate` once NATS is back, and the outbox relay
        // publishes it even if no retry comes.
        WriteError::Unpublished(detail) => ApiError::Unavailable {
            dependency: "nats",
            detail,
        },
        WriteError::Closed => ApiError::Unavailable {
            dependency: "ingest",
            detail: "shutting down".into(),
        },
        WriteError::Overloaded(detail) => ApiError::Overloaded { detail },
        WriteError::CallLocked => ApiError::Unavailable {
            dependency: "postgres",
            detail: format!("call {call_id} is locked by another transaction"),
        },
    }
}

/// `POST /v1/call/stream/` with no call id.
pub async fn empty_call_id(_caller: Caller<need::Packets>) -> ApiError {
    ApiError::InvalidCallId(InvalidCallId::Empty)
}

fn validate(
    call_id: CallKey,
    body: PacketBody,
    config: &IngestConfig,
) -> Result<NewPacket, ApiError> {
    let max_bytes = config.max_packet_bytes;
    let start = config.sequence_start;
    if !(start..=MAX_SEQUENCE).contains(&body.sequence) {
        return Err(ApiError::invalid_field(
            "sequence",
            format!(
                "sequence must be an integer from {start} (SEQUENCE_START) to {MAX_SEQUENCE}, got {}",
                body.sequence
            ),
        ));
    }
    if !body.timestamp.is_finite() || body.timestamp < 0.0 {
        return Err(ApiError::invalid_field(
            "timestamp",
            format!(
                "timestamp must be a finite, non-negative number of seconds since the Unix epoch, got {}",
                body.timestamp
            ),
        ));
    }
    if body.data.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge {
            field: Some("data"),
            message: format!(
                "data is {} bytes; the limit is {max_bytes} (MAX_PACKET_BYTES)",
                body.data.len()
            ),
        });
    }
    if body.data.contains('\0') {
        return Err(ApiError::invalid_field(
            "data",
            "data must not contain NUL characters (send binary audio as base64)",
        ));
    }
    let format = declared_format(&body)?;
    Ok(NewPacket {
        call_id,
        sequence: body.sequence,
        data: body.data,
        timestamp: body.timestamp,
        request_id: None,
        format,
        sequence_start: None,
    })
}

/// The packet's declared format (`None` when it declares none), with its data checked to be
/// whole samples of it in canonical base64.
fn declared_format(body: &PacketBody) -> Result<Option<AudioFormat>, ApiError> {
    let Some(encoding) = body.encoding else {
        return match body.sample_rate {
            Some(_) => Err(ApiError::invalid_field(
                "sample_rate",
                "sample_rate needs an encoding (mulaw, alaw or slin)",
            )),
            None => Ok(None),
        };
    };
    let format = AudioFormat::new(encoding, body.sample_rate).map_err(|e| {
        let field = if body.sample_rate.is_some() || encoding == Encoding::Slin {
            "sample_rate"
        } else {
            "encoding"
        };
        ApiError::invalid_field(field, e.to_string())
    })?;
    if format.is_sound() {
        let bytes = common::audio::decode_base64(&body.data).ok_or_else(|| {
            ApiError::invalid_field(
                "data",
                format!(
                    "{encoding} audio must be sent as canonical (padded, standard-alphabet) base64"
                ),
            )
        })?;
        format
            .samples_in(bytes.len())
            .map_err(|e| ApiError::invalid_field("data", e.to_string()))?;
    }
    Ok(Some(format))
}

fn outcome_label(e: &WriteError) -> &'static str {
    match e {
        WriteError::Conflict | WriteError::FormatMismatch(_) => "conflict",
        WriteError::NotAudio(_) => "invalid",
        WriteError::NotInProgress(_) => "not_in_progress",
        WriteError::BeforeStart { .. } => "invalid",
        WriteError::Database { .. } | WriteError::Unpublished(_) | WriteError::Closed => {
            "unavailable"
        }
        WriteError::Overloaded(_) | WriteError::CallLocked => "shed",
    }
}
