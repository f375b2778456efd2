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
//! Locks from `std::sync` and crossbeam, never held across an `.await`. The
//! sessions are sharded by token id (`entries.rs`), each shard behind a
//! reader-writer lock striped by thread: a lookup takes a read lock on its
//! thread's stripe of its shard and nothing else, so lookups on several
//! threads neither wait for each other nor write a line another reads (one
//! lock for everything made a second thread a loss, and one `Mutex` per
//! shard still cost a second thread about a sixth of its lookups: #28).
//! Everything else (the streams' roles, Redis's clock, the fills, the
//! per-user index, the entry count) is under one state lock, taken before
//! any shard's by whatever changes the sessions (a fill's completion, a
//! revocation, a flush), so that each of those is one step as far as the
//! fill race is concerned. A flush swaps each shard for an empty one and
//! frees the old sessions on a thread of its own: no lookup waits for it. A
//! third lock, the registry of metadata strings sessions share
//! (`packed.rs`), is taken after a shard's by what changes the sessions (a
//! lookup only to remove an expired entry, as any removal: never on its way
//! to an answer).
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
//! # Where it is
//!
//! - this file: the cache's API to the client (lookups, fills,
//!   revocations made through it, stats);
//! - `state.rs`: what the state lock guards (the streams' roles, Redis's
//!   clock, the per-user index, the fills in flight);
//! - `changes.rs`: what changes the sessions (removals, revocations, a
//!   flush), always under the state lock;
//! - `stream.rs`: what each stream message means, and how a stream is
//!   replaced without a flush;
//! - `entries.rs`, `shard.rs`, `slot.rs`, `arena.rs`, `packed.rs`: the
//!   sessions in memory (shards, each shard's table and eviction, what a
//!   slot holds, the memory a shard's sessions live in, a session's packed
//!   layout and the metadata strings sessions share);
//! - `compact.rs`: [`CompactSession`], a hit copied out in one allocation;
//! - `view.rs`: [`SessionView`], a hit read where it lies, under its
//!   shard's lock;
//! - `watcher.rs`: the task that holds the stream.

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
pub use compact::CompactSession;
use entries::Entries;
use packed::{Interned, View};
use shard::{Found, Serving};
pub(crate) use state::Roles;
use state::State;
pub use view::SessionView;

mod arena;
#[cfg(feature = "bench-internals")]
pub mod bench;
mod changes;
mod compact;
mod entries;
mod packed;
mod shard;
mod slot;
mod state;
mod stream;
mod view;
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
        self.entries.not_reading();
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
        self.lookup_at(token_id, user_id, Instant::now)
    }

    /// `now` reads the clock (`Instant::now`, or a test's fixed instant).
    fn lookup_at(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: impl Fn() -> Instant,
    ) -> Option<Session> {
        self.lookup_with(token_id, user_id, now, |view, interned| {
            view.session(interned, token_id, user_id)
        })
    }

    /// As [`lookup`](Self::lookup), answering a [`CompactSession`]: the
    /// entry copied out in one allocation.
    pub(crate) fn lookup_compact(
        &self,
        token_id: &str,
        user_id: Option<&str>,
    ) -> Option<CompactSession> {
        self.lookup_compact_at(token_id, user_id, Instant::now)
    }

    fn lookup_compact_at(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: impl Fn() -> Instant,
    ) -> Option<CompactSession> {
        self.lookup_with(token_id, user_id, now, |view, interned| {
            match view.resolve(interned) {
                Some(data) => Some(CompactSession::packed(data)),
                // A metadata string exactly 64 KiB - 1 long (never in
                // practice): the whole session, as `lookup` builds it.
                None => view
                    .session(interned, token_id, user_id)
                    .map(CompactSession::from),
            }
        })
    }

    /// As [`lookup`](Self::lookup), answering what `read` returns from a
    /// [`SessionView`] of the entry, called under its shard's read lock:
    /// nothing is copied.
    ///
    /// # Panics
    ///
    /// When `read` uses this cache (any lookup, change or `stats`): with a
    /// change waiting for the shard `read` holds, that would deadlock, so it
    /// panics every time instead (see `Entries::reading`). And when `read`
    /// panics.
    pub(crate) fn lookup_view<R>(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        read: impl FnOnce(SessionView<'_>) -> R,
    ) -> Option<R> {
        self.lookup_view_at(token_id, user_id, Instant::now, read)
    }

    fn lookup_view_at<R>(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: impl Fn() -> Instant,
        read: impl FnOnce(SessionView<'_>) -> R,
    ) -> Option<R> {
        self.lookup_with(token_id, user_id, now, |view, interned| {
            Some(
                self.entries
                    .reading(|| read(SessionView::new(view, interned))),
            )
        })
    }

    /// A lookup answered by `answer` from the entry, after every check that
    /// it may be answered (the stream healthy, the session live by Redis's
    /// clock, the user the one given); an expired entry is removed.
    ///
    /// `now` is read once the entry's shard is locked: a lookup that waited
    /// for its shard (behind a change, itself behind a slow
    /// `with_cached_session` closure) judges expiry and staleness by when it
    /// got it, not by when it asked.
    fn lookup_with<T>(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: impl Fn() -> Instant,
        answer: impl FnOnce(View<'_>, &Interned) -> Option<T>,
    ) -> Option<T> {
        match self
            .entries
            .lookup(token_id, user_id, &now, self.max_staleness, answer)
        {
            Found::Hit(found) => Some(found),
            Found::Miss => None,
            Found::Expired => {
                // The server would not find it either; no use keeping it.
                // Removed with the state lock, as anything that leaves.
                let mut state = self.state();
                if let Some(redis_now) = self.serving(&state, now())
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
