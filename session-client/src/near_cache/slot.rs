//! What a shard's slot holds besides a session's place (the bits of its
//! hash and the flag saying it is taken), the [`Handle`] through which the
//! per-user index (`state.rs`) finds an entry again, and CLOCK's
//! [`Marks`] beside the slots. The lowest of the near-cache's modules about
//! sessions: `shard.rs`, `entries.rs` and `state.rs` import it, and it
//! imports none of them.

use std::sync::atomic::{AtomicU64, Ordering};

/// The bit of a slot (and of a [`Handle`]) that says it is taken (so a
/// taken slot is never 0, an empty one).
pub(super) const TAKEN: u64 = 1;

/// An entry's hash as its slot holds it ([`TAKEN`] set): how the per-user
/// index finds it again. Two token ids may share one; every use checks
/// what the entry holds.
pub(super) type Handle = u64;

/// CLOCK's marks, a bit per slot of a shard's table: "looked up since the
/// hand last passed". Kept beside the slots rather than in them because
/// lookups set them while holding only a read lock on their shard
/// (`entries.rs`): a lookup writes nothing but its own mark, and only when
/// it is not set yet, so over a cache whose entries are all marked (one
/// that is not evicting) lookups on several cores write no line another
/// reads. Everything else (clearing a mark, moving one with its entry)
/// happens under the shard's write lock, which orders it with the lookups.
#[derive(Debug, Default)]
pub(super) struct Marks(Box<[AtomicU64]>);

impl Marks {
    /// Marks for a table of `slots` slots, none set.
    pub(super) fn new(slots: usize) -> Self {
        Self((0..slots.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn word(at: usize) -> (usize, u64) {
        (at / 64, 1 << (at % 64))
    }

    pub(super) fn get(&self, at: usize) -> bool {
        let (word, bit) = Self::word(at);
        self.0[word].load(Ordering::Relaxed) & bit != 0
    }

    /// Marks slot `at` (a lookup's hit, under a read lock): written only
    /// when not marked yet, so that a hit dirties no line it need not.
    pub(super) fn mark(&self, at: usize) {
        let (word, bit) = Self::word(at);
        let word = &self.0[word];
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Sets or clears slot `at`'s mark (under the write lock).
    pub(super) fn set(&mut self, at: usize, marked: bool) {
        let (word, bit) = Self::word(at);
        let word = self.0[word].get_mut();
        if marked {
            *word |= bit;
        } else {
            *word &= !bit;
        }
    }
}
