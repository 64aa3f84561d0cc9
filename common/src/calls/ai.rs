//! The transcriber's columns on a call: who holds it (`ai_lease_until`), which attempt owns it
//! (`ai_attempts`, the fencing token), when the next one is due (`next_attempt_at`) and
//! whether it is being given up on (`ai_give_up`). Every write that ends or extends an attempt
//! is fenced: it applies only while the call is `PROCESSING_AI` with the attempt's number.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::{CallKey, CallState, calls::parse_state};

/// Why a call is given up on: the value of `calls.ai_give_up`, recorded from the decision
/// until the call is `FAILED`, so that a redelivery finishes the give-up the same way without
/// asking the AI again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Retryable failures until no attempts were left.
    Exhausted,
    /// The provider refused the call for good.
    Permanent,
    /// The call's stored audio is larger than the transcriber may send: it was never loaded.
    AudioTooLarge,
}

impl GiveUp {
    /// Its value in `calls.ai_give_up`.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Exhausted => "exhausted",
            GiveUp::Permanent => "permanent",
            GiveUp::AudioTooLarge => "audio_too_large",
        }
    }

    /// The decision recorded in `calls.ai_give_up`, if any (its CHECK allows only our values).
    fn from_column(value: Option<&str>) -> Option<GiveUp> {
        match value? {
            "permanent" => Some(GiveUp::Permanent),
            "audio_too_large" => Some(GiveUp::AudioTooLarge),
            _ => Some(GiveUp::Exhausted),
        }
    }

    /// Whether no retry could help (a dead letter's `permanent`).
    pub fn permanent(self) -> bool {
        self != GiveUp::Exhausted
    }
}

/// What a claim reads of a call, under its row lock.
#[derive(Debug, Clone)]
pub struct ClaimView {
    pub state: CallState,
    pub ai_attempts: i32,
    /// How long the current holder's lease still runs, if it does.
    pub lease_left: Option<Duration>,
    /// How long until `next_attempt_at`, if a retry is scheduled in the future.
    pub due_in: Option<Duration>,
    pub last_error: Option<String>,
    pub give_up: Option<GiveUp>,
    /// The current round: the call's version when it last became `COMPLETED` (a work item's
    /// `version`).
    pub round: Option<i64>,
}

/// Locks a call to claim it.
pub async fn lock_for_claim(
    tx: &mut PgConnection,
    call_id: &CallKey,
) -> Result<Option<ClaimView>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        state: String,
        ai_attempts: i32,
        lease_left_ms: Option<f64>,
        due_in_ms: Option<f64>,
        last_error: Option<String>,
        ai_give_up: Option<String>,
        round: Option<i64>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT state, ai_attempts, \
            (EXTRACT(EPOCH FROM (ai_lease_until - now())) * 1000)::float8 AS lease_left_ms, \
            (EXTRACT(EPOCH FROM (next_attempt_at - now())) * 1000)::float8 AS due_in_ms, \
            last_error, ai_give_up, \
            (SELECT max(t.version) FROM call_transitions t \
             WHERE t.call_id = calls.call_id AND t.to_state = $2) AS round \
         FROM calls WHERE call_id = $1 FOR UPDATE",
    )
    .bind(call_id.as_str())
    .bind(CallState::Completed.as_str())
    .fetch_optional(tx)
    .await?;
    let positive = |ms: Option<f64>| {
        ms.filter(|ms| *ms > 0.0)
            .map(|ms| Duration::from_millis(ms.ceil() as u64))
    };
    row.map(|row| {
        Ok(ClaimView {
            state: parse_state(&row.state)?,
            ai_attempts: row.ai_attempts,
            lease_left: positive(row.lease_left_ms),
            due_in: positive(row.due_in_ms),
            last_error: row.last_error,
            give_up: GiveUp::from_column(row.ai_give_up.as_deref()),
            round: row.round,
        })
    })
    .transpose()
}

/// Holds the (locked) call for `lease` from now.
pub async fn hold(
    tx: &mut PgConnection,
    call_id: &CallKey,
    lease: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET ai_lease_until = now() + make_interval(secs => $2) WHERE call_id = $1",
    )
    .bind(call_id.as_str())
    .bind(lease.as_secs_f64())
    .execute(tx)
    .await?;
    Ok(())
}

