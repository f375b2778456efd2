//! The near-cache's state machine driven by random sequences of what can
//! happen to it (fills, including ones a revocation overtakes; hits;
//! revocations of one session and of a user, from the stream and made
//! here; resets; the stream's loss and silence; Redis's clock moving
//! sessions past their expiry; eviction in a cache smaller than the
//! sessions), checked after every step against a simple model of what may
//! be answered: never a session revoked or expired, never one the model says
//! a flush or a revocation ended, never after the stream stopped proving
//! that nothing was missed, and always the session as the server gave it.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use proptest::{collection::vec, prelude::*};
use sessionstore::v1 as pb;

use super::{CompactSession, NearCache, PendingFill, Revocation, SessionView};
use crate::types::Session;

const STALENESS: Duration = Duration::from_secs(3);
const USERS: usize = 3;
const TOKENS: usize = 24;
/// Fewer than the sessions, so that fills evict.
const MAX_ENTRIES: usize = 8;
/// User agents long enough to be shared between sessions.
const AGENTS: [&str; 2] = [
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1",
];

#[derive(Clone, Debug)]
enum Op {
    /// A lookup's miss registers a fill for `token` (naming its user or
    /// not); the server reads the session now.
    BeginFill {
        token: usize,
        named: bool,
    },
    /// The `n`-th pending fill's answer arrives.
    Complete {
        n: usize,
    },
    /// The `n`-th pending fill's call fails (its guard dropped).
    Fail {
        n: usize,
    },
    Lookup {
        token: usize,
        hint: Option<usize>,
    },
    /// `token` is revoked in Redis; the revocation arrives on the stream,
    /// or is applied at once (a revoke made through this client).
    RevokeToken {
        token: usize,
        own: bool,
    },
    /// A user signs out everywhere (or `ages`: a revocation without
    /// `revoked_at`, every session of the user whatever its age).
    RevokeUser {
        user: usize,
        own: bool,
        ages: bool,
    },
    Heartbeat,
    /// Time passes, on this host's monotonic clock and Redis's alike.
    Advance {
        ms: u64,
    },
    Reset,
    /// The stream ends; a later `Reset` opens the next one.
    Lose,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..TOKENS, any::<bool>()).prop_map(|(token, named)| Op::BeginFill { token, named }),
        20 => (0..8_usize).prop_map(|n| Op::Complete { n }),
        3 => (0..8_usize).prop_map(|n| Op::Fail { n }),
        25 => (0..TOKENS, proptest::option::of(0..USERS))
            .prop_map(|(token, hint)| Op::Lookup { token, hint }),
        5 => (0..TOKENS, any::<bool>()).prop_map(|(token, own)| Op::RevokeToken { token, own }),
        4 => (0..USERS, any::<bool>(), any::<bool>())
            .prop_map(|(user, own, ages)| Op::RevokeUser { user, own, ages }),
        12 => Just(Op::Heartbeat),
        6 => (1..2500_u64).prop_map(|ms| Op::Advance { ms }),
        3 => Just(Op::Reset),
        2 => Just(Op::Lose),
    ]
}

/// Redis and the cache's surroundings, as the model sees them.
struct World {
    cache: std::sync::Arc<NearCache>,
    t0: Instant,
    redis0: SystemTime,
    /// Milliseconds since `t0`, on both clocks.
    elapsed: u64,
    /// Each token's session as Redis created it (token `t` is user
    /// `t % USERS`'s, created `t` half seconds after `redis0`).
    sessions: Vec<Session>,
    /// Ended in Redis.
    revoked: HashSet<usize>,
    /// Fills in flight: the guard, the token, whether the call named its
    /// user, and what the server read.
    pending: Vec<(PendingFill, usize, bool, Option<Session>)>,
    /// The model: tokens the cache may answer, each with the session it
    /// was given. A fill whose call saw nothing that concerns it adds its
    /// token; a revocation that concerns it, a flush or the stream's loss
    /// takes it out. The cache may hold fewer (eviction, expiry).
    may_answer: HashMap<usize, Session>,
    /// Whether each pending fill is still clean: nothing that may concern
    /// it arrived since it was registered (a revocation of its token, one
    /// concerning the user its call named, a user-wide one when its call
    /// named none, a flush).
    clean: Vec<bool>,
    /// When the current stream last spoke, in ms since `t0`; `None`: no
    /// stream synced (before the first reset, or after a loss).
    synced_at: Option<u64>,
}

