//! The revocation stream's Redis side: the scripts that end sessions PUBLISH
//! each revocation on one channel (`P revocations`) in the same atomic step,
//! and one subscriber per process fans what arrives out to every open
//! WatchRevocations stream.
//!
//! # Messages on the channel
//!
//! Plain text, split on `:` (ids never contain one):
//!
//! - `r:<revoked_at_ms>:<reason>:<user_id>:<token_id>`: a revocation; an empty
//!   token id means every session of the user created at or before
//!   `revoked_at_ms` (RevokeAllUserSessions);
//! - `x:<expires_at_ms>:<user_id>:<token_id>`: a live session whose expiry
//!   ExtendSession moved earlier (`extend_session.lua`). Servers older than
//!   this message count it as malformed and ignore it, so during a rolling
//!   upgrade only the new servers' streams carry it;
//! - `h:<id>:<seq>:<master index>:<redis_time_ms>`: a heartbeat, published
//!   by each server process for itself (`id` random for each subscription),
//!   numbered, on each master, with that master's clock (`TIME`) read in the
//!   same script that publishes it (`scripts/heartbeat.lua`). Earlier
//!   versions published `h:<id>`, `h:<id>:<seq>`, then
//!   `h:<id>:<seq>:<master index>`, without the time: during a rolling
//!   upgrade old and new processes share the channel, and to each of them
//!   every message starting with `h:` is another process's heartbeat (only
//!   a process's own beats, found by its id, are read further).
//!
//! # Redis's clock on the stream
//!
//! The near-cache of session-client judges a session's expiry (`expires_at`,
//! Redis's clock) by Redis's clock, not its host's, so every reset and
//! heartbeat a stream sends carries Redis's time ([`RedisClock`]). It comes
//! from the heartbeat that proved the subscription: the time the master read
//! as it published the beat, advanced by this process's monotonic clock from
//! the beat's arrival until the message is built. So it lags Redis's clock by
//! the beat's delivery from Redis to this process only (one pub/sub hop). On a
//! cluster a beat counts once it came back from every master, each with its
//! own clock; the latest of those times is kept, so a receiver's estimate is
//! never behind any master's clock by more than that delay (it may be ahead
//! of a master whose clock is behind the others: a cache then stops
//! answering a session early, which is safe). Within a subscription the
//! clock only moves forward, and each subscription's beats carry a new id,
//! so someone else who may PUBLISH on the channel cannot set it back with a
//! forged beat (one forged ahead only makes caches ask the server sooner).
//!
//! # Why heartbeats go through Redis
//!
//! A subscription can die without its TCP connection closing (a partitioned
//! or failed-over master), and on a cluster a message crossing the cluster bus
//! can be dropped in a link's reconnect while every connection of ours stays
//! up. So the subscriber connects to every master (the one master of
//! standalone and sentinel modes; each master of a cluster, over which that
//! master's own publishes arrive without crossing the bus), and each process
//! publishes its own numbered heartbeat on each master. A beat counts only
//! when it came back from every master over that master's own connection;
//! streams get a heartbeat only then, so they stop beating exactly when
//! revocations may have stopped flowing. A subscription is announced to the
//! streams as a reset only once its first beat came back (what is published
//! from then on arrives); one that misses its beats for the patience
//! (three beats, at least one beat plus REDIS_TIMEOUT_MS), or whose cluster
//! changed masters, is dropped and made again.
//!
//! # Cost when nobody watches
//!
//! None: the subscriber starts with the first WatchRevocations stream and
//! stops at a heartbeat tick that finds no stream open. Publishing costs the
//! revoking scripts one PUBLISH each, subscribed or not.
//!
//! # Topologies
//!
//! Standalone: the one server. Sentinel: the master the sentinels name at
//! subscription time (each attempt asks the next sentinel first, each with
//! its own timeout); after a failover the old connection breaks or misses its
//! heartbeats, and the next subscription goes to the new master. Cluster: one
//! connection per master, as redis-rs's cluster connection sees the masters;
//! a revocation arrives once over its own master's connection and again over
//! the bus on the others, and the copies are dropped. A beat leaves a node
//! only while it is a master (`scripts/heartbeat.lua` asks `INFO
//! replication`): a master demoted by a graceful failover keeps running and
//! taking PUBLISH, and redis-rs, which learns of a failover from a
//! redirect, may list it as a master for as long as no call touches its
//! slots. Its refusal makes the heartbeats provoke that redirect (a keyed
//! read on it, answered MOVED) and the stream subscribe again on the new
//! masters.
//!
//! # The files
//!
//! This file holds what the rest of the server sees: the events, the feed
//! a stream reads, Redis's clock, and the hub that starts the subscriber
//! with the first stream. The parts:
//!
//! - `subscriber`: the subscriber loop (subscribe on every master, prove
//!   the subscription, forward, resubscribe with backoff);
//! - `heartbeats`: publishing this process's heartbeats, and reading them
//!   back until one came back from every master;
//! - `messages`: decoding the channel's messages, and dropping the copies
//!   a cluster delivers once per master.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::broadcast, time::Instant};

use super::Store;
use crate::model::{Revocation, Shortened};

