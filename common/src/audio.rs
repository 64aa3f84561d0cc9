//! A call's audio, read from whichever form it is in: one `packets` row per packet while the
//! call streams and until it is final, then one `call_audio` record (the compactor's,
//! [`crate::calls::compaction`]), built and read back by [`Record`]. Every reader of stored
//! packets goes through here (the writer's duplicate check, the outbox relay, the
//! transcriber), so compaction is invisible to them. Reads that may meet both forms are one
//! statement (one snapshot), so a compaction committing meanwhile is seen entirely or not at
//! all.

pub mod playback;
pub mod wav;

use std::io::{Read, Write};

use base64::{Engine, engine::general_purpose::STANDARD};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

use crate::AudioFormat;

/// zstd's level for records: its default, about 300 MB/s here, within a few percent of the
/// ratio of much slower levels on audio.
const ZSTD_LEVEL: i32 = 3;

/// A packet as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredPacket {
    pub call_id: String,
    pub sequence: i64,
    pub data: String,
    /// The PBX timestamp of the first copy stored.
    pub sent_at: f64,
    pub received_at: OffsetDateTime,
}

/// One call's compacted audio (a `call_audio` row): every packet's data concatenated in
/// sequence order and compressed with zstd, each one's length, PBX timestamp and arrival, and
/// the sequences received as ranges. Lossless: [`Record::packets`] gives back exactly the
/// packets it was built from.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Record {
    pub call_id: String,
    /// `text` (each packet's UTF-8 bytes) or `base64` (each packet's decoded bytes: every
    /// packet was canonical base64, so encoding them again gives exactly what arrived).
    pub encoding: String,
    /// The packets' bytes, concatenated and compressed (one zstd frame).
    pub audio: Vec<u8>,
    pub lengths: Vec<i32>,
    pub sent_at: Vec<f64>,
    pub received_at: Vec<OffsetDateTime>,
    /// The received sequences as half-open ranges `[lower, upper)`, ascending.
    pub lowers: Vec<i64>,
    pub uppers: Vec<i64>,
    /// The packets' data as it arrived, in bytes.
    pub data_bytes: i64,
}

