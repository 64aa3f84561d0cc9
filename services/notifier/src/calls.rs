//! `GET /v1/call/{call_id}`: one call in full (its whole transcript, missing ranges,
//! history), for the dashboard's detail view. Status events carry only a transcript preview,
//! so the page asks for the rest when a supervisor opens a row. The notifier has no database:
//! it forwards to ingest's read API (`NOTIFIER_INGEST_URL`), so the page needs one origin only
//! (no CORS) and ingest stays the one home of the read API.

use axum::{
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    CallId,
    http::{ErrorBody, ErrorResponse as _},
};

use crate::AppState;

pub async fn get_call(State(app): State<AppState>, Path(raw): Path<String>) -> Response {
    let call_id = match CallId::parse(raw) {
        Ok(id) => id,
        Err(e) => {
            return ErrorBody::new("invalid_call_id", e.to_string())
                .with_field("call_id")
                .into_response_with(StatusCode::BAD_REQUEST);
        }
    };
    let url = format!("{}/v1/call/{call_id}", app.ingest_url);
    let answer = match app.http.get(&url).send().await {
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
