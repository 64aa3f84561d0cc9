//! A call's audio, read from whichever form it is in: one `packets` row per packet while the
//! call streams and until it is final, then one `call_audio` record (the compactor's,
//! [`crate::calls::compaction`]). Every reader of stored packets goes through here (the
//! writer's duplicate check, the outbox relay, the transcriber), so compaction is invisible to
//! them. Each read is one statement: one snapshot, so a compaction committing meanwhile is
//! seen entirely or not at all.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

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

/// The stored packets among the keys (`call_ids[i]`, `sequences[i]`), in either form. Keys
/// stored nowhere are absent.
pub async fn stored_packets(
    conn: &mut PgConnection,
    call_ids: &[&str],
    sequences: &[i64],
) -> Result<Vec<StoredPacket>, sqlx::Error> {
    // A compacted packet is cut out of its call's record: its index among the received
    // sequences (the ranges below it), then its offset (the lengths before it). `substring`
    // of a TOASTed value reads only the slice it needs where the value is stored uncompressed.
    sqlx::query_as(
        "SELECT p.call_id, p.sequence, p.data, p.sent_at, p.received_at FROM packets p \
         JOIN UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
           ON p.call_id = k.call_id AND p.sequence = k.sequence \
         UNION ALL \
         SELECT a.call_id, k.sequence, \
                convert_from(substring(a.data FROM o.off::int + 1 FOR a.lengths[i.idx + 1]), 'UTF8'), \
                a.sent_at[i.idx + 1], a.received_at[i.idx + 1] \
         FROM UNNEST($1::text[], $2::int8[]) AS k(call_id, sequence) \
         JOIN calls c ON c.call_id = k.call_id AND c.audio_compacted_at IS NOT NULL \
         JOIN call_audio a ON a.call_id = c.call_id AND a.call_created_at = c.created_at \
           AND a.received @> k.sequence \
         CROSS JOIN LATERAL (SELECT sum(LEAST(upper(r), k.sequence) - lower(r))::int AS idx \
             FROM unnest(a.received) r WHERE lower(r) <= k.sequence) i \
         CROSS JOIN LATERAL (SELECT COALESCE(sum(l), 0) AS off \
             FROM unnest(a.lengths[1:i.idx]) l) o",
    )
    .bind(call_ids)
    .bind(sequences)
    .fetch_all(conn)
    .await
}

/// The size of a call's stored packet data, in bytes, in either form: answered from the
/// values' headers (`octet_length`), so a call of gigabytes is measured without being read.
pub async fn size_bytes(pool: &PgPool, call_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT sum(octet_length(p.data)) FROM packets p \
                          WHERE p.call_id = c.call_id AND p.call_created_at = c.created_at), 0)::int8 \
              + COALESCE((SELECT octet_length(a.data) FROM call_audio a \
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
        sequence: Option<i64>,
        data: Option<String>,
        record: Option<Vec<u8>>,
        lengths: Option<Vec<i32>>,
        lowers: Option<Vec<i64>>,
        uppers: Option<Vec<i64>>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "WITH c AS ( \
             SELECT call_id, created_at, sequence_start AS start, \
                    GREATEST(COALESCE(total_packets, 0), \
                             COALESCE(last_sequence + 1 - sequence_start, 0)) AS expected, \
                    audio_compacted_at IS NOT NULL AS compacted \
             FROM calls WHERE call_id = $1) \
         SELECT c.start, c.expected, c.compacted, p.sequence, p.data, \
                NULL::bytea AS record, NULL::int4[] AS lengths, \
                NULL::int8[] AS lowers, NULL::int8[] AS uppers \
         FROM c LEFT JOIN packets p ON p.call_id = c.call_id AND p.call_created_at = c.created_at \
         UNION ALL \
         SELECT c.start, c.expected, c.compacted, NULL, NULL, a.data, a.lengths, \
                ARRAY(SELECT lower(r) FROM unnest(a.received) r), \
                ARRAY(SELECT upper(r) FROM unnest(a.received) r) \
         FROM c JOIN call_audio a ON a.call_id = c.call_id AND a.call_created_at = c.created_at \
         ORDER BY sequence NULLS LAST",
    )
    .bind(call_id)
    .fetch_all(pool)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut recording = Recording {
        start: first.start,
        expected: first.expected,
        ..Recording::default()
    };
    let compacted = first.compacted;
    let mut had_record = false;
    for row in rows {
        match (row.sequence, row.data, row.record) {
            (Some(sequence), Some(data), _) => recording.packets.push((sequence, data)),
            (_, _, Some(record)) => {
                had_record = true;
                let sequences = row
                    .lowers
                    .unwrap_or_default()
                    .into_iter()
                    .zip(row.uppers.unwrap_or_default())
                    .flat_map(|(lower, upper)| lower..upper);
                let lengths = row.lengths.unwrap_or_default();
                recording
                    .packets
                    .extend(split_record(&record, &lengths, sequences)?);
            }
            _ => {}
        }
    }
    recording.expired = compacted && !had_record;
    Ok(Some(recording))
}

/// A compacted record cut back into its packets: `lengths[i]` bytes each, numbered by
/// `sequences` in order.
fn split_record(
    record: &[u8],
    lengths: &[i32],
    sequences: impl Iterator<Item = i64>,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    let corrupt = |what: &str| sqlx::Error::Decode(format!("call_audio record: {what}").into());
    let mut packets = Vec::with_capacity(lengths.len());
    let mut offset = 0usize;
    for (length, sequence) in lengths.iter().zip(sequences) {
        let length = usize::try_from(*length).map_err(|_| corrupt("a negative length"))?;
        let bytes = record
            .get(offset..offset + length)
            .ok_or_else(|| corrupt("lengths past the data"))?;
        let data = std::str::from_utf8(bytes).map_err(|_| corrupt("data that is not UTF-8"))?;
        packets.push((sequence, data.to_owned()));
        offset += length;
    }
    if packets.len() != lengths.len() || offset != record.len() {
        return Err(corrupt("lengths and sequences that do not match its data"));
    }
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_splits_back_into_its_packets() {
        let record = "abdé€".as_bytes();
        let packets = split_record(record, &[1, 1, 3, 3], [0, 1, 5, 6].into_iter()).unwrap();
        assert_eq!(
            packets,
            vec![
                (0, "a".into()),
                (1, "b".into()),
                (5, "dé".into()),
                (6, "€".into())
            ]
        );
        assert!(split_record(record, &[1, 1], [0, 1].into_iter()).is_err());
        assert!(split_record(record, &[1, 1, 2, 9], [0, 1, 2, 3].into_iter()).is_err());
        assert!(split_record(record, &[1, 1, 3, 3], [0, 1].into_iter()).is_err());
        // A cut inside a character.
        assert!(split_record(record, &[1, 1, 2, 4], [0, 1, 2, 3].into_iter()).is_err());
    }
}
