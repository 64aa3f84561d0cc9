//! `POST /v1/auth/token`: the dashboard's session. A supervisor's key is exchanged once for a
//! short-lived token (`AUTH_TOKEN_TTL_SECS`), which the page keeps in the tab's session storage
//! and sends on the live view's URL and to the detail view; the key itself is never stored by
//! the page. A valid token exchanges for a fresh one, so an open page stays signed in while
//! its key is valid; revoking the key ends every token minted from it.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use common::{
    auth::{
        Token,
        http::{Caller, need},
        settings::AuthMode,
    },
    http::{ErrorBody, ErrorResponse as _},
};
use time::OffsetDateTime;

use crate::AppState;

pub async fn token(caller: Caller<need::Read>, State(app): State<AppState>) -> Response {
    let principal = caller.principal();
    if app.auth.mode() == AuthMode::Off {
        // Nothing to mint: every request is let in. The page still gets the shape it expects.
        return Json(Token {
            secret: "auth-off".into(),
            expires_at: OffsetDateTime::now_utc() + app.token_ttl,
            tenant: principal.tenant.clone(),
            role: principal.role,
        })
        .into_response();
    }
    match app.auth.keys().mint_token(principal, app.token_ttl).await {
        Ok(token) => Json(token).into_response(),
        Err(e) => {
            tracing::warn!(error.message = %e, "cannot mint a token");
            ErrorBody::new("unavailable", "tokens cannot be issued right now; retry")
                .into_response_with(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}
