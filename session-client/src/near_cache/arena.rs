//! The memory a shard's packed sessions live in: chunks of 2 MiB the cache
//! maps itself, advised to be transparent huge pages when the shard is
//! expected to fill them, with records placed one after the other and
//! freed places reused by records of the same size (or split for smaller
//! ones), and a chunk unmapped once its last record is freed.
//!
//! Why not one heap allocation per session (as before #28's third pass):
//! over a million sessions a lookup's read of its session misses the
//! processor's caches and, with 4 KiB pages, its TLB too; on this project's
//! VM that page walk is a large part of the read (BENCHMARKS.md: glibc's
//! `hugetlb=1` tunable made lookups 25-30 % faster). Asking the operator to
//! set a glibc tunable is not a design; mapping the memory here and
//! advising it (`MADV_HUGEPAGE`, honoured when the kernel's THP mode is
//! `madvise` or `always`) gets the same without them. A record's 4-byte
//! length replaces the allocator's 8-byte header.
//!
//! A huge page is resident whole from its first byte written, so a chunk is
//! advised only when the shard's sessions are expected to fill it (the
//! shard's share of `max_entries` times the mean record so far): a cache
//! of a few thousand sessions, or a big one's last chunk, stays in small
//! pages and costs only what it holds. (Advising a chunk expected half
//! full cost about 40 B per session at 100 000-200 000 sessions without
//! metadata, for nothing measurable at a million: BENCHMARKS.md, third
//! pass.)
//!
//! Everything here runs under the shard's lock; no `unsafe` (memmap2's
//! anonymous maps and `advise` are safe).

use memmap2::{Advice, MmapMut, MmapOptions};

/// Records start at multiples of this (as an allocator's chunks would).
const UNIT: usize = 16;
/// A chunk: one huge page on x86-64.
const CHUNK: usize = 2 << 20;
/// Bits of a [`Ref`] giving the record's place in its chunk, in units.
const OFFSET_BITS: u32 = (CHUNK / UNIT).trailing_zeros();
/// The most chunks a shard maps (with [`OFFSET_BITS`], the bit saying
/// "large" and 32 bits in all): 32 GiB of sessions per shard.
const MAX_CHUNKS: usize = 1 << (31 - OFFSET_BITS);
/// Records longer than this get an allocation of their own (a session
/// with kilobytes of metadata): kept out of the chunks' size classes.
const LARGE: usize = 4096;
/// A [`Ref`]'s bit saying the record is in `large`.
const LARGE_BIT: u32 = 1 << 31;
/// The record's length, before its bytes.
const PREFIX: usize = 4;

/// Where a record is: a chunk and a place in it, or a large record's
/// number (with [`LARGE_BIT`]).
pub(super) type Ref = u32;

/// A freed place: its [`Ref`] (low 32 bits) and its chunk's generation
/// when it was freed (high 32): a place in a chunk released since (its
/// generation moved on) is stale, and dropped when popped.
type Free = u64;

/// A shard's records. Dropped whole with its shard's sessions (a flush):
/// unmapping the chunks frees a million sessions in a few calls.
///
/// **Churn.** A freed place is reused by a record of its size, or split
/// for a smaller one when the chunk being filled has no room left; a chunk
/// whose last record is freed is unmapped (its memory goes back to the
/// system) and mapped afresh when a chunk is next needed. So as the sizes
/// of the sessions drift (metadata growing or shrinking), the places of
/// sizes no longer made are split for smaller records, or leave with their
/// chunk once it empties, instead of being kept for a size that may never
/// come back (BENCHMARKS.md, #28's fourth pass: twelve sizes in turn over
/// 20 000 records mapped 4.6 times the most ever live before this, 2.3
/// times after, no more on later passes over the sizes).
pub(super) struct Arena {
    chunks: Vec<Chunk>,
    /// The chunk records are placed at the top of.
    current: usize,
    /// Where the next record goes in the current chunk, in bytes.
    top: usize,
    /// Freed places by size in units (index: units - 1).
    free: Vec<Vec<Free>>,
    /// Chunks released (unmapped), to be mapped again before a new one.
    vacant: Vec<usize>,
    large: Vec<Option<Box<[u8]>>>,
    large_free: Vec<u32>,
    /// The sessions this shard is expected to hold (its share of the
    /// cache's `max_entries`): decides whether a chunk is worth a huge page.
    expected: usize,
    /// Records held, and their bytes (rounded up), for that decision.
    records: usize,
    bytes: usize,
}

