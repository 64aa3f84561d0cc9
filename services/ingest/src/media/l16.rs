//! Binary L16 WebSockets: `GET /v1/media/l16`, as jambonz's `listen` verb, FreeSWITCH's
//! `mod_audio_fork` and Vonage's WebSocket connector stream a call. The subprotocols
//! `audio.jambonz.org` and `audio.drachtio.org` are accepted (and one is chosen when offered).
//!
//! The first frame is text: JSON metadata naming the call (`callSid` or `call_id`) and its
//! `sampleRate` (8000 when absent). Then binary frames of signed 16-bit little-endian PCM, of
//! any size (a sample may straddle two frames: see [`super::Reframer`]). A close frame or a
//! lost connection completes the call.
//!
//! The key comes as `Authorization: Bearer <key>`, as the password of `Authorization: Basic`
//! (jambonz's `wsAuth`, `mod_audio_fork`'s `MOD_AUDIO_FORK_HTTP_AUTH_*`), or as the metadata's
//! `key` for PBXs that can set neither.

use std::{sync::Arc, time::Duration};

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
    AudioFormat, CallId,
    auth::{Principal, http::bearer},
    http::{ErrorBody, ErrorResponse as _},
};
use wire::media::{L16_PATH, L16_SUBPROTOCOLS, L16Metadata};

use super::{CallStream, End, Protocol, Reframer, close, close_socket, next_message, now_secs};
use crate::routes::AppState;

/// How long the metadata frame may take to come after the upgrade.
const METADATA_WITHIN: Duration = Duration::from_secs(10);

/// Largest frame taken (audio frames are a few KiB; jambonz sends up to 100 ms).
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Binary L16 audio (WebSocket): jambonz `listen`, FreeSWITCH `mod_audio_fork`, Vonage.
///
/// Subprotocols `audio.jambonz.org` or `audio.drachtio.org`. The first frame is JSON text
/// metadata (`callSid` or `call_id`, `sampleRate`, optionally `key`), then binary signed 16-bit
/// little-endian PCM frames of any size; a close completes the call. The key comes as
/// `Authorization: Bearer`, as the password of `Authorization: Basic`, or in the metadata.
#[utoipa::path(get, path = "/v1/media/l16", tag = "telephony",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 426, description = "`websocket_required`: not a WebSocket upgrade", body = common::http::ErrorBody),
    ))]
pub async fn upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // A key in a header is checked before the upgrade (a refusal is a plain 401/403); without
    // one, the metadata frame must carry it.
    let header_key = match header_key(&headers) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    let principal = match &header_key {
        Some(key) => match super::authorize(&app, Some(key)).await {
            Ok(principal) => Some(principal),
            Err(refused) => return refused.into_response(),
        },
        None => None,
    };
    match ws {
        Err(rejection) => common::http::websocket_required(L16_PATH, &rejection),
        Ok(ws) => ws
            .protocols(L16_SUBPROTOCOLS)
            .max_message_size(MAX_MESSAGE_BYTES)
            .on_upgrade(move |socket| {
                let tracker = app.media.clone();
                tracker.track(run(app, socket, principal))
            }),
    }
}

/// The key in `Authorization`: a Bearer token, or the password of Basic credentials; `Err`
/// is the 401 to answer.
fn header_key(headers: &HeaderMap) -> Result<Option<String>, Box<Response>> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "));
    if let Some(encoded) = basic {
        let password = STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| d.split_once(':').map(|(_, p)| p.to_owned()));
        return password.map(Some).ok_or_else(|| {
            Box::new(
                ErrorBody::new(
                    "unauthorized",
                    "Authorization: Basic must be base64 of user:key",
                )
                .with_field("Authorization")
                .into_response_with(StatusCode::UNAUTHORIZED),
            )
        });
    }
    bearer(headers)
        .map(|k| k.map(str::to_owned))
        .map_err(|refused| Box::new(refused.into_response()))
}

async fn run(app: AppState, mut socket: WebSocket, principal: Option<Arc<Principal>>) {
    let (mut stream, mut reframer, started) = match open(&app, &mut socket, principal).await {
        Ok(opened) => opened,
        Err((code, reason)) => {
            close_socket(&mut socket, code, &reason).await;
            return;
        }
    };
    let shutdown = app.media.shutdown().clone();
    let idle = app.config.call_idle_timeout();
    let end = loop {
        let Some(message) = next_message(&mut socket, &shutdown, idle).await else {
            break End::Lost;
        };
        match message {
            Message::Binary(bytes) => {
                for (sequence, data, offset) in reframer.push(&bytes) {
                    stream.packet(sequence, data, started + offset).await;
                }
            }
            Message::Close(_) => break End::Ended,
            // Text after the metadata (jambonz may send events): not audio.
            _ => {}
        }
    };
    if let Some((sequence, data, offset)) = reframer.flush() {
        stream.packet(sequence, data, started + offset).await;
    }
    stream.finish(end).await;
}

/// Reads the metadata frame and opens the call's stream.
async fn open(
    app: &AppState,
    socket: &mut WebSocket,
    principal: Option<Arc<Principal>>,
) -> Result<(CallStream, Reframer, f64), (u16, String)> {
    let first = tokio::time::timeout(METADATA_WITHIN, socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(_))) => {
            return Err((
                close::UNSUPPORTED,
                "the first frame must be JSON text metadata (callSid, sampleRate)".into(),
            ));
        }
        Ok(_) => return Err((close::UNSUPPORTED, "closed before its metadata".into())),
        Err(_) => {
            return Err((
                close::POLICY,
                format!("no metadata within {} s", METADATA_WITHIN.as_secs()),
            ));
        }
    };
    let metadata: L16Metadata = serde_json::from_str(text.as_str()).map_err(|e| {
        (
            close::UNSUPPORTED,
            format!("metadata is not the expected JSON: {e}"),
        )
    })?;
    let principal = match principal {
        Some(principal) => principal,
        None => {
            let key = metadata.key.as_deref().or_else(|| {
                wire::media::key_in(|name| metadata.other.get(name).and_then(|v| v.as_str()))
            });
            super::authorize(app, key)
                .await
                .map_err(|refused| (close::POLICY, refused.to_string()))?
        }
    };
    let id = metadata
        .call_id
        .clone()
        .or_else(|| {
            let alias = metadata.other.get(wire::media::CALL_ID_PARAMETER_ALIAS)?;
            alias.as_str().map(str::to_owned)
        })
        .or_else(|| metadata.call_sid.clone())
        .ok_or((
            close::UNSUPPORTED,
            "metadata names no call (callSid or call_id)".into(),
        ))?;
    let call_id =
        CallId::try_from(id).map_err(|e| (close::UNSUPPORTED, format!("call id: {e}")))?;
    let format = AudioFormat::slin(metadata.rate().unwrap_or(8_000))
        .map_err(|e| (close::UNSUPPORTED, format!("sampleRate: {e}")))?;
    let stream = CallStream::open(app, principal.call(call_id), format, Protocol::L16)
        .await
        .map_err(|e| (close::TRY_AGAIN_LATER, e.to_string()))?;
    Ok((stream, Reframer::new(format), now_secs()))
}
