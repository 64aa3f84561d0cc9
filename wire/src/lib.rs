//! # wire
//!
//! The wire contract of Switchboard: what crosses a process boundary, shared by the services
//! and by `pbx`. Call ids and states, NATS subject names and the event payloads published on
//! them, the bodies of the ingest HTTP API, and the live view's WebSocket query and frames.
//!
//! It has no server dependencies (no axum, sqlx or async-nats), so that a client compiles only
//! the contract. Infrastructure (database, NATS connections, HTTP serving) lives in `common`,
//! which re-exports these modules for the services.
//!
//! # Layout
//! - [`call_id`]: the validated call identifier (a NATS subject token) and the call key
//!   (tenant and call id together) that names a call inside Switchboard.
//! - [`tenant`]: tenants (who owns a call) and roles (what a key may do).
//! - [`call_state`]: the call states and the transitions allowed between them.
//! - [`reason`]: why a call moved (the reason of every transition), next to the states.
//! - [`subjects`]: every NATS subject and stream name, derived from `SWITCHBOARD_PREFIX`.
//! - [`events`]: the payloads published on those subjects.
//! - [`api`]: the ingest API's request, response and error bodies.
//! - [`audio`]: a call's audio format, G.711 and the WAV files made of a call's audio.
//! - [`media`]: the telephony protocols (Twilio Media Streams, AudioSocket, L16 WebSockets).
//! - [`live`]: the live view's WebSocket contract (path, query parameters, limits, frames).
//!
//! Feature `openapi` derives `utoipa::ToSchema` for the types the API documents.

pub mod api;
pub mod audio;
pub mod call_id;
pub mod call_state;
pub mod events;
pub mod live;
pub mod media;
pub mod reason;
pub mod subjects;
pub mod tenant;

pub use api::MissingRange;
pub use call_id::{CallId, CallKey};
pub use call_state::CallState;
pub use reason::Reason;
pub use tenant::{Permission, Role, TenantId};
