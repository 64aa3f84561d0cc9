//! # ingest
//!
//! The HTTP API a PBX talks to. It takes audio packets in without ever slowing the PBX
//! down, stores each one durably in Postgres, publishes it to JetStream, tracks every call's
//! state, and hands finished calls to the transcriber.
//!
//! Consumes: HTTP from the PBX. Produces: rows in `calls`, `packets`, `call_transitions`;
//! JetStream messages on `<prefix>.packets.<call_id>`, `<prefix>.calls.completed.<call_id>`
//! and `<prefix>.calls.status.<call_id>`.
//!
//! # Layout
//! - [`config`]: settings (`--help` lists them).
//! - [`routes`]: the HTTP API; [`extract`] and [`error`] give every failure the same shape.
//! - [`writer`]: the batching writer every packet goes through (store, then publish).
//! - [`gaps`]: a call's missing sequences, kept incrementally.
//! - [`keys`]: `ingest keys create|list|revoke` (API keys; `common::auth` checks them).
//! - [`streaming_cap`]: the cap on the calls a tenant streams at once.
//! - [`media`]: the telephony adapters (Twilio Media Streams, AudioSocket, L16 WebSockets).
//! - [`lifecycle`]: completing a call (endpoint, idle reaper and stream ends alike).
//! - [`reaper`]: completes calls that went quiet.
//! - [`relay`]: the outbox relay: republishes what JetStream has not acknowledged.
//! - [`reconciler`]: puts back work items JetStream lost after acknowledging them.
//! - [`compactor`]: turns a final call's packet rows into one compacted audio record.
//! - [`sweeper`]: keeps the time partitions and enforces retention.
//! - [`openapi`]: the OpenAPI document behind `/docs`.
//! - `testing` (feature `testing`): the one test configuration and the one way tests start it.
//!
//! Background tasks started by [`App::run_until_stopped`]: the packet writer, the idle
//! reaper, the outbox relay, the reconciler, the compactor and the sweeper.

pub mod compactor;
pub mod config;
pub mod connections;
pub mod error;
pub mod extract;
pub mod gaps;
pub mod keys;
pub mod lifecycle;
pub mod media;
pub mod openapi;
pub mod reaper;
pub mod reconciler;
pub mod relay;
pub mod routes;
pub mod streaming_cap;
pub mod sweeper;
#[cfg(feature = "testing")]
pub mod testing;
pub mod windows;
pub mod writer;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use common::tasks::{CriticalTasks, TaskHealth};
use common::{
    auth::{Keys, http::Authenticator},
    outbox::Publisher,
    service::{Infrastructure, Service},
};
use futures::FutureExt;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::IngestConfig,
    relay::Relay,
    routes::AppState,
    streaming_cap::StreamingCap,
    writer::{PacketWriter, WriterSettings},
};

/// A built ingest service: connected, migrated, bound, not yet serving.
pub struct App {
    listener: TcpListener,
    /// `ADMIN_ADDR`'s, when set: `/metrics` without a key.
    admin_listener: Option<TcpListener>,
    router: Router,
    state: AppState,
    /// The packet writer task; it ends after the server stops and its queue drains.
    writer_task: JoinHandle<()>,
    /// `AUDIOSOCKET_ADDR`'s, when set.
    audiosocket_listener: Option<TcpListener>,
}

