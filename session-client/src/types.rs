//! The domain types the client speaks, and their conversions from the
//! generated proto messages. Proto types stop here.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use sessionstore::v1 as pb;

use crate::error::Error;

/// A live session, as SessionStore holds it. Fields may be added in a minor
/// release (`#[non_exhaustive]`): read them, do not build one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Session {
    /// The owner (the JWT's `sub`).
    pub user_id: String,
    /// The session's token id (the JWT's `jti`), unique across all users.
    pub token_id: String,
    /// The free-form data stored at creation (IP, user agent, device...).
    pub metadata: HashMap<String, String>,
    /// When the session was created, by Redis's clock (not this host's).
    pub created_at: SystemTime,
    /// When the session ends, by Redis's clock, to the millisecond; after it
    /// [`get_session`](crate::SessionClient::get_session) finds nothing.
    pub expires_at: SystemTime,
    /// The session's family: one login, started by a create and kept by
    /// every [`rotate_session`](crate::SessionClient::rotate_session). A
    /// secret like the token id: with the user id it is what a refresh
    /// credential proves, so keep it where only the auth service can read
    /// it. Empty for sessions stored by a server older than families (they
    /// cannot be rotated).
    pub family_id: String,
    /// The family's absolute end, by Redis's clock: no session of the family
    /// expires after it, however often it is rotated or extended. `None`
    /// when `family_id` is empty.
    pub family_expires_at: Option<SystemTime>,
}

/// A session to create, for
/// [`create_session_with`](crate::SessionClient::create_session_with).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use session_client::NewSession;
///
/// let new = NewSession::new("user-42", "jti-7f3a")
///     .metadata("ip", "192.0.2.1")
///     .ttl(Duration::from_secs(600))
///     .max_lifetime(Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(new.metadata["ip"], "192.0.2.1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewSession {
    /// The owner of the new session.
    pub user_id: String,
    /// The new session's token id; must not have a live session already.
    pub token_id: String,
    /// Data stored with the session: at most 32 entries, keys 1 to 64 bytes,
    /// values at most 1024 bytes.
    pub metadata: HashMap<String, String>,
    /// How long the session lives, so it ends with its access token: a whole
    /// number of milliseconds, at most the server's SESSION_TTL_MAX. `None`:
    /// the server's SESSION_TTL.
    pub ttl: Option<Duration>,
    /// The absolute lifetime of the family this session starts: no session
    /// of it outlives its creation plus this, however often it is rotated or
    /// extended (a longer ttl is cut to it). A whole number of milliseconds,
    /// at most 365 days. `None`: the server's SESSION_MAX_LIFETIME.
    pub max_lifetime: Option<Duration>,
}

impl NewSession {
    /// A session for `user_id` and `token_id`, with no metadata and the
    /// server's default lifetime.
    pub fn new(user_id: impl Into<String>, token_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            token_id: token_id.into(),
            metadata: HashMap::new(),
            ttl: None,
            max_lifetime: None,
        }
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the session's lifetime, usually the access token's remaining life.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the family's absolute lifetime: how long the login lasts at most,
    /// refreshes included (for example 7 days for "remember me").
    #[must_use]
    pub fn max_lifetime(mut self, max_lifetime: Duration) -> Self {
        self.max_lifetime = Some(max_lifetime);
        self
    }
}

