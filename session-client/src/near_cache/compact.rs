//! [`CompactSession`]: a session as the near-cache holds it, copied out in
//! one allocation, for the lookups that must be fast (#28, BENCHMARKS.md
//! "Fourth pass"). Building a [`Session`] costs about ten allocations (three
//! id strings, a map and its keys and values), most of a cached lookup's
//! work once its two reads from memory are done; this costs one.

use std::{fmt, time::SystemTime};

use super::packed::{View, pack_inline};
use crate::types::Session;

/// A session, read through accessors, in one allocation: what
/// [`SessionClient::check_user_session`](crate::SessionClient::check_user_session)
/// answers (and, with `RequireSessionLayer::compact` (feature `tower`),
/// the layer puts in the request's extensions).
///
/// It holds what a [`Session`] holds, with the metadata in the order the
/// cache stored it; [`to_session`](Self::to_session) (or `Session::from`)
/// gives the `Session`. A near-cache hit copies the cached session into it
/// as it is (one allocation of its exact size, about 250 bytes with an ip,
/// a user agent and a device); a server's answer is packed into it.
///
/// With the near-cache built with
/// [`near_cache_metadata(false)`](crate::Builder::near_cache_metadata), a
/// hit has no metadata, as a `Session` from the cache would not.
///
/// # Examples
///
/// ```no_run
/// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
/// if let Some(session) = client.check_user_session("user-42", "jti-7f3a").await? {
///     let device = session.metadata_value("device").unwrap_or("unknown");
///     println!("{} on {device} until {:?}", session.user_id(), session.expires_at());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CompactSession(Repr);

#[derive(Clone)]
enum Repr {
    /// Packed (`packed.rs`'s layout), every string inline.
    Packed(Box<[u8]>),
    /// What cannot be packed (a time before 1970, a string of 64 KiB or
    /// more): the `Session` itself.
    Full(Box<Session>),
}

impl CompactSession {
    /// From packed data with every string inline (`View::resolve`).
    pub(super) fn packed(data: Box<[u8]>) -> Self {
        Self(Repr::Packed(data))
    }