struct Chunk {
    /// `None` while released.
    map: Option<MmapMut>,
    /// Records held in it.
    live: u32,
    /// Moves on each time the chunk empties: its freed places go stale.
    generation: u32,
}

impl Arena {
    pub(super) fn new(expected: usize) -> Self {
        Self {
            chunks: Vec::new(),
            current: 0,
            top: 0,
            free: Vec::new(),
            vacant: Vec::new(),
            large: Vec::new(),
            large_free: Vec::new(),
            expected,
            records: 0,
            bytes: 0,
        }
    }

    /// Copies `data` in; `None` when no memory could be mapped (the session
    /// is then not cached: asked of the server, as any other miss).
    pub(super) fn alloc(&mut self, data: &[u8]) -> Option<Ref> {
        let size = PREFIX + data.len();
        let len = u32::try_from(data.len()).ok()?;
        if size > LARGE {
            let mut record = Vec::with_capacity(size);
            record.extend_from_slice(&len.to_le_bytes());
            record.extend_from_slice(data);
            let record = Some(record.into_boxed_slice());
            let id = match self.large_free.pop() {
                Some(id) => {
                    self.large[id as usize] = record;
                    id
                }
                None => {
                    let id = u32::try_from(self.large.len())
                        .ok()
                        .filter(|id| id & LARGE_BIT == 0)?;
                    self.large.push(record);
                    id
                }
            };
            return Some(id | LARGE_BIT);
        }
        let units = size.div_ceil(UNIT);
        let at = match self.reuse(units) {
            Some(at) => at,
            None => self.bump(units * UNIT)?,
        };
        let (chunk, offset) = Self::place(at);
        let chunk = &mut self.chunks[chunk];
        // Mapped: a place is taken only from a chunk that is (a released
        // one's places are stale).
        let record = &mut chunk.map.as_mut()?[offset..offset + size];
        record[..PREFIX].copy_from_slice(&len.to_le_bytes());
        record[PREFIX..].copy_from_slice(data);
        chunk.live += 1;
        self.records += 1;
        self.bytes += units * UNIT;
        Some(at)
    }

    /// A freed place of `units`; when there is none and the current chunk
    /// has no room for it, a larger freed place split (its rest freed
    /// again). `None`: place it at the top.
    fn reuse(&mut self, units: usize) -> Option<Ref> {
        if let Some(at) = self.pop_free(units) {
            return Some(at);
        }
        let room = self
            .chunks
            .get(self.current)
            .is_some_and(|c| c.map.is_some())
            && self.top + units * UNIT <= CHUNK;
        if room {
            return None;
        }
        for larger in units + 1..=self.free.len() {
            if let Some(at) = self.pop_free(larger) {
                let rest = at + units as u32;
                let generation = self.chunks[Self::place(at).0].generation;
                self.free[larger - units - 1].push(Self::freed(rest, generation));
                return Some(at);
            }
        }
        None
    }

    /// The last freed place of `units` still valid (stale ones dropped).
    fn pop_free(&mut self, units: usize) -> Option<Ref> {
        let list = self.free.get_mut(units - 1)?;
        while let Some(free) = list.pop() {
            let at = free as Ref;
            if self
                .chunks
                .get(Self::place(at).0)
                .is_some_and(|c| c.map.is_some() && u64::from(c.generation) == free >> 32)
            {
                return Some(at);
            }
        }
        None
    }

    fn freed(at: Ref, generation: u32) -> Free {
        (u64::from(generation) << 32) | u64::from(at)
    }

