//! [`SessionClient`]: the generated stub wrapped to speak domain types, with
//! per-call deadlines and retries for the calls that are safe to repeat.

use std::{collections::HashMap, future::Future, time::Duration};

use sessionstore::v1::{self as pb, session_store_client::SessionStoreClient};
use tonic::{Response, Status, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    builder::Builder,
    error::{Error, Result},
    metadata::CallMetadata,
    retry::{RetryPolicy, retrying},
    types::{self, Created, LoginAttempt, NewSession, Session},
};

type Stub = SessionStoreClient<InterceptedService<Channel, CallMetadata>>;

/// A handle to SessionStore. Cheap to clone: clones share one tonic
/// [`Channel`] (and so its connections), so make one at start-up and hand
/// clones to every task.
///
/// Reads (get, count, list) are retried on UNAVAILABLE with exponential
/// backoff; writes never are. Every attempt is bounded by the builder's
/// [`timeout`](Builder::timeout).
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
#[derive(Clone, Debug)]
pub struct SessionClient {
    stub: Stub,
    retry: RetryPolicy,
    timeout: Duration,
}

impl SessionClient {
    /// A [`Builder`] for a client of the SessionStore at `endpoint`
    /// (`http://host:port` or `https://host:port`).
    pub fn builder(endpoint: impl Into<String>) -> Builder {
        Builder::new(endpoint)
    }

    /// A client of `endpoint` with every default: lazy connection, 5 s
    /// connect timeout, 2 s per call, 3 attempts for reads.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `endpoint` is not an `http://` or `https://` URL
    /// (see [`Builder::connect`]).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::builder(endpoint).connect().await
    }

    pub(crate) fn new(
        channel: Channel,
        metadata: CallMetadata,
        retry: RetryPolicy,
        timeout: Duration,
    ) -> Self {
        Self {
            stub: SessionStoreClient::with_interceptor(channel, metadata),
            retry,
            timeout,
        }
    }

    /// Stores a new session with the server's default lifetime. Returns
    /// whether it was stored: `false` when the token id already has a live
    /// session (of any user), is still reserved by another user's recently
    /// ended one, or the user is at the session cap under the `reject` policy.
    ///
    /// Never retried.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`, `token_id` or `metadata`;
    /// [`Error::Unavailable`], [`Error::DeadlineExceeded`] (the write may have
    /// happened), [`Error::Unauthenticated`], [`Error::Other`].
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
    /// Never retried.
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
        let response = self
            .write(request, |mut stub, req| async move {
                stub.create_session(req).await
            })
            .await?;
        types::created_from_proto(response)
    }

    /// Looks a session up by token id: `None` when it is expired, revoked or
    /// unknown. The call to make on every authenticated request.
    ///
    /// Retried on UNAVAILABLE.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `token_id`; [`Error::Unavailable`]
    /// once the attempts are used up; [`Error::DeadlineExceeded`],
    /// [`Error::Unauthenticated`], [`Error::Other`].
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
    /// Retried on UNAVAILABLE.
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

    async fn get(&self, request: pb::GetSessionRequest) -> Result<Option<Session>> {
        let response = self
            .read(request, |mut stub, req| async move {
                stub.get_session(req).await
            })
            .await?;
        response.session.map(types::session_from_proto).transpose()
    }

    /// Revokes one session (logout). Returns whether a live session was
    /// revoked; once it returns, [`get_session`](Self::get_session) no longer
    /// finds it.
    ///
    /// Never retried.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `token_id`; [`Error::Unavailable`],
    /// [`Error::DeadlineExceeded`] (the revocation may have happened),
    /// [`Error::Unauthenticated`], [`Error::Other`].
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
    /// Never retried.
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
        let response = self
            .write(request, |mut stub, req| async move {
                stub.revoke_session(req).await
            })
            .await?;
        Ok(response.revoked)
    }

    /// Revokes every live session of a user ("sign out everywhere"); returns
    /// how many there were. Once it returns, no session of the user that
    /// existed before the call is valid.
    ///
    /// Never retried.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`; [`Error::Unavailable`],
    /// [`Error::DeadlineExceeded`] (some or all may have been revoked),
    /// [`Error::Unauthenticated`], [`Error::Other`].
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
        let response = self
            .write(request, |mut stub, req| async move {
                stub.revoke_all_user_sessions(req).await
            })
            .await?;
        Ok(response.revoked_count)
    }

    /// Counts a user's live sessions exactly (never an expired or revoked
    /// one).
    ///
    /// Retried on UNAVAILABLE.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id`; [`Error::Unavailable`]
    /// once the attempts are used up; [`Error::DeadlineExceeded`],
    /// [`Error::Unauthenticated`], [`Error::Other`].
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
    /// Retried on UNAVAILABLE.
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
    /// per /64) and says whether it may proceed.
    ///
    /// Never retried: each attempt counts.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ip`; [`Error::Unavailable`],
    /// [`Error::DeadlineExceeded`] (the attempt may have been counted),
    /// [`Error::Unauthenticated`], [`Error::Other`].
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
        let request = pb::RecordLoginAttemptRequest { ip: ip.into() };
        let response = self
            .write(request, |mut stub, req| async move {
                stub.record_login_attempt(req).await
            })
            .await?;
        types::login_attempt_from_proto(response)
    }

    /// Clears a client address's login attempt counter, typically after a
    /// successful login. Returns whether a counter existed.
    ///
    /// Never retried.
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
        let request = pb::ResetLoginAttemptsRequest { ip: ip.into() };
        let response = self
            .write(request, |mut stub, req| async move {
                stub.reset_login_attempts(req).await
            })
            .await?;
        Ok(response.reset)
    }

    /// A call that is safe to repeat: retried on UNAVAILABLE.
    async fn read<Req, Resp, F, Fut>(&self, request: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Req) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        retrying(&self.retry, || {
            self.attempt(call(self.stub.clone(), request.clone()))
        })
        .await
        .map_err(Error::from)
    }

    /// A call that must not be repeated behind the caller's back: one attempt.
    async fn write<Req, Resp, F, Fut>(&self, request: Req, call: F) -> Result<Resp>
    where
        F: FnOnce(Stub, Req) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.attempt(call(self.stub.clone(), request))
            .await
            .map_err(Error::from)
    }

    /// One attempt, bounded as a whole by the call timeout. tonic's own
    /// timeout starts only once a connection is picked; this one also covers
    /// waiting for one (a balanced channel whose endpoints are all
    /// connecting), so no call outlives its deadline.
    async fn attempt<Resp>(
        &self,
        call: impl Future<Output = Result<Response<Resp>, Status>>,
    ) -> Result<Resp, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(Response::into_inner),
            Err(_elapsed) => Err(Status::deadline_exceeded(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}
