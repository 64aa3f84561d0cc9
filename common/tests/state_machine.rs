//! Property tests of the call state machine as Postgres carries it out
//! (`common::calls::transition`), against a model of a few lines: for any sequence of moves,
//! each attempted by a caller who believes the call is in some state (often wrongly, as a
//! stale worker does), the call ends where the model says, its version counts the moves that
//! happened, and its history is one unbroken chain. Two callers racing from the same state
//! never both win.

use common::{
    CallKey, CallState, Reason,
    calls::{self, Changes, TransitionError},
    testing::{TestEnv, random_suffix},
};
use proptest::prelude::*;
use sqlx::PgPool;

/// One attempted move: from the state the caller believes the call is in, to another.
#[derive(Debug, Clone, Copy)]
enum Move {
    To {
        believed: CallState,
        to: CallState,
    },
    /// A retry scheduled while `PROCESSING_AI`: a version of its own, no change of state.
    NoteRetry {
        believed: CallState,
    },
}

fn state() -> impl Strategy<Value = CallState> {
    prop::sample::select(CallState::ALL.to_vec())
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let one = prop_oneof![
        4 => (state(), state()).prop_map(|(believed, to)| Move::To { believed, to }),
        1 => state().prop_map(|believed| Move::NoteRetry { believed }),
    ];
    prop::collection::vec(one, 1..24)
}

/// The reason a caller gives for moving to `to` (any one that leads there).
fn reason_for(to: CallState) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| r.leads_to() == to)
        .expect("every state has a reason leading to it")
}

/// The model: the state and version a call has after a move.
fn model(state: CallState, version: i64, m: Move) -> (CallState, i64) {
    match m {
        Move::To { believed, to } if believed == state && state.can_become(to) => (to, version + 1),
        Move::NoteRetry { believed } if believed == state && state == CallState::ProcessingAi => {
            (state, version + 1)
        }
        _ => (state, version),
    }
}

async fn create(pool: &PgPool) -> CallKey {
    let id = CallKey::try_from(format!("t.sm-{}", random_suffix())).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let new = calls::packets::NewCall {
        call_id: id.as_str(),
        sequence_start: 0,
        format: common::AudioFormat::TEXT,
    };
    let created = calls::packets::create(&mut tx, &[new]).await.unwrap();
    calls::completion::record_creations(&mut tx, &created, Reason::FirstPacket)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Applies one move in its own transaction; whether it changed the call.
async fn apply(pool: &PgPool, id: &CallKey, m: Move) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let changed = match m {
        Move::To { believed, to } => {
            let reason = reason_for(to);
            let result =
                calls::transition(&mut tx, id, believed, to, reason, Changes::default()).await;
            match result {
                Ok(recorded) => recorded.is_some(),
                Err(TransitionError::Illegal(_)) => {
                    assert!(!believed.can_become(to), "{believed} -> {to} refused");
                    false
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        Move::NoteRetry { believed } if believed == CallState::ProcessingAi => {
            let reason = Reason::AiRetryScheduled;
            calls::note(&mut tx, id, believed, reason, Changes::default())
                .await
                .unwrap()
                .is_some()
        }
        // A note is only ever made in PROCESSING_AI.
        Move::NoteRetry { .. } => false,
    };
    tx.commit().await.unwrap();
    changed
}

/// The call is in `state` at `version`, and its history is versions 1..=version, each row
/// starting where the one before ended, with only moves the machine allows.
async fn check_history(pool: &PgPool, id: &CallKey, state: CallState, version: i64) {
    let (db_state, db_version): (String, i64) =
        sqlx::query_as("SELECT state, version FROM calls WHERE call_id = $1")
            .bind(id.as_str())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(db_state, state.as_str());
    assert_eq!(db_version, version);
    let history: Vec<(i64, Option<String>, String)> = sqlx::query_as(
        "SELECT version, from_state, to_state FROM call_transitions \
         WHERE call_id = $1 ORDER BY version",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(history.len() as i64, version, "one history row per version");
    let mut previous: Option<String> = None;
    for (i, (v, from, to)) in history.iter().enumerate() {
        assert_eq!(*v, i as i64 + 1, "versions count up from 1");
        assert_eq!(from, &previous, "each row starts where the last ended");
        let to: CallState = to.parse().unwrap();
        if let Some(from) = from {
            let from: CallState = from.parse().unwrap();
            assert!(
                from == to || from.can_become(to),
                "{from} -> {to} in the history"
            );
        }
        previous = Some(to.as_str().to_owned());
    }
    assert_eq!(previous.as_deref(), Some(state.as_str()));
}

#[test]
fn any_sequence_of_moves_ends_where_the_model_says_with_an_unbroken_history() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(TestEnv::new());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&moves(), |moves| {
            rt.block_on(async {
                let id = create(&env.pool).await;
                let (mut state, mut version) = (CallState::INITIAL, 1);
                for m in moves {
                    let changed = apply(&env.pool, &id, m).await;
                    let (next, next_version) = model(state, version, m);
                    assert_eq!(changed, next_version != version, "{m:?} from {state}");
                    (state, version) = (next, next_version);
                }
                check_history(&env.pool, &id, state, version).await;
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn two_callers_racing_from_the_same_state_never_both_win() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(TestEnv::new());
    // (the state both start from, where each wants the call, the version after the race)
    let races = [
        (
            CallState::InProgress,
            CallState::Completed,
            CallState::Completed,
            2,
        ),
        (
            CallState::Completed,
            CallState::ProcessingAi,
            CallState::ProcessingAi,
            3,
        ),
        (
            CallState::ProcessingAi,
            CallState::Archived,
            CallState::Failed,
            4,
        ),
        (
            CallState::ProcessingAi,
            CallState::Archived,
            CallState::Archived,
            4,
        ),
    ];
    rt.block_on(async {
        for (from, a, b, version) in races {
            for _ in 0..20 {
                let id = create(&env.pool).await;
                // Walk the call to `from` along the machine's own moves.
                let mut state = CallState::InProgress;
                for to in [CallState::Completed, CallState::ProcessingAi] {
                    if state == from {
                        break;
                    }
                    let believed = state;
                    assert!(apply(&env.pool, &id, Move::To { believed, to }).await);
                    state = to;
                }
                let (won_a, won_b) = tokio::join!(
                    apply(
                        &env.pool,
                        &id,
                        Move::To {
                            believed: from,
                            to: a
                        }
                    ),
                    apply(
                        &env.pool,
                        &id,
                        Move::To {
                            believed: from,
                            to: b
                        }
                    ),
                );
                assert!(won_a ^ won_b, "{from} -> {a} | {b}: exactly one wins");
                check_history(&env.pool, &id, if won_a { a } else { b }, version).await;
            }
        }
    });
}
