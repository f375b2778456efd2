//! One shard of the near-cache's sessions: an open-addressing table whose
//! slots point into the shard's arena (`arena.rs`) of packed sessions
//! (`packed.rs`), the metadata strings they share, and CLOCK eviction.
//! `entries.rs` picks the shard and takes its lock: a lookup
//! ([`Shard::lookup`], through `&self`) runs under a read lock, everything
//! else under the write lock.
//!
//! Eviction is CLOCK (second chance) per shard: a lookup marks its entry
//! ([`Marks`]: a bit beside its slot, the only thing a lookup writes),
//! and when the cache is over its bound the shard just inserted into (or
//! the next one holding something else) sweeps its hand past the marked
//! entries, clearing their mark, to the first unmarked one. The hand walks
//! the table's slots, whose order the hash key randomises, so among entries
//! not looked up since it last passed, which one goes is arbitrary (not the
//! oldest, as CLOCK over an insertion-ordered ring would pick); an entry
//! looked up since then always outlives one that was not. A removal may
//! shift an entry back past the hand, which only gives it one more turn.

use std::time::{Duration, Instant};

use super::arena::{Arena, Ref, Table};
use super::packed::{Interned, Registry, View, nanos};
use super::slot::{Handle, Marks, TAKEN};
use super::state::Clock;
/// The bits of a slot holding the token id's hash (its low 32 bits, with
/// [`TAKEN`]); the high 32 are the session's place in the shard's
/// [`Arena`].
const HASH_BITS: u64 = 0xffff_ffff;

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
pub(super) enum Found<T> {
    /// The answer built from the live, matching entry.
    Hit(T),
    /// Not cached, not the user given, or the cache may not serve.
    Miss,
    /// Cached, but past its expiry by Redis's clock: to be removed.
    Expired,
}

/// One shard: an open-addressing table (linear probing, at most 3/4 full,
/// deletion by backward shift, no tombstones) of 8-byte slots, each a
/// session's hash and its place in the shard's arena of packed sessions.
///
/// A lookup reads two places in memory, its slot and then its session, and
/// over a million sessions both miss every cache of the processor: about
/// 180 ns each in huge pages on this project's VM, 220 ns in 4 KiB pages
/// (BENCHMARKS.md, third pass). So what is kept small is what is read: an
/// 8-byte slot (a third of the 24-byte slots before: 11-21 MB of table per
/// million sessions, in huge pages from 2 MiB a shard: see `Table`), and the session in one place with no allocator header. The
/// slot keeps 32 bits of the hash, enough that a probe almost never reads a
/// session that is not the one looked for (every use compares the session's
/// token id, so a collision costs a read, never an answer).
pub(super) struct Shard {
    /// A power of two long, or empty; 0 is an empty slot.
    slots: Table,
    /// CLOCK's mark of each slot (clear for an empty one).
    marks: Marks,
    pub(super) len: usize,
    /// CLOCK's hand: the next slot eviction looks at.
    hand: usize,
    /// The packed sessions.
    arena: Arena,
    /// The metadata strings the sessions here share.
    pub(super) interned: Interned,
    pub(super) serving: Option<Serving>,
}

/// Whether slot `slot` holds an entry of hash `hash`.
pub(super) fn same(slot: u64, hash: u64) -> bool {
    (slot ^ hash) & HASH_BITS == 0
}

fn place(slot: u64) -> Ref {
    (slot >> 32) as Ref
}

