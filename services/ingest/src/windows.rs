//! The first missing ranges of lossy calls, remembered between batches by the writer task
//! that writes them, so that answering a packet of a lossy call does not read its first 100
//! gaps from Postgres every time (that read was 43% of the writer's statement time with every
//! other packet lost: docs/benchmarks.md).
//!
//! A window is trusted only while nothing else has written the call: it remembers the call's
//! `packets_received` after the batch that last saw it, and the next batch checks that
//! number under the call's row lock. Another replica (or anything else) adding packets
//! changes it, and the window is read again. Within a trusted window, a batch's own gap
//! changes ([`GapChanges`]) are applied exactly; when they would need a gap beyond the
//! window (one it never held), it is read again too.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::{
    gaps::{Gap, GapChanges},
    writer::MAX_MISSING_RANGES_IN_RESPONSE,
};

const WINDOW: usize = MAX_MISSING_RANGES_IN_RESPONSE as usize;

/// Calls remembered at most (each up to 100 gaps of 16 bytes): beyond, all are forgotten.
const MAX_CALLS: usize = 5_000;

/// One call's first gaps.
#[derive(Debug, Clone)]
struct Window {
    /// The call's `packets_received` when these gaps were right.
    received: i64,
    /// Its lowest gaps, at most [`WINDOW`].
    gaps: Vec<Gap>,
    /// Whether `gaps` is every gap the call has.
    complete: bool,
    used: Instant,
}

/// The windows of one writer task's lossy calls.
#[derive(Debug, Default)]
pub struct Windows {
    calls: HashMap<String, Window>,
}

impl Windows {
    /// The call's first gaps after a batch that moved its `packets_received` from `before` to
    /// `after` and changed its gaps by `changes`; `None` when they must be read again.
    pub fn advance(
        &mut self,
        call_id: &str,
        before: i64,
        after: i64,
        changes: Option<&GapChanges>,
    ) -> Option<Vec<Gap>> {
        let window = self.calls.get_mut(call_id)?;
        if window.received != before {
            self.calls.remove(call_id);
            return None;
        }
        if let Some(changes) = changes {
            match apply(&window.gaps, window.complete, changes) {
                Some((gaps, complete)) => {
                    window.gaps = gaps;
                    window.complete = complete;
                }
                None => {
                    self.calls.remove(call_id);
                    return None;
                }
            }
        }
        window.received = after;
        window.used = Instant::now();
        Some(window.gaps.clone())
    }

    /// Remembers gaps read from Postgres: the call's lowest, at most [`WINDOW`], when it had
    /// received `received` packets.
    pub fn fill(&mut self, call_id: &str, received: i64, gaps: Vec<Gap>) {
        if self.calls.len() >= MAX_CALLS && !self.calls.contains_key(call_id) {
            self.calls.clear();
        }
        let complete = gaps.len() < WINDOW;
        self.calls.insert(
            call_id.to_owned(),
            Window {
                received,
                gaps,
                complete,
                used: Instant::now(),
            },
        );
    }

    /// Forgets a call (it has no gaps any more, or a batch failed).
    pub fn forget(&mut self, call_id: &str) {
        self.calls.remove(call_id);
    }

    /// Forgets every call (after a failed batch: what it changed did not happen).
    pub fn clear(&mut self) {
        self.calls.clear();
    }

    /// Forgets the calls no batch has touched since `before`.
    pub fn prune(&mut self, before: Instant) {
        self.calls.retain(|_, w| w.used >= before);
    }
}

