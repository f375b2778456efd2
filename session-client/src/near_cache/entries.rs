//! The near-cache's sessions in memory: sharded by a keyed hash of the token
//! id, so that lookups on several threads rarely meet on a lock, and packed
//! into one allocation each, so that a million of them fit in a few hundred
//! megabytes (BENCHMARKS.md, "Near-cache at a million sessions").
//!
//! Lookups take only their shard's lock. Everything else here (inserting,
//! evicting, removing, flushing) is called by the parent module with the
//! cache's state lock held, always taken before a shard's: the per-user
//! index, the entry count and the fills live there, and a revocation or a
//! fill's completion changes them and the shards as one step (see the
//! parent module's docs on the fill race). A lookup that finds an entry
//! past its expiry does not remove it itself: it asks the parent module to,
//! which takes the locks in that order.
//!
//! Each shard also holds a copy of what a lookup needs from the stream's
//! state (whether it may serve, and Redis's clock): written under the state
//! lock whenever that state changes (every stream message), read under the
//! shard lock the lookup holds anyway, so no lookup touches a line another
//! core writes to, other than its own shard's.
//!
//! Eviction is CLOCK (second chance) per shard: a lookup marks its entry,
//! and when the cache is over its bound the shard just inserted into (or
//! the next one holding something else) sweeps its hand past the marked
//! entries, clearing their mark, to the first unmarked one. The hand walks
//! the table's slots, whose order the hash key randomises, so among entries
//! not looked up since it last passed, which one goes is arbitrary (not the
//! oldest, as CLOCK over an insertion-ordered ring would pick); an entry
//! looked up since then always outlives one that was not. A removal may
//! shift an entry back past the hand, which only gives it one more turn.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::Clock;
use crate::types::Session;

/// The most shards: enough that two threads rarely share one.
const MAX_SHARDS: usize = 64;
/// Entries per shard below which fewer shards are used: a small cache keeps
/// one, so its second-chance order holds across the whole cache.
const ENTRIES_PER_SHARD: usize = 1024;
/// The bit of a slot's `hash` that says it is taken (so a taken slot's hash
/// is never 0, an empty one's).
const TAKEN: u64 = 1;
/// The bit of a slot's `hash` a lookup sets: looked up since CLOCK's hand
/// last passed. Not part of the hash compared.
const REFERENCED: u64 = 2;
/// Dropping more entries than this at once (a flush) is left to a thread of
/// its own: freeing a million allocations takes a tenth of a second.
const DROP_ELSEWHERE: usize = 4096;
/// The packed data's header: expiry, creation, family expiry, the lengths.
const HEADER: usize = 32;

/// An entry's hash as its slot holds it ([`TAKEN`] set, [`REFERENCED`]
/// clear): how the per-user index finds it again. Two token ids may share
/// one; every use checks what the entry holds.
pub(super) type Handle = u64;

/// What a lookup needs from the stream's state, copied into each shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Serving {
    /// When the current stream's last message arrived.
    pub(super) last_message: Instant,
    /// The latest reading of Redis's clock.
    pub(super) clock: Clock,
}

/// A lookup's outcome.
#[derive(Debug)]
pub(super) enum Found {
    Hit(Session),
    /// Not cached, not the user given, or the cache may not serve.
    Miss,
    /// Cached, but past its expiry by Redis's clock: to be removed.
    Expired,
}

/// An entry removed, for the per-user index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Removed {
    pub(super) handle: Handle,
    pub(super) user_hash: u64,
}

pub(super) struct Entries {
    shards: Box<[Mutex<Shard>]>,
    /// Keyed (SipHash, random keys per cache): a caller choosing token ids
    /// cannot pile them into one shard or one probe sequence.
    hasher: RandomState,
    /// Whether sessions keep their metadata (`near_cache_metadata`).
    metadata: bool,
}

/// One shard: an open-addressing table (linear probing, at most 3/4 full,
/// deletion by backward shift, no tombstones) whose slots hold the packed
/// session itself, so that a lookup reads two places in memory, its slot
/// and its session, rather than the three or four of a map of pointers.
/// On a host where a random read of memory costs 300 ns (BENCHMARKS.md)
/// that is what a lookup costs.
#[derive(Default)]
struct Shard {
    /// A power of two long, or empty.
    slots: Vec<Slot>,
    len: usize,
    /// CLOCK's hand: the next slot eviction looks at.
    hand: usize,
    serving: Option<Serving>,
    hits: u64,
    misses: u64,
}

