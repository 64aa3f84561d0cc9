//! Ingest's writer and the `calls` row: a batch creates its new calls, then locks its calls,
//! inserts its packets and adds them to their counters in one statement. The gaps
//! (`call_gaps`) are ingest's own table.

use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::{AudioFormat, CallState, Encoding, calls::parse_state};

/// A call as a packet batch sees it under its row lock.
#[derive(Debug, Clone)]
pub struct CallCounts {
    pub state: CallState,
    pub sequence_start: i64,
    pub last_sequence: Option<i64>,
    pub packets_received: i64,
    pub total_packets: Option<i64>,
    /// The call's audio format, as its first packet set it.
    pub format: AudioFormat,
}

impl CallCounts {
    /// Sequences expected so far less those received (the same formula as
    /// `CallRow::missing_packets`).
    pub fn missing_packets(&self) -> i64 {
        let end = self
            .last_sequence
            .map_or(self.sequence_start, |l| l + 1)
            .max(self.sequence_start + self.total_packets.unwrap_or(0));
        end - self.sequence_start - self.packets_received
    }
}

/// A call a batch creates if it does not exist: numbered from `sequence_start`, its audio in
/// `format`.
#[derive(Debug, Clone, Copy)]
pub struct NewCall<'a> {
    pub call_id: &'a str,
    pub sequence_start: i64,
    pub format: AudioFormat,
}

/// Creates the calls among `calls` that do not exist (`IN_PROGRESS`); returns the ids this
/// statement created (another replica may have created some a moment before).
pub async fn create(
    tx: &mut PgConnection,
    calls: &[NewCall<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    let ids: Vec<&str> = calls.iter().map(|c| c.call_id).collect();
    let starts: Vec<i64> = calls.iter().map(|c| c.sequence_start).collect();
    let encodings: Vec<&str> = calls.iter().map(|c| c.format.encoding().as_str()).collect();
    let rates: Vec<Option<i32>> = calls.iter().map(|c| rate_column(c.format)).collect();
    sqlx::query_scalar(
        "INSERT INTO calls (call_id, state, sequence_start, audio_encoding, sample_rate) \
         SELECT id, $2, start, encoding, rate \
         FROM unnest($1::text[], $3::int8[], $4::text[], $5::int4[]) AS k(id, start, encoding, rate) \
         ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
    )
    .bind(&ids)
    .bind(CallState::INITIAL.as_str())
    .bind(&starts)
    .bind(&encodings)
    .bind(&rates)
    .fetch_all(tx)
    .await
}

/// `calls.sample_rate` of a format (NULL for text).
pub fn rate_column(format: AudioFormat) -> Option<i32> {
    format.sample_rate().map(|r| r as i32)
}

/// A call's format from its `audio_encoding` and `sample_rate` columns.
pub fn format_from_columns(encoding: &str, rate: Option<i32>) -> Result<AudioFormat, sqlx::Error> {
    Encoding::parse(encoding)
        .and_then(|e| AudioFormat::new(e, rate.map(|r| r as u32)).ok())
        .ok_or_else(|| {
            sqlx::Error::Decode(
                format!("unknown audio format {encoding:?}/{rate:?} in calls").into(),
            )
        })
}

/// A packet to store with [`store`].
#[derive(Debug, Clone, Copy)]
pub struct NewRow<'a> {
    pub call_id: &'a str,
    pub sequence: i64,
    pub data: &'a str,
    pub sent_at: f64,
    /// The format the packet declares; `None` takes the call's. A packet whose format is not
    /// its call's is not stored, nor one that declares none whose data is not base64 of whole
    /// samples of its call's audio.
    pub format: Option<AudioFormat>,
}

/// One call of a batch as [`store`] left it.
#[derive(Debug, Clone)]
pub struct StoredCall {
    pub call_id: String,
    /// The call under its row lock, before the batch.
    pub before: CallCounts,
    /// Its counters after the batch.
    pub packets_received: i64,
    pub last_sequence: Option<i64>,
    /// The sequences this batch inserted (ascending), with their `received_at`.
    pub inserted: Vec<(i64, OffsetDateTime)>,
}

