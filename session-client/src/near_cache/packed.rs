//! A cached session packed into one allocation ([`pack`], read through
//! [`View`]), and the metadata strings sessions share ([`Registry`],
//! [`Interned`]): the layout that makes a million sessions fit in a few
//! hundred megabytes (BENCHMARKS.md, "Near-cache at a million sessions").
//!
//! Metadata repeats: a service's sessions carry a few distinct user agents
//! and devices, each in thousands of sessions. A long metadata string seen
//! a second time is kept once ([`Registry`]), each shard holding a
//! reference-counted handle on it in a table of its own ([`Interned`]), and
//! the sessions hold its number in that table (4 bytes) instead of a copy;
//! it is freed when the last session holding it leaves. Strings seen once
//! stay in their session (an ip, a user agent nobody else has): interning
//! those would cost a table entry each and a lookup one more read of
//! memory. Whether a string was seen lately is a guess from a small table
//! of hashes (4 096), so a string that repeats only rarely may stay inline;
//! that costs memory, never correctness.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::types::Session;

/// The packed data's header: expiry, creation, family expiry, the lengths.
const HEADER: usize = 32;
/// A metadata string's length field saying "interned": its id (`u32`)
/// follows instead of the text. A string exactly this long is always
/// interned (it could not be told from the marker inline).
const SHARED: u16 = u16::MAX;
/// Metadata strings shorter than this stay inline: their copy costs about
/// what an id and a share of the table would.
const INTERN_MIN: usize = 16;
/// The recently seen long strings' hashes kept (32 KiB).
const SEEN: usize = 4096;

/// A session packed into one allocation: the fixed fields, the lengths, then
/// the strings one after the other (no allocation of their own, no
/// capacity to spare):
///
/// ```text
/// expires_at u64 | created_at u64 | family_expires_at u64 (u64::MAX: none) | token, user,
/// family lengths u16 each | metadata entries u16 | token | user | family |
/// per metadata entry: key, value; each either length u16 and the text,
/// or u16::MAX and the id u32 of a string in the shard's `Interned`
/// ```
///
/// Times are nanoseconds since 1970 by Redis's clock, little-endian. `None`
/// when a time is before 1970 or past 2554 or a string longer than 64 KiB:
/// such a session is not cached (it is asked of the server every time).
/// Nothing is interned then: the checks come first.
pub(super) fn pack(
    session: &Session,
    metadata: bool,
    interned: &mut Interned,
    registry: &mut Registry,
    hasher: &RandomState,
) -> Option<Box<[u8]>> {
    pack_with(session, metadata, |s| interned.intern(s, registry, hasher))
}

/// `session` packed with every string inline (none interned, all its
/// metadata kept): a [`CompactSession`](super::CompactSession) made from a
/// server's answer. `None` as for [`pack`], and for a metadata string
/// exactly [`SHARED`] long, which only an interned string may be.
pub(super) fn pack_inline(session: &Session) -> Option<Box<[u8]>> {
    if session
        .metadata
        .iter()
        .any(|(k, v)| k.len() >= usize::from(SHARED) || v.len() >= usize::from(SHARED))
    {
        return None;
    }
    pack_with(session, true, |_| None)
}

/// [`pack`], with `intern` giving a metadata string's id when it is to be
/// shared (counted as held), `None` to keep it inline.
fn pack_with(
    session: &Session,
    metadata: bool,
    mut intern: impl FnMut(&str) -> Option<u32>,
) -> Option<Box<[u8]>> {
    let expires = nanos(session.expires_at)?;
    let created = nanos(session.created_at)?;
    let family_expires = match session.family_expires_at {
        Some(at) => nanos(at).filter(|&n| n != u64::MAX)?,
        None => u64::MAX,
    };
    let strings = [&session.token_id, &session.user_id, &session.family_id];
    let lengths = strings.map(|s| u16::try_from(s.len()).ok());
    let kept = if metadata { session.metadata.len() } else { 0 };
    let entries = u16::try_from(kept).ok()?;
    if lengths.contains(&None)
        || (metadata
            && session
                .metadata
                .iter()
                .any(|(k, v)| k.len() > usize::from(SHARED) || v.len() > usize::from(SHARED)))
    {
        return None;
    }
    // Nothing fails from here on: strings are interned (counted) as the
    // fields are chosen, and the allocation is made exactly as long.
    let fields: Vec<(&str, Option<u32>)> = session
        .metadata
        .iter()
        .take(kept)
        .flat_map(|(k, v)| [k, v])
        .map(|s| (s.as_str(), intern(s)))
        .collect();
    let size = HEADER
        + strings.iter().map(|s| s.len()).sum::<usize>()
        + fields
            .iter()
            .map(|(s, id)| 2 + id.map_or(s.len(), |_| 4))
            .sum::<usize>();
    let mut data = Vec::with_capacity(size);
    data.extend_from_slice(&expires.to_le_bytes());
    data.extend_from_slice(&created.to_le_bytes());
    data.extend_from_slice(&family_expires.to_le_bytes());
    for length in lengths.into_iter().flatten() {
        data.extend_from_slice(&length.to_le_bytes());
    }
    data.extend_from_slice(&entries.to_le_bytes());
    for s in strings {
        data.extend_from_slice(s.as_bytes());
    }
    for (s, id) in fields {
        match id {
            Some(id) => {
                data.extend_from_slice(&SHARED.to_le_bytes());
                data.extend_from_slice(&id.to_le_bytes());
            }
            None => {
                // Checked above: below SHARED, or interned.
                data.extend_from_slice(&(s.len() as u16).to_le_bytes());
                data.extend_from_slice(s.as_bytes());
            }
        }
    }
    Some(data.into_boxed_slice())
}

