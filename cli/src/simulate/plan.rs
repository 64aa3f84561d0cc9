//! Each simulated call's script, decided up front from the seed: which frames are lost, sent
//! twice or swapped with the next, what the caller says (words, or a voice), and for the media
//! protocols whether a second connection duplicates the stream, where the connection drops,
//! where the DTMF digit goes and how `--odd-frames` cuts the byte stream.
//!
//! Why up front: the same script says both what goes on the wire ([`Plan::stream`],
//! [`Plan::http_packets`]) and what the server must end up with (`super::expected`), so the two
//! cannot drift. A call's audio is regenerated from its voice's seed whenever needed rather
//! than kept, so a large run holds only the calls streaming at the moment.

use std::collections::BTreeSet;

use base64::{Engine, engine::general_purpose::STANDARD};
use rand::{Rng, rngs::StdRng};
use wire::audio::AudioFormat;

use crate::{
    protocols::{Protocol, Stream, Unit, audiosocket, http, twilio},
    sentences,
    signal::Voice,
};

/// Largest piece `--odd-frames` cuts.
const MAX_ODD_FRAME: usize = 1000;

/// The options as the plans use them, once checked.
#[derive(Debug, Clone)]
pub struct Setup {
    pub protocol: Protocol,
    /// The calls' audio format (text for the HTTP API's default).
    pub format: AudioFormat,
    /// Frames per call.
    pub packets: usize,
    /// The first frame's sequence: `--sequence-start` for HTTP, Twilio's first chunk (1), 0
    /// for the byte streams (whose frames are not numbered on the wire).
    pub first: i64,
    pub loss: f64,
    pub duplicates: f64,
    pub reorder: f64,
    pub duplicate_stream: f64,
    pub disconnect: f64,
    pub odd_frames: bool,
}

impl Setup {
    /// Samples in one 20 ms frame (0 for text).
    pub fn frame_samples(&self) -> usize {
        self.format
            .sample_rate()
            .map_or(0, |rate| rate as usize / 50)
    }

    pub fn frame_bytes(&self) -> usize {
        self.frame_samples() * self.format.bytes_per_sample()
    }
}

/// One call's script.
pub struct Plan {
    pub call_id: String,
    /// Sequences in the order sent, each `true` when sent twice.
    pub sends: Vec<(i64, bool)>,
    /// Sequences never sent (`--loss`).
    pub dropped: BTreeSet<i64>,
    /// What a text call says.
    words: Vec<&'static str>,
    /// The seed of an audio call's voice.
    voice: u64,
    pub media: Media,
}

/// The media protocols' part of a script (all default for HTTP).
#[derive(Debug, Default)]
pub struct Media {
    pub duplicate_stream: bool,
    /// Units sent before the connection is dropped with no end frame.
    pub disconnect_after: Option<usize>,
    /// The digit, and the units sent before it.
    pub dtmf: Option<(usize, char)>,
    /// `--odd-frames`: the sizes the byte stream is cut into, in order (empty: 20 ms frames).
    pub cuts: Vec<usize>,
    /// Twilio: the stream sids of the first connection and of the duplicate.
    pub stream_sids: [String; 2],
}

/// The call ids of a run: Twilio's `CA...` call sids, AudioSocket's UUIDs, or `<prefix>-<n>`.
pub fn call_ids(protocol: Protocol, prefix: &str, calls: usize, ids: &mut StdRng) -> Vec<String> {
    (0..calls)
        .map(|i| match protocol {
            Protocol::Twilio => twilio::sid("CA", ids),
            Protocol::Audiosocket => audiosocket::uuid_text(&audiosocket::uuid(ids)),
            Protocol::Http | Protocol::L16 => format!("{prefix}-{i}"),
        })
        .collect()
}

