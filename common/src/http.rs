//! HTTP pieces every service shares: the error body, request ids and the HTTP span, the
//! operational routes and graceful serving.

use std::future::Future;

use axum::{
    Json, Router,
    extract::{MatchedPath, Request},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
/// The error body of every Switchboard API, defined with the rest of the wire contract.
pub use wire::api::{ErrorBody, ErrorDetail};

/// An [`ErrorBody`] as an axum response (the body type lives in `wire`, which knows no axum).
pub trait ErrorResponse {
    fn into_response_with(self, status: StatusCode) -> Response;
}

impl ErrorResponse for ErrorBody {
    fn into_response_with(self, status: StatusCode) -> Response {
        (status, Json(self)).into_response()
    }
}

/// One dependency's health, for `/readyz`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Check {
    pub fn new(name: &'static str, result: Result<(), String>) -> Self {
        match result {
            Ok(()) => Self {
                name,
                ok: true,
                error: None,
            },
            Err(e) => Self {
                name,
                ok: false,
                error: Some(e),
            },
        }
    }
}

/// `200 {"status":"ready"}` when every check passes, else `503` naming what is not.
pub fn readiness(checks: Vec<Check>) -> Response {
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

pub async fn check_postgres(pool: &sqlx::PgPool) -> Check {
    let result = sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    Check::new("postgres", result)
}

pub fn check_nats(client: &async_nats::Client) -> Check {
    let result = if crate::nats::is_connected(client) {
        Ok(())
    } else {
        Err(format!("not connected ({:?})", client.connection_state()))
    };
    Check::new("nats", result)
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::prometheus().render(),
    )
        .into_response()
}

/// The layers around every service's routes: each request gets an `x-request-id` (a new
/// UUID unless the client sent one), runs in an `http` span that carries its method, route
/// template and request id, and its response returns the id. Apply it last, around
/// everything (fallbacks included).
pub fn with_request_ids<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // The route template (`/v1/call/{call_id}`) where a route matched.
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or(req.uri().path(), MatchedPath::as_str);
            tracing::info_span!(
                "http",
                http.method = %req.method(),
                http.route = route,
                request.id = request_id(req.headers()).unwrap_or(""),
            )
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The request id [`with_request_ids`] set, to carry into NATS headers.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok())
}

/// Answers `408 request_timeout` (JSON, as every error) to a request not answered within
/// `limit`, body upload included: a slow or stalled client cannot hold a connection and a
/// request slot for ever. Route layer state: the limit.
pub async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ErrorBody::new(
            "request_timeout",
            format!(
                "the request was not completed within {} s; send it again",
                limit.as_secs_f64()
            ),
        )
        .into_response_with(StatusCode::REQUEST_TIMEOUT),
    }
}

/// 426 `websocket_required`: a plain request to a route that speaks WebSocket only (the live
/// view, the telephony streams).
pub fn websocket_required(
    path: &str,
    rejection: &axum::extract::ws::rejection::WebSocketUpgradeRejection,
) -> Response {
    ErrorBody::new(
        "websocket_required",
        format!("{path} speaks WebSocket only: {}", rejection.body_text()),
    )
    .into_response_with(StatusCode::UPGRADE_REQUIRED)
}

/// The listener of `ADMIN_ADDR`, when it is set: `/healthz` and `/metrics` without a key
/// ([`operational_routes`]), for a Prometheus on a private network.
pub async fn bind_admin(addr: crate::config::OptionalAddr) -> anyhow::Result<Option<TcpListener>> {
    use anyhow::Context as _;
    match addr.0 {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("cannot listen on {addr} (ADMIN_ADDR)")),
    }
}

/// Serves [`bind_admin`]'s listener, if there is one, as a critical task until `shutdown`.
pub fn serve_admin(
    tasks: &mut crate::tasks::CriticalTasks,
    listener: Option<TcpListener>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let Some(listener) = listener else {
        return Ok(());
    };
    tracing::info!(addr = %listener.local_addr()?, "metrics on ADMIN_ADDR");
    let stop = shutdown.clone();
    tasks.spawn("admin listener", async move {
        serve(listener, operational_routes(), stop)
            .await
            .context("serving ADMIN_ADDR")
    });
    Ok(())
}

/// Routes every service serves: `/healthz` and `/metrics` (`/readyz` is the service's own,
/// as only it knows what it depends on). Ingest and the notifier, which face clients, serve
/// `/metrics` to admin keys only (`auth::http::metrics`) or on `ADMIN_ADDR`.
pub fn operational_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// `<service> healthcheck`: asks the service listening on `addr` (its `*_ADDR`) for
/// `/healthz` and fails unless it answers 200. For container health checks (Docker's
/// `HEALTHCHECK`), so that images need no curl.
///
/// Written by hand over a `TcpStream`: one fixed HTTP/1.1 GET is smaller than pulling an HTTP
/// client library into every service binary.
pub async fn probe_health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let limit = std::time::Duration::from_secs(3);
    let mut stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(target))
        .await
        .context("timed out connecting")?
        .with_context(|| format!("nothing is listening on {target}"))?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut response))
        .await
        .context("timed out reading the answer")??;
    let status_line = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "{target}/healthz answered {status_line:?}"
    );
    Ok(())
}

/// The exit status of a `healthcheck` subcommand, with the reason on stderr.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unhealthy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves `router` until `shutdown` fires, then stops accepting and lets in-flight requests
/// finish.
pub fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> impl Future<Output = std::io::Result<()>> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
        .into_future()
}
