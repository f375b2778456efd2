//! What changes the cached sessions, always with the state lock held
//! (taken before any shard's): a removal, a revocation (one session, or a
//! user's through the per-user index), a family's end, an extension's
//! answer, a flush. The entries and the per-user index move together here,
//! so each change is one step as far as the fill race is concerned (see
//! the parent module).

use std::time::SystemTime;

use super::entries::{Garbage, Removed};
use super::packed::View;
use super::state::State;
use super::{NearCache, Revocation};
use crate::types::Session;

/// What changes the sessions, with the state lock held (`state`): the
/// entries and the per-user index move together.
impl NearCache {
    /// Removes `token_id`'s entry; returns its user id.
    pub(super) fn remove(&self, state: &mut State, token_id: &str) -> Option<String> {
        let (removed, user) = self.entries.remove(token_id)?;
        Self::unindex(state, removed);
        Some(user)
    }

    pub(super) fn unindex(state: &mut State, removed: Removed) {
        state.len -= 1;
        if let Some(handles) = state.by_user.get_mut(&removed.user_hash) {
            if let Some(at) = handles.iter().position(|&h| h == removed.handle) {
                handles.swap_remove(at);
            }
            if handles.is_empty() {
                state.by_user.remove(&removed.user_hash);
            }
        }
    }

    /// Removes `user`'s cached sessions that `doomed` says so of, found
    /// through the per-user index.
    pub(super) fn remove_users(
        &self,
        state: &mut State,
        user: &str,
        doomed: impl Fn(View<'_>) -> bool,
    ) {
        let handles = state
            .by_user
            .get(&self.entries.hash(user))
            .cloned()
            .unwrap_or_default();
        for handle in handles {
            let removed = self
                .entries
                .remove_if(handle, |view| view.user_is(user) && doomed(view));
            if let Some(removed) = removed {
                Self::unindex(state, removed);
            }
        }
    }

    /// Drops every entry and every pending fill's chance to be cached. The
    /// sessions are swapped out of the shards at once and handed back, to
    /// be dropped once the state lock is released (by a thread of their own
    /// when many: see [`Garbage`]).
    #[must_use = "dropped after the state lock"]
    pub(super) fn flush(&self, state: &mut State) -> Garbage {
        state.forget_fills();
        let garbage = Garbage {
            shards: self.entries.take_all(None),
            by_user: std::mem::take(&mut state.by_user),
            entries: state.len,
        };
        state.len = 0;
        garbage
    }

    pub(super) fn apply_one(&self, state: &mut State, revocation: &Revocation) {
        let user = revocation.user_id.as_str();
        match &revocation.token_id {
            Some(token) => {
                // A revoke made here without the user's id names no user:
                // the cached session may.
                let owner = self.remove(state, token);
                // The calls for this token, and those naming its user (a
                // call's answer may be for a token of that user it named).
                let mut doomed: Vec<u64> = Vec::new();
                doomed.extend(
                    state
                        .fills_by_token
                        .get(token.as_str())
                        .into_iter()
                        .flatten(),
                );
                for u in [Some(user), owner.as_deref()].into_iter().flatten() {
                    doomed.extend(state.fills_by_user.get(u).into_iter().flatten());
                }
                state.invalidate_fills(doomed);
            }
            None => {
                let revoked_at = revocation.revoked_at;
                self.remove_users(state, user, |view| match revoked_at {
                    Some(at) => view.created_at().is_some_and(|created| created <= at),
                    None => true,
                });
                // A `get_session` call does not say whose session it asks
                // for: any user-wide revocation may concern it.
                state.invalidate_user_fills(user);
            }
        }
    }

    /// Drops `user`'s cached sessions of family `family` (a family ended by
    /// reuse detection), found through the per-user index. The calls in
    /// flight that may be for one of them lose their fill, as for a
    /// user-wide revocation: those naming the user, and every one that named
    /// none (the family's token ids are not all known here).
    pub(super) fn drop_family(&self, state: &mut State, user: &str, family: &str) {
        if family.is_empty() {
            // Sessions of a server older than families share the empty id:
            // not one family.
            return;
        }
        self.remove_users(state, user, |view| view.family() == Some(family));
        state.invalidate_user_fills(user);
    }

    /// An ExtendSession answer for `token_id`: `Some` with the session as
    /// the server now holds it, `None` when it is not live or the call's
    /// outcome is unknown.
    ///
    /// An extension usually moves the expiry later, but not always: with a
    /// ttl shorter than the time left it moves it earlier (down to
    /// now + ttl). The cache must never hold an expiry later than Redis's,
    /// which it would answer past the real end; one earlier than Redis's
    /// only costs a lookup once it passes (the server then answers, and
    /// that answer is cached). So a cached entry takes the earlier of its
    /// expiry and the answer's, whatever the order in which answers of
    /// concurrent extensions arrive; and the lookups in flight for the token
    /// lose their fill, since one may have read the expiry before this
    /// extension moved it earlier. Without an answer (the session is not
    /// live, or the call failed and may have moved it) the entry is dropped.
    pub(super) fn extend_entry(&self, state: &mut State, token_id: &str, answer: Option<&Session>) {
        let answer = answer.map(|a| (a.user_id.as_str(), a.expires_at));
        self.shorten_entry(state, token_id, answer);
    }

    /// Caps `token_id`'s cached expiry at `answer`'s (when the entry is
    /// `answer`'s user's), or drops the entry when there is no answer; the
    /// token's lookups in flight lose their fill. For an ExtendSession
    /// answer, and for a shortened expiry from the stream (`shortened`: an
    /// extension elsewhere moved it earlier).
    pub(super) fn shorten_entry(
        &self,
        state: &mut State,
        token_id: &str,
        answer: Option<(&str, SystemTime)>,
    ) {
        let doomed: Vec<u64> = state
            .fills_by_token
            .get(token_id)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        state.invalidate_fills(doomed);
        if let Some(removed) = self.entries.extended(token_id, answer) {
            Self::unindex(state, removed);
        }
    }
}
