//! The supervisor dashboard: a static page in three files, compiled into the binary (no CDN,
//! no build step): `assets/dashboard.html` (markup) at `/`, `assets/dashboard.css` at
//! `/dashboard.css` and `assets/dashboard.js` at `/dashboard.js`. The page has no inline
//! script, style or event handler, so it runs under a strict Content-Security-Policy
//! (`script-src 'self'; style-src 'self'; connect-src 'self'`…); that header and the other
//! security headers are added by a layer around the routes, not here.
//!
//! The page signs in first: it exchanges an API key at `POST /v1/auth/token` for a short-lived
//! token (the key itself is never kept; the token is held in the tab's `sessionStorage` and
//! refreshed at two thirds of its lifetime), connects to `/ws?token=…`, resumes with `since`
//! after a reconnect, and keeps a keyed table of calls. Its detail view reads
//! `GET /v1/call/{id}` with the token as a Bearer header.

use axum::{http::header, response::IntoResponse};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLESHEET: &str = include_str!("../assets/dashboard.css");

/// `GET /`: the page's markup.
pub async fn page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard.js`: the page's behaviour.
pub async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard.css`: the page's style.
pub async fn stylesheet() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLESHEET)
}

/// One of the three files; revalidated on every load (`no-cache`), so a new notifier's page
/// never runs with an older script or stylesheet.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The Content-Security-Policy of every answer: the page loads its own script and
/// stylesheet only, talks to its own origin only (`'self'` covers its WebSocket), plays audio
/// it fetched itself (a `blob:` URL: the fetch carries the token an `<audio src>` could not),
/// and may not be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The usual security headers, on every answer of the notifier (the page, its assets, the
/// API): a CSP, no MIME sniffing, no framing, no referrer, an isolated browsing context.
pub async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::HeaderValue;
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        (
            "permissions-policy",
            "camera=(), microphone=(), geolocation=()",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