/// Counts the next attempt of a (locked) `PROCESSING_AI` call and clears its due time;
/// returns the attempt's number.
pub async fn count_attempt(tx: &mut PgConnection, call_id: &CallKey) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE calls SET ai_attempts = ai_attempts + 1, next_attempt_at = NULL \
         WHERE call_id = $1 RETURNING ai_attempts",
    )
    .bind(call_id.as_str())
    .fetch_one(tx)
    .await
}

/// Extends the lease of `attempt` (only while that attempt owns the call).
pub async fn renew(
    pool: &PgPool,
    call_id: &CallKey,
    attempt: i32,
    lease: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET ai_lease_until = now() + make_interval(secs => $2) \
         WHERE call_id = $1 AND state = $3 AND ai_attempts = $4",
    )
    .bind(call_id.as_str())
    .bind(lease.as_secs_f64())
    .bind(CallState::ProcessingAi.as_str())
    .bind(attempt)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the decision to give up, with the error, if `attempt` still owns the call.
/// Returns whether it did.
pub async fn mark_give_up(
    pool: &PgPool,
    call_id: &CallKey,
    attempt: i32,
    why: GiveUp,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let marked = sqlx::query(
        "UPDATE calls SET ai_give_up = $4, last_error = $5 \
         WHERE call_id = $1 AND state = $2 AND ai_attempts = $3",
    )
    .bind(call_id.as_str())
    .bind(CallState::ProcessingAi.as_str())
    .bind(attempt)
    .bind(why.as_str())
    .bind(error)
    .execute(pool)
    .await?;
    Ok(marked.rows_affected() > 0)
}

/// Clears the lease of `attempt` (it stays counted), if it still owns the call. Returns
/// whether it did.
pub async fn release(pool: &PgPool, call_id: &CallKey, attempt: i32) -> Result<bool, sqlx::Error> {
    let released = sqlx::query(
        "UPDATE calls SET ai_lease_until = NULL \
         WHERE call_id = $1 AND state = $2 AND ai_attempts = $3",
    )
    .bind(call_id.as_str())
    .bind(CallState::ProcessingAi.as_str())
    .bind(attempt)
    .execute(pool)
    .await?;
    Ok(released.rows_affected() > 0)
}

/// Hands `attempt` back uncounted, with the lease cleared, if it still owns the call.
/// Returns whether it did.
pub async fn hand_back(
    tx: &mut PgConnection,
    call_id: &CallKey,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let handed_back = sqlx::query(
        "UPDATE calls SET ai_attempts = GREATEST(ai_attempts - 1, 0), ai_lease_until = NULL \
         WHERE call_id = $1 AND state = $2 AND ai_attempts = $3",
    )
    .bind(call_id.as_str())
    .bind(CallState::ProcessingAi.as_str())
    .bind(attempt)
    .execute(tx)
    .await?;
    Ok(handed_back.rows_affected() > 0)
}

/// Locks the call and says whether `attempt` owns it (`PROCESSING_AI` with that attempt
/// number): the fence before an attempt ends it.
pub async fn lock_if_owned(
    tx: &mut PgConnection,
    call_id: &CallKey,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let owner: Option<(String, i32)> =
        sqlx::query_as("SELECT state, ai_attempts FROM calls WHERE call_id = $1 FOR UPDATE")
            .bind(call_id.as_str())
            .fetch_optional(tx)
            .await?;
    Ok(owner.is_some_and(|(state, attempts)| {
        state == CallState::ProcessingAi.as_str() && attempts == attempt
    }))
}

/// After an attempt ended (in the same transaction): the lease is cleared, and a give-up
/// mark too once the call has left `PROCESSING_AI`.
pub async fn end_hold(tx: &mut PgConnection, call_id: &CallKey) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET ai_lease_until = NULL, \
                ai_give_up = CASE WHEN state = $2 THEN ai_give_up END \
         WHERE call_id = $1",
    )
    .bind(call_id.as_str())
    .bind(CallState::ProcessingAi.as_str())
    .execute(tx)
    .await?;
    Ok(())
}
