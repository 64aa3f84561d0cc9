//! The bound on audio in memory: calls in flight hold their audio (packets, decoded audio, the
//! request body) until the AI answers, so a high concurrency must not mean unbounded memory. A
//! call takes budget for its stored size before it is loaded, waits (acknowledging progress)
//! while the budget is spent, and gives it back when its attempt ends. Written here because a
//! byte-weighted semaphore is a few lines over tokio's counting one.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Budget is counted in KiB, so that any byte total fits a semaphore's `u32` acquisitions.
const UNIT: u64 = 1024;

#[derive(Clone)]
pub struct AudioBudget {
    units: Arc<Semaphore>,
    total: u32,
}

/// Budget held by one call; given back when dropped.
pub struct Held {
    _units: OwnedSemaphorePermit,
}

impl AudioBudget {
    /// A budget of `bytes` (`TRANSCRIBE_MAX_AUDIO_IN_FLIGHT_BYTES`).
    pub fn new(bytes: u64) -> Self {
        let total = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        AudioBudget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// What a call of `bytes` takes: at least one unit, at most the whole budget (a call larger
    /// than the budget is refused before it gets here; the cap is belt and braces).
    fn units_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.total)
    }

    /// Waits until `bytes` of audio fit, and holds them.
    pub async fn take(&self, bytes: u64) -> Held {
        let units = self.units_for(bytes);
        if self.units.available_permits() < units as usize {
            metrics::counter!("switchboard_transcriber_audio_budget_waits_total").increment(1);
        }
        let permit = self
            .units
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        Held { _units: permit }
    }

    /// Bytes of budget free now.
    pub fn available_bytes(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn calls_wait_until_their_audio_fits_and_give_it_back() {
        let budget = AudioBudget::new(10 * UNIT);
        let first = budget.take(6 * UNIT).await;
        assert_eq!(budget.available_bytes(), 4 * UNIT);
        // 5 KiB does not fit beside the first call: it waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.take(5 * UNIT)).await;
        assert!(waiting.is_err());
        drop(first);
        let second = budget.take(5 * UNIT).await;
        assert_eq!(budget.available_bytes(), 5 * UNIT);
        drop(second);
        assert_eq!(budget.available_bytes(), 10 * UNIT);
    }

    #[tokio::test]
    async fn a_tiny_call_takes_one_unit_and_a_huge_one_the_whole_budget() {
        let budget = AudioBudget::new(4 * UNIT);
        assert_eq!(budget.units_for(1), 1);
        assert_eq!(budget.units_for(0), 1);
        assert_eq!(budget.units_for(u64::MAX), 4);
        let all = budget.take(u64::MAX).await;
        assert_eq!(budget.available_bytes(), 0);
        drop(all);
    }
}
