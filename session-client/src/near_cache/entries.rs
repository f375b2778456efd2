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
//! entries, clearing their mark, to the first unmarked one. With one shard
//! (small caches) this is the textbook approximation of least recently used.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hashbrown::HashTable;

use super::Clock;
use crate::types::Session;

/// Bits of a [`Handle`] that number a slot within its shard; the others
/// number the shard.
const SLOT_BITS: u32 = 26;
/// The most shards: enough that two threads rarely share one.
const MAX_SHARDS: usize = 64;
/// Entries per shard below which fewer shards are used: a small cache keeps
/// one (exact CLOCK order, as its tests expect).
const ENTRIES_PER_SHARD: usize = 1024;
/// The mark a lookup sets on its entry (the top bit of `Slot::expires`;
/// nanoseconds since 1970 stay below it until the year 2262).
const REFERENCED: u64 = 1 << 63;
/// Dropping more entries than this at once (a flush) is left to a thread of
/// its own: freeing a million allocations takes a tenth of a second.
const DROP_ELSEWHERE: usize = 4096;

/// Where an entry sits: its shard and slot, stable while it is cached.
pub(super) type Handle = u32;

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

#[derive(Default)]
struct Shard {
    /// Slot numbers, by the hash of their token id.
    table: HashTable<u32>,
    slots: Vec<Slot>,
    /// Empty slots, reused before the vector grows.
    free: Vec<u32>,
    /// CLOCK's hand: the next slot eviction looks at.
    hand: usize,
    len: usize,
    serving: Option<Serving>,
    hits: u64,
    misses: u64,
}

pub(super) struct Slot {
    hash: u64,
    /// By Redis's clock, nanoseconds since 1970; [`REFERENCED`] when
    /// looked up since the hand last passed.
    expires: u64,
    /// The session packed (see [`pack`]); empty for a free slot.
    data: Box<[u8]>,
}

impl Slot {
    fn expires(&self) -> u64 {
        self.expires & !REFERENCED
    }
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

    pub(super) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard_of(&self, hash: u64) -> usize {
        // Bits the table's probing does not start from (it uses the low
        // ones), so that a shard's entries still spread over its table.
        (hash >> 40) as usize & (self.shards.len() - 1)
    }

