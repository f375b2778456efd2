//! Looking sessions up: one session (with or without the owner hint), a
//! user's count and list, and a token's owner.

use super::{
    super::{Store, connection::Op},
    parse_session, parse_session_of,
};
use crate::{
    error::Error,
    model::{Session, TokenId, UserId},
};

impl Store {
    /// Looks a session up; `owner` is the optional user id hint. Both ids
    /// are taken, not borrowed: the session found takes their strings
    /// instead of copies of the stored ones (`parse_session_of`).
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn get_session(
        &self,
        token: TokenId,
        owner: Option<UserId>,
    ) -> Result<Option<Session>, Error> {
        let mut op = self.op("get_session").await?;
        // The hint is used as it is: no copy of it on the hot path.
        let owner = match owner {
            Some(user) => user,
            None => match self.find_owner(&mut op, &token).await? {
                Some(user) => user,
                None => return Ok(None),
            },
        };
        // Built at its exact size: `redis::cmd` grew the buffer once for
        // the key, and the key was a `String` of its own before it was
        // copied in (BENCHMARKS.md, "#22 hot path").
        let key = self.session_key_parts(&owner, token.as_str());
        let mut get = redis::Cmd::with_capacity(2, "GET".len() + key.len());
        get.arg("GET").arg(&key);
        let json: Option<String> = op.query(&get).await?;
        json.map(|json| parse_session_of(&json, owner, token))
            .transpose()
    }

    /// Counts the user's live sessions by Redis's clock.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn count_user_sessions(&self, user: &UserId) -> Result<u32, Error> {
        let mut op = self.op("count_user_sessions").await?;
        op.invoke(&self.shared.scripts.count_sessions.key(self.index_key(user)))
            .await
    }

    /// Lists the user's live sessions, newest first.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn list_user_sessions(&self, user: &UserId) -> Result<Vec<Session>, Error> {
        let mut op = self.op("list_user_sessions").await?;
        let tokens = self.index_members(&mut op, user).await?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for token in &tokens {
            mget.arg(self.session_key(user, token));
        }
        // A member whose key is gone expired or was revoked a moment ago.
        let found: Vec<Option<String>> = op.query(&mget).await?;
        let mut sessions = found
            .iter()
            .flatten()
            .map(|json| parse_session(json))
            .collect::<Result<Vec<_>, _>>()?;
        sessions.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.token_id.cmp(&b.token_id))
        });
        Ok(sessions)
    }

    /// Counts one login attempt from `addr` and decides whether it may proceed.
    ///
    /// The user a token belongs to: the caller's hint when given (a wrong
    /// hint simply finds no session), else the token's reservation.
    pub(super) async fn resolve_owner(
        &self,
        op: &mut Op,
        token: &TokenId,
        hint: Option<&UserId>,
    ) -> Result<Option<UserId>, Error> {
        match hint {
            Some(user) => Ok(Some(user.clone())),
            None => self.find_owner(op, token).await,
        }
    }

    /// Every token id in the user's index, live or not yet pruned.
    pub(super) async fn index_members(
        &self,
        op: &mut Op,
        user: &UserId,
    ) -> Result<Vec<String>, Error> {
        op.query(
            redis::cmd("ZRANGE")
                .arg(self.index_key(user))
                .arg(0)
                .arg(-1),
        )
        .await
    }

    pub(super) async fn find_owner(
        &self,
        op: &mut Op,
        token: &TokenId,
    ) -> Result<Option<UserId>, Error> {
        let owner: Option<String> = op
            .query(redis::cmd("GET").arg(self.owner_key(token)))
            .await?;
        // A stored owner was validated when it was written; anything else
        // means the key space was written by someone else.
        owner
            .map(|user| {
                UserId::parse("user_id", user)
                    .map_err(|e| Error::Internal(format!("corrupt token owner: {e}").into()))
            })
            .transpose()
    }
}
