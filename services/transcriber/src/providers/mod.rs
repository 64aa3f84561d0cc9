//! The AI providers a call's audio is sent to (`AI_PROVIDER`). Each answers a transcript, a
//! retryable error (the transcriber tries again later) or a permanent one (it gives up).

pub mod audio;
pub mod openai;
pub mod simulated;

use std::time::Duration;

use crate::config::{AiConfig, ProviderKind};

/// What a provider is given: the call's packets in sequence order, and where they are missing.
#[derive(Debug, Clone, Default)]
pub struct CallAudio {
    /// The call's own id (no tenant): the name of the file a provider is sent.
    pub call_id: String,
    /// What the packets hold (`text`, or audio in its encoding and rate).
    pub format: common::AudioFormat,
    /// (sequence, data), sorted by sequence.
    pub packets: Vec<(i64, String)>,
    /// How many sequences the call should have (`total_packets`, or as many as up to the
    /// highest seen).
    pub expected: i64,
    /// The call's first sequence number (`SEQUENCE_START` when it began: 0 or 1), so a call
    /// counted from 1 does not start with a missing packet 0.
    pub start: i64,
}

impl CallAudio {
    /// The packets in order with `None` for each missing sequence run: `(Some(data), ..)`
    /// for a packet, `(None, count)` for `count` missing ones.
    pub fn with_gaps(&self) -> Vec<(Option<&str>, i64)> {
        let mut out = Vec::with_capacity(self.packets.len() + 1);
        let mut next = self.start;
        for (sequence, data) in &self.packets {
            if *sequence > next {
                out.push((None, sequence - next));
            }
            out.push((Some(data.as_str()), 1));
            next = sequence + 1;
        }
        let end = self.start + self.expected;
        if end > next {
            out.push((None, end - next));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again later (503, 429, 5xx, timeouts, connection errors). `retry_after`
    /// is the provider's own hint, which the schedule honours when it is longer.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider will never accept this call (bad request, bad credentials, bad audio).
    #[error("{0}")]
    Permanent(String),
}

impl ProviderError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Retryable { .. } => "retryable",
            ProviderError::Permanent(_) => "permanent",
        }
    }
}

/// The configured provider. An enum rather than a trait object: there are two, and `match`
/// keeps the calls plain `async fn`s.
pub enum Provider {
    Simulated(Box<simulated::Simulated>),
    OpenAi(openai::OpenAi),
}

impl Provider {
    pub fn from_config(ai: &AiConfig) -> anyhow::Result<Self> {
        Ok(match ai.provider {
            ProviderKind::Simulated => Provider::Simulated(Box::new(simulated::Simulated::new(ai))),
            ProviderKind::Openai => Provider::OpenAi(openai::OpenAi::new(ai)?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Provider::Simulated(_) => "simulated",
            Provider::OpenAi(_) => "openai",
        }
    }

    pub async fn transcribe(&self, audio: &CallAudio) -> Result<String, ProviderError> {
        match self {
            Provider::Simulated(p) => p.transcribe(audio).await,
            Provider::OpenAi(p) => p.transcribe(audio).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_reported_where_sequences_are_missing() {
        let audio = CallAudio {
            packets: vec![(1, "b".into()), (2, "c".into()), (5, "f".into())],
            expected: 8,
            start: 0,
            ..CallAudio::default()
        };
        assert_eq!(
            audio.with_gaps(),
            vec![
                (None, 1),
                (Some("b"), 1),
                (Some("c"), 1),
                (None, 2),
                (Some("f"), 1),
                (None, 2)
            ]
        );
    }

    #[test]
    fn a_call_counted_from_one_has_no_phantom_packet_zero() {
        // Five packets declared, numbered 1..=5; 3 and 5 never came.
        let audio = CallAudio {
            packets: vec![(1, "a".into()), (2, "b".into()), (4, "d".into())],
            expected: 5,
            start: 1,
            ..CallAudio::default()
        };
        assert_eq!(
            audio.with_gaps(),
            vec![
                (Some("a"), 1),
                (Some("b"), 1),
                (None, 1),
                (Some("d"), 1),
                (None, 1)
            ]
        );
    }
}
