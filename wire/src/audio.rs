//! A call's audio format and the codecs between it and 16-bit linear PCM: what ingest records
//! for each call, what `GET /v1/call/{id}/audio.wav` and the transcriber decode, and what
//! `pbx simulate` encodes. One home for G.711, so the encoder the test clients use and the
//! decoder the services use are checked against each other and against the standard.
//!
//! Written by hand: G.711 is two small fixed formulas (ITU-T G.711, the segment-and-bias
//! companding), and the WAV header is 44 bytes; either is smaller than a dependency.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a call's packet bytes encode its sound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Free-form text (the JSON API's default): stored, never decoded as sound.
    #[default]
    Text,
    /// G.711 µ-law, one byte a sample, 8 kHz (Twilio, most US PBXs). Also read as `ulaw`,
    /// `pcmu`, `mu-law`.
    #[serde(alias = "ulaw", alias = "pcmu", alias = "mu-law")]
    Mulaw,
    /// G.711 A-law, one byte a sample, 8 kHz (Europe). Also read as `pcma`, `a-law`.
    #[serde(alias = "pcma", alias = "a-law")]
    Alaw,
    /// Signed 16-bit little-endian linear PCM at the call's rate (AudioSocket, L16). Also read
    /// as `l16`, `pcm16`, `linear16`.
    #[serde(alias = "l16", alias = "pcm16", alias = "linear16")]
    Slin,
}

impl Encoding {
    pub const ALL: [Encoding; 4] = [
        Encoding::Text,
        Encoding::Mulaw,
        Encoding::Alaw,
        Encoding::Slin,
    ];

    /// As stored in `calls.audio_encoding` and written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Text => "text",
            Encoding::Mulaw => "mulaw",
            Encoding::Alaw => "alaw",
            Encoding::Slin => "slin",
        }
    }

    pub fn parse(s: &str) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lowest and highest linear PCM rates accepted (AudioSocket's `0x10`-`0x18` kinds span
/// 8 kHz to 192 kHz).
pub const MIN_SAMPLE_RATE: u32 = 8_000;
pub const MAX_SAMPLE_RATE: u32 = 192_000;

/// The rate of G.711 (µ-law and A-law).
pub const G711_RATE: u32 = 8_000;

/// A call's audio format: its encoding and, for sound, its sample rate (mono throughout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AudioFormat {
    encoding: Encoding,
    /// 0 for text.
    sample_rate: u32,
}

/// Why an encoding and rate do not make a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0} audio is 8000 Hz; got sample_rate {1}")]
    G711Rate(Encoding, u32),
    #[error(
        "slin audio needs a sample_rate from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz; got {0}"
    )]
    SlinRate(u32),
    #[error("text has no sample_rate")]
    TextRate,
}

impl AudioFormat {
    pub const TEXT: AudioFormat = AudioFormat {
        encoding: Encoding::Text,
        sample_rate: 0,
    };
    pub const MULAW: AudioFormat = AudioFormat {
        encoding: Encoding::Mulaw,
        sample_rate: G711_RATE,
    };
    pub const ALAW: AudioFormat = AudioFormat {
        encoding: Encoding::Alaw,
        sample_rate: G711_RATE,
    };

    /// Signed-linear 16-bit PCM at `rate` Hz.
    pub fn slin(rate: u32) -> Result<AudioFormat, FormatError> {
        AudioFormat::new(Encoding::Slin, Some(rate))
    }

    /// `encoding` at `rate` (G.711 defaults to 8000, text has none, slin needs one).
    pub fn new(encoding: Encoding, rate: Option<u32>) -> Result<AudioFormat, FormatError> {
        match (encoding, rate) {
            (Encoding::Text, None | Some(0)) => Ok(AudioFormat::TEXT),
            (Encoding::Text, Some(_)) => Err(FormatError::TextRate),
            (Encoding::Mulaw | Encoding::Alaw, None | Some(G711_RATE)) => Ok(AudioFormat {
                encoding,
                sample_rate: G711_RATE,
            }),
            (Encoding::Mulaw | Encoding::Alaw, Some(rate)) => {
                Err(FormatError::G711Rate(encoding, rate))
            }
            (Encoding::Slin, Some(rate)) if (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) => {
                Ok(AudioFormat {
                    encoding,
                    sample_rate: rate,
                })
            }
            (Encoding::Slin, rate) => Err(FormatError::SlinRate(rate.unwrap_or(0))),
        }
    }

