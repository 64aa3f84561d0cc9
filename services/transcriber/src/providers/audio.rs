//! Turns a call's packets into one WAV file for speech-to-text: base64 decoding, G.711 mu-law
//! expansion, silence where packets are missing.
//!
//! Written by hand because it is two small, fixed formulas (the ITU-T G.711 mu-law expansion
//! and the 44-byte RIFF header), smaller than any dependency that would bring them.

use base64::{Engine, engine::general_purpose::STANDARD};

use super::CallAudio;
use crate::config::AudioEncoding;

/// Samples per packet when the call has no packet to measure (20 ms at 8 kHz).
const DEFAULT_FRAME_SAMPLES: usize = 160;

/// A 16-bit PCM mono WAV file of the call, or why the audio cannot be read (permanent). A file
/// larger than `max_bytes` (`AI_MAX_AUDIO_BYTES`, the bound the worker also checks the stored
/// data against) is refused before it is allocated.
pub fn wav(
    audio: &CallAudio,
    encoding: AudioEncoding,
    sample_rate: u32,
    max_bytes: u64,
) -> Result<Vec<u8>, String> {
    let mut frames: Vec<(Option<Vec<i16>>, i64)> = Vec::new();
    let mut frame_samples = None;
    for (data, count) in audio.with_gaps() {
        match data {
            Some(data) => {
                let bytes = STANDARD
                    .decode(data.trim())
                    .map_err(|e| format!("packet data is not base64 audio: {e}"))?;
                let samples = decode(&bytes, encoding)?;
                frame_samples.get_or_insert(samples.len());
                frames.push((Some(samples), 1));
            }
            None => frames.push((None, count)),
        }
    }
    let frame_samples = frame_samples.unwrap_or(DEFAULT_FRAME_SAMPLES);
    // Size the file before allocating it: sequence numbers come from the PBX.
    let total_samples = frames.iter().try_fold(0usize, |sum, (frame, count)| {
        let n = match frame {
            Some(s) => s.len(),
            None => frame_samples.checked_mul(usize::try_from(*count).ok()?)?,
        };
        sum.checked_add(n)
    });
    match total_samples {
        Some(n) if n.saturating_mul(2).saturating_add(44) as u64 <= max_bytes => {}
        _ => {
            return Err(format!(
                "the call's audio is larger than the {max_bytes} bytes (AI_MAX_AUDIO_BYTES) \
                 a transcription request may carry"
            ));
        }
    }
    let mut samples: Vec<i16> = Vec::new();
    for (frame, count) in frames {
        match frame {
            Some(s) => samples.extend_from_slice(&s),
            // Silence, one frame per missing packet, keeps the timing of what follows.
            None => samples.resize(samples.len() + frame_samples * count as usize, 0),
        }
    }
    Ok(pcm16_wav(&samples, sample_rate))
}

fn decode(bytes: &[u8], encoding: AudioEncoding) -> Result<Vec<i16>, String> {
    match encoding {
        AudioEncoding::Mulaw => Ok(bytes.iter().map(|&b| mulaw_to_linear(b)).collect()),
        AudioEncoding::Pcm16 => {
            if !bytes.len().is_multiple_of(2) {
                return Err(format!(
                    "a pcm16 packet has an odd number of bytes ({})",
                    bytes.len()
                ));
            }
            Ok(bytes
                .chunks_exact(2)
                .map(|p| i16::from_le_bytes([p[0], p[1]]))
                .collect())
        }
    }
}

/// ITU-T G.711 mu-law to 16-bit linear.
pub fn mulaw_to_linear(byte: u8) -> i16 {
    const BIAS: i32 = 0x84;
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = ((mantissa << 3) + BIAS) << exponent;
    if u & 0x80 != 0 {
        (BIAS - magnitude) as i16
    } else {
        (magnitude - BIAS) as i16
    }
}

/// A canonical 44-byte-header PCM WAV file.
pub fn pcm16_wav(samples: &[i16], sample_rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&sample_rate.to_le_bytes());
    out.extend_from_slice(&(sample_rate * 2).to_le_bytes()); // byte rate
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_AUDIO_BYTES;

    #[test]
    fn mulaw_expands_to_the_g711_values() {
        assert_eq!(mulaw_to_linear(0xFF), 0);
        assert_eq!(mulaw_to_linear(0x7F), 0);
        assert_eq!(mulaw_to_linear(0x00), -32124);
        assert_eq!(mulaw_to_linear(0x80), 32124);
    }

    #[test]
    fn missing_packets_become_silence_of_one_frame_each() {
        let frame = STANDARD.encode([0x80u8; 4]);
        let audio = CallAudio {
            packets: vec![(0, frame.clone()), (2, frame)],
            expected: 3,
            start: 0,
        };
        let wav = wav(&audio, AudioEncoding::Mulaw, 8000, DEFAULT_MAX_AUDIO_BYTES).unwrap();
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(&wav[8..12], b"WAVE");
        let samples: Vec<i16> = wav[44..]
            .chunks_exact(2)
            .map(|p| i16::from_le_bytes([p[0], p[1]]))
            .collect();
        assert_eq!(samples.len(), 12);
        assert!(samples[0..4].iter().all(|&s| s == 32124));
        assert!(samples[4..8].iter().all(|&s| s == 0));
        assert!(samples[8..12].iter().all(|&s| s == 32124));
    }

    #[test]
    fn a_call_too_long_for_one_request_is_refused_before_allocating() {
        let frame = STANDARD.encode([0x80u8; 160]);
        let audio = CallAudio {
            packets: vec![(0, frame)],
            expected: 100_000_000,
            start: 0,
        };
        let err = wav(&audio, AudioEncoding::Mulaw, 8000, DEFAULT_MAX_AUDIO_BYTES).unwrap_err();
        assert!(err.contains("26214400 bytes"), "{err}");
    }

    #[test]
    fn data_that_is_not_base64_is_refused() {
        let audio = CallAudio {
            packets: vec![(0, "not base64!".into())],
            expected: 1,
            start: 0,
        };
        assert!(wav(&audio, AudioEncoding::Mulaw, 8000, DEFAULT_MAX_AUDIO_BYTES).is_err());
    }
}
