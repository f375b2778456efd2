//! The near-cache ([`Builder::near_cache`](crate::Builder::near_cache)):
//! sessions the server found, kept in memory and answered without a round
//! trip while the revocation stream (`WatchRevocations`) proves that nothing
//! was missed, and the task that holds that stream.
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
//! One `std::sync::Mutex` guards the whole state: every operation is a few
//! hash lookups with no `.await` inside, so a lock held for nanoseconds is
//! cheaper than any finer scheme (as mini-redis `db.rs` argues for its `Db`).
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

use lru::LruCache;
use sessionstore::v1::{self as pb, session_store_client::SessionStoreClient};
use tonic::Request;

use crate::{
    balance::{Member, Pool},
    metadata::Auth,
    retry::RetryPolicy,
    types::Session,
};

/// Pauses between two attempts to open the revocation stream: from 100 ms
/// (a server restarting, a stream dropped for being slow) doubling to 5 s (a
/// server down, or one that does not serve `WatchRevocations` yet), each
/// with jitter so that a fleet of clients does not reconnect in step.
const RECONNECT: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
};

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
    state: Mutex<State>,
    /// Wakes the stream task when the streams' roles change (a switch, a
    /// stream ended), so it closes the streams no longer needed and opens
    /// the next one.
    roles_changed: tokio::sync::Notify,
    hits: AtomicU64,
    misses: AtomicU64,
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
    /// Sessions by token id (unique across users). Unbounded as far as the
    /// crate is concerned (`LruCache::new` would allocate `max_entries`
    /// slots up front); [`NearCache::insert`] evicts down to the bound.
    entries: LruCache<String, Session>,
    /// Token ids cached per user, for user-wide revocations; kept equal to
    /// `entries` by [`State::remove`], the only way anything leaves it.
    by_user: HashMap<String, HashSet<String>>,
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
struct Clock {
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
    fn remove(&mut self, token_id: &str) -> Option<Session> {
        let session = self.entries.pop(token_id)?;
        self.unindex(&session.user_id, token_id);
        Some(session)
    }

    fn unindex(&mut self, user_id: &str, token_id: &str) {
        if let Some(tokens) = self.by_user.get_mut(user_id) {
            tokens.remove(token_id);
            if tokens.is_empty() {
                self.by_user.remove(user_id);
            }
        }
    }

