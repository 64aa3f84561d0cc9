//! The transcriber's side of a call in Postgres: claiming it, holding it while the AI works,
//! and recording how each attempt ended. Every write to the call goes through `common::calls`
//! (the compare-and-set, the lease and attempt columns); the attempts table is this module's.
//!
//! Who holds a call is a lease (`calls.ai_lease_until`): set at the claim, renewed with every
//! progress acknowledgement, cleared when the attempt ends. A second delivery of the same work
//! (a duplicate message, or a redelivery racing a slow worker) finds the lease and waits
//! instead of sending a second AI request; a dead worker's lease simply expires, and the
//! redelivery takes the call over.
//!
//! A claim also refuses what is not this delivery's to do: a retry before its
//! `next_attempt_at` (a duplicate, or an early redelivery) waits for it, and a work item of an
//! earlier round (the call was re-driven since: its latest `COMPLETED` transition has a higher
//! version) is dropped, so that each round's attempts and dead letter are its own.

use std::{ops::ControlFlow, time::Duration};

use common::{
    CallState, Reason,
    calls::{
        self, Attempts, Changes, Recorded, TransitionError,
        ai::{ClaimView, GiveUp},
    },
    events::{Sentiment, WorkItem},
};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

use crate::providers::CallAudio;

/// The reason of the `FAILED` transition of each kind of give-up.
pub fn failed_reason(why: GiveUp) -> Reason {
    match why {
        GiveUp::Exhausted => Reason::AiGaveUp,
        GiveUp::Permanent => Reason::AiPermanentError,
        GiveUp::AudioTooLarge => Reason::AudioTooLarge,
    }
}

#[derive(Debug)]
pub enum Claim {
    /// Ours: this is attempt `attempt`. `recorded` is the `COMPLETED -> PROCESSING_AI`
    /// transition when this claim made it (its status event is still to publish).
    Claimed {
        attempt: i32,
        recorded: Option<Box<Recorded>>,
    },
    /// Already `ARCHIVED` or `FAILED` (or not finished streaming): a duplicate, skip it.
    Skip(CallState),
    /// The work item belongs to an earlier round of the call (it was re-driven since, and
    /// `round` is the current round's version): never to be worked on, drop it.
    Stale { round: i64 },
    /// Another worker holds the call; look again after this long.
    Busy { retry_in: Duration },
    /// The call waits for a retry that is due only in `due_in` (this is a duplicate, or a
    /// redelivery that came early): look again then, so no attempt starts before its time.
    NotYetDue { due_in: Duration },
    /// No attempts left, or an earlier give-up did not finish: give up now. This delivery
    /// holds the call (lease) as if it were attempt `attempts`.
    Exhausted {
        attempts: i32,
        last_error: String,
        why: GiveUp,
    },
    /// No such call.
    Unknown,
}

/// The transcriber's handle on calls in Postgres.
#[derive(Clone)]
pub struct Claims {
    pool: PgPool,
    /// Names this process in the attempts table (`<hostname>-<pid>`).
    worker: String,
    /// How long a claim holds without renewal (the consumer's ack wait).
    lease: Duration,
    /// `TRANSCRIBE_MAX_ATTEMPTS`.
    max_attempts: i32,
}

impl Claims {
    pub fn new(pool: PgPool, lease: Duration, max_attempts: i32) -> Self {
        Claims {
            pool,
            worker: worker_name(),
            lease,
            max_attempts,
        }
    }

