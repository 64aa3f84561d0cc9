//! `GET /v1/call/{call_id}`: one call in full (its whole transcript, missing ranges,
//! history), for the dashboard's detail view, and `GET /v1/call/{call_id}/audio.wav`, its audio
//! to listen to there. Status events carry only a transcript preview,
//! so the page asks for the rest when a supervisor opens a row. The notifier reads no calls
//! from the database (it checks keys there only): it forwards to ingest's read API (`NOTIFIER_INGEST_URL`), so the page needs one origin only
//! (no CORS) and ingest stays the one home of the read API. The caller's own credential is
//! checked here and forwarded: ingest answers for the caller's tenant, so a supervisor can
//! open only its own tenant's calls (another tenant's call is a 404 there).

use std::time::Duration;

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    CallId,
    auth::http::{Caller, need},
    http::{ErrorBody, ErrorResponse as _},
};

use crate::AppState;

/// The longest a call's read may take, body included.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// The longest a call's audio may take to come through, body included: ingest's own bound on
/// one download (`common::audio::playback`), so the notifier never cuts one short first.
const AUDIO_DOWNLOAD_LIMIT: Duration = common::audio::playback::DOWNLOAD_LIMIT;

pub async fn get_call(
    _caller: Caller<need::Read>,
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let answer = match forward(&app, &headers, raw, "", READ_LIMIT).await {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    match answer.bytes().await {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => unavailable(&app.ingest_url),
    }
}

/// The call's audio, streamed through from ingest as it comes (a WAV of an hour-long call is
/// tens of megabytes: never held here).
pub async fn get_audio(
    _caller: Caller<need::Read>,
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let answer = match forward(&app, &headers, raw, "/audio.wav", AUDIO_DOWNLOAD_LIMIT).await {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::builder().status(status);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CACHE_CONTROL,
    ] {
        if let Some(value) = answer.headers().get(&name) {
            response = response.header(name, value.as_bytes());
        }
    }
    let chunks = futures::stream::unfold(answer, |mut answer| async move {
        match answer.chunk().await {
            Ok(Some(chunk)) => Some((Ok::<_, reqwest::Error>(chunk), answer)),
            Ok(None) => None,
            Err(e) => Some((Err(e), answer)),
        }
    });
    response
        .body(axum::body::Body::from_stream(chunks))
        .unwrap_or_else(|_| unavailable(&app.ingest_url))
}

/// Sends the caller's request for call `raw` (plus `suffix`) on to ingest with the caller's
/// credential: ingest's answer, or the answer to give instead.
async fn forward(
    app: &AppState,
    headers: &HeaderMap,
    raw: String,
    suffix: &str,
    limit: Duration,
) -> Result<reqwest::Response, Response> {
    let call_id = CallId::parse(raw).map_err(|e| {
        ErrorBody::new("invalid_call_id", e.to_string())
            .with_field("call_id")
            .into_response_with(StatusCode::BAD_REQUEST)
    })?;
    let url = format!("{}/v1/call/{call_id}{suffix}", app.ingest_url);
    let mut request = app.http.get(&url).timeout(limit);
    if let Some(credential) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, credential);
    }
    request.send().await.map_err(|e| {
        tracing::warn!(error.message = %e, "ingest's read API is not reachable");
        unavailable(&app.ingest_url)
    })
}

fn unavailable(ingest_url: &str) -> Response {
    ErrorBody::new(
        "unavailable",
        format!("ingest's read API at {ingest_url} (NOTIFIER_INGEST_URL) is not reachable"),
    )
    .into_response_with(StatusCode::SERVICE_UNAVAILABLE)
}
