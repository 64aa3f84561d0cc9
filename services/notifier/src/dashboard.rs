//! The supervisor dashboard: one self-contained page (HTML, CSS and JS in
//! `assets/dashboard.html`, compiled into the binary; no CDN, no build step). It connects to
//! `/ws`, resumes with `since` after a reconnect, and keeps a keyed table of calls.

use axum::{http::header, response::IntoResponse};

const PAGE: &str = include_str!("../assets/dashboard.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
