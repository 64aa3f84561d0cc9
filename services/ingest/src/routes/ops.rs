//! Readiness and the JSON fallbacks.

use axum::{
    extract::State,
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
};
use common::http::{ErrorBody, ErrorResponse as _, check_nats, check_postgres, readiness};

use super::AppState;
use crate::error::ApiError;

/// `GET /readyz`: 200 when Postgres and NATS are reachable, else 503 naming what is not.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "A dependency is unreachable")))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    readiness(vec![
        check_postgres(&app.pool).await,
        check_nats(&app.nats),
        app.tasks.check(),
    ])
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

pub async fn method_not_allowed() -> Response {
    ErrorBody::new("method_not_allowed", "this route does not take that method")
        .into_response_with(StatusCode::METHOD_NOT_ALLOWED)
        .into_response()
}
