//! Moving a call through the states ingest owns: `IN_PROGRESS -> COMPLETED` (completion
//! endpoint and idle reaper) and `FAILED -> COMPLETED` (operator retry). Both end with a work
//! item for the transcriber. Errors are this module's own ([`LifecycleError`]); the routes turn
//! them into HTTP answers (`crate::error`).

use common::{
    CallKey, CallState, Reason,
    calls::{self, Changes, Recorded, TransitionError},
    events::WorkItem,
    outbox::Publisher,
    store::{self, CallRow},
};
use sqlx::PgPool;

/// Why a lifecycle change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no call with id {0:?}")]
    NotFound(CallKey),
    /// The declared `total_packets` is below what was received.
    #[error(
        "total_packets is {total}, but sequence {last} was received (this call counts from \
         {start}, so total_packets must be at least {})", last - start + 1
    )]
    TotalTooSmall { total: i64, last: i64, start: i64 },
    /// A retry of a call that is not `FAILED`.
    #[error("call {call_id:?} is {state}, not FAILED")]
    NotFailed { call_id: CallKey, state: CallState },
    /// No connection could be had (the database is unavailable, whatever the error says).
    #[error("cannot reach the database")]
    Connect(#[source] sqlx::Error),
    #[error(transparent)]
    Store(#[from] TransitionError),
}

impl From<sqlx::Error> for LifecycleError {
    fn from(e: sqlx::Error) -> Self {
        LifecycleError::Store(TransitionError::Database(e))
    }
}

#[derive(Debug)]
pub enum Completion {
    /// This request completed the call; its work item has been handed to JetStream (or, if
    /// NATS is down, to the outbox relay).
    Completed(CallRow),
    /// The call had already left `IN_PROGRESS`: nothing changed, nothing was published.
    AlreadyDone(CallRow),
}

/// `IN_PROGRESS -> COMPLETED`, idempotently, then the work item and the status event. (The
/// idle reaper completes calls in batches of its own, through the same compare-and-set.)
pub async fn complete_call(
    pool: &PgPool,
    publisher: &Publisher,
    call_id: &CallKey,
    total_packets: Option<i64>,
    request_id: Option<&str>,
) -> Result<Completion, LifecycleError> {
    let end = End {
        total_packets,
        reason: Reason::CompletedByPbx,
        error: None,
    };
    complete(pool, publisher, call_id, end, request_id).await
}

/// `IN_PROGRESS -> COMPLETED` at the end of a telephony stream (`crate::media`): `reason` says
/// how it ended, `error` is the PBX's own report of a failure (kept as the call's
/// `last_error`, so its history shows it).
pub async fn complete_stream(
    pool: &PgPool,
    publisher: &Publisher,
    call_id: &CallKey,
    total_packets: i64,
    reason: Reason,
    error: Option<&str>,
) -> Result<Completion, LifecycleError> {
    let end = End {
        total_packets: Some(total_packets),
        reason,
        error: error.map(str::to_owned),
    };
    complete(pool, publisher, call_id, end, None).await
}

/// How a call is completed.
struct End {
    total_packets: Option<i64>,
    reason: Reason,
    error: Option<String>,
}

async fn complete(
    pool: &PgPool,
    publisher: &Publisher,
    call_id: &CallKey,
    end: End,
    request_id: Option<&str>,
) -> Result<Completion, LifecycleError> {
    let End {
        total_packets,
        reason,
        error,
    } = end;
    let mut tx = pool.begin().await.map_err(LifecycleError::Connect)?;
    let call = calls::completion::lock(&mut tx, call_id)
        .await?
        .ok_or_else(|| LifecycleError::NotFound(call_id.clone()))?;
    if call.state != CallState::InProgress {
        tx.rollback().await?;
        return already_done(pool, call_id)
            .await
            .map(Completion::AlreadyDone);
    }
    if let (Some(total), Some(last)) = (total_packets, call.last_sequence) {
        let start = call.sequence_start;
        if start + total - 1 < last {
            return Err(LifecycleError::TotalTooSmall { total, last, start });
        }
    }
    let changes = Changes {
        total_packets,
        last_error: error.map(Some),
        ..Changes::default()
    };
    let recorded = calls::transition(
        &mut tx,
        call_id,
        CallState::InProgress,
        CallState::Completed,
        reason,
        changes,
    )
    .await?
    .expect("the call is locked in IN_PROGRESS");
    tx.commit().await?;
    announce_completed(publisher, &recorded, reason, request_id).await;
    Ok(Completion::Completed(recorded.call))
}

/// `FAILED -> COMPLETED` with the attempt counter reset: the transcriber gets a new work item
/// and the call a fresh round of attempts.
pub async fn retry_call(
    pool: &PgPool,
    publisher: &Publisher,
    call_id: &CallKey,
    request_id: Option<&str>,
) -> Result<CallRow, LifecycleError> {
    let mut tx = pool.begin().await.map_err(LifecycleError::Connect)?;
    let changes = Changes {
        attempts: calls::Attempts::Reset,
        next_attempt_at: Some(None),
        ..Changes::default()
    };
    let reason = Reason::OperatorRetry;
    let recorded = calls::transition(
        &mut tx,
        call_id,
        CallState::Failed,
        CallState::Completed,
        reason,
        changes,
    )
    .await?;
    let Some(recorded) = recorded else {
        tx.rollback().await?;
        let call = already_done(pool, call_id).await?;
        return Err(LifecycleError::NotFailed {
            call_id: call_id.clone(),
            state: call.state,
        });
    };
    tx.commit().await?;
    announce_completed(publisher, &recorded, reason, request_id).await;
    Ok(recorded.call)
}

/// Publishes the work item and the status event of a call that just became `COMPLETED`.
/// What JetStream does not acknowledge now, the outbox relay publishes later. `request_id` is
/// the request that completed it (none for the idle reaper), carried as a NATS header.
pub(crate) async fn announce_completed(
    publisher: &Publisher,
    recorded: &Recorded,
    reason: Reason,
    request_id: Option<&str>,
) {
    let call = &recorded.call;
    tracing::info!(call.id = %call.key, call.version = call.version, %reason, "call completed");
    metrics::counter!("switchboard_ingest_calls_completed_total", "reason" => reason.as_str())
        .increment(1);
    let item = WorkItem {
        tenant: call.key.tenant().clone(),
        call_id: call.key.call_id().clone(),
        version: call.version,
        completed_at: call.completed_at.unwrap_or(call.updated_at),
    };
    tokio::join!(
        publisher.work_item(&item, request_id),
        publisher.recorded(std::slice::from_ref(recorded), request_id)
    );
}

async fn already_done(pool: &PgPool, call_id: &CallKey) -> Result<CallRow, LifecycleError> {
    store::get_call(pool, call_id)
        .await?
        .ok_or_else(|| LifecycleError::NotFound(call_id.clone()))
}