    /// A place of `bytes` at the top of the current chunk, or of a chunk
    /// mapped for it (a released one's number first).
    fn bump(&mut self, bytes: usize) -> Option<Ref> {
        let room = self
            .chunks
            .get(self.current)
            .is_some_and(|c| c.map.is_some())
            && self.top + bytes <= CHUNK;
        if !room {
            let index = match self.vacant.last() {
                Some(&index) => index,
                None if self.chunks.len() >= MAX_CHUNKS => return None,
                None => self.chunks.len(),
            };
            let map = MmapOptions::new().len(CHUNK).map_anon().ok()?;
            // Expected to be filled: one huge page instead of 512 small
            // ones. Advice only: refused (a kernel without THP), the chunk
            // works as it is.
            let mapped = self.chunks.len() - self.vacant.len();
            let mean = (self.bytes + bytes) / (self.records + 1);
            if mean * self.expected >= (mapped + 1) * CHUNK {
                let _ = map.advise(Advice::HugePage);
            }
            if index == self.chunks.len() {
                self.chunks.push(Chunk {
                    map: Some(map),
                    live: 0,
                    generation: 0,
                });
            } else {
                self.vacant.pop();
                self.chunks[index].map = Some(map);
            }
            self.current = index;
            self.top = 0;
        }
        let chunk = u32::try_from(self.current).ok()?;
        let at = (chunk << OFFSET_BITS) | (self.top / UNIT) as u32;
        self.top += bytes;
        Some(at)
    }

    fn place(at: Ref) -> (usize, usize) {
        (
            (at >> OFFSET_BITS) as usize,
            (at & ((1 << OFFSET_BITS) - 1)) as usize * UNIT,
        )
    }

    /// The record at `at`; `None` for a place nothing was written to.
    pub(super) fn get(&self, at: Ref) -> Option<&[u8]> {
        let record: &[u8] = if at & LARGE_BIT != 0 {
            self.large.get((at & !LARGE_BIT) as usize)?.as_deref()?
        } else {
            let (chunk, offset) = Self::place(at);
            self.chunks.get(chunk)?.map.as_ref()?.get(offset..)?
        };
        let len = u32::from_le_bytes(record.get(..PREFIX)?.try_into().ok()?) as usize;
        record.get(PREFIX..PREFIX + len)
    }

    /// The record at `at`, to change in place (its length stays).
    pub(super) fn get_mut(&mut self, at: Ref) -> Option<&mut [u8]> {
        let record: &mut [u8] = if at & LARGE_BIT != 0 {
            self.large
                .get_mut((at & !LARGE_BIT) as usize)?
                .as_deref_mut()?
        } else {
            let (chunk, offset) = Self::place(at);
            self.chunks
                .get_mut(chunk)?
                .map
                .as_mut()?
                .get_mut(offset..)?
        };
        let len = u32::from_le_bytes(record.get(..PREFIX)?.try_into().ok()?) as usize;
        record.get_mut(PREFIX..PREFIX + len)
    }

    /// Frees the record at `at` for another of its size (or a smaller
    /// one); releases its chunk when it held the last record there.
    pub(super) fn free(&mut self, at: Ref) {
        if at & LARGE_BIT != 0 {
            let id = at & !LARGE_BIT;
            if let Some(record) = self.large.get_mut(id as usize)
                && record.take().is_some()
            {
                self.large_free.push(id);
            }
            return;
        }
        let Some(len) = self.get(at).map(<[u8]>::len) else {
            return;
        };
        let units = (PREFIX + len).div_ceil(UNIT);
        if self.free.len() < units {
            self.free.resize_with(units, Vec::new);
        }
        let index = Self::place(at).0;
        let chunk = &mut self.chunks[index];
        self.free[units - 1].push(Self::freed(at, chunk.generation));
        self.records -= 1;
        self.bytes -= units * UNIT;
        chunk.live -= 1;
        if chunk.live == 0 {
            self.release(index);
        }
    }