/// Reads a packed session (see [`pack`]). Every read is checked: `None`
/// for what [`pack`] cannot have written.
#[derive(Clone, Copy)]
pub(super) struct View<'a>(pub(super) &'a [u8]);

/// A metadata string of a packed session: its text, or its id.
enum Field<'a> {
    Inline(&'a str),
    Shared(u32),
}

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
    pub(super) fn expires(self) -> Option<u64> {
        self.u64_at(0)
    }

    /// Sets the expiry (nanoseconds since 1970 by Redis's clock).
    pub(super) fn set_expires(data: &mut [u8], expires: u64) {
        data[..8].copy_from_slice(&expires.to_le_bytes());
    }

    /// Whether the token id is `token`: compared as bytes, without the
    /// check that they are UTF-8 (`token` is; pack wrote a `&str`).
    pub(super) fn token_is(self, token: &str) -> bool {
        self.u16_at(24)
            .and_then(|len| self.0.get(HEADER..HEADER + len))
            .is_some_and(|bytes| bytes == token.as_bytes())
    }

    /// Whether the user id is `user`, compared as bytes.
    pub(super) fn user_is(self, user: &str) -> bool {
        self.u16_at(24)
            .zip(self.u16_at(26))
            .and_then(|(token, len)| self.0.get(HEADER + token..HEADER + token + len))
            .is_some_and(|bytes| bytes == user.as_bytes())
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

    /// The metadata strings, keys and values in turn; `None` at the first
    /// field [`pack`] cannot have written.
    fn fields(self) -> impl Iterator<Item = Option<Field<'a>>> {
        let start = HEADER
            + self.u16_at(24).unwrap_or(0)
            + self.u16_at(26).unwrap_or(0)
            + self.u16_at(28).unwrap_or(0);
        let count = 2 * self.u16_at(30).unwrap_or(0);
        let mut at = start;
        (0..count).map(move |_| {
            let len = self.u16_at(at)?;
            if len == usize::from(SHARED) {
                let id = u32::from_le_bytes(self.0.get(at + 2..at + 6)?.try_into().ok()?);
                at += 6;
                Some(Field::Shared(id))
            } else {
                let text = self.str_at(at + 2, len)?;
                at += 2 + len;
                Some(Field::Inline(text))
            }
        })
    }

    /// The ids of the interned strings the session holds.
    pub(super) fn shared(self) -> impl Iterator<Item = u32> {
        self.fields().map_while(|f| f).filter_map(|f| match f {
            Field::Shared(id) => Some(id),
            Field::Inline(_) => None,
        })
    }

    /// The session, as it was cached (with the expiry as it is now); its
    /// shared strings are read from `interned`, the shard's. `token` is its
    /// token id and `user`, when given, its user id (the lookup compared
    /// them): copied from there, they need no UTF-8 check.
    pub(super) fn session(
        self,
        interned: &Interned,
        token: &str,
        user: Option<&str>,
    ) -> Option<Session> {
        let expires = self.expires()?;
        let family_expires = self.u64_at(16)?;
        let mut metadata = HashMap::with_capacity(self.u16_at(30)?);
        let mut fields = self.fields();
        while let Some(key) = fields.next() {
            let value = fields.next()?;
            let [key, value] = [key?, value?].map(|field| match field {
                Field::Inline(text) => Some(text),
                Field::Shared(id) => interned.get(id),
            });
            metadata.insert(key?.to_owned(), value?.to_owned());
        }
        let user = match user {
            Some(user) => user,
            None => self.user()?,
        };
        Some(Session {
            user_id: user.to_owned(),
            token_id: token.to_owned(),
            metadata,
            created_at: self.created_at()?,
            expires_at: UNIX_EPOCH + Duration::from_nanos(expires),
            family_id: self.family()?.to_owned(),
            family_expires_at: (family_expires != u64::MAX)
                .then(|| UNIX_EPOCH + Duration::from_nanos(family_expires)),
        })
    }
}

