//! Retry pacing and bounds: exponential backoff with jitter within a call,
//! and a retry budget (token bucket) across calls.
//!
//! Written out rather than taken from tower's retry layer: which calls may
//! repeat, and when, is decided by the attempt loop (see `call.rs`); this
//! module only says how long to wait, whether the budget allows it, and
//! where a deadline `after` from now falls ([`later`]).

use std::{
    hash::BuildHasher,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How retries are paced within one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Attempts in all, the first included; 1 turns retries off.
    pub(crate) max_attempts: u32,
    /// The pause before the first retry, before jitter.
    pub(crate) initial_backoff: Duration,
    /// The longest pause between two attempts.
    pub(crate) max_backoff: Duration,
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1 for the first): the initial
    /// backoff doubled per retry, capped at the maximum, with "equal jitter":
    /// between half and all of that, so clients that failed together spread
    /// out, yet each still waits at least half the nominal pause.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        half + jitter(ceiling - half)
    }

    fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2_u32.saturating_pow(retry.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// `after` from now; a year at most, so that a huge timeout (`Duration::MAX`
/// for "no limit") cannot overflow the clock.
pub(crate) fn later(after: Duration) -> Instant {
    later_than(Instant::now(), after)
}

/// `after` from `now`, capped as [`later`].
pub(crate) fn later_than(now: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now + after.min(FAR)
}

/// A uniformly spread duration in `0..=max`.
fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random() % nanos.saturating_add(1))
}

/// A random number, for jitter and the balancer's picks.
pub(crate) fn random() -> u64 {
    // Each RandomState has fresh random keys: randomness enough for jitter
    // without a `rand` dependency.
    std::collections::hash_map::RandomState::new().hash_one(0_u8)
}

/// The retry budget shared by every call of a client (and its clones), as
/// gRPC's retry throttling: tokens start full; each attempt that fails with a
/// retryable failure takes one (except an endpoint's own failure, a broken
/// connection, retried on another endpoint: `call.rs` decides), each success gives back `ratio` of one; a
/// retry is made only while more than half the tokens are left. So when most
/// calls fail (an outage) retries stop, and calls cost one attempt each
/// instead of `max_attempts`; they resume as successes refill the bucket.
#[derive(Debug)]
pub(crate) struct RetryThrottle {
    /// In thousandths of a token.
    tokens: AtomicU32,
    max: u32,
    ratio: u32,
}

impl RetryThrottle {
    /// A full bucket of `max_tokens`, refilled by `token_ratio` per success
    /// (kept to the thousandth, as gRPC does).
    pub(crate) fn new(max_tokens: u32, token_ratio: f64) -> Self {
        let max = max_tokens.saturating_mul(1000);
        // The builder checked 0 < ratio <= max_tokens, so this fits.
        let ratio = (token_ratio * 1000.0).round() as u32;
        Self {
            tokens: AtomicU32::new(max),
            max,
            ratio: ratio.max(1),
        }
    }

    /// An attempt failed with a failure worth retrying.
    pub(crate) fn failed(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
    }

    /// An attempt succeeded.
    pub(crate) fn succeeded(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(self.ratio).min(self.max))
            });
    }

    /// Whether a retry may be made now.
    pub(crate) fn allows_retry(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > self.max / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff doubles per retry up to the cap, and jitter keeps it within [half, all].
    #[test]
    fn backoff_doubles_up_to_the_cap_with_at_least_half_kept() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(1000),
        };
        let ceilings: Vec<u128> = (1..=7).map(|r| policy.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, [50, 100, 200, 400, 800, 1000, 1000]);
        for retry in 1..=7 {
            for _ in 0..50 {
                let pause = policy.backoff(retry);
                let ceiling = policy.ceiling(retry);
                assert!(
                    pause >= ceiling / 2 && pause <= ceiling,
                    "{pause:?} vs {ceiling:?}"
                );
            }
        }
        // Huge retry numbers saturate instead of overflowing.
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_millis(1000));
    }

    /// The budget allows retries while more than half full, drains by one
    /// per failure and refills by the ratio per success.
    #[test]
    fn the_retry_budget_drains_on_failures_and_refills_on_successes() {
        let throttle = RetryThrottle::new(4, 0.5);
        assert!(throttle.allows_retry());
        throttle.failed(); // 3 left
        assert!(throttle.allows_retry());
        throttle.failed(); // 2 left: not more than half
        assert!(!throttle.allows_retry());
        throttle.failed();
        throttle.failed();
        throttle.failed(); // floors at 0
        for _ in 0..4 {
            throttle.succeeded(); // 0.5 each: 2 left
        }
        assert!(!throttle.allows_retry());
        throttle.succeeded(); // 2.5
        assert!(throttle.allows_retry());
        for _ in 0..100 {
            throttle.succeeded();
        }
        assert_eq!(
            throttle.tokens.load(Ordering::Relaxed),
            4000,
            "capped at max"
        );
    }
}