impl Record {
    /// The record of `packets` (one call's, sorted by sequence, each sequence once). The
    /// packets' bytes stream through the compressor: besides the rows, only the compressed
    /// audio is held.
    pub fn build(call_id: &str, packets: &[StoredPacket]) -> Record {
        let mut buffer = Vec::new();
        let base64 = packets.iter().all(|p| {
            buffer.clear();
            STANDARD.decode_vec(&p.data, &mut buffer).is_ok() && STANDARD.encode(&buffer) == p.data
        });
        let mut lengths = Vec::with_capacity(packets.len());
        let mut encoder =
            zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL).expect("a zstd encoder in memory");
        for p in packets {
            let piece: &[u8] = if base64 {
                buffer.clear();
                STANDARD
                    .decode_vec(&p.data, &mut buffer)
                    .expect("checked above");
                &buffer
            } else {
                p.data.as_bytes()
            };
            lengths.push(piece.len() as i32);
            encoder.write_all(piece).expect("writing to memory");
        }
        let audio = encoder.finish().expect("finishing in memory");
        let (mut lowers, mut uppers) = (Vec::new(), Vec::<i64>::new());
        for p in packets {
            match uppers.last_mut() {
                Some(upper) if *upper == p.sequence => *upper += 1,
                _ => {
                    lowers.push(p.sequence);
                    uppers.push(p.sequence + 1);
                }
            }
        }
        Record {
            call_id: call_id.to_owned(),
            encoding: if base64 { "base64" } else { "text" }.to_owned(),
            audio,
            lengths,
            sent_at: packets.iter().map(|p| p.sent_at).collect(),
            received_at: packets.iter().map(|p| p.received_at).collect(),
            lowers,
            uppers,
            data_bytes: packets.iter().map(|p| p.data.len() as i64).sum(),
        }
    }

    /// The received sequences in `int8multirange` syntax (`{[0,2),[3,5)}`).
    pub fn received(&self) -> String {
        let ranges: Vec<String> = self
            .lowers
            .iter()
            .zip(&self.uppers)
            .map(|(l, u)| format!("[{l},{u})"))
            .collect();
        format!("{{{}}}", ranges.join(","))
    }

    /// The packets, exactly as they were stored before compaction, in sequence order.
    pub fn packets(&self) -> Result<Vec<StoredPacket>, sqlx::Error> {
        self.decode(|_| true)
    }

    /// The packets among `sequences`: the audio is decompressed as a stream, only as far as
    /// the last one wanted, and only the wanted ones are kept (a PBX retrying one packet of a
    /// long finished call costs a few packets' worth of memory, not the call's).
    pub fn find(
        &self,
        sequences: &std::collections::HashSet<i64>,
    ) -> Result<Vec<StoredPacket>, sqlx::Error> {
        self.decode(|sequence| sequences.contains(&sequence))
    }

    fn decode(&self, wanted: impl Fn(i64) -> bool) -> Result<Vec<StoredPacket>, sqlx::Error> {
        let mut packets = Vec::new();
        self.walk(&wanted, |i, sequence, piece| {
            let data = match self.encoding.as_str() {
                "base64" => STANDARD.encode(piece),
                _ => std::str::from_utf8(piece)
                    .map_err(|_| self.corrupt("text that is not UTF-8"))?
                    .to_owned(),
            };
            packets.push(StoredPacket {
                call_id: self.call_id.clone(),
                sequence,
                data,
                sent_at: self.sent_at[i],
                received_at: self.received_at[i],
            });
            Ok(true)
        })?;
        Ok(packets)
    }

    /// Calls `each(sequence, bytes)` for every packet in sequence order, decompressing as it
    /// goes (one packet's bytes held at a time), until it answers `false`: how a record is
    /// played back without the call's audio in memory.
    pub fn for_each(&self, mut each: impl FnMut(i64, &[u8]) -> bool) -> Result<(), sqlx::Error> {
        self.walk(&|_| true, |_, sequence, piece| Ok(each(sequence, piece)))
    }

    fn corrupt(&self, what: &str) -> sqlx::Error {
        sqlx::Error::Decode(format!("call_audio of {}: {what}", self.call_id).into())
    }

    /// Walks the packets up to the last `wanted` one, handing each wanted one (its index,
    /// sequence and bytes) to `each` until it answers `false`. Checks the record's columns
    /// agree, and that the audio ends where its lengths say once it is walked to the end.
    fn walk(
        &self,
        wanted: &dyn Fn(i64) -> bool,
        mut each: impl FnMut(usize, i64, &[u8]) -> Result<bool, sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        let n = self.lengths.len();
        let sequences: Vec<i64> = self
            .lowers
            .iter()
            .zip(&self.uppers)
            .flat_map(|(lower, upper)| *lower..*upper)
            .collect();
        if sequences.len() != n || self.sent_at.len() != n || self.received_at.len() != n {
            return Err(self.corrupt("columns of different lengths"));
        }
        let Some(last) = (0..n).rev().find(|&i| wanted(sequences[i])) else {
            return Ok(());
        };
        let mut decoder = zstd::stream::Decoder::new(&self.audio[..])
            .map_err(|e| self.corrupt(&format!("audio that does not decompress ({e})")))?;
        let mut piece = Vec::new();
        for (i, &sequence) in sequences.iter().enumerate().take(last + 1) {
            let length =
                usize::try_from(self.lengths[i]).map_err(|_| self.corrupt("a negative length"))?;
            piece.resize(length, 0);
            decoder
                .read_exact(&mut piece)
                .map_err(|e| self.corrupt(&format!("audio shorter than its lengths ({e})")))?;
            if wanted(sequence) && !each(i, sequence, &piece)? {
                return Ok(());
            }
        }
        if last == n - 1 {
            let mut rest = [0u8; 1];
            if decoder
                .read(&mut rest)
                .map_err(|e| self.corrupt(&e.to_string()))?
                != 0
            {
                return Err(self.corrupt("audio longer than its lengths"));
            }
        }
        Ok(())
    }
}

