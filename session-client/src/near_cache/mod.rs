//! The near-cache ([`Builder::near_cache`](crate::Builder::near_cache)):
//! sessions the server found, kept in memory and answered without a round
//! trip while the revocation stream (`WatchRevocations`) proves that nothing
//! was missed. This module holds the cache's state and decides what each
//! stream message means; `watcher.rs` is the task that holds the stream.
//!
//! What may be answered from memory is decided here and nowhere else:
//!
//! - an entry is answered only while the stream is *healthy*: its `reset`
//!   was received (so everything revoked since then reaches us, in order)
//!   and some message arrived within `max_staleness`; and only while the
//!   current stream's server tells Redis's clock (see *Expiry by Redis's
//!   clock* below);
//! - an entry is answered only before its `expires_at` by Redis's clock as
//!   the stream tells it, never by this host's wall clock;
//! - a reset, the stream's end or its silence flushes everything, except
//!   when the stream is replaced by a newer one while it still works (see
//!   *Replacing the stream* below);
//! - a revocation drops its session, or every session of its user created at
//!   or before `revoked_at` (both Redis's clock), found through a per-user
//!   index rather than a scan;
//! - an answer is cached only when no revocation that could concern it, and
//!   no reset or loss of the stream, arrived while its call was in flight
//!   (the fill race: a revocation overtaking the read that it makes stale).
//!   Each call registers a [`PendingFill`] before it is sent; whatever
//!   arrives meanwhile unregisters it, and an unregistered fill is not
//!   cached. Fills are indexed by token id and by user (with a set of those
//!   that named no user), so a revocation finds the few it concerns instead
//!   of scanning every call in flight under the lock.
//!
//! Two kinds of `std::sync::Mutex`, never held across an `.await`. The
//! sessions are sharded by token id (`entries.rs`): a lookup takes its
//! shard's lock and nothing else, so lookups on several threads rarely meet
//! (one lock for everything made a second thread a loss: #28). Everything
//! else (the streams' roles, Redis's clock, the fills, the per-user index,
//! the entry count) is under one state lock, taken before any shard's by
//! whatever changes the sessions (a fill's completion, a revocation, a
//! flush), so that each of those is one step as far as the fill race is
//! concerned. A flush swaps each shard for an empty one and frees the old
//! sessions on a thread of its own: no lookup waits for it.
//!
//! # Expiry by Redis's clock
//!
//! A session's `expires_at` is a time on Redis's clock, and Redis deletes the
//! session when its own clock passes it. This host's wall clock may be
//! minutes off (no NTP, a VM restored from a snapshot): judged by it, a host
//! behind Redis would answer a session alive after Redis had expired it, and
//! natural expiry publishes no revocation that could correct it. So the
//! wall clock is never read here. Every reset and heartbeat of the stream
//! carries Redis's clock (`redis_time`: the time Redis read as it published
//! the heartbeat, advanced by the server's monotonic clock while it held it);
//! the cache keeps the latest reading with the [`Instant`] it arrived, and
//! estimates Redis's now as `redis_time + (Instant::now() - arrived)`, by
//! this host's monotonic clock, which a wrong or stepped wall clock does not
//! move.
//!
//! **The bound.** The estimate is late by the delivery time of the message it
//! came from: from the heartbeat's PUBLISH in Redis to the server (one
//! pub/sub hop), plus from the server to this client, the same delivery
//! latency that already bounds revocations (milliseconds on a working
//! stream; see the revocation bound in
//! [`Builder::near_cache`](crate::Builder::near_cache)), plus under a
//! millisecond of rounding and the two monotonic clocks' drift over the
//! second between heartbeats. So a session is answered from memory at most
//! that long after Redis's `expires_at`, whatever this host's wall clock
//! says. On a cluster the server sends the latest of the masters' clocks:
//! a master whose clock is behind the others expires its sessions later
//! than the estimate says, which only ends their answers from memory early.
//!
//! Readings only move the estimate forward while the same stream lasts: one
//! that arrives later than the one before (a stream that stalled) would set
//! it back, and is ignored. A reset that flushes starts from its own reading
//! (a new subscription may be on another master, after a failover); a
//! switch to a replacement stream keeps the later of the two. A Redis clock
//! stepped backwards therefore ends answers from memory early until the
//! next flush, never extends them.
//!
//! **Fail safe.** Until a reading arrives, and whenever the current stream
//! carries none (a server older than `redis_time`, or a replacement stream
//! from one during a rolling upgrade), nothing is answered or cached from
//! memory: every lookup goes to the server, as without the cache, and
//! [`NearCacheStats::healthy`] is false.
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
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use sessionstore::v1 as pb;

