//! What the near-cache's state lock guards: the streams' roles, Redis's
//! clock as the stream tells it, the per-user index, the entry count, and
//! the calls in flight whose answers may be cached (the fills), indexed so
//! that a revocation finds the few it concerns. See the parent module on
//! the fill race and on expiry by Redis's clock.

use std::{
    collections::{HashMap, HashSet},
    time::{Instant, SystemTime},
};

use super::slot::Handle;

/// The streams the cache listens to, by the ids the stream task gave them;
/// see *Replacing the stream* in `stream.rs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Roles {
    /// The stream whose reset the cache is synced to.
    pub(crate) current: Option<u64>,
    /// A stream opened to replace it (or to be the first), before its reset.
    pub(crate) candidate: Option<u64>,
    /// The stream replaced by `current`, whose revocations still apply until
    /// the instant given.
    pub(crate) draining: Option<(u64, Instant)>,
}

impl Roles {
    pub(super) fn knows(&self, id: u64) -> bool {
        self.current == Some(id)
            || self.candidate == Some(id)
            || self.draining.is_some_and(|(d, _)| d == id)
    }
}

pub(super) struct State {
    /// The latest reading of Redis's clock from the current stream; `None`
    /// before one arrived or when the current stream carries none (then
    /// nothing is answered or cached: see *Expiry by Redis's clock*).
    pub(super) clock: Option<Clock>,
    /// Where each user's cached sessions are, by the keyed hash of the user
    /// id (two users whose ids share a hash share a list: every use checks
    /// the entry's user id). Kept equal to the entries by
    /// [`NearCache::unindex`], called for whatever leaves them.
    pub(super) by_user: HashMap<u64, Vec<Handle>>,
    /// Sessions cached, at most `max_entries` ([`NearCache::insert`]
    /// evicts down to it).
    pub(super) len: usize,
    /// The streams listened to; the cache is synced when `roles.current` is
    /// set (its reset was received).
    pub(super) roles: Roles,
    /// When the current stream's last message arrived.
    pub(super) last_message: Option<Instant>,
    /// Calls in flight whose answer may still be cached, by id. Whatever may
    /// make a call's answer stale (a revocation that may concern it, a
    /// flush) removes it from here and from the indexes below, so a fill is
    /// invalidated at most once and later revocations never visit it again.
    pub(super) fills: HashMap<u64, Fill>,
    /// The ids in `fills` by the token id their call asks for.
    pub(super) fills_by_token: HashMap<String, HashSet<u64>>,
    /// The ids in `fills` whose call named its user, by that user.
    pub(super) fills_by_user: HashMap<String, HashSet<u64>>,
    /// The ids in `fills` whose call named no user (`get_session`): any
    /// user-wide revocation may concern them.
    pub(super) unhinted_fills: HashSet<u64>,
    pub(super) next_fill: u64,
}

/// A reading of Redis's clock: a message's `redis_time` and when it arrived
/// by this host's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Clock {
    pub(super) redis: SystemTime,
    pub(super) arrived: Instant,
}

impl Clock {
    /// Redis's time at `now` by this reading.
    pub(super) fn at(&self, now: Instant) -> SystemTime {
        self.redis + now.saturating_duration_since(self.arrived)
    }

    /// The reading whose estimate of Redis's now is the later at `now`:
    /// `self` (the last one), or `reading`, which arrived at `now`.
    pub(super) fn advanced(self, reading: SystemTime, now: Instant) -> Self {
        if reading >= self.at(now) {
            Clock {
                redis: reading,
                arrived: now,
            }
        } else {
            self
        }
    }
}

/// A call in flight, as registered before it was sent.
pub(super) struct Fill {
    pub(super) token_id: String,
    /// The user the caller named (`get_user_session`); `None` for
    /// `get_session`, whose owner is unknown until it answers.
    pub(super) user_id: Option<String>,
}

impl State {
    /// Drops every pending fill's chance to be cached (a flush; the
    /// entries are [`NearCache::flush`]'s).
    pub(super) fn forget_fills(&mut self) {
        self.fills.clear();
        self.fills_by_token.clear();
        self.fills_by_user.clear();
        self.unhinted_fills.clear();
    }

    /// Registers a call about to be sent; see [`NearCache::begin_fill`].
    pub(super) fn add_fill(&mut self, token_id: &str, user_id: Option<&str>) -> u64 {
        let id = self.next_fill;
        self.next_fill += 1;
        self.fills_by_token
            .entry(token_id.to_owned())
            .or_default()
            .insert(id);
        match user_id {
            Some(user) => {
                self.fills_by_user
                    .entry(user.to_owned())
                    .or_default()
                    .insert(id);
            }
            None => {
                self.unhinted_fills.insert(id);
            }
        }
        self.fills.insert(
            id,
            Fill {
                token_id: token_id.to_owned(),
                user_id: user_id.map(str::to_owned),
            },
        );
        id
    }

    /// Unregisters a fill (completed, dropped or invalidated); `None` when
    /// it was already.
    pub(super) fn take_fill(&mut self, id: u64) -> Option<Fill> {
        let fill = self.fills.remove(&id)?;
        unindex_fill(&mut self.fills_by_token, &fill.token_id, id);
        match &fill.user_id {
            Some(user) => unindex_fill(&mut self.fills_by_user, user, id),
            None => {
                self.unhinted_fills.remove(&id);
            }
        }
        Some(fill)
    }

    /// Invalidates the fills of `ids`: their answers will not be cached.
    pub(super) fn invalidate_fills(&mut self, ids: Vec<u64>) {
        for id in ids {
            self.take_fill(id);
        }
    }

    /// Invalidates the fills a user-wide change for `user` may concern:
    /// those naming the user, and every one that named none. Each is
    /// invalidated once, so a burst of user-wide revocations visits them
    /// once in all, not once per revocation.
    pub(super) fn invalidate_user_fills(&mut self, user: &str) {
        let mut doomed: Vec<u64> = self.unhinted_fills.iter().copied().collect();
        doomed.extend(self.fills_by_user.get(user).into_iter().flatten());
        self.invalidate_fills(doomed);
    }
}

/// Removes `id` from `key`'s set in a fill index, and the set once empty.
fn unindex_fill(index: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}
