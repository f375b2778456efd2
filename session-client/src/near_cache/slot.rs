//! What a shard's slot holds besides a session's place: the bits of its
//! hash and the two flags, and the [`Handle`] through which the per-user
//! index (`state.rs`) finds an entry again. The lowest of the near-cache's
//! modules about sessions: `shard.rs`, `entries.rs` and `state.rs` import
//! it, and it imports none of them.

/// The bit of a slot (and of a [`Handle`]) that says it is taken (so a
/// taken slot is never 0, an empty one).
pub(super) const TAKEN: u64 = 1;
/// The bit of a slot a lookup sets: looked up since CLOCK's hand last
/// passed. Not part of the hash compared.
pub(super) const REFERENCED: u64 = 2;

/// An entry's hash as its slot holds it ([`TAKEN`] set, [`REFERENCED`]
/// clear): how the per-user index finds it again. Two token ids may share
/// one; every use checks what the entry holds.
pub(super) type Handle = u64;
