//! Ending sessions early: one, or every session of a user, and the
//! successors of the rotations they race.

use redis::Value;

use super::{
    super::{Store, connection::Op, millis},
    Reply, parse_session,
};
use crate::{
    error::Error,
    model::{TokenId, UserId},
};

impl Store {
    /// Revokes one session; `owner` is the optional user id hint. Returns
    /// whether a live session was revoked; if so, its token id is refused by
    /// [`create_session`](Self::create_session) for as long as its
    /// reservation lasts.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`];
    /// [`Error::NotReplicated`] when REVOCATION_MIN_REPLICAS replicas did not
    /// acknowledge it in time (applied on the master; a retry waits again).
    pub async fn revoke_session(
        &self,
        token: &TokenId,
        owner: Option<&UserId>,
    ) -> Result<bool, Error> {
        let mut op = self.op("revoke_session").await?;
        let Some(owner) = self.resolve_owner(&mut op, token, owner).await? else {
            return Ok(false);
        };
        let revoked = self
            .revoke_following(
                &mut op,
                &owner,
                vec![token.as_str().to_owned()],
                "revoked",
                None,
            )
            .await?
            // Unguarded: always an answer.
            .unwrap_or(0);
        // Also when nothing was live: this may be the retry of a revocation
        // answered UNAVAILABLE for want of replicas, which must wait again.
        self.replicate(op, &owner).await?;
        Ok(revoked > 0)
    }

    /// Revokes every session the user had when the call started; returns how
    /// many were live.
    ///
    /// Every live session is in the index (the create script adds both
    /// atomically), so revoking the index's members as read now covers every
    /// session that existed before the call.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`];
    /// [`Error::NotReplicated`] as for
    /// [`revoke_session`](Self::revoke_session).
    pub async fn revoke_all_user_sessions(&self, user: &UserId) -> Result<u32, Error> {
        let mut op = self.op("revoke_all_user_sessions").await?;
        let tokens = self.index_members(&mut op, user).await?;
        let revoked = if tokens.is_empty() {
            0
        } else {
            // Unguarded: always an answer.
            self.revoke_following(&mut op, user, tokens, "signed_out_everywhere", None)
                .await?
                .unwrap_or(0)
        };
        // Also when none was left: see `revoke_session`.
        self.replicate(op, user).await?;
        Ok(revoked)
    }

    /// Revokes every live session of a user but `keep` ("sign out other
    /// devices"); returns how many were revoked, or `None` when `keep` is not
    /// a live session of the user (then nothing is revoked).
    ///
    /// As [`revoke_all_user_sessions`](Self::revoke_all_user_sessions), the
    /// kept token left out and never followed into, with a guard: the
    /// revocation's first step (revoke_sessions.lua) ends nothing unless the
    /// kept session is still live at that moment. So a call answered "kept"
    /// had its session live as the others ended: two devices signing each
    /// other out, or an eviction at the cap ending the kept session
    /// meanwhile, never leave the user without one. A rotation of the kept
    /// session racing the call (its successor then in the index, the kept
    /// one gone: rotations are atomic) fails the guard too; the call then
    /// starts again keeping the successor, which its marker names (a few
    /// times at most; then, as when it was revoked or evicted, nothing is
    /// kept). A kept token already rotated away when the call begins keeps
    /// nothing.
    ///
    /// # Errors
    ///
    /// As [`revoke_all_user_sessions`](Self::revoke_all_user_sessions).
    pub async fn revoke_other_user_sessions(
        &self,
        user: &UserId,
        keep: &TokenId,
    ) -> Result<Option<u32>, Error> {
        let mut op = self.op("revoke_other_user_sessions").await?;
        let mut kept = keep.as_str().to_owned();
        // The kept family, once its session was seen live in this call.
        let mut kept_family: Option<String> = None;
        let mut revoked = None;
        for _ in 0..4 {
            let json: Option<String> = op
                .query(redis::cmd("GET").arg(self.session_key(user, &kept)))
                .await?;
            let Some(session) = json.map(|json| parse_session(&json)).transpose()? else {
                // Gone since this call saw it live: a rotation moved it to a
                // successor of its family, which is kept instead.
                match (&kept_family, self.rotated_to(&mut op, user, &kept).await?) {
                    (Some(family), Some((successor, of))) if of == *family => {
                        kept = successor;
                        continue;
                    }
                    _ => break,
                }
            };
            // Sessions older than families have none: nothing to follow.
            kept_family = session.family_id.filter(|family| !family.is_empty());
            revoked = self.revoke_others_once(&mut op, user, &kept).await?;
            if revoked.is_some() {
                break;
            }
        }
        // Also when none was left, or nothing was kept: this may be the retry
        // of a call answered UNAVAILABLE for want of replicas (see
        // `revoke_session`).
        self.replicate(op, user).await?;
        Ok(revoked)
    }

    /// One attempt of
    /// [`revoke_other_user_sessions`](Self::revoke_other_user_sessions): the
    /// index as read now without `kept`, revoked while `kept` is live;
    /// `None` when it no longer was.
    async fn revoke_others_once(
        &self,
        op: &mut Op,
        user: &UserId,
        kept: &str,
    ) -> Result<Option<u32>, Error> {
        let mut others = self.index_members(op, user).await?;
        others.retain(|token| token != kept);
        self.revoke_following(op, user, others, "revoked", Some(kept))
            .await
    }

