//! [`SessionClient`]: the generated stub wrapped to speak domain types: each
//! RPC as a method taking and returning domain types, marked a read or a
//! write for the attempt loop (`call.rs`, which owns deadlines, retries and
//! the pick of an endpoint), and the near-cache consulted and kept true
//! around the calls that concern it.

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use sessionstore::v1 as pb;

// Only the docs name these: `Error`'s variants are what each call fails
// with, `Builder`'s settings what it does. The builder imports this module,
// not the other way round.
#[cfg(doc)]
use crate::{builder::Builder, error::Error};
use crate::{
    call::Caller,
    error::Result,
    near_cache::{NearCache, NearCacheSettings, NearCacheStats, Revocation, Watcher},
    types::{
        self, Created, LoginAttempt, LoginReset, NewSession, RotateOutcome, Rotation, Session,
    },
};

/// A handle to SessionStore. Cheap to clone: clones share the connections,
/// the retry budget and the bearer token, so make one at start-up and hand
/// clones to every task.
///
/// Each call has one budget, the builder's [`timeout`](Builder::timeout):
/// every attempt and every pause between attempts ends within it, and each
/// attempt tells the server the time left (`grpc-timeout`).
///
/// Reads (get, count, list) are retried with exponential backoff on
/// UNAVAILABLE (the server or its Redis unreachable, a connection cut
/// mid-call), on the server's load shedding and on an attempt past its
/// [`attempt_timeout`](Builder::attempt_timeout). Writes are retried only
/// when the server provably never processed the request: its connection
/// could not be opened (retried on another endpoint when there is one), or
/// the server turned it away before any processing: a request queued on, or
/// opened past the last stream of, a connection the server was closing (its
/// GOAWAY: every connection it ages out at `MAX_CONNECTION_AGE`, or a
/// graceful shutdown), or a stream it refused (`REFUSED_STREAM`). The first
/// of those turn-aways in a call is retried at once on a new connection,
/// without counting as an attempt or taking from the retry budget (gRPC's
/// "transparent retry"); any later one is an ordinary retry. Retries are
/// bounded per call ([`max_attempts`](Builder::max_attempts)) and across
/// calls (the retry budget, [`retry_throttling`](Builder::retry_throttling)).
///
/// # Writes whose outcome is unknown
///
/// A write that fails with [`Error::Unavailable`] or
/// [`Error::DeadlineExceeded`], or whose future is dropped before it
/// finishes (a `select!`, a cancelled request handler, a caller's own
/// timeout), may or may not have taken effect: the request may have reached
/// the server. Repeating it is safe for these calls: a repeated
/// [`create_session_with`](Self::create_session_with) answers
/// [`CreateOutcome::AlreadyExists`](crate::CreateOutcome::AlreadyExists)
/// (with the stored session) when the first one took effect; a repeated
/// [`rotate_session`](Self::rotate_session) with the same `new_token_id`
/// answers [`RotateOutcome::AlreadyRotated`] with the same successor (within
/// the server's ROTATION_GRACE_MS); a repeated
/// [`extend_session`](Self::extend_session) moves the expiry to where one
/// would have; a repeated revoke answers `false`; only a repeated
/// [`record_login_attempt`](Self::record_login_attempt) counts twice.
///
/// # Examples
///
/// ```no_run
/// use session_client::{Error, SessionClient};
///
/// # async fn run() -> Result<(), Error> {
/// let client = SessionClient::connect("http://127.0.0.1:50051").await?;
/// match client.get_session("jti-from-the-jwt").await? {
///     Some(session) => println!("signed in as {}", session.user_id),
///     None => println!("signed out"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SessionClient {
    shared: Arc<Shared>,
}

/// What every clone of a client shares.
struct Shared {
    /// The endpoints, token, bounds and retry budget every call runs with.
    caller: Caller,
    /// The near-cache and its stream task (aborted when the last clone
    /// drops this), when the builder turned it on.
    near_cache: Option<(Arc<NearCache>, Watcher)>,
}