    pub fn encoding(self) -> Encoding {
        self.encoding
    }

    /// Samples a second; `None` for text.
    pub fn sample_rate(self) -> Option<u32> {
        (self.encoding != Encoding::Text).then_some(self.sample_rate)
    }

    pub fn is_sound(self) -> bool {
        self.encoding != Encoding::Text
    }

    /// Bytes of one sample (0 for text).
    pub fn bytes_per_sample(self) -> usize {
        match self.encoding {
            Encoding::Text => 0,
            Encoding::Mulaw | Encoding::Alaw => 1,
            Encoding::Slin => 2,
        }
    }

    /// Samples in `bytes` bytes of this format's audio, or why they are not whole samples.
    pub fn samples_in(self, bytes: usize) -> Result<usize, AudioError> {
        match self.bytes_per_sample() {
            0 => Err(AudioError::NotSound),
            1 => Ok(bytes),
            n if bytes.is_multiple_of(n) => Ok(bytes / n),
            _ => Err(AudioError::OddLength(bytes)),
        }
    }

    /// Decodes `bytes` to linear samples, appended to `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<i16>) -> Result<(), AudioError> {
        self.samples_in(bytes.len())?;
        match self.encoding {
            Encoding::Text => return Err(AudioError::NotSound),
            Encoding::Mulaw => out.extend(bytes.iter().map(|&b| mulaw_to_linear(b))),
            Encoding::Alaw => out.extend(bytes.iter().map(|&b| alaw_to_linear(b))),
            Encoding::Slin => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|p| i16::from_le_bytes([p[0], p[1]])),
            ),
        }
        Ok(())
    }

    /// Encodes linear samples in this format (the test clients' side of [`Self::decode_into`]).
    pub fn encode(self, samples: &[i16]) -> Vec<u8> {
        match self.encoding {
            Encoding::Text => Vec::new(),
            Encoding::Mulaw => samples.iter().map(|&s| linear_to_mulaw(s)).collect(),
            Encoding::Alaw => samples.iter().map(|&s| linear_to_alaw(s)).collect(),
            Encoding::Slin => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        }
    }
}

/// Text: what a call is when its packets declare no audio encoding.
impl Default for AudioFormat {
    fn default() -> Self {
        AudioFormat::TEXT
    }
}

impl fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sample_rate() {
            Some(rate) => write!(f, "{}/{rate}", self.encoding),
            None => f.write_str(self.encoding.as_str()),
        }
    }
}

/// Why bytes are not decodable audio.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudioError {
    #[error("the call's packets are text, not audio")]
    NotSound,
    #[error("slin audio has 2 bytes a sample; got {0} bytes")]
    OddLength(usize),
}

/// ITU-T G.711 µ-law to 16-bit linear (`0x00` → −32124, `0x80` → 32124, `0xFF` → 0).
pub fn mulaw_to_linear(byte: u8) -> i16 {
    const BIAS: i32 = 0x84;
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0F);
    let magnitude = ((mantissa << 3) + BIAS) << exponent;
    if u & 0x80 != 0 {
        (BIAS - magnitude) as i16
    } else {
        (magnitude - BIAS) as i16
    }
}