    /// Attempts a round may make before the call is given up on.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    pub async fn claim(&self, item: &WorkItem) -> Result<Claim, TransitionError> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = calls::ai::lock_for_claim(&mut tx, &item.key()).await? else {
            return Ok(Claim::Unknown);
        };
        let state = row.state;
        if matches!(
            state,
            CallState::Archived | CallState::Failed | CallState::InProgress
        ) {
            return Ok(Claim::Skip(state));
        }
        if let Some(round) = row.round.filter(|round| item.version < *round) {
            return Ok(Claim::Stale { round });
        }
        let (attempt, recorded) = if state == CallState::Completed {
            let recorded = start_round(&mut tx, item).await?;
            (recorded.call.ai_attempts, Some(Box::new(recorded)))
        } else {
            match self.next_attempt(&mut tx, item, row).await? {
                ControlFlow::Continue(attempt) => (attempt, None),
                ControlFlow::Break(answer) => {
                    tx.commit().await?;
                    return Ok(answer);
                }
            }
        };
        self.hold(&mut tx, item).await?;
        sqlx::query(
            "INSERT INTO transcription_attempts (call_id, work_version, attempt, worker) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (call_id, work_version, attempt) DO UPDATE SET worker = $4, \
                started_at = now(), finished_at = NULL, outcome = NULL, error = NULL, \
                next_attempt_at = NULL",
        )
        .bind(item.key().as_str())
        .bind(item.version)
        .bind(attempt)
        .bind(&self.worker)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Claim::Claimed { attempt, recorded })
    }

    /// For a call already `PROCESSING_AI` (between attempts, or a dead worker's): the number
    /// of the next attempt, counted; or why there is none now.
    async fn next_attempt(
        &self,
        tx: &mut PgConnection,
        item: &WorkItem,
        row: ClaimView,
    ) -> Result<ControlFlow<Claim, i32>, sqlx::Error> {
        if let Some(left) = row.lease_left {
            // A little past the lease, so the next look finds it expired.
            let retry_in = left + Duration::from_millis(250);
            return Ok(ControlFlow::Break(Claim::Busy { retry_in }));
        }
        let give_up = row.give_up;
        if give_up.is_some() || row.ai_attempts >= self.max_attempts {
            // Take the lease so that no other delivery starts on it meanwhile.
            self.hold(tx, item).await?;
            return Ok(ControlFlow::Break(Claim::Exhausted {
                attempts: row.ai_attempts,
                last_error: row
                    .last_error
                    .unwrap_or_else(|| "attempts exhausted".into()),
                why: give_up.unwrap_or(GiveUp::Exhausted),
            }));
        }
        if let Some(due_in) = row.due_in {
            return Ok(ControlFlow::Break(Claim::NotYetDue { due_in }));
        }
        let attempt = calls::ai::count_attempt(tx, &item.key()).await?;
        Ok(ControlFlow::Continue(attempt))
    }

    /// Sets the lease: this delivery holds the call for `lease` from now.
    async fn hold(&self, tx: &mut PgConnection, item: &WorkItem) -> Result<(), sqlx::Error> {
        calls::ai::hold(tx, &item.key(), self.lease).await
    }

    /// The size of the call's stored packet data, in bytes, measured without reading it
    /// (`common::audio::size_bytes`: packet rows or compacted record alike). A call being
    /// transcribed takes no more packets, so the size does not change before it is loaded.
    pub async fn audio_bytes(&self, item: &WorkItem) -> Result<i64, sqlx::Error> {
        common::audio::size_bytes(&self.pool, item.key().as_str()).await
    }

    /// The call's packets in order, how many it should have and where its numbering starts,
    /// from its packet rows or its compacted record (one statement, so one snapshot); `None`
    /// if its audio was compacted and has since expired (`AUDIO_RETENTION_DAYS`).
    pub async fn load_audio(&self, item: &WorkItem) -> Result<Option<CallAudio>, sqlx::Error> {
        let recording = common::audio::load(&self.pool, item.key().as_str())
            .await?
            .unwrap_or_default();
        if recording.expired {
            return Ok(None);
        }
        Ok(Some(CallAudio {
            call_id: item.call_id.to_string(),
            format: recording.format,
            packets: recording.packets,
            expected: recording.expected,
            start: recording.start,
        }))
    }

    /// Extends the lease while the AI works on attempt `attempt` (and only while that
    /// attempt still owns the call).
    pub async fn renew(&self, item: &WorkItem, attempt: i32) -> Result<(), sqlx::Error> {
        calls::ai::renew(&self.pool, &item.key(), attempt, self.lease).await
    }

    /// Records, before the dead letter goes out, that this call is being given up on, so a
    /// redelivery finishes the give-up instead of calling the AI again.
    pub async fn mark_give_up(
        &self,
        item: &WorkItem,
        attempt: i32,
        error: &str,
        why: GiveUp,
    ) -> Result<(), FinishError> {
        let marked =
            calls::ai::mark_give_up(&self.pool, &item.key(), attempt, why, &storable(error))
                .await?;
        if !marked {
            return Err(FinishError::LeaseLost);
        }
        Ok(())
    }

    /// `PROCESSING_AI -> ARCHIVED` with the results.
    pub async fn archive(
        &self,
        item: &WorkItem,
        attempt: i32,
        transcript: String,
        sentiment: Sentiment,
    ) -> Result<Option<Recorded>, FinishError> {
        let changes = Changes {
            transcript: Some(storable(&transcript)),
            sentiment: Some(sentiment),
            last_error: Some(None),
            next_attempt_at: Some(None),
            ..Changes::default()
        };
        let end = End {
            outcome: "succeeded",
            error: None,
            next_attempt_at: None,
        };
        self.finish(item, attempt, end, Reason::AiSucceeded, changes)
            .await
    }

    /// Stays `PROCESSING_AI`, with the error and when the next attempt is due.
    pub async fn schedule_retry(
        &self,
        item: &WorkItem,
        attempt: i32,
        error: &str,
        delay: Duration,
    ) -> Result<Option<Recorded>, FinishError> {
        let next = OffsetDateTime::now_utc() + delay;
        let error = storable(error);
        let error = error.as_str();
        let changes = Changes {
            last_error: Some(Some(error.to_owned())),
            next_attempt_at: Some(Some(next)),
            ..Changes::default()
        };
        let end = End {
            outcome: "retry",
            error: Some(error),
            next_attempt_at: Some(next),
        };
        self.finish(item, attempt, end, Reason::AiRetryScheduled, changes)
            .await
    }

    /// `PROCESSING_AI -> FAILED` with the last error, the reason saying why.
    pub async fn fail(
        &self,
        item: &WorkItem,
        attempt: i32,
        error: &str,
        why: GiveUp,
    ) -> Result<Option<Recorded>, FinishError> {
        let error = storable(error);
        let error = error.as_str();
        let changes = Changes {
            last_error: Some(Some(error.to_owned())),
            next_attempt_at: Some(None),
            ..Changes::default()
        };
        let reason = failed_reason(why);
        let end = End {
            outcome: "failed",
            error: Some(error),
            next_attempt_at: None,
        };
        self.finish(item, attempt, end, reason, changes).await
    }

    /// Hands an unfinished attempt back (shutdown): it does not count, the lease is cleared
    /// so the redelivery can start at once.
    pub async fn abandon(&self, item: &WorkItem, attempt: i32) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let handed_back = calls::ai::hand_back(&mut tx, &item.key(), attempt).await?;
        if !handed_back {
            // Another worker owns the call now: leave it alone.
            return Ok(());
        }
        let end = End {
            outcome: "abandoned",
            error: None,
            next_attempt_at: None,
        };
        end_attempt(&mut tx, item, attempt, &end).await?;
        tx.commit().await
    }

    /// Lets the next delivery at the call at once when this attempt stopped short of ending it
    /// (a give-up whose dead letter or `FAILED` could not be written): the attempt stays
    /// counted and the give-up mark stays, so the next delivery finishes the give-up.
    pub async fn release(&self, item: &WorkItem, attempt: i32) -> Result<(), FinishError> {
        let released = calls::ai::release(&self.pool, &item.key(), attempt).await?;
        if !released {
            return Err(FinishError::LeaseLost);
        }
        Ok(())
    }

    /// Moves the call from `PROCESSING_AI` to where `reason` leads (or records an event in
    /// place when that is `PROCESSING_AI`), closes the attempt and releases the lease, in one
    /// transaction.
    async fn finish(
        &self,
        item: &WorkItem,
        attempt: i32,
        end: End<'_>,
        reason: Reason,
        changes: Changes,
    ) -> Result<Option<Recorded>, FinishError> {
        let mut tx = self.pool.begin().await?;
        let (from, to) = (CallState::ProcessingAi, reason.leads_to());
        // Fencing: only the attempt that owns the call may end it. A worker whose lease ran
        // out while another took the call over must not touch it.
        if !calls::ai::lock_if_owned(&mut tx, &item.key(), attempt).await? {
            return Err(FinishError::LeaseLost);
        }
        let recorded = if to == from {
            calls::note(&mut tx, &item.key(), from, reason, changes).await?
        } else {
            calls::transition(&mut tx, &item.key(), from, to, reason, changes).await?
        };
        calls::ai::end_hold(&mut tx, &item.key()).await?;
        end_attempt(&mut tx, item, attempt, &end).await?;
        tx.commit().await?;
        Ok(recorded)
    }
}

