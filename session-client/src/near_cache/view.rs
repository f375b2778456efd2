//! [`SessionView`]: a near-cache hit read where it lies, under its shard's
//! read lock, for the lookups that must be fastest (#28, BENCHMARKS.md "Fifth
//! pass"). A [`CompactSession`] copies the session out (one allocation and
//! about 250 bytes with the yardstick's metadata); this copies nothing.

use std::{fmt, time::SystemTime};

use super::packed::{Interned, View};
use super::{
    CompactSession,
    compact::{SessionFields, fields_debug, fields_equal, fields_to_session},
};
use crate::types::Session;

/// A cached session borrowed from the near-cache, read through the same
/// accessors as a [`CompactSession`]: what
/// [`SessionClient::with_cached_session`](crate::SessionClient::with_cached_session)
/// hands its closure on a hit.
///
/// It borrows the session in the cache's memory (and the metadata strings
/// its shard shares), so it lives only as long as the closure's call, with
/// the shard's read lock held; [`to_compact`](Self::to_compact) or
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
        fields_to_session(self)
    }
}

impl SessionFields for SessionView<'_> {
    fn user_id(&self) -> &str {
        SessionView::user_id(self)
    }
    fn token_id(&self) -> &str {
        SessionView::token_id(self)
    }
    fn family_id(&self) -> &str {
        SessionView::family_id(self)
    }
    fn created_at(&self) -> SystemTime {
        SessionView::created_at(self)
    }
    fn expires_at(&self) -> SystemTime {
        SessionView::expires_at(self)
    }
    fn family_expires_at(&self) -> Option<SystemTime> {
        SessionView::family_expires_at(self)
    }
    fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        SessionView::metadata(self)
    }
}

/// As [`CompactSession`]'s: every field equal, the metadata compared as a
/// map.
impl PartialEq<Session> for SessionView<'_> {
    fn eq(&self, other: &Session) -> bool {
        fields_equal(self, other)
    }
}

impl fmt::Debug for SessionView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fields_debug(self, "SessionView", f)
    }
}
