//! Twilio Media Streams: `GET /v1/media/twilio`, the WebSocket a TwiML `<Connect><Stream>` or
//! `<Start><Stream>` points at.
//!
//! Twilio sends JSON text frames: `connected`, `start` (the call, its tracks, its format and
//! the `<Parameter>`s), one `media` per 20 ms of 8 kHz µ-law per track, `dtmf`, `mark`, `stop`.
//! It cannot send headers, so the tenant's key comes as the custom parameter `key`; when
//! `TWILIO_AUTH_TOKEN` is set, the upgrade's `X-Twilio-Signature` (HMAC-SHA1 of the URL Twilio
//! connected to) must also match. The call id is the `callSid`, or a `call_id` parameter.
//!
//! Each inbound `media` frame is a packet: its sequence is the frame's `chunk` (from 1), so
//! frames out of order, repeated, or sent again on a second stream of the same call meet the
//! writer's dedup rules. With `both_tracks`, the outbound track (what the caller hears) is
//! stored as a call of its own, `<call id>-outbound`. `stop`, a close frame or a lost
//! connection completes the call. Nothing is ever sent back but a close frame: Twilio ends the
//! stream on a binary frame, and it needs no answer to its messages.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{
    AudioFormat, CallId, CallKey,
    auth::Principal,
    http::{ErrorBody, ErrorResponse as _},
};
use wire::media::{
    CALL_ID_PARAMETER, CALL_ID_PARAMETER_ALIAS, KEY_PARAMETER, OUTBOUND_SUFFIX,
    TWILIO_SIGNATURE_HEADER, TwilioMedia, TwilioMessage, TwilioStart, key_in,
};

use super::{CallStream, End, Protocol, close, close_socket, next_message, now_secs};
use crate::{error::ApiError, routes::AppState, writer::MAX_SEQUENCE};

/// Largest Twilio message taken: a `start` with its parameters, or 20 ms of audio, is far
/// smaller.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Twilio Media Streams (WebSocket).
///
/// Point a TwiML `<Connect><Stream>` or `<Start><Stream>` here, with the tenant's key as
/// `<Parameter name="key" value="sbk_..."/>` (Twilio sends no headers). Each inbound `media`
/// frame is a packet numbered by its `chunk`; `stop` or a closed socket completes the call.
/// A refused stream is closed with 1008 (key), 1003 (format) or 1013 (try later).
#[utoipa::path(get, path = "/v1/media/twilio", tag = "telephony",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 403, description = "`invalid_signature`: `TWILIO_AUTH_TOKEN` is set and `X-Twilio-Signature` does not match", body = common::http::ErrorBody),
        (status = 426, description = "`websocket_required`: not a WebSocket upgrade", body = common::http::ErrorBody),
    ))]
pub async fn upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // An empty TWILIO_AUTH_TOKEN is unset, not a key anyone could sign with.
    if let Some(token) = app
        .config
        .twilio_auth_token
        .as_deref()
        .filter(|t| !t.is_empty())
        && !signature_matches(token, &headers, &uri.to_string())
    {
        metrics::counter!("switchboard_ingest_media_streams_total", "protocol" => "twilio", "event" => "bad_signature")
            .increment(1);
        return ErrorBody::new(
            "invalid_signature",
            "X-Twilio-Signature is missing or does not match TWILIO_AUTH_TOKEN for this URL",
        )
        .with_field(TWILIO_SIGNATURE_HEADER)
        .into_response_with(StatusCode::FORBIDDEN);
    }
    // Twilio sends no headers; a client that can (a test tool, a proxy) may send the key as
    // `Authorization: Bearer`, checked before the upgrade.
    let principal = match common::auth::http::bearer(&headers) {
        Ok(Some(key)) => match super::authorize(&app, Some(key)).await {
            Ok(principal) => Some(principal),
            Err(refused) => return refused.into_response(),
        },
        Ok(None) => None,
        Err(refused) => return refused.into_response(),
    };
    match ws {
        Err(rejection) => common::http::websocket_required(uri.path(), &rejection),
        Ok(ws) => ws
            .max_message_size(MAX_MESSAGE_BYTES)
            .on_upgrade(move |socket| {
                let tracker = app.media.clone();
                tracker.track(run(app, socket, principal))
            }),
    }
}