impl App {
    /// Connects to Postgres (creating and migrating the database) and NATS (provisioning
    /// the streams), and binds the listener ([`Infrastructure`]). Fails fast with a message
    /// saying what to fix.
    pub async fn build(config: IngestConfig) -> anyhow::Result<App> {
        config.validate()?;
        let (infra, pool) = Infrastructure::connect_with_postgres(Service {
            name: "ingest",
            common: &config.common,
            addr: config.addr,
            addr_setting: "INGEST_ADDR",
        })
        .await?;
        check_packet_size(&config, &infra.nats)?;
        // Partitions for the calls about to begin exist before the first packet is taken.
        sweeper::add_partitions(&pool, config.sweeper_policy())
            .await
            .context("adding the partitions of packets and call_audio")?;
        let publisher = Publisher::new(infra.js, infra.subjects, pool.clone());
        let (writer, writer_task) = PacketWriter::spawn(
            pool.clone(),
            publisher.clone(),
            WriterSettings {
                max_batch: config.max_batch,
                writers: config.writers,
                sequence_start: config.sequence_start,
                deadline: config.request_deadline(),
            },
        );
        config.auth.warn_if_off("ingest");
        let admin_listener = common::http::bind_admin(config.admin_addr).await?;
        let audiosocket_listener = match config.audiosocket_addr.0 {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding AUDIOSOCKET_ADDR {addr}"))?,
            ),
            None => None,
        };
        let state = AppState {
            auth: Authenticator::new(&config.auth, Keys::new(pool.clone())),
            streaming: StreamingCap::new(pool.clone(), config.max_streaming_calls_per_tenant),
            media: media::MediaStreams::new(CancellationToken::new()),
            // A quarter of the pool: the rest stays for packets, completions and reads.
            playbacks: Arc::new(tokio::sync::Semaphore::new(
                (config.common.database_max_connections / 4).max(1) as usize,
            )),
            pool,
            nats: infra.nats,
            publisher,
            writer,
            config: Arc::new(config),
            tasks: TaskHealth::default(),
        };
        Ok(App {
            router: routes::router(state.clone()),
            listener: infra.listener,
            admin_listener,
            state,
            writer_task,
            audiosocket_listener,
        })
    }

    /// The port AudioSocket is bound to, when it is on.
    pub fn audiosocket_port(&self) -> Option<u16> {
        self.audiosocket_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// The port the API is bound to (useful with `INGEST_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    }

    /// Serves until `shutdown` fires, then stops accepting, finishes in-flight requests,
    /// lets the writer drain its queue and stops the background tasks.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            listener,
            admin_listener,
            router,
            state,
            writer_task,
            audiosocket_listener,
        } = self;
        let config = state.config.clone();
        tracing::info!(
            addr = %listener.local_addr()?,
            prefix = %config.common.prefix,
            "ingest listening"
        );
        // Every background task is critical: one that ends early stops the service.
        let mut tasks = CriticalTasks::new(state.tasks.clone(), shutdown.clone());
        let background = shutdown.child_token();
        tasks.spawn(
            "packet writer",
            writer_task.map(|ended| ended.context("the packet writer panicked")),
        );
        spawn_background(&mut tasks, &state, &background);
        common::http::serve_admin(&mut tasks, admin_listener, &shutdown)?;
        if let Some(listener) = audiosocket_listener {
            tasks.spawn(
                "audiosocket listener",
                media::audiosocket::serve(state.clone(), listener, shutdown.clone()),
            );
        }
        let media = state.media.clone();
        // The router holds the last writer handles besides `state`.
        drop(state);
        let listener = connections::CappedListener::new(listener, config.max_connections);
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<connections::Admission>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
        // Telephony streams outlive the HTTP server (their sockets were upgraded): each stores
        // what it has and completes its call, then lets go of its writer handle.
        media.shutdown().cancel();
        media.wait(MEDIA_SHUTDOWN_WITHIN).await;
        // The server has dropped the router (and its writer handle): the writer finishes
        // what is queued and stops; then the other tasks stop.
        // The writer ends by itself once drained; the relay and reaper when told to.
        background.cancel();
        let tasks_result = tasks.join().await;
        tracing::info!("ingest stopped");
        served.context("serving HTTP")?;
        tasks_result
    }
}

/// The background tasks besides the writer: the idle reaper, the outbox relay, the
/// reconciler, the compactor (unless `AUDIO_COMPACTION=false`) and the sweeper, each stopped
/// by `background`.
fn spawn_background(tasks: &mut CriticalTasks, state: &AppState, background: &CancellationToken) {
    let config = &state.config;
    tasks.spawn(
        "idle reaper",
        reaper::run(
            state.pool.clone(),
            state.publisher.clone(),
            config.call_idle_timeout(),
            background.clone(),
        ),
    );
    tasks.spawn(
        "outbox relay",
        Relay {
            publisher: state.publisher.clone(),
            pool: state.pool.clone(),
            interval: config.outbox_relay_interval(),
            grace: config.outbox_relay_interval(),
        }
        .run(background.clone()),
    );
    tasks.spawn(
        "reconciler",
        reconciler::Reconciler {
            cursor: Default::default(),
            publisher: state.publisher.clone(),
            pool: state.pool.clone(),
            streams: config.common.streams.clone(),
            interval: config.reconcile_interval(),
            grace: config.reconcile_interval().max(RECONCILE_GRACE),
        }
        .run(background.clone()),
    );
    if config.audio_compaction {
        tasks.spawn(
            "compactor",
            compactor::run(
                state.pool.clone(),
                config.audio_retention(),
                background.clone(),
            ),
        );
    } else {
        tracing::warn!("AUDIO_COMPACTION=false: final calls keep their packet rows");
    }
    tasks.spawn(
        "sweeper",
        sweeper::run(
            state.pool.clone(),
            config.sweeper_policy(),
            background.clone(),
        ),
    );
}

/// How long open telephony streams get at shutdown to store what they have.
const MEDIA_SHUTDOWN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Calls changed more recently than this are never taken for lost by the reconciler.
const RECONCILE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Room a packet event needs besides its `data`: the JSON envelope (call id of up to 128
/// characters, numbers, timestamps) and NATS headers, with margin.
const PACKET_EVENT_ENVELOPE: usize = 1024;

/// A packet whose event NATS would refuse could be stored but never published: refuse the
/// configuration instead, naming both settings.
fn check_packet_size(config: &IngestConfig, client: &async_nats::Client) -> anyhow::Result<()> {
    let max_payload = client.server_info().max_payload;
    let needed = config.max_packet_bytes + PACKET_EVENT_ENVELOPE;
    anyhow::ensure!(
        needed <= max_payload,
        "MAX_PACKET_BYTES is {} but the NATS server's max_payload is {max_payload} bytes: a \
         packet's event (its data plus {PACKET_EVENT_ENVELOPE} bytes of envelope) would be \
         refused. Lower MAX_PACKET_BYTES to at most {} or raise max_payload in nats-server's \
         configuration",
        config.max_packet_bytes,
        max_payload.saturating_sub(PACKET_EVENT_ENVELOPE)
    );
    Ok(())
}