use crate::types::Session;
use entries::{Entries, Found, Garbage, Handle, Serving};

#[cfg(feature = "bench-internals")]
pub mod bench;
mod entries;
mod watcher;

pub(crate) use watcher::Watcher;

/// The near-cache's settings, from the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NearCacheSettings {
    /// The most sessions held; ones not looked up lately go first (CLOCK).
    pub(crate) max_entries: usize,
    /// How long the cache answers from memory without a message on its
    /// stream.
    pub(crate) max_staleness: Duration,
    /// How long one revocation stream is used before it is replaced.
    pub(crate) stream_lifetime: Duration,
    /// Whether cached sessions keep their metadata.
    pub(crate) metadata: bool,
}

/// What the near-cache has done so far, from
/// [`SessionClient::near_cache_stats`](crate::SessionClient::near_cache_stats):
/// to export as metrics, or to see whether the cache earns its keep.
///
/// Counters start at zero when the client is built and are shared by its
/// clones. Fields may be added in a minor release (`#[non_exhaustive]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NearCacheStats {
    /// Lookups answered from memory, without a call.
    pub hits: u64,
    /// Lookups that called the server: the session was not cached, had
    /// expired, belonged to another user than the one given, or the stream
    /// was not healthy.
    pub misses: u64,
    /// Revocations applied to the cache: each one received on the stream,
    /// and each revoke made through this client (they apply at once). While
    /// a replaced stream drains, a revocation that both streams carry counts
    /// twice.
    pub revocations_applied: u64,
    /// Resets received on the stream that flushed the cache: the first
    /// message of a stream that did not replace a working one, and each time
    /// the server's subscription to Redis was re-established. A replacement's
    /// reset that did not flush counts in `switches` instead.
    pub resets: u64,
    /// Sessions held now.
    pub entries: u64,
    /// Whether lookups may be answered from memory now: the stream's reset
    /// was received, a message arrived within the maximum staleness, and
    /// the stream's server told Redis's clock (a server older than that
    /// never makes the cache healthy: every lookup goes to it).
    pub healthy: bool,
    /// Streams replaced by a newer one without a flush (see
    /// [`Builder::near_cache_stream_lifetime`](crate::Builder::near_cache_stream_lifetime)):
    /// the new stream's reset arrived while the old one still worked.
    pub switches: u64,
}

/// One revocation as the cache applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Revocation {
    pub(crate) user_id: String,
    /// `None`: every session of the user created at or before `revoked_at`.
    pub(crate) token_id: Option<String>,
    /// By Redis's clock. `None` (not sent, or out of range) for a user-wide
    /// revocation drops every session of the user, whatever its age.
    pub(crate) revoked_at: Option<SystemTime>,
}

impl Revocation {
    /// The revocation's `reason` is not read: whatever ended the session
    /// (a revoke, sign out everywhere, eviction, a rotation, reuse
    /// detection, or a reason newer than this client), it is gone, and the
    /// cache drops it alike.
    fn from_proto(revocation: pb::Revocation) -> Self {
        Self {
            user_id: revocation.user_id,
            token_id: Some(revocation.token_id).filter(|t| !t.is_empty()),
            revoked_at: revocation
                .revoked_at
                .and_then(|t| SystemTime::try_from(t).ok()),
        }
    }
}

