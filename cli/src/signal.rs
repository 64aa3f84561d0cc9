//! A speech-like test signal as 16-bit linear samples at any rate: what `pbx simulate` sends in
//! every audio protocol and `pbx bench` encodes as µ-law. A voiced tone (a fundamental and two
//! harmonics) whose loudness rises and falls syllable by syllable and whose pitch wanders, with
//! a little noise.
//!
//! Why not a plain sine or silence: identical or periodic bytes flatter everything that
//! compresses, and hide codec and re-framing bugs that only show when neighbouring samples
//! differ. Why deterministic: the simulator regenerates a call's audio from its seed to say what
//! the server must have stored, so the same seed must give the same samples, bit for bit.

use std::f64::consts::PI;

/// One caller's voice, producing samples in order.
pub struct Voice {
    rate: f64,
    /// Samples produced so far: the signal's clock.
    at: u64,
    /// Of the fundamental, in radians (kept running so pitch changes never click).
    phase: f64,
    /// Xorshift state for the noise; never 0.
    noise: u64,
    /// The centre of the pitch, in Hz.
    pitch: f64,
    /// How long a syllable lasts, in seconds.
    syllable: f64,
}

impl Voice {
    /// The voice of `seed` at `rate` samples a second: the seed picks its pitch (110-190 Hz),
    /// its syllable length (150-250 ms) and its noise.
    pub fn new(seed: u64, rate: u32) -> Self {
        let mixed = splitmix(seed);
        Voice {
            rate: f64::from(rate.max(1)),
            at: 0,
            phase: 0.0,
            noise: splitmix(mixed).max(1),
            pitch: 110.0 + (mixed % 80) as f64,
            syllable: 0.15 + ((mixed >> 8) % 100) as f64 / 1000.0,
        }
    }

    /// The next `count` samples.
    pub fn take(&mut self, count: usize) -> Vec<i16> {
        (0..count).map(|_| self.sample()).collect()
    }

    fn sample(&mut self) -> i16 {
        let t = self.at as f64 / self.rate;
        self.at += 1;
        let envelope = (PI * t / self.syllable).sin().abs();
        let pitch = self.pitch + 40.0 * (t * 1.3).sin();
        self.phase = (self.phase + 2.0 * PI * pitch / self.rate) % (2.0 * PI);
        let voiced =
            self.phase.sin() + 0.5 * (2.0 * self.phase).sin() + 0.25 * (3.0 * self.phase).sin();
        let value = 9_000.0 * envelope * voiced + 600.0 * self.noise();
        value.clamp(-32_768.0, 32_767.0) as i16
    }

    /// Uniform noise in [-1, 1).
    fn noise(&mut self) -> f64 {
        self.noise ^= self.noise << 13;
        self.noise ^= self.noise >> 7;
        self.noise ^= self.noise << 17;
        (self.noise >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// SplitMix64's finaliser: spreads a seed's bits (so seeds 1 and 2 sound unrelated).
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_samples_and_another_seed_others() {
        let a = Voice::new(7, 16_000).take(4_000);
        assert_eq!(a, Voice::new(7, 16_000).take(4_000));
        assert_ne!(a, Voice::new(8, 16_000).take(4_000));
    }

    #[test]
    fn taking_in_pieces_continues_the_same_signal() {
        let whole = Voice::new(3, 8_000).take(1_000);
        let mut voice = Voice::new(3, 8_000);
        let mut pieces = voice.take(333);
        pieces.extend(voice.take(667));
        assert_eq!(whole, pieces);
    }

    #[test]
    fn it_sounds_like_something_and_never_clips_for_long() {
        let samples = Voice::new(1, 48_000).take(48_000);
        let loud = samples.iter().filter(|s| s.unsigned_abs() > 2_000).count();
        assert!(loud > 10_000, "mostly audible: {loud}");
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 1_000);
    }
}
