//! One shard of the near-cache's sessions: an open-addressing table whose
//! slots hold the packed sessions (`packed.rs`), the metadata strings they
//! share, and CLOCK eviction. `entries.rs` picks the shard and takes its
//! lock; everything here runs under it.
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

use std::time::{Duration, Instant};

use super::entries::{Found, Handle, Serving};
use super::packed::{Interned, Registry, View, nanos};

/// The bit of a slot's `hash` that says it is taken (so a taken slot's hash
/// is never 0, an empty one's).
pub(super) const TAKEN: u64 = 1;
/// The bit of a slot's `hash` a lookup sets: looked up since CLOCK's hand
/// last passed. Not part of the hash compared.
pub(super) const REFERENCED: u64 = 2;

/// One shard: an open-addressing table (linear probing, at most 3/4 full,
/// deletion by backward shift, no tombstones) whose slots hold the packed
/// session itself, so that a lookup reads two places in memory, its slot
/// and its session, rather than the three or four of a map of pointers.
/// On a host where a random read of memory costs 300 ns (BENCHMARKS.md)
/// that is what a lookup costs.
#[derive(Default)]
pub(super) struct Shard {
    /// A power of two long, or empty.
    pub(super) slots: Vec<Slot>,
    pub(super) len: usize,
    /// CLOCK's hand: the next slot eviction looks at.
    pub(super) hand: usize,
    /// The metadata strings the sessions here share.
    pub(super) interned: Interned,
    pub(super) serving: Option<Serving>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

/// A slot of a shard's table: empty (`hash` 0) or a session.
#[derive(Default)]
pub(super) struct Slot {
    /// The token id's hash, with [`TAKEN`] and [`REFERENCED`].
    pub(super) hash: u64,
    /// The session packed (see `packed::pack`).
    pub(super) data: Box<[u8]>,
}

pub(super) fn same(a: u64, b: u64) -> bool {
    (a ^ b) & !REFERENCED == 0
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
    pub(super) fn probe(&self, hash: u64, mut wanted: impl FnMut(&[u8]) -> bool) -> Option<usize> {
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

    pub(super) fn find(&self, hash: u64, token_id: &str) -> Option<usize> {
        self.probe(hash, |data| View(data).token_is(token_id))
    }

    pub(super) fn lookup(
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
        if user_id.is_some_and(|user| !view.user_is(user)) {
            return Found::Miss;
        }
        let found = view.session(&self.interned);
        // Written only when it changes: a hit dirties no line it need not.
        if slot.hash & REFERENCED == 0 {
            slot.hash |= REFERENCED;
        }
        match found {
            Some(session) => Found::Hit(session),
            None => Found::Miss,
        }
    }

    pub(super) fn insert(&mut self, slot: Slot) {
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

    /// Empties slot `at` (its shared strings released to `registry`), and moves back the entries after it that may be
    /// found through it, so that no probe ever stops short of them.
    pub(super) fn remove(&mut self, mut hole: usize, registry: &mut Registry) -> Box<[u8]> {
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
        self.interned.release(View(&taken.data).shared(), registry);
        taken.data
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
            let slot = &mut self.slots[at];
            if slot.hash == 0 || keep.is_some_and(|k| same(k, slot.hash)) {
                continue;
            }
            if slot.hash & REFERENCED != 0 {
                slot.hash &= !REFERENCED;
                continue;
            }
            return Some(self.remove(at, registry));
        }
        None
    }
}