    fn shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        // Nothing here panics with a shard locked, and every operation
        // leaves it consistent before it could.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn split(handle: Handle) -> (usize, usize) {
        (
            (handle >> SLOT_BITS) as usize,
            (handle & ((1 << SLOT_BITS) - 1)) as usize,
        )
    }

    /// The cached session for `token_id`, when the cache may serve at `now`.
    pub(super) fn lookup(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        now: Instant,
        max_staleness: Duration,
    ) -> Found {
        let hash = self.hash(token_id);
        let mut guard = self.shard(self.shard_of(hash));
        let shard = &mut *guard;
        let found = shard.lookup(hash, token_id, user_id, now, max_staleness);
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
        let expires = nanos(session.expires_at).filter(|e| e & REFERENCED == 0)?;
        let hash = self.hash(&session.token_id);
        let index = self.shard_of(hash);
        let mut shard = self.shard(index);
        let slot = match shard.free.pop() {
            Some(slot) => slot as usize,
            None if shard.slots.len() < 1 << SLOT_BITS => {
                shard.slots.push(Slot {
                    hash: 0,
                    expires: 0,
                    data: Box::default(),
                });
                shard.slots.len() - 1
            }
            None => return None,
        };
        shard.slots[slot] = Slot {
            hash,
            expires,
            data,
        };
        let Shard { table, slots, .. } = &mut *shard;
        table.insert_unique(hash, slot as u32, |&s| slots[s as usize].hash);
        shard.len += 1;
        Some(((index as u32) << SLOT_BITS) | slot as u32)
    }

    /// Evicts one entry other than `keep` (just inserted): from `keep`'s
    /// shard, or the next one holding something else.
    pub(super) fn evict(&self, keep: Handle) -> Option<Removed> {
        let (first, kept) = Self::split(keep);
        for step in 0..self.shards.len() {
            let index = (first + step) % self.shards.len();
            let mut shard = self.shard(index);
            let keep = (index == first).then_some(kept);
            if shard.len <= usize::from(keep.is_some()) {
                continue;
            }
            if let Some(removed) = shard.evict(keep, index, &self.hasher) {
                return Some(removed);
            }
        }
        None
    }

    /// Removes `token_id`'s entry; returns it and its user id.
    pub(super) fn remove(&self, token_id: &str) -> Option<(Removed, String)> {
        let hash = self.hash(token_id);
        let index = self.shard_of(hash);
        let mut shard = self.shard(index);
        let slot = shard.find(hash, token_id)?;
        let user = View(&shard.slots[slot].data).user()?.to_owned();
        let removed = shard.remove(slot, index, &self.hasher)?;
        Some((removed, user))
    }

    /// Removes the entry at `handle` when `doomed` says so of it.
    pub(super) fn remove_if(
        &self,
        handle: Handle,
        doomed: impl FnOnce(View<'_>) -> bool,
    ) -> Option<Removed> {
        let (index, slot) = Self::split(handle);
        let mut shard = self.shard(index);
        let entry = shard.slots.get(slot).filter(|s| !s.data.is_empty())?;
        if !doomed(View(&entry.data)) {
            return None;
        }
        shard.remove(slot, index, &self.hasher)
    }

    /// Removes `token_id`'s entry when it expired by `redis_now`.
    pub(super) fn remove_expired(&self, token_id: &str, redis_now: SystemTime) -> Option<Removed> {
        let now = nanos(redis_now)?;
        let hash = self.hash(token_id);
        let index = self.shard_of(hash);
        let mut shard = self.shard(index);
        let slot = shard.find(hash, token_id)?;
        if shard.slots[slot].expires() > now {
            return None;
        }
        shard.remove(slot, index, &self.hasher)
    }

    /// An ExtendSession answer for `token_id` (see `State::extended`):
    /// the entry takes the earlier of the two expiries when it is the
    /// answer's user's; otherwise it is removed.
    pub(super) fn extended(
        &self,
        token_id: &str,
        answer: Option<(&str, SystemTime)>,
    ) -> Option<Removed> {
        let hash = self.hash(token_id);
        let index = self.shard_of(hash);
        let mut shard = self.shard(index);
        let slot = shard.find(hash, token_id)?;
        let entry = &mut shard.slots[slot];
        if let Some((user, expires_at)) = answer
            && View(&entry.data).user() == Some(user)
            && let Some(answer) = nanos(expires_at)
        {
            let mark = entry.expires & REFERENCED;
            entry.expires = entry.expires().min(answer) | mark;
            return None;
        }
        shard.remove(slot, index, &self.hasher)
    }

    /// Empties every shard, leaving `serving` in each; what was cached is
    /// handed back to be dropped off the lookups' path ([`Garbage`]).
    pub(super) fn take_all(&self, serving: Option<Serving>) -> Vec<(Vec<Slot>, HashTable<u32>)> {
        (0..self.shards.len())
            .map(|i| {
                let mut shard = self.shard(i);
                shard.serving = serving;
                shard.hand = 0;
                shard.len = 0;
                shard.free = Vec::new();
                (
                    std::mem::take(&mut shard.slots),
                    std::mem::take(&mut shard.table),
                )
            })
            .collect()
    }

    /// Whether `token_id` is cached (tests).
    #[cfg(test)]
    pub(super) fn contains(&self, token_id: &str) -> bool {
        let hash = self.hash(token_id);
        self.shard(self.shard_of(hash))
            .find(hash, token_id)
            .is_some()
    }

    /// `token_id`'s cached expiry (tests).
    #[cfg(test)]
    pub(super) fn expires_at(&self, token_id: &str) -> Option<SystemTime> {
        let hash = self.hash(token_id);
        let shard = self.shard(self.shard_of(hash));
        let slot = shard.find(hash, token_id)?;
        Some(UNIX_EPOCH + Duration::from_nanos(shard.slots[slot].expires()))
    }

    /// The user id and token id of the entry at `handle` (tests).
    #[cfg(test)]
    pub(super) fn at(&self, handle: Handle) -> Option<(String, String)> {
        let (index, slot) = Self::split(handle);
        let shard = self.shard(index);
        let view = View(&shard.slots.get(slot)?.data);
        Some((view.user()?.to_owned(), view.token()?.to_owned()))
    }

    /// Entries held, counted shard by shard (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        (0..self.shards.len()).map(|i| self.shard(i).len).sum()
    }
}