/// 16-bit linear to G.711 µ-law (the standard's bias-and-segment method).
pub fn linear_to_mulaw(sample: i16) -> u8 {
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

/// ITU-T G.711 A-law to 16-bit linear (`0xD5` → 8, `0x55` → −8, `0xAA` → 32256).
pub fn alaw_to_linear(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let exponent = (a >> 4) & 0x07;
    let mantissa = i32::from(a & 0x0F);
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    if a & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

/// 16-bit linear to G.711 A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let value = i32::from(sample);
    let (sign, magnitude) = if value >= 0 {
        (0x80, value)
    } else {
        (0x00, (-value - 1).max(0))
    };
    let magnitude = magnitude.min(0x7FFF) >> 3; // 13-bit magnitude, as G.711 quantises
    let exponent = match magnitude {
        0..=0x1F => 0,
        _ => (32 - (magnitude as u32).leading_zeros() - 5).min(7) as i32,
    };
    let mantissa = if exponent == 0 {
        magnitude >> 1
    } else {
        (magnitude >> exponent) & 0x0F
    };
    ((sign | (exponent << 4) | mantissa) as u8) ^ 0x55
}

/// Bytes of a canonical PCM WAV header.
pub const WAV_HEADER_BYTES: usize = 44;

/// The 44-byte header of a 16-bit mono PCM WAV file of `samples` samples at `sample_rate`,
/// or `None` when the file would pass the format's 4 GiB.
pub fn wav_header(sample_rate: u32, samples: u64) -> Option<[u8; WAV_HEADER_BYTES]> {
    let data_len = u32::try_from(samples.checked_mul(2)?).ok()?;
    let riff_len = data_len.checked_add(36)?;
    let mut out = [0u8; WAV_HEADER_BYTES];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"RIFF");
    put(&riff_len.to_le_bytes());
    put(b"WAVEfmt ");
    put(&16u32.to_le_bytes()); // fmt chunk size
    put(&1u16.to_le_bytes()); // PCM
    put(&1u16.to_le_bytes()); // mono
    put(&sample_rate.to_le_bytes());
    put(&(sample_rate * 2).to_le_bytes()); // byte rate
    put(&2u16.to_le_bytes()); // block align
    put(&16u16.to_le_bytes()); // bits per sample
    put(b"data");
    put(&data_len.to_le_bytes());
    Some(out)
}

/// A whole 16-bit mono PCM WAV file of `samples`.
pub fn wav(samples: &[i16], sample_rate: u32) -> Option<Vec<u8>> {
    let header = wav_header(sample_rate, samples.len() as u64)?;
    let mut out = Vec::with_capacity(WAV_HEADER_BYTES + samples.len() * 2);
    out.extend_from_slice(&header);
    out.extend(samples.iter().flat_map(|s| s.to_le_bytes()));
    Some(out)
}

