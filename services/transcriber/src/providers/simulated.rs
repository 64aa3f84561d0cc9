//! The specification's flaky transcription API, in process: every request takes a uniformly
//! random `AI_LATENCY_MS` and fails with a retryable "503 Service Unavailable" with
//! probability `AI_FAILURE_RATE`. Its transcript is the packets' `data` joined in sequence
//! order, with a marker where packets are missing, so a demo can "speak" sentences.

use std::{
    ops::RangeInclusive,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{CallAudio, ProviderError};
use crate::config::AiConfig;

/// Stands in the transcript for each run of missing packets.
pub const MISSING_MARKER: &str = "[…]";

pub struct Simulated {
    failure_rate: f64,
    latency_ms: RangeInclusive<u64>,
    rng: Mutex<StdRng>,
    requests: AtomicU64,
}

impl Simulated {
    pub fn new(ai: &AiConfig) -> Self {
        let rng = match ai.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            failure_rate: ai.failure_rate,
            latency_ms: ai.latency_ms.0.clone(),
            rng: Mutex::new(rng),
            requests: AtomicU64::new(0),
        }
    }

    /// Requests answered so far (tests count AI calls with it).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub async fn transcribe(&self, audio: &CallAudio) -> Result<String, ProviderError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (latency, fails) = {
            let mut rng = self.rng.lock().expect("rng lock");
            (
                rng.random_range(self.latency_ms.clone()),
                rng.random_bool(self.failure_rate),
            )
        };
        // The provider being slow, not a retry loop: the transcriber waits for its answer.
        tokio::time::sleep(Duration::from_millis(latency)).await;
        if fails {
            return Err(ProviderError::Retryable {
                message: "503 Service Unavailable".into(),
                retry_after: None,
            });
        }
        Ok(transcript(audio))
    }
}

/// The packets' words in order, `[…]` for each gap; for a call of audio, which it cannot
/// hear, what it was given: `[12.3 s of mulaw/8000 audio, 2 packets missing]`.
pub fn transcript(audio: &CallAudio) -> String {
    if audio.format.is_sound() {
        return sound_summary(audio);
    }
    audio
        .with_gaps()
        .into_iter()
        .map(|(data, _)| data.unwrap_or(MISSING_MARKER).trim())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn sound_summary(audio: &CallAudio) -> String {
    let format = audio.format;
    let bytes: usize = audio
        .packets
        .iter()
        .filter_map(|(_, data)| common::audio::decode_base64(data))
        .map(|b| b.len())
        .sum();
    let rate = f64::from(format.sample_rate().unwrap_or(8_000));
    let seconds = bytes as f64 / format.bytes_per_sample().max(1) as f64 / rate;
    let missing = (audio.expected - audio.packets.len() as i64).max(0);
    format!("[{seconds:.1} s of {format} audio, {missing} packets missing]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transcript_joins_packets_in_order_and_marks_gaps() {
        let audio = CallAudio {
            packets: vec![
                (0, "hello".into()),
                (1, "there".into()),
                (3, "friend".into()),
            ],
            expected: 5,
            start: 0,
            ..CallAudio::default()
        };
        assert_eq!(transcript(&audio), "hello there […] friend […]");
    }

    #[test]
    fn audio_is_described_not_transcribed() {
        let audio = CallAudio {
            packets: vec![(1, "AAAA".repeat(40)), (3, "AAAA".repeat(40))],
            expected: 3,
            start: 1,
            format: common::AudioFormat::MULAW,
            ..CallAudio::default()
        };
        assert_eq!(
            transcript(&audio),
            "[0.0 s of mulaw/8000 audio, 1 packets missing]"
        );
    }
}
