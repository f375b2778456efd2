//! [`SessionView`]: a near-cache hit read where it lies, under its shard's
//! lock, for the lookups that must be fastest (#28, BENCHMARKS.md "Fifth
//! pass"). A [`CompactSession`] copies the session out (one allocation and
//! about 250 bytes with the yardstick's metadata); this copies nothing.

use std::{fmt, time::SystemTime};

use super::CompactSession;
use super::packed::{Interned, View};
use crate::types::Session;

/// A cached session borrowed from the near-cache, read through the same
/// accessors as a [`CompactSession`]: what
/// [`SessionClient::with_cached_session`](crate::SessionClient::with_cached_session)
/// hands its closure on a hit.
///
/// It borrows the session in the cache's memory (and the metadata strings
/// its shard shares), so it lives only as long as the closure's call, with
/// the shard's lock held; [`to_compact`](Self::to_compact) or
/// [`to_session`](Self::to_session) copy it out to keep it.
///
/// With the near-cache built with
/// [`near_cache_metadata(false)`](crate::Builder::near_cache_metadata), it
/// has no metadata, as a `Session` from the cache would not.
#[derive(Clone, Copy)]
pub struct SessionView<'a> {
    data: View<'a>,
    interned: &'a Interned,
}

impl<'a> SessionView<'a> {
    /// A view of packed session `data` whose shared strings are in
    /// `interned` (its shard's).
    pub(super) fn new(data: View<'a>, interned: &'a Interned) -> Self {
        Self { data, interned }
    }

    /// The user the session belongs to.
    pub fn user_id(&self) -> &'a str {
        // Written by `pack`: always readable (as `CompactSession`'s).
        self.data.user().unwrap_or_default()
    }

    /// The token id (the JWT's `jti`).
    pub fn token_id(&self) -> &'a str {
        self.data.token().unwrap_or_default()
    }

    /// The refresh-token family the session belongs to (empty when none).
    pub fn family_id(&self) -> &'a str {
        self.data.family().unwrap_or_default()
    }

    /// When the session was created (Redis's clock).
    pub fn created_at(&self) -> SystemTime {
        self.data.created_at().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// When the session expires (Redis's clock).
    pub fn expires_at(&self) -> SystemTime {
        self.data.expires_at().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// When the session's family expires, when it has one.
    pub fn family_expires_at(&self) -> Option<SystemTime> {
        self.data.family_expires_at()
    }

    /// The metadata, key and value, in no particular order (as a
    /// `HashMap`'s).
    pub fn metadata(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        self.data.metadata(self.interned)
    }

    /// The metadata value under `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&'a str> {
        self.metadata().find(|&(k, _)| k == key).map(|(_, v)| v)
    }

    /// The session copied out in one allocation, to keep past the
    /// closure's call.
    pub fn to_compact(&self) -> CompactSession {
        match self.data.resolve(self.interned) {
            Some(data) => CompactSession::packed(data),
            // A metadata string exactly 64 KiB - 1 long (never in
            // practice): through the `Session`, as the cache's lookup does.
            None => CompactSession::from(self.to_session()),
        }
    }

    /// The [`Session`] this views (allocates its strings and map).
    pub fn to_session(&self) -> Session {
        Session {
            user_id: self.user_id().to_owned(),
            token_id: self.token_id().to_owned(),
            metadata: self
                .metadata()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            created_at: self.created_at(),
            expires_at: self.expires_at(),
            family_id: self.family_id().to_owned(),
            family_expires_at: self.family_expires_at(),
        }
    }
}

/// As [`CompactSession`]'s: every field equal, the metadata compared as a
/// map.
impl PartialEq<Session> for SessionView<'_> {
    fn eq(&self, other: &Session) -> bool {
        self.user_id() == other.user_id
            && self.token_id() == other.token_id
            && self.family_id() == other.family_id
            && self.created_at() == other.created_at
            && self.expires_at() == other.expires_at
            && self.family_expires_at() == other.family_expires_at
            && self.metadata().count() == other.metadata.len()
            && self
                .metadata()
                .all(|(k, v)| other.metadata.get(k).is_some_and(|o| o == v))
    }
}

impl fmt::Debug for SessionView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionView")
            .field("user_id", &self.user_id())
            .field("token_id", &self.token_id())
            .field("metadata", &self.metadata().collect::<Vec<_>>())
            .field("created_at", &self.created_at())
            .field("expires_at", &self.expires_at())
            .field("family_id", &self.family_id())
            .field("family_expires_at", &self.family_expires_at())
            .finish()
    }
}
