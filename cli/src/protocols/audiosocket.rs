//! Asterisk AudioSocket, as Asterisk's `AudioSocket()` application sends it: plain TCP to the
//! listener, frames of one byte kind, two bytes big-endian length and the payload
//! (`wire::media::audiosocket`). First the call's UUID (16 bytes), then signed-linear 16-bit
//! little-endian audio (kind `0x10` at 8 kHz, `0x11`-`0x18` at the higher rates), a DTMF frame
//! (one ASCII digit) when the caller presses a key, and a hangup frame (`00 00 00`) before the
//! close. No credentials: the listener is the tenant's, and holds its key. The call id is the
//! UUID's text form, as Asterisk logs it and as ingest names the call.

use anyhow::Context;
use rand::Rng;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, tcp::OwnedWriteHalf},
    task::JoinHandle,
};
use wire::media::audiosocket::{DTMF, HANGUP, UUID, audio_kind, frame};

use super::{CLOSE_TIMEOUT, CONNECT_TIMEOUT, Stream, Target, Unit};

/// 16 random bytes made a version 4 UUID, as Asterisk's `ast_uuid_generate` makes them.
pub fn uuid(rng: &mut impl Rng) -> [u8; 16] {
    let mut bytes: [u8; 16] = rng.random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

pub use wire::media::audiosocket::uuid_text;

/// The bytes of a UUID's text form (the call id), or `None` if it is not one.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// One AudioSocket connection. Whatever the server sends back (its own audio) is read and
/// ignored, so its writes never block.
pub struct Session {
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
    /// The audio frames' kind: the stream's rate.
    kind: u8,
}

impl super::Session for Session {
    async fn open(target: &Target, stream: &Stream, _copy: usize) -> anyhow::Result<Self> {
        let uuid = uuid_bytes(&stream.call_id)
            .with_context(|| format!("AudioSocket call id {:?} is not a UUID", stream.call_id))?;
        let rate = stream.format.sample_rate().unwrap_or_default();
        let kind = audio_kind(rate)
            .with_context(|| format!("AudioSocket has no audio kind for {rate} Hz"))?;
        let addr = &target.audiosocket_addr;
        let unreachable = || {
            format!(
                "cannot reach the AudioSocket listener at {addr}: is ingest running with it? \
                 (--audiosocket-addr, PBX_AUDIOSOCKET_ADDR)"
            )
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {CONNECT_TIMEOUT:?}"))
            .with_context(unreachable)?
            .with_context(unreachable)?;
        tcp.set_nodelay(true)?;
        let (mut incoming, writer) = tcp.into_split();
        let reader = tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while matches!(incoming.read(&mut buffer).await, Ok(n) if n > 0) {}
        });
        let mut session = Session {
            writer,
            reader,
            kind,
        };
        session.write(UUID, &uuid).await?;
        Ok(session)
    }

    async fn audio(&mut self, unit: &Unit) -> anyhow::Result<()> {
        self.write(self.kind, &unit.bytes).await
    }

    async fn dtmf(&mut self, digit: char) -> anyhow::Result<()> {
        let mut ascii = [0u8; 4];
        self.write(DTMF, digit.encode_utf8(&mut ascii).as_bytes())
            .await
    }

    /// The hangup frame, then the close: our side first, then the server's (for a while).
    async fn end(mut self) -> anyhow::Result<()> {
        self.write(HANGUP, &[]).await?;
        self.writer.shutdown().await.ok();
        tokio::time::timeout(CLOSE_TIMEOUT, &mut self.reader)
            .await
            .ok();
        Ok(())
    }
}

impl Session {
    async fn write(&mut self, kind: u8, payload: &[u8]) -> anyhow::Result<()> {
        self.writer
            .write_all(&frame(kind, payload))
            .await
            .context("the AudioSocket connection was closed")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;
    use crate::protocols::{Protocol, send, tests::stream};

    #[test]
    fn a_uuid_reads_as_hyphenated_lowercase_hex_and_back() {
        let bytes: [u8; 16] = core::array::from_fn(|i| (i as u8) * 17);
        let text = uuid_text(&bytes);
        assert_eq!(text, "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(uuid_bytes(&text), Some(bytes));
        assert_eq!(uuid_bytes("00112233445566778899aabbccddeeff"), None);
        let random = uuid(&mut StdRng::seed_from_u64(1));
        let text = uuid_text(&random);
        assert_eq!(&text[14..15], "4", "version 4: {text}");
        assert!(wire::CallId::parse(text).is_ok());
    }

    /// Everything on the wire against a local listener: exactly the frames Asterisk sends.
    async fn bytes_sent(stream: &crate::protocols::Stream) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.unwrap();
            got
        });
        let target = Target::new("http://unused", None, &addr, String::new());
        let bar = indicatif::ProgressBar::hidden();
        send(Protocol::Audiosocket, &target, stream, None, &bar)
            .await
            .unwrap();
        server.await.unwrap()
    }

    #[tokio::test]
    async fn a_call_is_the_uuid_then_audio_and_a_digit_then_hangup() {
        let mut stream = stream(vec![vec![1, 2, 3, 4], vec![5, 6]]);
        stream.call_id = "00112233-4455-6677-8899-aabbccddeeff".into();
        stream.format = wire::audio::AudioFormat::slin(16_000).unwrap();
        let got = bytes_sent(&stream).await;
        let mut expected = vec![0x01, 0x00, 0x10];
        expected.extend((0..16).map(|i| i * 17));
        expected.extend([0x12, 0x00, 0x04, 1, 2, 3, 4]);
        expected.extend([0x03, 0x00, 0x01, b'5']);
        expected.extend([0x12, 0x00, 0x02, 5, 6]);
        expected.extend([0x00, 0x00, 0x00]);
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_dropped_call_ends_with_no_hangup() {
        let mut stream = stream(vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
        stream.call_id = "00112233-4455-6677-8899-aabbccddeeff".into();
        stream.dtmf = None;
        stream.disconnect_after = Some(2);
        let got = bytes_sent(&stream).await;
        assert_eq!(got.len(), 19 + 5 + 5);
        assert_eq!(&got[19..], [0x10, 0, 2, 1, 2, 0x10, 0, 2, 3, 4]);
    }
}
