//! [`SessionClient`]: the generated stub wrapped to speak domain types, with
//! a deadline per call, retries for what is safe to repeat, and the pick of
//! an endpoint for each attempt.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use sessionstore::v1::{self as pb, session_store_client::SessionStoreClient};
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    balance::{Member, Pool},
    builder::Builder,
    error::{self, Error, Result},
    metadata::Auth,
    near_cache::{NearCache, NearCacheSettings, NearCacheStats, Revocation, Watcher},
    retry::{RetryPolicy, RetryThrottle, later},
    types::{self, Created, LoginAttempt, NewSession, Session},
};

type Stub = SessionStoreClient<Channel>;

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
/// revoke answers `false`; only a repeated
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
    pool: Arc<Pool>,
    auth: Arc<Auth>,
    policy: CallPolicy,
    throttle: RetryThrottle,
    /// The near-cache and its stream task (aborted when the last clone
    /// drops this), when the builder turned it on.
    near_cache: Option<(Arc<NearCache>, Watcher)>,
}

/// The time and attempt bounds of each call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallPolicy {
    /// The whole call's budget.
    pub(crate) timeout: Duration,
    /// Each attempt's bound within it, if shorter.
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) retry: RetryPolicy,
}

/// Whether a call may be repeated after it reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl SessionClient {
    /// A [`Builder`] for a client of the SessionStore at `endpoint`
    /// (`http://host:port` or `https://host:port`).
    pub fn builder(endpoint: impl Into<String>) -> Builder {
        Builder::new(endpoint)
    }

    /// A client of `endpoint` with every default: lazy connection, 5 s
    /// connect timeout, 2 s per call, up to 3 attempts.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `endpoint` is not an `http://` or `https://` URL
    /// (see [`Builder::connect`]).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::builder(endpoint).connect().await
    }

    /// Must run inside a Tokio runtime when `near_cache` is set: its stream
    /// task is spawned here.
    pub(crate) fn new(
        pool: Arc<Pool>,
        auth: Auth,
        policy: CallPolicy,
        throttle: RetryThrottle,
        near_cache: Option<NearCacheSettings>,
    ) -> Self {
        let auth = Arc::new(auth);
        let near_cache = near_cache.map(|settings| {
            let cache = NearCache::new(settings.max_entries, settings.max_staleness);
            let watcher = Watcher::spawn(
                cache.clone(),
                pool.clone(),
                auth.clone(),
                settings.stream_lifetime,
            );
            (cache, watcher)
        });
        Self {
            shared: Arc::new(Shared {
                pool,
                auth,
                policy,
                throttle,
                near_cache,
            }),
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
        self.shared.auth.set(token.as_ref())
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
            .write(request, |mut stub, req| async move {
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
        // Registered before the call is sent: see `near_cache`.
        let fill = cache.begin_fill(&request.token_id, user);
        let found = self.fetch(request).await?;
        if let Some(session) = &found {
            fill.complete(session);
        }
        Ok(found)
    }

    async fn fetch(&self, request: pb::GetSessionRequest) -> Result<Option<Session>> {
        let response = self
            .read(request, |mut stub, req| async move {
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
            .write(request, |mut stub, req| async move {
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
            .write(request, |mut stub, req| async move {
                stub.revoke_all_user_sessions(req).await
            })
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
            .read(request, |mut stub, req| async move {
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
            .read(request, |mut stub, req| async move {
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
        self.login_attempt(ip.into(), String::new()).await
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
        self.login_attempt(ip.into(), account.into()).await
    }

    async fn login_attempt(&self, ip: String, account: String) -> Result<LoginAttempt> {
        let request = pb::RecordLoginAttemptRequest { ip, account };
        let response = self
            .write(request, |mut stub, req| async move {
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
        self.reset_login(ip.into(), String::new()).await
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
        self.reset_login(ip.into(), account.into()).await
    }

    async fn reset_login(&self, ip: String, account: String) -> Result<bool> {
        let request = pb::ResetLoginAttemptsRequest { ip, account };
        let response = self
            .write(request, |mut stub, req| async move {
                stub.reset_login_attempts(req).await
            })
            .await?;
        Ok(response.reset)
    }

    /// A call that is safe to repeat.
    async fn read<Req, Resp, F, Fut>(&self, request: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.call(Kind::Read, request, call).await
    }

    /// A call that must not be repeated once it may have reached the server.
    async fn write<Req, Resp, F, Fut>(&self, request: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.call(Kind::Write, request, call).await
    }

    /// Runs a call's attempts within its budget: picks an endpoint for each,
    /// sends the time left as `grpc-timeout`, and decides after each failure
    /// whether another attempt may be made (see [`Verdict`]).
    async fn call<Req, Resp, F, Fut>(&self, kind: Kind, request: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let shared = &*self.shared;
        let policy = &shared.policy;
        let deadline = later(policy.timeout);
        // Attempts counted against `max_attempts`; requests that never left
        // are retried on other endpoints without counting, at most once per
        // endpoint.
        let mut attempts = 0;
        let mut free_retries = shared.pool.members().len();
        // gRPC's transparent retry: the first attempt the server provably
        // never processed is repeated at once, free of the attempt count and
        // of the retry budget (a connection aged out under load fails every
        // call queued on it at once: charging those would drain the budget
        // for nothing). Another such failure in the same call is an ordinary
        // retry: counted, charged, paced.
        let mut transparent_retry = true;
        let mut last: Option<(Arc<Member>, Status)> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(out_of_time(policy.timeout, last.map(|(_, s)| s)));
            }
            let budget = policy.attempt_timeout.map_or(left, |t| t.min(left));
            let Some(member) = shared.pool.pick(last.as_ref().map(|(m, _)| m)) else {
                return Err(Error::from(Status::unavailable(
                    "no session store address: the DNS name resolved to none yet",
                )));
            };
            attempts += 1;
            let mut attempt = Request::new(request.clone());
            shared.auth.prepare(&mut attempt, budget);
            let stub = SessionStoreClient::new(member.channel());
            let in_flight = member.start();
            let result = tokio::time::timeout(budget, call(stub, attempt)).await;
            drop(in_flight);
            let status = match result {
                Ok(Ok(response)) => {
                    member.answered();
                    shared.throttle.succeeded();
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => {
                    if error::is_local_timeout(&status) {
                        // tonic's own timer: no answer in time, as below.
                        member.timed_out();
                    } else if !error::is_transport_failure(&status) {
                        // The server answered: its connection works.
                        member.answered();
                    }
                    status
                }
                Err(_elapsed) => {
                    member.timed_out();
                    Status::deadline_exceeded(format!("no answer within {} ms", budget.as_millis()))
                }
            };
            let verdict = Verdict::of(&status, kind);
            // The endpoint itself failed (its connection refused, reset or
            // cut: a server gone) rather than answering: it is ejected, and
            // a retry on another endpoint is free of the retry budget, so
            // that one server dying under load (every call in flight on it
            // failing at once) does not drain the budget and leave those
            // calls unretried. Once no other endpoint is available (the
            // whole backend down), these failures are charged like the rest.
            // A request the server refused or a connection it was closing
            // (its GOAWAY) is not that: the server is there, tonic opens a
            // new connection for the next attempt, and a server that is in
            // fact gone fails that connect (and is ejected then).
            let endpoint_failed = error::is_transport_failure(&status)
                && !error::is_local_timeout(&status)
                && verdict != Verdict::Unprocessed;
            if endpoint_failed || verdict == Verdict::NeverSent {
                member.connect_failed();
            }
            let elsewhere = endpoint_failed && shared.pool.has_other_available(&member);
            let transparent = verdict == Verdict::Unprocessed && transparent_retry;
            if verdict != Verdict::NeverSent
                && !transparent
                && error::is_transient(&status)
                && !elsewhere
            {
                // A sign of trouble on the server side, read or write: the
                // retry budget drains with these, so retries stop when most
                // calls fail.
                shared.throttle.failed();
            }
            let retry = match verdict {
                Verdict::NeverSent if free_retries > 0 => {
                    free_retries -= 1;
                    attempts -= 1;
                    true
                }
                Verdict::NeverSent => attempts < policy.retry.max_attempts,
                Verdict::Unprocessed if transparent => {
                    transparent_retry = false;
                    attempts -= 1;
                    true
                }
                Verdict::Unprocessed | Verdict::Retry => {
                    attempts < policy.retry.max_attempts
                        && (elsewhere || shared.throttle.allows_retry())
                }
                Verdict::Final => false,
            };
            if !retry {
                return Err(Error::from(status));
            }
            // A request that never left goes straight to another endpoint
            // when there is one, and the transparent retry goes at once (to
            // a new connection); anything else waits, so a struggling server
            // is not hammered.
            let pause = if transparent
                || (verdict == Verdict::NeverSent && shared.pool.has_other_available(&member))
            {
                Duration::ZERO
            } else {
                policy.retry.backoff(attempts.max(1))
            };
            if later(pause) >= deadline {
                // No attempt could start within the budget.
                return Err(Error::from(status));
            }
            tokio::time::sleep(pause).await;
            last = Some((member, status));
        }
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

/// What a failed attempt allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The request never left this process (its connection could not be
    /// opened): safe to repeat, read or write.
    NeverSent,
    /// The request may have left, but the server provably never processed
    /// it (see [`error::never_processed`]): safe to repeat, read or write.
    Unprocessed,
    /// A transient failure after the request may have reached the server:
    /// repeated for reads only.
    Retry,
    /// Nothing to retry.
    Final,
}

impl Verdict {
    fn of(status: &Status, kind: Kind) -> Self {
        if error::never_sent(status) {
            return Self::NeverSent;
        }
        if error::never_processed(status) {
            return Self::Unprocessed;
        }
        match kind {
            Kind::Read if error::is_transient(status) => Self::Retry,
            Kind::Read | Kind::Write => Self::Final,
        }
    }
}

/// The error for a call whose budget ran out between attempts: the last
/// attempt's, or a plain deadline.
fn out_of_time(timeout: Duration, last: Option<Status>) -> Error {
    match last {
        Some(status) => Error::from(status),
        None => Error::from(Status::deadline_exceeded(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

impl fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &*self.shared;
        f.debug_struct("SessionClient")
            .field("endpoints", &shared.pool)
            .field("auth", &shared.auth)
            .field("policy", &shared.policy)
            .field("retry_budget", &shared.throttle)
            .field("near_cache", &self.near_cache())
            .finish()
    }
}
