//! A call's missing sequences, kept incrementally in `call_gaps` (one row per run of missing
//! sequence numbers below the highest received). A packet that arrives in order touches no
//! gap; one that skips ahead opens one; a late one shrinks or splits the one it lands in. So
//! the cost of a packet never depends on how many gaps its call already has (the multirange
//! this replaces was rewritten whole by every batch).
//!
//! [`fold`] is the arithmetic, pure and unit-tested; [`apply`] runs it for a batch's calls
//! inside the writer's transaction, under the calls' row locks.

use std::collections::{BTreeMap, HashMap};

use sqlx::PgConnection;

/// An inclusive run of missing sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gap {
    pub first: i64,
    pub last: i64,
}

/// What one batch changes in one call's gaps: rows to delete (by their first sequence), then
/// rows to insert.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GapChanges {
    pub removed: Vec<i64>,
    pub added: Vec<Gap>,
}

/// The gap changes of one call. `highest` is its highest sequence before the batch (`None`
/// before its first packet), `start` its first sequence number, `new` the sequences this
/// batch stored (sorted, distinct, none below `start`), and `containing` the existing gaps
/// that hold the new sequences at or below `highest` (each such sequence is in exactly one:
/// it was missing).
pub fn fold(highest: Option<i64>, start: i64, containing: &[Gap], new: &[i64]) -> GapChanges {
    let top = highest.unwrap_or(start - 1);
    let split = new.partition_point(|&s| s <= top);
    let (fills, tail) = new.split_at(split);
    let mut changes = GapChanges::default();
    let mut gaps = containing.to_vec();
    gaps.sort_unstable();
    for gap in gaps {
        let inside: Vec<i64> = fills
            .iter()
            .copied()
            .filter(|s| (gap.first..=gap.last).contains(s))
            .collect();
        if inside.is_empty() {
            continue;
        }
        changes.removed.push(gap.first);
        let mut cursor = gap.first;
        for filled in inside {
            if filled > cursor {
                changes.added.push(Gap {
                    first: cursor,
                    last: filled - 1,
                });
            }
            cursor = filled + 1;
        }
        if cursor <= gap.last {
            changes.added.push(Gap {
                first: cursor,
                last: gap.last,
            });
        }
    }
    let mut previous = top;
    for &sequence in tail {
        if sequence > previous + 1 {
            changes.added.push(Gap {
                first: previous + 1,
                last: sequence - 1,
            });
        }
        previous = sequence;
    }
    changes
}

/// What [`apply`] needs to know of a call: its highest sequence before the batch and its
/// first sequence number.
#[derive(Debug, Clone, Copy)]
pub struct Before {
    pub highest: Option<i64>,
    pub start: i64,
}

