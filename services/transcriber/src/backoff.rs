//! The retry schedule: attempt n waits BASE x 2^(n-1), capped at MAX, with +-20% jitter so
//! that calls that failed together do not retry together. JetStream does the waiting (the
//! message is nak'ed with this delay); nothing sleeps inside a delivery.

use std::time::Duration;

use rand::Rng;

/// Jitter applied around the nominal delay, as a fraction.
pub const JITTER: f64 = 0.2;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay without jitter before the attempt after attempt `attempt` (1-based).
    pub fn nominal(&self, attempt: i32) -> Duration {
        let exponent = attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.base
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The nominal delay with +-20% jitter.
    pub fn delay(&self, attempt: i32, rng: &mut impl Rng) -> Duration {
        let factor = rng.random_range((1.0 - JITTER)..=(1.0 + JITTER));
        self.nominal(attempt).mul_f64(factor)
    }

    /// The delay when the provider asked for `hint` (`Retry-After`) and the schedule says
    /// `scheduled`: the longer of the two, with the hint capped at MAX, so that no answer of a
    /// provider parks a call for longer than the schedule ever would.
    pub fn honouring(&self, hint: Option<Duration>, scheduled: Duration) -> Duration {
        hint.map_or(scheduled, |hint| hint.min(self.max).max(scheduled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let secs: Vec<u64> = (1..=9).map(|n| SCHEDULE.nominal(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(SCHEDULE.nominal(1000), Duration::from_secs(60));
    }

    #[test]
    fn a_retry_after_hint_is_honoured_up_to_the_cap() {
        let scheduled = Duration::from_secs(2);
        let honour = |hint| SCHEDULE.honouring(hint, scheduled);
        assert_eq!(honour(None), scheduled);
        assert_eq!(honour(Some(Duration::from_secs(1))), scheduled);
        assert_eq!(
            honour(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            honour(Some(Duration::from_secs(99_999_999_999))),
            SCHEDULE.max
        );
        assert_eq!(honour(Some(Duration::MAX)), SCHEDULE.max);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let mut rng = rand::rng();
        for attempt in 1..=10 {
            let nominal = SCHEDULE.nominal(attempt).as_secs_f64();
            for _ in 0..100 {
                let d = SCHEDULE.delay(attempt, &mut rng).as_secs_f64();
                assert!(
                    d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                    "{attempt}: {d}"
                );
            }
        }
    }
}
