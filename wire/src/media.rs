//! The telephony protocols ingest speaks beside its JSON API, as their specifications define
//! them: the paths and frames ingest's adapters accept and `pbx simulate --protocol` sends.
//!
//! - Twilio Media Streams: JSON text frames on a WebSocket (`connected`, `start`, `media`,
//!   `dtmf`, `mark`, `stop`). Twilio sends every number inside `media` as a string.
//! - Asterisk AudioSocket: TCP frames of one byte kind, two bytes big-endian length, payload.
//! - L16 WebSockets (jambonz `listen`, FreeSWITCH `mod_audio_fork`): one JSON text frame of
//!   metadata, then binary frames of signed 16-bit little-endian PCM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The Twilio Media Streams WebSocket.
pub const TWILIO_PATH: &str = "/v1/media/twilio";
/// The binary L16 WebSocket.
pub const L16_PATH: &str = "/v1/media/l16";
/// The WebSocket subprotocols of the L16 endpoint (jambonz, and drachtio's older name).
pub const L16_SUBPROTOCOLS: [&str; 2] = ["audio.jambonz.org", "audio.drachtio.org"];

/// The custom parameter (TwiML `<Parameter>`) or metadata field carrying the API key.
pub const KEY_PARAMETER: &str = "key";
/// Other names a key is taken under, as integrators spell it (`Bearer ` before it is dropped).
pub const KEY_PARAMETER_ALIASES: [&str; 5] = [
    "api_key",
    "apiKey",
    "token",
    "authorization",
    "Authorization",
];
/// The custom parameter or metadata field naming the call, instead of the PBX's own id.
pub const CALL_ID_PARAMETER: &str = "call_id";
/// Another spelling of [`CALL_ID_PARAMETER`] taken too.
pub const CALL_ID_PARAMETER_ALIAS: &str = "callId";

/// The key among a stream's parameters: `key`, or one of its aliases; `Bearer ` dropped.
pub fn key_in<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    std::iter::once(KEY_PARAMETER)
        .chain(KEY_PARAMETER_ALIASES)
        .find_map(&get)
        .map(|k| k.trim())
        .map(|k| k.strip_prefix("Bearer ").unwrap_or(k).trim())
}
/// Appended to the call id of the outbound track of a `both_tracks` Twilio stream, which is
/// kept as a call of its own.
pub const OUTBOUND_SUFFIX: &str = "-outbound";

/// One Twilio Media Streams message (a text frame), by its `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum TwilioMessage {
    Connected {
        #[serde(default)]
        protocol: Option<String>,
        #[serde(default)]
        version: Option<String>,
    },
    Start {
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: Option<String>,
        start: TwilioStart,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
    Media {
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: Option<String>,
        media: TwilioMedia,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
    Dtmf {
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: Option<String>,
        dtmf: TwilioDtmf,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
    Mark {
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: Option<String>,
        #[serde(default)]
        mark: Option<serde_json::Value>,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
    Stop {
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: Option<String>,
        #[serde(default)]
        stop: Option<TwilioStop>,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwilioStart {
    #[serde(default)]
    pub account_sid: Option<String>,
    #[serde(default)]
    pub stream_sid: Option<String>,
    pub call_sid: String,
    /// `inbound`, `outbound`, or both.
    #[serde(default)]
    pub tracks: Vec<String>,
    #[serde(default)]
    pub custom_parameters: BTreeMap<String, String>,
    pub media_format: TwilioMediaFormat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwilioMediaFormat {
    /// `audio/x-mulaw`.
    pub encoding: String,
    pub sample_rate: u32,
    pub channels: u32,
}

/// A `media` message's body. Twilio sends `chunk` and `timestamp` as strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwilioMedia {
    /// `inbound` or `outbound`.
    #[serde(default)]
    pub track: Option<String>,
    /// Counts from 1, per track.
    #[serde(deserialize_with = "string_or_number")]
    pub chunk: String,
    /// Milliseconds since the stream started.
    #[serde(deserialize_with = "string_or_number")]
    pub timestamp: String,
    /// Base64 µ-law, 8 kHz mono.
    pub payload: String,
}

/// Twilio writes numbers as strings; a number written as a number is taken too.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a number or a string of digits, got {other}"
        ))),
    }
}

/// A rate written as a number or as a string of digits.
fn optional_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let text = string_or_number(d)?;
    text.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!("sampleRate {text:?} is not a whole number of Hz"))
    })
}