impl Shard {
    /// An empty shard expected to hold up to `expected` sessions (its
    /// share of the cache's bound: see `Arena`).
    pub(super) fn new(expected: usize) -> Self {
        Self {
            slots: Table::new(0),
            marks: Marks::default(),
            len: 0,
            hand: 0,
            arena: Arena::new(expected),
            interned: Interned::default(),
            serving: None,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// From the 32 bits a slot keeps (so the table can grow without
    /// reading a session): tables stay below 2^30 slots.
    fn home(&self, hash: u64) -> usize {
        ((hash & HASH_BITS) >> 2) as usize & self.mask()
    }

    /// The packed session in slot `at` (taken).
    pub(super) fn record(&self, at: usize) -> Option<&[u8]> {
        self.arena.get(place(self.slots.get(at)))
    }

    /// The first slot from `hash`'s home holding that hash whose data
    /// `wanted` accepts (an empty slot ends the search).
    pub(super) fn probe(&self, hash: u64, mut wanted: impl FnMut(&[u8]) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut at = self.home(hash);
        loop {
            let slot = self.slots.get(at);
            if slot == 0 {
                return None;
            }
            if same(slot, hash) && self.arena.get(place(slot)).is_some_and(&mut wanted) {
                return Some(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    pub(super) fn find(&self, hash: u64, token_id: &str) -> Option<usize> {
        self.probe(hash, |data| View(data).token_is(token_id))
    }

    /// The answer `answer` builds from `token_id`'s entry (owned by
    /// `user_id` when given) when the cache may serve it at `now` and it is
    /// live by Redis's clock. Every form of answer (a `Session`, a
    /// `CompactSession`, a `SessionView`) passes these same checks. Under
    /// the shard's read lock: it writes only the entry's CLOCK mark.
    pub(super) fn lookup<T>(
        &self,
        hash: u64,
        token_id: &str,
        user_id: Option<&str>,
        now: Instant,
        max_staleness: Duration,
        answer: impl FnOnce(View<'_>, &Interned) -> Option<T>,
    ) -> Found<T> {
        let Some(serving) = self
            .serving
            .filter(|s| now.saturating_duration_since(s.last_message) <= max_staleness)
        else {
            return Found::Miss;
        };
        let Some(at) = self.find(hash, token_id) else {
            return Found::Miss;
        };
        let Some(data) = self.record(at) else {
            return Found::Miss;
        };
        let view = View(data);
        // Redis's now before 1970 (never): treated as expired, fail safe.
        let redis_now = nanos(serving.clock.at(now));
        if view
            .expires()
            .zip(redis_now)
            .is_none_or(|(expires, now)| expires <= now)
        {
            return Found::Expired;
        }
        if user_id.is_some_and(|user| !view.user_is(user)) {
            return Found::Miss;
        }
        let found = match answer(view, &self.interned) {
            Some(answer) => Found::Hit(answer),
            None => Found::Miss,
        };
        if matches!(found, Found::Hit(_)) {
            self.marks.mark(at);
        }
        found
    }

    /// Stores a packed session of hash `hash` (with [`TAKEN`]); `false`
    /// when no memory could be had for it (not cached).
    pub(super) fn insert(&mut self, hash: Handle, data: &[u8]) -> bool {
        let Some(at) = self.arena.alloc(data) else {
            return false;
        };
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.put((u64::from(at) << 32) | (hash & HASH_BITS) | TAKEN, false);
        true
    }

    /// Puts `slot` in the first empty slot from its home, with its mark.
    fn put(&mut self, slot: u64, marked: bool) {
        let mut at = self.home(slot);
        while self.slots.get(at) != 0 {
            at = (at + 1) & self.mask();
        }
        self.slots.set(at, slot);
        self.marks.set(at, marked);
        self.len += 1;
    }

    /// Doubles the table (16 slots at first), moving every entry with its
    /// mark (its hash is in its slot: no session is read).
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, Table::new(size));
        let old_marks = std::mem::replace(&mut self.marks, Marks::new(size));
        self.len = 0;
        self.hand = 0;
        for at in 0..old.len() {
            let slot = old.get(at);
            if slot != 0 {
                self.put(slot, old_marks.get(at));
            }
        }
    }

    /// Sets the expiry of the session in slot `at` (nanoseconds since 1970
    /// by Redis's clock).
    pub(super) fn set_expires(&mut self, at: usize, expires: u64) {
        if let Some(data) = self.arena.get_mut(place(self.slots.get(at))) {
            View::set_expires(data, expires);
        }
    }

    /// Empties slot `at` (its session freed, its shared strings released to
    /// `registry`), and moves back the entries after it that may be found
    /// through it, so that no probe ever stops short of them. Returns a copy
    /// of the session packed (for the per-user index).
    pub(super) fn remove(&mut self, mut hole: usize, registry: &mut Registry) -> Box<[u8]> {
        let mask = self.mask();
        let taken = self.slots.take(hole);
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let slot = self.slots.get(at);
            if slot == 0 {
                break;
            }
            // Movable into the hole unless its home lies after the hole
            // (cyclically): then a probe for it starts past the hole.
            let home = self.home(slot);
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(hole) & mask) {
                let moved = self.slots.take(at);
                self.slots.set(hole, moved);
                self.marks.set(hole, self.marks.get(at));
                hole = at;
            }
        }
        self.marks.set(hole, false);
        self.len -= 1;
        let data: Box<[u8]> = self.arena.get(place(taken)).unwrap_or_default().into();
        self.arena.free(place(taken));
        self.interned.release(View(&data).shared(), registry);
        data
    }

    /// CLOCK: the first unmarked entry from the hand on, clearing the marks
    /// passed; two turns at most.
    pub(super) fn evict(
        &mut self,
        keep: Option<Handle>,
        registry: &mut Registry,
    ) -> Option<Box<[u8]>> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let at = self.hand % n;
            self.hand = at + 1;
            let slot = self.slots.get(at);
            if slot == 0 || keep.is_some_and(|k| same(slot, k)) {
                continue;
            }
            if self.marks.get(at) {
                self.marks.set(at, false);
                continue;
            }
            return Some(self.remove(at, registry));
        }
        None
    }

    /// The packed sessions held (tests).
    #[cfg(test)]
    pub(super) fn records(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.slots.len())
            .map(|at| self.slots.get(at))
            .filter(|&s| s != 0)
            .filter_map(|s| self.arena.get(place(s)))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        hash::{BuildHasher, RandomState},
        time::{Duration, UNIX_EPOCH},
    };