    fn view(&self) -> Option<View<'_>> {
        match &self.0 {
            Repr::Packed(data) => Some(View(data)),
            Repr::Full(_) => None,
        }
    }

    /// The user the session belongs to.
    pub fn user_id(&self) -> &str {
        match &self.0 {
            // Written by `pack`: always readable.
            Repr::Packed(data) => View(data).user().unwrap_or_default(),
            Repr::Full(session) => &session.user_id,
        }
    }

    /// The token id (the JWT's `jti`).
    pub fn token_id(&self) -> &str {
        match &self.0 {
            Repr::Packed(data) => View(data).token().unwrap_or_default(),
            Repr::Full(session) => &session.token_id,
        }
    }

    /// The refresh-token family the session belongs to (empty when none).
    pub fn family_id(&self) -> &str {
        match &self.0 {
            Repr::Packed(data) => View(data).family().unwrap_or_default(),
            Repr::Full(session) => &session.family_id,
        }
    }

    /// When the session was created (Redis's clock).
    pub fn created_at(&self) -> SystemTime {
        match &self.0 {
            Repr::Packed(data) => View(data).created_at().unwrap_or(SystemTime::UNIX_EPOCH),
            Repr::Full(session) => session.created_at,
        }
    }

    /// When the session expires (Redis's clock).
    pub fn expires_at(&self) -> SystemTime {
        match &self.0 {
            Repr::Packed(data) => View(data).expires_at().unwrap_or(SystemTime::UNIX_EPOCH),
            Repr::Full(session) => session.expires_at,
        }
    }

    /// When the session's family expires, when it has one.
    pub fn family_expires_at(&self) -> Option<SystemTime> {
        match &self.0 {
            Repr::Packed(data) => View(data).family_expires_at(),
            Repr::Full(session) => session.family_expires_at,
        }
    }

    /// The metadata, key and value, in no particular order (as a
    /// `HashMap`'s).
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        let packed = self.view().into_iter().flat_map(View::inline_metadata);
        let full = match &self.0 {
            Repr::Full(session) => Some(session.metadata.iter()),
            Repr::Packed(_) => None,
        };
        packed.chain(
            full.into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The metadata value under `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata().find(|&(k, _)| k == key).map(|(_, v)| v)
    }

    /// The [`Session`] this holds (allocates its strings and map).
    pub fn to_session(&self) -> Session {
        match &self.0 {
            Repr::Packed(_) => fields_to_session(self),
            Repr::Full(session) => Session::clone(session),
        }
    }
}

impl From<&Session> for CompactSession {
    fn from(session: &Session) -> Self {
        match pack_inline(session) {
            Some(data) => Self(Repr::Packed(data)),
            None => Self(Repr::Full(Box::new(session.clone()))),
        }
    }
}

impl From<Session> for CompactSession {
    fn from(session: Session) -> Self {
        match pack_inline(&session) {
            Some(data) => Self(Repr::Packed(data)),
            None => Self(Repr::Full(Box::new(session))),
        }
    }
}

impl From<CompactSession> for Session {
    fn from(compact: CompactSession) -> Self {
        match compact.0 {
            Repr::Full(session) => *session,
            Repr::Packed(_) => compact.to_session(),
        }
    }
}

impl From<&CompactSession> for Session {
    fn from(compact: &CompactSession) -> Self {
        compact.to_session()
    }
}

/// Equal when every field is, the metadata compared as a map (its order
/// aside), as two [`Session`]s are.
impl PartialEq for CompactSession {
    fn eq(&self, other: &Self) -> bool {
        self.to_session() == other.to_session()
    }
}

impl Eq for CompactSession {}

impl PartialEq<Session> for CompactSession {
    fn eq(&self, other: &Session) -> bool {
        fields_equal(self, other)
    }
}

impl fmt::Debug for CompactSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fields_debug(self, "CompactSession", f)
    }
}

/// A session's fields as the packed answers read them ([`CompactSession`]
/// and `SessionView`), so that what both derive from them (a [`Session`],
/// equality with one, `Debug`) is written once.
pub(super) trait SessionFields {
    fn user_id(&self) -> &str;
    fn token_id(&self) -> &str;
    fn family_id(&self) -> &str;
    fn created_at(&self) -> SystemTime;
    fn expires_at(&self) -> SystemTime;
    fn family_expires_at(&self) -> Option<SystemTime>;
    fn metadata(&self) -> impl Iterator<Item = (&str, &str)>;
}

impl SessionFields for CompactSession {
    fn user_id(&self) -> &str {
        CompactSession::user_id(self)
    }
    fn token_id(&self) -> &str {
        CompactSession::token_id(self)
    }
    fn family_id(&self) -> &str {
        CompactSession::family_id(self)
    }
    fn created_at(&self) -> SystemTime {
        CompactSession::created_at(self)
    }
    fn expires_at(&self) -> SystemTime {
        CompactSession::expires_at(self)
    }
    fn family_expires_at(&self) -> Option<SystemTime> {
        CompactSession::family_expires_at(self)
    }
    fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        CompactSession::metadata(self)
    }
}

/// The [`Session`] `fields` describe (its strings and map allocated).
pub(super) fn fields_to_session(fields: &impl SessionFields) -> Session {
    Session {
        user_id: fields.user_id().to_owned(),
        token_id: fields.token_id().to_owned(),
        metadata: fields
            .metadata()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        created_at: fields.created_at(),
        expires_at: fields.expires_at(),
        family_id: fields.family_id().to_owned(),
        family_expires_at: fields.family_expires_at(),
    }
}

/// Every field equal, the metadata compared as a map (its order aside), as
/// two [`Session`]s are; without building one.
pub(super) fn fields_equal(fields: &impl SessionFields, other: &Session) -> bool {
    fields.user_id() == other.user_id
        && fields.token_id() == other.token_id
        && fields.family_id() == other.family_id
        && fields.created_at() == other.created_at
        && fields.expires_at() == other.expires_at
        && fields.family_expires_at() == other.family_expires_at
        && fields.metadata().count() == other.metadata.len()
        && fields
            .metadata()
            .all(|(k, v)| other.metadata.get(k).is_some_and(|o| o == v))
}

/// `Debug` for an answer named `name`: its fields as a `Session`'s.
pub(super) fn fields_debug(
    fields: &impl SessionFields,
    name: &str,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    f.debug_struct(name)
        .field("user_id", &fields.user_id())
        .field("token_id", &fields.token_id())
        .field("metadata", &fields.metadata().collect::<Vec<_>>())
        .field("created_at", &fields.created_at())
        .field("expires_at", &fields.expires_at())
        .field("family_id", &fields.family_id())
        .field("family_expires_at", &fields.family_expires_at())
        .finish()
}