impl L16Metadata {
    /// The rate the metadata gives: `sampleRate`, or the `rate` of a Vonage-style
    /// `content-type: audio/l16;rate=16000`.
    pub fn rate(&self) -> Option<u32> {
        self.sample_rate.or_else(|| {
            let content_type = self.other.get("content-type")?.as_str()?;
            content_type
                .split(';')
                .filter_map(|p| p.trim().strip_prefix("rate="))
                .find_map(|r| r.trim().parse().ok())
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwilioDtmf {
    #[serde(default)]
    pub track: Option<String>,
    pub digit: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwilioStop {
    #[serde(default)]
    pub account_sid: Option<String>,
    #[serde(default)]
    pub call_sid: Option<String>,
}

/// The `X-Twilio-Signature` header of a Media Streams upgrade.
pub const TWILIO_SIGNATURE_HEADER: &str = "x-twilio-signature";

/// AudioSocket frame kinds.
pub mod audiosocket {
    /// Hang up: the call is over.
    pub const HANGUP: u8 = 0x00;
    /// The call's UUID (16 bytes): the first frame.
    pub const UUID: u8 = 0x01;
    /// A DTMF digit (one ASCII byte).
    pub const DTMF: u8 = 0x03;
    /// Signed-linear 16-bit mono little-endian audio at 8 kHz.
    pub const AUDIO: u8 = 0x10;
    /// An error (one byte of error code, when given).
    pub const ERROR: u8 = 0xff;
    /// Bytes of a frame's header (kind, then the payload's length, big-endian).
    pub const HEADER_BYTES: usize = 3;

    /// The sample rate of an audio kind: `0x10` is 8 kHz, `0x11`-`0x18` the higher-rate
    /// signed-linear kinds (12, 16, 24, 32, 44.1, 48, 96 and 192 kHz).
    pub fn audio_rate(kind: u8) -> Option<u32> {
        Some(match kind {
            0x10 => 8_000,
            0x11 => 12_000,
            0x12 => 16_000,
            0x13 => 24_000,
            0x14 => 32_000,
            0x15 => 44_100,
            0x16 => 48_000,
            0x17 => 96_000,
            0x18 => 192_000,
            _ => return None,
        })
    }

    /// The audio kind of a sample rate.
    pub fn audio_kind(rate: u32) -> Option<u8> {
        (0x10..=0x18).find(|&kind| audio_rate(kind) == Some(rate))
    }

    /// The call id of a UUID frame's 16 bytes: the canonical text, lowercase hex, hyphenated
    /// 8-4-4-4-12.
    pub fn uuid_text(bytes: &[u8; 16]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// One frame as sent on the wire.
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let length = u16::try_from(payload.len()).expect("an AudioSocket payload fits 64 KiB");
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        out.push(kind);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
}

/// The first (text) frame of an L16 WebSocket: the call's metadata. jambonz sends its call's
/// attributes (`callSid`, `sampleRate`, ...) plus the `metadata` of its `listen` verb, flattened;
/// `mod_audio_fork` sends the metadata string given to `uuid_audio_fork`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct L16Metadata {
    #[serde(rename = "callSid", default, skip_serializing_if = "Option::is_none")]
    pub call_sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Hz; 8000 when absent. A number, or a string of digits (Vonage's headers are strings).
    #[serde(
        rename = "sampleRate",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_rate"
    )]
    pub sample_rate: Option<u32>,
    /// The API key, for PBXs that cannot send an `Authorization` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Anything else the PBX sends (kept for the logs, otherwise ignored).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_messages_read_as_twilio_writes_them() {
        let media: TwilioMessage = serde_json::from_str(
            r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1",
                "timestamp":"5","payload":"//8="},"streamSid":"MZ1"}"#,
        )
        .unwrap();
        let TwilioMessage::Media { media, .. } = media else {
            panic!("not media")
        };
        assert_eq!((media.chunk.as_str(), media.timestamp.as_str()), ("1", "5"));
        let start: TwilioMessage = serde_json::from_str(
            r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1",
                "callSid":"CA1","tracks":["inbound"],"customParameters":{"key":"sbk_x"},
                "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},
                "streamSid":"MZ1"}"#,
        )
        .unwrap();
        let TwilioMessage::Start { start, .. } = start else {
            panic!("not start")
        };
        assert_eq!(start.custom_parameters["key"], "sbk_x");
        assert_eq!(start.media_format.sample_rate, 8000);
    }

    #[test]
    fn l16_metadata_takes_its_rate_as_jambonz_and_vonage_write_it() {
        let read = |text: &str| serde_json::from_str::<L16Metadata>(text).unwrap().rate();
        assert_eq!(read(r#"{"callSid":"c","sampleRate":16000}"#), Some(16_000));
        assert_eq!(
            read(r#"{"call_id":"c","sampleRate":"16000"}"#),
            Some(16_000)
        );
        assert_eq!(
            read(r#"{"call_id":"c","content-type":"audio/l16;rate=16000"}"#),
            Some(16_000)
        );
        assert_eq!(read(r#"{"call_id":"c"}"#), None);
        assert!(serde_json::from_str::<L16Metadata>(r#"{"sampleRate":"fast"}"#).is_err());
    }

    #[test]
    fn a_key_is_found_under_any_of_its_names() {
        let params = BTreeMap::from([("Authorization".to_owned(), "Bearer sbk_1".to_owned())]);
        assert_eq!(key_in(|k| params.get(k).map(String::as_str)), Some("sbk_1"));
        let params = BTreeMap::from([("key".to_owned(), " sbk_2 ".to_owned())]);
        assert_eq!(key_in(|k| params.get(k).map(String::as_str)), Some("sbk_2"));
        assert_eq!(key_in(|_| None), None);
    }

    #[test]
    fn audiosocket_kinds_and_rates_agree() {
        for kind in 0x10..=0x18 {
            assert_eq!(
                audiosocket::audio_kind(audiosocket::audio_rate(kind).unwrap()),
                Some(kind)
            );
        }
        assert_eq!(audiosocket::audio_rate(0x19), None);
        assert_eq!(audiosocket::frame(0x10, &[1, 2]), vec![0x10, 0, 2, 1, 2]);
        let bytes: [u8; 16] = core::array::from_fn(|i| (i as u8) * 17);
        assert_eq!(
            audiosocket::uuid_text(&bytes),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
    }
}
