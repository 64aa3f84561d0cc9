//! The one start-up path of every service: what `App::build` of ingest, the transcriber and
//! the notifier have in common. Each service validates its own settings, calls
//! [`Infrastructure::connect`] (or [`Infrastructure::connect_with_postgres`]), then builds
//! what is its own on top.
//!
//! The order is the one that fails fastest with the clearest message: the metrics recorder
//! first (so nothing records into the void), then Postgres (created if missing, migrated),
//! then NATS and the streams, and the listener last.

use std::net::SocketAddr;

use anyhow::Context as _;
use async_nats::jetstream;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{config::CommonConfig, db, nats, subjects::Subjects};

/// What differs between the services' start-ups.
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    /// `ingest`, `transcriber`, `notifier`: the NATS connection is named `switchboard-<name>`.
    pub name: &'static str,
    pub common: &'a CommonConfig,
    /// Where the HTTP endpoints listen, and the setting it comes from (named if the address
    /// cannot be bound).
    pub addr: SocketAddr,
    pub addr_setting: &'static str,
}

/// A service's connections, ready to use: NATS with every stream provisioned, and the bound
/// listener (not yet serving).
#[derive(Debug)]
pub struct Infrastructure {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub listener: TcpListener,
}

impl Infrastructure {
    /// For a service that needs NATS only (the notifier).
    pub async fn connect(service: Service<'_>) -> anyhow::Result<Infrastructure> {
        // Installs the metrics recorder before anything records.
        crate::telemetry::prometheus();
        Self::connect_nats_and_bind(service).await
    }

    /// For a service that keeps state in Postgres (ingest, the transcriber): connects to it
    /// (creating the database if missing) and applies the migrations before NATS.
    pub async fn connect_with_postgres(
        service: Service<'_>,
    ) -> anyhow::Result<(Infrastructure, PgPool)> {
        crate::telemetry::prometheus();
        let pool = postgres(service.common).await?;
        Ok((Self::connect_nats_and_bind(service).await?, pool))
    }

    async fn connect_nats_and_bind(service: Service<'_>) -> anyhow::Result<Infrastructure> {
        let common = service.common;
        let client =
            nats::connect(&common.nats_url, &format!("switchboard-{}", service.name)).await?;
        let js = nats::jetstream(client.clone());
        let subjects = Subjects::new(common.prefix.clone());
        nats::ensure_streams(&js, &subjects, &common.streams)
            .await
            .context("provisioning JetStream streams")?;
        let listener = TcpListener::bind(service.addr).await.with_context(|| {
            format!(
                "cannot listen on {} ({})",
                service.addr, service.addr_setting
            )
        })?;
        Ok(Infrastructure {
            nats: client,
            js,
            subjects,
            listener,
        })
    }
}

/// The Postgres pool of `DATABASE_URL`, the database created if missing and migrated (also
/// what `ingest migrate` does).
pub async fn postgres(common: &CommonConfig) -> anyhow::Result<PgPool> {
    let pool = db::connect(&common.database_url, common.database_max_connections).await?;
    db::migrate(&pool).await?;
    Ok(pool)
}
