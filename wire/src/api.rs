//! The bodies of the ingest HTTP API, as ingest sends them and `pbx` reads them: a packet and
//! its receipt, a call (summary, detail with history, page of a list), a completion, and the
//! error body every Switchboard API answers with.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{CallState, events::Sentiment};

/// The error body of every Switchboard API: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_field`, `sequence_conflict`, ...
    pub code: String,
    /// For people: what is wrong and, where it helps, what to do.
    pub message: String,
    /// The offending field or parameter, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.error.field = Some(field.into());
        self
    }
}

/// One packet of a call's audio: the body of `POST /v1/call/stream/{call_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PacketBody {
    /// Position in the call, counting from `SEQUENCE_START` (0 unless configured to 1). Gaps,
    /// repeats and any order are allowed.
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 0, maximum = 100_000_000, example = 0)
    )]
    #[serde(deserialize_with = "integer::deserialize")]
    pub sequence: i64,
    /// The payload (base64 audio for real PBXs; words, for the simulator). At most
    /// `MAX_PACKET_BYTES` bytes of UTF-8 (characters, for base64), no NUL.
    #[cfg_attr(
        feature = "openapi",
        schema(
            max_length = 65_536,
            pattern = "^[^\\u0000]*$",
            example = "UklGRiQAAABXQVZF"
        )
    )]
    pub data: String,
    /// When the PBX captured it, in seconds since the Unix epoch (fractions allowed).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, example = 1764086400.02))]
    pub timestamp: f64,
    /// What `data` holds: `text` (free-form, the default) or base64 audio in `mulaw` or `alaw`
    /// (G.711, 8000 Hz) or `slin` (signed 16-bit little-endian PCM at `sample_rate`). The
    /// call's first packet sets its format; a later packet may omit it, and one declaring
    /// another is refused (409 `format_conflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<crate::audio::Encoding>,
    /// Samples a second: 8000 for G.711 (the default), 8000-192000 for `slin`.
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 8000, maximum = 192000, example = 8000)
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PacketStatus {
    /// Stored now.
    Accepted,
    /// Already stored with the same data: nothing changed.
    Duplicate,
}

/// An inclusive range of missing sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MissingRange {
    pub from: i64,
    pub to: i64,
}

/// The answer to a packet: stored in Postgres and acknowledged by JetStream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PacketReceipt {
    pub call_id: String,
    pub sequence: i64,
    pub status: PacketStatus,
    /// Sequences not received yet below the highest one seen, as inclusive ranges, lowest
    /// first (at most 100 ranges; `GET /v1/call/{call_id}` lists more).
    pub missing: Vec<MissingRange>,
    /// How many sequences are missing in all (every range, not only those listed).
    pub missing_packets: i64,
}

/// A call, without its history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallSummary {
    pub call_id: String,
    pub state: CallState,
    /// What its packets hold: `text`, or audio in `mulaw`, `alaw` or `slin`.
    #[serde(default)]
    pub encoding: crate::audio::Encoding,
    /// The audio's samples a second (absent for text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    /// Number of transitions so far (creation is 1).
    pub version: i64,
    pub packets_received: i64,
    pub first_sequence: Option<i64>,
    pub last_sequence: Option<i64>,
    /// As declared at completion, if it was.
    pub total_packets: Option<i64>,
    /// How many sequences are missing.
    pub missing_packets: i64,
    pub ai_attempts: i32,
    pub transcript: Option<String>,
    pub sentiment: Option<Sentiment>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub last_packet_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub completed_at: Option<OffsetDateTime>,
    /// While the AI is being retried: when the next attempt is due.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// A call with its missing ranges and the history of its transitions: `GET /v1/call/{call_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallDetail {
    #[serde(flatten)]
    pub call: CallSummary,
    /// Missing sequences as inclusive ranges, lowest first.
    pub missing: Vec<MissingRange>,
    /// Every transition, oldest first.
    pub history: Vec<TransitionRowView>,
}

/// One transition in a call's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransitionRowView {
    pub version: i64,
    pub from_state: Option<String>,
    pub to_state: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
}

/// Optional body of `POST /v1/call/{call_id}/complete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    /// How many packets the PBX sent (sequences `0..total_packets`), so that packets lost
    /// at the end of the call count as missing.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 100_000_001))]
    #[serde(default, deserialize_with = "integer::deserialize_option")]
    pub total_packets: Option<i64>,
}

/// The answer to `POST /v1/call/{call_id}/complete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteResponse {
    /// `true` if this request completed the call; `false` if it had already left
    /// `IN_PROGRESS` (nothing changed, nothing was published).
    pub changed: bool,
    #[serde(flatten)]
    pub call: CallSummary,
}

