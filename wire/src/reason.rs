//! Why a call moved: the `reason` of every transition (and in-state event) in a call's history
//! and status events. One enum, next to the state machine, so that no reason is a bare string
//! spelled in some service.

use std::fmt;

use crate::CallState;

/// The reason recorded with a transition or an in-state event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The first packet created the call (`IN_PROGRESS`).
    FirstPacket,
    /// The PBX completed the call (`POST /v1/call/{id}/complete`).
    CompletedByPbx,
    /// No packet for `CALL_IDLE_TIMEOUT_SECS`: the idle reaper completed it.
    IdleTimeout,
    /// The PBX ended the call's telephony stream (Twilio `stop`, AudioSocket hangup, an L16
    /// close frame).
    StreamEnded,
    /// The call's telephony stream was cut without the PBX ending it.
    StreamLost,
    /// The PBX reported an error on the call's telephony stream (AudioSocket `0xff`); the
    /// call's `last_error` says which.
    PbxError,
    /// An operator re-drove a `FAILED` call (`POST /v1/call/{id}/retry`).
    OperatorRetry,
    /// A transcriber took the call (`COMPLETED -> PROCESSING_AI`).
    AiClaimed,
    /// An AI attempt failed and the next is scheduled (stays `PROCESSING_AI`).
    AiRetryScheduled,
    /// Transcript and sentiment stored (`ARCHIVED`).
    AiSucceeded,
    /// Retryable failures until no attempts were left (`FAILED`).
    AiGaveUp,
    /// The provider refused the call for good (`FAILED`).
    AiPermanentError,
    /// The call's audio is larger than the transcriber may send (`FAILED`).
    AudioTooLarge,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::FirstPacket,
        Reason::CompletedByPbx,
        Reason::IdleTimeout,
        Reason::StreamEnded,
        Reason::StreamLost,
        Reason::PbxError,
        Reason::OperatorRetry,
        Reason::AiClaimed,
        Reason::AiRetryScheduled,
        Reason::AiSucceeded,
        Reason::AiGaveUp,
        Reason::AiPermanentError,
        Reason::AudioTooLarge,
    ];

    /// As stored in `call_transitions.reason` and sent in status events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FirstPacket => "first_packet",
            Reason::CompletedByPbx => "completed_by_pbx",
            Reason::IdleTimeout => "idle_timeout",
            Reason::StreamEnded => "stream_ended",
            Reason::StreamLost => "stream_lost",
            Reason::PbxError => "pbx_error",
            Reason::OperatorRetry => "operator_retry",
            Reason::AiClaimed => "ai_claimed",
            Reason::AiRetryScheduled => "ai_retry_scheduled",
            Reason::AiSucceeded => "ai_succeeded",
            Reason::AiGaveUp => "ai_gave_up",
            Reason::AiPermanentError => "ai_permanent_error",
            Reason::AudioTooLarge => "audio_too_large",
        }
    }

    /// The state a call is in right after an event of this reason.
    pub fn leads_to(self) -> CallState {
        match self {
            Reason::FirstPacket => CallState::InProgress,
            Reason::CompletedByPbx
            | Reason::IdleTimeout
            | Reason::StreamEnded
            | Reason::StreamLost
            | Reason::PbxError
            | Reason::OperatorRetry => CallState::Completed,
            Reason::AiClaimed | Reason::AiRetryScheduled => CallState::ProcessingAi,
            Reason::AiSucceeded => CallState::Archived,
            Reason::AiGaveUp | Reason::AiPermanentError | Reason::AudioTooLarge => {
                CallState::Failed
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_name() {
        let names: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