    /// The successor and family a rotation replaced `token` with, from its
    /// marker (rotate_session.lua); `None` when it ended otherwise, or not
    /// at all.
    async fn rotated_to(
        &self,
        op: &mut Op,
        user: &UserId,
        token: &str,
    ) -> Result<Option<(String, String)>, Error> {
        let marker: Option<String> = op
            .query(redis::cmd("GET").arg(self.revoked_key(user, token)))
            .await?;
        let Some(marker) = marker else {
            return Ok(None);
        };
        let marker: serde_json::Value = serde_json::from_str(&marker)
            .map_err(|e| Error::Internal(format!("corrupt revocation marker: {e}").into()))?;
        if marker["reason"] != "rotated" {
            return Ok(None);
        }
        let (Some(successor), Some(family)) =
            (marker["successor"].as_str(), marker["family"].as_str())
        else {
            return Ok(None);
        };
        // Validated when the rotation stored it.
        TokenId::parse("token_id", successor.to_owned())
            .map_err(|e| Error::Internal(format!("corrupt revocation marker: {e}").into()))?;
        Ok(Some((successor.to_owned(), family.to_owned())))
    }

    /// Revokes `tokens`, then the successors of any of them a rotation
    /// replaced before the revocation ran (the family went on under a new
    /// token id), and theirs, until none is left: a revocation racing a
    /// rotation still ends the family. A successor is revoked only while its
    /// session is still of that family, and never `kept`. Returns how many
    /// were live; `None` when `kept` is given and its session was no longer
    /// live at the first step, which then ended nothing.
    pub(super) async fn revoke_following(
        &self,
        op: &mut Op,
        user: &UserId,
        tokens: Vec<String>,
        reason: &str,
        kept: Option<&str>,
    ) -> Result<Option<u32>, Error> {
        let mut revoked = 0u32;
        // Every token revoked or followed (and the kept one, never followed
        // into), so a cycle (never written by this server) cannot loop; the
        // operation's deadline bounds the rest.
        let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
        seen.extend(kept.map(str::to_owned));
        let Some((live, mut successors)) = self
            .revoke_tokens(op, user, &tokens, None, kept, reason)
            .await?
        else {
            return Ok(None);
        };
        revoked = revoked.saturating_add(live);
        loop {
            successors.retain(|(token, _)| seen.insert(token.clone()));
            if successors.is_empty() {
                return Ok(Some(revoked));
            }
            let (tokens, families): (Vec<String>, Vec<String>) = successors.into_iter().unzip();
            // Unguarded: the successors of what the first step ended.
            let Some((live, next)) = self
                .revoke_tokens(op, user, &tokens, Some(&families), None, reason)
                .await?
            else {
                return Err(Error::Internal(
                    "revoke_sessions.lua answered an unguarded call as guarded".into(),
                ));
            };
            revoked = revoked.saturating_add(live);
            successors = next;
        }
    }

    /// Revokes `tokens` of `user` with revoke_sessions.lua, leaving markers
    /// with `reason`, each only while its session is of the family at the
    /// same position of `families` when given, and only while the session of
    /// `guard` is live when given (else nothing: `None`); returns how many
    /// were live, and the successors (with their family) of those a rotation
    /// had replaced.
    pub(super) async fn revoke_tokens(
        &self,
        op: &mut Op,
        user: &UserId,
        tokens: &[impl AsRef<str>],
        families: Option<&[String]>,
        guard: Option<&str>,
        reason: &str,
    ) -> Result<Option<(u32, Vec<(String, String)>)>, Error> {
        let families = match families {
            Some(families) => {
                serde_json::to_string(families).map_err(|e| Error::Internal(e.into()))?
            }
            None => String::new(),
        };
        let mut invocation = self
            .shared
            .scripts
            .revoke_sessions
            .key(self.index_key(user));
        invocation
            .key(self.reservations_key(user))
            .arg(self.reservation_slack_ms())
            .arg(millis(self.settings().session_ttl_max))
            .arg(reason)
            .arg(self.revocation_channel())
            .arg(user.as_str())
            .arg(families)
            .arg(guard.unwrap_or_default());
        for token in tokens {
            let token = token.as_ref();
            invocation
                .key(self.session_key(user, token))
                .key(self.revoked_key(user, token))
                .arg(token);
        }
        if let Some(guard) = guard {
            invocation.key(self.session_key(user, guard));
        }
        let reply: Vec<Value> = op.invoke(&invocation).await?;
        let mut reply = Reply::new("revoke_sessions.lua", reply);
        let live = reply.int()?;
        if live == -1 && guard.is_some() {
            return Ok(None);
        }
        let live = u32::try_from(live).map_err(|_| reply.malformed())?;
        let mut rest = reply.strings()?.into_iter();
        let mut successors = Vec::new();
        while let (Some(token), Some(family)) = (rest.next(), rest.next()) {
            // Both were validated when their rotation stored them.
            TokenId::parse("token_id", token.clone())
                .map_err(|e| Error::Internal(format!("corrupt revocation marker: {e}").into()))?;
            successors.push((token, family));
        }
        Ok(Some((live, successors)))
    }
}