impl View<'_> {
    /// The session copied into one allocation with every metadata string
    /// inline (its shared ones read from `interned`): a
    /// [`CompactSession`](super::CompactSession)'s data, in [`pack`]'s
    /// layout with no id in it. `None` for what [`pack`] cannot have
    /// written, and for a shared string exactly [`SHARED`] long (it cannot
    /// be inline): the caller then builds a `Session`.
    pub(super) fn resolve(self, interned: &Interned) -> Option<Box<[u8]>> {
        // Bytes copied as they are: nothing is checked to be UTF-8 here
        // (pack wrote `&str`s; the accessors check what they read), which
        // was a tenth of a lookup's time.
        let start = HEADER + self.u16_at(24)? + self.u16_at(26)? + self.u16_at(28)?;
        let count = 2 * self.u16_at(30)?;
        let shared = |at: usize| -> Option<&[u8]> {
            let id = u32::from_le_bytes(self.0.get(at + 2..at + 6)?.try_into().ok()?);
            let text = interned.get(id)?;
            (text.len() < usize::from(SHARED)).then_some(text.as_bytes())
        };
        let (mut at, mut size) = (start, start);
        for _ in 0..count {
            let len = self.u16_at(at)?;
            if len == usize::from(SHARED) {
                size += 2 + shared(at)?.len();
                at += 6;
            } else {
                size += 2 + len;
                at += 2 + len;
            }
        }
        let mut data = Vec::with_capacity(size);
        data.extend_from_slice(self.0.get(..start)?);
        at = start;
        for _ in 0..count {
            let len = self.u16_at(at)?;
            if len == usize::from(SHARED) {
                let text = shared(at)?;
                // Below SHARED: checked by `shared`.
                data.extend_from_slice(&(text.len() as u16).to_le_bytes());
                data.extend_from_slice(text);
                at += 6;
            } else {
                data.extend_from_slice(self.0.get(at..at + 2 + len)?);
                at += 2 + len;
            }
        }
        Some(data.into_boxed_slice())
    }
}

impl<'a> View<'a> {
    /// The family expiry, `None` when the session has no family.
    pub(super) fn family_expires_at(self) -> Option<SystemTime> {
        let at = self.u64_at(16).filter(|&n| n != u64::MAX)?;
        Some(UNIX_EPOCH + Duration::from_nanos(at))
    }

    /// The expiry as a time.
    pub(super) fn expires_at(self) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_nanos(self.expires()?))
    }

    /// The metadata, key and value in turn, its shared strings read from
    /// `interned` (the shard's); ends at the first field [`pack`] cannot
    /// have written.
    pub(super) fn metadata(
        self,
        interned: &'a Interned,
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut fields = self.fields().map_while(move |field| match field? {
            Field::Inline(text) => Some(text),
            Field::Shared(id) => interned.get(id),
        });
        std::iter::from_fn(move || Some((fields.next()?, fields.next()?)))
    }

    /// The metadata of a session whose strings are all inline (a
    /// [`resolve`](Self::resolve)d or [`pack_inline`]d one), key and value
    /// in turn; ends at the first field that is not.
    pub(super) fn inline_metadata(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut fields = self.fields().map_while(|field| match field? {
            Field::Inline(text) => Some(text),
            Field::Shared(_) => None,
        });
        std::iter::from_fn(move || Some((fields.next()?, fields.next()?)))
    }
}

