//! Moving a call through the states ingest owns: `IN_PROGRESS -> COMPLETED` (completion
//! endpoint and idle reaper) and `FAILED -> COMPLETED` (operator retry). Both end with a work
//! item for the transcriber.

use common::{
    CallId, CallState,
    events::WorkItem,
    outbox::Publisher,
    store::{self, CallRow, Changes},
};

use crate::error::ApiError;

/// Why a call was completed, recorded in its history and status event.
pub const COMPLETED_BY_PBX: &str = "completed_by_pbx";
pub const IDLE_TIMEOUT: &str = "idle_timeout";
pub const OPERATOR_RETRY: &str = "operator_retry";

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
    publisher: &Publisher,
    call_id: &CallId,
    total_packets: Option<i64>,
    reason: &str,
) -> Result<Completion, ApiError> {
    let mut tx = publisher
        .pool
        .begin()
        .await
        .map_err(ApiError::database_connect)?;
    // Waits for an in-flight packet batch of this call to commit: every packet accepted
    // before the completion is in the call, every one after it gets 409.
    let current: Option<(String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT state, last_sequence, sequence_start FROM calls WHERE call_id = $1 \
         FOR NO KEY UPDATE",
    )
    .bind(call_id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::database)?;
    let Some((state, last_sequence, start)) = current else {
        return Err(ApiError::CallNotFound(call_id.clone()));
    };
    if state != CallState::InProgress.as_str() {
        tx.rollback().await.map_err(ApiError::database)?;
        return already_done(publisher, call_id).await;
    }
    if let (Some(total), Some(last)) = (total_packets, last_sequence)
        && start + total - 1 < last
    {
        return Err(ApiError::invalid_field(
            "total_packets",
            format!(
                "total_packets is {total}, but sequence {last} was received \
                 (this call counts from {start}, so total_packets must be at least {})",
                last - start + 1
            ),
        ));
    }
    let changes = Changes {
        total_packets,
        ..Changes::default()
    };
    let recorded = store::transition(
        &mut tx,
        call_id,
        CallState::InProgress,
        CallState::Completed,
        reason,
        changes,
    )
    .await
    .map_err(ApiError::from)?;
    let Some(recorded) = recorded else {
        // Unreachable while we hold the row lock, but never report a change we did not make.
        tx.rollback().await.map_err(ApiError::database)?;
        return already_done(publisher, call_id).await;
    };
    tx.commit().await.map_err(ApiError::database)?;

    announce_completed(publisher, &recorded, reason).await;
    Ok(Completion::Completed(recorded.call))
}

/// `FAILED -> COMPLETED` with the attempt counter reset: the transcriber gets a new work item
/// and the call a fresh round of attempts. `Err(state)` if the call is not `FAILED`.
pub async fn retry_call(
    publisher: &Publisher,
    call_id: &CallId,
) -> Result<Result<CallRow, CallState>, ApiError> {
    let mut tx = publisher
        .pool
        .begin()
        .await
        .map_err(ApiError::database_connect)?;
    let changes = Changes {
        attempts: store::Attempts::Reset,
        next_attempt_at: Some(None),
        ..Changes::default()
    };
    let recorded = store::transition(
        &mut tx,
        call_id,
        CallState::Failed,
        CallState::Completed,
        OPERATOR_RETRY,
        changes,
    )
    .await
    .map_err(ApiError::from)?;
    let Some(recorded) = recorded else {
        tx.rollback().await.map_err(ApiError::database)?;
        return match already_done(publisher, call_id).await? {
            Completion::AlreadyDone(row) | Completion::Completed(row) => Ok(Err(row.state)),
        };
    };
    tx.commit().await.map_err(ApiError::database)?;
    announce_completed(publisher, &recorded, OPERATOR_RETRY).await;
    Ok(Ok(recorded.call))
}

/// Publishes the work item and the status event of a call that just became `COMPLETED`.
/// What JetStream does not acknowledge now, the outbox relay publishes later.
pub(crate) async fn announce_completed(
    publisher: &Publisher,
    recorded: &store::Recorded,
    reason: &str,
) {
    let call = &recorded.call;
    tracing::info!(call.id = %call.call_id, call.version = call.version, reason, "call completed");
    metrics::counter!("switchboard_ingest_calls_completed_total", "reason" => reason.to_owned())
        .increment(1);
    let item = WorkItem {
        call_id: call.call_id.clone(),
        version: call.version,
        completed_at: call.completed_at.unwrap_or(call.updated_at),
    };
    tokio::join!(
        publisher.work_item(&item),
        publisher.recorded(std::slice::from_ref(recorded))
    );
}

async fn already_done(publisher: &Publisher, call_id: &CallId) -> Result<Completion, ApiError> {
    store::get_call(&publisher.pool, call_id)
        .await
        .map_err(ApiError::database)?
        .map(Completion::AlreadyDone)
        .ok_or_else(|| ApiError::CallNotFound(call_id.clone()))
}
