//! What each message of the revocation stream means to the cache (a
//! reset, a heartbeat with Redis's clock, revocations, shortened
//! expiries), and the streams'
//! roles: which one the cache is synced to, which replaces it, which
//! drains. `watcher.rs` holds the streams; this decides.
//!
//! # Replacing the stream
//!
//! The server closes every connection at its MAX_CONNECTION_AGE (a GOAWAY,
//! then an abrupt close once its grace is over), and tonic does not tell a
//! caller that its connection got a GOAWAY. Reopening the stream after the
//! close would cost a flush each time (every new stream starts with a reset,
//! and revocations published between the old stream's end and the new one's
//! start are on neither), so the client never lets the server close the
//! stream's connection: each stream has a connection of its own, opened with
//! it, and after
//! [`Builder::near_cache_stream_lifetime`](crate::Builder::near_cache_stream_lifetime)
//! (below the server's
//! MAX_CONNECTION_AGE) a replacement is opened beside it, make before break:
//!
//! 1. While the replacement (`candidate`) has not sent its reset, the old
//!    stream (`current`) alone keeps the cache, as before.
//! 2. When the replacement's reset arrives and the old stream is healthy (a
//!    message within `max_staleness`), the cache *switches* without a flush:
//!    the replacement becomes `current`, and the old one is *drained*: its
//!    revocations are still applied for `max_staleness` after the switch,
//!    then it is closed.
//! 3. Otherwise (the old stream silent, ended, or absent) the reset flushes,
//!    as every reset used to.
//!
//! Why no revocation is missed by a switch. The reset of the replacement
//! is sent once its receiver is attached to its server's subscription:
//! every revocation published after that point reaches the replacement. A
//! revocation published before it was published before the reset arrived,
//! and the old stream, subscribed since long before, carries it in order;
//! it arrives there within the old stream's delivery latency, which the
//! drain (`max_staleness`, itself at least two heartbeats) covers with a
//! wide margin (milliseconds against seconds: the same assumption the
//! staleness bound already makes of a stream that keeps beating). What
//! could break it is the old stream not being read for the whole drain, so
//! anything that stops it early flushes: the old stream ending or falling
//! silent before the drain is over, or sending a reset of its own (its
//! server lost its subscription: what it missed may be older than the
//! replacement). A stream's end while no replacement has taken over is a
//! loss and flushes, as before. Both streams' revocations only ever drop
//! entries and invalidate fills, so applying one twice, or late, is
//! harmless; and a fill registered before the switch may still be cached
//! after it, because whatever concerns it arrives on one of the two streams
//! while they overlap, or flushes.

use std::{
    sync::atomic::Ordering,
    time::{Instant, SystemTime},
};

use sessionstore::v1 as pb;

use super::entries::Garbage;
use super::state::{Clock, Roles};
use super::{NearCache, Revocation};

impl NearCache {
    /// The stream task opened stream `id`: it becomes the candidate (a
    /// replacement for the current stream, or the first one), which takes
    /// over at its reset.
    pub(super) fn open(&self, id: u64) {
        self.state().roles.candidate = Some(id);
    }

    /// The streams listened to now.
    pub(super) fn roles(&self) -> Roles {
        self.state().roles
    }