/// A rotation to make, for
/// [`rotate_session`](crate::SessionClient::rotate_session): a refresh that
/// revokes the presented session and makes `new_token_id` its family's live
/// session, in one atomic step.
///
/// `user_id`, `family_id` and `token_id` come from the refresh credential the
/// auth service issued (which must be signed or stored server-side: the
/// family id is a secret); `new_token_id` is the new access token's `jti`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use session_client::Rotation;
///
/// let rotation = Rotation::new("user-42", "family-from-the-credential", "jti-7f3a", "jti-8b1c")
///     .ttl(Duration::from_secs(900));
/// assert_eq!(rotation.new_token_id, "jti-8b1c");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rotation {
    /// The family's owner.
    pub user_id: String,
    /// The family, as [`Session::family_id`] gave it.
    pub family_id: String,
    /// The token id the refresh credential carries: the one presented.
    pub token_id: String,
    /// The successor's token id (the new JWT's `jti`): different from
    /// `token_id`, and, like a create's, never used before by anyone.
    pub new_token_id: String,
    /// The successor's lifetime, bounded as [`NewSession::ttl`] and cut to
    /// the family's end. `None`: the server's SESSION_TTL.
    pub ttl: Option<Duration>,
    /// The successor's metadata, with a create's limits. Empty keeps the
    /// presented session's metadata; any entry replaces all of it.
    pub metadata: HashMap<String, String>,
}

impl Rotation {
    /// A rotation of `token_id` in `user_id`'s family `family_id` to
    /// `new_token_id`, keeping the metadata, with the server's default
    /// lifetime.
    pub fn new(
        user_id: impl Into<String>,
        family_id: impl Into<String>,
        token_id: impl Into<String>,
        new_token_id: impl Into<String>,
    ) -> Self {
        Self {
            user_id: user_id.into(),
            family_id: family_id.into(),
            token_id: token_id.into(),
            new_token_id: new_token_id.into(),
            ttl: None,
            metadata: HashMap::new(),
        }
    }

    /// Adds one metadata entry; with any entry the successor's metadata
    /// replaces the presented session's.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the successor's lifetime, usually the new access token's.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What [`rotate_session`](crate::SessionClient::rotate_session) did.
///
/// An outcome the server does not send (its UNSPECIFIED, or one newer than
/// this client) is not a variant but an error ([`Error::Other`], INTERNAL):
/// unlike a create's, a rotation's answer has no other field saying whether
/// the family lives on, so there is nothing safe to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RotateOutcome {
    /// The presented session is revoked and the successor, returned, is the
    /// family's live session. Issue tokens for it.
    Rotated(Session),
    /// The presented token was rotated moments ago (within the server's
    /// ROTATION_GRACE_MS): a retry after a lost answer, or two tabs
    /// refreshing at once. Nothing changed; the family's current session is
    /// returned, whatever `new_token_id` this call named. Issue tokens for it.
    AlreadyRotated(Session),
    /// The presented token is one the family had moved past: a refresh
    /// credential replayed after the real client rotated (a stolen one), or
    /// a client gone wrong. The whole family is revoked. Force a login, and
    /// consider telling the user.
    ReuseDetected,
    /// No live family by that id for that user: unknown, idle too long, past
    /// its absolute end, or ended (revoked, signed out everywhere, evicted,
    /// reuse detected). Log in again.
    NotFound,
    /// `new_token_id` is, or was, a token id: nothing changed. Retry with
    /// another one.
    TokenTaken,
}

/// What [`create_session_with`](crate::SessionClient::create_session_with) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Created {
    /// True when the session was stored ([`CreateOutcome::Created`]).
    pub created: bool,
    /// Why, in a form to branch on: in particular a create retried after a
    /// timeout answers [`CreateOutcome::AlreadyExists`] when the first attempt
    /// had stored the session, and a revoked token id is never live again.
    pub outcome: CreateOutcome,
    /// The stored session with its Redis-clock timestamps when created; the
    /// existing one when [`CreateOutcome::AlreadyExists`]; else `None`.
    pub session: Option<Session>,
    /// Token ids of the user's oldest sessions revoked to make room under the
    /// server's `evict_oldest` policy; a caller may log them or notify their
    /// devices. Empty otherwise.
    pub evicted_token_ids: Vec<String>,
}

