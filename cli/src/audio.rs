//! Speech-like test audio for `pbx bench`: 8 kHz G.711 µ-law frames, base64 as the JSON API
//! carries them. A load of identical bytes would flatter everything that compresses (the
//! compacted records on disk, TOAST); these frames vary like speech does: a voiced tone whose
//! pitch and loudness drift syllable by syllable, with noise.

use base64::{Engine, engine::general_purpose::STANDARD};

/// Samples in one 20 ms frame at 8 kHz.
const FRAME_SAMPLES: usize = 160;

/// `count` distinct frames of 20 ms (consecutive, so in order they play as one signal), each
/// cut or repeated to exactly `bytes` characters of base64 (216 for one frame).
pub fn speech_like_frames(count: usize, bytes: usize) -> Vec<String> {
    // A small deterministic generator (xorshift): the frames are the same on every run, so
    // runs compare, and no seed needs carrying.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let mut phase = 0.0f64;
    (0..count)
        .map(|frame| {
            let mut mulaw = Vec::with_capacity(FRAME_SAMPLES);
            for i in 0..FRAME_SAMPLES {
                let t = (frame * FRAME_SAMPLES + i) as f64 / 8_000.0;
                // Syllables of ~200 ms: loudness rises and falls; pitch wanders 100-180 Hz.
                let envelope = (std::f64::consts::PI * t / 0.2).sin().abs();
                let pitch = 140.0 + 40.0 * (t * 1.3).sin();
                phase += 2.0 * std::f64::consts::PI * pitch / 8_000.0;
                let voiced = phase.sin() + 0.5 * (2.0 * phase).sin() + 0.25 * (3.0 * phase).sin();
                let sample = 9_000.0 * envelope * voiced + 600.0 * noise();
                mulaw.push(linear_to_mulaw(sample.clamp(-32_768.0, 32_767.0) as i16));
            }
            fit(STANDARD.encode(&mulaw), bytes)
        })
        .collect()
}

/// The frames of a raw 8 kHz µ-law file: 160 bytes each, base64, cut or repeated to `bytes`
/// characters (a trailing part frame is dropped).
pub fn frames_of_file(path: &std::path::Path, bytes: usize) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let audio = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let frames: Vec<String> = audio
        .chunks_exact(FRAME_SAMPLES)
        .map(|frame| fit(STANDARD.encode(frame), bytes))
        .collect();
    anyhow::ensure!(
        !frames.is_empty(),
        "{} holds less than one 20 ms frame (160 bytes of 8 kHz mu-law)",
        path.display()
    );
    Ok(frames)
}

/// `text` cut or repeated to exactly `bytes` characters.
fn fit(mut text: String, bytes: usize) -> String {
    while text.len() < bytes {
        text = text.repeat(2);
    }
    text.truncate(bytes);
    text
}

/// G.711 µ-law encoding of one 16-bit sample (the standard's bias-and-segment method).
fn linear_to_mulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let mut value = i32::from(sample);
    let sign = if value < 0 { 0x80 } else { 0 };
    if value < 0 {
        value = -value;
    }
    value = value.min(CLIP) + BIAS;
    let exponent = (7 - (value.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (value >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) | mantissa) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_encoding_matches_the_standard_at_its_fixed_points() {
        // Silence is 0xFF; full scale is 0x80 (positive) and 0x00 (negative).
        assert_eq!(linear_to_mulaw(0), 0xFF);
        assert_eq!(linear_to_mulaw(32_767), 0x80);
        assert_eq!(linear_to_mulaw(-32_768), 0x00);
        assert_eq!(linear_to_mulaw(-1), 0x7F);
    }

    #[test]
    fn frames_are_distinct_and_of_the_asked_length() {
        let frames = speech_like_frames(50, 216);
        assert!(frames.iter().all(|f| f.len() == 216));
        let distinct: std::collections::HashSet<_> = frames.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert!(speech_like_frames(2, 1000).iter().all(|f| f.len() == 1000));
        assert!(speech_like_frames(2, 10).iter().all(|f| f.len() == 10));
    }
}
