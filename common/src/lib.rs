//! # common
//!
//! The building blocks every Switchboard service shares, so that each concept has exactly one
//! home: the database schema, the way events leave the database for JetStream, NATS, HTTP
//! serving, configuration and telemetry. The wire contract (call ids, states, subjects, event
//! payloads, API bodies, live frames) lives in the `wire` crate, which clients such as `pbx`
//! use without the server stack; its modules are re-exported here so the services name them
//! as `common::events`, `common::CallState`, and so on.
//!
//! # Layout
//! - [`call_id`], [`call_state`], [`reason`], [`subjects`], [`events`], [`live`]: re-exported
//!   from `wire`.
//! - [`auth`]: API keys, tokens, tenants' principals, and the 401/403/429 answers.
//! - [`config`]: settings shared by all services (environment variables first).
//! - [`telemetry`]: tracing subscriber (text or JSON) and the Prometheus recorder.
//! - [`service`]: the start-up every service shares (Postgres, NATS, streams, listener).
//! - [`shutdown`]: a root cancellation token fired by SIGTERM / ctrl-c.
//! - [`db`]: the Postgres pool and the one embedded [`db::MIGRATOR`].
//! - [`store`]: reads of calls.
//! - [`audio`]: a call's stored audio, read from its packet rows or its compacted record, and
//!   its WAV rendering; [`sound`] (from `wire`): formats and codecs.
//! - [`partitions`]: the time partitions of `packets` and `call_audio`: added ahead, retired.
//! - [`calls`]: every write to `calls` and `call_transitions` (the one owner), among them the
//!   compare-and-set that moves a call between states.
//! - [`nats`]: connecting, stream provisioning, and acknowledged publishing.
//! - [`outbox`]: publishes the events the database has recorded, now and after outages.
//! - [`tasks`]: critical background tasks, watched: one ending takes the service down.
//! - [`http`]: the error body as a response, request ids, health/readiness/metrics routes and
//!   graceful serving.
//! - [`tls`]: the rustls crypto provider for outgoing HTTPS.
//! - `testing` (feature `testing`): a throwaway database and NATS prefix per test.

pub mod audio;
pub mod auth;
pub mod calls;
pub mod config;
pub mod db;
pub mod http;
pub mod nats;
pub mod outbox;
pub mod partitions;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod tasks;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

/// A call's audio format and its codecs (G.711, WAV), from `wire`: named `sound` here because
/// [`audio`] is the stored audio.
pub use wire::audio as sound;
pub use wire::audio::{AudioFormat, Encoding};
pub use wire::{
    CallId, CallKey, CallState, Permission, Reason, Role, TenantId, call_id, call_state, events,
    live, reason, subjects, tenant,
};