/// The bytes of `data` if it is canonical base64 (standard alphabet, padded, unused bits
/// zero), as audio packets must be: encoding them again gives back exactly what arrived.
pub fn decode_base64(data: &str) -> Option<Vec<u8>> {
    let bytes = STANDARD.decode(data).ok()?;
    (STANDARD.encode(&bytes) == data).then_some(bytes)
}

/// The columns of a [`Record`], from `call_audio a`.
macro_rules! record_columns {
    () => {
        "a.call_id, a.encoding, a.audio, a.lengths, a.sent_at, a.received_at, a.data_bytes, \
         ARRAY(SELECT lower(r) FROM unnest(a.received) r) AS lowers, \
         ARRAY(SELECT upper(r) FROM unnest(a.received) r) AS uppers"
    };
}

/// Writes a call's record (the compactor, in its transaction).
pub(crate) async fn insert_record(
    conn: &mut PgConnection,
    created_at: OffsetDateTime,
    record: &Record,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO call_audio (call_id, call_created_at, received, packets, encoding, audio, \
                                 lengths, sent_at, received_at, data_bytes) \
         VALUES ($1, $2, $3::text::int8multirange, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&record.call_id)
    .bind(created_at)
    .bind(record.received())
    .bind(record.lengths.len() as i32)
    .bind(&record.encoding)
    .bind(&record.audio)
    .bind(&record.lengths)
    .bind(&record.sent_at)
    .bind(&record.received_at)
    .bind(record.data_bytes)
    .execute(conn)
    .await
    .map(drop)
}

/// The stored packets among the keys (`call_ids[i]`, `sequences[i]`), in either form. Keys
/// stored nowhere are absent. A key of a compacted call is found in its record, decompressed
/// only as far as the last key wanted ([`Record::find`]). Two
/// statements, yet consistent: a key missing from the rows because its call was compacted in
/// between is in the record the second one reads.
pub async fn stored_packets(
    conn: &mut PgConnection,
    call_ids: &[&str],
    sequences: &[i64],
) -> Result<Vec<StoredPacket>, sqlx::Error> {
    let mut found: Vec<StoredPacket> = sqlx::query_as(
        "SELECT p.call_id, p.sequence, p.data, p.sent_at, p.received_at \
         FROM UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
         JOIN calls c ON c.call_id = k.call_id \
         JOIN packets p ON p.call_id = k.call_id AND p.sequence = k.sequence \
           AND p.call_created_at = c.created_at",
    )
    .bind(call_ids)
    .bind(sequences)
    .fetch_all(&mut *conn)
    .await?;
    let have: std::collections::HashSet<(&str, i64)> = found
        .iter()
        .map(|p| (p.call_id.as_str(), p.sequence))
        .collect();
    let wanted: std::collections::HashSet<(String, i64)> = call_ids
        .iter()
        .zip(sequences)
        .filter(|(c, s)| !have.contains(&(**c, **s)))
        .map(|(c, s)| ((*c).to_owned(), *s))
        .collect();
    if wanted.is_empty() {
        return Ok(found);
    }
    let calls: Vec<&str> = {
        let mut ids: Vec<&str> = wanted.iter().map(|(c, _)| c.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let records: Vec<Record> = sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM calls c JOIN call_audio a ON a.call_id = c.call_id AND a.call_created_at = c.created_at \
         WHERE c.call_id = ANY($1) AND c.audio_compacted_at IS NOT NULL"
    ))
    .bind(&calls)
    .fetch_all(&mut *conn)
    .await?;
    for record in records {
        let sequences: std::collections::HashSet<i64> = wanted
            .iter()
            .filter(|(call, _)| *call == record.call_id)
            .map(|(_, sequence)| *sequence)
            .collect();
        found.extend(record.find(&sequences)?);
    }
    Ok(found)
}

/// The size of a call's stored packet data as it arrived, in bytes, in either form, measured
/// without reading it (`octet_length` of the rows is answered from the values' headers; a
/// record keeps its size).
pub async fn size_bytes(pool: &PgPool, call_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT sum(octet_length(p.data)) FROM packets p \
                          WHERE p.call_id = c.call_id AND p.call_created_at = c.created_at), 0)::int8 \
              + COALESCE((SELECT a.data_bytes FROM call_audio a \
                          WHERE a.call_id = c.call_id AND a.call_created_at = c.created_at), 0)::int8 \
         FROM calls c WHERE c.call_id = $1",
    )
    .bind(call_id)
    .fetch_optional(pool)
    .await
    .map(Option::unwrap_or_default)
}