/// `COMPLETED -> PROCESSING_AI`, attempts + 1: the first attempt of a round.
async fn start_round(tx: &mut PgConnection, item: &WorkItem) -> Result<Recorded, TransitionError> {
    let changes = Changes {
        attempts: Attempts::Increment,
        next_attempt_at: Some(None),
        ..Changes::default()
    };
    let recorded = calls::transition(
        tx,
        &item.key(),
        CallState::Completed,
        CallState::ProcessingAi,
        Reason::AiClaimed,
        changes,
    )
    .await?
    .expect("the row is locked in COMPLETED");
    Ok(recorded)
}

/// How an attempt ended, for its row in `transcription_attempts`.
struct End<'a> {
    outcome: &'static str,
    error: Option<&'a str>,
    next_attempt_at: Option<OffsetDateTime>,
}

async fn end_attempt(
    tx: &mut PgConnection,
    item: &WorkItem,
    attempt: i32,
    end: &End<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE transcription_attempts SET finished_at = now(), outcome = $4, error = $5, \
             next_attempt_at = $6 \
         WHERE call_id = $1 AND work_version = $2 AND attempt = $3",
    )
    .bind(item.key().as_str())
    .bind(item.version)
    .bind(attempt)
    .bind(end.outcome)
    .bind(end.error)
    .bind(end.next_attempt_at)
    .execute(tx)
    .await?;
    Ok(())
}

/// Why an attempt could not be closed.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    /// Another worker took the call over (this one's lease ran out): leave it alone.
    #[error("another worker owns the call now")]
    LeaseLost,
    #[error(transparent)]
    Store(#[from] TransitionError),
}

impl From<sqlx::Error> for FinishError {
    fn from(e: sqlx::Error) -> Self {
        FinishError::Store(TransitionError::Database(e))
    }
}

/// Text as Postgres takes it: provider answers may contain NUL characters, which `TEXT`
/// refuses, and which would otherwise fail every attempt to record the answer.
fn storable(text: &str) -> String {
    text.replace('\0', "")
}

/// `<hostname>-<pid>`: names this process in the attempts table.
fn worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "transcriber".into());
    format!("{host}-{}", std::process::id())
}
