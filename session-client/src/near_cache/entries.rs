//! The near-cache's sessions in memory: sharded by a keyed hash of the token
//! id, so that lookups on several threads rarely meet on a lock, and packed
//! into one allocation each, so that a million of them fit in a few hundred
//! megabytes (BENCHMARKS.md, "Near-cache at a million sessions").
//!
//! Each shard is behind a reader-writer lock striped by thread (crossbeam's
//! `ShardedLock`: eight stripes, threads numbered as they first read, a
//! number freed when its thread ends): a lookup takes a read lock on its
//! thread's stripe of its shard, a line the lookups of up to eight threads
//! never share, and counts itself on a line of its thread's ([`Counts`]). So
//! lookups on several cores write no line another core reads, other than an
//! entry's CLOCK mark the first time it is looked up since the hand passed
//! (`slot.rs`); with one `Mutex` per shard, every lookup moved its shard's
//! lock from the other core's cache about every other time, and two threads
//! got 1.64-1.72 times what one did over a million sessions where they now
//! get 1.91-2.08 (BENCHMARKS.md, #28's sixth pass). Everything else here
//! (inserting, evicting, removing, flushing) takes the write lock (every
//! stripe in turn), and is called by the parent module with the cache's
//! state lock held, always taken before a shard's: the per-user index, the
//! entry count and the fills live there, and a revocation or a fill's
//! completion changes them and the shards as one step (see the parent
//! module's docs on the fill race). A lookup that finds an entry past its
//! expiry does not remove it itself: it asks the parent module to, which
//! takes the locks in that order.
//!
//! Each shard also holds a copy of what a lookup needs from the stream's
//! state (whether it may serve, and Redis's clock): written under the state
//! lock whenever that state changes (every stream message), read under the
//! read lock the lookup holds anyway: written once a message, by the
//! stream, never by a lookup.
//!
//! The sessions themselves, the shard's handles on shared metadata strings
//! and eviction are a shard's (`shard.rs`); how a session is laid out in
//! memory, and the registry that keeps each shared string once for the
//! cache (here, under a lock of its own taken after a shard's), are
//! `packed.rs`'s.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use crossbeam_utils::{
    CachePadded,
    sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard},
};

use super::packed::{Interned, Registry, View, nanos, pack};
use super::shard::{Found, Serving, Shard};
use super::slot::{Handle, TAKEN};
use crate::types::Session;

/// The most shards: enough that the threads of a large host rarely meet
/// on one.
const MAX_SHARDS: usize = 64;
/// Shards per core the process may run on. Enough that changes (fills,
/// revocations) rarely hold up lookups of other sessions, and no more: a
/// shard's table and sessions are in memory of its own (`arena.rs`), and
/// the fewer the shards, the more of
/// that memory is in huge pages (a table is one from 2 MiB, a million
/// sessions' tables over 8 shards; over 64 they are a quarter of that
/// each): over a million sessions, 1.37 M lookups/s on one thread with 8
/// shards against 0.93-1.27 M/s with 64 (BENCHMARKS.md, third pass).
const SHARDS_PER_CORE: usize = 4;
/// Entries per shard below which fewer shards are used: a small cache keeps
/// one, so its second-chance order holds across the whole cache.
const ENTRIES_PER_SHARD: usize = 1024;
/// Dropping more entries than this at once (a flush) is left to a thread of
/// its own: freeing a million allocations takes a tenth of a second.
const DROP_ELSEWHERE: usize = 4096;

/// An entry removed, for the per-user index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Removed {
    pub(super) handle: Handle,
    pub(super) user_hash: u64,
}

pub(super) struct Entries {
    shards: Box<[ShardedLock<Shard>]>,
    /// Lookups counted, by thread.
    counts: Counts,
    /// Keyed (SipHash, random keys per cache): a caller choosing token ids
    /// cannot pile them into one shard or one probe sequence.
    hasher: RandomState,
    /// Whether sessions keep their metadata (`near_cache_metadata`).
    metadata: bool,
    /// The sessions a shard is expected to hold: its share of the bound.
    expected: usize,
    /// The shared metadata strings, once for every shard. Taken after a
    /// shard's lock, only by what changes the sessions (a lookup only to
    /// remove an expired entry, with the state lock, as any removal).
    registry: Mutex<Registry>,
}