/// Every stored (call, sequence), in either form: for audits (`scripts/chaos`'s books, tests),
/// not for serving (it reads every key of every call).
pub async fn all_stored_keys(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT call_id, sequence FROM packets \
         UNION ALL \
         SELECT a.call_id, s FROM call_audio a, unnest(a.received) r, \
                generate_series(lower(r), upper(r) - 1) s",
    )
    .fetch_all(pool)
    .await
}

/// How many packets are stored, in either form.
pub async fn count_stored(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM packets) \
              + (SELECT COALESCE(sum(packets), 0) FROM call_audio)::int8",
    )
    .fetch_one(pool)
    .await
}

/// A call's stored audio, as the transcriber sends it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recording {
    /// The packets received, in sequence order: (sequence, data).
    pub packets: Vec<(i64, String)>,
    /// The call's first sequence number (`calls.sequence_start`).
    pub start: i64,
    /// The call's audio format (`calls.audio_encoding`, `calls.sample_rate`).
    pub format: AudioFormat,
    /// How many packets the call should have: from its start to the highest received, or
    /// its declared total if larger.
    pub expected: i64,
    /// The audio was compacted and has since expired (`AUDIO_RETENTION_DAYS`): `packets` is
    /// empty because the audio is gone, not because none arrived.
    pub expired: bool,
}

/// The call's audio in sequence order, from its packet rows or its compacted record (one
/// statement); `None` if there is no such call.
pub async fn load(pool: &PgPool, call_id: &str) -> Result<Option<Recording>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        start: i64,
        expected: i64,
        compacted: bool,
        audio_encoding: String,
        sample_rate: Option<i32>,
        sequence: Option<i64>,
        data: Option<String>,
        #[sqlx(flatten)]
        record: OptionalRecord,
    }
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "WITH c AS ( \
             SELECT call_id, created_at, sequence_start AS start, \
                    GREATEST(COALESCE(total_packets, 0), \
                             COALESCE(last_sequence + 1 - sequence_start, 0)) AS expected, \
                    audio_compacted_at IS NOT NULL AS compacted, audio_encoding, sample_rate \
             FROM calls WHERE call_id = $1) \
         SELECT c.start, c.expected, c.compacted, c.audio_encoding, c.sample_rate, p.sequence, p.data, \
                NULL::text AS call_id, NULL::text AS encoding, NULL::bytea AS audio, \
                NULL::int4[] AS lengths, NULL::float8[] AS sent_at, \
                NULL::timestamptz[] AS received_at, NULL::int8 AS data_bytes, \
                NULL::int8[] AS lowers, NULL::int8[] AS uppers \
         FROM c LEFT JOIN packets p ON p.call_id = c.call_id AND p.call_created_at = c.created_at \
         UNION ALL \
         SELECT c.start, c.expected, c.compacted, c.audio_encoding, c.sample_rate, NULL, NULL, ",
        record_columns!(),
        " FROM c JOIN call_audio a ON a.call_id = c.call_id AND a.call_created_at = c.created_at \
         ORDER BY sequence NULLS LAST"
    ))
    .bind(call_id)
    .fetch_all(pool)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut recording = Recording {
        start: first.start,
        expected: first.expected,
        format: crate::calls::packets::format_from_columns(
            &first.audio_encoding,
            first.sample_rate,
        )?,
        ..Recording::default()
    };
    let compacted = first.compacted;
    let mut had_record = false;
    for row in rows {
        if let (Some(sequence), Some(data)) = (row.sequence, row.data) {
            recording.packets.push((sequence, data));
        } else if let Some(record) = row.record.into_record() {
            had_record = true;
            recording
                .packets
                .extend(record.packets()?.into_iter().map(|p| (p.sequence, p.data)));
        }
    }
    recording.expired = compacted && !had_record;
    Ok(Some(recording))
}

