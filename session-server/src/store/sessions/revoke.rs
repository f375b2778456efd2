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
            .await?;
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
            self.revoke_following(&mut op, user, tokens, "signed_out_everywhere", None)
                .await?
        };
        // Also when none was left: see `revoke_session`.
        self.replicate(op, user).await?;
        Ok(revoked)
    }

    /// Revokes every live session of a user but `keep` and its family ("sign
    /// out other devices"); returns how many were revoked, or `None` when
    /// `keep` is not a live session of the user (then nothing is revoked).
    ///
    /// As [`revoke_all_user_sessions`](Self::revoke_all_user_sessions), but
    /// the sessions of the kept one's family are left out and never followed
    /// into: a rotation of the kept session racing the call (after the kept
    /// session was read, before the index was) puts its successor in the
    /// index, and that successor is known by its family. Sessions of servers
    /// older than families have none: only `keep` itself is kept.
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
        let kept: Option<String> = op
            .query(redis::cmd("GET").arg(self.session_key(user, keep.as_str())))
            .await?;
        let Some(kept) = kept.map(|json| parse_session(&json)).transpose()? else {
            // Also here: this may be the retry of a call answered
            // UNAVAILABLE for want of replicas (see `revoke_session`).
            self.replicate(op, user).await?;
            return Ok(None);
        };
        let spared = Spared {
            token: keep.as_str(),
            family: kept
                .family_id
                .as_deref()
                .filter(|family| !family.is_empty()),
        };
        let members = self.index_members(&mut op, user).await?;
        let others = if members.is_empty() {
            members
        } else {
            let mut mget = redis::cmd("MGET");
            for token in &members {
                mget.arg(self.session_key(user, token));
            }
            let found: Vec<Option<String>> = op.query(&mget).await?;
            let mut others = Vec::with_capacity(members.len());
            for (token, json) in members.into_iter().zip(found) {
                // A member gone since the index was read is revoked too:
                // nothing is live to revoke, but a rotation may have
                // replaced it, and its successor is followed (unless of the
                // kept family).
                let family = json.map(|json| parse_session(&json)).transpose()?;
                if !spared.spares(&token, family.as_ref().and_then(|s| s.family_id.as_deref())) {
                    others.push(token);
                }
            }
            others
        };
        let revoked = if others.is_empty() {
            0
        } else {
            self.revoke_following(&mut op, user, others, "revoked", Some(&spared))
                .await?
        };
        // Also when none was left: see `revoke_session`.
        self.replicate(op, user).await?;
        Ok(Some(revoked))
    }

    /// Revokes `tokens`, then the successors of any of them a rotation
    /// replaced before the revocation ran (the family went on under a new
    /// token id), and theirs, until none is left: a revocation racing a
    /// rotation still ends the family. A successor is revoked only while its
    /// session is still of that family, and none `spared` spares. Returns
    /// how many were live.
    pub(super) async fn revoke_following(
        &self,
        op: &mut Op,
        user: &UserId,
        tokens: Vec<String>,
        reason: &str,
        spared: Option<&Spared<'_>>,
    ) -> Result<u32, Error> {
        let mut revoked = 0u32;
        // Every token revoked or followed, so a cycle (never written by
        // this server) cannot loop; the operation's deadline bounds the rest.
        let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
        let (live, mut successors) = self.revoke_tokens(op, user, &tokens, None, reason).await?;
        revoked = revoked.saturating_add(live);
        loop {
            successors.retain(|(token, family)| {
                !spared.is_some_and(|spared| spared.spares(token, Some(family)))
                    && seen.insert(token.clone())
            });
            if successors.is_empty() {
                return Ok(revoked);
            }
            let (tokens, families): (Vec<String>, Vec<String>) = successors.into_iter().unzip();
            let (live, next) = self
                .revoke_tokens(op, user, &tokens, Some(&families), reason)
                .await?;
            revoked = revoked.saturating_add(live);
            successors = next;
        }
    }

    /// Revokes `tokens` of `user` with revoke_sessions.lua, leaving markers
    /// with `reason`, each only while its session is of the family at the
    /// same position of `families` when given; returns how many were live,
    /// and the successors (with their family) of those a rotation had
    /// replaced.
    pub(super) async fn revoke_tokens(
        &self,
        op: &mut Op,
        user: &UserId,
        tokens: &[impl AsRef<str>],
        families: Option<&[String]>,
        reason: &str,
    ) -> Result<(u32, Vec<(String, String)>), Error> {
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
            .arg(families);
        for token in tokens {
            let token = token.as_ref();
            invocation
                .key(self.session_key(user, token))
                .key(self.revoked_key(user, token))
                .arg(token);
        }
        let reply: Vec<Value> = op.invoke(&invocation).await?;
        let mut reply = Reply::new("revoke_sessions.lua", reply);
        let live = u32::try_from(reply.int()?).map_err(|_| reply.malformed())?;
        let mut rest = reply.strings()?.into_iter();
        let mut successors = Vec::new();
        while let (Some(token), Some(family)) = (rest.next(), rest.next()) {
            // Both were validated when their rotation stored them.
            TokenId::parse("token_id", token.clone())
                .map_err(|e| Error::Internal(format!("corrupt revocation marker: {e}").into()))?;
            successors.push((token, family));
        }
        Ok((live, successors))
    }
}

/// The session a "sign out other devices" keeps, and its family (`None` for
/// a session older than families: then only the token itself).
pub(super) struct Spared<'a> {
    token: &'a str,
    family: Option<&'a str>,
}

impl Spared<'_> {
    /// Whether the session `token`, of `family` when known, is the kept one
    /// or of its family.
    fn spares(&self, token: &str, family: Option<&str>) -> bool {
        token == self.token || (self.family.is_some() && family == self.family)
    }
}