impl Entries {
    pub(super) fn new(max_entries: usize, metadata: bool) -> Self {
        // The cores this process may use (its CPU affinity and cgroup
        // quota); one when that cannot be told.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let most = (cores * SHARDS_PER_CORE)
            .next_power_of_two()
            .min(MAX_SHARDS);
        let shards = (max_entries / ENTRIES_PER_SHARD)
            .next_power_of_two()
            .clamp(1, most);
        let expected = max_entries.div_ceil(shards);
        Self {
            shards: (0..shards)
                .map(|_| ShardedLock::new(Shard::new(expected)))
                .collect(),
            counts: Counts::new(most),
            expected,
            hasher: RandomState::new(),
            metadata,
            registry: Mutex::new(Registry::default()),
        }
    }

    /// Runs `read`, a caller's closure called under a shard's read lock
    /// (`with_cached_session`'s), noting on this thread that it does:
    /// any lock of this cache taken from inside it panics
    /// ([`not_reading`](Self::not_reading)). Taking one there could
    /// deadlock: a change waiting for the shard `read` holds blocks new
    /// readers of that shard and holds the state lock, so a lookup, a fill,
    /// a revocation or `stats` from inside `read` would wait for `read`
    /// itself. It would do so only when a change happened to be waiting;
    /// the panic comes every time, so the misuse shows in the caller's
    /// first test.
    pub(super) fn reading<R>(&self, read: impl FnOnce() -> R) -> R {
        /// Puts back what the thread was reading before (another cache's
        /// closure may be running further up), also when `read` panics.
        struct Restore(usize);
        impl Drop for Restore {
            fn drop(&mut self) {
                READING.set(self.0);
            }
        }
        let _restore = Restore(READING.replace(self.id()));
        read()
    }

    /// This cache's identity for [`READING`]: its address, fixed while it
    /// is borrowed.
    fn id(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// Panics when this thread is inside [`reading`](Self::reading) of this
    /// cache. Another cache's locks are no part of the cycle: using one
    /// from inside is allowed.
    pub(super) fn not_reading(&self) {
        assert!(
            READING.get() != self.id(),
            "SessionClient::with_cached_session: its closure used the same client's near-cache \
             (a lookup, a call that fills or revokes, near_cache_stats or Debug), which could \
             deadlock; the closure may only read the SessionView it is given"
        );
    }

    /// A user id's hash, the per-user index's key.
    pub(super) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn handle(&self, token_id: &str) -> Handle {
        self.hash(token_id) | TAKEN
    }

    fn shard_of(&self, handle: Handle) -> usize {
        // Bits the probing does not start from (it uses the low ones), so
        // that a shard's entries still spread over its table.
        (handle >> 48) as usize & (self.shards.len() - 1)
    }

    /// Shard `index`, to change.
    fn shard(&self, index: usize) -> ShardedLockWriteGuard<'_, Shard> {
        self.not_reading();
        // Nothing here panics with a shard locked, and every operation
        // leaves it consistent before it could.
        self.shards[index]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Shard `index`, to read (a lookup), locked on this thread's stripe.
    fn read(&self, index: usize) -> ShardedLockReadGuard<'_, Shard> {
        self.not_reading();
        // As for the write lock: and a lookup changes nothing but a mark.
        self.shards[index]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.not_reading();
        // As for a shard's: nothing panics with it locked.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shard_for(&self, handle: Handle) -> ShardedLockWriteGuard<'_, Shard> {
        self.shard(self.shard_of(handle))
    }

