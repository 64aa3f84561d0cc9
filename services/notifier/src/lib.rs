//! # notifier
//!
//! The supervisors' live view. Follows every call's status events through one JetStream
//! subscription per process and fans them out to WebSockets and the dashboard page.
//!
//! Consumes: `<prefix>.calls.status.*`, through an ordered consumer on `<PREFIX>_STATUS` (which
//! keeps each call's latest events for `STATUS_RETENTION_SECS`). Produces: WebSocket frames.
//! Several replicas behind a load balancer all work: each reads the same stream, and stream
//! sequence numbers (what clients resume from) are the same everywhere.
//!
//! # Layout
//! - [`config`]: settings (`--help` lists them).
//! - [`hub`]: the subscription, the latest state of every call, recent events, fan-out.
//! - [`ws`]: one task per socket: snapshot / resume, filters, pings, slow clients.
//! - [`dashboard`]: the self-contained supervisor page served at `/`.
//! - [`calls`]: one call in full for the dashboard's detail view, from ingest's read API.
//! - [`session`]: `POST /v1/auth/token`, a supervisor's key exchanged for a short-lived token.
//! - [`origins`]: which browser pages may open the live view (`ALLOWED_ORIGINS`).
//!
//! Every route but the page itself and health needs a `supervisor` or `admin` key (or a
//! token minted from one), checked against Postgres (`common::auth`); a socket sees only its
//! tenant's calls.
//! - `testing` (feature `testing`): the one test configuration and the one way tests start it.

pub mod calls;
pub mod config;
pub mod dashboard;
pub mod hub;
pub mod origins;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
pub mod ws;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Router,
    extract::{FromRef, State},
    middleware,
    response::Response,
    routing::{get, post},
};
use common::{
    auth::{Keys, http::Authenticator},
    http,
    service::{Infrastructure, Service},
    subjects::Subjects,
    tasks::{CriticalTasks, TaskHealth},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::NotifierConfig, hub::Hub};

/// What the routes and socket tasks share.
#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub nats: async_nats::Client,
    /// Socket tasks, so shutdown can wait for their close frames (axum does not track
    /// upgraded connections).
    pub sockets: TaskTracker,
    /// The root shutdown token; every socket watches it.
    pub shutdown: CancellationToken,
    pub ping_interval: Duration,
    pub send_timeout: Duration,
    /// `STATUS_RETENTION_SECS`: how long a call stays in view.
    pub retention: Duration,
    /// Whether the followers are running (`/readyz`).
    pub tasks: TaskHealth,
    /// `NOTIFIER_INGEST_URL`, without a trailing slash, and the client that asks it.
    pub ingest_url: Arc<str>,
    pub http: reqwest::Client,
    /// Keys and tokens, roles and per-key rates.
    pub auth: Authenticator,
    pub origins: origins::AllowedOrigins,
    /// `AUTH_TOKEN_TTL_SECS`.
    pub token_ttl: Duration,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// A built notifier: connected, bound, not yet following or serving.
pub struct App {
    listener: TcpListener,
    config: NotifierConfig,
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    hub: Arc<Hub>,
    pool: sqlx::PgPool,
    /// `ADMIN_ADDR`'s, when set: `/metrics` without a key.
    admin_listener: Option<TcpListener>,
}