    /// A message arrived on stream `id`. Returns whether the cache still
    /// listens to that stream.
    pub(super) fn received(
        &self,
        id: u64,
        message: pb::WatchRevocationsResponse,
        now: Instant,
    ) -> bool {
        let revocations: Vec<Revocation> = message
            .revocations
            .into_iter()
            .map(Revocation::from_proto)
            .collect();
        // A shortened expiry is applied as an ExtendSession answer made here
        // would be: the earlier of the cached expiry and the new one, and the
        // token's lookups in flight lose their fill. Without a readable time
        // the entry is dropped.
        let shortened: Vec<(String, String, Option<SystemTime>)> = message
            .shortened
            .into_iter()
            .map(|s| {
                let expires_at = s.expires_at.and_then(|t| SystemTime::try_from(t).ok());
                (s.user_id, s.token_id, expires_at)
            })
            .collect();
        // Out of range reads as none: fail safe.
        let reading = message
            .redis_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|redis| Clock {
                redis,
                arrived: now,
            });
        // Declared first, so dropped after the lock is released.
        let mut garbage = Garbage::default();
        let mut state = self.state();
        let roles = state.roles;
        if roles.current == Some(id) {
            if message.reset {
                garbage = self.flush(&mut state);
                // A new subscription, perhaps on another master: its clock.
                state.clock = reading;
                self.resets.fetch_add(1, Ordering::Relaxed);
            } else if let Some(reading) = reading {
                state.clock = Some(match state.clock {
                    Some(clock) => clock.advanced(reading.redis, now),
                    None => reading,
                });
            }
            state.last_message = Some(now);
        } else if roles.candidate == Some(id) {
            if !message.reset {
                // The server sends nothing before a stream's reset.
                return true;
            }
            // Make before break: no flush when the stream it replaces still
            // works and no earlier drain is cut short (see the module docs).
            let drained = roles.draining.is_none_or(|(_, until)| until <= now);
            let warm = self.healthy(&state, now) && drained;
            if warm {
                state.roles.draining = roles.current.map(|old| (old, now + self.max_staleness));
                // The same Redis: the later of the two streams' readings.
                // A replacement that tells no time (an older server) leaves
                // the cache without a clock: nothing answered from memory.
                state.clock = match (state.clock, reading) {
                    (Some(clock), Some(reading)) => Some(clock.advanced(reading.redis, now)),
                    (_, reading) => reading,
                };
                self.switches.fetch_add(1, Ordering::Relaxed);
            } else {
                garbage = self.flush(&mut state);
                state.clock = reading;
                state.roles.draining = None;
                self.resets.fetch_add(1, Ordering::Relaxed);
            }
            state.roles.current = Some(id);
            state.roles.candidate = None;
            state.last_message = Some(now);
            self.roles_changed.notify_one();
        } else if roles.draining.is_some_and(|(d, _)| d == id) {
            if message.reset {
                // The old stream's server lost its subscription: what it
                // missed may predate the replacement's reset.
                garbage = self.flush(&mut state);
                state.roles.draining = None;
                self.resets.fetch_add(1, Ordering::Relaxed);
                self.roles_changed.notify_one();
            }
            // Its heartbeats say nothing of the current stream's health.
        } else {
            return false;
        }
        // The message's revocations first, then its health: lookups read
        // the health the shards were given, not the state, so a cache that
        // was stale turns healthy only once what the message revokes is gone.
        for revocation in &revocations {
            self.apply_one(&mut state, revocation);
        }
        for (user, token, expires_at) in &shortened {
            self.shorten_entry(&mut state, token, expires_at.map(|at| (user.as_str(), at)));
        }
        self.publish(&state);
        drop(state);
        drop(garbage);
        self.revocations_applied
            .fetch_add(revocations.len() as u64, Ordering::Relaxed);
        true
    }

    /// Stream `id` ended, failed, fell silent, or was closed by the stream
    /// task. The current stream's end is a loss: revocations may be missed
    /// from now on, so nothing cached may be answered or kept. A drained
    /// stream's end before its drain is over may have lost revocations in
    /// flight: flushed too (the current stream keeps the cache healthy).
    pub(super) fn ended(&self, id: u64, now: Instant) {
        // Declared first, so dropped after the lock is released.
        let mut garbage = Garbage::default();
        let mut state = self.state();
        let roles = state.roles;
        if roles.current == Some(id) {
            state.roles.current = None;
            state.roles.draining = None;
            state.last_message = None;
            state.clock = None;
            garbage = self.flush(&mut state);
            self.publish(&state);
        } else if let Some((_, until)) = roles.draining.filter(|(d, _)| *d == id) {
            if now < until {
                garbage = self.flush(&mut state);
                self.publish(&state);
            }
            state.roles.draining = None;
        } else if roles.candidate == Some(id) {
            state.roles.candidate = None;
        } else {
            return;
        }
        drop(state);
        drop(garbage);
        self.roles_changed.notify_one();
    }
}