/// Nanoseconds since 1970; `None` before it or past what a u64 holds.
pub(super) fn nanos(at: SystemTime) -> Option<u64> {
    u64::try_from(at.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
}

/// Every metadata string interned in some shard, once for the whole cache
/// (`entries.rs` keeps it under a lock of its own, taken after a shard's,
/// never by a lookup on its way to an answer): the shards' tables hold clones of these, so a string
/// in many shards is in memory once, and a lookup reading it finds it in
/// the processor's cache more often.
pub(super) struct Registry {
    strings: HashSet<Arc<str>>,
    /// Hashes of long strings seen lately (empty until the first long
    /// string): one seen again is interned.
    seen: Vec<u64>,
    /// The state of the pseudo-random choice in [`seen_before`](Self::seen_before).
    choice: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            strings: HashSet::new(),
            seen: Vec::new(),
            choice: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl Registry {
    /// The shared copy of `text`, made now when it was seen lately (or is
    /// exactly [`SHARED`] long); `None`: keep it inline.
    fn share(&mut self, text: &str, hasher: &RandomState) -> Option<Arc<str>> {
        if let Some(shared) = self.strings.get(text) {
            return Some(shared.clone());
        }
        if text.len() < INTERN_MIN {
            return None;
        }
        if text.len() < usize::from(SHARED) && !self.seen_before(hasher.hash_one(text)) {
            return None;
        }
        let shared: Arc<str> = text.into();
        self.strings.insert(shared.clone());
        Some(shared)
    }

    /// Whether a string of hash `hash` was seen lately; remembers it if not.
    /// Two slots may hold it (two-choice hashing), and which one a new hash
    /// takes is pseudo-random: with one slot, or a fixed choice, strings
    /// that come in a fixed rotation (1 000 user agents in turn) would push
    /// each other out at every turn, and some would never be shared.
    fn seen_before(&mut self, hash: u64) -> bool {
        if self.seen.is_empty() {
            self.seen = vec![0; SEEN];
        }
        let slots = [hash as usize % SEEN, (hash >> 32) as usize % SEEN];
        if slots.iter().any(|&at| self.seen[at] == hash) {
            return true;
        }
        // xorshift64: a fresh choice each time, whatever the arrival order.
        self.choice ^= self.choice << 13;
        self.choice ^= self.choice >> 7;
        self.choice ^= self.choice << 17;
        self.seen[slots[(self.choice & 1) as usize]] = hash;
        false
    }

    /// A shard let go of `text`: forgotten here when no shard holds it.
    fn forget(&mut self, text: Arc<str>) {
        // This one and the registry's: no other shard holds it.
        if Arc::strong_count(&text) <= 2 {
            self.strings.remove(&text);
        }
    }

    /// Strings held (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.strings.len()
    }
}

/// The metadata strings a shard's sessions share, by id, each counted by
/// the sessions holding it. Lives beside the shard's table, under its lock:
/// a lookup reads it without taking another lock, and a string leaves with
/// the last session holding it ([`release`](Self::release), called by
/// every removal).
#[derive(Default)]
pub(super) struct Interned {
    /// By id; `None` for an id free for reuse (listed in `free`).
    strings: Vec<Option<Counted>>,
    free: Vec<u32>,
    /// The id of each string held, by the address of its shared copy.
    ids: HashMap<usize, u32>,
}

struct Counted {
    text: Arc<str>,
    /// The sessions holding it: at least one.
    refs: u32,
}

impl Interned {
    /// The id of `text`, counted once more, when it is shared (see
    /// [`Registry::share`]); `None`: keep it inline.
    fn intern(&mut self, text: &str, registry: &mut Registry, hasher: &RandomState) -> Option<u32> {
        let shared = registry.share(text, hasher)?;
        let key = shared.as_ptr().addr();
        if let Some(&id) = self.ids.get(&key)
            && let Some(Some(counted)) = self.strings.get_mut(id as usize)
        {
            // Past u32::MAX sessions in one shard (never): inline.
            counted.refs = counted.refs.checked_add(1)?;
            return Some(id);
        }
        let counted = Counted {
            text: shared,
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.strings[id as usize] = Some(counted);
                id
            }
            None => {
                let id = u32::try_from(self.strings.len()).ok()?;
                self.strings.push(Some(counted));
                id
            }
        };
        self.ids.insert(key, id);
        Some(id)
    }

    /// String `id`'s text.
    pub(super) fn get(&self, id: u32) -> Option<&str> {
        Some(&self.strings.get(id as usize)?.as_ref()?.text)
    }

    /// A session holding the strings of `ids` left the shard.
    pub(super) fn release(&mut self, ids: impl Iterator<Item = u32>, registry: &mut Registry) {
        for id in ids {
            let Some(slot) = self.strings.get_mut(id as usize) else {
                continue;
            };
            if let Some(counted) = slot {
                counted.refs -= 1;
                if counted.refs == 0
                    && let Some(counted) = slot.take()
                {
                    let key = counted.text.as_ptr().addr();
                    if self.ids.get(&key) == Some(&id) {
                        self.ids.remove(&key);
                    }
                    self.free.push(id);
                    registry.forget(counted.text);
                }
            }
        }
    }

    /// The strings held (tests).
    #[cfg(test)]
    pub(super) fn texts(&self) -> impl Iterator<Item = &str> {
        self.strings.iter().flatten().map(|c| &*c.text)
    }

    /// Strings held, and the references counted to them (tests).
    #[cfg(test)]
    pub(super) fn counts(&self) -> HashMap<u32, u32> {
        self.strings
            .iter()
            .enumerate()
            .filter_map(|(id, s)| Some((id as u32, s.as_ref()?.refs)))
            .collect()
    }
}
