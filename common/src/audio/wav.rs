//! A call's audio as one 16-bit PCM WAV file at the call's own rate, the same for everyone who
//! makes one: `GET /v1/call/{id}/audio.wav` streams it, the transcriber sends it. Packets are
//! decoded in sequence order; each missing packet becomes silence as long as the call's first
//! packet, so what follows a gap keeps its time.
//!
//! Two steps, so a file can be streamed with its length known up front: [`Layout::measure`]
//! sizes it from the packets' lengths alone, then a [`Renderer`] turns packets into PCM bytes
//! one at a time. A packet that is not audio of the call's format (ingest refuses them; older
//! data may hold some) plays as a missing one: one bad packet never costs the whole call.

use wire::audio::{AudioFormat, WAV_HEADER_BYTES, wav_header};

/// Why a call's audio makes no WAV file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WavError {
    #[error("the call's packets are text, not audio")]
    NotAudio,
    #[error("the call's audio is {bytes} bytes as WAV, more than {limit}")]
    TooLarge { bytes: u64, limit: u64 },
}

/// The shape of a call's WAV file, known before any audio is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub format: AudioFormat,
    /// The call's first sequence number.
    pub start: i64,
    /// Sequences from `start` the file covers (received or not).
    pub expected: i64,
    /// Samples of silence for one missing packet: as many as the call's first packet (20 ms
    /// when none arrived).
    pub gap_samples: u64,
    /// Samples in the file.
    pub samples: u64,
}

impl Layout {
    /// The layout of a call in `format` numbered from `start`, `expected` sequences long,
    /// whose received packets number `received`, hold `bytes` bytes of audio in all, and the
    /// first of which holds `first_bytes`. The file may be at most `limit` bytes.
    pub fn measure(
        format: AudioFormat,
        start: i64,
        expected: i64,
        received: i64,
        bytes: u64,
        first_bytes: Option<u64>,
        limit: u64,
    ) -> Result<Layout, WavError> {
        let rate = format.sample_rate().ok_or(WavError::NotAudio)?;
        let per_sample = format.bytes_per_sample() as u64;
        let gap_samples = first_bytes.map_or(u64::from(rate / 50), |b| b / per_sample);
        let missing = u64::try_from(expected.saturating_sub(received)).unwrap_or(0);
        let samples = (bytes / per_sample).saturating_add(missing.saturating_mul(gap_samples));
        let file = samples
            .saturating_mul(2)
            .saturating_add(WAV_HEADER_BYTES as u64);
        if file > limit || wav_header(rate, samples).is_none() {
            return Err(WavError::TooLarge {
                bytes: file,
                limit: limit.min(u64::from(u32::MAX)),
            });
        }
        Ok(Layout {
            format,
            start,
            expected,
            gap_samples,
            samples,
        })
    }

    /// Bytes of the whole file.
    pub fn file_bytes(&self) -> u64 {
        WAV_HEADER_BYTES as u64 + self.samples * 2
    }

    pub fn header(&self) -> [u8; WAV_HEADER_BYTES] {
        wav_header(
            self.format.sample_rate().expect("measured as sound"),
            self.samples,
        )
        .expect("measured to fit")
    }
}

/// Turns a call's packets, in sequence order, into the PCM bytes of its WAV file (after the
/// header), silence in the gaps.
#[derive(Debug)]
pub struct Renderer {
    layout: Layout,
    next: i64,
    samples: Vec<i16>,
    written: u64,
}

impl Renderer {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            next: layout.start,
            samples: Vec::new(),
            written: 0,
        }
    }

    /// Appends the packet `sequence` (its decoded bytes), after silence for any sequences
    /// missing before it; bytes that are not whole samples play as a missing packet. Packets
    /// must come in ascending order.
    pub fn packet(&mut self, sequence: i64, bytes: &[u8], out: &mut Vec<u8>) {
        self.samples.clear();
        if self
            .layout
            .format
            .decode_into(bytes, &mut self.samples)
            .is_err()
        {
            self.unreadable(sequence, out);
            return;
        }
        self.silence_until(sequence, out);
        self.push(out);
        self.next = sequence + 1;
    }

    /// A packet that is not audio of the call's format (not base64, half a sample): played as
    /// a missing packet.
    pub fn unreadable(&mut self, sequence: i64, out: &mut Vec<u8>) {
        tracing::warn!(sequence, format = %self.layout.format, "a packet that is not audio of its call's format plays as silence");
        self.silence_until(sequence + 1, out);
        self.next = sequence + 1;
    }

    /// Silence for the sequences missing after the last packet: the file is then complete.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.silence_until(self.layout.start + self.layout.expected, out);
        // The layout was measured from the same packets; should they disagree (they cannot
        // within one snapshot), the file still ends exactly where its header says.
        let want = self.layout.samples;
        if self.written < want {
            let pad = (want - self.written) as usize;
            out.resize(out.len() + pad * 2, 0);
            self.written = want;
        }
    }

    /// Samples written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn silence_until(&mut self, sequence: i64, out: &mut Vec<u8>) {
        if sequence > self.next {
            let samples = (sequence - self.next) as u64 * self.layout.gap_samples;
            let samples = samples.min(self.layout.samples.saturating_sub(self.written));
            out.resize(out.len() + samples as usize * 2, 0);
            self.written += samples;
        }
    }

    fn push(&mut self, out: &mut Vec<u8>) {
        let room = self.layout.samples.saturating_sub(self.written) as usize;
        let take = self.samples.len().min(room);
        out.extend(self.samples[..take].iter().flat_map(|s| s.to_le_bytes()));
        self.written += take as u64;
    }
}

