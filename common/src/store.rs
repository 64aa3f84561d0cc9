//! Reads of calls: one call, a page of them, their history and missing ranges, and the row
//! type every read returns. Every write is in [`crate::calls`].

use sqlx::PgExecutor;
use time::OffsetDateTime;
pub use wire::{MissingRange, api::TransitionRowView};

use crate::{
    CallKey, CallState, Reason, TenantId,
    events::{ERROR_PREVIEW_CHARS, Sentiment, StatusEvent, TRANSCRIPT_PREVIEW_CHARS, preview},
};

/// The columns of [`CallRow`], for `SELECT` and `RETURNING` lists. `missing_packets` is
/// counted, not enumerated: the sequences expected (from `sequence_start` up to the highest
/// received, or to `total_packets` once declared) less those received (packets are unique per
/// sequence). Constant cost, however many gaps the call has.
macro_rules! call_columns_sql {
    () => {
        concat!(
            "call_id, state, version, packets_received, first_sequence, last_sequence, ",
            "total_packets, sequence_start, ai_attempts, transcript, sentiment_label, ",
            "sentiment_score, last_error, created_at, updated_at, last_packet_at, completed_at, ",
            "next_attempt_at, audio_encoding, sample_rate, (GREATEST(COALESCE(last_sequence + 1, sequence_start), ",
            "sequence_start + COALESCE(total_packets, 0)) - sequence_start - packets_received) ",
            "AS missing_packets"
        )
    };
}
pub(crate) use call_columns_sql;

/// A call as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallRow {
    /// The call's key (`<tenant>.<call_id>`, stored as `call_id`).
    #[sqlx(try_from = "String", rename = "call_id")]
    pub key: CallKey,
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
    /// The call's audio format (see [`CallRow::format`]).
    pub audio_encoding: String,
    pub sample_rate: Option<i32>,
}

impl CallRow {
    /// The call's audio format, as its first packet set it.
    pub fn format(&self) -> crate::AudioFormat {
        crate::calls::packets::format_from_columns(&self.audio_encoding, self.sample_rate)
            .unwrap_or_default()
    }

    pub fn sentiment(&self) -> Option<Sentiment> {
        Some(Sentiment {
            label: self.sentiment_label.clone()?,
            score: self.sentiment_score?,
        })
    }

    /// The status event announcing that this row just reached its state.
    /// Long texts are cut to previews (see [`StatusEvent::transcript`]).
    pub fn status_event(&self, previous_state: Option<CallState>, reason: Reason) -> StatusEvent {
        let transcript = self
            .transcript
            .as_deref()
            .map(|t| preview(t, TRANSCRIPT_PREVIEW_CHARS));
        StatusEvent {
            tenant: self.key.tenant().clone(),
            call_id: self.key.call_id().clone(),
            state: self.state,
            previous_state,
            version: self.version,
            at: self.updated_at,
            reason: reason.as_str().to_owned(),
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

pub async fn get_call(
    db: impl PgExecutor<'_>,
    call_id: &CallKey,
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

/// The calls among `ids` that are in `state` now.
pub async fn calls_in_state(
    db: impl PgExecutor<'_>,
    ids: &[String],
    state: CallState,
) -> Result<Vec<CallRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        call_columns_sql!(),
        " FROM calls WHERE call_id = ANY($1) AND state = $2"
    ))
    .bind(ids)
    .bind(state.as_str())
    .fetch_all(db)
    .await
}

/// The first `limit` missing ranges of a call, lowest first: its gaps (kept by ingest's
/// writer in `call_gaps`) and, once `total_packets` is declared, the run after the highest
/// sequence received. An index range scan of at most `limit` rows.
pub async fn missing_ranges(
    db: impl PgExecutor<'_>,
    call_id: &CallKey,
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
    call_id: &CallKey,
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

/// Whether `call` exists, and how many calls its tenant is streaming (counted up to `cap`):
/// what the cap on a tenant's streaming calls needs to know before a call's first packet.
pub async fn streaming_admission(
    db: impl PgExecutor<'_>,
    call: &CallKey,
    cap: i64,
) -> Result<(bool, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM calls WHERE call_id = $1), \
                (SELECT count(*) FROM (SELECT 1 FROM calls WHERE tenant = $2 AND state = $3 \
                 LIMIT $4) AS streaming)",
    )
    .bind(call.as_str())
    .bind(call.tenant().as_str())
    .bind(CallState::InProgress.as_str())
    .bind(cap)
    .fetch_one(db)
    .await
}

/// Where a page of [`list_calls`] starts: after this (created_at, call_id), the call id
/// being the tenant's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: OffsetDateTime,
    pub call_id: String,
}

/// One tenant's calls, newest first, optionally in one state, after `cursor`.
pub async fn list_calls(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    state: Option<CallState>,
    limit: i64,
    cursor: Option<&ListCursor>,
) -> Result<Vec<CallRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        call_columns_sql!(),
        " FROM calls WHERE tenant = $5 AND ($1::text IS NULL OR state = $1) ",
        "AND ($2::timestamptz IS NULL OR (created_at, call_id) < ($2, $5 || '.' || $3)) ",
        "ORDER BY created_at DESC, call_id DESC LIMIT $4"
    ))
    .bind(state.map(CallState::as_str))
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.call_id.as_str()))
    .bind(limit)
    .bind(tenant.as_str())
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(transcript: Option<String>, last_error: Option<String>) -> CallRow {
        let now = OffsetDateTime::now_utc();
        CallRow {
            key: CallKey::try_from("acme.long-call".to_owned()).unwrap(),
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
            audio_encoding: "text".into(),
            sample_rate: None,
        }
    }

    #[test]
    fn a_status_event_stays_small_however_long_the_transcript_and_error() {
        // An hour-long call's transcript and a provider's whole error page.
        let transcript = "ça va très bien, merci ".repeat(20_000);
        let error = "<html>".repeat(100_000);
        let event =
            row(Some(transcript.clone()), Some(error)).status_event(None, Reason::AiSucceeded);
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
        let event = row(Some("thank you".into()), None).status_event(None, Reason::AiSucceeded);
        assert_eq!(event.transcript.as_deref(), Some("thank you"));
        assert_eq!(event.transcript_chars, Some(9));
        assert!(!event.transcript_truncated);
        let none = row(None, None).status_event(None, Reason::FirstPacket);
        assert_eq!((none.transcript, none.transcript_chars), (None, None));
    }
}
