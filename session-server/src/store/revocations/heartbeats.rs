//! This process's heartbeats on the revocation channel: published on each
//! master with that master's clock (`scripts/heartbeat.lua`), and read back
//! until a beat came back from every master over that master's own
//! connection (see the parent module's docs for why they go through Redis).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::RedisClock;
use crate::{error::Error, store::Store};

impl Store {
    /// Publishes a numbered heartbeat on `channel` every `every`, on each
    /// master in `masters` (`<own><seq>:<index>:<redis_time_ms>`, the time
    /// read by the master in the script that publishes it), as the scripts
    /// publish revocations; on a cluster also checks that the masters are
    /// still those, and says on `changed` when they are not, or when one of
    /// them answers that it is a replica now (the script's role check).
    pub(super) async fn publish_heartbeats(
        self,
        channel: String,
        own: String,
        every: Duration,
        masters: Vec<Option<String>>,
        changed: tokio::sync::mpsc::Sender<()>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused_logged = false;
        let cluster = masters.iter().any(Option::is_some);
        for seq in 0u64.. {
            tick.tick().await;
            let Ok(mut op) = self.op("publish_heartbeat").await else {
                continue;
            };
            if cluster
                && let Ok(Some(now)) = op.cluster_masters().await
                && now.iter().map(Some).ne(masters.iter().map(Option::as_ref))
            {
                let _ = changed.try_send(());
                return;
            }
            for (index, master) in masters.iter().enumerate() {
                // EVAL rather than EVALSHA: once a beat per master, the
                // script's hashing costs Redis nothing worth a NOSCRIPT
                // round trip after each restart or failover, and EVAL is
                // told apart from the request path's EVALSHA in Redis's
                // command statistics.
                let mut beat = redis::cmd("EVAL");
                beat.arg(HEARTBEAT_SCRIPT)
                    .arg(0)
                    .arg(&channel)
                    .arg(format!("{own}{seq}:{index}"))
                    .arg(if cluster { "1" } else { "0" });
                // A failed beat shows as a missing heartbeat; the store
                // records the error. A refusal is a misconfiguration worth
                // saying once.
                match op.run_on(master.as_deref(), &beat).await {
                    // The node is a replica now: a failover demoted it
                    // before redis-rs's view of the masters caught up. Its
                    // beat would have come back and vouched for a
                    // subscription that no longer hears its slots'
                    // revocations first-hand, so none is sent: the stream
                    // subscribes again on the new masters (and resets).
                    // redis-rs learns of a failover from a redirect only,
                    // and PING (how the masters are listed) is answered by
                    // a replica too: a keyed read on the demoted node is
                    // answered MOVED, on which redis-rs rebuilds its slot
                    // map, so the next subscription lists the new masters
                    // even when no call has touched those slots.
                    Ok(-1) => {
                        let mut nudge = redis::cmd("EXISTS");
                        nudge.arg(&channel);
                        let _ = op.run_on(master.as_deref(), &nudge).await;
                        let _ = changed.try_send(());
                        return;
                    }
                    Err(Error::Internal(cause)) if !refused_logged => {
                        refused_logged = true;
                        tracing::error!(
                            channel = %channel,
                            error = %cause,
                            "revocation stream: Redis refused a PUBLISH on the revocation channel; \
                             revocations fail the same way: grant the Redis user `&<channel>`"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The heartbeat script (`scripts/heartbeat.lua`).
const HEARTBEAT_SCRIPT: &str = include_str!("../scripts/heartbeat.lua");

/// One of this process's heartbeats, as it came back.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct OwnBeat {
    pub(super) seq: u64,
    /// The index of the master it was published on.
    pub(super) master: usize,
    /// That master's clock as it published the beat; `None` for a beat
    /// without one (the format before the time was added).
    pub(super) redis_time: Option<SystemTime>,
}

/// One of this process's heartbeats (`own` is the `h:<id>:` prefix):
/// `<seq>:<master index>`, then `:<redis_time_ms>`.
pub(super) fn own_beat(payload: &[u8], own: &str) -> Option<OwnBeat> {
    let rest = std::str::from_utf8(payload.strip_prefix(own.as_bytes())?).ok()?;
    let mut parts = rest.splitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let master = parts.next()?.parse().ok()?;
    let redis_time = match parts.next() {
        Some(ms) => Some(UNIX_EPOCH + Duration::from_millis(ms.parse().ok()?)),
        None => None,
    };
    Some(OwnBeat {
        seq,
        master,
        redis_time,
    })
}

/// Heartbeats in flight: from which masters each came back. A beat is
/// complete when it came back from every master over that master's own
/// connection.
pub(super) struct Beats {
    masters: usize,
    /// seq -> the masters it came back from, and the latest of their clocks.
    pending: std::collections::BTreeMap<u64, Pending>,
}

/// One heartbeat not yet back from every master.
#[derive(Default)]
struct Pending {
    from: std::collections::BTreeSet<usize>,
    clock: Option<RedisClock>,
}

impl Beats {
    /// Most beats remembered; older ones are given up.
    const KEPT: usize = 16;

    pub(super) fn new(masters: usize) -> Self {
        Self {
            masters,
            pending: std::collections::BTreeMap::new(),
        }
    }

    /// Beat `seq` came back from `master`, with that master's clock.
    /// `Some` when that completes it, with the latest of its masters'
    /// clocks (see the module docs: the safe side for a cache).
    pub(super) fn arrived(
        &mut self,
        seq: u64,
        master: usize,
        clock: Option<RedisClock>,
    ) -> Option<Option<RedisClock>> {
        let pending = self.pending.entry(seq).or_default();
        pending.from.insert(master);
        if let Some(clock) = clock {
            pending.clock = Some(clock.latest(pending.clock));
        }
        let complete = (pending.from.len() >= self.masters).then_some(pending.clock);
        if complete.is_some() {
            // Older beats are moot once a later one completed.
            self.pending = self.pending.split_off(&(seq + 1));
        }
        while self.pending.len() > Self::KEPT {
            self.pending.pop_first();
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::store::revocations::messages::{Parsed, parse};

    #[test]
    fn a_beat_completes_when_every_master_sent_it_back() {
        let mut beats = Beats::new(3);
        assert_eq!(beats.arrived(1, 0, None), None);
        assert_eq!(
            beats.arrived(1, 0, None),
            None,
            "a copy from the same master twice"
        );
        assert_eq!(beats.arrived(1, 2, None), None);
        assert_eq!(beats.arrived(1, 1, None), Some(None));
        // One master short: never complete; a later complete beat is.
        assert_eq!(beats.arrived(2, 0, None), None);
        assert_eq!(beats.arrived(2, 1, None), None);
        for master in 0..3 {
            assert_eq!(beats.arrived(3, master, None).is_some(), master == 2);
        }
        // A straggler of an older beat does not count.
        assert_eq!(beats.arrived(2, 2, None), None);
        for seq in 10..100 {
            beats.arrived(seq, 0, None);
        }
        assert!(beats.pending.len() <= Beats::KEPT);
    }

    /// A complete beat carries the latest of its masters' clocks: the one
    /// that makes a receiver's estimate of Redis's now err late, never early
    /// (a cache then stops answering a session sooner, not later).
    #[test]
    fn a_complete_beat_keeps_the_latest_masters_clock() {
        let seen = Instant::now();
        let at = |ms: u64| RedisClock {
            at: UNIX_EPOCH + Duration::from_millis(ms),
            seen,
        };
        let mut beats = Beats::new(3);
        assert_eq!(beats.arrived(7, 0, Some(at(1_000))), None);
        assert_eq!(beats.arrived(7, 1, Some(at(3_000))), None);
        assert_eq!(beats.arrived(7, 2, Some(at(2_000))), Some(Some(at(3_000))));
        // A later arrival with an earlier clock is judged by its estimate.
        let later = RedisClock {
            at: UNIX_EPOCH + Duration::from_millis(3_000),
            seen: seen + Duration::from_secs(1),
        };
        assert_eq!(at(3_000).latest(Some(later)), at(3_000));
        assert_eq!(later.latest(Some(at(3_500))), at(3_500));
    }

    /// Its own beats are read with their time, and without one (the format
    /// before the time was added); other processes' beats, old and new, are
    /// heartbeats of theirs.
    #[test]
    fn own_beats_parse_with_and_without_their_time() {
        assert_eq!(
            own_beat(b"h:ab:42:1:1700000000123", "h:ab:"),
            Some(OwnBeat {
                seq: 42,
                master: 1,
                redis_time: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            })
        );
        assert_eq!(
            own_beat(b"h:ab:42:1", "h:ab:"),
            Some(OwnBeat {
                seq: 42,
                master: 1,
                redis_time: None,
            })
        );
        assert_eq!(own_beat(b"h:cd:42:1:5", "h:ab:"), None);
        assert_eq!(own_beat(b"h:ab:42", "h:ab:"), None);
        assert_eq!(own_beat(b"h:ab:42:1:soon", "h:ab:"), None);
        for other in [&b"h:cd"[..], b"h:cd:42:1", b"h:cd:42:1:1700000000123"] {
            assert_eq!(parse(other), Some(Parsed::Heartbeat));
        }
    }
}
