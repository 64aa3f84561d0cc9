//! The WAV file a speech-to-text provider is sent: the call's audio exactly as
//! `GET /v1/call/{id}/audio.wav` serves it (`common::audio::wav`, one renderer for both), at the
//! call's own rate, or resampled to `AI_SAMPLE_RATE` for a server that takes one rate only
//! (whisper.cpp's takes 16 kHz).
//!
//! The resampler is written here: a windowed-sinc interpolator is thirty lines, where the
//! resampling crates bring FFT stacks this needs none of.

use std::f64::consts::PI;

use common::{
    audio::wav::{self, WavError},
    sound,
};

use super::CallAudio;

/// Zero crossings of the sinc kernel on each side of a sample: 16 keeps the passband flat to
/// within a fraction of a dB up to 90% of the narrower Nyquist frequency.
const KERNEL_ZERO_CROSSINGS: f64 = 16.0;

/// The call's WAV file, at `rate` when given (else its own), at most `max_bytes`; or why the
/// call cannot be sent (a permanent failure).
pub fn wav_for(call: &CallAudio, rate: Option<u32>, max_bytes: u64) -> Result<Vec<u8>, String> {
    let own = call.format.sample_rate();
    // Sized at the call's own rate first (for the limit as it will be after resampling), so a
    // call far too long is refused before any allocation; the resampled file is checked again.
    let limit = match (own, rate) {
        (Some(own), Some(rate)) => max_bytes.saturating_mul(u64::from(own)) / u64::from(rate),
        _ => max_bytes,
    };
    let file = wav::from_packets(call.format, call.start, call.expected, &call.packets, limit)
        .map_err(|e| match e {
            WavError::NotAudio => {
                "the call's packets are text (streamed without an audio encoding): \
                               there is no audio to transcribe"
                    .to_owned()
            }
            WavError::TooLarge { .. } => format!(
                "the call's audio is larger than the {max_bytes} bytes (AI_MAX_AUDIO_BYTES) a \
             transcription request may carry"
            ),
        })?;
    let (Some(own), Some(rate)) = (own, rate) else {
        return Ok(file);
    };
    if own == rate {
        return Ok(file);
    }
    let (_, samples) = sound::parse_wav(&file).expect("a file just written");
    let resampled = resample(&samples, own, rate);
    let out = sound::wav(&resampled, rate).ok_or("the resampled audio passes 4 GiB")?;
    if out.len() as u64 > max_bytes {
        return Err(format!(
            "the call's audio at {rate} Hz is larger than the {max_bytes} bytes \
             (AI_MAX_AUDIO_BYTES) a transcription request may carry"
        ));
    }
    Ok(out)
}

/// Band-limited resampling from `from` Hz to `to` Hz: each output sample is the input
/// convolved with a Hann-windowed sinc whose cut-off is the lower of the two Nyquist
/// frequencies (so downsampling does not alias).
pub fn resample(samples: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || samples.is_empty() {
        return samples.to_vec();
    }
    let ratio = f64::from(to) / f64::from(from);
    let cutoff = ratio.min(1.0);
    let half_width = KERNEL_ZERO_CROSSINGS / cutoff;
    let out_len = (samples.len() as f64 * ratio).round() as usize;
    let last = samples.len() as i64 - 1;
    (0..out_len)
        .map(|n| {
            let t = n as f64 / ratio;
            let lo = ((t - half_width).ceil() as i64).max(0);
            let hi = ((t + half_width).floor() as i64).min(last);
            let mut acc = 0.0;
            for k in lo..=hi {
                let x = t - k as f64;
                let window = 0.5 + 0.5 * (PI * x / half_width).cos();
                acc += f64::from(samples[k as usize]) * cutoff * sinc(x * cutoff) * window;
            }
            acc.round().clamp(-32_768.0, 32_767.0) as i16
        })
        .collect()
}

fn sinc(x: f64) -> f64 {
    if x.abs() < 1e-12 {
        1.0
    } else {
        (PI * x).sin() / (PI * x)
    }
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use common::AudioFormat;

    use super::*;
    use crate::config::DEFAULT_MAX_AUDIO_BYTES;

    fn tone(rate: u32, hz: f64, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| (8_000.0 * (2.0 * PI * hz * i as f64 / f64::from(rate)).sin()) as i16)
            .collect()
    }

    #[test]
    fn resampling_keeps_a_tone_and_the_duration() {
        for (from, to) in [(8_000, 16_000), (48_000, 16_000), (16_000, 44_100)] {
            let input = tone(from, 440.0, from as usize / 2);
            let output = resample(&input, from, to);
            assert_eq!(output.len(), to as usize / 2, "{from} -> {to}");
            let want = tone(to, 440.0, output.len());
            // Away from the edges (where the kernel runs out of input), within 1%.
            let edge = to as usize / 50;
            let worst = output[edge..output.len() - edge]
                .iter()
                .zip(&want[edge..])
                .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                .max()
                .unwrap();
            assert!(worst < 80, "{from} -> {to}: off by {worst}");
        }
    }

    #[test]
    fn the_file_is_the_calls_own_audio_unless_a_rate_is_asked() {
        let frame = AudioFormat::MULAW.encode(&tone(8_000, 300.0, 160));
        let call = CallAudio {
            call_id: "c".into(),
            format: AudioFormat::MULAW,
            packets: vec![(1, STANDARD.encode(&frame)), (3, STANDARD.encode(&frame))],
            expected: 3,
            start: 1,
        };
        let (rate, samples) =
            sound::parse_wav(&wav_for(&call, None, DEFAULT_MAX_AUDIO_BYTES).unwrap()).unwrap();
        assert_eq!(rate, 8_000);
        assert_eq!(samples.len(), 480);
        assert!(
            samples[160..320].iter().all(|&s| s == 0),
            "the missing packet is silence"
        );
        let mut decoded = Vec::new();
        AudioFormat::MULAW
            .decode_into(&frame, &mut decoded)
            .unwrap();
        assert_eq!(samples[..160], decoded[..]);
        let (rate, samples) =
            sound::parse_wav(&wav_for(&call, Some(16_000), DEFAULT_MAX_AUDIO_BYTES).unwrap())
                .unwrap();
        assert_eq!((rate, samples.len()), (16_000, 960));
    }

    #[test]
    fn text_and_oversized_calls_are_refused() {
        let text = CallAudio {
            packets: vec![(0, "hello".into())],
            expected: 1,
            ..CallAudio::default()
        };
        assert!(
            wav_for(&text, None, DEFAULT_MAX_AUDIO_BYTES)
                .unwrap_err()
                .contains("text")
        );
        let long = CallAudio {
            format: AudioFormat::MULAW,
            packets: vec![(0, STANDARD.encode([0x80u8; 160]))],
            expected: 100_000_000,
            ..CallAudio::default()
        };
        let err = wav_for(&long, None, DEFAULT_MAX_AUDIO_BYTES).unwrap_err();
        assert!(err.contains("26214400 bytes"), "{err}");
    }
}