    /// Drops every entry and every pending fill's chance to be cached.
    fn flush(&mut self) {
        self.entries.clear();
        self.by_user.clear();
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

    fn apply(&mut self, revocation: &Revocation) {
        let user = revocation.user_id.as_str();
        match &revocation.token_id {
            Some(token) => {
                // A revoke made here without the user's id names no user:
                // the cached session may.
                let owner = self.remove(token).map(|session| session.user_id);
                // The calls for this token, and those naming its user (a
                // call's answer may be for a token of that user it named).
                let mut doomed: Vec<u64> = Vec::new();
                doomed.extend(
                    self.fills_by_token
                        .get(token.as_str())
                        .into_iter()
                        .flatten(),
                );
                for u in [Some(user), owner.as_deref()].into_iter().flatten() {
                    doomed.extend(self.fills_by_user.get(u).into_iter().flatten());
                }
                self.invalidate_fills(doomed);
            }
            None => {
                let tokens: Vec<String> = self
                    .by_user
                    .get(user)
                    .map(|tokens| tokens.iter().cloned().collect())
                    .unwrap_or_default();
                for token in tokens {
                    let ended = match (self.entries.peek(&token), revocation.revoked_at) {
                        (Some(session), Some(at)) => session.created_at <= at,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if ended {
                        self.remove(&token);
                    }
                }
                // A `get_session` call does not say whose session it asks
                // for: any user-wide revocation may concern it. Each is
                // invalidated once, so a burst of user-wide revocations
                // visits them once in all, not once per revocation.
                let mut doomed: Vec<u64> = self.unhinted_fills.iter().copied().collect();
                doomed.extend(self.fills_by_user.get(user).into_iter().flatten());
                self.invalidate_fills(doomed);
            }
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
    pub(crate) fn new(max_entries: usize, max_staleness: Duration) -> Arc<Self> {
        Arc::new(Self {
            max_entries,
            max_staleness,
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                by_user: HashMap::new(),
                roles: Roles::default(),
                clock: None,
                last_message: None,
                fills: HashMap::new(),
                fills_by_token: HashMap::new(),
                fills_by_user: HashMap::new(),
                unhinted_fills: HashSet::new(),
                next_fill: 0,
            }),
            roles_changed: tokio::sync::Notify::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
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

    /// The cached session for `token_id` (owned by `user_id` when given),
    /// when it may be answered from memory; `None` means: ask the server.
    pub(crate) fn lookup(&self, token_id: &str, user_id: Option<&str>) -> Option<Session> {
        let found = self.lookup_at(token_id, user_id, Instant::now());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn lookup_at(&self, token_id: &str, user_id: Option<&str>, now: Instant) -> Option<Session> {
        let mut state = self.state();
        let redis_now = self.serving(&state, now)?;
        let session = state.entries.get(token_id)?;
        if session.expires_at <= redis_now {
            // The server would not find it either; no use keeping it.
            state.remove(token_id);
            return None;
        }
        if user_id.is_some_and(|user| user != session.user_id) {
            return None;
        }
        Some(session.clone())
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
        if cacheable {
            self.insert(&mut state, session.clone());
        }
        cacheable
    }

    fn insert(&self, state: &mut State, session: Session) {
        state.remove(&session.token_id);
        state
            .by_user
            .entry(session.user_id.clone())
            .or_default()
            .insert(session.token_id.clone());
        state.entries.push(session.token_id.clone(), session);
        while state.entries.len() > self.max_entries {
            match state.entries.pop_lru() {
                Some((token_id, evicted)) => state.unindex(&evicted.user_id, &token_id),
                None => break,
            }
        }
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
            state.apply(revocation);
        }
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
        // Out of range reads as none: fail safe.
        let reading = message
            .redis_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|redis| Clock {
                redis,
                arrived: now,
            });
        let mut state = self.state();
        let roles = state.roles;
        if roles.current == Some(id) {
            if message.reset {
                state.flush();
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
                state.flush();
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
                state.flush();
                state.roles.draining = None;
                self.resets.fetch_add(1, Ordering::Relaxed);
                self.roles_changed.notify_one();
            }
            // Its heartbeats say nothing of the current stream's health.
        } else {
            return false;
        }
        for revocation in &revocations {
            state.apply(revocation);
        }
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
        let mut state = self.state();
        let roles = state.roles;
        if roles.current == Some(id) {
            state.roles.current = None;
            state.roles.draining = None;
            state.last_message = None;
            state.clock = None;
            state.flush();
        } else if let Some((_, until)) = roles.draining.filter(|(d, _)| *d == id) {
            if now < until {
                state.flush();
            }
            state.roles.draining = None;
        } else if roles.candidate == Some(id) {
            state.roles.candidate = None;
        } else {
            return;
        }
        self.roles_changed.notify_one();
    }

    pub(crate) fn stats(&self) -> NearCacheStats {
        let (entries, healthy) = {
            let state = self.state();
            (
                state.entries.len() as u64,
                self.serving(&state, Instant::now()).is_some(),
            )
        };
        NearCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
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

/// The stream task of one client: spawned by the builder, aborted when the
/// last clone of the client is dropped.
#[derive(Debug)]
pub(crate) struct Watcher {
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts holding the revocation stream for `cache` over the client's
    /// endpoints, with its bearer token, each stream replaced after
    /// `lifetime`.
    pub(crate) fn spawn(
        cache: Arc<NearCache>,
        pool: Arc<Pool>,
        auth: Arc<Auth>,
        lifetime: Duration,
    ) -> Self {
        Self {
            task: tokio::spawn(watch(cache, pool, auth, lifetime)),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping the task drops its `JoinSet`, which aborts every stream's
        // task: their calls are cancelled (RST_STREAM) and their connections
        // closed, so the server lets go of them too.
        self.task.abort();
    }
}

/// Holds the stream forever: opens one (each in a task of its own, on a
/// connection of its own), lets the cache decide what each stream's
/// messages mean ([`NearCache::received`]), closes the streams the cache no
/// longer listens to, and opens the next one: `lifetime` after the current
/// one took over (make before break, see the module docs), or after a pause
/// once a stream ended or failed to start (100 ms doubling to 5 s).
async fn watch(cache: Arc<NearCache>, pool: Arc<Pool>, auth: Arc<Auth>, lifetime: Duration) {
    let mut tasks: tokio::task::JoinSet<Followed> = tokio::task::JoinSet::new();
    let mut running: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut next_id = 0_u64;
    let mut failures = 0_u32;
    let mut retry_at = Instant::now();
    let mut current_since: Option<(u64, Instant)> = None;
    let mut last: Option<Arc<Member>> = None;
    loop {
        let roles = cache.roles();
        running.retain(|id, task| {
            let keep = roles.knows(*id);
            if !keep {
                task.abort();
            }
            keep
        });
        if roles.current != current_since.map(|(id, _)| id) {
            current_since = roles.current.map(|id| (id, Instant::now()));
        }
        let drain_until = roles.draining.map(|(_, until)| until);
        let open_at = match (roles.candidate, current_since) {
            (Some(_), _) => None,
            // One replacement at a time, once the last drain is over.
            (None, Some((_, since))) => Some(
                (since + lifetime)
                    .max(retry_at)
                    .max(drain_until.unwrap_or(retry_at)),
            ),
            (None, None) => Some(retry_at),
        };
        let sleep_until = |at: Option<Instant>| async move {
            match at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cache.roles_changed.notified() => {}
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                // Aborted tasks (streams the cache let go of) report nothing.
                // The end is told to the cache here rather than by the task,
                // so that the next stream is never opened before the pause
                // this end calls for is known.
                if let Ok(followed) = joined {
                    running.remove(&followed.id);
                    cache.ended(followed.id, followed.ended_at);
                    failures = if followed.synced { 1 } else { failures.saturating_add(1) };
                    retry_at = Instant::now() + RECONNECT.backoff(failures);
                }
            }
            () = sleep_until(open_at) => {
                match pool.pick(last.as_ref()) {
                    Some(member) => {
                        let id = next_id;
                        next_id += 1;
                        cache.open(id);
                        let task = tasks.spawn(follow(cache.clone(), id, member.clone(), auth.clone()));
                        running.insert(id, task);
                        last = Some(member);
                    }
                    // No address yet (DNS discovery that resolved nothing).
                    None => {
                        failures = failures.saturating_add(1);
                        retry_at = Instant::now() + RECONNECT.backoff(failures);
                    }
                }
            }
            () = sleep_until(drain_until) => {
                if let Some((id, _)) = roles.draining {
                    cache.ended(id, Instant::now());
                }
            }
        }
    }
}

/// How a stream's task ended.
struct Followed {
    id: u64,
    /// It delivered its reset: a stream that worked is reopened quickly.
    synced: bool,
    /// When its end (or silence, or failure to open) was seen.
    ended_at: Instant,
}

/// One stream, from its opening to its end, on a connection of its own (so
/// that its age is the stream's: see the module docs).
async fn follow(cache: Arc<NearCache>, id: u64, member: Arc<Member>, auth: Arc<Auth>) -> Followed {
    let mut synced = false;
    let silence = cache.max_staleness;
    let run = async {
        let mut stub = SessionStoreClient::new(member.endpoint().connect_lazy());
        let mut request = Request::new(pb::WatchRevocationsRequest {});
        auth.authorize(&mut request);
        // Waiting for the headers counts as silence too: a hung server must
        // not hold the task.
        let mut stream = match tokio::time::timeout(silence, stub.watch_revocations(request)).await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(_)) | Err(_) => return,
        };
        // Ended (shutdown, a slow receiver dropped, a broken connection),
        // silent past the bound, or no longer listened to: done.
        while let Ok(Ok(Some(message))) = tokio::time::timeout(silence, stream.message()).await {
            synced |= message.reset;
            if !cache.received(id, message, Instant::now()) {
                return;
            }
        }
    };
    run.await;
    Followed {
        id,
        synced,
        ended_at: Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALENESS: Duration = Duration::from_secs(3);

    fn session(user: &str, token: &str, created_at: SystemTime) -> Session {
        Session {
            user_id: user.into(),
            token_id: token.into(),
            metadata: HashMap::new(),
            created_at,
            expires_at: created_at + Duration::from_secs(900),
        }
    }

    /// A reset telling Redis's clock: this host's, in the tests that are
    /// not about the clock.
    fn reset() -> pb::WatchRevocationsResponse {
        reset_at(Some(SystemTime::now()))
    }

    /// A reset telling `redis_time` (`None`: a server older than the field).
    fn reset_at(redis_time: Option<SystemTime>) -> pb::WatchRevocationsResponse {
        pb::WatchRevocationsResponse {
            revocations: Vec::new(),
            reset: true,
            redis_time: redis_time.map(Into::into),
        }
    }

    fn heartbeat() -> pb::WatchRevocationsResponse {
        heartbeat_at(Some(SystemTime::now()))
    }

    fn heartbeat_at(redis_time: Option<SystemTime>) -> pb::WatchRevocationsResponse {
        pb::WatchRevocationsResponse {
            redis_time: redis_time.map(Into::into),
            ..Default::default()
        }
    }

    fn revocations(list: Vec<pb::Revocation>) -> pb::WatchRevocationsResponse {
        pb::WatchRevocationsResponse {
            revocations: list,
            ..Default::default()
        }
    }

    fn revoke_token(user: &str, token: &str) -> pb::Revocation {
        pb::Revocation {
            user_id: user.into(),
            token_id: token.into(),
            revoked_at: Some(SystemTime::now().into()),
            reason: pb::RevocationReason::Revoked.into(),
        }
    }

    fn revoke_user(user: &str, at: SystemTime) -> pb::Revocation {
        pb::Revocation {
            user_id: user.into(),
            token_id: String::new(),
            revoked_at: Some(at.into()),
            reason: pb::RevocationReason::SignedOutEverywhere.into(),
        }
    }

    /// A message on stream 0, the one stream of the tests that do not
    /// replace it: a reset opens it first when it is not the current one.
    fn recv(cache: &NearCache, message: pb::WatchRevocationsResponse, now: Instant) {
        if message.reset && cache.roles().current != Some(0) {
            cache.open(0);
        }
        cache.received(0, message, now);
    }

    /// Stream 0 ended.
    fn lose(cache: &NearCache) {
        cache.ended(0, Instant::now());
    }

    /// A healthy cache (reset received just now) holding `sessions`.
    fn healthy_with(max_entries: usize, sessions: &[Session]) -> Arc<NearCache> {
        let cache = NearCache::new(max_entries, STALENESS);
        recv(&cache, reset(), Instant::now());
        for s in sessions {
            let fill = cache.begin_fill(&s.token_id, Some(&s.user_id));
            assert!(fill.complete(s), "{} was not cached", s.token_id);
        }
        cache
    }

    fn cached(cache: &NearCache, token: &str) -> bool {
        cache.state().entries.contains(token)
    }

    /// The index and the entries hold the same sessions.
    fn assert_consistent(cache: &NearCache) {
        let state = cache.state();
        let indexed: usize = state.by_user.values().map(HashSet::len).sum();
        assert_eq!(indexed, state.entries.len());
        for (user, tokens) in &state.by_user {
            assert!(!tokens.is_empty(), "empty set kept for {user}");
            for token in tokens {
                let session = state.entries.peek(token).expect("indexed token cached");
                assert_eq!(&session.user_id, user);
            }
        }
        // Every fill in flight is in its indexes, and nothing else is.
        let by_token: usize = state.fills_by_token.values().map(HashSet::len).sum();
        let by_user: usize = state.fills_by_user.values().map(HashSet::len).sum();
        assert_eq!(by_token, state.fills.len());
        assert_eq!(by_user + state.unhinted_fills.len(), state.fills.len());
        for (id, fill) in &state.fills {
            assert!(state.fills_by_token[&fill.token_id].contains(id));
            match &fill.user_id {
                Some(user) => assert!(state.fills_by_user[user].contains(id)),
                None => assert!(state.unhinted_fills.contains(id)),
            }
        }
    }

    /// Nothing is answered or cached before the stream's reset, however
    /// many heartbeats arrive.
    #[test]
    fn nothing_is_served_or_cached_before_the_reset() {
        let cache = NearCache::new(10, STALENESS);
        let s = session("alice", "t1", SystemTime::now());
        recv(&cache, heartbeat(), Instant::now());
        let fill = cache.begin_fill("t1", Some("alice"));
        assert!(!fill.complete(&s));
        assert_eq!(cache.lookup("t1", None), None);
        assert!(!cache.stats().healthy);

        recv(&cache, reset(), Instant::now());
        let fill = cache.begin_fill("t1", Some("alice"));
        assert!(fill.complete(&s));
        assert_eq!(cache.lookup("t1", Some("alice")), Some(s.clone()));
        assert_eq!(cache.lookup("t1", None), Some(s));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.resets), (2, 1, 1));
        assert!(stats.healthy);
    }

    /// A session asked for with another user's id is not answered from memory.
    #[test]
    fn the_user_hint_must_match() {
        let s = session("alice", "t1", SystemTime::now());
        let cache = healthy_with(10, std::slice::from_ref(&s));
        assert_eq!(cache.lookup("t1", Some("mallory")), None);
        assert_eq!(cache.lookup("t1", Some("alice")), Some(s));
        // An answer naming another user than the call did is not cached.
        let other = session("bob", "t2", SystemTime::now());
        let fill = cache.begin_fill("t2", Some("alice"));
        assert!(!fill.complete(&other));
    }

    /// An entry past its expires_at (by Redis's clock) is neither answered
    /// nor cached.
    #[test]
    fn expired_entries_are_not_answered() {
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        let expired = session("alice", "old", long_ago);
        let cache = NearCache::new(10, STALENESS);
        let synced = Instant::now();
        let redis = SystemTime::now();
        recv(&cache, reset_at(Some(redis)), synced);
        let fill = cache.begin_fill("old", None);
        assert!(!fill.complete_at(&expired, synced));
        // One cached while alive, looked up after its expiry.
        let s = Session {
            expires_at: redis + Duration::from_secs(2),
            ..session("alice", "t1", redis)
        };
        let fill = cache.begin_fill("t1", None);
        assert!(fill.complete_at(&s, synced));
        let before = synced + Duration::from_millis(1999);
        assert!(cache.lookup_at("t1", None, before).is_some());
        let at_expiry = synced + Duration::from_secs(2);
        assert_eq!(cache.lookup_at("t1", None, at_expiry), None);
        assert!(!cached(&cache, "t1"), "an expired entry is dropped");
        assert_consistent(&cache);
    }

    /// Expiry is judged by Redis's clock as the stream tells it, advanced by
    /// the monotonic clock, whatever this host's wall clock says: with Redis
    /// ten minutes ahead of this host or ten minutes behind it, a session
    /// with 2 s to live by Redis's clock is cached and answered for 2 s of
    /// monotonic time after the reading, and not one millisecond longer.
    #[test]
    fn expiry_follows_redis_clock_not_this_hosts() {
        for skew in [-600_i64, 600] {
            let wall = SystemTime::now();
            let redis = if skew < 0 {
                wall - Duration::from_secs(skew.unsigned_abs())
            } else {
                wall + Duration::from_secs(skew.unsigned_abs())
            };
            let cache = NearCache::new(10, STALENESS);
            let t0 = Instant::now();
            recv(&cache, reset_at(Some(redis)), t0);
            let s = Session {
                created_at: redis,
                expires_at: redis + Duration::from_secs(2),
                ..session("alice", "t1", redis)
            };
            let fill = cache.begin_fill("t1", Some("alice"));
            assert!(fill.complete_at(&s, t0), "skew {skew} s: not cached");
            // A heartbeat a second later keeps the same clock.
            let t1 = t0 + Duration::from_secs(1);
            recv(
                &cache,
                heartbeat_at(Some(redis + Duration::from_secs(1))),
                t1,
            );
            let just_alive = t0 + Duration::from_millis(1999);
            assert_eq!(cache.lookup_at("t1", None, just_alive), Some(s.clone()));
            let expired = t0 + Duration::from_secs(2);
            assert_eq!(
                cache.lookup_at("t1", None, expired),
                None,
                "skew {skew} s: answered after Redis expired it"
            );
            // Nor is it cached again from a late answer.
            let fill = cache.begin_fill("t1", None);
            assert!(!fill.complete_at(&s, expired));
        }
    }

    /// Without a reading of Redis's clock (a server older than
    /// `redis_time`) nothing is answered or cached from memory, however
    /// healthy the stream; the first reset that tells the time lets the
    /// cache work, and a replacement stream that tells none stops it again.
    #[test]
    fn without_redis_clock_nothing_is_served_from_memory() {
        let cache = NearCache::new(10, STALENESS);
        let s = session("alice", "t1", SystemTime::now());
        recv(&cache, reset_at(None), Instant::now());
        recv(&cache, heartbeat_at(None), Instant::now());
        let fill = cache.begin_fill("t1", Some("alice"));
        assert!(!fill.complete(&s), "cached without Redis's clock");
        assert_eq!(cache.lookup("t1", None), None);
        assert!(!cache.stats().healthy);

        recv(&cache, reset(), Instant::now());
        let fill = cache.begin_fill("t1", Some("alice"));
        assert!(fill.complete(&s));
        // Heartbeats without a time keep the reading (the estimate runs on).
        recv(&cache, heartbeat_at(None), Instant::now());
        assert_eq!(cache.lookup("t1", None), Some(s.clone()));
        assert!(cache.stats().healthy);

        // A make-before-break switch to a stream of an older server.
        cache.open(1);
        assert!(cache.received(1, reset_at(None), Instant::now()));
        assert_eq!(cache.stats().switches, 1);
        assert_eq!(cache.lookup("t1", None), None);
        assert!(!cache.stats().healthy);
        let fill = cache.begin_fill("t2", None);
        assert!(!fill.complete(&session("alice", "t2", SystemTime::now())));
    }

    /// Within one stream a reading only moves the estimate forward: a
    /// heartbeat that spent longer on its way than the one before (a stall)
    /// does not set Redis's clock back, which would keep a session answered
    /// past its expiry. A flushing reset starts from its own reading.
    #[test]
    fn a_late_reading_does_not_set_the_clock_back() {
        let cache = NearCache::new(10, STALENESS);
        let t0 = Instant::now();
        let redis = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        recv(&cache, reset_at(Some(redis)), t0);
        let s = Session {
            created_at: redis,
            expires_at: redis + Duration::from_millis(1200),
            ..session("alice", "t1", redis)
        };
        let fill = cache.begin_fill("t1", None);
        assert!(fill.complete_at(&s, t0));
        // Arrives 1 s later telling a time 0.5 s after the first: 0.5 s late.
        let t1 = t0 + Duration::from_secs(1);
        let late = heartbeat_at(Some(redis + Duration::from_millis(500)));
        recv(&cache, late, t1);
        assert_eq!(
            cache.lookup_at("t1", None, t0 + Duration::from_millis(1200)),
            None,
            "the late reading set the clock back"
        );
        assert_eq!(
            cache.state().clock.map(|c| c.at(t1)),
            Some(redis + Duration::from_secs(1))
        );
        // An earlier time after a flushing reset is taken as it is.
        recv(&cache, reset_at(Some(redis)), t1);
        assert_eq!(cache.state().clock.map(|c| c.at(t1)), Some(redis));
    }

    /// Silence longer than max_staleness stops answers from memory; the next
    /// message (no reset needed: delivery is in order) resumes them.
    #[test]
    fn a_silent_stream_stops_answers_at_max_staleness() {
        let s = session("alice", "t1", SystemTime::now());
        let cache = healthy_with(10, std::slice::from_ref(&s));
        let synced_at = cache.state().last_message.unwrap();
        let just_in = synced_at + STALENESS;
        let too_late = just_in + Duration::from_millis(1);
        assert!(cache.lookup_at("t1", None, just_in).is_some());
        assert_eq!(cache.lookup_at("t1", None, too_late), None);
        // Nor may a call completing then fill the cache.
        let fill = cache.begin_fill("t2", None);
        let t2 = session("alice", "t2", SystemTime::now());
        assert!(!fill.complete_at(&t2, too_late));
        recv(&cache, heartbeat(), too_late);
        assert!(cache.lookup_at("t1", None, too_late).is_some());
    }

    /// A reset or the stream's loss flushes everything; after a loss nothing
    /// is answered until the next reset.
    #[test]
    fn reset_and_loss_flush() {
        let now = SystemTime::now();
        let a = session("alice", "t1", now);
        let b = session("bob", "t2", now);
        let cache = healthy_with(10, &[a.clone(), b.clone()]);
        recv(&cache, reset(), Instant::now());
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().resets, 2);
        assert_eq!(cache.lookup("t1", None), None);

        let fill = cache.begin_fill("t1", None);
        assert!(fill.complete(&a));
        lose(&cache);
        assert_eq!(cache.stats().entries, 0);
        assert!(!cache.stats().healthy);
        let fill = cache.begin_fill("t2", None);
        assert!(!fill.complete(&b), "cached while the stream is down");
        // Heartbeats on a new stream without its reset do not make it healthy.
        recv(&cache, heartbeat(), Instant::now());
        assert!(!cache.stats().healthy);
        assert_consistent(&cache);
    }

    /// A token revocation drops that session only; a user-wide one drops the
    /// user's sessions created at or before revoked_at, and keeps newer ones
    /// and other users'.
    #[test]
    fn revocations_drop_what_they_end() {
        let t0 = SystemTime::now();
        let old = session("alice", "a-old", t0);
        let edge = session("alice", "a-edge", t0 + Duration::from_secs(1));
        let newer = session("alice", "a-new", t0 + Duration::from_secs(2));
        let bob = session("bob", "b-1", t0);
        let cache = healthy_with(10, &[old, edge, newer, bob.clone()]);

        recv(
            &cache,
            revocations(vec![revoke_token("bob", "b-1")]),
            Instant::now(),
        );
        assert!(!cached(&cache, "b-1"));
        assert!(cached(&cache, "a-old"));

        recv(
            &cache,
            revocations(vec![revoke_user("alice", t0 + Duration::from_secs(1))]),
            Instant::now(),
        );
        assert!(!cached(&cache, "a-old"));
        assert!(!cached(&cache, "a-edge"), "created exactly at revoked_at");
        assert!(cached(&cache, "a-new"), "created after revoked_at");
        assert_eq!(cache.stats().revocations_applied, 2);
        assert_consistent(&cache);

        // A user-wide revocation without a usable time drops them all.
        cache.apply(&[Revocation {
            user_id: "alice".into(),
            token_id: None,
            revoked_at: None,
        }]);
        assert_eq!(cache.stats().entries, 0);
        assert_consistent(&cache);
    }

    /// Evicting the least recently used entry keeps the per-user index in
    /// step, so a later user-wide revocation still finds what is cached.
    #[test]
    fn lru_eviction_keeps_the_index_consistent() {
        let now = SystemTime::now();
        let cache = healthy_with(
            2,
            &[
                session("alice", "a1", now),
                session("alice", "a2", now),
                session("bob", "b1", now),
            ],
        );
        assert!(!cached(&cache, "a1"), "the least recently used is evicted");
        assert!(cached(&cache, "a2") && cached(&cache, "b1"));
        assert_consistent(&cache);
        // A lookup makes a2 the most recently used: b1 goes next.
        assert!(cache.lookup("a2", None).is_some());
        let fill = cache.begin_fill("c1", None);
        assert!(fill.complete(&session("carol", "c1", now)));
        assert!(!cached(&cache, "b1") && cached(&cache, "a2"));
        assert_consistent(&cache);
        assert!(!cache.state().by_user.contains_key("bob"));
        // Re-caching a token replaces it without duplicating its index entry.
        let fill = cache.begin_fill("a2", None);
        assert!(fill.complete(&session("alice", "a2", now)));
        assert_eq!(cache.stats().entries, 2);
        assert_consistent(&cache);
    }

    /// The fill race, interleaved by hand: a call registers, the revocation
    /// that ends its session overtakes its answer, and the answer (read
    /// before the revocation in Redis) must not be cached. Likewise for a
    /// user-wide revocation, a reset and the stream's loss. Calls for other
    /// sessions are unaffected.
    #[test]
    fn an_invalidation_that_overtakes_the_read_prevents_the_fill() {
        let now = SystemTime::now();
        let alice = session("alice", "a1", now);
        let bob = session("bob", "b1", now);
        let cache = healthy_with(10, &[]);

        // Token revocation during a hinted and an unhinted call for it.
        let hinted = cache.begin_fill("a1", Some("alice"));
        let unhinted = cache.begin_fill("a1", None);
        let other = cache.begin_fill("b1", Some("bob"));
        recv(
            &cache,
            revocations(vec![revoke_token("alice", "a1")]),
            Instant::now(),
        );
        assert!(!hinted.complete(&alice));
        assert!(!unhinted.complete(&alice));
        assert!(other.complete(&bob), "bob's call is not concerned");
        assert_eq!(cache.lookup("a1", None), None);

        // User-wide revocation: the user's calls, and every call that did
        // not name its user, lose their fill.
        let hinted = cache.begin_fill("a1", Some("alice"));
        let unhinted = cache.begin_fill("b2", None);
        let bobs = cache.begin_fill("b3", Some("bob"));
        recv(
            &cache,
            revocations(vec![revoke_user("alice", now)]),
            Instant::now(),
        );
        assert!(!hinted.complete(&alice));
        assert!(!unhinted.complete(&session("bob", "b2", now)));
        assert!(bobs.complete(&session("bob", "b3", now)));

        // A reset, or the stream's loss and a new stream's reset.
        let fill = cache.begin_fill("a1", None);
        recv(&cache, reset(), Instant::now());
        assert!(!fill.complete(&alice));
        let fill = cache.begin_fill("a1", None);
        lose(&cache);
        recv(&cache, reset(), Instant::now());
        assert!(
            !fill.complete(&alice),
            "a new stream must not adopt old fills"
        );

        // A revocation that arrived before the call was registered does not
        // concern it: the server answers after it.
        let fill = cache.begin_fill("a1", None);
        assert!(fill.complete(&alice));
        assert_eq!(cache.lookup("a1", Some("alice")), Some(alice));
        assert!(cache.state().fills.is_empty(), "every fill unregistered");
    }

    /// An empty token id is a user-wide revocation; a time that is missing
    /// or out of range makes it drop the user's sessions whatever their age.
    #[test]
    fn revocations_convert_from_the_wire() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let one = Revocation::from_proto(revoke_token("alice", "t1"));
        assert_eq!(one.token_id.as_deref(), Some("t1"));
        let all = Revocation::from_proto(revoke_user("alice", at));
        assert_eq!((all.token_id, all.revoked_at), (None, Some(at)));
        let timeless = Revocation::from_proto(pb::Revocation {
            revoked_at: Some(prost_types::Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            }),
            ..revoke_user("alice", at)
        });
        assert_eq!(timeless.revoked_at, None);
    }

