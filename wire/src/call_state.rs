//! The call state machine: the one place that says which states exist and which moves between
//! them are allowed. Every transition is then carried out by `common::calls::transition`, a
//! compare-and-set in Postgres.
//!
//! ```text
//!   (new) ──► IN_PROGRESS ──► COMPLETED ──► PROCESSING_AI ──► ARCHIVED
//!                                 ▲               │
//!                                 └──── FAILED ◄──┘
//!                          (operator retry)   (AI gave up)
//! ```
//! `PROCESSING_AI -> COMPLETED` is not allowed: a retry after a transient AI failure stays in
//! `PROCESSING_AI` and is redelivered by JetStream.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CallState {
    /// Packets are streaming in.
    InProgress,
    /// The PBX (or the idle timeout) ended the call; a work item waits for the transcriber.
    Completed,
    /// A transcriber has claimed the call and is talking to the AI provider.
    ProcessingAi,
    /// Transcript and sentiment are stored. Final.
    Archived,
    /// The AI gave up for good; an operator may retry it.
    Failed,
}

impl CallState {
    pub const ALL: [CallState; 5] = [
        CallState::InProgress,
        CallState::Completed,
        CallState::ProcessingAi,
        CallState::Archived,
        CallState::Failed,
    ];

    /// The state a call is created in by its first packet.
    pub const INITIAL: CallState = CallState::InProgress;

    pub const fn as_str(self) -> &'static str {
        match self {
            CallState::InProgress => "IN_PROGRESS",
            CallState::Completed => "COMPLETED",
            CallState::ProcessingAi => "PROCESSING_AI",
            CallState::Archived => "ARCHIVED",
            CallState::Failed => "FAILED",
        }
    }

    /// The states this one may move to.
    pub const fn next_states(self) -> &'static [CallState] {
        match self {
            CallState::InProgress => &[CallState::Completed],
            CallState::Completed => &[CallState::ProcessingAi],
            CallState::ProcessingAi => &[CallState::Archived, CallState::Failed],
            CallState::Archived => &[],
            CallState::Failed => &[CallState::Completed],
        }
    }

    pub fn can_become(self, to: CallState) -> bool {
        self.next_states().contains(&to)
    }

    /// Checks a move against the state machine.
    pub fn check_transition(self, to: CallState) -> Result<(), IllegalTransition> {
        if self.can_become(to) {
            Ok(())
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a call cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: CallState,
    pub to: CallState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown call state {0:?}; expected one of IN_PROGRESS, COMPLETED, PROCESSING_AI, ARCHIVED, FAILED"
)]
pub struct UnknownState(pub String);

impl FromStr for CallState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CallState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl TryFrom<String> for CallState {
    type Error = UnknownState;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for CallState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::CallState::{self, *};

    const ALLOWED: [(CallState, CallState); 5] = [
        (InProgress, Completed),
        (Completed, ProcessingAi),
        (ProcessingAi, Archived),
        (ProcessingAi, Failed),
        (Failed, Completed),
    ];

    #[test]
    fn every_allowed_transition_is_allowed() {
        for (from, to) in ALLOWED {
            assert!(from.check_transition(to).is_ok(), "{from} -> {to}");
        }
    }

    #[test]
    fn every_other_transition_is_refused() {
        for from in CallState::ALL {
            for to in CallState::ALL {
                if !ALLOWED.contains(&(from, to)) {
                    let err = from.check_transition(to).unwrap_err();
                    assert_eq!((err.from, err.to), (from, to));
                }
            }
        }
    }

    #[test]
    fn archived_is_final() {
        assert!(Archived.next_states().is_empty());
    }

    #[test]
    fn names_round_trip_through_text_and_json() {
        for state in CallState::ALL {
            assert_eq!(state.as_str().parse::<CallState>().unwrap(), state);
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert!("in_progress".parse::<CallState>().is_err());
    }
}