impl SessionClient {
    /// Must run inside a Tokio runtime when `near_cache` is set: its stream
    /// task is spawned here.
    pub(crate) fn new(caller: Caller, near_cache: Option<NearCacheSettings>) -> Self {
        let near_cache = near_cache.map(|settings| {
            let cache = NearCache::with_metadata(
                settings.max_entries,
                settings.max_staleness,
                settings.metadata,
            );
            let watcher = Watcher::spawn(
                cache.clone(),
                caller.pool.clone(),
                caller.auth.clone(),
                settings.stream_lifetime,
            );
            (cache, watcher)
        });
        Self {
            shared: Arc::new(Shared { caller, near_cache }),
        }
    }

    fn near_cache(&self) -> Option<&Arc<NearCache>> {
        self.shared.near_cache.as_ref().map(|(cache, _)| cache)
    }

    #[cfg(test)]
    pub(crate) fn near_cache_for_tests(&self) -> Option<&Arc<NearCache>> {
        self.near_cache()
    }

    /// What the near-cache has done so far (hits, misses, revocations
    /// applied, resets) and holds now; `None` when it is off (see
    /// [`Builder::near_cache`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn run(client: session_client::SessionClient) {
    /// if let Some(stats) = client.near_cache_stats() {
    ///     let lookups = stats.hits + stats.misses;
    ///     println!("{} of {lookups} checks answered from memory", stats.hits);
    /// }
    /// # }
    /// ```
    pub fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near_cache().map(|cache| cache.stats())
    }

    /// Replaces the bearer token for every later call of this client and its
    /// clones, for a token rotated without rebuilding the client (calls in
    /// flight keep the old one). Typically called when the secret's file
    /// changes; the server accepts both tokens during a rotation when both
    /// are in its AUTH_TOKENS_FILE.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the token is not visible ASCII, or would go to
    /// an `http://` endpoint without
    /// [`allow_plaintext_token`](Builder::allow_plaintext_token); the old
    /// token stays in use.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let token = std::fs::read_to_string("/var/run/secrets/sessionstore/token")
    ///     .expect("token file");
    /// client.set_bearer_token(token.trim())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_bearer_token(&self, token: impl AsRef<str>) -> Result<()> {
        self.shared.caller.auth.set(token.as_ref())
    }

    /// Stores a new session with the server's default lifetime. Returns
    /// whether it was stored: `false` when the token id already has a live
    /// session (of any user), is still reserved by another user's recently
    /// ended one, or the user is at the session cap under the `reject` policy.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`, `token_id` or `metadata`;
    /// [`Error::Unavailable`], [`Error::Overloaded`], [`Error::DeadlineExceeded`]
    /// (the write may have happened), [`Error::Unauthenticated`],
    /// [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::collections::HashMap;
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let metadata = HashMap::from([("ip".to_string(), "192.0.2.1".to_string())]);
    /// let created = client.create_session("user-42", "jti-7f3a", metadata).await?;
    /// # let _ = created;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_session(
        &self,
        user_id: impl Into<String>,
        token_id: impl Into<String>,
        metadata: HashMap<String, String>,
    ) -> Result<bool> {
        let mut new = NewSession::new(user_id, token_id);
        new.metadata = metadata;
        Ok(self.create_session_with(new).await?.created)
    }

    /// Stores a new session, with its own lifetime when `new.ttl` is set, and
    /// reports the stored session and any sessions evicted to make room.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`create_session`](Self::create_session), and
    /// [`Error::InvalidArgument`] naming `ttl` when it is not positive, not a
    /// whole number of milliseconds, or above the server's SESSION_TTL_MAX.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use session_client::NewSession;
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let new = NewSession::new("user-42", "jti-7f3a").ttl(Duration::from_secs(600));
    /// let created = client.create_session_with(new).await?;
    /// for evicted in &created.evicted_token_ids {
    ///     println!("signed out {evicted} to make room");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_session_with(&self, new: NewSession) -> Result<Created> {
        let request = types::new_session_to_proto(new);
        let user_id = request.user_id.clone();
        let response = self
            .shared
            .caller
            .write("CreateSession", request, |mut stub, req| async move {
                stub.create_session(req).await
            })
            .await?;
        // Sessions evicted to make room are ended now for this client's
        // cache too, not only once the stream says so.
        for token_id in &response.evicted_token_ids {
            self.forget(Revocation {
                user_id: user_id.clone(),
                token_id: Some(token_id.clone()),
                revoked_at: None,
            });
        }
        types::created_from_proto(response)
    }

    /// Rotates a family's session: the refresh of a login. In one atomic step
    /// the presented session (`rotation.token_id`) is revoked and a new one,
    /// `rotation.new_token_id`, becomes the family's live session; the
    /// [`RotateOutcome`] says which case applied and what to do.
    ///
    /// The presented session is gone from this client's
    /// [near-cache](Builder::near_cache) once this returns, whatever the
    /// outcome, or fails, or its future is dropped (it is forgotten before
    /// the request is sent and again after, as
    /// [`revoke_session`](Self::revoke_session) does); on
    /// [`RotateOutcome::ReuseDetected`] every cached session of the family is
    /// dropped too. Other clients' near-caches learn it from their
    /// revocation stream.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]). Repeating a call whose outcome is unknown is
    /// safe with the same `new_token_id`: when the first took effect, the
    /// repeat answers [`RotateOutcome::AlreadyRotated`] with the same
    /// successor, as long as it comes within the server's ROTATION_GRACE_MS
    /// (default 30 s). Later, the presented token counts as reused.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`, `family_id`, `token_id`,
    /// `new_token_id` (also when it equals `token_id`), `ttl` or `metadata`;
    /// [`Error::Unavailable`], [`Error::Overloaded`],
    /// [`Error::DeadlineExceeded`] (the rotation may have happened),
    /// [`Error::Unauthenticated`], [`Error::Other`] (also an outcome this
    /// client does not know, as INTERNAL); see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use session_client::{RotateOutcome, Rotation};
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// // From the refresh credential (signed by the auth service), and a new jti.
    /// let (sub, family, jti, new_jti) = ("user-42", "family-id", "jti-7f3a", "jti-8b1c");
    /// match client.rotate_session(Rotation::new(sub, family, jti, new_jti)).await? {
    ///     RotateOutcome::Rotated(session) | RotateOutcome::AlreadyRotated(session) => {
    ///         println!("issue tokens for {}", session.token_id);
    ///     }
    ///     RotateOutcome::ReuseDetected => println!("stolen refresh token: log in again"),
    ///     RotateOutcome::TokenTaken => println!("retry with another jti"),
    ///     _ => println!("log in again"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn rotate_session(&self, rotation: Rotation) -> Result<RotateOutcome> {
        let request = types::rotation_to_proto(rotation);
        let (user_id, family_id) = (request.user_id.clone(), request.family_id.clone());
        let _forget = self.forget_around(Revocation {
            user_id: request.user_id.clone(),
            token_id: Some(request.token_id.clone()),
            revoked_at: None,
        });
        let result = self
            .shared
            .caller
            .write("RotateSession", request, |mut stub, req| async move {
                stub.rotate_session(req).await
            })
            .await;
        let outcome = types::rotate_outcome_from_proto(result?)?;
        if outcome == RotateOutcome::ReuseDetected
            && let Some(cache) = self.near_cache()
        {
            cache.forget_family(&user_id, &family_id);
        }
        Ok(outcome)
    }

    /// Slides a live session's expiry to now + `ttl` (`None`: the server's
    /// SESSION_TTL), never past its family's end: for sessions whose ids are
    /// opaque and do not rotate. Returns the session with its expiry as it
    /// now is, or `None` when it is not live (expired, revoked or unknown).
    ///
    /// Cheap to call on every request: the server writes only when the
    /// expiry would move by more than a tenth of `ttl`, and otherwise answers
    /// the session unchanged. A `ttl` shorter than the time left moves the
    /// expiry earlier.
    ///
    /// With the [near-cache](Builder::near_cache) on, a cached entry for the
    /// session never keeps an expiry later than the answer's (it takes the
    /// earlier of the two, and is fetched again once that passes); it is
    /// dropped when the session is not live, or when the call fails or its
    /// future is dropped (the expiry may have moved).
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]); repeating a call whose outcome is unknown is
    /// safe.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`, `token_id` or `ttl` (not
    /// positive, not a whole number of milliseconds, or above the server's
    /// SESSION_TTL_MAX); [`Error::Unavailable`], [`Error::Overloaded`],
    /// [`Error::DeadlineExceeded`] (the expiry may have moved),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let ttl = Some(Duration::from_secs(1800));
    /// match client.extend_session("user-42", "opaque-session-id", ttl).await? {
    ///     Some(session) => println!("alive until {:?}", session.expires_at),
    ///     None => println!("signed out"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn extend_session(
        &self,
        user_id: impl Into<String>,
        token_id: impl Into<String>,
        ttl: Option<Duration>,
    ) -> Result<Option<Session>> {
        let request = types::extension_to_proto(user_id.into(), token_id.into(), ttl);
        // Until an answer is applied, the call's end (an error, or its
        // future dropped) drops the cached entry.
        let pending = self.near_cache().map(|cache| ExtendOnDrop {
            cache: cache.clone(),
            token_id: request.token_id.clone(),
            answered: false,
        });
        let response = self
            .shared
            .caller
            .write("ExtendSession", request, |mut stub, req| async move {
                stub.extend_session(req).await
            })
            .await?;
        let session = response
            .session
            .map(types::session_from_proto)
            .transpose()?;
        if let Some(pending) = pending {
            pending.answered(session.as_ref());
        }
        Ok(session)
    }

    /// Looks a session up by token id: `None` when it is expired, revoked or
    /// unknown. The call to make on every authenticated request.
    ///
    /// With the [near-cache](Builder::near_cache) on, a session found before
    /// may be answered from memory, within the staleness bound stated there.
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `token_id`; [`Error::Unavailable`] or
    /// [`Error::Overloaded`] once the
    /// attempts or the budget are used up; [`Error::DeadlineExceeded`],
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let alive = client.get_session("jti-7f3a").await?.is_some();
    /// # let _ = alive;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_session(&self, token_id: impl Into<String>) -> Result<Option<Session>> {
        self.get(pb::GetSessionRequest {
            token_id: token_id.into(),
            user_id: String::new(),
        })
        .await
    }

    /// Looks a session up by token id and its owner (the JWT's `sub`): one
    /// Redis command instead of two. A session of another user is not found.
    ///
    /// With the [near-cache](Builder::near_cache) on, a session found before
    /// may be answered from memory, within the staleness bound stated there.
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`get_session`](Self::get_session), and [`Error::InvalidArgument`]
    /// naming `user_id`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let session = client.get_user_session("user-42", "jti-7f3a").await?;
    /// # let _ = session;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_user_session(
        &self,
        user_id: impl Into<String>,
        token_id: impl Into<String>,
    ) -> Result<Option<Session>> {
        self.get(pb::GetSessionRequest {
            token_id: token_id.into(),
            user_id: user_id.into(),
        })
        .await
    }

    /// A lookup, answered by the near-cache when it may, else by the server;
    /// a live answer fills the cache unless a revocation, reset or loss of
    /// the stream that may concern it arrived while the call was in flight.
    async fn get(&self, request: pb::GetSessionRequest) -> Result<Option<Session>> {
        let Some(cache) = self.near_cache() else {
            return self.fetch(request).await;
        };
        let user = (!request.user_id.is_empty()).then_some(request.user_id.as_str());
        if let Some(session) = cache.lookup(&request.token_id, user) {
            return Ok(Some(session));
        }
        self.fetch_and_fill(cache, request).await
    }

    /// The server's answer to a lookup the near-cache missed, cached when
    /// live (unless something that may concern it arrived meanwhile).
    async fn fetch_and_fill(
        &self,
        cache: &Arc<NearCache>,
        request: pb::GetSessionRequest,
    ) -> Result<Option<Session>> {
        let user = (!request.user_id.is_empty()).then_some(request.user_id.as_str());
        // Registered before the call is sent: see `near_cache`.
        let fill = cache.begin_fill(&request.token_id, user);
        let found = self.fetch(request).await?;
        if let Some(session) = &found {
            fill.complete(session);
        }
        Ok(found)
    }

    /// [`get_user_session`](Self::get_user_session)'s near-cache lookup
    /// alone, from borrowed ids: the tower layer's fast path, which needs no
    /// future and no owned ids when it hits. `None` when the cache is off or
    /// does not hold the session live (counted as a miss): follow with
    /// [`get_user_session_uncached`](Self::get_user_session_uncached).
    #[cfg(feature = "tower")]
    pub(crate) fn cached_user_session(&self, user_id: &str, token_id: &str) -> Option<Session> {
        self.near_cache()?.lookup(token_id, Some(user_id))
    }

    /// [`get_user_session`](Self::get_user_session) after
    /// [`cached_user_session`](Self::cached_user_session) missed: asks the
    /// server, and fills the near-cache (when on) with a live answer.
    #[cfg(feature = "tower")]
    pub(crate) async fn get_user_session_uncached(
        &self,
        user_id: String,
        token_id: String,
    ) -> Result<Option<Session>> {
        let request = pb::GetSessionRequest { token_id, user_id };
        match self.near_cache() {
            Some(cache) => self.fetch_and_fill(cache, request).await,
            None => self.fetch(request).await,
        }
    }

    async fn fetch(&self, request: pb::GetSessionRequest) -> Result<Option<Session>> {
        let response = self
            .shared
            .caller
            .read("GetSession", request, |mut stub, req| async move {
                stub.get_session(req).await
            })
            .await?;
        response.session.map(types::session_from_proto).transpose()
    }

    /// Revokes one session (logout). Returns whether a live session was
    /// revoked; once it returns, [`get_session`](Self::get_session) no longer
    /// finds it: through the server, and through this client's
    /// [near-cache](Builder::near_cache), which forgets the session before
    /// the request is sent and again when the call returns (whatever its
    /// outcome) or its future is dropped. Other clients' near-caches
    /// learn it from their revocation stream, within the bound stated there.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `token_id`; [`Error::Unavailable`],
    /// [`Error::Overloaded`], [`Error::DeadlineExceeded`] (the revocation may have happened),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let revoked = client.revoke_session("jti-7f3a").await?;
    /// # let _ = revoked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_session(&self, token_id: impl Into<String>) -> Result<bool> {
        self.revoke(pb::RevokeSessionRequest {
            token_id: token_id.into(),
            user_id: String::new(),
        })
        .await
    }

    /// Revokes one session given its owner too: one Redis command fewer. A
    /// session of another user is left alone (returns `false`).
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`revoke_session`](Self::revoke_session), and
    /// [`Error::InvalidArgument`] naming `user_id`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let revoked = client.revoke_user_session("user-42", "jti-7f3a").await?;
    /// # let _ = revoked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_user_session(
        &self,
        user_id: impl Into<String>,
        token_id: impl Into<String>,
    ) -> Result<bool> {
        self.revoke(pb::RevokeSessionRequest {
            token_id: token_id.into(),
            user_id: user_id.into(),
        })
        .await
    }

    async fn revoke(&self, request: pb::RevokeSessionRequest) -> Result<bool> {
        let revocation = Revocation {
            user_id: request.user_id.clone(),
            token_id: Some(request.token_id.clone()),
            revoked_at: None,
        };
        let _forget = self.forget_around(revocation);
        let result = self
            .shared
            .caller
            .write("RevokeSession", request, |mut stub, req| async move {
                stub.revoke_session(req).await
            })
            .await;
        Ok(result?.revoked)
    }

    /// Applies a revocation made through this client to its near-cache, as
    /// if the stream had delivered it (which it will, later).
    fn forget(&self, revocation: Revocation) {
        if let Some(cache) = self.near_cache() {
            cache.apply(&[revocation]);
        }
    }

    /// Applies a revocation about to be sent to the near-cache now, and again
    /// when the returned guard is dropped: when the call returns, whatever
    /// its outcome (a failed call may have revoked), or when its future is
    /// dropped mid-call (a caller's timeout, a `select!`), since the request
    /// may have reached the server either way.
    ///
    /// Before: the entry is gone and the calls in flight for it lose their
    /// fill even if the caller never sees the answer. After: a lookup that
    /// read the session in Redis before the revoke and filled the cache while
    /// it was in flight is dropped too (the stream would drop it, but only
    /// within its delivery latency).
    fn forget_around(&self, revocation: Revocation) -> Option<ForgetOnDrop> {
        let cache = self.near_cache()?.clone();
        cache.apply(std::slice::from_ref(&revocation));
        Some(ForgetOnDrop { cache, revocation })
    }

    /// Revokes every live session of a user ("sign out everywhere"); returns
    /// how many there were. Once it returns, no session of the user that
    /// existed before the call is valid, nor found in this client's
    /// [near-cache](Builder::near_cache) (see
    /// [`revoke_session`](Self::revoke_session) for other clients').
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`; [`Error::Unavailable`],
    /// [`Error::Overloaded`], [`Error::DeadlineExceeded`] (some or all may have been revoked),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let signed_out = client.revoke_all_user_sessions("user-42").await?;
    /// println!("ended {signed_out} sessions");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_all_user_sessions(&self, user_id: impl Into<String>) -> Result<u32> {
        let request = pb::RevokeAllUserSessionsRequest {
            user_id: user_id.into(),
        };
        // No revoked_at: every cached session of the user is dropped, those
        // created after the call too (they are fetched again).
        let revocation = Revocation {
            user_id: request.user_id.clone(),
            token_id: None,
            revoked_at: None,
        };
        let _forget = self.forget_around(revocation);
        let result = self
            .shared
            .caller
            .write(
                "RevokeAllUserSessions",
                request,
                |mut stub, req| async move { stub.revoke_all_user_sessions(req).await },
            )
            .await;
        Ok(result?.revoked_count)
    }

    /// Counts a user's live sessions exactly (never an expired or revoked
    /// one).
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`; [`Error::Unavailable`] or
    /// [`Error::Overloaded`] once the
    /// attempts or the budget are used up; [`Error::DeadlineExceeded`],
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let devices = client.get_user_session_count("user-42").await?;
    /// # let _ = devices;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_user_session_count(&self, user_id: impl Into<String>) -> Result<u32> {
        let request = pb::GetUserSessionCountRequest {
            user_id: user_id.into(),
        };
        let response = self
            .shared
            .caller
            .read("GetUserSessionCount", request, |mut stub, req| async move {
                stub.get_user_session_count(req).await
            })
            .await?;
        Ok(response.count)
    }

    /// Lists a user's live sessions, newest first (for an "active devices"
    /// page).
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`get_user_session_count`](Self::get_user_session_count).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// for session in client.list_user_sessions("user-42").await? {
    ///     println!("{} from {:?}", session.token_id, session.metadata.get("ip"));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_user_sessions(&self, user_id: impl Into<String>) -> Result<Vec<Session>> {
        let request = pb::ListUserSessionsRequest {
            user_id: user_id.into(),
        };
        let response = self
            .shared
            .caller
            .read("ListUserSessions", request, |mut stub, req| async move {
                stub.list_user_sessions(req).await
            })
            .await?;
        response
            .sessions
            .into_iter()
            .map(types::session_from_proto)
            .collect()
    }

    /// Counts one login attempt from a client address (IPv4, or IPv6 counted
    /// per the server's RATE_LIMIT_IPV6_PREFIX network) and says whether it
    /// may proceed. Without an account, a reset clears everything the address
    /// did: prefer [`record_login_attempt_for`](Self::record_login_attempt_for)
    /// when the account is known.
    ///
    /// Retried only when the server provably never processed the request
    /// (each attempt counts, so a repeat after it may have reached the
    /// server would count twice).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ip`; [`Error::Unavailable`],
    /// [`Error::Overloaded`], [`Error::DeadlineExceeded`] (the attempt may
    /// have been counted),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let verdict = client.record_login_attempt("192.0.2.1").await?;
    /// if let Some(wait) = verdict.retry_after {
    ///     println!("too many attempts; retry in {} s", wait.as_secs());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt(&self, ip: impl Into<String>) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), String::new(), String::new())
            .await
    }

    /// Counts one login attempt from a client address for an account (login
    /// name, email or user id; any UTF-8 up to 256 bytes, sent as is and
    /// hashed by the server), against the address's limit and the account's
    /// together; [`LoginAttempt::refused_by`] says which refused. Call it
    /// before checking the password, and after a successful login call
    /// [`reset_login_attempts_for`](Self::reset_login_attempts_for) with the
    /// same account.
    ///
    /// Retried only when the server provably never processed the request, as
    /// [`record_login_attempt`](Self::record_login_attempt).
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt`](Self::record_login_attempt), and
    /// [`Error::InvalidArgument`] naming `account` when it is over 256 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let verdict = client
    ///     .record_login_attempt_for("192.0.2.1", "alice@example.com")
    ///     .await?;
    /// if !verdict.allowed {
    ///     println!("refused by {:?}", verdict.refused_by);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt_for(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
    ) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), account.into(), String::new())
            .await
    }

    /// As [`record_login_attempt_for`](Self::record_login_attempt_for),
    /// presenting the device token an earlier successful login of this
    /// account issued to this client (read from its cookie). When the token
    /// is valid for the account, the attempt counts against that device alone
    /// ([`LoginAttempt::device_trusted`]), so an attacker who locked the
    /// account or the address does not lock its owner out; otherwise it
    /// counts as without a token (never an error). An empty token is none.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for), and
    /// [`Error::InvalidArgument`] naming `device_token` when it is over 256
    /// bytes or not printable ASCII.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient, cookie: &str) -> session_client::Result<()> {
    /// let verdict = client
    ///     .record_login_attempt_with_device("192.0.2.1", "alice@example.com", cookie)
    ///     .await?;
    /// if !verdict.allowed {
    ///     println!("refused by {:?}", verdict.refused_by);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt_with_device(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
        device_token: impl Into<String>,
    ) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), account.into(), device_token.into())
            .await
    }

    async fn login_attempt(
        &self,
        ip: String,
        account: String,
        device_token: String,
    ) -> Result<LoginAttempt> {
        let request = pb::RecordLoginAttemptRequest {
            ip,
            account,
            device_token,
        };
        let response = self
            .shared
            .caller
            .write("RecordLoginAttempt", request, |mut stub, req| async move {
                stub.record_login_attempt(req).await
            })
            .await?;
        types::login_attempt_from_proto(response)
    }

    /// Clears a client address's whole login attempt counter. Returns whether
    /// a counter existed.
    ///
    /// Weaker than [`reset_login_attempts_for`](Self::reset_login_attempts_for):
    /// a client that owns any account can clear its guesses against other
    /// accounts by logging in to its own. Use it only when the account is
    /// unknown.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt`](Self::record_login_attempt).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// client.reset_login_attempts("192.0.2.1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts(&self, ip: impl Into<String>) -> Result<bool> {
        self.reset_login(ip.into(), String::new(), String::new(), false)
            .await
            .map(|reset| reset.reset)
    }

    /// After a successful login: clears the account's counter and the
    /// address's attempts for that account only; what the address did against
    /// other accounts stays counted. Returns whether any attempt was cleared.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// client
    ///     .reset_login_attempts_for("192.0.2.1", "alice@example.com")
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts_for(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
    ) -> Result<bool> {
        self.reset_login(ip.into(), account.into(), String::new(), false)
            .await
            .map(|reset| reset.reset)
    }

    /// After a successful login: as
    /// [`reset_login_attempts_for`](Self::reset_login_attempts_for), with the
    /// device token the login presented (empty for none), and issuing a new
    /// one when `issue_device_token` is set ([`LoginReset::device_token`]:
    /// set it as this account's HttpOnly, Secure cookie). A valid token
    /// presented clears only that device's attempts (a login from a trusted
    /// device proves nothing about the others) and, with an issue, is
    /// replaced by the new one.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_with_device`](Self::record_login_attempt_with_device).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient, cookie: &str) -> session_client::Result<()> {
    /// let outcome = client
    ///     .reset_login_attempts_with_device("192.0.2.1", "alice@example.com", cookie, true)
    ///     .await?;
    /// if let Some(token) = outcome.device_token {
    ///     // Set-Cookie: __Host-device=<token>; HttpOnly; Secure; SameSite=Strict; Path=/
    ///     # let _ = token;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts_with_device(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
        device_token: impl Into<String>,
        issue_device_token: bool,
    ) -> Result<LoginReset> {
        self.reset_login(
            ip.into(),
            account.into(),
            device_token.into(),
            issue_device_token,
        )
        .await
    }

    async fn reset_login(
        &self,
        ip: String,
        account: String,
        device_token: String,
        issue_device_token: bool,
    ) -> Result<LoginReset> {
        let request = pb::ResetLoginAttemptsRequest {
            ip,
            account,
            issue_device_token,
            device_token,
        };
        let response = self
            .shared
            .caller
            .write("ResetLoginAttempts", request, |mut stub, req| async move {
                stub.reset_login_attempts(req).await
            })
            .await?;
        Ok(LoginReset {
            reset: response.reset,
            device_token: Some(response.device_token).filter(|token| !token.is_empty()),
        })
    }

    /// Forgets every device token of an account (after a password reset, or
    /// when its owner says "this wasn't me"): each is untrusted from now on.
    /// Returns how many unexpired tokens were forgotten.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let forgotten = client.forget_login_devices("alice@example.com").await?;
    /// # let _ = forgotten;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn forget_login_devices(&self, account: impl Into<String>) -> Result<u32> {
        let request = pb::ForgetLoginDevicesRequest {
            account: account.into(),
        };
        let response = self
            .shared
            .caller
            .write("ForgetLoginDevices", request, |mut stub, req| async move {
                stub.forget_login_devices(req).await
            })
            .await?;
        Ok(response.forgotten)
    }
}

/// Applies its revocation to the near-cache when dropped; see
/// [`SessionClient::forget_around`].
struct ForgetOnDrop {
    cache: Arc<NearCache>,
    revocation: Revocation,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.cache
            .apply_again(std::slice::from_ref(&self.revocation));
    }
}

/// An ExtendSession in flight for a cached token: drops the entry when the
/// call ends without an answer applied (its outcome is unknown); see
/// [`SessionClient::extend_session`].
struct ExtendOnDrop {
    cache: Arc<NearCache>,
    token_id: String,
    answered: bool,
}

impl ExtendOnDrop {
    /// Applies the server's answer instead.
    fn answered(mut self, session: Option<&Session>) {
        self.cache.extended(&self.token_id, session);
        self.answered = true;
    }
}

impl Drop for ExtendOnDrop {
    fn drop(&mut self) {
        if !self.answered {
            self.cache.extended(&self.token_id, None);
        }
    }
}

impl fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let caller = &self.shared.caller;
        f.debug_struct("SessionClient")
            .field("endpoints", &caller.pool)
            .field("auth", &caller.auth)
            .field("policy", &caller.policy)
            .field("retry_budget", &caller.throttle)
            .field("near_cache", &self.near_cache())
            .finish()
    }
}