mod heartbeats;
mod messages;
mod subscriber;

/// What the subscriber tells every stream.
#[derive(Clone, Debug)]
pub enum RevocationEvent {
    /// The subscription was (re)established: anything before may have been
    /// missed. With the clock of the heartbeat that proved it.
    Reset(Option<RedisClock>),
    /// This process's heartbeat came back through the subscription, with
    /// Redis's clock as it left (`None` only for a beat without a time,
    /// which this version never publishes).
    Heartbeat(Option<RedisClock>),
    /// A session, or every session of a user, ended.
    Revoked(Arc<Revocation>),
    /// A live session's expiry was moved earlier.
    Shortened(Arc<Shortened>),
}

/// A reading of Redis's clock: the time a master's `TIME` gave as it
/// published a heartbeat, and when (by this process's monotonic clock) that
/// heartbeat came back. Streams send [`now`](Self::now), so the time a
/// message spends queued here is accounted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedisClock {
    /// Redis's clock when the heartbeat left Redis.
    pub at: SystemTime,
    /// When the heartbeat arrived here.
    pub seen: Instant,
}

impl RedisClock {
    /// Redis's time now, as estimated from this reading: its time plus the
    /// time elapsed here since it arrived (a monotonic clock, whatever this
    /// host's wall clock says).
    pub fn now(&self) -> SystemTime {
        self.at + self.seen.elapsed()
    }

    /// The later of two readings, compared as estimates of Redis's now.
    fn latest(self, other: Option<Self>) -> Self {
        match other {
            Some(other) if other.now() > self.now() => other,
            _ => self,
        }
    }
}

/// How many events a stream may fall behind before it is dropped. A stream
/// at the limit is a receiver that stopped reading: heartbeats alone take
/// over an hour to fill it.
pub const REVOCATION_BACKLOG: usize = 4096;

/// The subscriber shared by every stream of one process, while any is open.
#[derive(Default)]
pub(super) struct Hub {
    state: Mutex<Option<Running>>,
}

struct Running {
    events: broadcast::Sender<RevocationEvent>,
    /// When a heartbeat last came back complete through the current
    /// subscription, and its clock; `None` until the first one did (or since
    /// it was lost).
    proven: Arc<Mutex<Option<Proof>>>,
    /// REVOCATION_HEARTBEAT_MS.
    beat: Duration,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("Hub").field("running", &running).finish()
    }
}

/// The last complete heartbeat of a subscription.
#[derive(Clone, Copy, Debug)]
struct Proof {
    /// When it came back.
    at: Instant,
    /// Redis's clock it carried.
    clock: Option<RedisClock>,
}

/// One stream's view of the revocations: its receiver, and whether the
/// subscription was proven alive when it was opened.
#[derive(Debug)]
pub struct RevocationFeed {
    /// Every event from the moment the stream was opened.
    pub events: broadcast::Receiver<RevocationEvent>,
    /// True when a heartbeat came back within the last one and a half beats:
    /// the stream may start with its reset at once. Otherwise its start is
    /// the next [`RevocationEvent::Reset`] or [`RevocationEvent::Heartbeat`].
    pub subscribed: bool,
    /// When `subscribed`, the clock of that heartbeat, for the reset.
    pub clock: Option<RedisClock>,
}

/// Locks `mutex`, ignoring poisoning: every value behind these locks is
/// replaced whole, so a panic elsewhere cannot leave it half written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// The channel the scripts publish revocations on: `P revocations`, with
    /// the database number appended (`P revocations:db3`) when it is not 0,
    /// because pub/sub channels are shared by every database of a server.
    pub(crate) fn revocation_channel(&self) -> &str {
        &self.shared.revocation_channel
    }

    /// Opens a feed of revocations, starting the subscriber if no stream had
    /// one running.
    pub fn watch_revocations(&self) -> RevocationFeed {
        let mut state = lock(&self.shared.revocations.state);
        if let Some(running) = state.as_ref() {
            let events = running.events.subscribe();
            let fresh = running.beat * 3 / 2;
            let proof = lock(&running.proven).filter(|proof| proof.at.elapsed() < fresh);
            return RevocationFeed {
                events,
                subscribed: proof.is_some(),
                clock: proof.and_then(|proof| proof.clock),
            };
        }
        let (events, receiver) = broadcast::channel(REVOCATION_BACKLOG);
        let proven = Arc::new(Mutex::new(None));
        *state = Some(Running {
            events: events.clone(),
            proven: Arc::clone(&proven),
            beat: self.shared.settings.revocation_heartbeat,
        });
        tokio::spawn(self.clone().subscribe_revocations(events, proven));
        RevocationFeed {
            events: receiver,
            subscribed: false,
            clock: None,
        }
    }

    /// Stops the subscriber when no stream is left. Under the hub's lock, so
    /// a stream opened at the same moment either finds it running or starts
    /// a new one.
    fn retire_if_unwatched(&self, events: &broadcast::Sender<RevocationEvent>) -> bool {
        let mut state = lock(&self.shared.revocations.state);
        if events.receiver_count() > 0 {
            return false;
        }
        *state = None;
        true
    }
}
