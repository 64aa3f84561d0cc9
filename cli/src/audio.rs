//! Speech-like test audio for `pbx bench`: 8 kHz G.711 µ-law frames, base64 as the JSON API
//! carries them (the packets declare `encoding: mulaw`, so ingest records the calls as audio).
//! A load of identical bytes would flatter everything that compresses (the compacted records
//! on disk, TOAST); these frames vary like speech does (see [`crate::signal`]).
//!
//! Ingest checks declared audio is canonical base64 of whole samples, so a frame's size is
//! adjusted in bytes of audio, never in characters of base64: `--packet-bytes` is rounded up to
//! a multiple of 4 (whole base64 quanta, no padding).

use base64::{Engine, engine::general_purpose::STANDARD};
use wire::audio::{G711_RATE, linear_to_mulaw};

use crate::signal::Voice;

/// Samples in one 20 ms frame at 8 kHz.
const FRAME_SAMPLES: usize = 160;
/// The bench's voice: the same frames on every run, so runs compare.
const BENCH_VOICE: u64 = 0x9E37_79B9_7F4A_7C15;

/// `count` distinct frames of 20 ms (consecutive, so in order they play as one signal), each
/// cut or repeated to `bytes` characters of base64 rounded up to a multiple of 4 (216 for one
/// frame).
pub fn speech_like_frames(count: usize, bytes: usize) -> Vec<String> {
    let mut voice = Voice::new(BENCH_VOICE, G711_RATE);
    (0..count)
        .map(|_| {
            let mulaw: Vec<u8> = voice
                .take(FRAME_SAMPLES)
                .into_iter()
                .map(linear_to_mulaw)
                .collect();
            fit(&mulaw, bytes)
        })
        .collect()
}

/// The frames of a raw 8 kHz µ-law file: 160 bytes each, base64, cut or repeated as in
/// [`speech_like_frames`] (a trailing part frame is dropped).
pub fn frames_of_file(path: &std::path::Path, bytes: usize) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let audio = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let frames: Vec<String> = audio
        .chunks_exact(FRAME_SAMPLES)
        .map(|frame| fit(frame, bytes))
        .collect();
    anyhow::ensure!(
        !frames.is_empty(),
        "{} holds less than one 20 ms frame (160 bytes of 8 kHz mu-law)",
        path.display()
    );
    Ok(frames)
}

/// `audio` as canonical base64 of `characters` rounded up to a multiple of 4: whole when its
/// base64 is that long already (a 160-byte frame is 216 characters, padded), otherwise cut or
/// repeated to the bytes that fill those characters exactly.
fn fit(audio: &[u8], characters: usize) -> String {
    let quanta = characters.div_ceil(4).max(1);
    if audio.len().div_ceil(3) == quanta {
        return STANDARD.encode(audio);
    }
    let bytes: Vec<u8> = audio.iter().copied().cycle().take(quanta * 3).collect();
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_distinct_and_of_the_asked_length() {
        let frames = speech_like_frames(50, 216);
        assert!(frames.iter().all(|f| f.len() == 216));
        let distinct: std::collections::HashSet<_> = frames.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert!(speech_like_frames(2, 1000).iter().all(|f| f.len() == 1000));
        // Rounded up to whole base64 quanta.
        assert!(speech_like_frames(2, 10).iter().all(|f| f.len() == 12));
    }

    #[test]
    fn a_frame_is_the_canonical_base64_of_its_mulaw_bytes() {
        let frame = &speech_like_frames(1, 216)[0];
        let bytes = STANDARD.decode(frame).unwrap();
        assert_eq!(bytes.len(), FRAME_SAMPLES);
        assert_eq!(&STANDARD.encode(&bytes), frame);
    }
}