    /// The answer `answer` builds from `token_id`'s entry, when the cache
    /// may serve it at `now` (see `Shard::lookup`).
    pub(super) fn lookup<T>(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: impl Fn() -> Instant,
        max_staleness: Duration,
        answer: impl FnOnce(View<'_>, &Interned) -> Option<T>,
    ) -> Found<T> {
        let handle = self.handle(token_id);
        let shard = self.read(self.shard_of(handle));
        // A caller's closure (`answer` calls it only on a hit) that panics
        // still leaves its lookup counted, as a hit.
        let unwinding = HitOnUnwind(&self.counts);
        // The clock read with the lock held (see `NearCache::lookup_with`).
        let found = shard.lookup(handle, token_id, user_id, now(), max_staleness, answer);
        std::mem::forget(unwinding);
        drop(shard);
        self.counts.add(matches!(found, Found::Hit(_)));
        found
    }

    /// Lookups counted so far: hits and misses.
    pub(super) fn counts(&self) -> (u64, u64) {
        self.counts.sum()
    }

    /// Copies what lookups need from the stream's state into every shard.
    pub(super) fn publish(&self, serving: Option<Serving>) {
        for i in 0..self.shards.len() {
            self.shard(i).serving = serving;
        }
    }

    /// Caches `session` (its token id not cached: the caller removed it).
    /// `None` when it cannot be packed (a field out of range): not cached.
    pub(super) fn insert(&self, session: &Session) -> Option<Handle> {
        let handle = self.handle(&session.token_id);
        let mut shard = self.shard_for(handle);
        // Packed under the shard's lock: its shared strings are the
        // shard's. Fills are not the lookups' hot path.
        let data = pack(
            session,
            self.metadata,
            &mut shard.interned,
            &mut self.registry(),
            &self.hasher,
        )?;
        if !shard.insert(handle, &data) {
            // No memory for it: its strings go back, and it is not cached.
            shard
                .interned
                .release(View(&data).shared(), &mut self.registry());
            return None;
        }
        Some(handle)
    }

    /// Evicts one entry other than `keep` (just inserted): from `keep`'s
    /// shard, or the next one holding something else.
    pub(super) fn evict(&self, keep: Handle) -> Option<Removed> {
        let first = self.shard_of(keep);
        for step in 0..self.shards.len() {
            let index = (first + step) % self.shards.len();
            let mut shard = self.shard(index);
            let keep = (index == first).then_some(keep);
            if shard.len <= usize::from(keep.is_some()) {
                continue;
            }
            if let Some(data) = shard.evict(keep, &mut self.registry()) {
                return Some(self.removed(&data));
            }
        }
        None
    }

    fn removed(&self, data: &[u8]) -> Removed {
        let view = View(data);
        Removed {
            handle: self.handle(view.token().unwrap_or_default()),
            user_hash: self.hash(view.user().unwrap_or_default()),
        }
    }

    /// Removes `token_id`'s entry; returns it and its user id.
    pub(super) fn remove(&self, token_id: &str) -> Option<(Removed, String)> {
        let handle = self.handle(token_id);
        let mut shard = self.shard_for(handle);
        let at = shard.find(handle, token_id)?;
        let data = shard.remove(at, &mut self.registry());
        let user = View(&data).user()?.to_owned();
        Some((self.removed(&data), user))
    }

    /// Removes an entry at `handle` that `doomed` says so of.
    pub(super) fn remove_if(
        &self,
        handle: Handle,
        doomed: impl Fn(View<'_>) -> bool,
    ) -> Option<Removed> {
        let mut shard = self.shard_for(handle);
        let at = shard.probe(handle, |data| doomed(View(data)))?;
        let data = shard.remove(at, &mut self.registry());
        Some(self.removed(&data))
    }

    /// Removes `token_id`'s entry when it expired by `redis_now`.
    pub(super) fn remove_expired(&self, token_id: &str, redis_now: SystemTime) -> Option<Removed> {
        let now = nanos(redis_now)?;
        let handle = self.handle(token_id);
        let mut shard = self.shard_for(handle);
        let at = shard.find(handle, token_id)?;
        if View(shard.record(at)?).expires()? > now {
            return None;
        }
        let data = shard.remove(at, &mut self.registry());
        Some(self.removed(&data))
    }

    /// An ExtendSession answer for `token_id` (see
    /// `NearCache::extend_entry`): the entry takes the earlier of the two
    /// expiries when it is the answer's user's; otherwise it is removed.
    pub(super) fn extended(
        &self,
        token_id: &str,
        answer: Option<(&str, SystemTime)>,
    ) -> Option<Removed> {
        let handle = self.handle(token_id);
        let mut shard = self.shard_for(handle);
        let at = shard.find(handle, token_id)?;
        let view = View(shard.record(at)?);
        if let Some((user, expires_at)) = answer
            && view.user_is(user)
            && let Some(answer) = nanos(expires_at)
            && let Some(cached) = view.expires()
        {
            shard.set_expires(at, cached.min(answer));
            return None;
        }
        let data = shard.remove(at, &mut self.registry());
        Some(self.removed(&data))
    }

    /// Empties every shard, leaving `serving` in each; what was cached is
    /// handed back to be dropped off the lookups' path ([`Garbage`]).
    pub(super) fn take_all(&self, serving: Option<Serving>) -> Vec<Shard> {
        let taken = (0..self.shards.len())
            .map(|i| {
                let mut shard = self.shard(i);
                let mut empty = Shard::new(self.expected);
                empty.serving = serving;
                std::mem::replace(&mut *shard, empty)
            })
            .collect();
        // The shards' strings go with them; what is interned from now on
        // is counted afresh (a string only the garbage holds would never
        // be forgotten otherwise).
        *self.registry() = Registry::default();
        taken
    }

    /// Whether `token_id` is cached (tests).
    #[cfg(test)]
    pub(super) fn contains(&self, token_id: &str) -> bool {
        let handle = self.handle(token_id);
        self.read(self.shard_of(handle))
            .find(handle, token_id)
            .is_some()
    }

    /// `token_id`'s cached expiry (tests).
    #[cfg(test)]
    pub(super) fn expires_at(&self, token_id: &str) -> Option<SystemTime> {
        let handle = self.handle(token_id);
        let shard = self.read(self.shard_of(handle));
        let at = shard.find(handle, token_id)?;
        let expires = View(shard.record(at)?).expires()?;
        Some(std::time::UNIX_EPOCH + Duration::from_nanos(expires))
    }

    /// The user ids and token ids of the entries at `handle` (tests).
    #[cfg(test)]
    pub(super) fn at(&self, handle: Handle) -> Vec<(String, String)> {
        let shard = self.read(self.shard_of(handle));
        let mut found = Vec::new();
        shard.probe(handle, |data| {
            let view = View(data);
            found.push((
                view.user().unwrap_or_default().to_owned(),
                view.token().unwrap_or_default().to_owned(),
            ));
            false
        });
        found
    }

    /// Every shared string is counted once per session holding it, and
    /// none is held that no session holds (tests).
    #[cfg(test)]
    pub(super) fn assert_interned_counted(&self) {
        let mut texts = std::collections::HashSet::new();
        for i in 0..self.shards.len() {
            let shard = self.read(i);
            texts.extend(shard.interned.texts().map(str::to_owned));
            let mut held: HashMap<u32, u32> = HashMap::new();
            for data in shard.records() {
                for id in View(data).shared() {
                    *held.entry(id).or_default() += 1;
                }
            }
            assert_eq!(held, shard.interned.counts(), "shard {i}");
        }
        assert_eq!(texts.len(), self.registry().len(), "registry");
    }

    /// Shared strings held, once however many shards hold them (tests).
    #[cfg(test)]
    pub(super) fn interned(&self) -> usize {
        self.registry().len()
    }

    /// Entries held, counted shard by shard (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        (0..self.shards.len()).map(|i| self.read(i).len).sum()
    }
}

thread_local! {
    /// The cache (its [`Entries::id`]) whose caller's closure this thread
    /// is running under a read lock, or 0 (see [`Entries::reading`]).
    static READING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Lookups counted by the threads that made them, each thread on a line of
/// its own (threads are numbered as they first look up; past the number of
/// stripes they share one, still counted exactly).
struct Counts(Box<[CachePadded<[AtomicU64; 2]>]>);

impl Counts {
    /// `stripes` lines: a power of two.
    fn new(stripes: usize) -> Self {
        Self(
            (0..stripes)
                .map(|_| CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]))
                .collect(),
        )
    }

