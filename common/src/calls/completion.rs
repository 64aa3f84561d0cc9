//! Completing calls: the completion endpoint and the idle reaper lock the calls they complete
//! (the transition itself is [`super::transition`]); and the history rows of calls created by
//! ingest's writer.

use sqlx::PgConnection;

use crate::{
    CallKey, CallState, Reason,
    calls::{Recorded, parse_state, record_transitions},
    store::{CallRow, call_columns_sql},
};

/// What a completion needs to know of a call, under its row lock.
#[derive(Debug, Clone)]
pub struct Completing {
    pub state: CallState,
    pub last_sequence: Option<i64>,
    pub sequence_start: i64,
}

/// Locks one call to complete it. Waits for an in-flight packet batch of the call to commit:
/// every packet accepted before the completion is in the call, every one after it is refused.
pub async fn lock(
    tx: &mut PgConnection,
    call_id: &CallKey,
) -> Result<Option<Completing>, sqlx::Error> {
    let row: Option<(String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT state, last_sequence, sequence_start FROM calls WHERE call_id = $1 \
         FOR NO KEY UPDATE",
    )
    .bind(call_id.as_str())
    .fetch_optional(tx)
    .await?;
    row.map(|(state, last_sequence, sequence_start)| {
        Ok(Completing {
            state: parse_state(&state)?,
            last_sequence,
            sequence_start,
        })
    })
    .transpose()
}

/// Locks up to `limit` calls that have been `IN_PROGRESS` without a packet for longer than
/// `idle`, oldest first, skipping those another transaction holds (`SKIP LOCKED`: several
/// reapers share the work instead of all walking the same calls).
pub async fn lock_idle(
    tx: &mut PgConnection,
    idle: std::time::Duration,
    limit: i64,
) -> Result<Vec<CallKey>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT call_id FROM calls WHERE state = $3 \
         AND last_packet_at < now() - make_interval(secs => $1) \
         ORDER BY last_packet_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(idle.as_secs_f64())
    .bind(limit)
    .bind(CallState::InProgress.as_str())
    .fetch_all(tx)
    .await?;
    ids.into_iter()
        .map(|id| CallKey::try_from(id).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .collect()
}

/// The history rows (and status events) of calls just created, with `reason`.
pub async fn record_creations(
    tx: &mut PgConnection,
    created: &[String],
    reason: Reason,
) -> Result<Vec<Recorded>, sqlx::Error> {
    if created.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<CallRow> = sqlx::query_as(concat!(
        "SELECT ",
        call_columns_sql!(),
        " FROM calls WHERE call_id = ANY($1)"
    ))
    .bind(created)
    .fetch_all(&mut *tx)
    .await?;
    let changed = rows.into_iter().map(|row| (None, row, reason)).collect();
    record_transitions(tx, changed).await
}
