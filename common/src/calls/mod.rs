//! The one owner of writes to `calls` and `call_transitions`. Every statement that changes a
//! call (or locks it to change it) is a function here, with typed arguments; the services call
//! them and spell no SQL against these tables. Reads are in [`crate::store`].
//!
//! - [`transition`](fn@transition) / [`note`]: the compare-and-set between states (or an event
//!   in place), with its history row and status event, in the caller's transaction.
//! - [`packets`]: ingest's writer: lock or create a batch's calls, add packets to counters.
//! - [`completion`]: completing a call (the endpoint, the idle reaper), creations' history.
//! - [`ai`]: the transcriber's columns: claim, lease, attempts, give-up, round.
//! - [`published`]: outbox marks: what JetStream acknowledged, what is still to publish.
//! - [`compaction`]: a final call's packet rows become one `call_audio` record.
//! - [`retention`]: final calls past `CALL_RETENTION_DAYS` deleted with their history.

pub mod ai;
pub mod compaction;
pub mod completion;
pub mod packets;
pub mod published;
pub mod retention;
mod transition;

pub use transition::{
    Attempts, Changes, Recorded, TransitionError, note, record_transitions, transition,
};

/// Reads a state column (its CHECK constraint allows only known states).
pub(crate) fn parse_state(state: &str) -> Result<crate::CallState, sqlx::Error> {
    state.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