impl Shard {
    fn find(&self, hash: u64, token_id: &str) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&s| {
                let slot = &slots[s as usize];
                slot.hash == hash && View(&slot.data).token() == Some(token_id)
            })
            .map(|&s| s as usize)
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
        let Some(slot) = self.find(hash, token_id) else {
            return Found::Miss;
        };
        let entry = &mut self.slots[slot];
        // Redis's now before 1970 (never): nothing expired yet.
        if nanos(serving.clock.at(now)).is_none_or(|now| entry.expires() <= now) {
            return Found::Expired;
        }
        let view = View(&entry.data);
        if user_id.is_some_and(|user| Some(user) != view.user()) {
            return Found::Miss;
        }
        let expires = entry.expires();
        // Written only when it changes: a hit dirties no line it need not.
        if entry.expires & REFERENCED == 0 {
            entry.expires |= REFERENCED;
        }
        match View(&entry.data).session(expires) {
            Some(session) => Found::Hit(session),
            None => Found::Miss,
        }
    }

    fn remove(&mut self, slot: usize, index: usize, hasher: &RandomState) -> Option<Removed> {
        let entry = self.slots.get_mut(slot)?;
        let hash = entry.hash;
        let data = std::mem::take(&mut entry.data);
        if data.is_empty() {
            return None;
        }
        if let Ok(found) = self.table.find_entry(hash, |&s| s as usize == slot) {
            found.remove();
        }
        self.free.push(slot as u32);
        self.len -= 1;
        Some(Removed {
            handle: ((index as u32) << SLOT_BITS) | slot as u32,
            user_hash: hasher.hash_one(View(&data).user().unwrap_or_default()),
        })
    }

    /// CLOCK: the first unmarked entry from the hand on, clearing the marks
    /// passed; two turns at most.
    fn evict(
        &mut self,
        keep: Option<usize>,
        index: usize,
        hasher: &RandomState,
    ) -> Option<Removed> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let at = self.hand % n;
            self.hand = at + 1;
            let entry = &mut self.slots[at];
            if entry.data.is_empty() || keep == Some(at) {
                continue;
            }
            if entry.expires & REFERENCED != 0 {
                entry.expires &= !REFERENCED;
                continue;
            }
            return self.remove(at, index, hasher);
        }
        None
    }
}

/// A session packed into one allocation: the fixed fields, the lengths, then
/// the strings one after the other (no allocation of their own, no
/// capacity to spare):
///
/// ```text
/// created_at u64 | family_expires_at u64 (u64::MAX: none) | token, user,
/// family lengths u16 each | metadata entries u16 | token | user | family |
/// per metadata entry: key length u16, key, value length u16, value
/// ```
///
/// Times are nanoseconds since 1970 by Redis's clock, little-endian. `None`
/// when a time is before 1970 or past 2554 or a string longer than 64 KiB:
/// such a session is not cached (it is asked of the server every time).
fn pack(session: &Session, metadata: bool) -> Option<Box<[u8]>> {
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
    let size = 24
        + strings.iter().map(|s| s.len()).sum::<usize>()
        + kept
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>();
    let mut data = Vec::with_capacity(size);
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

    pub(super) fn token(self) -> Option<&'a str> {
        self.str_at(24, self.u16_at(16)?)
    }

    pub(super) fn user(self) -> Option<&'a str> {
        self.str_at(24 + self.u16_at(16)?, self.u16_at(18)?)
    }

    pub(super) fn family(self) -> Option<&'a str> {
        self.str_at(24 + self.u16_at(16)? + self.u16_at(18)?, self.u16_at(20)?)
    }

    pub(super) fn created_at(self) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_nanos(self.u64_at(0)?))
    }

    /// The session, with the expiry given (kept outside the packed data).
    fn session(self, expires: u64) -> Option<Session> {
        let family_expires = self.u64_at(8)?;
        let mut at = 24 + self.u16_at(16)? + self.u16_at(18)? + self.u16_at(20)?;
        let entries = self.u16_at(22)?;
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
    pub(super) shards: Vec<(Vec<Slot>, HashTable<u32>)>,
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