/// A slot of a shard's table: empty (`hash` 0) or a session.
#[derive(Default)]
pub(super) struct Slot {
    /// The token id's hash, with [`TAKEN`] and [`REFERENCED`].
    hash: u64,
    /// The session packed (see [`pack`]).
    data: Box<[u8]>,
}

fn same(a: u64, b: u64) -> bool {
    (a ^ b) & !REFERENCED == 0
}

impl Entries {
    pub(super) fn new(max_entries: usize, metadata: bool) -> Self {
        let shards = (max_entries / ENTRIES_PER_SHARD)
            .next_power_of_two()
            .clamp(1, MAX_SHARDS);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            metadata,
        }
    }

    /// A user id's hash, the per-user index's key.
    pub(super) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn handle(&self, token_id: &str) -> Handle {
        (self.hash(token_id) | TAKEN) & !REFERENCED
    }

    fn shard_of(&self, handle: Handle) -> usize {
        // Bits the probing does not start from (it uses the low ones), so
        // that a shard's entries still spread over its table.
        (handle >> 48) as usize & (self.shards.len() - 1)
    }

    fn shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        // Nothing here panics with a shard locked, and every operation
        // leaves it consistent before it could.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn shard_for(&self, handle: Handle) -> MutexGuard<'_, Shard> {
        self.shard(self.shard_of(handle))
    }

    /// The cached session for `token_id`, when the cache may serve at `now`.
    pub(super) fn lookup(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: Instant,
        max_staleness: Duration,
    ) -> Found {
        let handle = self.handle(token_id);
        let mut shard = self.shard_for(handle);
        let found = shard.lookup(handle, token_id, user_id, now, max_staleness);
        if matches!(found, Found::Hit(_)) {
            shard.hits += 1;
        } else {
            shard.misses += 1;
        }
        found
    }

    /// Lookups counted so far: hits and misses, summed over the shards.
    pub(super) fn counts(&self) -> (u64, u64) {
        (0..self.shards.len()).fold((0, 0), |(h, m), i| {
            let shard = self.shard(i);
            (h + shard.hits, m + shard.misses)
        })
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
        let data = pack(session, self.metadata)?;
        let handle = self.handle(&session.token_id);
        self.shard_for(handle).insert(Slot { hash: handle, data });
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
            if let Some(data) = shard.evict(keep) {
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
        let data = shard.remove(at);
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
        let data = shard.remove(at);
        Some(self.removed(&data))
    }

    /// Removes `token_id`'s entry when it expired by `redis_now`.
    pub(super) fn remove_expired(&self, token_id: &str, redis_now: SystemTime) -> Option<Removed> {
        let now = nanos(redis_now)?;
        let handle = self.handle(token_id);
        let mut shard = self.shard_for(handle);
        let at = shard.find(handle, token_id)?;
        if View(&shard.slots[at].data).expires()? > now {
            return None;
        }
        let data = shard.remove(at);
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
        let data = &mut shard.slots[at].data;
        if let Some((user, expires_at)) = answer
            && View(data).user() == Some(user)
            && let Some(answer) = nanos(expires_at)
            && let Some(cached) = View(data).expires()
        {
            data[..8].copy_from_slice(&cached.min(answer).to_le_bytes());
            return None;
        }
        let data = shard.remove(at);
        Some(self.removed(&data))
    }

    /// Empties every shard, leaving `serving` in each; what was cached is
    /// handed back to be dropped off the lookups' path ([`Garbage`]).
    pub(super) fn take_all(&self, serving: Option<Serving>) -> Vec<Vec<Slot>> {
        (0..self.shards.len())
            .map(|i| {
                let mut shard = self.shard(i);
                shard.serving = serving;
                shard.hand = 0;
                shard.len = 0;
                std::mem::take(&mut shard.slots)
            })
            .collect()
    }

    /// Whether `token_id` is cached (tests).
    #[cfg(test)]
    pub(super) fn contains(&self, token_id: &str) -> bool {
        let handle = self.handle(token_id);
        self.shard_for(handle).find(handle, token_id).is_some()
    }

    /// `token_id`'s cached expiry (tests).
    #[cfg(test)]
    pub(super) fn expires_at(&self, token_id: &str) -> Option<SystemTime> {
        let handle = self.handle(token_id);
        let shard = self.shard_for(handle);
        let at = shard.find(handle, token_id)?;
        let expires = View(&shard.slots[at].data).expires()?;
        Some(UNIX_EPOCH + Duration::from_nanos(expires))
    }

    /// The user ids and token ids of the entries at `handle` (tests).
    #[cfg(test)]
    pub(super) fn at(&self, handle: Handle) -> Vec<(String, String)> {
        let shard = self.shard_for(handle);
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

    /// Entries held, counted shard by shard (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        (0..self.shards.len()).map(|i| self.shard(i).len).sum()
    }
}