/// Updates `call_gaps` for the packets a batch stored (`stored`: call id → its new
/// sequences), and returns what changed, by call (calls whose gaps did not change are
/// absent). At most three statements, each over the batch's own rows; none at all for calls
/// whose packets arrived in order.
pub async fn apply(
    tx: &mut PgConnection,
    before: &HashMap<String, Before>,
    stored: &BTreeMap<String, Vec<i64>>,
) -> Result<HashMap<String, GapChanges>, sqlx::Error> {
    // The late packets: each lands in an existing gap.
    let (late_ids, late_seqs): (Vec<&str>, Vec<i64>) = stored
        .iter()
        .flat_map(|(id, seqs)| {
            let top = before[id].highest;
            seqs.iter()
                .filter(move |&&s| top.is_some_and(|t| s <= t))
                .map(move |&s| (id.as_str(), s))
        })
        .unzip();
    let mut containing: HashMap<String, Vec<Gap>> = HashMap::new();
    if !late_ids.is_empty() {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT DISTINCT g.call_id, g.first_missing, g.last_missing \
             FROM UNNEST($1::text[], $2::int8[]) AS k(call_id, seq) \
             CROSS JOIN LATERAL (SELECT call_id, first_missing, last_missing FROM call_gaps g \
                 WHERE g.call_id = k.call_id AND g.first_missing <= k.seq \
                 ORDER BY g.first_missing DESC LIMIT 1) g \
             WHERE g.last_missing >= k.seq",
        )
        .bind(&late_ids)
        .bind(&late_seqs)
        .fetch_all(&mut *tx)
        .await?;
        for (id, first, last) in rows {
            containing.entry(id).or_default().push(Gap { first, last });
        }
    }
    let mut changed = HashMap::new();
    let (mut removed_ids, mut removed_firsts) = (Vec::new(), Vec::new());
    let (mut added_ids, mut added_firsts, mut added_lasts) = (Vec::new(), Vec::new(), Vec::new());
    for (id, seqs) in stored {
        let call = before[id];
        let held = containing.get(id).map_or(&[][..], Vec::as_slice);
        let changes = fold(call.highest, call.start, held, seqs);
        for &first in &changes.removed {
            removed_ids.push(id.as_str());
            removed_firsts.push(first);
        }
        for gap in &changes.added {
            added_ids.push(id.as_str());
            added_firsts.push(gap.first);
            added_lasts.push(gap.last);
        }
        if changes != GapChanges::default() {
            changed.insert(id.clone(), changes);
        }
    }
    if !removed_ids.is_empty() {
        sqlx::query(
            "DELETE FROM call_gaps g USING UNNEST($1::text[], $2::int8[]) AS k(call_id, first) \
             WHERE g.call_id = k.call_id AND g.first_missing = k.first",
        )
        .bind(&removed_ids)
        .bind(&removed_firsts)
        .execute(&mut *tx)
        .await?;
    }
    if !added_ids.is_empty() {
        sqlx::query(
            "INSERT INTO call_gaps (call_id, first_missing, last_missing) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])",
        )
        .bind(&added_ids)
        .bind(&added_firsts)
        .bind(&added_lasts)
        .execute(&mut *tx)
        .await?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(first: i64, last: i64) -> Gap {
        Gap { first, last }
    }

    #[test]
    fn packets_in_order_touch_no_gap() {
        assert_eq!(fold(None, 0, &[], &[0, 1, 2]), GapChanges::default());
        assert_eq!(fold(Some(2), 0, &[], &[3, 4]), GapChanges::default());
        assert_eq!(fold(None, 1, &[], &[1, 2]), GapChanges::default());
    }

    #[test]
    fn skipping_ahead_opens_gaps_including_before_the_first_packet() {
        let changes = fold(None, 0, &[], &[2, 3, 7]);
        assert_eq!(changes.added, [gap(0, 1), gap(4, 6)]);
        assert!(changes.removed.is_empty());
        // Counting from 1: nothing is missing before 1.
        assert_eq!(fold(None, 1, &[], &[1, 3]).added, [gap(2, 2)]);
    }

    #[test]
    fn late_packets_shrink_or_split_the_gap_they_land_in() {
        // Gap 4..=9: 4 shrinks it from the left, 9 from the right, 6 splits it.
        let changes = fold(Some(10), 0, &[gap(4, 9)], &[4, 6, 9]);
        assert_eq!(changes.removed, [4]);
        assert_eq!(changes.added, [gap(5, 5), gap(7, 8)]);
        // Filling a gap of one removes it.
        let changes = fold(Some(10), 0, &[gap(3, 3)], &[3]);
        assert_eq!(
            changes,
            GapChanges {
                removed: vec![3],
                added: vec![]
            }
        );
    }

    #[test]
    fn late_and_new_packets_in_one_batch() {
        let changes = fold(Some(5), 0, &[gap(1, 2), gap(4, 4)], &[2, 4, 8]);
        assert_eq!(changes.removed, [1, 4]);
        assert_eq!(changes.added, [gap(1, 1), gap(6, 7)]);
    }

    #[test]
    fn every_other_packet_keeps_one_gap_per_loss() {
        // 0, 2, 4, ...: each batch of one adds exactly one gap, whatever came before.
        let mut highest = None;
        for s in (0..20).step_by(2) {
            let changes = fold(highest, 0, &[], &[s]);
            assert_eq!(changes.added.len(), usize::from(s > 0));
            highest = Some(s);
        }
    }

    /// The gaps of a set of received sequences: every run missing below the highest.
    fn model_gaps(received: &std::collections::BTreeSet<i64>, start: i64) -> Vec<Gap> {
        let mut gaps = Vec::new();
        let mut next = start;
        for &s in received {
            if s > next {
                gaps.push(gap(next, s - 1));
            }
            next = s + 1;
        }
        gaps
    }

    proptest::proptest! {
        /// Batch after batch of arbitrary sequences (late, early, repeated across batches),
        /// the gaps kept by folding each batch's changes are exactly the runs missing from the
        /// set received so far.
        #[test]
        fn folding_batches_keeps_exactly_the_missing_runs(
            start in 0i64..=1,
            batches in proptest::collection::vec(
                proptest::collection::btree_set(0i64..200, 1..20), 1..30),
        ) {
            let mut received = std::collections::BTreeSet::new();
            let mut kept: Vec<Gap> = Vec::new();
            for batch in batches {
                // What the writer stores: the sequences not stored yet, from `start` on.
                let new: Vec<i64> = batch
                    .into_iter()
                    .filter(|s| *s >= start && !received.contains(s))
                    .collect();
                if new.is_empty() {
                    continue;
                }
                let highest = received.last().copied();
                let containing: Vec<Gap> = kept
                    .iter()
                    .copied()
                    .filter(|g| new.iter().any(|s| (g.first..=g.last).contains(s)))
                    .collect();
                let changes = fold(highest, start, &containing, &new);
                kept.retain(|g| !changes.removed.contains(&g.first));
                kept.extend(changes.added);
                kept.sort_unstable();
                received.extend(new);
                proptest::prop_assert_eq!(&kept, &model_gaps(&received, start));
            }
        }
    }
}