/// A whole WAV file of packets held in memory ((sequence, base64 data), ascending): the
/// transcriber's form, at most `limit` bytes.
pub fn from_packets(
    format: AudioFormat,
    start: i64,
    expected: i64,
    packets: &[(i64, String)],
    limit: u64,
) -> Result<Vec<u8>, WavError> {
    if !format.is_sound() {
        return Err(WavError::NotAudio);
    }
    // Not base64 of whole samples: `None`, measured and played as a missing packet.
    let decoded: Vec<(i64, Option<Vec<u8>>)> = packets
        .iter()
        .map(|(sequence, data)| {
            let bytes = super::decode_base64(data).filter(|b| format.samples_in(b.len()).is_ok());
            (*sequence, bytes)
        })
        .collect();
    let readable: Vec<&Vec<u8>> = decoded.iter().filter_map(|(_, b)| b.as_ref()).collect();
    let bytes = readable.iter().map(|b| b.len() as u64).sum();
    let first = readable.first().map(|b| b.len() as u64);
    let layout = Layout::measure(
        format,
        start,
        expected,
        readable.len() as i64,
        bytes,
        first,
        limit,
    )?;
    let mut out = Vec::with_capacity(layout.file_bytes() as usize);
    out.extend_from_slice(&layout.header());
    let mut renderer = Renderer::new(layout);
    for (sequence, bytes) in &decoded {
        match bytes {
            Some(bytes) => renderer.packet(*sequence, bytes, &mut out),
            None => renderer.unreadable(*sequence, &mut out),
        }
    }
    renderer.finish(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use wire::audio::parse_wav;

    use super::*;

    fn packets(list: &[(i64, &[u8])]) -> Vec<(i64, String)> {
        list.iter().map(|(s, b)| (*s, STANDARD.encode(b))).collect()
    }

    #[test]
    fn missing_packets_become_silence_as_long_as_the_first_packet() {
        let frame = [0x80u8; 4];
        let wav = from_packets(
            AudioFormat::MULAW,
            1,
            4,
            &packets(&[(1, &frame), (3, &frame)]),
            u64::MAX,
        )
        .unwrap();
        let (rate, samples) = parse_wav(&wav).unwrap();
        assert_eq!(rate, 8_000);
        let mut want = vec![32124; 4];
        want.extend([0; 4]);
        want.extend([32124; 4]);
        want.extend([0; 4]);
        assert_eq!(samples, want);
    }

    #[test]
    fn slin_of_odd_sized_packets_is_sample_exact() {
        let format = AudioFormat::slin(16_000).unwrap();
        let a: Vec<i16> = vec![1, -2, 300];
        let b: Vec<i16> = vec![-32768, 32767];
        let wav = from_packets(
            format,
            0,
            2,
            &[
                (0, STANDARD.encode(format.encode(&a))),
                (1, STANDARD.encode(format.encode(&b))),
            ],
            u64::MAX,
        )
        .unwrap();
        let (rate, samples) = parse_wav(&wav).unwrap();
        assert_eq!(rate, 16_000);
        assert_eq!(samples, [a, b].concat());
    }

    #[test]
    fn a_call_too_long_for_the_limit_is_refused_before_allocating() {
        let err = from_packets(
            AudioFormat::MULAW,
            0,
            100_000_000,
            &packets(&[(0, &[0x80u8; 160])]),
            25 * 1024 * 1024,
        )
        .unwrap_err();
        assert!(matches!(err, WavError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn text_is_refused_and_a_bad_packet_plays_as_a_missing_one() {
        assert_eq!(
            from_packets(AudioFormat::TEXT, 0, 1, &[(0, "hi".into())], u64::MAX),
            Err(WavError::NotAudio)
        );
        // Half a sample, then text: each plays as a missing packet (as long as the first).
        let slin = AudioFormat::slin(8_000).unwrap();
        let mut list = packets(&[(0, &[1, 0, 2, 0]), (1, &[1, 2, 3])]);
        list.push((2, "not base64!".into()));
        list.extend(packets(&[(3, &[3, 0, 4, 0])]));
        let (_, samples) = parse_wav(&from_packets(slin, 0, 4, &list, u64::MAX).unwrap()).unwrap();
        assert_eq!(samples, [1, 2, 0, 0, 0, 0, 3, 4]);
    }
}
