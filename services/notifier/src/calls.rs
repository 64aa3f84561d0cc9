//! `GET /v1/call/{call_id}`: one call in full (its whole transcript, missing ranges,
//! history), for the dashboard's detail view. Status events carry only a transcript preview,
//! so the page asks for the rest when a supervisor opens a row. The notifier reads no calls
//! from the database (it checks keys there only): it forwards to ingest's read API (`NOTIFIER_INGEST_URL`), so the page needs one origin only
//! (no CORS) and ingest stays the one home of the read API. The caller's own credential is
//! checked here and forwarded: ingest answers for the caller's tenant, so a supervisor can
//! open only its own tenant's calls (another tenant's call is a 404 there).

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

pub async fn get_call(
    _caller: Caller<need::Read>,
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let call_id = match CallId::parse(raw) {
        Ok(id) => id,
        Err(e) => {
            return ErrorBody::new("invalid_call_id", e.to_string())
                .with_field("call_id")
                .into_response_with(StatusCode::BAD_REQUEST);
        }
    };
    let url = format!("{}/v1/call/{call_id}", app.ingest_url);
    let mut request = app.http.get(&url);
    if let Some(credential) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, credential);
    }
    let answer = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error.message = %e, "ingest's read API is not reachable");
            return unavailable(&app.ingest_url);
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    match answer.bytes().await {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => unavailable(&app.ingest_url),
    }
}

fn unavailable(ingest_url: &str) -> Response {
    ErrorBody::new(
        "unavailable",
        format!("ingest's read API at {ingest_url} (NOTIFIER_INGEST_URL) is not reachable"),
    )
    .into_response_with(StatusCode::SERVICE_UNAVAILABLE)
}
