//! The `sessionstore.v1.SessionStore` gRPC service: thin handlers that
//! validate, convert, call the store and convert back.

use sessionstore::v1::{self as pb, session_store_server::SessionStore};
use tonic::{Request, Response, Status, codegen::BoxStream};

use crate::{
    convert,
    metrics::{
        LOGIN_ATTEMPTS, LOGIN_DEVICE_ATTEMPTS, ROTATIONS, SESSIONS_CREATED, SESSIONS_EVICTED,
        SESSIONS_REFUSED, SESSIONS_REVOKED,
    },
    model::{ClientAddr, CreateOutcome, RotateOutcome},
    store::Store,
    watch::RevocationStream,
};

/// The gRPC service over a [`Store`].
#[derive(Clone, Debug)]
pub struct SessionService {
    store: Store,
}

impl SessionService {
    /// Serves requests from `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl SessionStore for SessionService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let new = convert::new_session(request.into_inner())?;
        let user = new.user_id.clone();
        let token = new.token_id.redacted();
        let refused = |reason: &'static str, outcome: pb::CreateOutcome| {
            metrics::counter!(SESSIONS_REFUSED, "reason" => reason).increment(1);
            pb::CreateSessionResponse {
                outcome: outcome.into(),
                ..Default::default()
            }
        };
        let response = match self.store.create_session(new).await? {
            CreateOutcome::Created { session, evicted } => {
                tracing::debug!(%user, %token, evicted = evicted.len(), "session created");
                metrics::counter!(SESSIONS_CREATED).increment(1);
                metrics::counter!(SESSIONS_EVICTED).increment(evicted.len() as u64);
                pb::CreateSessionResponse {
                    created: true,
                    session: Some(convert::session_to_proto(session)),
                    evicted_token_ids: evicted,
                    outcome: pb::CreateOutcome::Created.into(),
                }
            }
            CreateOutcome::AlreadyExists { session } => pb::CreateSessionResponse {
                session: Some(convert::session_to_proto(session)),
                ..refused("already_exists", pb::CreateOutcome::AlreadyExists)
            },
            CreateOutcome::TokenTaken => refused("token_taken", pb::CreateOutcome::TokenTaken),
            CreateOutcome::TokenRevoked => {
                tracing::info!(%user, %token, "create refused: the token id was revoked");
                refused("token_revoked", pb::CreateOutcome::TokenRevoked)
            }
            CreateOutcome::LimitReached => {
                refused("limit_reached", pb::CreateOutcome::LimitReached)
            }
        };
        Ok(Response::new(response))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let req = request.into_inner();
        let token = convert::token_id(req.token_id)?;
        let hint = convert::user_hint(req.user_id)?;
        let session = self.store.get_session(token, hint).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: session.map(convert::session_to_proto),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let req = request.into_inner();
        let token = convert::token_id(req.token_id)?;
        let hint = convert::user_hint(req.user_id)?;
        let revoked = self.store.revoke_session(&token, hint.as_ref()).await?;
        metrics::counter!(SESSIONS_REVOKED, "how" => "single").increment(u64::from(revoked));
        Ok(Response::new(pb::RevokeSessionResponse { revoked }))
    }

    async fn revoke_all_user_sessions(
        &self,
        request: Request<pb::RevokeAllUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeAllUserSessionsResponse>, Status> {
        let user = convert::user_id(request.into_inner().user_id)?;
        let revoked_count = self.store.revoke_all_user_sessions(&user).await?;
        metrics::counter!(SESSIONS_REVOKED, "how" => "all").increment(u64::from(revoked_count));
        Ok(Response::new(pb::RevokeAllUserSessionsResponse {
            revoked_count,
        }))
    }

    async fn revoke_other_user_sessions(
        &self,
        request: Request<pb::RevokeOtherUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeOtherUserSessionsResponse>, Status> {
        let request = request.into_inner();
        let user = convert::user_id(request.user_id)?;
        let keep = convert::token_id(request.token_id)?;
        let revoked = self.store.revoke_other_user_sessions(&user, &keep).await?;
        let revoked_count = revoked.unwrap_or(0);
        metrics::counter!(SESSIONS_REVOKED, "how" => "others").increment(u64::from(revoked_count));
        Ok(Response::new(pb::RevokeOtherUserSessionsResponse {
            kept: revoked.is_some(),
            revoked_count,
        }))
    }

    async fn rotate_session(
        &self,
        request: Request<pb::RotateSessionRequest>,
    ) -> Result<Response<pb::RotateSessionResponse>, Status> {
        let rotation = convert::rotation(request.into_inner())?;
        let outcome = self.store.rotate_session(rotation).await?;
        let (label, outcome, session) = match outcome {
            RotateOutcome::Rotated { session } => {
                ("rotated", pb::RotateOutcome::Rotated, Some(session))
            }
            RotateOutcome::AlreadyRotated { session } => (
                "already_rotated",
                pb::RotateOutcome::AlreadyRotated,
                Some(session),
            ),
            // REUSE_DETECTED is counted by the store where it detects it,
            // also when the answer becomes UNAVAILABLE for want of replicas.
            RotateOutcome::ReuseDetected { .. } => {
                ("reuse_detected", pb::RotateOutcome::ReuseDetected, None)
            }
            RotateOutcome::NotFound => ("not_found", pb::RotateOutcome::NotFound, None),
            RotateOutcome::TokenTaken => ("token_taken", pb::RotateOutcome::TokenTaken, None),
        };
        metrics::counter!(ROTATIONS, "outcome" => label).increment(1);
        Ok(Response::new(pb::RotateSessionResponse {
            outcome: outcome.into(),
            session: session.map(convert::session_to_proto),
        }))
    }

    async fn extend_session(
        &self,
        request: Request<pb::ExtendSessionRequest>,
    ) -> Result<Response<pb::ExtendSessionResponse>, Status> {
        let (user, token, ttl) = convert::extension(request.into_inner())?;
        let session = self.store.extend_session(&user, &token, ttl).await?;
        Ok(Response::new(pb::ExtendSessionResponse {
            session: session.map(convert::session_to_proto),
        }))
    }

    async fn get_user_session_count(
        &self,
        request: Request<pb::GetUserSessionCountRequest>,
    ) -> Result<Response<pb::GetUserSessionCountResponse>, Status> {
        let user = convert::user_id(request.into_inner().user_id)?;
        let count = self.store.count_user_sessions(&user).await?;
        Ok(Response::new(pb::GetUserSessionCountResponse { count }))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        let user = convert::user_id(request.into_inner().user_id)?;
        let sessions = self.store.list_user_sessions(&user).await?;
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(convert::session_to_proto)
                .collect(),
        }))
    }

    async fn record_login_attempt(
        &self,
        request: Request<pb::RecordLoginAttemptRequest>,
    ) -> Result<Response<pb::RecordLoginAttemptResponse>, Status> {
        let request = request.into_inner();
        let prefix = self.store.settings().rate_limit_ipv6_prefix;
        let addr = ClientAddr::parse_with_prefix(&request.ip, prefix)?;
        let account = convert::account(&request.account)?;
        let device = convert::device_token(&request.device_token)?;
        let verdict = self
            .store
            .record_login_attempt(&addr, account.as_ref(), device.as_ref())
            .await?;
        let result = if verdict.allowed {
            "allowed"
        } else {
            "refused"
        };
        metrics::counter!(LOGIN_ATTEMPTS, "result" => result).increment(1);
        if verdict.device_trusted {
            metrics::counter!(LOGIN_DEVICE_ATTEMPTS, "result" => result).increment(1);
        }
        Ok(Response::new(convert::verdict_to_proto(verdict)))
    }

    async fn reset_login_attempts(
        &self,
        request: Request<pb::ResetLoginAttemptsRequest>,
    ) -> Result<Response<pb::ResetLoginAttemptsResponse>, Status> {
        let request = request.into_inner();
        let prefix = self.store.settings().rate_limit_ipv6_prefix;
        let addr = ClientAddr::parse_with_prefix(&request.ip, prefix)?;
        let account = convert::account(&request.account)?;
        let device = convert::device_token(&request.device_token)?;
        let outcome = self
            .store
            .reset_login_attempts(
                &addr,
                account.as_ref(),
                device.as_ref(),
                request.issue_device_token,
            )
            .await?;
        Ok(Response::new(pb::ResetLoginAttemptsResponse {
            reset: outcome.reset,
            device_token: outcome
                .device_token
                .map(|token| token.as_str().to_owned())
                .unwrap_or_default(),
        }))
    }

    async fn forget_login_devices(
        &self,
        request: Request<pb::ForgetLoginDevicesRequest>,
    ) -> Result<Response<pb::ForgetLoginDevicesResponse>, Status> {
        let request = request.into_inner();
        let account = convert::account(&request.account)?
            .ok_or_else(|| crate::error::Error::invalid("account", "must not be empty"))?;
        let forgotten = self.store.forget_login_devices(&account).await?;
        Ok(Response::new(pb::ForgetLoginDevicesResponse { forgotten }))
    }

    async fn watch_revocations(
        &self,
        _request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<BoxStream<pb::WatchRevocationsResponse>>, Status> {
        Ok(Response::new(Box::pin(RevocationStream::new(
            self.store.watch_revocations(),
        ))))
    }
}