/// What CreateSession did with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CreateOutcome {
    /// The session was stored.
    Created,
    /// The same user already has a live session with this token id,
    /// typically from an earlier attempt of the same call: nothing changed,
    /// and [`Created::session`] is the existing session. Safe to treat as
    /// success.
    AlreadyExists,
    /// Another user holds this token id (a live session, or a reservation
    /// outliving a recently ended one). Nothing changed.
    TokenTaken,
    /// This token id's session was revoked (signed out, signed out
    /// everywhere, or evicted at the cap): it is refused for as long as a JWT
    /// carrying it could still be presented. Issue a new token id.
    TokenRevoked,
    /// The user is at the server's session cap and its policy is `reject`.
    LimitReached,
    /// The server did not say: an older server, or an outcome newer than this
    /// client. [`Created::created`] still tells whether the session was stored.
    Unknown,
}

/// The verdict on one login attempt, from
/// [`record_login_attempt`](crate::SessionClient::record_login_attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoginAttempt {
    /// Whether this login attempt may proceed.
    pub allowed: bool,
    /// Attempts of the refusing subject (the address when allowed) in the
    /// sliding window, this one included.
    pub attempts: u32,
    /// Attempts still allowed in the window, by every limit that applies.
    pub remaining: u32,
    /// When refused, the exact time until an attempt would be allowed again
    /// (by every limit): a value for a `Retry-After` header. `None` when
    /// allowed.
    pub retry_after: Option<Duration>,
    /// When refused, which limit refused (the longer one when both did);
    /// `None` when allowed.
    pub refused_by: Option<LoginLimit>,
    /// The device token sent was valid for the account: the attempt counted
    /// against that device alone, not against the address or the account.
    pub device_trusted: bool,
}

/// The outcome of
/// [`reset_login_attempts_with_device`](crate::SessionClient::reset_login_attempts_with_device).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoginReset {
    /// Whether some counted attempt was cleared.
    pub reset: bool,
    /// The device token issued, when one was asked for: a bearer secret that
    /// trusts this device for this account. Keep it in an HttpOnly, Secure
    /// cookie and send it with the account's next login attempts.
    pub device_token: Option<String>,
}

impl std::fmt::Debug for LoginReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginReset")
            .field("reset", &self.reset)
            .field("device_token", &self.device_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Which limit refused a login attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoginLimit {
    /// The client address (or its IPv6 network) is at the server's
    /// RATE_LIMIT_MAX_ATTEMPTS.
    Address,
    /// The account is at the server's RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS: an
    /// attack spread over many addresses, or its owner mistyping.
    Account,
    /// The trusted device is at the server's RATE_LIMIT_DEVICE_MAX_ATTEMPTS:
    /// its owner mistyping, or a stolen device token.
    Device,
    /// The server did not say: an older server, or a limit newer than this
    /// client.
    Unknown,
}

/// A proto session as a [`Session`].
pub(crate) fn session_from_proto(session: pb::Session) -> Result<Session, Error> {
    Ok(Session {
        user_id: session.user_id,
        token_id: session.token_id,
        metadata: session.metadata,
        created_at: time_from_proto(session.created_at, "session without created_at")?,
        expires_at: time_from_proto(session.expires_at, "session without expires_at")?,
        family_id: session.family_id,
        // Unset by servers older than families, and with an empty family_id.
        family_expires_at: session
            .family_expires_at
            .map(|t| {
                SystemTime::try_from(t).map_err(|_| Error::malformed("timestamp out of range"))
            })
            .transpose()?,
    })
}

fn time_from_proto(
    timestamp: Option<prost_types::Timestamp>,
    what: &str,
) -> Result<SystemTime, Error> {
    let timestamp = timestamp.ok_or_else(|| Error::malformed(what))?;
    SystemTime::try_from(timestamp).map_err(|_| Error::malformed("timestamp out of range"))
}

/// A [`NewSession`] as its request message.
pub(crate) fn new_session_to_proto(new: NewSession) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: new.user_id,
        token_id: new.token_id,
        metadata: new.metadata,
        ttl: new.ttl.map(duration_to_proto),
        max_lifetime: new.max_lifetime.map(duration_to_proto),
    }
}