/// The rate and samples of a 16-bit mono PCM WAV file with the canonical 44-byte header (as
/// Switchboard writes them), or what is wrong with it: the check the tests' speech-to-text
/// server and `pbx` make of what they are sent.
pub fn parse_wav(bytes: &[u8]) -> Result<(u32, Vec<i16>), String> {
    let field = |at: usize, n: usize| bytes.get(at..at + n).ok_or("shorter than its header");
    let u32_at = |at: usize| -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            field(at, 4)?.try_into().expect("4 bytes"),
        ))
    };
    let u16_at = |at: usize| -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            field(at, 2)?.try_into().expect("2 bytes"),
        ))
    };
    if field(0, 4)? != b"RIFF" || field(8, 8)? != b"WAVEfmt " || field(36, 4)? != b"data" {
        return Err("not a RIFF/WAVE file with a canonical 44-byte header".into());
    }
    if u16_at(20)? != 1 || u16_at(22)? != 1 || u16_at(34)? != 16 {
        return Err("not 16-bit mono PCM".into());
    }
    let rate = u32_at(24)?;
    if u32_at(28)? != rate * 2 || u16_at(32)? != 2 {
        return Err("byte rate or block align do not match 16-bit mono".into());
    }
    let data_len = u32_at(40)? as usize;
    if u32_at(4)? as usize != data_len + 36 || bytes.len() != WAV_HEADER_BYTES + data_len {
        return Err(format!(
            "lengths disagree: RIFF {}, data {data_len}, file {}",
            u32_at(4)?,
            bytes.len()
        ));
    }
    let samples = bytes[WAV_HEADER_BYTES..]
        .chunks_exact(2)
        .map(|p| i16::from_le_bytes([p[0], p[1]]))
        .collect();
    Ok((rate, samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_decodes_to_the_g711_values() {
        assert_eq!(mulaw_to_linear(0x00), -32124);
        assert_eq!(mulaw_to_linear(0x80), 32124);
        assert_eq!(mulaw_to_linear(0xFF), 0);
        assert_eq!(mulaw_to_linear(0x7F), 0);
    }

    #[test]
    fn alaw_decodes_to_the_g711_values() {
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32256);
        assert_eq!(alaw_to_linear(0x2A), -32256);
    }

    #[test]
    fn every_code_survives_decoding_and_encoding_again() {
        for byte in 0..=255u8 {
            let m = mulaw_to_linear(byte);
            // µ-law has two zeros (0x7F and 0xFF); both decode to 0, which encodes as 0xFF.
            if m != 0 {
                assert_eq!(linear_to_mulaw(m), byte, "mu-law {byte:#04x} -> {m}");
            }
            let a = alaw_to_linear(byte);
            assert_eq!(linear_to_alaw(a), byte, "A-law {byte:#04x} -> {a}");
        }
    }

    #[test]
    fn encoding_quantises_to_the_nearest_step() {
        for sample in (-32768..=32767).step_by(7) {
            let sample = sample as i16;
            for (encode, decode, step) in [
                (
                    linear_to_mulaw as fn(i16) -> u8,
                    mulaw_to_linear as fn(u8) -> i16,
                    1100,
                ),
                (linear_to_alaw, alaw_to_linear, 1100),
            ] {
                let back = decode(encode(sample));
                assert!(
                    (i32::from(back) - i32::from(sample)).abs() <= step,
                    "{sample} -> {back}"
                );
            }
        }
    }

    #[test]
    fn encodings_are_read_under_their_common_names_and_written_under_one() {
        for (name, encoding) in [
            ("ulaw", Encoding::Mulaw),
            ("pcma", Encoding::Alaw),
            ("l16", Encoding::Slin),
        ] {
            let read: Encoding = serde_json::from_str(&format!("{name:?}")).unwrap();
            assert_eq!(read, encoding);
        }
        assert_eq!(
            serde_json::to_string(&Encoding::Mulaw).unwrap(),
            r#""mulaw""#
        );
        assert!(serde_json::from_str::<Encoding>(r#""opus""#).is_err());
    }

    #[test]
    fn formats_check_their_rates() {
        assert_eq!(
            AudioFormat::new(Encoding::Mulaw, None),
            Ok(AudioFormat::MULAW)
        );
        assert!(AudioFormat::new(Encoding::Alaw, Some(16_000)).is_err());
        assert!(AudioFormat::new(Encoding::Slin, None).is_err());
        assert!(AudioFormat::slin(7_999).is_err());
        assert_eq!(
            AudioFormat::slin(16_000).unwrap().sample_rate(),
            Some(16_000)
        );
        assert_eq!(AudioFormat::TEXT.sample_rate(), None);
        assert_eq!(
            AudioFormat::slin(8_000).unwrap().samples_in(3),
            Err(AudioError::OddLength(3))
        );
    }

    #[test]
    fn a_wav_file_reads_back_as_written() {
        let samples: Vec<i16> = (0..400)
            .map(|i| (i * 97 % 65_536 - 32_768) as i16)
            .collect();
        let file = wav(&samples, 16_000).unwrap();
        assert_eq!(file.len(), 44 + 800);
        assert_eq!(parse_wav(&file).unwrap(), (16_000, samples));
        assert!(parse_wav(&file[..100]).is_err());
        assert!(wav_header(8_000, u64::from(u32::MAX)).is_none());
    }
}