/// A window after a batch's changes, or `None` if a gap beyond it could now belong in it.
fn apply(gaps: &[Gap], complete: bool, changes: &GapChanges) -> Option<(Vec<Gap>, bool)> {
    // Every gap the call has beyond the window starts after `bound`.
    let bound = gaps.last().map_or(i64::MIN, |g| g.first);
    let mut known: Vec<Gap> = gaps
        .iter()
        .copied()
        .filter(|g| !changes.removed.contains(&g.first))
        .chain(changes.added.iter().copied())
        .collect();
    known.sort_unstable();
    known.dedup();
    if complete {
        let complete = known.len() <= WINDOW;
        known.truncate(WINDOW);
        return Some((known, complete));
    }
    // Unknown gaps lie beyond `bound`: the window is right only if it fills up below it.
    if known.iter().filter(|g| g.first <= bound).count() >= WINDOW {
        known.truncate(WINDOW);
        Some((known, false))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(first: i64, last: i64) -> Gap {
        Gap { first, last }
    }

    fn changes(removed: &[i64], added: &[Gap]) -> GapChanges {
        GapChanges {
            removed: removed.to_vec(),
            added: added.to_vec(),
        }
    }

    #[test]
    fn a_trusted_window_follows_the_batches_own_changes() {
        let mut windows = Windows::default();
        windows.fill("a", 10, vec![gap(1, 1), gap(3, 5)]);
        // A late packet splits [3, 5] at 4; a new packet opens [11, 11].
        let moved = changes(&[3], &[gap(3, 3), gap(5, 5), gap(11, 11)]);
        let after = windows.advance("a", 10, 12, Some(&moved)).unwrap();
        assert_eq!(after, [gap(1, 1), gap(3, 3), gap(5, 5), gap(11, 11)]);
        // In-order packets change nothing but the count.
        assert_eq!(windows.advance("a", 12, 13, None).unwrap().len(), 4);
    }

    #[test]
    fn a_window_is_read_again_when_someone_else_wrote_the_call() {
        let mut windows = Windows::default();
        windows.fill("a", 10, vec![gap(1, 1)]);
        assert_eq!(windows.advance("a", 11, 12, None), None);
        // And it is gone until filled again.
        assert_eq!(windows.advance("a", 12, 13, None), None);
        assert_eq!(windows.advance("unknown", 0, 1, None), None);
    }

    #[test]
    fn a_full_window_stays_the_lowest_gaps() {
        let full: Vec<Gap> = (0..WINDOW as i64)
            .map(|i| gap(2 * i + 1, 2 * i + 1))
            .collect();
        let mut windows = Windows::default();
        windows.fill("a", 500, full.clone());
        // A gap above the window is beyond it: the window is unchanged.
        let above = changes(&[], &[gap(10_001, 10_001)]);
        assert_eq!(windows.advance("a", 500, 501, Some(&above)).unwrap(), full);
        // Filling a gap inside a full window would let an unknown gap in: read again.
        let filled = changes(&[1], &[]);
        assert_eq!(windows.advance("a", 501, 502, Some(&filled)), None);
    }

    #[test]
    fn a_complete_window_that_grows_past_the_limit_keeps_the_lowest() {
        let gaps: Vec<Gap> = (0..WINDOW as i64 - 1)
            .map(|i| gap(2 * i + 1, 2 * i + 1))
            .collect();
        let mut windows = Windows::default();
        windows.fill("a", 300, gaps);
        let two_more = changes(&[], &[gap(1_001, 1_001), gap(1_003, 1_003)]);
        let after = windows.advance("a", 300, 302, Some(&two_more)).unwrap();
        assert_eq!(after.len(), WINDOW);
        assert_eq!(after.last(), Some(&gap(1_001, 1_001)));
        // No longer complete: removing one now needs a read.
        assert_eq!(
            windows.advance("a", 302, 303, Some(&changes(&[1], &[]))),
            None
        );
    }

    #[test]
    fn pruning_forgets_idle_calls() {
        let mut windows = Windows::default();
        windows.fill("a", 1, vec![gap(0, 0)]);
        windows.prune(Instant::now() + std::time::Duration::from_secs(1));
        assert_eq!(windows.advance("a", 1, 2, None), None);
    }

    proptest::proptest! {
        /// Whatever the batches (and whoever else writes the call between them), a window
        /// either answers exactly the call's lowest gaps or asks to be read again.
        #[test]
        fn a_window_is_exact_or_asks_for_a_read(
            steps in proptest::collection::vec(
                (proptest::collection::btree_set(0i64..400, 1..12), proptest::bool::weighted(0.2)),
                1..40),
        ) {
            use std::collections::BTreeSet;
            let all_gaps = |received: &BTreeSet<i64>| -> Vec<Gap> {
                let mut gaps = Vec::new();
                let mut next = 0;
                for &s in received {
                    if s > next {
                        gaps.push(gap(next, s - 1));
                    }
                    next = s + 1;
                }
                gaps
            };
            let lowest = |received: &BTreeSet<i64>| -> Vec<Gap> {
                let mut gaps = all_gaps(received);
                gaps.truncate(WINDOW);
                gaps
            };
            let mut windows = Windows::default();
            let mut received = BTreeSet::new();
            for (batch, by_someone_else) in steps {
                let before_gaps = all_gaps(&received);
                let before = received.len() as i64;
                received.extend(batch);
                let after = received.len() as i64;
                if by_someone_else {
                    // Another replica wrote the call: this writer saw nothing of it.
                    continue;
                }
                let after_gaps = all_gaps(&received);
                let changes = GapChanges {
                    removed: before_gaps
                        .iter()
                        .filter(|g| !after_gaps.contains(g))
                        .map(|g| g.first)
                        .collect(),
                    added: after_gaps
                        .iter()
                        .filter(|g| !before_gaps.contains(g))
                        .copied()
                        .collect(),
                };
                match windows.advance("a", before, after, Some(&changes)) {
                    Some(window) => proptest::prop_assert_eq!(window, lowest(&received)),
                    None => windows.fill("a", after, lowest(&received)),
                }
            }
        }
    }
}
