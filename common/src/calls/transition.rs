//! The compare-and-set that moves a call between states, and the history row (with its
//! status event) written in the same transaction.
//!
//! Every transition goes through [`transition`]: an `UPDATE ... WHERE state = <from>` (so two
//! racing workers cannot both move a call, and no update is lost) followed, in the same
//! transaction, by a row in `call_transitions` that records the change and carries its status
//! event for the outbox.

use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::{
    CallKey, CallState, Reason,
    call_state::IllegalTransition,
    events::{Sentiment, StatusEvent},
    store::{CallRow, call_columns_sql},
};

/// A recorded transition: the call after it, and its status event waiting in the outbox.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub call: CallRow,
    /// Row id in `call_transitions`, used to mark the event published.
    pub transition_id: i64,
    pub event: StatusEvent,
}

/// What else changes on the call row with a transition.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Set `total_packets` (completion).
    pub total_packets: Option<i64>,
    pub attempts: Attempts,
    /// `None` keeps `last_error`; `Some(None)` clears it; `Some(Some(e))` sets it.
    pub last_error: Option<Option<String>>,
    pub transcript: Option<String>,
    pub sentiment: Option<Sentiment>,
    /// `None` keeps `next_attempt_at`; `Some(None)` clears it; `Some(Some(t))` sets it.
    pub next_attempt_at: Option<Option<OffsetDateTime>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Attempts {
    #[default]
    Keep,
    Increment,
    Reset,
}

#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("database error during a call transition")]
    Database(#[from] sqlx::Error),
}

/// Moves `call_id` from `from` to `to` if, and only if, it is in `from` now; records the
/// transition and its status event. Returns `None` when the call is not in `from` (or does
/// not exist): somebody else moved it first.
///
/// Run it inside a transaction and publish the returned event after the commit.
pub async fn transition(
    conn: &mut PgConnection,
    call_id: &CallKey,
    from: CallState,
    to: CallState,
    reason: Reason,
    changes: Changes,
) -> Result<Option<Recorded>, TransitionError> {
    from.check_transition(to)?;
    debug_assert_eq!(reason.leads_to(), to, "{reason} does not lead to {to}");
    Ok(apply(conn, call_id, from, to, reason, changes).await?)
}

/// Records a change that keeps the call in `state` (e.g. a retry scheduled while
/// `PROCESSING_AI`) as an event in its history with its own status event and `version`, so
/// that consumers see it and never take it for a stale one. `None` if the call is not in
/// `state`.
pub async fn note(
    conn: &mut PgConnection,
    call_id: &CallKey,
    state: CallState,
    reason: Reason,
    changes: Changes,
) -> Result<Option<Recorded>, sqlx::Error> {
    apply(conn, call_id, state, state, reason, changes).await
}

async fn apply(
    conn: &mut PgConnection,
    call_id: &CallKey,
    from: CallState,
    to: CallState,
    reason: Reason,
    changes: Changes,
) -> Result<Option<Recorded>, sqlx::Error> {
    let attempts = match changes.attempts {
        Attempts::Keep => "keep",
        Attempts::Increment => "increment",
        Attempts::Reset => "reset",
    };
    let (set_error, error) = match changes.last_error {
        None => (false, None),
        Some(e) => (true, e),
    };
    let (set_next, next_attempt_at) = match changes.next_attempt_at {
        None => (false, None),
        Some(t) => (true, t),
    };
    let (label, score) = match changes.sentiment {
        Some(s) => (Some(s.label), Some(s.score)),
        None => (None, None),
    };
    let row: Option<CallRow> = sqlx::query_as(concat!(
        "UPDATE calls SET state = $3, version = version + 1, updated_at = now(), ",
        "completed_at = CASE WHEN $3 = 'COMPLETED' THEN now() ELSE completed_at END, ",
        "work_item_published_at = CASE WHEN $3 = 'COMPLETED' THEN NULL ELSE work_item_published_at END, ",
        "total_packets = COALESCE($4, total_packets), ",
        "ai_attempts = CASE $5 WHEN 'increment' THEN ai_attempts + 1 WHEN 'reset' THEN 0 ELSE ai_attempts END, ",
        "last_error = CASE WHEN $6 THEN $7 ELSE last_error END, ",
        "transcript = COALESCE($8, transcript), ",
        "sentiment_label = COALESCE($9, sentiment_label), ",
        "sentiment_score = COALESCE($10, sentiment_score), ",
        "next_attempt_at = CASE WHEN $11 THEN $12 ELSE next_attempt_at END ",
        "WHERE call_id = $1 AND state = $2 RETURNING ",
        call_columns_sql!()
    ))
    .bind(call_id.as_str())
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(changes.total_packets)
    .bind(attempts)
    .bind(set_error)
    .bind(error)
    .bind(changes.transcript)
    .bind(label)
    .bind(score)
    .bind(set_next)
    .bind(next_attempt_at)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(call) = row else {
        return Ok(None);
    };
    let mut recorded = record_transitions(conn, vec![(Some(from), call, reason)]).await?;
    Ok(recorded.pop())
}

/// Writes one `call_transitions` row per call that has just reached its current state, in
/// one statement. Also used for creations (`previous_state` `None`).
pub async fn record_transitions(
    conn: &mut PgConnection,
    changed: Vec<(Option<CallState>, CallRow, Reason)>,
) -> Result<Vec<Recorded>, sqlx::Error> {
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(changed.len());
    let mut versions = Vec::with_capacity(changed.len());
    let mut froms = Vec::with_capacity(changed.len());
    let mut tos = Vec::with_capacity(changed.len());
    let mut reasons = Vec::with_capacity(changed.len());
    let mut payloads = Vec::with_capacity(changed.len());
    let mut recorded = Vec::with_capacity(changed.len());
    for (from, call, reason) in changed {
        let event = call.status_event(from, reason);
        ids.push(call.key.to_string());
        versions.push(call.version);
        froms.push(from.map(|s| s.as_str()));
        tos.push(call.state.as_str());
        reasons.push(reason.as_str());
        payloads.push(serde_json::to_string(&event).expect("a status event always serializes"));
        recorded.push(Recorded {
            call,
            transition_id: 0,
            event,
        });
    }
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "INSERT INTO call_transitions (call_id, version, from_state, to_state, reason, event) \
         SELECT c, v, f, t, r, e::jsonb \
         FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[]) \
              AS u(c, v, f, t, r, e) \
         RETURNING id, call_id, version",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&froms)
    .bind(&tos)
    .bind(&reasons)
    .bind(&payloads)
    .fetch_all(&mut *conn)
    .await?;
    for (id, call_id, version) in rows {
        if let Some(r) = recorded
            .iter_mut()
            .find(|r| r.call.version == version && r.call.key.as_str() == call_id)
        {
            r.transition_id = id;
        }
    }
    Ok(recorded)
}