    use super::super::packed::pack;
    use super::*;
    use crate::types::Session;

    fn token(i: usize) -> String {
        format!("token-{i:08}")
    }

    /// Caches sessions `range` (tokens [`token`]) in `shard`.
    fn fill(
        shard: &mut Shard,
        registry: &mut Registry,
        hasher: &RandomState,
        range: std::ops::Range<usize>,
    ) {
        for i in range {
            let session = Session {
                user_id: format!("user-{}", i / 5),
                token_id: token(i),
                metadata: HashMap::new(),
                created_at: UNIX_EPOCH + Duration::from_secs(1),
                expires_at: UNIX_EPOCH + Duration::from_secs(2),
                family_id: String::new(),
                family_expires_at: None,
            };
            let data = pack(&session, false, &mut shard.interned, registry, hasher).expect("packs");
            assert!(shard.insert(hasher.hash_one(token(i)) | TAKEN, &data));
        }
    }

    /// A shard big enough that its table moves from the heap into mapped
    /// memory (`Table::Mapped`) finds every entry as it grows past that,
    /// and after half of them are removed (backward shifts in the mapped
    /// table), the other half and none of the removed.
    #[test]
    fn a_table_grown_into_mapped_memory_finds_what_it_holds() {
        let hasher = RandomState::new();
        let mut registry = Registry::default();
        let mut shard = Shard::new(120_000);
        let hash = |i: usize| hasher.hash_one(token(i)) | TAKEN;
        let n = 110_000;
        fill(&mut shard, &mut registry, &hasher, 0..n);
        assert!(matches!(shard.slots, Table::Mapped(_)));
        assert_eq!(shard.len, n);
        assert!((0..n).all(|i| shard.find(hash(i), &token(i)).is_some()));
        for i in (0..n).step_by(2) {
            let at = shard.find(hash(i), &token(i)).expect("held");
            let removed = shard.remove(at, &mut registry);
            assert_eq!(View(&removed).token(), Some(token(i).as_str()));
        }
        assert_eq!(shard.len, n / 2);
        for i in 0..n {
            assert_eq!(shard.find(hash(i), &token(i)).is_some(), i % 2 == 1, "{i}");
        }
        assert_eq!(shard.records().count(), n / 2);
    }

    /// CLOCK's marks stay with their entries as the table grows and as
    /// removals shift entries back: an entry marked keeps its mark, one
    /// never looked up never gains one, and an emptied slot keeps none.
    #[test]
    fn marks_move_with_their_entries() {
        let hasher = RandomState::new();
        let mut registry = Registry::default();
        let mut shard = Shard::new(4_000);
        let hash = |i: usize| hasher.hash_one(token(i)) | TAKEN;
        let at = |shard: &Shard, i: usize| shard.find(hash(i), &token(i)).expect("held");
        fill(&mut shard, &mut registry, &hasher, 0..100);
        for i in (0..100).step_by(2) {
            shard.marks.mark(at(&shard, i));
        }
        // Grows from 256 slots to 4 096.
        fill(&mut shard, &mut registry, &hasher, 100..3_000);
        for i in (1..3_000).step_by(3) {
            let found = at(&shard, i);
            shard.remove(found, &mut registry);
        }
        for i in (0..3_000).filter(|i| i % 3 != 1) {
            assert_eq!(shard.marks.get(at(&shard, i)), i < 100 && i % 2 == 0, "{i}");
        }
        let marked = (0..shard.slots.len())
            .filter(|&slot| shard.marks.get(slot))
            .count();
        assert_eq!(
            marked,
            (0..100).filter(|i| i % 2 == 0 && i % 3 != 1).count()
        );
    }
}