    fn add(&self, hit: bool) {
        static THREADS: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static THREAD: usize = THREADS.fetch_add(1, Ordering::Relaxed);
        }
        // A lookup from a thread-local's destructor counts on stripe 0.
        let stripe = THREAD.try_with(|n| *n).unwrap_or(0) & (self.0.len() - 1);
        self.0[stripe][usize::from(!hit)].fetch_add(1, Ordering::Relaxed);
    }

    /// Hits and misses, summed over the stripes.
    fn sum(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |(hits, misses), stripe| {
            (
                hits + stripe[0].load(Ordering::Relaxed),
                misses + stripe[1].load(Ordering::Relaxed),
            )
        })
    }
}

/// Counts a hit when dropped, which a lookup lets happen only while it
/// unwinds (see `Entries::lookup`).
struct HitOnUnwind<'a>(&'a Counts);

impl Drop for HitOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.add(true);
    }
}

/// What a flush took out of the cache: dropped by a thread of its own when
/// large, so that neither the lookups (whose shards were swapped for empty
/// ones in an instant) nor the stream task wait for a million frees.
#[derive(Default)]
pub(super) struct Garbage {
    pub(super) shards: Vec<Shard>,
    pub(super) by_user: HashMap<u64, Vec<Handle>>,
    pub(super) entries: usize,
}

impl Drop for Garbage {
    fn drop(&mut self) {
        if self.entries <= DROP_ELSEWHERE {
            return;
        }
        let shards = std::mem::take(&mut self.shards);
        let by_user = std::mem::take(&mut self.by_user);
        // Should the thread not start, the caller drops it all in place.
        let _ = std::thread::Builder::new()
            .name("near-cache-drop".into())
            .spawn(move || drop((shards, by_user)));
    }
}