/// A [`Rotation`] as its request message.
pub(crate) fn rotation_to_proto(rotation: Rotation) -> pb::RotateSessionRequest {
    pb::RotateSessionRequest {
        user_id: rotation.user_id,
        family_id: rotation.family_id,
        token_id: rotation.token_id,
        new_token_id: rotation.new_token_id,
        ttl: rotation.ttl.map(duration_to_proto),
        metadata: rotation.metadata,
    }
}

/// An ExtendSession request.
pub(crate) fn extension_to_proto(
    user_id: String,
    token_id: String,
    ttl: Option<Duration>,
) -> pb::ExtendSessionRequest {
    pb::ExtendSessionRequest {
        user_id,
        token_id,
        ttl: ttl.map(duration_to_proto),
    }
}

fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        // Beyond i64 seconds the server refuses it as above SESSION_TTL_MAX anyway.
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A CreateSession answer as [`Created`].
pub(crate) fn created_from_proto(response: pb::CreateSessionResponse) -> Result<Created, Error> {
    let outcome = match pb::CreateOutcome::try_from(response.outcome) {
        Ok(pb::CreateOutcome::Created) => CreateOutcome::Created,
        Ok(pb::CreateOutcome::AlreadyExists) => CreateOutcome::AlreadyExists,
        Ok(pb::CreateOutcome::TokenTaken) => CreateOutcome::TokenTaken,
        Ok(pb::CreateOutcome::TokenRevoked) => CreateOutcome::TokenRevoked,
        Ok(pb::CreateOutcome::LimitReached) => CreateOutcome::LimitReached,
        Ok(pb::CreateOutcome::Unspecified) | Err(_) => CreateOutcome::Unknown,
    };
    Ok(Created {
        created: response.created,
        outcome,
        session: response.session.map(session_from_proto).transpose()?,
        evicted_token_ids: response.evicted_token_ids,
    })
}

/// A RotateSession answer as [`RotateOutcome`]: an outcome this client does
/// not know, or ROTATED or ALREADY_ROTATED without the session, is a
/// malformed answer.
pub(crate) fn rotate_outcome_from_proto(
    response: pb::RotateSessionResponse,
) -> Result<RotateOutcome, Error> {
    let session = |session: Option<pb::Session>| {
        session
            .ok_or_else(|| Error::malformed("rotation without the family's session"))
            .and_then(session_from_proto)
    };
    match pb::RotateOutcome::try_from(response.outcome) {
        Ok(pb::RotateOutcome::Rotated) => Ok(RotateOutcome::Rotated(session(response.session)?)),
        Ok(pb::RotateOutcome::AlreadyRotated) => {
            Ok(RotateOutcome::AlreadyRotated(session(response.session)?))
        }
        Ok(pb::RotateOutcome::ReuseDetected) => Ok(RotateOutcome::ReuseDetected),
        Ok(pb::RotateOutcome::NotFound) => Ok(RotateOutcome::NotFound),
        Ok(pb::RotateOutcome::TokenTaken) => Ok(RotateOutcome::TokenTaken),
        Ok(pb::RotateOutcome::Unspecified) | Err(_) => {
            Err(Error::malformed("unknown rotation outcome"))
        }
    }
}