/// The script of call `call_id`: content and mishaps from `rng`, Twilio's stream sids from
/// `ids`.
pub fn plan(call_id: String, setup: &Setup, rng: &mut StdRng, ids: &mut StdRng) -> Plan {
    let words = sentences::pick(rng);
    let mut sends = Vec::with_capacity(setup.packets);
    let mut dropped = BTreeSet::new();
    for position in 0..setup.packets {
        let seq = setup.first + position as i64;
        if rng.random_bool(setup.loss) {
            dropped.insert(seq);
            continue;
        }
        sends.push((seq, rng.random_bool(setup.duplicates)));
    }
    if sends.is_empty()
        && let Some(last) = dropped.pop_last()
    {
        // A call needs one packet to exist: keep the last one.
        sends.push((last, false));
    }
    let mut i = 0;
    while i + 1 < sends.len() {
        if rng.random_bool(setup.reorder) {
            sends.swap(i, i + 1);
            i += 2;
        } else {
            i += 1;
        }
    }
    let voice = rng.random();
    let media = if setup.protocol.is_media() {
        plan_media(&sends, setup, rng, ids)
    } else {
        Media::default()
    };
    Plan {
        call_id,
        sends,
        dropped,
        words,
        voice,
        media,
    }
}

fn plan_media(sends: &[(i64, bool)], setup: &Setup, rng: &mut StdRng, ids: &mut StdRng) -> Media {
    let duplicate_stream = rng.random_bool(setup.duplicate_stream);
    let frames: usize = sends.iter().map(|&(_, twice)| 1 + twice as usize).sum();
    let cuts = if setup.odd_frames {
        odd_cuts(frames * setup.frame_bytes(), rng)
    } else {
        Vec::new()
    };
    let units = if setup.odd_frames { cuts.len() } else { frames };
    // After the first unit, and before the last when there are two or more: mid-call.
    let disconnect_after = rng
        .random_bool(setup.disconnect)
        .then(|| rng.random_range(1..units.max(2)));
    let dtmf = (setup.protocol != Protocol::L16).then(|| {
        let digit = char::from(b'0' + rng.random_range(0..10u8));
        (rng.random_range(1..=units.max(1)), digit)
    });
    let stream_sids = match setup.protocol {
        Protocol::Twilio => [twilio::sid("MZ", ids), twilio::sid("MZ", ids)],
        _ => Default::default(),
    };
    Media {
        duplicate_stream,
        disconnect_after,
        dtmf,
        cuts,
        stream_sids,
    }
}

/// Random piece sizes of 1 to [`MAX_ODD_FRAME`] bytes (odd ones included) adding up to `total`.
fn odd_cuts(total: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < total {
        let size = rng.random_range(1..=MAX_ODD_FRAME).min(total - at);
        cuts.push(size);
        at += size;
    }
    cuts
}

impl Plan {
    /// Sequences in the order they go on the wire, a frame sent twice appearing twice.
    pub fn wire_order(&self) -> Vec<i64> {
        self.sends
            .iter()
            .flat_map(|&(seq, twice)| std::iter::repeat_n(seq, 1 + twice as usize))
            .collect()
    }

    /// Every frame of the call in its format, by position (sequence - first): the voice's
    /// 20 ms frames, lost or not. Empty for text.
    pub fn frames(&self, setup: &Setup) -> Vec<Vec<u8>> {
        let Some(rate) = setup.format.sample_rate() else {
            return Vec::new();
        };
        let mut voice = Voice::new(self.voice, rate);
        (0..setup.packets)
            .map(|_| setup.format.encode(&voice.take(setup.frame_samples())))
            .collect()
    }

    /// The packets of an HTTP call in the order sent: words, or base64 audio.
    pub fn http_packets(&self, setup: &Setup) -> Vec<http::Packet> {
        let frames = self.frames(setup);
        self.sends
            .iter()
            .map(|&(sequence, twice)| {
                let position = (sequence - setup.first) as usize;
                let data = match frames.get(position) {
                    Some(frame) => STANDARD.encode(frame),
                    None => sentences::packet_data(&self.words, position, setup.packets).into(),
                };
                http::Packet {
                    sequence,
                    data,
                    twice,
                }
            })
            .collect()
    }