/// The cache, shared by a client's clones and its stream task.
pub(crate) struct NearCache {
    max_entries: usize,
    max_staleness: Duration,
    /// Taken before any shard of `entries`.
    state: Mutex<State>,
    entries: Entries,
    /// Wakes the stream task when the streams' roles change (a switch, a
    /// stream ended), so it closes the streams no longer needed and opens
    /// the next one.
    roles_changed: tokio::sync::Notify,
    revocations_applied: AtomicU64,
    resets: AtomicU64,
    switches: AtomicU64,
}

/// The streams the cache listens to, by the ids the stream task gave them;
/// see *Replacing the stream* above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Roles {
    /// The stream whose reset the cache is synced to.
    pub(crate) current: Option<u64>,
    /// A stream opened to replace it (or to be the first), before its reset.
    pub(crate) candidate: Option<u64>,
    /// The stream replaced by `current`, whose revocations still apply until
    /// the instant given.
    pub(crate) draining: Option<(u64, Instant)>,
}

impl Roles {
    fn knows(&self, id: u64) -> bool {
        self.current == Some(id)
            || self.candidate == Some(id)
            || self.draining.is_some_and(|(d, _)| d == id)
    }
}

struct State {
    /// The latest reading of Redis's clock from the current stream; `None`
    /// before one arrived or when the current stream carries none (then
    /// nothing is answered or cached: see *Expiry by Redis's clock*).
    clock: Option<Clock>,
    /// Where each user's cached sessions are, by the keyed hash of the user
    /// id (two users whose ids share a hash share a list: every use checks
    /// the entry's user id). Kept equal to the entries by
    /// [`NearCache::unindex`], called for whatever leaves them.
    by_user: HashMap<u64, Vec<Handle>>,
    /// Sessions cached, at most `max_entries` ([`NearCache::insert`]
    /// evicts down to it).
    len: usize,
    /// The streams listened to; the cache is synced when `roles.current` is
    /// set (its reset was received).
    roles: Roles,
    /// When the current stream's last message arrived.
    last_message: Option<Instant>,
    /// Calls in flight whose answer may still be cached, by id. Whatever may
    /// make a call's answer stale (a revocation that may concern it, a
    /// flush) removes it from here and from the indexes below, so a fill is
    /// invalidated at most once and later revocations never visit it again.
    fills: HashMap<u64, Fill>,
    /// The ids in `fills` by the token id their call asks for.
    fills_by_token: HashMap<String, HashSet<u64>>,
    /// The ids in `fills` whose call named its user, by that user.
    fills_by_user: HashMap<String, HashSet<u64>>,
    /// The ids in `fills` whose call named no user (`get_session`): any
    /// user-wide revocation may concern them.
    unhinted_fills: HashSet<u64>,
    next_fill: u64,
}

/// A reading of Redis's clock: a message's `redis_time` and when it arrived
/// by this host's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Clock {
    redis: SystemTime,
    arrived: Instant,
}

impl Clock {
    /// Redis's time at `now` by this reading.
    fn at(&self, now: Instant) -> SystemTime {
        self.redis + now.saturating_duration_since(self.arrived)
    }

    /// The reading whose estimate of Redis's now is the later at `now`:
    /// `self` (the last one), or `reading`, which arrived at `now`.
    fn advanced(self, reading: SystemTime, now: Instant) -> Self {
        if reading >= self.at(now) {
            Clock {
                redis: reading,
                arrived: now,
            }
        } else {
            self
        }
    }
}

/// A call in flight, as registered before it was sent.
struct Fill {
    token_id: String,
    /// The user the caller named (`get_user_session`); `None` for
    /// `get_session`, whose owner is unknown until it answers.
    user_id: Option<String>,
}