/// Whether `X-Twilio-Signature` is the base64 HMAC-SHA1, keyed by the account's auth token,
/// of the URL Twilio connected to (`wss://` and the `Host` it used; a WebSocket upgrade has
/// no form parameters to append). Checked in constant time.
pub fn signature_matches(token: &str, headers: &HeaderMap, path_and_query: &str) -> bool {
    let Some(signature) = headers
        .get(TWILIO_SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| STANDARD.decode(v.trim()).ok())
    else {
        return false;
    };
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|v| v.to_str().ok());
    let Some(host) = host else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, token.as_bytes());
    ["wss", "ws", "https"].iter().any(|scheme| {
        let url = format!("{scheme}://{host}{path_and_query}");
        ring::hmac::verify(&key, url.as_bytes(), &signature).is_ok()
    })
}

/// The call (or calls, with both tracks) a stream carries, once `start` has come.
struct Started {
    /// By track name (`inbound`, `outbound`).
    tracks: BTreeMap<String, CallStream>,
    /// When `start` came: `media.timestamp` counts from here.
    at: f64,
}

/// What a message means for the stream.
enum Flow {
    Continue,
    Stop,
    Refuse(u16, String),
}

async fn run(app: AppState, mut socket: WebSocket, principal: Option<Arc<Principal>>) {
    let shutdown = app.media.shutdown().clone();
    let idle = app.config.call_idle_timeout();
    let mut started: Option<Started> = None;
    let end = loop {
        let Some(message) = next_message(&mut socket, &shutdown, idle).await else {
            break End::Lost;
        };
        let flow = match message {
            Message::Text(text) => {
                handle(&app, &mut started, principal.as_ref(), text.as_str()).await
            }
            Message::Binary(_) => {
                tracing::warn!("a binary frame on a Twilio stream (Twilio sends text): ignored");
                Flow::Continue
            }
            Message::Close(_) => break End::Ended,
            _ => Flow::Continue,
        };
        match flow {
            Flow::Continue => {}
            Flow::Stop => break End::Ended,
            Flow::Refuse(code, reason) => {
                close_socket(&mut socket, code, &reason).await;
                break End::Lost;
            }
        }
    };
    if let Some(started) = started {
        for stream in started.tracks.into_values() {
            stream.finish(end.clone()).await;
        }
    }
}

async fn handle(
    app: &AppState,
    started: &mut Option<Started>,
    principal: Option<&Arc<Principal>>,
    text: &str,
) -> Flow {
    let message: TwilioMessage = match serde_json::from_str(text) {
        Ok(message) => message,
        Err(e) => {
            metrics::counter!("switchboard_ingest_media_packets_total", "protocol" => "twilio", "outcome" => "invalid")
                .increment(1);
            tracing::warn!(error.message = %e, "a Twilio message that does not parse: ignored");
            return Flow::Continue;
        }
    };
    match message {
        TwilioMessage::Start { start, .. } => {
            if started.is_some() {
                tracing::warn!("a second `start` on one Twilio stream: ignored");
                return Flow::Continue;
            }
            match open(app, &start, principal).await {
                Ok(tracks) => {
                    *started = Some(Started {
                        tracks,
                        at: now_secs(),
                    });
                    Flow::Continue
                }
                Err((code, reason)) => Flow::Refuse(code, reason),
            }
        }
        TwilioMessage::Media { media, .. } => {
            match started {
                Some(started) => media_frame(started, media).await,
                None => tracing::warn!("a `media` message before `start`: ignored"),
            }
            Flow::Continue
        }
        TwilioMessage::Dtmf { dtmf, .. } => {
            metrics::counter!("switchboard_ingest_media_dtmf_total", "protocol" => "twilio")
                .increment(1);
            let call = started
                .as_ref()
                .and_then(|s| s.tracks.values().next())
                .map(|s| s.key().to_string());
            tracing::info!(call.id = call, digit = dtmf.digit, "DTMF");
            Flow::Continue
        }
        TwilioMessage::Stop { .. } => Flow::Stop,
        TwilioMessage::Connected { .. } | TwilioMessage::Mark { .. } => Flow::Continue,
    }
}