impl Shard {
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn home(&self, hash: u64) -> usize {
        (hash >> 2) as usize & self.mask()
    }

    /// The first slot from `hash`'s home holding that hash whose data
    /// `wanted` accepts (an empty slot ends the search).
    fn probe(&self, hash: u64, mut wanted: impl FnMut(&[u8]) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut at = self.home(hash);
        loop {
            let slot = &self.slots[at];
            if slot.hash == 0 {
                return None;
            }
            if same(slot.hash, hash) && wanted(&slot.data) {
                return Some(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    fn find(&self, hash: u64, token_id: &str) -> Option<usize> {
        self.probe(hash, |data| View(data).token() == Some(token_id))
    }

    fn lookup(
        &mut self,
        hash: u64,
        token_id: &str,
        user_id: Option<&str>,
        now: Instant,
        max_staleness: Duration,
    ) -> Found {
        let Some(serving) = self
            .serving
            .filter(|s| now.saturating_duration_since(s.last_message) <= max_staleness)
        else {
            return Found::Miss;
        };
        let Some(at) = self.find(hash, token_id) else {
            return Found::Miss;
        };
        let slot = &mut self.slots[at];
        let view = View(&slot.data);
        // Redis's now before 1970 (never): treated as expired, fail safe.
        let redis_now = nanos(serving.clock.at(now));
        if view
            .expires()
            .zip(redis_now)
            .is_none_or(|(expires, now)| expires <= now)
        {
            return Found::Expired;
        }
        if user_id.is_some_and(|user| Some(user) != view.user()) {
            return Found::Miss;
        }
        let found = view.session();
        // Written only when it changes: a hit dirties no line it need not.
        if slot.hash & REFERENCED == 0 {
            slot.hash |= REFERENCED;
        }
        match found {
            Some(session) => Found::Hit(session),
            None => Found::Miss,
        }
    }

    fn insert(&mut self, slot: Slot) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let mut at = self.home(slot.hash);
        while self.slots[at].hash != 0 {
            at = (at + 1) & self.mask();
        }
        self.slots[at] = slot;
        self.len += 1;
    }

    /// Doubles the table (16 slots at first), moving every entry (its hash
    /// is in its slot: no session is read).
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(
            &mut self.slots,
            (0..size).map(|_| Slot::default()).collect(),
        );
        self.len = 0;
        self.hand = 0;
        for slot in old.into_iter().filter(|s| s.hash != 0) {
            self.insert(slot);
        }
    }

    /// Empties slot `at`, and moves back the entries after it that may be
    /// found through it, so that no probe ever stops short of them.
    fn remove(&mut self, mut hole: usize) -> Box<[u8]> {
        let mask = self.mask();
        let taken = std::mem::take(&mut self.slots[hole]);
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let hash = self.slots[at].hash;
            if hash == 0 {
                break;
            }
            // Movable into the hole unless its home lies after the hole
            // (cyclically): then a probe for it starts past the hole.
            let home = self.home(hash);
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(hole) & mask) {
                self.slots[hole] = std::mem::take(&mut self.slots[at]);
                hole = at;
            }
        }
        self.len -= 1;
        taken.data
    }

    /// CLOCK: the first unmarked entry from the hand on, clearing the marks
    /// passed; two turns at most.
    fn evict(&mut self, keep: Option<Handle>) -> Option<Box<[u8]>> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let at = self.hand % n;
            self.hand = at + 1;
            let slot = &mut self.slots[at];
            if slot.hash == 0 || keep.is_some_and(|k| same(k, slot.hash)) {
                continue;
            }
            if slot.hash & REFERENCED != 0 {
                slot.hash &= !REFERENCED;
                continue;
            }
            return Some(self.remove(at));
        }
        None
    }
}

