//! Twilio Media Streams, as Twilio sends them: a WebSocket to ingest's [`TWILIO_PATH`] with no
//! `Authorization` (Twilio cannot send one; the key travels as a TwiML `<Parameter>`, i.e. in
//! `start.customParameters`), then JSON text frames only: `connected`, `start`, one `media` per
//! 20 ms of 8 kHz µ-law (base64), a `dtmf` when the caller presses a key, `stop`, and the close.
//!
//! Twilio writes every number inside a message as a string (`sequenceNumber`, `chunk`,
//! `timestamp`), so the messages are built from `wire::media::TwilioMessage`, whose fields are
//! strings, never from ad hoc JSON. Text frames ingest sends back (marks, clears) are read and
//! ignored.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use rand::Rng;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use wire::{
    audio::G711_RATE,
    media::{
        KEY_PARAMETER, TWILIO_PATH, TwilioDtmf, TwilioMedia, TwilioMediaFormat, TwilioMessage,
        TwilioStart, TwilioStop,
    },
};

use super::{Stream, Target, Unit, WebSocket};

/// Milliseconds of audio in one `media` message.
const CHUNK_MS: i64 = 20;

/// A Twilio id: its two-letter prefix (`CA` call, `MZ` stream, `AC` account) and 32 lowercase
/// hex digits.
pub fn sid(prefix: &str, rng: &mut impl Rng) -> String {
    format!("{prefix}{:032x}", rng.random::<u128>())
}

/// The messages of one stream, numbered as Twilio numbers them: `sequenceNumber` counts every
/// message after `connected`, from 1.
pub struct Messages {
    stream_sid: String,
    call_sid: String,
    account_sid: String,
    /// The last `sequenceNumber` given.
    sequence: u64,
}

impl Messages {
    pub fn new(stream_sid: &str, call_sid: &str, account_sid: &str) -> Self {
        Messages {
            stream_sid: stream_sid.to_owned(),
            call_sid: call_sid.to_owned(),
            account_sid: account_sid.to_owned(),
            sequence: 0,
        }
    }

    fn next(&mut self) -> Option<String> {
        self.sequence += 1;
        Some(self.sequence.to_string())
    }

    pub fn connected() -> TwilioMessage {
        TwilioMessage::Connected {
            protocol: Some("Call".into()),
            version: Some("1.0.0".into()),
        }
    }

    /// `start`, carrying the PBX's key as a custom parameter.
    pub fn start(&mut self, key: &str) -> TwilioMessage {
        TwilioMessage::Start {
            sequence_number: self.next(),
            start: TwilioStart {
                account_sid: Some(self.account_sid.clone()),
                stream_sid: Some(self.stream_sid.clone()),
                call_sid: self.call_sid.clone(),
                tracks: vec!["inbound".into()],
                custom_parameters: BTreeMap::from([(KEY_PARAMETER.into(), key.into())]),
                media_format: TwilioMediaFormat {
                    encoding: "audio/x-mulaw".into(),
                    sample_rate: G711_RATE,
                    channels: 1,
                },
            },
            stream_sid: Some(self.stream_sid.clone()),
        }
    }

    /// Chunk `chunk` (from 1) of µ-law, stamped with its time since the stream started.
    pub fn media(&mut self, chunk: i64, mulaw: &[u8]) -> TwilioMessage {
        TwilioMessage::Media {
            sequence_number: self.next(),
            media: TwilioMedia {
                track: Some("inbound".into()),
                chunk: chunk.to_string(),
                timestamp: ((chunk - 1) * CHUNK_MS).to_string(),
                payload: STANDARD.encode(mulaw),
            },
            stream_sid: Some(self.stream_sid.clone()),
        }
    }

    pub fn dtmf(&mut self, digit: char) -> TwilioMessage {
        TwilioMessage::Dtmf {
            sequence_number: self.next(),
            dtmf: TwilioDtmf {
                // Twilio names the track so in `dtmf` (and `inbound` in `media`).
                track: Some("inbound_track".into()),
                digit: digit.to_string(),
            },
            stream_sid: Some(self.stream_sid.clone()),
        }
    }

    pub fn stop(&mut self) -> TwilioMessage {
        TwilioMessage::Stop {
            sequence_number: self.next(),
            stop: Some(TwilioStop {
                account_sid: Some(self.account_sid.clone()),
                call_sid: Some(self.call_sid.clone()),
            }),
            stream_sid: Some(self.stream_sid.clone()),
        }
    }
}

fn text(message: &TwilioMessage) -> anyhow::Result<Message> {
    Ok(Message::Text(serde_json::to_string(message)?.into()))
}

/// One Media Streams WebSocket.
pub struct Session {
    socket: WebSocket,
    messages: Messages,
}

impl super::Session for Session {
    async fn open(target: &Target, stream: &Stream, copy: usize) -> anyhow::Result<Self> {
        let key = target.key("--protocol twilio")?;
        let request = format!("{}{TWILIO_PATH}", target.ws_base).into_client_request()?;
        let mut socket = WebSocket::connect(request).await?;
        let mut messages = Messages::new(
            &stream.stream_sids[copy],
            &stream.call_id,
            &target.account_sid,
        );
        socket.send(text(&Messages::connected())?).await?;
        socket.send(text(&messages.start(key))?).await?;
        Ok(Session { socket, messages })
    }