    /// A revoke made through the client without the user's id still
    /// invalidates the calls in flight for that user, found through the
    /// cached session.
    #[test]
    fn an_own_revoke_without_the_user_invalidates_the_users_fills() {
        let now = SystemTime::now();
        let cache = healthy_with(10, &[session("alice", "a1", now)]);
        let alices = cache.begin_fill("a2", Some("alice"));
        let bobs = cache.begin_fill("b1", Some("bob"));
        cache.apply(&[Revocation {
            user_id: String::new(),
            token_id: Some("a1".into()),
            revoked_at: None,
        }]);
        assert!(!cached(&cache, "a1"));
        assert!(!alices.complete(&session("alice", "a2", now)));
        assert!(bobs.complete(&session("bob", "b1", now)));
        assert_consistent(&cache);
    }

    /// A revocation visits only the calls in flight it may concern, not every
    /// one under the lock: with 20,000 lookups in flight, a message of 512
    /// token revocations for other sessions is applied in well under the
    /// 100 ms asserted (0.5 ms measured; a scan of every fill per revocation
    /// took 470 ms here in a debug build, 306 ms in release). A user-wide
    /// revocation then invalidates exactly the fills it concerns: its
    /// user's, and every one that named no user.
    #[test]
    fn revocations_find_the_fills_they_concern_through_an_index() {
        const FILLS: usize = 20_000;
        let cache = healthy_with(10, &[]);
        let fills: Vec<PendingFill> = (0..FILLS)
            .map(|i| {
                let token = format!("t{i}");
                let user = format!("u{}", i % 1000);
                // Half name their user, half do not.
                let hinted = i % 2 == 0;
                cache.begin_fill(&token, hinted.then_some(user.as_str()))
            })
            .collect();
        assert_consistent(&cache);
        let message: Vec<pb::Revocation> = (0..512)
            .map(|i| revoke_token(&format!("other-{i}"), &format!("gone-{i}")))
            .collect();
        let started = Instant::now();
        recv(&cache, revocations(message), Instant::now());
        let took = started.elapsed();
        eprintln!("{FILLS} fills in flight, 512 token revocations applied in {took:?}");
        assert!(took < Duration::from_millis(100), "took {took:?}");
        assert_eq!(cache.state().fills.len(), FILLS, "none concerned");

        recv(
            &cache,
            revocations(vec![revoke_user("u0", SystemTime::now())]),
            Instant::now(),
        );
        let left = cache.state().fills.len();
        assert_eq!(left, FILLS / 2 - FILLS / 2 / 500);
        assert_consistent(&cache);
        let now = SystemTime::now();
        let mut cached = 0;
        for (i, fill) in fills.into_iter().enumerate() {
            let s = session(&format!("u{}", i % 1000), &format!("t{i}"), now);
            cached += usize::from(fill.complete(&s));
        }
        assert_eq!(cached, left);
        assert_consistent(&cache);
        assert!(cache.state().fills.is_empty());
    }

