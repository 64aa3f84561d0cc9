//! The audio ingest must end up with for a call, from its script alone, and the check of what
//! `GET /v1/call/{id}/audio.wav` answered against it. Ingest keeps a call's audio at the
//! call's own rate with gaps as silence, so:
//!
//! - HTTP with an audio encoding: every sequence of the declared total (the simulator completes
//!   with `total_packets = --packets`), each its frame decoded, a lost one a frame of silence.
//! - Twilio: chunks 1 to the highest chunk sent, each decoded from µ-law, one never sent 160
//!   samples of silence. A duplicate stream or a chunk sent twice changes nothing.
//! - AudioSocket and L16: exactly the PCM bytes sent on the first connection, in order, up to a
//!   disconnect, as 16-bit little-endian samples (a trailing odd byte is not a sample).

use std::collections::BTreeMap;

use wire::audio::{AudioFormat, parse_wav};

use super::plan::{Plan, Setup};
use crate::protocols::{Protocol, Stream, Unit};

/// A call's audio: mono 16-bit samples at a rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub rate: u32,
    pub samples: Vec<i16>,
}

/// What ingest must have stored for `plan`, or `None` for a text call.
pub fn expected(plan: &Plan, setup: &Setup) -> Option<Audio> {
    let rate = setup.format.sample_rate()?;
    let samples = match setup.protocol {
        Protocol::Http => http(plan, setup),
        Protocol::Twilio => chunks(&plan.stream(setup), setup),
        Protocol::Audiosocket | Protocol::L16 => byte_stream(&plan.stream(setup)),
    };
    Some(Audio { rate, samples })
}

fn decode(format: AudioFormat, bytes: &[u8], out: &mut Vec<i16>) {
    format
        .decode_into(bytes, out)
        .expect("the simulator's frames are whole samples");
}

fn http(plan: &Plan, setup: &Setup) -> Vec<i16> {
    let frames = plan.frames(setup);
    let mut samples = Vec::with_capacity(frames.len() * setup.frame_samples());
    for (position, frame) in frames.iter().enumerate() {
        if plan.dropped.contains(&(setup.first + position as i64)) {
            samples.resize(samples.len() + setup.frame_samples(), 0);
        } else {
            decode(setup.format, frame, &mut samples);
        }
    }
    samples
}

/// Numbered frames (Twilio's chunks): from the first to the highest sent, gaps as silence.
fn chunks(stream: &Stream, setup: &Setup) -> Vec<i16> {
    let sent: BTreeMap<i64, &Unit> = stream.sent().iter().map(|u| (u.sequence, u)).collect();
    let Some(&highest) = sent.keys().last() else {
        return Vec::new();
    };
    let mut samples = Vec::new();
    for chunk in setup.first..=highest {
        match sent.get(&chunk) {
            Some(unit) => decode(stream.format, &unit.bytes, &mut samples),
            None => samples.resize(samples.len() + setup.frame_samples(), 0),
        }
    }
    samples
}

fn byte_stream(stream: &Stream) -> Vec<i16> {
    let bytes: Vec<u8> = stream
        .sent()
        .iter()
        .flat_map(|u| u.bytes.iter().copied())
        .collect();
    bytes
        .chunks_exact(2)
        .map(|pair| i16::from_le_bytes([pair[0], pair[1]]))
        .collect()
}