/// What [`store`] did.
#[derive(Debug, Default)]
pub struct StoredBatch {
    /// The calls that exist, locked; a call among the ids that does not exist is absent.
    pub calls: Vec<StoredCall>,
    /// The `packet_outbox` row naming the inserted packets (none if nothing was inserted).
    pub outbox: Vec<i64>,
}

/// [`store`]'s statement, with the row lock's waiting policy (`$lock`: empty to wait,
/// `SKIP LOCKED` to pass over calls locked elsewhere). Data-modifying `WITH` clauses all
/// run, whether or not the final `SELECT` reads them; `$7` is the `IN_PROGRESS` state.
macro_rules! store_sql {
    ($lock:literal) => {
        concat!(
            "WITH locked AS ( \
             SELECT call_id, state, sequence_start, last_sequence, packets_received, total_packets, \
                    created_at, audio_encoding, sample_rate \
             FROM calls WHERE call_id = ANY($1::text[]) ORDER BY call_id FOR NO KEY UPDATE ", $lock, " \
         ), inserted AS ( \
             INSERT INTO packets (call_id, sequence, data, sent_at, call_created_at) \
             SELECT k.call_id, k.sequence, k.data, k.sent_at, l.created_at \
             FROM UNNEST($2::text[], $3::int8[], $4::text[], $5::float8[], $8::text[], $9::int4[]) \
                  AS k(call_id, sequence, data, sent_at, encoding, rate) \
             JOIN locked l ON l.call_id = k.call_id \
             WHERE l.state = $7 AND k.sequence >= l.sequence_start \
               AND CASE WHEN k.encoding IS NOT NULL \
                          THEN k.encoding = l.audio_encoding AND k.rate IS NOT DISTINCT FROM l.sample_rate \
                        WHEN l.audio_encoding = 'text' THEN true \
                        ELSE k.data ~ '^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$' \
                          AND (l.audio_encoding <> 'slin' \
                               OR (octet_length(k.data) / 4 * 3 \
                                   - (octet_length(k.data) - octet_length(rtrim(k.data, '=')))) % 2 = 0) \
                   END \
             ON CONFLICT (call_id, sequence, call_created_at) DO NOTHING \
             RETURNING call_id, sequence, received_at \
         ), per_call AS ( \
             SELECT call_id, count(*) AS n, min(sequence) AS lo, max(sequence) AS hi, \
                    array_agg(sequence ORDER BY sequence) AS sequences, \
                    array_agg(received_at ORDER BY sequence) AS received \
             FROM inserted GROUP BY call_id \
         ), counted AS ( \
             UPDATE calls c SET packets_received = c.packets_received + p.n, \
                 first_sequence = LEAST(c.first_sequence, p.lo), \
                 last_sequence = GREATEST(c.last_sequence, p.hi), \
                 last_packet_at = now() \
             FROM per_call p WHERE c.call_id = p.call_id \
             RETURNING c.call_id, c.packets_received, c.last_sequence \
         ), outbox AS ( \
             INSERT INTO packet_outbox (call_ids, sequences) \
             SELECT array_agg(call_id), array_agg(sequence) FROM inserted HAVING count(*) > 0 \
             RETURNING id \
         ), cleared AS ( \
             DELETE FROM packet_outbox WHERE id = ANY($6::int8[]) \
         ) \
         SELECT l.call_id, l.state, l.sequence_start, l.last_sequence, l.packets_received, \
                l.total_packets, l.audio_encoding, l.sample_rate, c.packets_received AS packets_after, c.last_sequence AS last_after, \
                p.sequences, p.received, (SELECT id FROM outbox) AS outbox_id \
         FROM locked l LEFT JOIN counted c USING (call_id) LEFT JOIN per_call p USING (call_id)"
        )
    };
}

/// How [`store`] treats a call whose row another transaction holds locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    /// Wait for it (up to the transaction's `lock_timeout`).
    Wait,
    /// Leave the call out of this statement (it is absent from [`StoredBatch::calls`]).
    Skip,
}