impl State {
    /// Drops every pending fill's chance to be cached (a flush; the
    /// entries are [`NearCache::flush`]'s).
    fn forget_fills(&mut self) {
        self.fills.clear();
        self.fills_by_token.clear();
        self.fills_by_user.clear();
        self.unhinted_fills.clear();
    }

    /// Registers a call about to be sent; see [`NearCache::begin_fill`].
    fn add_fill(&mut self, token_id: &str, user_id: Option<&str>) -> u64 {
        let id = self.next_fill;
        self.next_fill += 1;
        self.fills_by_token
            .entry(token_id.to_owned())
            .or_default()
            .insert(id);
        match user_id {
            Some(user) => {
                self.fills_by_user
                    .entry(user.to_owned())
                    .or_default()
                    .insert(id);
            }
            None => {
                self.unhinted_fills.insert(id);
            }
        }
        self.fills.insert(
            id,
            Fill {
                token_id: token_id.to_owned(),
                user_id: user_id.map(str::to_owned),
            },
        );
        id
    }

    /// Unregisters a fill (completed, dropped or invalidated); `None` when
    /// it was already.
    fn take_fill(&mut self, id: u64) -> Option<Fill> {
        let fill = self.fills.remove(&id)?;
        unindex_fill(&mut self.fills_by_token, &fill.token_id, id);
        match &fill.user_id {
            Some(user) => unindex_fill(&mut self.fills_by_user, user, id),
            None => {
                self.unhinted_fills.remove(&id);
            }
        }
        Some(fill)
    }

    /// Invalidates the fills of `ids`: their answers will not be cached.
    fn invalidate_fills(&mut self, ids: Vec<u64>) {
        for id in ids {
            self.take_fill(id);
        }
    }

    /// Invalidates the fills a user-wide change for `user` may concern:
    /// those naming the user, and every one that named none. Each is
    /// invalidated once, so a burst of user-wide revocations visits them
    /// once in all, not once per revocation.
    fn invalidate_user_fills(&mut self, user: &str) {
        let mut doomed: Vec<u64> = self.unhinted_fills.iter().copied().collect();
        doomed.extend(self.fills_by_user.get(user).into_iter().flatten());
        self.invalidate_fills(doomed);
    }
}

/// What changes the sessions, with the state lock held (`state`): the
/// entries and the per-user index move together.
impl NearCache {
    /// Removes `token_id`'s entry; returns its user id.
    fn remove(&self, state: &mut State, token_id: &str) -> Option<String> {
        let (removed, user) = self.entries.remove(token_id)?;
        Self::unindex(state, removed);
        Some(user)
    }

    fn unindex(state: &mut State, removed: entries::Removed) {
        state.len -= 1;
        if let Some(handles) = state.by_user.get_mut(&removed.user_hash) {
            if let Some(at) = handles.iter().position(|&h| h == removed.handle) {
                handles.swap_remove(at);
            }
            if handles.is_empty() {
                state.by_user.remove(&removed.user_hash);
            }
        }
    }

