//! Retrying serialization failures on the global path.
//!
//! A SERIALIZABLE database aborts one of two conflicting transactions with
//! SQLSTATE 40001 and expects the client to run it again from the start.
//! CockroachDB's guidance: retry the whole transaction, with exponential
//! backoff and jitter so the contenders do not collide again, and give up
//! after a bounded number of attempts.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// SQLSTATEs after which the whole transaction may simply run again:
/// serialization failure, and deadlock (PostgreSQL picks a victim).
pub const RETRYABLE: [&str; 2] = ["40001", "40P01"];

/// Whether `error` asks for the transaction to be retried.
pub fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| RETRYABLE.contains(&c.as_ref())),
        _ => false,
    }
}

/// Exponential backoff with full jitter: before retry `n` (1-based), sleep a
/// uniformly random time in `[0, min(cap, base * 2^(n-1))]`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The ceiling of the sleep before retry `n`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The sleep before retry `n`, given a uniformly random `unit` in [0, 1].
    pub fn delay_at(&self, n: u32, unit: f64) -> Duration {
        self.ceiling(n).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The sleep before retry `n`, randomly drawn.
    pub fn delay(&self, n: u32) -> Duration {
        let random = RandomState::new().hash_one(n);
        self.delay_at(n, (random >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1), Duration::from_millis(10));
        assert_eq!(b.ceiling(2), Duration::from_millis(20));
        assert_eq!(b.ceiling(5), Duration::from_millis(160));
        assert_eq!(b.ceiling(8), Duration::from_secs(1));
        assert_eq!(b.ceiling(1000), Duration::from_secs(1));
    }

    #[test]
    fn draws_are_jittered() {
        let b = Backoff::default();
        let draws: std::collections::HashSet<Duration> = (0..50).map(|_| b.delay(6)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    proptest! {
        #[test]
        fn delay_stays_within_its_ceiling(n in 0u32..100, unit in -1.0f64..2.0) {
            let b = Backoff::default();
            prop_assert!(b.delay_at(n, unit) <= b.ceiling(n));
            prop_assert!(b.delay(n) <= b.ceiling(n));
        }
    }
}