    /// Make before break: a replacement's reset while the old stream works
    /// switches without a flush; revocations still in flight on the old
    /// stream apply while it drains, a call in flight across the switch is
    /// cached, the old stream's heartbeats no longer keep the cache healthy,
    /// and its end once the drain is over flushes nothing.
    #[test]
    fn a_replacement_takes_over_a_working_stream_without_a_flush() {
        let t0 = SystemTime::now();
        let sessions = [
            session("alice", "a1", t0),
            session("bob", "b1", t0),
            session("carol", "c1", t0),
        ];
        let cache = healthy_with(10, &sessions);
        let across = cache.begin_fill("d1", Some("dave"));
        let doomed = cache.begin_fill("a2", Some("alice"));
        cache.open(1);
        // Nothing from the replacement counts before its reset.
        let early = revocations(vec![revoke_token("bob", "b1")]);
        assert!(cache.received(1, early, Instant::now()));
        assert!(cached(&cache, "b1"));

        let at = Instant::now();
        assert!(cache.received(1, reset(), at));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.resets, stats.switches), (3, 1, 1));
        assert!(stats.healthy);
        let drained_at = at + STALENESS;
        assert_eq!(
            cache.roles(),
            Roles {
                current: Some(1),
                candidate: None,
                draining: Some((0, drained_at)),
            }
        );
        // A revocation published before the new stream's reset, still in
        // flight on the old one, applies; so do the new stream's.
        let old = revocations(vec![revoke_token("alice", "a1")]);
        assert!(cache.received(0, old, at));
        assert!(!cached(&cache, "a1"));
        assert!(!doomed.complete(&session("alice", "a2", t0)));
        cache.received(1, revocations(vec![revoke_token("bob", "b1")]), at);
        assert!(!cached(&cache, "b1"));
        assert!(across.complete(&session("dave", "d1", t0)));
        // Liveness is the new stream's alone.
        let late = at + STALENESS + Duration::from_millis(1);
        assert!(cache.received(0, heartbeat(), late));
        assert_eq!(cache.lookup_at("c1", None, late), None);

        cache.ended(0, drained_at);
        assert_eq!(cache.roles().draining, None);
        assert_eq!(cache.stats().entries, 2, "c1 and d1 kept");
        let gone = revocations(vec![revoke_token("carol", "c1")]);
        assert!(!cache.received(0, gone, late), "no longer listened to");
        assert!(cached(&cache, "c1"));
        assert_consistent(&cache);
    }

    /// Whatever stops the old stream before its drain is over flushes, since
    /// a revocation in flight on it may be lost: its end (or silence), or a
    /// reset of its own. The new stream keeps the cache healthy.
    #[test]
    fn an_old_stream_cut_short_flushes() {
        let now = SystemTime::now();
        for reset_of_its_own in [false, true] {
            let cache = healthy_with(10, &[session("alice", "a1", now)]);
            cache.open(1);
            let at = Instant::now();
            cache.received(1, reset(), at);
            let fill = cache.begin_fill("a2", None);
            if reset_of_its_own {
                cache.received(0, reset(), at);
            } else {
                cache.ended(0, at + STALENESS - Duration::from_millis(1));
            }
            let stats = cache.stats();
            assert_eq!(stats.entries, 0);
            assert!(stats.healthy);
            assert!(!fill.complete(&session("alice", "a2", now)));
            let roles = cache.roles();
            assert_eq!((roles.current, roles.draining), (Some(1), None));
            assert_consistent(&cache);
        }
    }

    /// A replacement whose reset arrives when the old stream no longer works
    /// (silent past max_staleness, or ended) starts cold, as every stream
    /// used to; so does one whose reset would cut an earlier drain short.
    #[test]
    fn a_replacement_for_a_stream_that_stopped_starts_cold() {
        let now = SystemTime::now();
        let a = session("alice", "a1", now);

        let cache = healthy_with(10, std::slice::from_ref(&a));
        let synced_at = cache.state().last_message.unwrap();
        cache.open(1);
        cache.received(1, reset(), synced_at + STALENESS + Duration::from_millis(1));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.resets, stats.switches), (0, 2, 0));
        assert_eq!(cache.roles().draining, None);

        let cache = healthy_with(10, std::slice::from_ref(&a));
        cache.open(1);
        cache.ended(0, Instant::now());
        assert!(!cache.stats().healthy);
        assert_eq!(cache.stats().entries, 0);
        cache.received(1, reset(), Instant::now());
        let stats = cache.stats();
        assert!(stats.healthy);
        assert_eq!((stats.resets, stats.switches), (2, 0));

        let cache = healthy_with(10, std::slice::from_ref(&a));
        cache.open(1);
        let at = Instant::now();
        cache.received(1, reset(), at);
        cache.open(2);
        cache.received(2, reset(), at + Duration::from_millis(1));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.resets, stats.switches), (0, 2, 1));
        let roles = cache.roles();
        assert_eq!((roles.current, roles.draining), (Some(2), None));
    }

    /// A call that fails or is cancelled leaves no pending fill behind.
    #[test]
    fn dropped_fills_are_unregistered() {
        let cache = healthy_with(10, &[]);
        let fill = cache.begin_fill("t1", None);
        assert_eq!(cache.state().fills.len(), 1);
        drop(fill);
        assert!(cache.state().fills.is_empty());
    }

    /// The stream task ends (and lets go of the cache) when the last clone
    /// of the client is dropped, even with nothing to connect to.
    #[tokio::test]
    async fn the_task_stops_with_the_last_client() {
        let client = crate::SessionClient::builder("http://127.0.0.1:1")
            .near_cache(10)
            .connect()
            .await
            .unwrap();
        let clone = client.clone();
        let cache = Arc::downgrade(client.near_cache_for_tests().unwrap());
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.upgrade().is_some(), "a clone still holds it");
        drop(clone);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the stream task outlived the client"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
