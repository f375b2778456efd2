//! Session families: one login and its rotations. CreateSession starts a
//! family (`family:{user}:{family}`, created in the same step as its first
//! session); RotateSession replaces its current session by a successor in one
//! atomic step; ExtendSession slides a session's expiry. A family is live
//! exactly while its current session is: it ends when that session expires
//! (idle too long), reaches the family's absolute end, or is revoked
//! (RevokeSession, RevokeAllUserSessions, eviction, reuse detection), with no
//! write to the family needed. Its state is O(1): the current token, the
//! previous one and when it was replaced, and the absolute end.
//!
//! A rotation takes a create's three round trips in the same order, so the
//! successor's token id is reserved under the same finality rules (see
//! `sessions` and the store's module docs): `prepare_rotate.lua` in the
//! user's slot decides (and answers ALREADY_ROTATED, REUSE_DETECTED and
//! NOT_FOUND by itself), records the successor's reservation end;
//! `claim_token.lua` claims it in the token's slot; `rotate_session.lua` in
//! the user's slot revokes the presented session and stores the successor.
//! Concurrent rotations of one token all pass the first step, but only one
//! last step finds the presented token current; the others find it the
//! previous one and answer the successor, so a family never branches.

use redis::Value;

use super::{
    Store,
    connection::Op,
    millis,
    sessions::{Reply, parse_session, session_json_head},
};
use crate::{
    error::Error,
    model::{FamilyId, RotateOutcome, Rotation, Session, TokenId, UserId},
};

/// What `prepare_rotate.lua` decided.
enum Decision {
    /// Rotate: the presented session (`current`) is the family's live one.
    Rotate { now_ms: u64, current: Session },
    /// Answered without a rotation.
    Done(RotateOutcome),
    /// The family's current token is another one: ask again declaring it.
    Ask(String),
}

impl Store {
    /// Rotates a family's session: see [`RotateOutcome`] for every answer.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ttl` (as for a create); Redis
    /// failures as [`Error::Unavailable`], [`Error::Timeout`] or
    /// [`Error::OutOfMemory`]. A rotation whose outcome the caller never
    /// learnt is safe to repeat: within ROTATION_GRACE_MS the repeat answers
    /// ALREADY_ROTATED with the same successor. With a positive
    /// REVOCATION_MIN_REPLICAS, ROTATED, ALREADY_ROTATED and REUSE_DETECTED
    /// become [`Error::NotReplicated`] when too few replicas acknowledged
    /// them in time (applied on the master; the repeat waits again).
    pub async fn rotate_session(&self, rotation: Rotation) -> Result<RotateOutcome, Error> {
        let user = rotation.user_id.clone();
        let (outcome, op) = self.rotate(rotation).await?;
        // A rotation revokes the presented token, reuse detection the
        // family's session: both wait for the replicas, and so do the
        // answers a retry of an unreplicated one gets: ALREADY_ROTATED, and
        // NOT_FOUND (reuse detection ended the family).
        match outcome {
            RotateOutcome::Rotated { .. }
            | RotateOutcome::AlreadyRotated { .. }
            | RotateOutcome::ReuseDetected { .. }
            | RotateOutcome::NotFound => self.replicate(op, &user).await?,
            RotateOutcome::TokenTaken => {}
        }
        Ok(outcome)
    }

    /// [`rotate_session`](Self::rotate_session) without the replication
    /// wait.
    /// The operation is handed back, so that the replication wait's proof
    /// goes over the rotation's own connection.
    async fn rotate(&self, rotation: Rotation) -> Result<(RotateOutcome, Op), Error> {
        let ttl_ms = self.ttl_ms(rotation.ttl)?;
        let mut op = self.op("rotate_session").await?;
        // The presented token is believed current until the family says
        // otherwise; each answer "ask again" names the current one, and a
        // family moves on only by a rotation, so this ends within the
        // operation's deadline.
        let mut current = rotation.token_id.as_str().to_owned();
        loop {
            let (now_ms, presented) = match self
                .prepare_rotate(&mut op, &rotation, &current, ttl_ms)
                .await?
            {
                Decision::Done(outcome) => return Ok((outcome, op)),
                Decision::Ask(token) => {
                    current = token;
                    continue;
                }
                Decision::Rotate { now_ms, current } => (now_ms, current),
            };
            if !self
                .claim_token(
                    &mut op,
                    &rotation.user_id,
                    &rotation.new_token_id,
                    ttl_ms,
                    now_ms,
                )
                .await?
            {
                return Ok((RotateOutcome::TokenTaken, op));
            }
            match self
                .commit_rotate(&mut op, &rotation, presented, ttl_ms, now_ms)
                .await?
            {
                Ok(outcome) => return Ok((outcome, op)),
                Err(token) => current = token,
            }
        }
    }