/// Whether the WAV file ingest answered holds exactly `expected`, or how it differs.
pub fn check(expected: &Audio, wav: &[u8]) -> Result<(), String> {
    let (rate, samples) = parse_wav(wav).map_err(|e| format!("not a WAV file we read: {e}"))?;
    if rate != expected.rate {
        return Err(format!("{rate} Hz, expected {} Hz", expected.rate));
    }
    if let Some(at) =
        (0..samples.len().min(expected.samples.len())).find(|&i| samples[i] != expected.samples[i])
    {
        return Err(format!(
            "sample {at} ({:.3} s) is {}, expected {}",
            at as f64 / f64::from(rate),
            samples[at],
            expected.samples[at]
        ));
    }
    if samples.len() != expected.samples.len() {
        return Err(format!(
            "{} samples, expected {}",
            samples.len(),
            expected.samples.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};
    use wire::audio::mulaw_to_linear;

    use super::*;
    use crate::simulate::plan::{plan, tests::setup};

    fn plan_of(setup: &Setup, seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        plan("CA1".into(), setup, &mut rng, &mut StdRng::seed_from_u64(0))
    }

    #[test]
    fn a_lossy_reordered_twilio_call_is_its_chunks_in_order_with_silence_for_the_lost() {
        let mut s = setup(Protocol::Twilio, AudioFormat::MULAW);
        (s.loss, s.duplicates, s.reorder, s.duplicate_stream) = (0.1, 0.1, 0.2, 1.0);
        let p = plan_of(&s, 9);
        assert!(!p.dropped.is_empty() && p.sends.windows(2).any(|w| w[0].0 > w[1].0));
        let frames = p.frames(&s);
        let audio = expected(&p, &s).unwrap();
        assert_eq!(audio.rate, 8_000);
        let highest = p.sends.iter().map(|s| s.0).max().unwrap();
        assert_eq!(audio.samples.len(), highest as usize * 160);
        for chunk in 1..=highest {
            let samples = &audio.samples[(chunk as usize - 1) * 160..chunk as usize * 160];
            if p.dropped.contains(&chunk) {
                assert!(samples.iter().all(|&s| s == 0), "chunk {chunk} is silence");
            } else {
                let decoded: Vec<i16> = frames[chunk as usize - 1]
                    .iter()
                    .map(|&b| mulaw_to_linear(b))
                    .collect();
                assert_eq!(samples, decoded, "chunk {chunk}");
            }
        }
        let lost_below: std::collections::BTreeSet<i64> =
            p.dropped.range(..highest).copied().collect();
        assert_eq!(p.expected_missing(&s), lost_below);
    }

    #[test]
    fn a_disconnected_twilio_call_ends_at_its_highest_chunk_sent() {
        let mut s = setup(Protocol::Twilio, AudioFormat::MULAW);
        s.reorder = 1.0; // 2 1 4 3 6 5 ...
        let mut p = plan_of(&s, 1);
        p.media.disconnect_after = Some(3); // 2 1 4: chunk 3 never sent
        assert_eq!(expected(&p, &s).unwrap().samples.len(), 4 * 160);
        assert_eq!(p.expected_missing(&s), [3].into());
    }

    #[test]
    fn http_audio_covers_the_declared_total_with_trailing_losses_as_silence() {
        let mut s = setup(Protocol::Http, AudioFormat::ALAW);
        s.loss = 0.3;
        let p = (0..)
            .map(|seed| plan_of(&s, seed))
            .find(|p| p.dropped.contains(&199))
            .unwrap();
        assert_eq!(expected(&p, &s).unwrap().samples.len(), 200 * 160);
        let text = setup(Protocol::Http, AudioFormat::TEXT);
        assert_eq!(expected(&plan_of(&text, 3), &text), None);
    }

    #[test]
    fn a_byte_stream_is_the_bytes_sent_up_to_the_drop_without_a_trailing_odd_byte() {
        let mut s = setup(Protocol::Audiosocket, AudioFormat::slin(16_000).unwrap());
        (s.duplicates, s.odd_frames) = (0.1, true);
        let mut p = plan_of(&s, 4);
        let whole = expected(&p, &s).unwrap();
        let frames = p.wire_order().len();
        assert_eq!(whole.samples.len(), frames * 320);
        let stream = p.stream(&s);
        let odd_end = (1..stream.units.len())
            .find(|&n| {
                stream.units[..n]
                    .iter()
                    .map(|u| u.bytes.len())
                    .sum::<usize>()
                    % 2
                    == 1
            })
            .unwrap();
        p.media.disconnect_after = Some(odd_end);
        let cut = expected(&p, &s).unwrap();
        let bytes: usize = stream.units[..odd_end].iter().map(|u| u.bytes.len()).sum();
        assert_eq!(cut.samples.len(), bytes / 2);
        assert_eq!(cut.samples[..], whole.samples[..bytes / 2]);
    }

    #[test]
    fn the_check_names_the_first_difference() {
        let audio = Audio {
            rate: 8_000,
            samples: vec![1, 2, 3],
        };
        let wav = |rate, samples: &[i16]| wire::audio::wav(samples, rate).unwrap();
        assert_eq!(check(&audio, &wav(8_000, &[1, 2, 3])), Ok(()));
        assert!(
            check(&audio, &wav(16_000, &[1, 2, 3]))
                .unwrap_err()
                .contains("16000 Hz")
        );
        assert!(
            check(&audio, &wav(8_000, &[1, 9, 3]))
                .unwrap_err()
                .contains("sample 1")
        );
        assert!(
            check(&audio, &wav(8_000, &[1, 2]))
                .unwrap_err()
                .contains("2 samples")
        );
        assert!(check(&audio, b"RIFF").is_err());
    }
}
