//! The one rate limit on log lines: at most so many lines per interval, the
//! rest counted, and the count handed to the next line written. The RPC log
//! (per gRPC code), the Redis failure and contention warnings, and the
//! failed-accept warning all go through it, so a flood of any of them writes
//! a bounded number of lines that still account for every event.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Admits at most `lines` log lines per `interval`; lock-free and
/// approximate at a window's edge (two threads may both open a window), exact
/// in the count of lines left out.
///
/// A window opens with the first line asked for once the last window has
/// lasted `interval`, so two windows never overlap and a window with a single
/// line means at least `interval` between two lines. The time is passed in
/// (`now`), so tests step it instead of sleeping, and callers on tokio's
/// clock (paused in tests) pass theirs.
#[derive(Debug)]
pub(crate) struct LogGate {
    /// Lines admitted per window.
    lines: u32,
    /// How long a window lasts.
    interval: Duration,
    /// The first `now` asked about: the times below count from it. Set once;
    /// after that reading it is one atomic load.
    origin: OnceLock<Instant>,
    /// When the current window opened, in nanoseconds since `origin`.
    opened: AtomicU64,
    /// Lines asked for in the current window, written or not.
    asked: AtomicU32,
    /// Lines left out since the last one written.
    suppressed: AtomicU64,
}

impl LogGate {
    /// A gate that admits `lines` lines per `interval`; `const` so that a
    /// gate can be a `static`.
    pub(crate) const fn new(lines: u32, interval: Duration) -> Self {
        Self {
            lines,
            interval,
            origin: OnceLock::new(),
            opened: AtomicU64::new(0),
            asked: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` when it may, `n`
    /// being how many were left out since the last one written; `None` when
    /// the window's lines are spent (the line is counted as left out).
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let origin = *self.origin.get_or_init(|| now);
        // 584 years of nanoseconds fit in a u64.
        let at =
            u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX);
        let opened = self.opened.load(Relaxed);
        if Duration::from_nanos(at.saturating_sub(opened)) >= self.interval
            && self
                .opened
                .compare_exchange(opened, at, Relaxed, Relaxed)
                .is_ok()
        {
            self.asked.store(0, Relaxed);
        }
        if self.asked.fetch_add(1, Relaxed) < self.lines {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// The first lines of a window pass, the rest are counted exactly, and
    /// the count goes with the next line written, then starts again at 0.
    #[test]
    fn bounds_lines_and_counts_the_rest() {
        let gate = LogGate::new(20, SECOND);
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| gate.admit(t0).is_some()).count();
        assert_eq!(admitted, 20);
        assert_eq!(gate.admit(t0 + SECOND / 2), None);
        assert_eq!(gate.admit(t0 + SECOND), Some(81));
        assert_eq!(gate.admit(t0 + SECOND), Some(0));
    }

    /// A window lasts `interval` from its first line: a line just before
    /// that is left out, one at it opens the next window, which starts where
    /// that line came, not on a grid.
    #[test]
    fn a_window_opens_with_the_first_line_after_the_last_closed() {
        let gate = LogGate::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0), Some(0));
        assert_eq!(gate.admit(t0 + Duration::from_millis(9_999)), None);
        let t1 = t0 + Duration::from_secs(15);
        assert_eq!(gate.admit(t1), Some(1));
        // 20 s after the first line, but only 5 s after the last.
        assert_eq!(gate.admit(t0 + Duration::from_secs(20)), None);
        assert_eq!(gate.admit(t1 + Duration::from_secs(10)), Some(1));
    }

    /// A late thread with an older `now` does not reopen the window: its
    /// lines count in the current one.
    #[test]
    fn an_older_now_does_not_reopen_the_window() {
        let gate = LogGate::new(2, SECOND);
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0), Some(0));
        assert_eq!(gate.admit(t0 + SECOND), Some(0));
        let late = (0..100)
            .filter(|_| gate.admit(t0 + SECOND / 2).is_some())
            .count();
        assert_eq!(late, 1, "only the current window's second line");
        assert_eq!(gate.admit(t0 + 2 * SECOND), Some(99));
    }

    /// Over many threads, the lines written plus those they report left out
    /// plus those not yet reported are all the lines asked for.
    #[test]
    fn the_count_is_exact_across_threads() {
        let gate = LogGate::new(3, SECOND);
        let t0 = Instant::now();
        let (written, reported) = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4u32)
                .map(|worker| {
                    let gate = &gate;
                    scope.spawn(move || {
                        let (mut written, mut reported) = (0u64, 0u64);
                        for i in 0..10_000u32 {
                            let now = t0 + SECOND * ((worker + i) / 1_000);
                            if let Some(suppressed) = gate.admit(now) {
                                written += 1;
                                reported += suppressed;
                            }
                        }
                        (written, reported)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap())
                .fold((0, 0), |(w, r), (dw, dr)| (w + dw, r + dr))
        });
        let pending = gate.suppressed.load(Relaxed);
        assert!(written >= 3, "{written} lines");
        assert_eq!(written + reported + pending, 40_000);
    }
}