/// A session packed into one allocation: the fixed fields, the lengths, then
/// the strings one after the other (no allocation of their own, no
/// capacity to spare):
///
/// ```text
/// expires_at u64 | created_at u64 | family_expires_at u64 (u64::MAX: none) | token, user,
/// family lengths u16 each | metadata entries u16 | token | user | family |
/// per metadata entry: key length u16, key, value length u16, value
/// ```
///
/// Times are nanoseconds since 1970 by Redis's clock, little-endian. `None`
/// when a time is before 1970 or past 2554 or a string longer than 64 KiB:
/// such a session is not cached (it is asked of the server every time).
fn pack(session: &Session, metadata: bool) -> Option<Box<[u8]>> {
    let expires = nanos(session.expires_at)?;
    let created = nanos(session.created_at)?;
    let family_expires = match session.family_expires_at {
        Some(at) => nanos(at).filter(|&n| n != u64::MAX)?,
        None => u64::MAX,
    };
    let kept: Vec<(&String, &String)> = if metadata {
        session.metadata.iter().collect()
    } else {
        Vec::new()
    };
    let strings = [&session.token_id, &session.user_id, &session.family_id];
    let size = HEADER
        + strings.iter().map(|s| s.len()).sum::<usize>()
        + kept
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>();
    let mut data = Vec::with_capacity(size);
    data.extend_from_slice(&expires.to_le_bytes());
    data.extend_from_slice(&created.to_le_bytes());
    data.extend_from_slice(&family_expires.to_le_bytes());
    for s in strings {
        data.extend_from_slice(&u16::try_from(s.len()).ok()?.to_le_bytes());
    }
    data.extend_from_slice(&u16::try_from(kept.len()).ok()?.to_le_bytes());
    for s in strings {
        data.extend_from_slice(s.as_bytes());
    }
    for (key, value) in kept {
        for s in [key, value] {
            data.extend_from_slice(&u16::try_from(s.len()).ok()?.to_le_bytes());
            data.extend_from_slice(s.as_bytes());
        }
    }
    Some(data.into_boxed_slice())
}

/// Reads a packed session (see [`pack`]). Every read is checked: `None`
/// for what [`pack`] cannot have written.
#[derive(Clone, Copy)]
pub(super) struct View<'a>(&'a [u8]);

impl<'a> View<'a> {
    fn u64_at(self, at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(self.0.get(at..at + 8)?.try_into().ok()?))
    }

    fn u16_at(self, at: usize) -> Option<usize> {
        Some(u16::from_le_bytes(self.0.get(at..at + 2)?.try_into().ok()?).into())
    }

    fn str_at(self, at: usize, len: usize) -> Option<&'a str> {
        std::str::from_utf8(self.0.get(at..at + len)?).ok()
    }

    /// The expiry, nanoseconds since 1970 by Redis's clock.
    fn expires(self) -> Option<u64> {
        self.u64_at(0)
    }

    pub(super) fn token(self) -> Option<&'a str> {
        self.str_at(HEADER, self.u16_at(24)?)
    }

    pub(super) fn user(self) -> Option<&'a str> {
        self.str_at(HEADER + self.u16_at(24)?, self.u16_at(26)?)
    }

    pub(super) fn family(self) -> Option<&'a str> {
        self.str_at(
            HEADER + self.u16_at(24)? + self.u16_at(26)?,
            self.u16_at(28)?,
        )
    }

    pub(super) fn created_at(self) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_nanos(self.u64_at(8)?))
    }

    /// The session, as it was cached (with the expiry as it is now).
    fn session(self) -> Option<Session> {
        let expires = self.expires()?;
        let family_expires = self.u64_at(16)?;
        let mut at = HEADER + self.u16_at(24)? + self.u16_at(26)? + self.u16_at(28)?;
        let entries = self.u16_at(30)?;
        let mut metadata = HashMap::with_capacity(entries);
        for _ in 0..entries {
            let key_len = self.u16_at(at)?;
            let key = self.str_at(at + 2, key_len)?;
            at += 2 + key_len;
            let value_len = self.u16_at(at)?;
            let value = self.str_at(at + 2, value_len)?;
            at += 2 + value_len;
            metadata.insert(key.to_owned(), value.to_owned());
        }
        Some(Session {
            user_id: self.user()?.to_owned(),
            token_id: self.token()?.to_owned(),
            metadata,
            created_at: self.created_at()?,
            expires_at: UNIX_EPOCH + Duration::from_nanos(expires),
            family_id: self.family()?.to_owned(),
            family_expires_at: (family_expires != u64::MAX)
                .then(|| UNIX_EPOCH + Duration::from_nanos(family_expires)),
        })
    }
}

/// Nanoseconds since 1970; `None` before it or past what a u64 holds.
pub(super) fn nanos(at: SystemTime) -> Option<u64> {
    u64::try_from(at.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
}

/// What a flush took out of the cache: dropped by a thread of its own when
/// large, so that neither the lookups (whose shards were swapped for empty
/// ones in an instant) nor the stream task wait for a million frees.
#[derive(Default)]
pub(super) struct Garbage {
    pub(super) shards: Vec<Vec<Slot>>,
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