    async fn prepare_rotate(
        &self,
        op: &mut Op,
        rotation: &Rotation,
        current: &str,
        ttl_ms: u64,
    ) -> Result<Decision, Error> {
        let user = &rotation.user_id;
        let new = rotation.new_token_id.as_str();
        let reply: Vec<Value> = op
            .invoke(
                self.shared
                    .scripts
                    .prepare_rotate
                    .key(self.family_key(user, &rotation.family_id))
                    .key(self.session_key(user, current))
                    .key(self.revoked_key(user, current))
                    .key(self.session_key(user, new))
                    .key(self.revoked_key(user, new))
                    .key(self.reservations_key(user))
                    .key(self.index_key(user))
                    .arg(rotation.token_id.as_str())
                    .arg(current)
                    .arg(new)
                    .arg(self.claim_lifetime_ms(ttl_ms))
                    .arg(self.reservation_slack_ms())
                    .arg(millis(self.settings().rotation_grace))
                    .arg(self.reservation_slack_ms())
                    .arg(millis(self.settings().session_ttl_max))
                    .arg(self.revocation_channel())
                    .arg(user.as_str()),
            )
            .await?;
        let mut reply = Reply::new("prepare_rotate.lua", reply);
        let status = reply.int()?;
        let now_ms = reply.millis()?;
        Ok(match status {
            1 => Decision::Rotate {
                now_ms,
                current: parse_session(&reply.string()?)?,
            },
            2 => Decision::Done(RotateOutcome::AlreadyRotated {
                session: parse_session(&reply.string()?)?,
            }),
            3 => {
                let token = reply.string()?;
                if token == current {
                    return Err(reply.malformed());
                }
                Decision::Ask(token)
            }
            4 => {
                metrics::counter!(crate::metrics::REUSE_DETECTED).increment(1);
                tracing::warn!(
                    user = %user,
                    family = %rotation.family_id.log_tag(),
                    "refresh token reuse detected: a token the family had rotated past was \
                     presented; the family's session is revoked"
                );
                Decision::Done(RotateOutcome::ReuseDetected {
                    revoked: current.to_owned(),
                })
            }
            5 => Decision::Done(RotateOutcome::NotFound),
            6 => Decision::Done(RotateOutcome::TokenTaken),
            other => {
                return Err(Error::Internal(
                    format!("prepare_rotate.lua returned status {other}").into(),
                ));
            }
        })
    }

    /// The rotation's last step; `Err(token)` when the family moved on to
    /// `token` since the first step, which must then be asked again.
    async fn commit_rotate(
        &self,
        op: &mut Op,
        rotation: &Rotation,
        presented: Session,
        ttl_ms: u64,
        prepared_at_ms: u64,
    ) -> Result<Result<RotateOutcome, String>, Error> {
        let user = &rotation.user_id;
        let token = rotation.token_id.as_str();
        let new = rotation.new_token_id.as_str();
        // Empty metadata keeps the presented session's.
        let metadata = if rotation.metadata.is_empty() {
            presented.metadata
        } else {
            rotation.metadata.clone()
        };
        let head = session_json_head(
            user,
            &rotation.new_token_id,
            &metadata,
            Some(&rotation.family_id),
        )?;
        let reply: Vec<Value> = op
            .invoke(
                self.shared
                    .scripts
                    .rotate_session
                    .key(self.family_key(user, &rotation.family_id))
                    .key(self.session_key(user, token))
                    .key(self.revoked_key(user, token))
                    .key(self.session_key(user, new))
                    .key(self.revoked_key(user, new))
                    .key(self.index_key(user))
                    .key(self.reservations_key(user))
                    .arg(token)
                    .arg(new)
                    .arg(ttl_ms)
                    .arg(&head)
                    .arg(self.reservation_slack_ms())
                    .arg(millis(self.settings().session_ttl_max))
                    .arg(self.revocation_channel())
                    .arg(user.as_str())
                    .arg(prepared_at_ms.saturating_add(millis(self.settings().timeout)))
                    .arg(millis(self.settings().rotation_grace))
                    .arg(rotation.family_id.as_str()),
            )
            .await?;
        let mut reply = Reply::new("rotate_session.lua", reply);
        Ok(Ok(match reply.int()? {
            1 => {
                let created_at_ms = reply.millis()?;
                let expires_at_ms = reply.millis()?;
                let family_end = reply.millis()?;
                RotateOutcome::Rotated {
                    session: Session {
                        user_id: user.as_str().to_owned(),
                        token_id: new.to_owned(),
                        metadata,
                        family_id: Some(rotation.family_id.as_str().to_owned()),
                        family_expires_at_ms: Some(family_end),
                        created_at_ms,
                        expires_at_ms,
                    },
                }
            }
            2 => RotateOutcome::AlreadyRotated {
                session: parse_session(&reply.string()?)?,
            },
            3 => return Ok(Err(reply.string()?)),
            5 => RotateOutcome::NotFound,
            6 => RotateOutcome::TokenTaken,
            7 => {
                return Err(Error::Unavailable(
                    "the rotation's last step reached Redis more than REDIS_TIMEOUT_MS after \
                     its first; nothing was changed; retry"
                        .into(),
                ));
            }
            other => {
                return Err(Error::Internal(
                    format!("rotate_session.lua returned status {other}").into(),
                ));
            }
        }))
    }