    /// The media stream of the call as it goes on the wire: Twilio's chunks in the order sent,
    /// or the byte stream of the frames sent, cut in 20 ms frames or `--odd-frames` pieces.
    pub fn stream(&self, setup: &Setup) -> Stream {
        let frames = self.frames(setup);
        let frame = |seq: i64| frames[(seq - setup.first) as usize].clone();
        let order = self.wire_order();
        let units = if setup.protocol.is_byte_stream() {
            let bytes: Vec<u8> = order.iter().flat_map(|&seq| frame(seq)).collect();
            let cuts = if self.media.cuts.is_empty() {
                vec![setup.frame_bytes(); order.len()]
            } else {
                self.media.cuts.clone()
            };
            cut(&bytes, &cuts, setup.frame_bytes())
        } else {
            (order.iter().enumerate())
                .map(|(i, &seq)| Unit {
                    sequence: seq,
                    bytes: frame(seq),
                    due: i as f64,
                })
                .collect()
        };
        Stream {
            call_id: self.call_id.clone(),
            format: setup.format,
            units,
            dtmf: self.media.dtmf,
            disconnect_after: self.media.disconnect_after,
            duplicate: self.media.duplicate_stream,
            stream_sids: self.media.stream_sids.clone(),
        }
    }

    /// Units the call's first connection sends: HTTP requests, Twilio `media` messages, or
    /// byte-stream frames (up to any disconnect).
    pub fn units_sent(&self, setup: &Setup) -> u64 {
        let frames = self.wire_order().len();
        let units = if self.media.cuts.is_empty() {
            frames
        } else {
            self.media.cuts.len()
        };
        let sent = match setup.protocol {
            Protocol::Http => units,
            _ => self.media.disconnect_after.map_or(units, |n| n.min(units)),
        };
        sent as u64
    }

    /// Twilio: the chunks sent (before any disconnect).
    pub fn chunks_sent(&self) -> BTreeSet<i64> {
        let order = self.wire_order();
        let n = self.media.disconnect_after.unwrap_or(order.len());
        order.into_iter().take(n).collect()
    }

    /// The sequences the server must report missing once the call is over: HTTP's losses
    /// (the call's total is declared); Twilio's chunks never sent below the highest sent; none
    /// for a byte stream, which has no gaps.
    pub fn expected_missing(&self, setup: &Setup) -> BTreeSet<i64> {
        match setup.protocol {
            Protocol::Http => self.dropped.clone(),
            Protocol::Twilio => {
                let sent = self.chunks_sent();
                let highest = sent.last().copied().unwrap_or(0);
                (setup.first..=highest)
                    .filter(|c| !sent.contains(c))
                    .collect()
            }
            Protocol::Audiosocket | Protocol::L16 => BTreeSet::new(),
        }
    }
}

/// `bytes` cut in pieces of `cuts` sizes, each due when its first byte would be at one frame
/// of `frame_bytes` a period.
fn cut(bytes: &[u8], cuts: &[usize], frame_bytes: usize) -> Vec<Unit> {
    let mut at = 0;
    let mut units = Vec::with_capacity(cuts.len());
    for (i, &size) in cuts.iter().enumerate() {
        let end = (at + size).min(bytes.len());
        units.push(Unit {
            sequence: i as i64,
            bytes: bytes[at..end].to_vec(),
            due: at as f64 / frame_bytes.max(1) as f64,
        });
        at = end;
    }
    units
}

#[cfg(test)]
pub(super) mod tests {
    use rand::SeedableRng;

    use super::*;

    pub fn setup(protocol: Protocol, format: AudioFormat) -> Setup {
        Setup {
            protocol,
            format,
            packets: 200,
            first: match protocol {
                Protocol::Twilio => 1,
                _ => 0,
            },
            loss: 0.0,
            duplicates: 0.0,
            reorder: 0.0,
            duplicate_stream: 0.0,
            disconnect: 0.0,
            odd_frames: false,
        }
    }