/// A RecordLoginAttempt answer as [`LoginAttempt`].
pub(crate) fn login_attempt_from_proto(
    response: pb::RecordLoginAttemptResponse,
) -> Result<LoginAttempt, Error> {
    let retry_after = response
        .retry_after
        .map(|d| Duration::try_from(d).map_err(|_| Error::malformed("negative retry_after")))
        .transpose()?;
    let refused_by = (!response.allowed).then(|| match response.refused_by() {
        pb::LoginLimit::Address => LoginLimit::Address,
        pb::LoginLimit::Account => LoginLimit::Account,
        pb::LoginLimit::Device => LoginLimit::Device,
        pb::LoginLimit::Unspecified => LoginLimit::Unknown,
    });
    Ok(LoginAttempt {
        allowed: response.allowed,
        attempts: response.attempts,
        remaining: response.remaining,
        retry_after,
        refused_by,
        device_trusted: response.device_trusted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timestamps convert exactly; a session without one is a malformed answer (INTERNAL).
    #[test]
    fn sessions_need_both_timestamps() {
        let created = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let expires = created + Duration::from_secs(900);
        let proto = pb::Session {
            user_id: "u".into(),
            token_id: "t".into(),
            metadata: HashMap::from([("ip".into(), "192.0.2.1".into())]),
            created_at: Some(created.into()),
            expires_at: Some(expires.into()),
            family_id: String::new(),
            family_expires_at: None,
        };
        let session = session_from_proto(proto.clone()).unwrap();
        assert_eq!(session.created_at, created);
        assert_eq!(session.expires_at, expires);
        assert_eq!(session.metadata["ip"], "192.0.2.1");

        let missing = pb::Session {
            expires_at: None,
            ..proto
        };
        let err = session_from_proto(missing).unwrap_err();
        assert!(matches!(&err, Error::Other(e) if e.code() == crate::Code::Internal));
    }

    /// A ttl is sent exactly, and an unset ttl stays unset (the server's default).
    #[test]
    fn ttl_is_sent_to_the_millisecond() {
        let request =
            new_session_to_proto(NewSession::new("u", "t").ttl(Duration::from_millis(1500)));
        assert_eq!(
            request.ttl,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(new_session_to_proto(NewSession::new("u", "t")).ttl, None);
    }

    /// max_lifetime is sent exactly when set, like ttl.
    #[test]
    fn max_lifetime_is_sent_when_set() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let request = new_session_to_proto(NewSession::new("u", "t").max_lifetime(week));
        assert_eq!(
            request.max_lifetime,
            Some(prost_types::Duration {
                seconds: 604_800,
                nanos: 0
            })
        );
        assert_eq!(request.ttl, None);
        assert_eq!(
            new_session_to_proto(NewSession::new("u", "t")).max_lifetime,
            None
        );
    }

    fn family_session(token: &str) -> pb::Session {
        let created = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        pb::Session {
            user_id: "u".into(),
            token_id: token.into(),
            metadata: HashMap::new(),
            created_at: Some(created.into()),
            expires_at: Some((created + Duration::from_secs(900)).into()),
            family_id: "f-secret".into(),
            family_expires_at: Some((created + Duration::from_secs(2_592_000)).into()),
        }
    }

    /// The family's id and end convert; a session of an older server has
    /// neither, which is not an error.
    #[test]
    fn family_fields_convert() {
        let session = session_from_proto(family_session("t")).unwrap();
        assert_eq!(session.family_id, "f-secret");
        assert_eq!(
            session.family_expires_at,
            Some(session.created_at + Duration::from_secs(2_592_000))
        );
        let older = session_from_proto(pb::Session {
            family_id: String::new(),
            family_expires_at: None,
            ..family_session("t")
        })
        .unwrap();
        assert_eq!(
            (older.family_id.as_str(), older.family_expires_at),
            ("", None)
        );
        let out_of_range = session_from_proto(pb::Session {
            family_expires_at: Some(prost_types::Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            }),
            ..family_session("t")
        });
        assert!(out_of_range.is_err());
    }

    /// A rotation's fields are sent as given; an unset ttl stays unset.
    #[test]
    fn rotation_is_sent_as_given() {
        let request = rotation_to_proto(
            Rotation::new("u", "f", "t1", "t2")
                .ttl(Duration::from_millis(900_500))
                .metadata("ip", "192.0.2.1"),
        );
        assert_eq!(
            (
                request.user_id.as_str(),
                request.family_id.as_str(),
                request.token_id.as_str(),
                request.new_token_id.as_str()
            ),
            ("u", "f", "t1", "t2")
        );
        assert_eq!(
            request.ttl,
            Some(prost_types::Duration {
                seconds: 900,
                nanos: 500_000_000
            })
        );
        assert_eq!(request.metadata["ip"], "192.0.2.1");
        let plain = rotation_to_proto(Rotation::new("u", "f", "t1", "t2"));
        assert_eq!((plain.ttl, plain.metadata.len()), (None, 0));
        let extension = extension_to_proto("u".into(), "t".into(), None);
        assert_eq!(extension.ttl, None);
    }

    fn rotate_answer(
        outcome: pb::RotateOutcome,
        session: Option<pb::Session>,
    ) -> pb::RotateSessionResponse {
        pb::RotateSessionResponse {
            outcome: outcome.into(),
            session,
        }
    }

    /// Every outcome converts, with the family's session exactly where the
    /// contract puts one.
    #[test]
    fn rotate_outcomes_convert() {
        let successor = session_from_proto(family_session("t2")).unwrap();
        let rotated = rotate_answer(pb::RotateOutcome::Rotated, Some(family_session("t2")));
        assert_eq!(
            rotate_outcome_from_proto(rotated).unwrap(),
            RotateOutcome::Rotated(successor.clone())
        );
        let again = rotate_answer(
            pb::RotateOutcome::AlreadyRotated,
            Some(family_session("t2")),
        );
        assert_eq!(
            rotate_outcome_from_proto(again).unwrap(),
            RotateOutcome::AlreadyRotated(successor)
        );
        for (outcome, expected) in [
            (
                pb::RotateOutcome::ReuseDetected,
                RotateOutcome::ReuseDetected,
            ),
            (pb::RotateOutcome::NotFound, RotateOutcome::NotFound),
            (pb::RotateOutcome::TokenTaken, RotateOutcome::TokenTaken),
        ] {
            assert_eq!(
                rotate_outcome_from_proto(rotate_answer(outcome, None)).unwrap(),
                expected
            );
        }
    }

    /// An outcome the server never sends (UNSPECIFIED), one newer than this
    /// client, and a rotation that names no successor are malformed answers
    /// (INTERNAL), never a guess.
    #[test]
    fn unknown_rotate_outcomes_are_errors() {
        let internal =
            |e: Error| matches!(&e, Error::Other(c) if c.code() == crate::Code::Internal);
        let unspecified = rotate_answer(pb::RotateOutcome::Unspecified, Some(family_session("t2")));
        assert!(internal(
            rotate_outcome_from_proto(unspecified).unwrap_err()
        ));
        let newer = pb::RotateSessionResponse {
            outcome: 99,
            session: None,
        };
        assert!(internal(rotate_outcome_from_proto(newer).unwrap_err()));
        for outcome in [
            pb::RotateOutcome::Rotated,
            pb::RotateOutcome::AlreadyRotated,
        ] {
            let bare = rotate_answer(outcome, None);
            assert!(internal(rotate_outcome_from_proto(bare).unwrap_err()));
        }
    }

    /// retry_after is present exactly when the server sent it.
    #[test]
    fn retry_after_is_kept_only_when_sent() {
        let refused = login_attempt_from_proto(pb::RecordLoginAttemptResponse {
            allowed: false,
            attempts: 6,
            remaining: 0,
            retry_after: Some(prost_types::Duration {
                seconds: 42,
                nanos: 0,
            }),
            refused_by: pb::LoginLimit::Account.into(),
            device_trusted: false,
        })
        .unwrap();
        assert_eq!(refused.retry_after, Some(Duration::from_secs(42)));
        assert_eq!(refused.refused_by, Some(LoginLimit::Account));
        let older_server = login_attempt_from_proto(pb::RecordLoginAttemptResponse {
            allowed: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(older_server.refused_by, Some(LoginLimit::Unknown));
        let allowed = login_attempt_from_proto(pb::RecordLoginAttemptResponse {
            allowed: true,
            attempts: 1,
            remaining: 4,
            retry_after: None,
            refused_by: 0,
            device_trusted: true,
        })
        .unwrap();
        assert_eq!(allowed.retry_after, None);
        assert_eq!(allowed.refused_by, None);
        assert!(allowed.device_trusted);
    }
}
