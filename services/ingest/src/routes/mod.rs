//! The HTTP API: routes, the state they share, and the middleware around them.

pub mod calls;
pub mod ops;
pub mod packets;

use std::{sync::Arc, time::Duration};

use axum::extract::FromRef;
use axum::{
    Router,
    extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State},
    http::{HeaderValue, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use common::{
    auth::http::{self as auth_http, Authenticator},
    outbox::Publisher,
};
use sqlx::PgPool;
use tokio::{sync::Semaphore, time::Instant};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    config::IngestConfig, connections::Admission, error::ApiError, media, media::MediaStreams,
    openapi, streaming_cap::StreamingCap, writer::PacketWriter,
};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    /// JetStream, subjects and the pool, for publishing.
    pub publisher: Publisher,
    pub writer: PacketWriter,
    pub config: Arc<IngestConfig>,
    /// Whether the writer, relay and reaper are all running (`/readyz`).
    pub tasks: common::tasks::TaskHealth,
    /// Keys, roles and per-key rates: every `/v1` route names what it needs
    /// (`Caller<need::..>`).
    pub auth: Authenticator,
    pub streaming: StreamingCap,
    /// The telephony streams open here (`crate::media`).
    pub media: MediaStreams,
    /// `audio.wav` downloads at once at most: each holds a Postgres connection while the client
    /// reads, and the packet writer must never be starved of them.
    pub playbacks: Arc<Semaphore>,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/call/stream/{call_id}", post(packets::stream_packet))
        .route("/v1/call/stream/", post(packets::empty_call_id))
        .route("/v1/call/{call_id}", get(calls::get_call))
        .route("/v1/call/{call_id}/complete", post(calls::complete_call))
        .route("/v1/call/{call_id}/retry", post(calls::retry_call))
        .route("/v1/call/{call_id}/audio.wav", get(calls::audio_wav))
        .route(wire::media::TWILIO_PATH, get(media::twilio::upgrade))
        .route(wire::media::L16_PATH, get(media::l16::upgrade))
        .route("/v1/calls", get(calls::list_calls))
        .route_layer(middleware::from_fn_with_state(
            InFlight::new(state.config.max_in_flight),
            shed_over_limit,
        ))
        .route("/readyz", get(ops::readyz))
        .route_layer(middleware::from_fn(record_metrics));
    let mut router = Router::new()
        .merge(api)
        .route("/healthz", get(common::http::healthz));
    // With ADMIN_ADDR set, /metrics is served there (`common::http::bind_admin`), not here.
    if state.config.admin_addr.0.is_none() {
        router = router.route("/metrics", get(auth_http::metrics));
    }
    if state.config.api_docs {
        router = router
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::document(&state.config)));
    }
    let router = router
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.body_limit()))
        .layer(middleware::from_fn_with_state(
            state.config.request_timeout(),
            common::http::time_limit,
        ))
        .with_state(state);
    common::http::with_request_ids(router)
}

/// The API requests being served, against `INGEST_MAX_IN_FLIGHT`.
#[derive(Clone)]
struct InFlight(Arc<Semaphore>);

impl InFlight {
    fn new(limit: usize) -> Self {
        Self(Arc::new(Semaphore::new(limit)))
    }
}

/// Serves a request only while fewer than `INGEST_MAX_IN_FLIGHT` are being served; any more
/// is answered 503 at once, before its body is read, so a flood costs a short answer each
/// rather than memory and the latency of what is accepted.
async fn shed_over_limit(State(in_flight): State<InFlight>, req: Request, next: Next) -> Response {
    let over_cap = req
        .extensions()
        .get::<ConnectInfo<Admission>>()
        .is_some_and(|info| info.0.over_cap);
    if over_cap {
        metrics::counter!("switchboard_ingest_shed_total", "reason" => "connections").increment(1);
        let mut response = ApiError::Overloaded {
            detail: "too many open connections (INGEST_MAX_CONNECTIONS)".into(),
        }
        .into_response();
        // Close it: a connection over the cap lives for one answer.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let Ok(_permit) = in_flight.0.try_acquire() else {
        metrics::counter!("switchboard_ingest_shed_total", "reason" => "in_flight").increment(1);
        return ApiError::Overloaded {
            detail: "too many requests in flight (INGEST_MAX_IN_FLIGHT)".into(),
        }
        .into_response();
    };
    next.run(req).await
}

/// `switchboard_http_requests_total` and `switchboard_http_request_duration_seconds`, by
/// route template (never the raw path, which would explode the label set).
async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let elapsed: Duration = started.elapsed();
    metrics::counter!("switchboard_http_requests_total",
        "route" => route.clone(), "method" => method.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("switchboard_http_request_duration_seconds",
        "route" => route, "method" => method)
    .record(elapsed.as_secs_f64());
    response
}