impl App {
    /// Connects to Postgres (where keys are checked) and NATS ([`Infrastructure`]) and binds
    /// the listener. Fails fast with a message saying what to fix.
    pub async fn build(config: NotifierConfig) -> anyhow::Result<App> {
        config.validate()?;
        // The detail view's client may speak HTTPS to ingest.
        common::tls::install_crypto_provider();
        let (infra, pool) = Infrastructure::connect_with_postgres(Service {
            name: "notifier",
            common: &config.common,
            addr: config.addr,
            addr_setting: "NOTIFIER_ADDR",
        })
        .await?;
        let hub = Hub::new(config.client_queue, config.replay_events);
        config.auth.warn_if_off("notifier");
        let admin_listener = http::bind_admin(config.admin_addr).await?;
        Ok(App {
            admin_listener,
            pool,
            listener: infra.listener,
            config,
            js: infra.js,
            client: infra.nats,
            subjects: infra.subjects,
            hub,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("bound").port()
    }

    /// How many status events the hub has applied so far ([`Hub::watch_applied`]): tests wait
    /// on it before connecting, so that a snapshot holds what they published.
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hub.watch_applied()
    }

    /// Follows the status stream and serves until `shutdown`; then every socket gets a close
    /// frame (1001) and the process waits up to `NOTIFIER_SHUTDOWN_GRACE_SECS` for them.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            listener,
            config,
            js,
            client,
            subjects,
            hub,
            pool,
            admin_listener,
        } = self;
        // Without its followers the notifier would serve a frozen view: they are critical.
        let health = TaskHealth::default();
        let mut tasks = CriticalTasks::new(health.clone(), shutdown.clone());
        tasks.spawn(
            "status follower",
            hub.clone().follow(
                js,
                subjects.clone(),
                config.common.streams.status_retention(),
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            "progress follower",
            hub.clone()
                .follow_progress(client.clone(), subjects, shutdown.clone()),
        );
        let state = AppState {
            hub,
            nats: client,
            sockets: TaskTracker::new(),
            shutdown: shutdown.clone(),
            ping_interval: config.ping_interval(),
            send_timeout: config.send_timeout(),
            retention: config.common.streams.status_retention(),
            tasks: health,
            ingest_url: config.ingest_url.trim_end_matches('/').into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("building the HTTP client")?,
            auth: Authenticator::new(&config.auth, Keys::new(pool)),
            origins: config.allowed_origins.clone(),
            token_ttl: config.token_ttl(),
        };
        http::serve_admin(&mut tasks, admin_listener, &shutdown)?;
        let sockets = state.sockets.clone();
        let router = http::with_request_ids(router(state, &config));
        tracing::info!(addr = %listener.local_addr()?, "notifier listening");
        let served = http::serve(listener, router, shutdown.clone()).await;
        sockets.close();
        if tokio::time::timeout(config.shutdown_grace(), sockets.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sockets = sockets.len(),
                "sockets still open after the grace period"
            );
        }
        let tasks_result = tasks.join().await;
        tracing::info!("notifier stopped");
        served.context("serving HTTP")?;
        tasks_result
    }
}

/// The notifier's routes: the page and its two files, the live view, the token exchange,
/// the detail view's read, health, and `/metrics` unless `ADMIN_ADDR` serves it; every answer
/// bounded in time and carrying the security headers.
fn router(state: AppState, config: &NotifierConfig) -> Router {
    let mut router = Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::stylesheet))
        .route(common::live::WS_PATH, get(ws::upgrade))
        .route("/v1/auth/token", post(session::token))
        .route("/v1/call/{call_id}", get(calls::get_call))
        .route("/v1/call/{call_id}/audio.wav", get(calls::get_audio))
        .route("/readyz", get(readyz))
        .route("/healthz", get(http::healthz));
    if config.admin_addr.0.is_none() {
        router = router.route("/metrics", get(common::auth::http::metrics));
    }
    router
        .layer(middleware::from_fn_with_state(
            config.request_timeout(),
            http::time_limit,
        ))
        .layer(middleware::from_fn(dashboard::security_headers))
        .with_state(state)
}

/// Ready when NATS is connected and the hub has caught up with the status stream.
async fn readyz(State(state): State<AppState>) -> Response {
    let hub = if state.hub.is_ready() {
        Ok(())
    } else {
        Err("still reading the status stream".to_owned())
    };
    http::readiness(vec![
        http::check_nats(&state.nats),
        http::Check::new("status_stream", hub),
        state.tasks.check(),
    ])
}