impl World {
    fn new(ttls: &[u64]) -> Self {
        let redis0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sessions = (0..TOKENS)
            .map(|t| {
                let created_at = redis0 + Duration::from_millis(500 * t as u64);
                let mut metadata = HashMap::new();
                if t % 3 == 0 {
                    metadata.insert("ip".to_owned(), format!("192.0.2.{t}"));
                    metadata.insert("device".to_owned(), "phone".to_owned());
                }
                // Long strings several sessions share (interned once seen
                // twice) and one each keeps inline.
                if t % 4 != 3 {
                    metadata.insert("user_agent".to_owned(), AGENTS[t % AGENTS.len()].to_owned());
                } else {
                    metadata.insert("user_agent".to_owned(), format!("{}/{t}", AGENTS[0]));
                }
                Session {
                    user_id: format!("user-{}", t % USERS),
                    token_id: format!("token-{t}"),
                    metadata,
                    created_at,
                    expires_at: created_at + Duration::from_millis(ttls[t]),
                    family_id: if t % 2 == 0 {
                        format!("family-{t}")
                    } else {
                        String::new()
                    },
                    family_expires_at: (t % 2 == 0)
                        .then(|| created_at + Duration::from_secs(86_400)),
                }
            })
            .collect();
        Self {
            cache: NearCache::new(MAX_ENTRIES, STALENESS),
            t0: Instant::now(),
            redis0,
            elapsed: 0,
            sessions,
            revoked: HashSet::new(),
            pending: Vec::new(),
            may_answer: HashMap::new(),
            clean: Vec::new(),
            synced_at: None,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.elapsed)
    }

    fn redis_now(&self) -> SystemTime {
        self.redis0 + Duration::from_millis(self.elapsed)
    }

    fn alive(&self, token: usize) -> bool {
        !self.revoked.contains(&token) && self.sessions[token].expires_at > self.redis_now()
    }

    fn message(
        &self,
        reset: bool,
        revocations: Vec<pb::Revocation>,
    ) -> pb::WatchRevocationsResponse {
        pb::WatchRevocationsResponse {
            revocations,
            reset,
            redis_time: Some(self.redis_now().into()),
            shortened: Vec::new(),
        }
    }

    /// A message on the current stream (it must be synced to count).
    fn receive(&mut self, message: pb::WatchRevocationsResponse) {
        if message.reset {
            if self.cache.roles().current != Some(0) {
                self.cache.open(0);
            }
            self.flushed();
        }
        let now = self.now();
        self.cache.received(0, message, now);
        if self.cache.roles().current == Some(0) {
            self.synced_at = Some(self.elapsed);
        }
    }

    /// Whatever the cache held or was about to hold is gone.
    fn flushed(&mut self) {
        self.may_answer.clear();
        self.clean.iter_mut().for_each(|c| *c = false);
    }