    /// Slides a live session's expiry to now + ttl (`None`: SESSION_TTL),
    /// never past its family's end; writes only when that moves the expiry
    /// by more than a tenth of the ttl. Returns the session as it now is, or
    /// `None` when it is not live. An expiry moved earlier is published on
    /// the revocation channel (`x:`) in the same step, for near-caches.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ttl`; Redis failures as for
    /// [`rotate_session`](Self::rotate_session).
    pub async fn extend_session(
        &self,
        user: &UserId,
        token: &TokenId,
        ttl: Option<std::time::Duration>,
    ) -> Result<Option<Session>, Error> {
        let ttl_ms = self.ttl_ms(ttl)?;
        let mut op = self.op("extend_session").await?;
        let reply: Vec<Value> = op
            .invoke(
                self.shared
                    .scripts
                    .prepare_extend
                    .key(self.session_key(user, token.as_str()))
                    .key(self.reservations_key(user))
                    .arg(token.as_str())
                    .arg(ttl_ms)
                    .arg(self.claim_lifetime_ms(ttl_ms))
                    .arg(self.reservation_slack_ms()),
            )
            .await?;
        let mut reply = Reply::new("prepare_extend.lua", reply);
        let status = reply.int()?;
        let now_ms = reply.millis()?;
        if status == 0 {
            return Ok(None);
        }
        let session = parse_session(&reply.string()?)?;
        let cap = match status {
            1 => return Ok(Some(session)),
            // Later: the token's reservation must outlive the new expiry.
            2 => {
                if !self
                    .claim_token(&mut op, user, token, ttl_ms, now_ms)
                    .await?
                {
                    return Err(Error::Internal(
                        "a live session's token id is reserved for another user".into(),
                    ));
                }
                0
            }
            // Earlier: the reservation already outlives the current expiry.
            3 => session.expires_at_ms,
            other => {
                return Err(Error::Internal(
                    format!("prepare_extend.lua returned status {other}").into(),
                ));
            }
        };
        let mut invocation = self
            .shared
            .scripts
            .extend_session
            .key(self.session_key(user, token.as_str()));
        invocation.key(self.index_key(user));
        if let Some(family) = &session.family_id {
            let family = FamilyId::parse("family_id", family.clone())
                .map_err(|e| Error::Internal(format!("corrupt session JSON: {e}").into()))?;
            invocation.key(self.family_key(user, &family));
        }
        invocation
            .arg(token.as_str())
            .arg(ttl_ms)
            .arg(now_ms.saturating_add(millis(self.settings().timeout)))
            .arg(cap)
            .arg(self.revocation_channel())
            .arg(user.as_str());
        let reply: Vec<Value> = op.invoke(&invocation).await?;
        let mut reply = Reply::new("extend_session.lua", reply);
        match reply.int()? {
            0 => Ok(None),
            1 => Ok(Some(parse_session(&reply.string()?)?)),
            7 => Err(Error::Unavailable(
                "the extension's last step reached Redis more than REDIS_TIMEOUT_MS after its \
                 first; nothing was changed; retry"
                    .into(),
            )),
            other => Err(Error::Internal(
                format!("extend_session.lua returned status {other}").into(),
            )),
        }
    }
}
