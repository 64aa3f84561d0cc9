//! The outbox marks on calls and their history: which status events and work items JetStream
//! has acknowledged, and which are still to publish.

use std::time::Duration;

use sqlx::{PgPool, types::Json};
use time::OffsetDateTime;

use crate::{
    CallKey, CallState,
    events::{StatusEvent, WorkItem},
};

/// Marks these `call_transitions` rows' status events as acknowledged.
pub async fn mark_statuses(pool: &PgPool, transition_ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE call_transitions SET published_at = now() WHERE id = ANY($1)")
        .bind(transition_ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Status events older than `grace` that JetStream has not acknowledged, oldest first, with
/// their `call_transitions` row ids.
pub async fn unpublished_statuses(
    pool: &PgPool,
    grace: Duration,
    limit: i64,
) -> Result<Vec<(i64, StatusEvent)>, sqlx::Error> {
    let rows: Vec<(i64, Json<StatusEvent>)> = sqlx::query_as(
        "SELECT id, event FROM call_transitions \
         WHERE published_at IS NULL AND at < now() - make_interval(secs => $1) \
         ORDER BY id LIMIT $2",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, event)| (id, event.0)).collect())
}

/// Marks a work item acknowledged, if the call is still in the round it was published for.
pub async fn mark_work_item(pool: &PgPool, item: &WorkItem) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET work_item_published_at = now() \
         WHERE call_id = $1 AND version = $2 AND state = $3",
    )
    .bind(item.key().as_str())
    .bind(item.version)
    .bind(CallState::Completed.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Work items of `COMPLETED` calls that JetStream has not acknowledged, older than `grace`.
pub async fn unpublished_work_items(
    pool: &PgPool,
    grace: Duration,
    limit: i64,
) -> Result<Vec<WorkItem>, sqlx::Error> {
    // The state is spelled out (not bound) so that the planner can use the partial index
    // `calls_work_item_unpublished`, which has the same predicate.
    let rows: Vec<(String, i64, OffsetDateTime)> = sqlx::query_as(
        "SELECT call_id, version, COALESCE(completed_at, updated_at) FROM calls \
         WHERE state = 'COMPLETED' AND work_item_published_at IS NULL \
           AND updated_at < now() - make_interval(secs => $1) \
         ORDER BY updated_at LIMIT $2",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    work_items(rows)
}

/// Calls that should have a live work item in the work stream and may have lost it (the
/// stream was deleted or purged): `COMPLETED` with the item published, or `PROCESSING_AI`
/// with no worker's lease and no retry still to come; untouched for `grace`. In
/// `(updated_at, call_id)` order from just after `after` (the last one of the previous
/// page), so that passes walk past a backlog instead of looking at its head every time.
/// Each comes with the work item of its current round (to look for in the stream) and its
/// place in that order.
pub async fn work_item_candidates(
    pool: &PgPool,
    grace: Duration,
    after: Option<&(OffsetDateTime, String)>,
    limit: i64,
) -> Result<Vec<(WorkItem, (OffsetDateTime, String))>, sqlx::Error> {
    let rows: Vec<(String, i64, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
        "SELECT c.call_id, \
                CASE WHEN c.state = 'COMPLETED' THEN c.version ELSE \
                    (SELECT max(t.version) FROM call_transitions t \
                     WHERE t.call_id = c.call_id AND t.to_state = 'COMPLETED') END, \
                COALESCE(c.completed_at, c.updated_at), c.updated_at \
         FROM calls c \
         WHERE ((c.state = 'COMPLETED' AND c.work_item_published_at IS NOT NULL) \
             OR (c.state = 'PROCESSING_AI' AND (c.ai_lease_until IS NULL OR c.ai_lease_until < now()) \
                 AND (c.next_attempt_at IS NULL OR c.next_attempt_at < now()))) \
           AND c.updated_at < now() - make_interval(secs => $1) \
           AND ($3::timestamptz IS NULL OR (c.updated_at, c.call_id) > ($3, $4)) \
         ORDER BY c.updated_at, c.call_id LIMIT $2",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .bind(after.map(|(at, _)| *at))
    .bind(after.map(|(_, id)| id.as_str()))
    .fetch_all(pool)
    .await?;
    let places: Vec<(OffsetDateTime, String)> = rows
        .iter()
        .map(|(id, _, _, updated_at)| (*updated_at, id.clone()))
        .collect();
    let items = work_items(rows.into_iter().map(|(id, v, at, _)| (id, v, at)).collect())?;
    Ok(items.into_iter().zip(places).collect())
}

/// Work items from `(call_id, version, completed_at)` rows.
fn work_items(rows: Vec<(String, i64, OffsetDateTime)>) -> Result<Vec<WorkItem>, sqlx::Error> {
    rows.into_iter()
        .map(|(call_id, version, completed_at)| {
            let key = CallKey::try_from(call_id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok(WorkItem {
                tenant: key.tenant().clone(),
                call_id: key.call_id().clone(),
                version,
                completed_at,
            })
        })
        .collect()
}
