//! The telephony adapters: audio from a real PBX, beside the JSON API, in the protocols phone
//! systems actually speak (their frames are defined once, in `wire::media`).
//!
//! - [`twilio`]: Twilio Media Streams, a WebSocket at `/v1/media/twilio`.
//! - [`audiosocket`]: Asterisk AudioSocket, a TCP listener on `AUDIOSOCKET_ADDR`.
//! - [`l16`]: binary L16 WebSockets at `/v1/media/l16` (jambonz, FreeSWITCH `mod_audio_fork`).
//!
//! Each turns its frames into packets of a [`session::CallStream`], which stores them through
//! the same writer as the JSON API (so missing packets, completion, transcription and the live
//! view work unchanged) and completes the call when the stream ends.

pub mod audiosocket;
pub mod l16;
pub mod session;
pub mod twilio;

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{
    AudioFormat, Permission,
    auth::{
        Principal,
        http::{AuthRejection, RateClass},
    },
};
pub use session::{CallStream, End, MediaStreams, Protocol};

use crate::routes::AppState;

/// WebSocket close codes (RFC 6455) the adapters end a refused stream with: the reason text
/// says why. Close frames are control frames, never the binary frames Twilio would choke on.
pub mod close {
    /// The credential is missing or refused.
    pub const POLICY: u16 = 1008;
    /// The stream's format or metadata cannot be taken.
    pub const UNSUPPORTED: u16 = 1003;
    /// The tenant is at its cap of streaming calls, or a dependency is down: try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// The principal behind the key a stream carries (a header, a custom parameter, the
/// listener's setting), allowed to stream.
pub async fn authorize(app: &AppState, key: Option<&str>) -> Result<Arc<Principal>, AuthRejection> {
    app.auth
        .authorize(key, Permission::Stream, RateClass::Requests)
        .await
}

/// Ends a WebSocket with `code` and a reason (cut to the 123 bytes a close frame holds).
pub async fn close_socket(socket: &mut WebSocket, code: u16, reason: &str) {
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    tracing::info!(code, reason, "media stream refused");
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// A WebSocket stream's next message; `None` once the stream is lost: the connection closed
/// or failed, ingest is shutting down, or nothing came for `idle` (`CALL_IDLE_TIMEOUT_SECS`: a
/// half-open connection).
pub async fn next_message(
    socket: &mut WebSocket,
    shutdown: &tokio_util::sync::CancellationToken,
    idle: std::time::Duration,
) -> Option<Message> {
    tokio::select! {
        message = tokio::time::timeout(idle, socket.recv()) => message.ok().flatten()?.ok(),
        () = shutdown.cancelled() => None,
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> f64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9
}

/// Cuts a stream of linear PCM bytes, arriving in frames of any size (odd ones included: a
/// sample may straddle two frames), into packets of 20 ms, numbered from 1. The call's audio
/// is exactly the bytes received, in order; only a dangling half sample at the very end is
/// dropped.
#[derive(Debug)]
pub struct Reframer {
    packet_bytes: usize,
    rate: u32,
    buffer: Vec<u8>,
    next: i64,
}

impl Reframer {
    pub fn new(format: AudioFormat) -> Self {
        let rate = format.sample_rate().expect("a sound format");
        let per_sample = format.bytes_per_sample();
        Self {
            packet_bytes: (rate as usize / 50) * per_sample,
            rate,
            buffer: Vec::new(),
            next: session::MEDIA_SEQUENCE_START,
        }
    }

    /// The whole packets `bytes` completes: (sequence, base64 data, seconds into the call).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(i64, String, f64)> {
        self.buffer.extend_from_slice(bytes);
        let mut packets = Vec::new();
        let whole = self.buffer.len() / self.packet_bytes * self.packet_bytes;
        for chunk in self.buffer[..whole].chunks_exact(self.packet_bytes) {
            packets.push((self.next, STANDARD.encode(chunk), self.offset(self.next)));
            self.next += 1;
        }
        self.buffer.drain(..whole);
        packets
    }

    /// The last, shorter packet (whole samples), if any bytes are left.
    pub fn flush(&mut self) -> Option<(i64, String, f64)> {
        let whole = self.buffer.len() / 2 * 2;
        if self.buffer.len() > whole {
            tracing::warn!("a stream ended in the middle of a sample: its last byte is dropped");
        }
        let rest = std::mem::take(&mut self.buffer);
        (whole > 0).then(|| {
            let packet = (
                self.next,
                STANDARD.encode(&rest[..whole]),
                self.offset(self.next),
            );
            self.next += 1;
            packet
        })
    }

    fn offset(&self, sequence: i64) -> f64 {
        let samples =
            (sequence - session::MEDIA_SEQUENCE_START) as f64 * (self.packet_bytes / 2) as f64;
        samples / f64::from(self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_any_size_become_20_ms_packets_of_exactly_the_bytes_sent() {
        let format = AudioFormat::slin(8_000).unwrap();
        let sent: Vec<u8> = (0..1_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut reframer = Reframer::new(format);
        let mut packets = Vec::new();
        for size in [1usize, 319, 3, 2, 7, 500].iter().cycle() {
            let done: usize = packets
                .iter()
                .map(|(_, d, _): &(i64, String, f64)| STANDARD.decode(d).unwrap().len())
                .sum::<usize>()
                + reframer.buffer.len();
            if done >= sent.len() {
                break;
            }
            let end = (done + size).min(sent.len());
            packets.extend(reframer.push(&sent[done..end]));
        }
        packets.extend(reframer.flush());
        let sequences: Vec<i64> = packets.iter().map(|p| p.0).collect();
        assert_eq!(sequences, vec![1, 2, 3, 4]);
        let joined: Vec<u8> = packets
            .iter()
            .flat_map(|p| STANDARD.decode(&p.1).unwrap())
            .collect();
        assert_eq!(joined, sent, "1000 bytes: three packets of 320, then 40");
        assert_eq!(packets[1].2, 0.02);
    }

    #[test]
    fn a_dangling_half_sample_is_all_that_is_dropped() {
        let mut reframer = Reframer::new(AudioFormat::slin(16_000).unwrap());
        assert!(reframer.push(&[1, 2, 3]).is_empty());
        let (sequence, data, _) = reframer.flush().unwrap();
        assert_eq!((sequence, STANDARD.decode(data).unwrap()), (1, vec![1, 2]));
        assert!(reframer.flush().is_none());
    }
}