/// A [`Record`]'s columns where the row may not be one (`load`'s union).
#[derive(sqlx::FromRow)]
struct OptionalRecord {
    call_id: Option<String>,
    encoding: Option<String>,
    audio: Option<Vec<u8>>,
    lengths: Option<Vec<i32>>,
    sent_at: Option<Vec<f64>>,
    received_at: Option<Vec<OffsetDateTime>>,
    lowers: Option<Vec<i64>>,
    uppers: Option<Vec<i64>>,
    data_bytes: Option<i64>,
}

impl OptionalRecord {
    fn into_record(self) -> Option<Record> {
        Some(Record {
            call_id: self.call_id?,
            encoding: self.encoding?,
            audio: self.audio?,
            lengths: self.lengths?,
            sent_at: self.sent_at?,
            received_at: self.received_at?,
            lowers: self.lowers?,
            uppers: self.uppers?,
            data_bytes: self.data_bytes?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(sequence: i64, data: &str) -> StoredPacket {
        StoredPacket {
            call_id: "c".into(),
            sequence,
            data: data.into(),
            sent_at: sequence as f64 * 0.02,
            received_at: OffsetDateTime::from_unix_timestamp(1_800_000_000 + sequence).unwrap(),
        }
    }

    #[test]
    fn a_record_gives_back_exactly_its_packets_and_knows_its_gaps() {
        let text = vec![
            packet(0, "héllo"),
            packet(1, ""),
            packet(5, "€"),
            packet(6, "x"),
        ];
        let record = Record::build("c", &text);
        assert_eq!(record.encoding, "text");
        assert_eq!(record.received(), "{[0,2),[5,7)}");
        assert_eq!(record.data_bytes, 10, "6 + 0 + 3 + 1 bytes");
        assert_eq!(record.packets().unwrap(), text);

        let b64 = vec![packet(3, "AAEC"), packet(4, "/+8="), packet(9, "")];
        let record = Record::build("c", &b64);
        assert_eq!(record.encoding, "base64");
        assert_eq!(record.lengths, vec![3, 2, 0]);
        assert_eq!(record.received(), "{[3,5),[9,10)}");
        assert_eq!(record.packets().unwrap(), b64);
        assert_eq!(Record::build("c", &[]).packets().unwrap(), vec![]);
    }

    #[test]
    fn base64_that_would_not_encode_back_the_same_is_kept_as_text() {
        // "AB==" decodes, but its unused bits are set: it encodes back as "AA==".
        for odd in ["AB==", "QQ", "not base64!"] {
            let packets = vec![packet(0, "AAEC"), packet(1, odd)];
            let record = Record::build("c", &packets);
            assert_eq!(record.encoding, "text", "{odd}");
            assert_eq!(record.packets().unwrap(), packets);
        }
    }

    #[test]
    fn a_record_gives_back_only_the_packets_asked_for() {
        let text = vec![
            packet(0, "héllo"),
            packet(1, ""),
            packet(5, "€"),
            packet(6, "x"),
        ];
        let record = Record::build("c", &text);
        let want = |s: &[i64]| {
            s.iter()
                .copied()
                .collect::<std::collections::HashSet<i64>>()
        };
        assert_eq!(record.find(&want(&[5])).unwrap(), vec![text[2].clone()]);
        assert_eq!(
            record.find(&want(&[6, 0, 9])).unwrap(),
            vec![text[0].clone(), text[3].clone()]
        );
        assert_eq!(record.find(&want(&[2, 9])).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_wrong_audio() {
        let mut record = Record::build("c", &[packet(0, "abc"), packet(1, "de")]);
        record.lengths = vec![-1, 3];
        assert!(record.packets().is_err());
        let mut record = Record::build("c", &[packet(0, "abc"), packet(1, "de")]);
        record.lengths = vec![3, 3];
        assert!(record.packets().is_err());
        let mut record = Record::build("c", &[packet(0, "abc"), packet(1, "de")]);
        record.audio.truncate(4);
        assert!(record.packets().is_err());
        let mut record = Record::build("c", &[packet(0, "abc"), packet(1, "de")]);
        record.uppers = vec![1];
        assert!(record.packets().is_err());
    }
}