/// A batch's write, in one statement (one round trip): locks the calls `call_ids` (sorted,
/// so that writers never deadlock), inserts the packets of those `IN_PROGRESS` at or past
/// their first sequence number (`ON CONFLICT DO NOTHING`: a stored key stays as first
/// stored), adds the inserted ones to their calls' counters, writes the `packet_outbox` row
/// naming them, and deletes the acknowledged outbox rows `acknowledged`. `rows` must hold
/// at most one packet per (call, sequence). With [`Locked::Skip`], calls locked elsewhere are
/// left out, their packets untouched.
///
/// Data-modifying `WITH` clauses all see the snapshot the statement started with, so the
/// locked rows are the calls as they were before the batch; the counter update reads the
/// insert's `RETURNING` rows, so duplicates are never counted.
pub async fn store(
    tx: &mut PgConnection,
    call_ids: &[&str],
    rows: &[NewRow<'_>],
    acknowledged: &[i64],
    locked: Locked,
) -> Result<StoredBatch, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        call_id: String,
        state: String,
        sequence_start: i64,
        last_sequence: Option<i64>,
        packets_received: i64,
        total_packets: Option<i64>,
        audio_encoding: String,
        sample_rate: Option<i32>,
        packets_after: Option<i64>,
        last_after: Option<i64>,
        sequences: Option<Vec<i64>>,
        received: Option<Vec<OffsetDateTime>>,
        outbox_id: Option<i64>,
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.call_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
    let data: Vec<&str> = rows.iter().map(|r| r.data).collect();
    let sent: Vec<f64> = rows.iter().map(|r| r.sent_at).collect();
    let encodings: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.format.map(|f| f.encoding().as_str()))
        .collect();
    let rates: Vec<Option<i32>> = rows
        .iter()
        .map(|r| r.format.and_then(rate_column))
        .collect();
    let sql = match locked {
        Locked::Wait => store_sql!(""),
        Locked::Skip => store_sql!("SKIP LOCKED"),
    };
    let found: Vec<Row> = sqlx::query_as(sql)
        .bind(call_ids)
        .bind(&ids)
        .bind(&seqs)
        .bind(&data)
        .bind(&sent)
        .bind(acknowledged)
        .bind(CallState::InProgress.as_str())
        .bind(&encodings)
        .bind(&rates)
        .fetch_all(tx)
        .await?;
    let mut batch = StoredBatch::default();
    for row in found {
        if batch.outbox.is_empty() {
            batch.outbox.extend(row.outbox_id);
        }
        let before = CallCounts {
            state: parse_state(&row.state)?,
            sequence_start: row.sequence_start,
            last_sequence: row.last_sequence,
            packets_received: row.packets_received,
            total_packets: row.total_packets,
            format: format_from_columns(&row.audio_encoding, row.sample_rate)?,
        };
        let inserted = row
            .sequences
            .unwrap_or_default()
            .into_iter()
            .zip(row.received.unwrap_or_default())
            .collect();
        batch.calls.push(StoredCall {
            call_id: row.call_id,
            packets_received: row.packets_after.unwrap_or(before.packets_received),
            last_sequence: row.last_after.or(before.last_sequence),
            before,
            inserted,
        });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(start: i64, last: Option<i64>, received: i64, total: Option<i64>) -> CallCounts {
        CallCounts {
            state: CallState::InProgress,
            sequence_start: start,
            last_sequence: last,
            packets_received: received,
            total_packets: total,
            format: AudioFormat::TEXT,
        }
    }

    #[test]
    fn missing_packets_count_from_the_call_start_to_the_highest_or_the_declared_total() {
        assert_eq!(counts(0, None, 0, None).missing_packets(), 0);
        assert_eq!(counts(0, Some(9), 10, None).missing_packets(), 0);
        assert_eq!(counts(0, Some(9), 7, None).missing_packets(), 3);
        assert_eq!(counts(0, Some(9), 10, Some(12)).missing_packets(), 2);
        assert_eq!(counts(1, Some(5), 5, None).missing_packets(), 0);
        assert_eq!(counts(1, Some(5), 5, Some(7)).missing_packets(), 2);
        assert_eq!(counts(0, None, 0, Some(5)).missing_packets(), 5);
    }
}