    /// Removes `user`'s cached sessions that `doomed` says so of, found
    /// through the per-user index.
    fn remove_users(
        &self,
        state: &mut State,
        user: &str,
        doomed: impl Fn(entries::View<'_>) -> bool,
    ) {
        let handles = state
            .by_user
            .get(&self.entries.hash(user))
            .cloned()
            .unwrap_or_default();
        for handle in handles {
            let removed = self
                .entries
                .remove_if(handle, |view| view.user() == Some(user) && doomed(view));
            if let Some(removed) = removed {
                Self::unindex(state, removed);
            }
        }
    }

    /// Drops every entry and every pending fill's chance to be cached. The
    /// sessions are swapped out of the shards at once and handed back, to
    /// be dropped once the state lock is released (by a thread of their own
    /// when many: see [`Garbage`]).
    #[must_use = "dropped after the state lock"]
    fn flush(&self, state: &mut State) -> Garbage {
        state.forget_fills();
        let garbage = Garbage {
            shards: self.entries.take_all(None),
            by_user: std::mem::take(&mut state.by_user),
            entries: state.len,
        };
        state.len = 0;
        garbage
    }

    fn apply_one(&self, state: &mut State, revocation: &Revocation) {
        let user = revocation.user_id.as_str();
        match &revocation.token_id {
            Some(token) => {
                // A revoke made here without the user's id names no user:
                // the cached session may.
                let owner = self.remove(state, token);
                // The calls for this token, and those naming its user (a
                // call's answer may be for a token of that user it named).
                let mut doomed: Vec<u64> = Vec::new();
                doomed.extend(
                    state
                        .fills_by_token
                        .get(token.as_str())
                        .into_iter()
                        .flatten(),
                );
                for u in [Some(user), owner.as_deref()].into_iter().flatten() {
                    doomed.extend(state.fills_by_user.get(u).into_iter().flatten());
                }
                state.invalidate_fills(doomed);
            }
            None => {
                let revoked_at = revocation.revoked_at;
                self.remove_users(state, user, |view| match revoked_at {
                    Some(at) => view.created_at().is_some_and(|created| created <= at),
                    None => true,
                });
                // A `get_session` call does not say whose session it asks
                // for: any user-wide revocation may concern it.
                state.invalidate_user_fills(user);
            }
        }
    }

    /// Drops `user`'s cached sessions of family `family` (a family ended by
    /// reuse detection), found through the per-user index. The calls in
    /// flight that may be for one of them lose their fill, as for a
    /// user-wide revocation: those naming the user, and every one that named
    /// none (the family's token ids are not all known here).
    fn drop_family(&self, state: &mut State, user: &str, family: &str) {
        if family.is_empty() {
            // Sessions of a server older than families share the empty id:
            // not one family.
            return;
        }
        self.remove_users(state, user, |view| view.family() == Some(family));
        state.invalidate_user_fills(user);
    }

    /// An ExtendSession answer for `token_id`: `Some` with the session as
    /// the server now holds it, `None` when it is not live or the call's
    /// outcome is unknown.
    ///
    /// An extension usually moves the expiry later, but not always: with a
    /// ttl shorter than the time left it moves it earlier (down to
    /// now + ttl). The cache must never hold an expiry later than Redis's,
    /// which it would answer past the real end; one earlier than Redis's
    /// only costs a lookup once it passes (the server then answers, and
    /// that answer is cached). So a cached entry takes the earlier of its
    /// expiry and the answer's, whatever the order in which answers of
    /// concurrent extensions arrive; and the lookups in flight for the token
    /// lose their fill, since one may have read the expiry before this
    /// extension moved it earlier. Without an answer (the session is not
    /// live, or the call failed and may have moved it) the entry is dropped.
    fn extend_entry(&self, state: &mut State, token_id: &str, answer: Option<&Session>) {
        let answer = answer.map(|a| (a.user_id.as_str(), a.expires_at));
        self.shorten_entry(state, token_id, answer);
    }

    /// Caps `token_id`'s cached expiry at `answer`'s (when the entry is
    /// `answer`'s user's), or drops the entry when there is no answer; the
    /// token's lookups in flight lose their fill. For an ExtendSession
    /// answer, and for a shortened expiry from the stream (`shortened`: an
    /// extension elsewhere moved it earlier).
    fn shorten_entry(&self, state: &mut State, token_id: &str, answer: Option<(&str, SystemTime)>) {
        let doomed: Vec<u64> = state
            .fills_by_token
            .get(token_id)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        state.invalidate_fills(doomed);
        if let Some(removed) = self.entries.extended(token_id, answer) {
            Self::unindex(state, removed);
        }
    }
}

/// Removes `id` from `key`'s set in a fill index, and the set once empty.
fn unindex_fill(index: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

impl NearCache {
    #[cfg(test)]
    pub(crate) fn new(max_entries: usize, max_staleness: Duration) -> Arc<Self> {
        Self::with_metadata(max_entries, max_staleness, true)
    }

    /// An empty cache; `metadata: false` keeps only what validity needs
    /// (see [`Builder::near_cache_metadata`](crate::Builder::near_cache_metadata)).
    pub(crate) fn with_metadata(
        max_entries: usize,
        max_staleness: Duration,
        metadata: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_entries,
            max_staleness,
            state: Mutex::new(State {
                by_user: HashMap::new(),
                len: 0,
                roles: Roles::default(),
                clock: None,
                last_message: None,
                fills: HashMap::new(),
                fills_by_token: HashMap::new(),
                fills_by_user: HashMap::new(),
                unhinted_fills: HashSet::new(),
                next_fill: 0,
            }),
            entries: Entries::new(max_entries, metadata),
            roles_changed: tokio::sync::Notify::new(),
            revocations_applied: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            switches: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing in this file panics while holding the lock, and every
        // operation leaves the state consistent before it could.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn healthy(&self, state: &State, now: Instant) -> bool {
        state.roles.current.is_some()
            && state
                .last_message
                .is_some_and(|at| now.saturating_duration_since(at) <= self.max_staleness)
    }

    /// Redis's time at `now` when the cache may answer from memory: the
    /// stream is healthy and told Redis's clock. `None`: ask the server.
    fn serving(&self, state: &State, now: Instant) -> Option<SystemTime> {
        if !self.healthy(state, now) {
            return None;
        }
        state.clock.map(|clock| clock.at(now))
    }

    /// Copies into every shard what lookups need to decide as
    /// [`serving`](Self::serving) would: called whenever the roles, the
    /// clock or the last message's time changed, with the state lock held.
    fn publish(&self, state: &State) {
        let serving = match (state.roles.current, state.last_message, state.clock) {
            (Some(_), Some(last_message), Some(clock)) => Some(Serving {
                last_message,
                clock,
            }),
            _ => None,
        };
        self.entries.publish(serving);
    }

    /// The cached session for `token_id` (owned by `user_id` when given),
    /// when it may be answered from memory; `None` means: ask the server.
    pub(crate) fn lookup(&self, token_id: &str, user_id: Option<&str>) -> Option<Session> {
        self.lookup_at(token_id, user_id, Instant::now())
    }

    fn lookup_at(&self, token_id: &str, user_id: Option<&str>, now: Instant) -> Option<Session> {
        match self
            .entries
            .lookup(token_id, user_id, now, self.max_staleness)
        {
            Found::Hit(session) => Some(session),
            Found::Miss => None,
            Found::Expired => {
                // The server would not find it either; no use keeping it.
                // Removed with the state lock, as anything that leaves.
                let mut state = self.state();
                if let Some(redis_now) = self.serving(&state, now)
                    && let Some(removed) = self.entries.remove_expired(token_id, redis_now)
                {
                    Self::unindex(&mut state, removed);
                }
                None
            }
        }
    }

    /// Registers a call about to be sent, whose answer may be cached through
    /// [`PendingFill::complete`]. Dropping the guard (a failed or cancelled
    /// call) unregisters it.
    pub(crate) fn begin_fill(
        self: &Arc<Self>,
        token_id: &str,
        user_id: Option<&str>,
    ) -> PendingFill {
        let id = self.state().add_fill(token_id, user_id);
        PendingFill {
            cache: self.clone(),
            id,
        }
    }

    fn complete_at(&self, id: u64, session: &Session, now: Instant) -> bool {
        let mut state = self.state();
        // Gone when something that may concern it arrived meanwhile.
        let Some(fill) = state.take_fill(id) else {
            return false;
        };
        let cacheable = self
            .serving(&state, now)
            .is_some_and(|redis_now| session.expires_at > redis_now)
            && fill.token_id == session.token_id
            && fill.user_id.as_deref().is_none_or(|u| u == session.user_id);
        cacheable && self.insert(&mut state, session)
    }

    /// Caches `session`, replacing its token's entry, and evicts down to
    /// `max_entries`. Returns whether it was cached (see `entries::pack`).
    fn insert(&self, state: &mut State, session: &Session) -> bool {
        self.remove(state, &session.token_id);
        let Some(handle) = self.entries.insert(session) else {
            return false;
        };
        state.len += 1;
        state
            .by_user
            .entry(self.entries.hash(&session.user_id))
            .or_default()
            .push(handle);
        while state.len > self.max_entries {
            match self.entries.evict(handle) {
                Some(removed) => Self::unindex(state, removed),
                None => break,
            }
        }
        true
    }

    /// Applies revocations (from the stream, or made through this client).
    pub(crate) fn apply(&self, revocations: &[Revocation]) {
        self.apply_again(revocations);
        self.revocations_applied
            .fetch_add(revocations.len() as u64, Ordering::Relaxed);
    }

    /// Applies revocations already counted by [`apply`](Self::apply): an own
    /// revoke applied again once its call is over.
    pub(crate) fn apply_again(&self, revocations: &[Revocation]) {
        let mut state = self.state();
        for revocation in revocations {
            self.apply_one(&mut state, revocation);
        }
    }

    /// A family ended by reuse detection through this client: drops what is
    /// cached of it now, as the stream will (counted as one revocation).
    pub(crate) fn forget_family(&self, user_id: &str, family_id: &str) {
        self.drop_family(&mut self.state(), user_id, family_id);
        self.revocations_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// An ExtendSession made through this client ended; see
    /// [`extend_entry`](Self::extend_entry).
    pub(crate) fn extended(&self, token_id: &str, answer: Option<&Session>) {
        self.extend_entry(&mut self.state(), token_id, answer);
    }

    /// The stream task opened stream `id`: it becomes the candidate (a
    /// replacement for the current stream, or the first one), which takes
    /// over at its reset.
    fn open(&self, id: u64) {
        self.state().roles.candidate = Some(id);
    }

    /// The streams listened to now.
    fn roles(&self) -> Roles {
        self.state().roles
    }

    /// A message arrived on stream `id`. Returns whether the cache still
    /// listens to that stream.
    fn received(&self, id: u64, message: pb::WatchRevocationsResponse, now: Instant) -> bool {
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
    fn ended(&self, id: u64, now: Instant) {
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

    pub(crate) fn stats(&self) -> NearCacheStats {
        let (entries, healthy) = {
            let state = self.state();
            (
                state.len as u64,
                self.serving(&state, Instant::now()).is_some(),
            )
        };
        let (hits, misses) = self.entries.counts();
        NearCacheStats {
            hits,
            misses,
            revocations_applied: self.revocations_applied.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            entries,
            healthy,
            switches: self.switches.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for NearCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NearCache")
            .field("max_entries", &self.max_entries)
            .field("max_staleness", &self.max_staleness)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A call in flight whose answer may be cached; see
/// [`NearCache::begin_fill`].
#[derive(Debug)]
pub(crate) struct PendingFill {
    cache: Arc<NearCache>,
    id: u64,
}

impl PendingFill {
    /// Caches the call's answer, unless something that may make it stale
    /// arrived since the call was registered. Returns whether it was cached.
    pub(crate) fn complete(self, session: &Session) -> bool {
        self.complete_at(session, Instant::now())
    }

    fn complete_at(self, session: &Session, now: Instant) -> bool {
        self.cache.complete_at(self.id, session, now)
    }
}

impl Drop for PendingFill {
    fn drop(&mut self) {
        // Already gone when completed or invalidated.
        self.cache.state().take_fill(self.id);
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