    /// Chunk `index` holds no record: every freed place in it goes stale,
    /// and it is unmapped (the current chunk is filled again from its
    /// start instead).
    fn release(&mut self, index: usize) {
        let chunk = &mut self.chunks[index];
        chunk.generation = chunk.generation.wrapping_add(1);
        if chunk.generation == 0 {
            // Wrapped (four billion releases of one chunk): a place freed
            // that long ago could pass for a fresh one; drop them all.
            for list in &mut self.free {
                list.retain(|&free| Self::place(free as Ref).0 != index);
            }
        }
        if index == self.current {
            self.top = 0;
        } else {
            chunk.map = None;
            self.vacant.push(index);
        }
    }

    /// Bytes of chunks mapped (tests).
    #[cfg(test)]
    pub(super) fn mapped(&self) -> usize {
        self.chunks.iter().filter(|c| c.map.is_some()).count() * CHUNK
    }

    /// Records held (tests).
    #[cfg(test)]
    pub(super) fn records(&self) -> usize {
        self.records + self.large.iter().flatten().count()
    }
}

/// A shard's table of slots (`shard.rs`): in memory mapped here and
/// advised as huge pages once it is a huge page long or more (so a big
/// cache's probes miss the TLB less, as its sessions' reads do), on the
/// heap below that (where a huge page would be mostly empty).
pub(super) enum Table {
    Heap(Vec<u64>),
    Mapped(MmapMut),
}

