//! Revocations through [`SessionClient`] (logout, "sign out everywhere"),
//! and how a revocation made here reaches this client's near-cache before
//! the call returns: applied before the request is sent and again when the
//! call ends, whatever its outcome.

use std::sync::Arc;

use sessionstore::v1 as pb;

#[cfg(doc)]
use crate::{builder::Builder, error::Error};
use crate::{
    error::Result,
    near_cache::{NearCache, Revocation},
};

use super::SessionClient;

impl SessionClient {
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
    pub(super) fn forget(&self, revocation: Revocation) {
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
    pub(super) fn forget_around(&self, revocation: Revocation) -> Option<ForgetOnDrop> {
        let cache = self.near_cache()?.clone();
        cache.apply(std::slice::from_ref(&revocation));
        Some(ForgetOnDrop { cache, revocation })
    }

    /// [`forget_around`](Self::forget_around) for every cached session of
    /// `user_id`: no `revoked_at`, so those created after the call are
    /// dropped too (they are fetched again).
    fn forget_user_around(&self, user_id: &str) -> Option<ForgetOnDrop> {
        self.forget_around(Revocation {
            user_id: user_id.to_owned(),
            token_id: None,
            revoked_at: None,
        })
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
        let _forget = self.forget_user_around(&request.user_id);
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

    /// Revokes every live session of a user but one ("sign out other
    /// devices"): `token_id`, usually the caller's own session, and its
    /// family (a rotation of it racing the call) go on. Returns how many
    /// sessions were revoked, or `None` when `token_id` is not a live session
    /// of the user (expired, revoked, unknown or another user's): then
    /// nothing was revoked. Once it returns, no other session of the user
    /// that existed before the call is valid, nor found in this client's
    /// [near-cache](Builder::near_cache), which drops every session of the
    /// user around the call (the kept one is fetched again); see
    /// [`revoke_session`](Self::revoke_session) for other clients'.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `user_id` or `token_id`;
    /// [`Error::Unavailable`], [`Error::Overloaded`],
    /// [`Error::DeadlineExceeded`] (some or all may have been revoked),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see
    /// [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// match client.revoke_other_user_sessions("user-42", "jti-7f3a").await? {
    ///     Some(ended) => println!("signed out {ended} other sessions"),
    ///     None => println!("this session has ended: sign in again"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_other_user_sessions(
        &self,
        user_id: impl Into<String>,
        token_id: impl Into<String>,
    ) -> Result<Option<u32>> {
        let request = pb::RevokeOtherUserSessionsRequest {
            user_id: user_id.into(),
            token_id: token_id.into(),
        };
        // Which sessions end is known only to the server: the kept one is
        // dropped too, and fetched again.
        let _forget = self.forget_user_around(&request.user_id);
        let result = self
            .shared
            .caller
            .write(
                "RevokeOtherUserSessions",
                request,
                |mut stub, req| async move { stub.revoke_other_user_sessions(req).await },
            )
            .await?;
        Ok(result.kept.then_some(result.revoked_count))
    }
}

/// Applies its revocation to the near-cache when dropped; see
/// [`SessionClient::forget_around`].
pub(super) struct ForgetOnDrop {
    cache: Arc<NearCache>,
    revocation: Revocation,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.cache
            .apply_again(std::slice::from_ref(&self.revocation));
    }
}