/// A page of `GET /v1/calls`, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallPage {
    pub calls: Vec<CallSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detail as ingest serialises it (`CallSummary` flattened), parsed and written back.
    #[test]
    fn a_call_detail_round_trips_with_its_summary_flattened() {
        let text = r#"{"call_id":"c1","state":"ARCHIVED","encoding":"mulaw","sample_rate":8000,"version":4,"packets_received":3,"first_sequence":0,"last_sequence":3,"total_packets":4,"missing_packets":1,"ai_attempts":1,"transcript":"hello","sentiment":{"label":"positive","score":0.5},"last_error":null,"created_at":"2025-11-25T16:00:00.123456Z","updated_at":"2025-11-25T16:00:01Z","last_packet_at":"2025-11-25T16:00:00.5Z","completed_at":"2025-11-25T16:00:00.9Z","next_attempt_at":null,"missing":[{"from":2,"to":2}],"history":[{"version":1,"from_state":null,"to_state":"IN_PROGRESS","reason":"first_packet","at":"2025-11-25T16:00:00.123456Z"}]}"#;
        let detail: CallDetail = serde_json::from_str(text).unwrap();
        assert_eq!(detail.call.state, CallState::Archived);
        assert_eq!(detail.missing, [MissingRange { from: 2, to: 2 }]);
        assert_eq!(serde_json::to_string(&detail).unwrap(), text);
    }

    #[test]
    fn an_error_body_names_its_field_only_when_there_is_one() {
        let plain = serde_json::to_string(&ErrorBody::new("call_not_found", "no such call"));
        assert_eq!(
            plain.unwrap(),
            r#"{"error":{"code":"call_not_found","message":"no such call"}}"#
        );
        let with_field = ErrorBody::new("invalid_field", "bad").with_field("sequence");
        let parsed: ErrorBody =
            serde_json::from_str(&serde_json::to_string(&with_field).unwrap()).unwrap();
        assert_eq!(parsed.error.field.as_deref(), Some("sequence"));
    }

    #[test]
    fn a_packet_body_refuses_unknown_fields_and_a_receipt_reads_its_status() {
        let body = PacketBody {
            sequence: 3,
            data: "hi".into(),
            timestamp: 1.5,
            encoding: None,
            sample_rate: None,
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"sequence":3,"data":"hi","timestamp":1.5}"#
        );
        assert!(
            serde_json::from_str::<PacketBody>(
                r#"{"sequence":3,"data":"hi","timestamp":1.5,"x":1}"#
            )
            .is_err()
        );
        let receipt: PacketReceipt = serde_json::from_str(
            r#"{"call_id":"c1","sequence":3,"status":"duplicate","missing":[],"missing_packets":0}"#,
        )
        .unwrap();
        assert_eq!(receipt.status, PacketStatus::Duplicate);
    }
}

/// JSON has one kind of number: `1.0` is the integer 1 (JSON Schema says so too, and clients
/// written in JavaScript send it), so integer fields take any number without a fractional
/// part, not only one written without a decimal point.
mod integer {
    use std::fmt;

    use serde::{Deserializer, de};

    struct Integer;

    impl de::Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // The range check is on the float: `as` would saturate.
            if v.fract() == 0.0 && (-9.2e18..=9.2e18).contains(&v) {
                Ok(v as i64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_any(Integer)
    }

    struct OptionalInteger;

    impl<'de> de::Visitor<'de> for OptionalInteger {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            deserialize(d).map(Some)
        }
    }

    pub fn deserialize_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_option(OptionalInteger)
    }

    #[cfg(test)]
    mod tests {
        use crate::api::{CompleteBody, PacketBody};

        fn sequence(json: &str) -> Result<i64, String> {
            let body = format!(r#"{{"sequence": {json}, "data": "", "timestamp": 0}}"#);
            serde_json::from_str::<PacketBody>(&body)
                .map(|b| b.sequence)
                .map_err(|e| e.to_string())
        }

        #[test]
        fn a_number_without_a_fraction_is_an_integer() {
            assert_eq!(sequence("7"), Ok(7));
            assert_eq!(sequence("7.0"), Ok(7));
            assert_eq!(sequence("-3"), Ok(-3));
            assert_eq!(sequence("1e3"), Ok(1000));
            for bad in [
                "7.5",
                "1e300",
                "18446744073709551615",
                "\"7\"",
                "null",
                "true",
            ] {
                let err = sequence(bad).unwrap_err();
                assert!(err.contains("an integer"), "{bad}: {err}");
            }
            let total = |json: &str| {
                serde_json::from_str::<CompleteBody>(json)
                    .map(|b| b.total_packets)
                    .map_err(|e| e.to_string())
            };
            assert_eq!(total("{}"), Ok(None));
            assert_eq!(total(r#"{"total_packets": null}"#), Ok(None));
            assert_eq!(total(r#"{"total_packets": 12.0}"#), Ok(Some(12)));
            assert!(total(r#"{"total_packets": 1.5}"#).is_err());
        }
    }
}