impl Table {
    /// `len` empty (0) slots.
    pub(super) fn new(len: usize) -> Self {
        let bytes = len * 8;
        if bytes >= CHUNK
            && let Ok(map) = MmapOptions::new().len(bytes).map_anon()
        {
            // Advice only, as for the chunks.
            let _ = map.advise(Advice::HugePage);
            return Self::Mapped(map);
        }
        Self::Heap(vec![0; len])
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Self::Heap(slots) => slots.len(),
            Self::Mapped(map) => map.len() / 8,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot `at` (below `len`).
    pub(super) fn get(&self, at: usize) -> u64 {
        match self {
            Self::Heap(slots) => slots[at],
            Self::Mapped(map) => {
                let mut bytes = [0; 8];
                bytes.copy_from_slice(&map[at * 8..at * 8 + 8]);
                u64::from_ne_bytes(bytes)
            }
        }
    }

    pub(super) fn set(&mut self, at: usize, slot: u64) {
        match self {
            Self::Heap(slots) => slots[at] = slot,
            Self::Mapped(map) => map[at * 8..at * 8 + 8].copy_from_slice(&slot.to_ne_bytes()),
        }
    }

    /// Slot `at`, emptied.
    pub(super) fn take(&mut self, at: usize) -> u64 {
        let slot = self.get(at);
        self.set(at, 0);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records come back as written, whatever their size; a freed place is
    /// reused by a record of its size; large ones live apart.
    #[test]
    fn records_round_trip_and_reuse() {
        let mut arena = Arena::new(10);
        let records: Vec<Vec<u8>> = [0, 1, 12, 13, 100, LARGE - PREFIX, LARGE, 70_000]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let at: Vec<Ref> = records
            .iter()
            .map(|r| arena.alloc(r).expect("mapped"))
            .collect();
        for (r, &a) in records.iter().zip(&at) {
            assert_eq!(arena.get(a), Some(r.as_slice()));
        }
        assert_eq!(arena.records(), records.len());
        arena.free(at[4]);
        arena.free(at[7]);
        assert_eq!(arena.records(), records.len() - 2);
        // Same size: the same place; the others are untouched.
        let again = arena.alloc(&[9; 100]).expect("mapped");
        assert_eq!(again, at[4]);
        let large = arena.alloc(&[3; 5000]).expect("mapped");
        assert_eq!(large, at[7]);
        assert_eq!(arena.get(again), Some(&[9; 100][..]));
        assert_eq!(arena.get(large), Some(&[3; 5000][..]));
        for i in [0, 1, 2, 3, 5, 6] {
            assert_eq!(arena.get(at[i]), Some(records[i].as_slice()));
        }
        arena.get_mut(at[3]).expect("held")[0] = 0xff;
        assert_eq!(arena.get(at[3]).expect("held")[0], 0xff);
    }

    /// A table of a huge page or more is mapped, a smaller one on the heap;
    /// both keep what is written to each slot, and start empty.
    #[test]
    fn tables_small_and_mapped_keep_their_slots() {
        for len in [16, CHUNK / 8, 2 * CHUNK / 8] {
            let mut table = Table::new(len);
            assert_eq!(table.len(), len);
            assert_eq!(matches!(table, Table::Mapped(_)), len * 8 >= CHUNK);
            assert!((0..len).all(|at| table.get(at) == 0));
            for at in [0, 1, len / 2, len - 1] {
                table.set(at, (at as u64) << 32 | 0xdead_beef);
            }
            assert_eq!(table.get(len / 2), ((len / 2) as u64) << 32 | 0xdead_beef);
            assert_eq!(table.take(len - 1), ((len - 1) as u64) << 32 | 0xdead_beef);
            assert_eq!(table.get(len - 1), 0);
            assert_eq!(table.get(2), 0);
        }
    }

    /// Records spill into a second chunk when the first is full.
    #[test]
    fn chunks_fill_one_after_another() {
        let mut arena = Arena::new(0);
        let record = [5u8; 1000];
        let at: Vec<Ref> = (0..3 * CHUNK / 1024)
            .map(|_| arena.alloc(&record).expect("mapped"))
            .collect();
        assert!(arena.chunks.len() >= 3);
        assert!(at.iter().all(|&a| arena.get(a) == Some(&record[..])));
    }

    /// The memory a shard's arena maps while the sizes of its sessions
    /// drift over a long run (#28, fourth pass): 20 000 records, replaced
    /// one by one in random order (as eviction and revocations replace
    /// them), each round's new records of another size, the sizes going up
    /// and down between 60 and 1 000 bytes. The arena must not keep every
    /// round's places: what it maps stays within twice the most it ever
    /// held live, and two chunks.
    #[test]
    fn drifting_sizes_keep_the_arena_bounded() {
        const RECORDS: usize = 20_000;
        let sizes = [100, 300, 140, 520, 60, 1000, 220, 700, 90, 400, 160, 850];
        let mut arena = Arena::new(RECORDS);
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut held: Vec<(Ref, usize)> = (0..RECORDS)
            .map(|_| (arena.alloc(&[1; 100]).expect("mapped"), 100))
            .collect();
        let (mut peak_live, mut peak_mapped) = (0, 0);
        let mut first_pass = 0;
        for round in 0..4 * sizes.len() {
            if round == sizes.len() {
                first_pass = peak_mapped;
            }
            let size = sizes[round % sizes.len()];
            let mut order: Vec<usize> = (0..RECORDS).collect();
            for i in (1..RECORDS).rev() {
                order.swap(i, next() as usize % (i + 1));
            }
            for i in order {
                arena.free(held[i].0);
                // A few sizes either side of the round's.
                let len = size + (next() as usize % 3) * UNIT;
                held[i] = (arena.alloc(&vec![round as u8; len]).expect("mapped"), len);
                let live: usize = arena.bytes;
                peak_live = peak_live.max(live);
                peak_mapped = peak_mapped.max(arena.mapped());
            }
            assert!(
                held.iter()
                    .all(|&(at, len)| arena.get(at).map(<[u8]>::len) == Some(len))
            );
            eprintln!(
                "round {round}: size {size}, live {} KiB, mapped {} KiB (peak live {} KiB)",
                arena.bytes / 1024,
                arena.mapped() / 1024,
                peak_live / 1024
            );
        }
        eprintln!(
            "peak mapped {} KiB, first pass {} KiB",
            peak_mapped / 1024,
            first_pass / 1024
        );
        assert!(
            2 * peak_mapped <= 5 * peak_live,
            "mapped {peak_mapped} B for at most {peak_live} B live"
        );
        assert_eq!(peak_mapped, first_pass, "grew after the first pass");
    }
}
