//! A session's life through [`SessionClient`]: create, rotate (a login's
//! refresh) and extend, each a write, with the near-cache kept true around
//! them.

use std::{collections::HashMap, sync::Arc, time::Duration};

#[cfg(doc)]
use crate::{builder::Builder, error::Error};
use crate::{
    error::Result,
    near_cache::{NearCache, Revocation},
    types::{self, Created, NewSession, RotateOutcome, Rotation, Session},
};

use super::SessionClient;

impl SessionClient {
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
