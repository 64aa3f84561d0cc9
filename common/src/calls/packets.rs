//! Ingest's writer and the `calls` row: a batch locks its calls (creating the new ones) and
//! adds its packets to their counters. The gaps (`call_gaps`) are ingest's own table.

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::{CallState, calls::parse_state};

/// A call as a packet batch sees it under its row lock.
#[derive(Debug, Clone)]
pub struct CallCounts {
    pub state: CallState,
    pub sequence_start: i64,
    pub last_sequence: Option<i64>,
    pub packets_received: i64,
    pub total_packets: Option<i64>,
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

/// Locks the calls among `ids` that exist, in id order (two writers never deadlock), and
/// returns them by id.
pub async fn lock(
    tx: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, CallCounts>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Locked {
        call_id: String,
        state: String,
        sequence_start: i64,
        last_sequence: Option<i64>,
        packets_received: i64,
        total_packets: Option<i64>,
    }
    let rows: Vec<Locked> = sqlx::query_as(
        "SELECT call_id, state, sequence_start, last_sequence, packets_received, total_packets \
         FROM calls WHERE call_id = ANY($1) ORDER BY call_id FOR NO KEY UPDATE",
    )
    .bind(ids)
    .fetch_all(tx)
    .await?;
    rows.into_iter()
        .map(|row| {
            let counts = CallCounts {
                state: parse_state(&row.state)?,
                sequence_start: row.sequence_start,
                last_sequence: row.last_sequence,
                packets_received: row.packets_received,
                total_packets: row.total_packets,
            };
            Ok((row.call_id, counts))
        })
        .collect()
}

/// Creates the calls among `ids` that do not exist (`IN_PROGRESS`, numbered from
/// `sequence_start`); returns the ids this statement created (another replica may have created
/// some a moment before).
pub async fn create(
    tx: &mut PgConnection,
    ids: &[&str],
    sequence_start: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO calls (call_id, state, sequence_start) \
         SELECT id, $2, $3 FROM unnest($1::text[]) AS id \
         ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
    )
    .bind(ids)
    .bind(CallState::INITIAL.as_str())
    .bind(sequence_start)
    .fetch_all(tx)
    .await
}

/// A call's counters after [`add_packets`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Counted {
    pub call_id: String,
    pub packets_received: i64,
    pub last_sequence: Option<i64>,
}

/// Adds newly stored packets (`call_ids[i]`, `sequences[i]`) to their calls' counters and
/// first/last sequence, and marks the calls as having just received packets.
pub async fn add_packets(
    tx: &mut PgConnection,
    call_ids: &[&str],
    sequences: &[i64],
) -> Result<Vec<Counted>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE calls c SET packets_received = c.packets_received + v.n, \
             first_sequence = LEAST(c.first_sequence, v.lo), \
             last_sequence = GREATEST(c.last_sequence, v.hi), \
             last_packet_at = now() \
         FROM (SELECT call_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi \
               FROM UNNEST($1::text[], $2::int8[]) AS u(call_id, seq) GROUP BY call_id) v \
         WHERE c.call_id = v.call_id \
         RETURNING c.call_id, c.packets_received, c.last_sequence",
    )
    .bind(call_ids)
    .bind(sequences)
    .fetch_all(tx)
    .await
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
