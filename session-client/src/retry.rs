//! Retries with exponential backoff for the calls that are safe to repeat.
//!
//! Written out rather than taken from tower's retry layer: the policy is a
//! dozen lines (retry UNAVAILABLE only, reads only), and doing it here keeps
//! the decision of which calls may repeat next to the calls themselves.

use std::{future::Future, hash::BuildHasher, time::Duration};

use tonic::{Code, Status};

/// How reads are retried.
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

/// A uniformly spread duration in `0..=max`.
fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Each RandomState has fresh random keys: randomness enough for jitter
    // without a `rand` dependency.
    let random = std::collections::hash_map::RandomState::new().hash_one(0_u8);
    Duration::from_nanos(random % nanos.saturating_add(1))
}

/// Runs `attempt` until it succeeds, fails with anything but UNAVAILABLE, or
/// `policy.max_attempts` attempts have been made, pausing between attempts.
///
/// Only for calls that are safe to repeat: an UNAVAILABLE answer may come
/// after the server did the work.
pub(crate) async fn retrying<T, F, Fut>(policy: &RetryPolicy, mut attempt: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut made = 1;
    loop {
        match attempt().await {
            Err(status) if status.code() == Code::Unavailable && made < policy.max_attempts => {
                tokio::time::sleep(policy.backoff(made)).await;
                made += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

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

    /// UNAVAILABLE is retried until max_attempts attempts were made in all.
    #[tokio::test]
    async fn unavailable_is_retried_until_attempts_run_out() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = retrying(&policy(3), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Status::unavailable("down"))
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A success after a failure is returned at once.
    #[tokio::test]
    async fn success_after_a_failure_ends_the_loop() {
        let calls = AtomicU32::new(0);
        let result = retrying(&policy(5), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(Status::unavailable("down")),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Codes other than UNAVAILABLE, and a one-attempt policy, get a single attempt.
    #[tokio::test]
    async fn other_codes_and_single_attempt_policies_are_not_retried() {
        for (code, max_attempts) in [
            (Code::InvalidArgument, 3),
            (Code::DeadlineExceeded, 3),
            (Code::Cancelled, 3),
            (Code::Unavailable, 1),
        ] {
            let calls = AtomicU32::new(0);
            let result: Result<(), Status> = retrying(&policy(max_attempts), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Status::new(code, "no"))
            })
            .await;
            assert_eq!(result.unwrap_err().code(), code);
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{code:?}");
        }
    }
}