    async fn audio(&mut self, unit: &Unit) -> anyhow::Result<()> {
        let media = self.messages.media(unit.sequence, &unit.bytes);
        self.socket.send(text(&media)?).await
    }

    async fn dtmf(&mut self, digit: char) -> anyhow::Result<()> {
        let dtmf = self.messages.dtmf(digit);
        self.socket.send(text(&dtmf)?).await
    }

    async fn end(mut self) -> anyhow::Result<()> {
        let stop = self.messages.stop();
        self.socket.send(text(&stop)?).await?;
        self.socket.close().await
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};
    use serde_json::{Value, json};

    use super::*;
    use crate::protocols::{Protocol, send, tests::stream};

    #[test]
    fn messages_carry_numbers_as_strings_and_read_back() {
        let mut messages = Messages::new("MZ1", "CA1", "AC1");
        let start = messages.start("sbk_x");
        let media = messages.media(3, &[0xff, 0x7f]);
        let dtmf = messages.dtmf('7');
        let stop = messages.stop();
        let as_json = |m: &TwilioMessage| serde_json::to_value(m).unwrap();
        assert_eq!(
            as_json(&Messages::connected()),
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        );
        assert_eq!(
            as_json(&start),
            json!({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1",
                    "tracks": ["inbound"], "customParameters": {"key": "sbk_x"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        );
        assert_eq!(
            as_json(&media),
            json!({"event": "media", "sequenceNumber": "2", "streamSid": "MZ1",
                "media": {"track": "inbound", "chunk": "3", "timestamp": "40", "payload": "/38="}})
        );
        assert_eq!(as_json(&dtmf)["sequenceNumber"], "3");
        assert_eq!(as_json(&dtmf)["dtmf"]["digit"], "7");
        assert_eq!(
            as_json(&stop),
            json!({"event": "stop", "sequenceNumber": "4", "streamSid": "MZ1",
                "stop": {"accountSid": "AC1", "callSid": "CA1"}})
        );
        for message in [Messages::connected(), start, media, dtmf, stop] {
            let written = serde_json::to_string(&message).unwrap();
            let read: TwilioMessage = serde_json::from_str(&written).unwrap();
            assert_eq!(read, message);
        }
    }

    #[test]
    fn sids_are_a_prefix_and_32_lowercase_hex_digits() {
        let mut rng = StdRng::seed_from_u64(1);
        let sid = sid("CA", &mut rng);
        assert_eq!(sid.len(), 34);
        assert!(sid.starts_with("CA"));
        assert!(
            sid[2..]
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert!(wire::CallId::parse(sid).is_ok());
    }

    /// The whole conversation against a local WebSocket server: what Twilio sends, in order.
    #[tokio::test]
    async fn a_stream_sends_connected_start_media_dtmf_stop_then_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let mut got = Vec::new();
            while let Some(Ok(message)) = futures::StreamExt::next(&mut socket).await {
                match message {
                    Message::Text(text) => got.push(serde_json::from_str::<Value>(&text).unwrap()),
                    Message::Close(_) => got.push(json!("close")),
                    _ => {}
                }
            }
            got
        });
        let target = Target::new(&base, Some("sbk_x"), "unused", "AC1".into());
        let stream = stream(vec![vec![0xff; 160], vec![0x7f; 160]]);
        let bar = indicatif::ProgressBar::hidden();
        let sent = send(Protocol::Twilio, &target, &stream, None, &bar)
            .await
            .unwrap();
        assert_eq!(sent.units, 2);
        let got = server.await.unwrap();
        let events: Vec<&str> = got
            .iter()
            .map(|m| m["event"].as_str().unwrap_or("close"))
            .collect();
        assert_eq!(
            events,
            [
                "connected",
                "start",
                "media",
                "dtmf",
                "media",
                "stop",
                "close"
            ]
        );
        assert_eq!(got[1]["start"]["callSid"], "CA1");
        assert_eq!(got[4]["media"]["chunk"], "2");
        assert_eq!(got[4]["media"]["timestamp"], "20");
        assert_eq!(got[5]["sequenceNumber"], "5");
    }

    #[tokio::test]
    async fn a_stream_ingest_refuses_fails_with_its_reason() {
        use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
                for _ in 0..2 {
                    futures::StreamExt::next(&mut socket).await;
                }
                let refused = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "the key is not valid".into(),
                };
                socket.close(Some(refused)).await.ok();
                while futures::StreamExt::next(&mut socket).await.is_some() {}
            }
        });
        let target = Target::new(&base, Some("sbk_wrong"), "unused", "AC1".into());
        let stream = stream(vec![vec![0xff; 160]; 3]);
        let bar = indicatif::ProgressBar::hidden();
        // Paced (a media send fails) and as fast as possible (all is sent before the refusal
        // arrives, and the close finds it).
        for period in [Some(std::time::Duration::from_millis(20)), None] {
            let refused = send(Protocol::Twilio, &target, &stream, period, &bar).await;
            let why = format!("{:#}", refused.err().expect("refused"));
            assert!(
                why.contains("1008") && why.contains("the key is not valid"),
                "{why}"
            );
        }
    }
}
