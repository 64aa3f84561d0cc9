//! # common
//!
//! The building blocks every Switchboard service shares, so that each concept has exactly one
//! home: the call state machine, the subject and stream names, the event payloads, the error
//! body, the database schema and the way events leave the database for JetStream.
//!
//! # Layout
//! - [`call_id`]: the validated call identifier (it becomes a NATS subject token).
//! - [`call_state`]: the call states and the transitions allowed between them.
//! - [`config`]: settings shared by all services (environment variables first).
//! - [`telemetry`]: tracing subscriber (text or JSON) and the Prometheus recorder.
//! - [`service`]: the start-up every service shares (Postgres, NATS, streams, listener).
//! - [`shutdown`]: a root cancellation token fired by SIGTERM / ctrl-c.
//! - [`db`]: the Postgres pool and the one embedded [`db::MIGRATOR`].
//! - [`store`]: reads of calls and the one compare-and-set that moves a call between states.
//! - [`subjects`]: every NATS subject and stream name, derived from `SWITCHBOARD_PREFIX`.
//! - [`events`]: the payloads published on those subjects.
//! - [`nats`]: connecting, stream provisioning, and acknowledged publishing.
//! - [`outbox`]: publishes the events the database has recorded, now and after outages.
//! - [`tasks`]: critical background tasks, watched: one ending takes the service down.
//! - [`http`]: the error body, request ids, health/readiness/metrics routes and graceful
//!   serving.
//! - [`live`]: the live view's WebSocket contract (path, query parameters, limits).
//! - [`tls`]: the rustls crypto provider for outgoing HTTPS.
//! - `testing` (feature `testing`): a throwaway database and NATS prefix per test.

pub mod call_id;
pub mod call_state;
pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod live;
pub mod nats;
pub mod outbox;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod subjects;
pub mod tasks;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use call_id::CallId;
pub use call_state::CallState;
