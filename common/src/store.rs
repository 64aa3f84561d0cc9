//! Reads of calls, and the one compare-and-set that moves a call between states.
//!
//! Every transition goes through [`transition`]: an `UPDATE ... WHERE state = <from>` (so two
//! racing workers cannot both move a call, and no update is lost) followed, in the same
//! transaction, by a row in `call_transitions` that records the change and carries its status
//! event for the [`crate::outbox`].

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
pub use wire::{MissingRange, api::TransitionRowView};

use crate::{
    CallId, CallState,
    call_state::IllegalTransition,
    events::{ERROR_PREVIEW_CHARS, Sentiment, StatusEvent, TRANSCRIPT_PREVIEW_CHARS, preview},
};

/// The columns of [`CallRow`], for `SELECT` and `RETURNING` lists. `missing_packets` is
/// counted, not enumerated: the sequences expected (from `sequence_start` up to the highest
/// received, or to `total_packets` once declared) less those received (packets are unique per
/// sequence). Constant cost, however many gaps the call has.
#[macro_export]
#[doc(hidden)]
macro_rules! call_columns_sql {
    () => {
        concat!(
            "call_id, state, version, packets_received, first_sequence, last_sequence, ",
            "total_packets, sequence_start, ai_attempts, transcript, sentiment_label, ",
            "sentiment_score, last_error, created_at, updated_at, last_packet_at, completed_at, ",
            "next_attempt_at, (GREATEST(COALESCE(last_sequence + 1, sequence_start), ",
            "sequence_start + COALESCE(total_packets, 0)) - sequence_start - packets_received) ",
            "AS missing_packets"
        )
    };
}

/// A call as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallRow {
    #[sqlx(try_from = "String")]
    pub call_id: CallId,
    #[sqlx(try_from = "String")]
    pub state: CallState,
    pub version: i64,
    pub packets_received: i64,
    pub first_sequence: Option<i64>,
    pub last_sequence: Option<i64>,
    pub total_packets: Option<i64>,
    /// The first sequence number of the call's numbering (`SEQUENCE_START` when it began).
    pub sequence_start: i64,
    pub missing_packets: i64,
    pub ai_attempts: i32,
    pub transcript: Option<String>,
    pub sentiment_label: Option<String>,
    pub sentiment_score: Option<f64>,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub last_packet_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl CallRow {
    pub fn sentiment(&self) -> Option<Sentiment> {
        Some(Sentiment {
            label: self.sentiment_label.clone()?,
            score: self.sentiment_score?,
        })
    }

    /// The status event announcing that this row just reached its state.
    /// Long texts are cut to previews (see [`StatusEvent::transcript`]).
    pub fn status_event(&self, previous_state: Option<CallState>, reason: &str) -> StatusEvent {
        let transcript = self
            .transcript
            .as_deref()
            .map(|t| preview(t, TRANSCRIPT_PREVIEW_CHARS));
        StatusEvent {
            call_id: self.call_id.clone(),
            state: self.state,
            previous_state,
            version: self.version,
            at: self.updated_at,
            reason: reason.to_owned(),
            packets_received: self.packets_received,
            missing_packets: self.missing_packets,
            ai_attempts: self.ai_attempts,
            last_error: self
                .last_error
                .as_deref()
                .map(|e| preview(e, ERROR_PREVIEW_CHARS).0),
            transcript_chars: self.transcript.as_deref().map(|t| t.chars().count() as i64),
            transcript_truncated: transcript.as_ref().is_some_and(|(_, cut)| *cut),
            transcript: transcript.map(|(t, _)| t),
            sentiment: self.sentiment(),
            next_attempt_at: self.next_attempt_at,
        }
    }
}

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
    call_id: &CallId,
    from: CallState,
    to: CallState,
    reason: &str,
    changes: Changes,
) -> Result<Option<Recorded>, TransitionError> {
    from.check_transition(to)?;
    Ok(apply(conn, call_id, from, to, reason, changes).await?)
}

/// Records a change that keeps the call in `state` (e.g. a retry scheduled while
/// `PROCESSING_AI`) as an event in its history with its own status event and `version`, so
/// that consumers see it and never take it for a stale one. `None` if the call is not in
/// `state`.
pub async fn note(
    conn: &mut PgConnection,
    call_id: &CallId,
    state: CallState,
    reason: &str,
    changes: Changes,
) -> Result<Option<Recorded>, sqlx::Error> {
    apply(conn, call_id, state, state, reason, changes).await
}

async fn apply(
    conn: &mut PgConnection,
    call_id: &CallId,
    from: CallState,
    to: CallState,
    reason: &str,
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
    changed: Vec<(Option<CallState>, CallRow, &str)>,
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
        ids.push(call.call_id.to_string());
        versions.push(call.version);
        froms.push(from.map(|s| s.as_str()));
        tos.push(call.state.as_str());
        reasons.push(reason.to_owned());
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
            .find(|r| r.call.version == version && r.call.call_id.as_str() == call_id)
        {
            r.transition_id = id;
        }
    }
    Ok(recorded)
}

