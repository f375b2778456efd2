//! The reads of [`SessionClient`]: a session by token id (answered by the
//! near-cache when it may, and filling it), a user's session count and list.

use std::sync::Arc;

use sessionstore::v1 as pb;

#[cfg(doc)]
use crate::{builder::Builder, error::Error};
use crate::{
    error::{Error as ClientError, Result},
    near_cache::{CompactSession, NearCache, SessionView},
    types::{self, Session},
};

use super::SessionClient;

impl SessionClient {
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
        self.get(String::new(), token_id.into()).await
    }

    /// Looks a session up by token id and its owner (the JWT's `sub`): one
    /// Redis command instead of two. A session of another user is not found.
    ///
    /// With the [near-cache](Builder::near_cache) on, a session found before
    /// may be answered from memory, within the staleness bound stated there.
    /// Where a lookup must be as fast as it can,
    /// [`check_user_session`](Self::check_user_session) answers the same in
    /// one allocation, and [`with_cached_session`](Self::with_cached_session)
    /// reads a hit in place.
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`get_session`](Self::get_session), and [`Error::InvalidArgument`]
    /// naming `user_id`, also when it is empty (a token alone is looked up
    /// with `get_session`).
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
        let user_id = user_id.into();
        required_user(&user_id)?;
        self.get(user_id, token_id.into()).await
    }

    /// [`get_user_session`](Self::get_user_session), answered as a
    /// [`CompactSession`]: the same session (or `None`) with the same checks
    /// and bounds, built in one allocation instead of about ten. On a
    /// near-cache hit over a million cached sessions, about a third faster
    /// than `get_user_session` (BENCHMARKS.md, #28's fourth pass): for the
    /// check made on every request, reading a few fields of the session.
    /// A miss asks the server as `get_user_session` does, fills the
    /// near-cache the same way, and packs the answer.
    ///
    /// Retried on transient failures (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`get_user_session`](Self::get_user_session).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// match client.check_user_session("user-42", "jti-7f3a").await? {
    ///     Some(session) => println!("live until {:?}", session.expires_at()),
    ///     None => println!("expired, revoked or unknown"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check_user_session(
        &self,
        user_id: impl AsRef<str> + Into<String>,
        token_id: impl AsRef<str> + Into<String>,
    ) -> Result<Option<CompactSession>> {
        let user = user_id.as_ref();
        required_user(user)?;
        if let Some(cache) = self.near_cache()
            && let Some(session) = cache.lookup_compact(token_id.as_ref(), Some(user))
        {
            return Ok(Some(session));
        }
        let found = self.get_uncached(user_id.into(), token_id.into()).await?;
        Ok(found.map(CompactSession::from))
    }

    /// Reads a session in the [near-cache](Builder::near_cache) where it
    /// lies, without copying it: `read` is called with a [`SessionView`] of
    /// the cached session, and its result returned, when the near-cache may
    /// answer the lookup [`check_user_session`](Self::check_user_session)
    /// would make (the same checks, in the same place: the revocation stream
    /// healthy, the session live by Redis's clock, owned by `user_id`, within
    /// the staleness bound). `None` when it may not: the cache is off or not
    /// healthy, or the session is not cached, expired, or another user's;
    /// then ask the server with `check_user_session` (which fills the cache),
    /// as the example does. A `None` here says nothing about the session:
    /// it may well be live. Counted in
    /// [`near_cache_stats`](Self::near_cache_stats) as any lookup (so a miss
    /// followed by `check_user_session` counts two misses).
    ///
    /// The fastest lookup this client has, for the check made on every
    /// request: no allocation, no copy, no future (BENCHMARKS.md, #28's
    /// fifth pass). An empty `user_id` is answered `None`: it names no user,
    /// and this is a check of the user's session, not of any user's (a token
    /// alone is looked up with [`get_session`](Self::get_session)).
    ///
    /// **`read` runs with the session's shard of the cache read-locked**:
    /// other lookups go on while nothing waits to change that shard, but a
    /// change that reaches it (a fill, a revocation, every message of the
    /// revocation stream) waits until `read` returns, and while it waits,
    /// lookups of that shard on some other threads, every call that fills
    /// or revokes, and the stream wait with it. Read what is needed and
    /// return; it must not block, sleep or do I/O (it is not async: it
    /// cannot await). Copy the session out with [`SessionView::to_compact`]
    /// or [`SessionView::to_session`] to keep it.
    ///
    /// # Panics
    ///
    /// - When `read` uses this client's near-cache: any lookup, a call that
    ///   fills or revokes, [`near_cache_stats`](Self::near_cache_stats), or
    ///   formatting the client with `{:?}`. That could deadlock whenever a
    ///   change happened to be waiting for the shard `read` holds, so it
    ///   panics every time instead, naming the mistake. Another client's
    ///   near-cache may be used.
    /// - When `read` panics; the panic is passed on. Either way the lookup
    ///   is counted as a hit, and the cache stays consistent and usable
    ///   (nothing in it changes while `read` runs).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let (user, jti) = ("user-42", "jti-7f3a");
    /// // A hit answers from memory; a miss asks the server.
    /// let device = match client.with_cached_session(user, jti, |session| {
    ///     session.metadata_value("device").map(str::to_owned)
    /// }) {
    ///     Some(device) => device,
    ///     None => match client.check_user_session(user, jti).await? {
    ///         Some(session) => session.metadata_value("device").map(str::to_owned),
    ///         None => return Ok(()), // expired, revoked or unknown
    ///     },
    /// };
    /// # let _ = device;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_cached_session<R>(
        &self,
        user_id: &str,
        token_id: &str,
        read: impl FnOnce(SessionView<'_>) -> R,
    ) -> Option<R> {
        if user_id.is_empty() {
            return None;
        }
        self.near_cache()?
            .lookup_view(token_id, Some(user_id), read)
    }

    /// A lookup, answered by the near-cache when it may, else by the server;
    /// a live answer fills the cache unless a revocation, reset or loss of
    /// the stream that may concern it arrived while the call was in flight.
    /// An empty `user_id` names no user (`get_session`).
    async fn get(&self, user_id: String, token_id: String) -> Result<Option<Session>> {
        if let Some(cache) = self.near_cache()
            && let Some(session) =
                cache.lookup(&token_id, (!user_id.is_empty()).then_some(user_id.as_str()))
        {
            return Ok(Some(session));
        }
        self.get_uncached(user_id, token_id).await
    }

    /// A lookup the near-cache missed (or without it): asks the server,
    /// and fills the near-cache (when on) with a live answer.
    async fn get_uncached(&self, user_id: String, token_id: String) -> Result<Option<Session>> {
        let request = pb::GetSessionRequest { token_id, user_id };
        match self.near_cache() {
            Some(cache) => self.fetch_and_fill(cache, request).await,
            None => self.fetch(request).await,
        }
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

    /// [`cached_user_session`](Self::cached_user_session), answering a
    /// [`CompactSession`] ([`check_user_session`](Self::check_user_session)'s
    /// lookup).
    #[cfg(feature = "tower")]
    pub(crate) fn cached_user_session_compact(
        &self,
        user_id: &str,
        token_id: &str,
    ) -> Option<CompactSession> {
        self.near_cache()?.lookup_compact(token_id, Some(user_id))
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
        self.get_uncached(user_id, token_id).await
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
}

/// The user of a lookup that names one (`get_user_session`,
/// `check_user_session`): required. The server reads an empty user id as no
/// user, a lookup by token alone, which would answer a session of whoever
/// owns the token: the check of a JWT without a `sub` would pass.
fn required_user(user_id: &str) -> Result<()> {
    if user_id.is_empty() {
        return Err(ClientError::from(tonic::Status::invalid_argument(
            "invalid user_id: must not be empty",
        )));
    }
    Ok(())
}