    /// A revocation ending `tokens` reached the cache: they may no longer
    /// be answered, nor the pending fills it may concern be cached.
    fn concern(&mut self, tokens: &[usize], user: usize, every_unnamed: bool) {
        for t in tokens {
            self.may_answer.remove(t);
        }
        for (i, (_, token, named, _)) in self.pending.iter().enumerate() {
            if tokens.contains(token)
                || (*named && token % USERS == user)
                || (every_unnamed && !named)
            {
                self.clean[i] = false;
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::BeginFill { token, named } => {
                let session = &self.sessions[token];
                let user = named.then_some(session.user_id.as_str());
                let fill = self.cache.begin_fill(&session.token_id, user);
                let read = self.alive(token).then(|| session.clone());
                self.pending.push((fill, token, named, read));
                self.clean.push(true);
            }
            Op::Complete { n } if !self.pending.is_empty() => {
                let n = n % self.pending.len();
                let (fill, token, _, read) = self.pending.remove(n);
                let clean = self.clean.remove(n);
                let Some(read) = read else {
                    drop(fill);
                    return;
                };
                let cached = fill.complete_at(&read, self.now());
                let healthy = self
                    .synced_at
                    .is_some_and(|at| self.elapsed - at <= STALENESS.as_millis() as u64);
                if cached {
                    assert!(
                        clean,
                        "{token}: cached though something concerning it arrived"
                    );
                    assert!(healthy, "{token}: cached by an unhealthy cache");
                    self.may_answer.insert(token, read);
                    // Nothing evicts between a fill and the next lookup.
                    let now = self.now();
                    let session = &self.sessions[token];
                    assert!(
                        self.cache
                            .lookup_at(&session.token_id, None, || now)
                            .is_some(),
                        "{token}: cached but not answered"
                    );
                } else if clean && healthy && read.expires_at > self.redis_now() {
                    panic!("{token}: a clean fill of a live session was not cached");
                }
            }
            Op::Fail { n } if !self.pending.is_empty() => {
                let n = n % self.pending.len();
                self.pending.remove(n);
                self.clean.remove(n);
            }
            Op::Complete { .. } | Op::Fail { .. } => {}
            Op::Lookup { token, hint } => {
                let session = &self.sessions[token];
                let hint_id = hint.map(|u| format!("user-{u}"));
                let now = self.now();
                // The view first, then the compact answer (either may
                // remove an expired entry, as the `Session` lookup would):
                // the same checks, the same session, or nothing for all
                // three.
                let viewed = self.cache.lookup_view_at(
                    &session.token_id,
                    hint_id.as_deref(),
                    || now,
                    read_view,
                );
                let compact =
                    self.cache
                        .lookup_compact_at(&session.token_id, hint_id.as_deref(), || now);
                let found = self
                    .cache
                    .lookup_at(&session.token_id, hint_id.as_deref(), || now);
                assert_eq!(
                    compact.as_ref().map(CompactSession::to_session),
                    found,
                    "{token}: the compact answer differs"
                );
                if let Some(compact) = &compact {
                    assert!(found.as_ref().is_some_and(|f| compact == f));
                }
                assert_eq!(
                    viewed.as_ref().map(|(session, _)| session),
                    found.as_ref(),
                    "{token}: the view differs"
                );
                if let Some((_, compact_from_view)) = &viewed {
                    assert_eq!(Some(compact_from_view), compact.as_ref());
                }
                if let Some(found) = found {
                    assert!(!self.revoked.contains(&token), "{token}: revoked, answered");
                    assert!(
                        found.expires_at > self.redis_now(),
                        "{token}: expired, answered"
                    );
                    assert_eq!(Some(&found), self.may_answer.get(&token), "{token}");
                    assert!(hint_id.is_none_or(|u| u == found.user_id));
                    let at = self.synced_at.expect("answered without a stream");
                    assert!(self.elapsed - at <= STALENESS.as_millis() as u64, "stale");
                }
            }
            Op::RevokeToken { token, own } => {
                self.revoked.insert(token);
                let session = &self.sessions[token];
                let revocation = pb::Revocation {
                    user_id: session.user_id.clone(),
                    token_id: session.token_id.clone(),
                    revoked_at: Some(self.redis_now().into()),
                    reason: pb::RevocationReason::Revoked.into(),
                };
                if own {
                    self.cache.apply(&[Revocation::from_proto(revocation)]);
                } else {
                    let message = self.message(false, vec![revocation]);
                    if self.synced_at.is_none() {
                        // No stream: nothing to deliver it, nothing cached.
                        return;
                    }
                    self.receive(message);
                }
                self.concern(&[token], token % USERS, false);
            }
            Op::RevokeUser { user, own, ages } => {
                let tokens: Vec<usize> = (0..TOKENS)
                    .filter(|t| {
                        t % USERS == user && self.sessions[*t].created_at <= self.redis_now()
                    })
                    .collect();
                self.revoked.extend(&tokens);
                let revocation = pb::Revocation {
                    user_id: format!("user-{user}"),
                    token_id: String::new(),
                    revoked_at: (!ages).then(|| self.redis_now().into()),
                    reason: pb::RevocationReason::SignedOutEverywhere.into(),
                };
                if own {
                    self.cache.apply(&[Revocation::from_proto(revocation)]);
                } else {
                    if self.synced_at.is_none() {
                        return;
                    }
                    let message = self.message(false, vec![revocation]);
                    self.receive(message);
                }
                self.concern(&tokens, user, true);
            }
            Op::Heartbeat => {
                if self.synced_at.is_some() {
                    let message = self.message(false, Vec::new());
                    self.receive(message);
                }
            }
            // A stream silent past the staleness bound is closed by the
            // stream task (`Lose`); until then nothing may be answered.
            Op::Advance { ms } => self.elapsed += ms,
            Op::Reset => {
                let message = self.message(true, Vec::new());
                self.receive(message);
            }
            Op::Lose => {
                self.cache.ended(0, self.now());
                self.synced_at = None;
                self.flushed();
            }
        }
        super::tests::assert_consistent(&self.cache);
        assert!(self.cache.stats().entries as usize <= MAX_ENTRIES);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn never_answers_a_revoked_or_expired_session(
        ttls in vec(5_000..40_000_u64, TOKENS),
        ops in vec(op(), 1..200),
    ) {
        let mut world = World::new(&ttls);
        // Sessions are created over the first 12 s of Redis's clock: start
        // once they all exist, with the stream synced.
        world.elapsed = 12_000;
        world.step(&Op::Reset);
        for op in &ops {
            world.step(op);
        }
        drop(world.pending);
    }
}

/// What a lookup's [`SessionView`] holds, read through every accessor and
/// checked against its own copies: the `Session` it gives, and its compact
/// copy.
fn read_view(view: SessionView<'_>) -> (Session, CompactSession) {
    let session = view.to_session();
    assert!(view == session, "the view's accessors differ from its copy");
    for (key, value) in &session.metadata {
        assert_eq!(view.metadata_value(key), Some(value.as_str()));
    }
    assert_eq!(view.metadata_value("no such key"), None);
    let compact = view.to_compact();
    assert!(compact == session, "the view's compact copy differs");
    (session, compact)
}