    fn plan_of(setup: &Setup, seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        plan("c".into(), setup, &mut rng, &mut StdRng::seed_from_u64(0))
    }

    fn all_sequences(p: &Plan) -> Vec<i64> {
        let mut all: Vec<i64> = p
            .sends
            .iter()
            .map(|s| s.0)
            .chain(p.dropped.iter().copied())
            .collect();
        all.sort();
        all
    }

    #[test]
    fn a_plan_sends_every_packet_once_unless_told_otherwise() {
        let p = plan_of(&setup(Protocol::Http, AudioFormat::TEXT), 1);
        assert!(p.dropped.is_empty());
        let seqs: Vec<i64> = p.sends.iter().map(|s| s.0).collect();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>());
        assert!(p.sends.iter().all(|s| !s.1));
    }

    #[test]
    fn loss_duplicates_and_reordering_happen_and_account_for_every_packet() {
        let mut s = setup(Protocol::Http, AudioFormat::TEXT);
        (s.loss, s.duplicates, s.reorder) = (0.1, 0.1, 0.1);
        let p = plan_of(&s, 2);
        assert!(!p.dropped.is_empty());
        assert!(p.sends.iter().any(|s| s.1));
        assert!(
            p.sends.windows(2).any(|w| w[0].0 > w[1].0),
            "some reordering"
        );
        assert_eq!(all_sequences(&p), (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_plan_can_count_from_one() {
        let mut s = setup(Protocol::Http, AudioFormat::TEXT);
        (s.loss, s.first) = (0.2, 1);
        assert_eq!(
            all_sequences(&plan_of(&s, 4)),
            (1..=200).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_call_always_sends_at_least_one_packet() {
        let mut s = setup(Protocol::Http, AudioFormat::TEXT);
        s.loss = 1.0;
        let p = plan_of(&s, 3);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.dropped.len(), 199);
    }

    #[test]
    fn http_audio_packets_are_base64_frames_of_the_format() {
        let s = setup(Protocol::Http, AudioFormat::slin(16_000).unwrap());
        let packets = plan_of(&s, 5).http_packets(&s);
        assert_eq!(packets.len(), 200);
        let frame = STANDARD.decode(&packets[0].data).unwrap();
        assert_eq!(frame.len(), 640, "20 ms of 16 kHz PCM16");
    }

    #[test]
    fn odd_frames_rejoin_to_the_same_byte_stream() {
        let mut s = setup(Protocol::L16, AudioFormat::slin(8_000).unwrap());
        (s.loss, s.duplicates, s.reorder) = (0.05, 0.05, 0.05);
        let even = plan_of(&s, 6).stream(&s);
        s.odd_frames = true;
        let odd = plan_of(&s, 6).stream(&s);
        assert!(even.units.iter().all(|u| u.bytes.len() == 320));
        assert!(
            odd.units
                .iter()
                .all(|u| (1..=1000).contains(&u.bytes.len()))
        );
        assert!(
            odd.units.iter().any(|u| u.bytes.len() % 2 == 1),
            "odd sizes"
        );
        assert_ne!(odd.units.len(), even.units.len());
        let joined = |s: &Stream| {
            s.units
                .iter()
                .flat_map(|u| u.bytes.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(joined(&odd), joined(&even));
        // Paced by bytes: a piece is due when its first byte would be in real time.
        let due_at_end = odd.units.last().unwrap().due;
        let frames = even.units.len() as f64;
        assert!(
            due_at_end < frames && due_at_end > frames - 4.0,
            "{due_at_end}"
        );
    }

    #[test]
    fn a_disconnect_falls_after_the_first_unit_and_before_the_last() {
        let mut s = setup(Protocol::Audiosocket, AudioFormat::slin(8_000).unwrap());
        s.disconnect = 1.0;
        for seed in 0..50 {
            let after = plan_of(&s, seed).media.disconnect_after.unwrap();
            assert!((1..200).contains(&after), "{after}");
        }
    }
}