/// The streams of a `start`: authenticated by its `key` parameter, in µ-law 8 kHz mono.
async fn open(
    app: &AppState,
    start: &TwilioStart,
    principal: Option<&Arc<Principal>>,
) -> Result<BTreeMap<String, CallStream>, (u16, String)> {
    let params = &start.custom_parameters;
    let principal = match principal {
        Some(principal) => principal.clone(),
        None => {
            let key = key_in(|name| params.get(name).map(String::as_str));
            super::authorize(app, key).await.map_err(|refused| {
                (
                    close::POLICY,
                    format!("{refused} (send the key as <Parameter name=\"{KEY_PARAMETER}\">)"),
                )
            })?
        }
    };
    let format = &start.media_format;
    if !format.encoding.eq_ignore_ascii_case("audio/x-mulaw")
        || format.sample_rate != 8_000
        || format.channels != 1
    {
        return Err((
            close::UNSUPPORTED,
            format!(
                "only audio/x-mulaw 8000 Hz mono is taken, not {} {} Hz x{}",
                format.encoding, format.sample_rate, format.channels
            ),
        ));
    }
    let id = params
        .get(CALL_ID_PARAMETER)
        .or_else(|| params.get(CALL_ID_PARAMETER_ALIAS))
        .unwrap_or(&start.call_sid)
        .clone();
    let call_id =
        CallId::try_from(id).map_err(|e| (close::UNSUPPORTED, format!("call id: {e}")))?;
    let mut tracks: Vec<&str> = start.tracks.iter().map(String::as_str).collect();
    if tracks.is_empty() {
        tracks.push("inbound");
    }
    let mut streams = BTreeMap::new();
    for track in tracks {
        let id = match track {
            "inbound" => call_id.clone(),
            "outbound" => match CallId::try_from(format!("{call_id}{OUTBOUND_SUFFIX}")) {
                Ok(id) => id,
                Err(e) => {
                    // The caller's track is what matters; keep it.
                    tracing::warn!(call.id = %call_id, error.message = %e, "the outbound track's call id is not valid: that track is not kept");
                    continue;
                }
            },
            other => {
                tracing::warn!(track = other, "an unknown Twilio track: ignored");
                continue;
            }
        };
        let key: CallKey = principal.call(id);
        let stream = CallStream::open(app, key, AudioFormat::MULAW, Protocol::Twilio)
            .await
            .map_err(refusal)?;
        streams.insert(track.to_owned(), stream);
    }
    Ok(streams)
}

/// Why a stream could not be opened, as a close code and reason.
fn refusal(e: ApiError) -> (u16, String) {
    match e {
        ApiError::TooManyStreamingCalls { .. } | ApiError::Unavailable { .. } => {
            (close::TRY_AGAIN_LATER, e.to_string())
        }
        other => (close::UNSUPPORTED, other.to_string()),
    }
}

async fn media_frame(started: &mut Started, media: TwilioMedia) {
    let track = media.track.as_deref().unwrap_or("inbound");
    let Some(stream) = started.tracks.get_mut(track) else {
        tracing::warn!(track, "media of a track the stream did not start: ignored");
        return;
    };
    let chunk = media
        .chunk
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|c| (1..=MAX_SEQUENCE).contains(c));
    let payload = STANDARD
        .decode(media.payload.trim())
        .ok()
        .filter(|p| !p.is_empty());
    let (Some(chunk), Some(payload)) = (chunk, payload) else {
        metrics::counter!("switchboard_ingest_media_packets_total", "protocol" => "twilio", "outcome" => "invalid")
            .increment(1);
        tracing::warn!(
            call.id = %stream.key(),
            chunk = media.chunk,
            "a media frame without a chunk from 1 or without base64 audio: ignored"
        );
        return;
    };
    let offset_ms = media.timestamp.trim().parse::<u64>().unwrap_or(0);
    let timestamp = started.at + offset_ms as f64 / 1000.0;
    // Stored as canonical base64 of exactly the bytes Twilio sent.
    stream
        .packet(chunk, STANDARD.encode(payload), timestamp)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_twilios_hmac_of_the_url() {
        // Twilio's documented algorithm: base64(HMAC-SHA1(auth token, URL)).
        let token = "12345";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, token.as_bytes());
        let tag = ring::hmac::sign(&key, b"wss://sb.example.com/v1/media/twilio");
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "sb.example.com".parse().unwrap());
        headers.insert(
            TWILIO_SIGNATURE_HEADER,
            STANDARD.encode(tag.as_ref()).parse().unwrap(),
        );
        assert!(signature_matches(token, &headers, "/v1/media/twilio"));
        assert!(!signature_matches("other", &headers, "/v1/media/twilio"));
        assert!(!signature_matches(token, &headers, "/v1/media/twilio?x=1"));
        headers.remove(TWILIO_SIGNATURE_HEADER);
        assert!(!signature_matches(token, &headers, "/v1/media/twilio"));
    }
}