pub async fn get_call(
    db: impl PgExecutor<'_>,
    call_id: &CallId,
) -> Result<Option<CallRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        call_columns_sql!(),
        " FROM calls WHERE call_id = $1"
    ))
    .bind(call_id.as_str())
    .fetch_optional(db)
    .await
}

/// The first `limit` missing ranges of a call, lowest first: its gaps (kept by ingest's
/// writer in `call_gaps`) and, once `total_packets` is declared, the run after the highest
/// sequence received. An index range scan of at most `limit` rows.
pub async fn missing_ranges(
    db: impl PgExecutor<'_>,
    call_id: &CallId,
    limit: i64,
) -> Result<Vec<MissingRange>, sqlx::Error> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "(SELECT first_missing, last_missing FROM call_gaps WHERE call_id = $1 \
          ORDER BY first_missing LIMIT $2) \
         UNION ALL \
         (SELECT COALESCE(last_sequence + 1, sequence_start), sequence_start + total_packets - 1 \
          FROM calls WHERE call_id = $1 AND total_packets IS NOT NULL \
            AND sequence_start + total_packets - 1 >= COALESCE(last_sequence + 1, sequence_start)) \
         ORDER BY 1 LIMIT $2",
    )
    .bind(call_id.as_str())
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(from, to)| MissingRange { from, to })
        .collect())
}

/// A call's history, oldest first, as the API shows it.
pub async fn history(
    db: impl PgExecutor<'_>,
    call_id: &CallId,
) -> Result<Vec<TransitionRowView>, sqlx::Error> {
    let rows: Vec<(i64, Option<String>, String, String, OffsetDateTime)> = sqlx::query_as(
        "SELECT version, from_state, to_state, reason, at FROM call_transitions \
         WHERE call_id = $1 ORDER BY version",
    )
    .bind(call_id.as_str())
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(version, from_state, to_state, reason, at)| TransitionRowView {
                version,
                from_state,
                to_state,
                reason,
                at,
            },
        )
        .collect())
}

/// Where a page of [`list_calls`] starts: after this (created_at, call_id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: OffsetDateTime,
    pub call_id: String,
}

/// Calls newest first, optionally in one state, after `cursor`.
pub async fn list_calls(
    db: impl PgExecutor<'_>,
    state: Option<CallState>,
    limit: i64,
    cursor: Option<&ListCursor>,
) -> Result<Vec<CallRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        call_columns_sql!(),
        " FROM calls WHERE ($1::text IS NULL OR state = $1) ",
        "AND ($2::timestamptz IS NULL OR (created_at, call_id) < ($2, $3)) ",
        "ORDER BY created_at DESC, call_id DESC LIMIT $4"
    ))
    .bind(state.map(CallState::as_str))
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.call_id.as_str()))
    .bind(limit)
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(transcript: Option<String>, last_error: Option<String>) -> CallRow {
        let now = OffsetDateTime::now_utc();
        CallRow {
            call_id: CallId::parse("long-call").unwrap(),
            state: CallState::Archived,
            version: 5,
            packets_received: 180_000,
            first_sequence: Some(0),
            last_sequence: Some(179_999),
            total_packets: None,
            sequence_start: 0,
            missing_packets: 0,
            ai_attempts: 1,
            transcript,
            sentiment_label: Some("neutral".into()),
            sentiment_score: Some(0.0),
            last_error,
            created_at: now,
            updated_at: now,
            last_packet_at: now,
            completed_at: Some(now),
            next_attempt_at: None,
        }
    }

    #[test]
    fn a_status_event_stays_small_however_long_the_transcript_and_error() {
        // An hour-long call's transcript and a provider's whole error page.
        let transcript = "ça va très bien, merci ".repeat(20_000);
        let error = "<html>".repeat(100_000);
        let event = row(Some(transcript.clone()), Some(error)).status_event(None, "ai_succeeded");
        let size = serde_json::to_vec(&event).unwrap().len();
        assert!(size < 4096, "a status event of {size} bytes");
        assert!(transcript.starts_with(event.transcript.as_deref().unwrap()));
        assert_eq!(
            event.transcript.unwrap().chars().count(),
            TRANSCRIPT_PREVIEW_CHARS
        );
        assert_eq!(
            event.transcript_chars,
            Some(transcript.chars().count() as i64)
        );
        assert!(event.transcript_truncated);
        assert_eq!(
            event.last_error.unwrap().chars().count(),
            ERROR_PREVIEW_CHARS
        );
    }

    #[test]
    fn a_short_transcript_is_carried_whole() {
        let event = row(Some("thank you".into()), None).status_event(None, "ai_succeeded");
        assert_eq!(event.transcript.as_deref(), Some("thank you"));
        assert_eq!(event.transcript_chars, Some(9));
        assert!(!event.transcript_truncated);
        let none = row(None, None).status_event(None, "first_packet");
        assert_eq!((none.transcript, none.transcript_chars), (None, None));
    }
}
