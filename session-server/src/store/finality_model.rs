//! Revocation finality under interleavings (#21): a seeded random walk over
//! two users sharing eight token ids (creates use four), through creates that run all three round
//! trips, stop after the first or the second, or whose claim or last step
//! arrives late; replays with varied ttls; revocations one by one and user
//! wide; eviction at a cap of two; rotations of a live session's family to
//! another token id (ROTATED, or reuse when the presented token is not the
//! family's current one) and extensions of a session's expiry (#23); and
//! time passing (ttls and a grace of
//! milliseconds, so reservations and markers end within the walk). After every
//! step Redis's own state is checked against the invariant:
//!
//! - while a token's reservation is held by a user who had it revoked, that
//!   revocation's marker lives at least as long as the reservation, and the
//!   session is not live;
//! - a live session's token is reserved by its user for at least the grace
//!   longer than the session lives, so no token id is live for two users.
//!
//! A failing seed is printed with the step it failed at; the walk is
//! deterministic but for Redis's clock.

use std::{collections::HashSet, time::Duration};

use super::{Settings, Store, millis, sessions::Prepared};
use crate::model::{CreateOutcome, FamilyId, NewSession, RotateOutcome, Rotation, TokenId, UserId};

/// A small xorshift generator: reproducible walks without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

const USERS: [&str; 2] = ["ann", "bob"];

/// Rotations and reuse detections across the walks, so the test can tell it
/// exercised both.
static ROTATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static REUSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Creates use the first four; rotations move families to any of them, so
/// the last four are mostly fresh.
const TOKENS: [&str; 8] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
const TTLS_MS: [u64; 4] = [40, 150, 400, 1_200];

/// A create stopped after its first step, or after its second: what a crash,
/// a cancel or a failed round trip leaves, and what may still arrive late.
enum Pending {
    Claim {
        new: NewSession,
        ttl_ms: u64,
        prepared_at: u64,
    },
    Commit {
        new: NewSession,
        ttl_ms: u64,
        prepared_at: u64,
    },
}

struct Walk {
    /// The store under test: short timeout and grace.
    store: Store,
    /// The same keys, read with the default timeout for the checks.
    reader: Store,
    rng: Rng,
    /// (user, token) pairs revoked while their reservation may still be held.
    revoked: HashSet<(usize, usize)>,
    pending: Vec<Pending>,
    log: Vec<String>,
}

fn new_session(user: usize, token: usize, ttl_ms: u64) -> NewSession {
    NewSession {
        user_id: UserId::parse("user_id", USERS[user].into()).unwrap(),
        token_id: TokenId::parse("token_id", TOKENS[token].into()).unwrap(),
        metadata: Default::default(),
        ttl: Some(Duration::from_millis(ttl_ms)),
        max_lifetime: None,
    }
}

impl Walk {
    async fn pttl(&self, key: String) -> i64 {
        self.reader
            .raw_command(redis::cmd("PTTL").arg(key))
            .await
            .unwrap()
    }

    async fn owner(&self, token: usize) -> Option<String> {
        let token = TokenId::parse("token_id", TOKENS[token].into()).unwrap();
        self.reader
            .raw_command(redis::cmd("GET").arg(self.reader.owner_key(&token)))
            .await
            .unwrap()
    }

    fn user(user: usize) -> UserId {
        UserId::parse("user_id", USERS[user].into()).unwrap()
    }

    /// Records what a create's outcome says, and checks it against the model.
    fn created(&mut self, user: usize, token: usize, outcome: &CreateOutcome) {
        match outcome {
            CreateOutcome::Created { evicted, .. } => {
                assert!(
                    !self.revoked.contains(&(user, token)),
                    "a revoked token id was created again"
                );
                for gone in evicted {
                    let gone = TOKENS.iter().position(|t| t == gone).unwrap();
                    self.revoked.insert((user, gone));
                }
            }
            CreateOutcome::AlreadyExists { .. } => assert!(
                !self.revoked.contains(&(user, token)),
                "a revoked token id is live"
            ),
            CreateOutcome::TokenTaken
            | CreateOutcome::TokenRevoked
            | CreateOutcome::LimitReached => {}
        }
    }

    async fn step(&mut self) {
        let store = self.store.clone();
        let user = usize::try_from(self.rng.below(2)).unwrap();
        let token = usize::try_from(self.rng.below(4)).unwrap();
        let ttl_ms = self.rng.pick(&TTLS_MS);
        let choice = self.rng.below(100);
        self.log.push(format!(
            "{choice} {} {} {ttl_ms}",
            USERS[user], TOKENS[token]
        ));
        // Store calls may fail (a loaded machine, a short timeout): a failed
        // step is one more interleaving, never a test failure.
        let Ok(mut op) = store.op("create_session").await else {
            return;
        };
        match choice {
            // A whole create (or a replay).
            0..=29 => {
                if let Ok(outcome) = store.create_session(new_session(user, token, ttl_ms)).await {
                    self.created(user, token, &outcome);
                }
            }
            // A create that stops after its first or second round trip.
            30..=49 => {
                let new = new_session(user, token, ttl_ms);
                let Ok(Prepared::Ready { now_ms }) =
                    store.prepare_create(&mut op, &new, ttl_ms).await
                else {
                    return;
                };
                if choice < 40 {
                    self.pending.push(Pending::Claim {
                        new,
                        ttl_ms,
                        prepared_at: now_ms,
                    });
                } else if let Ok(true) = store
                    .claim_token(&mut op, &new.user_id, &new.token_id, ttl_ms, now_ms)
                    .await
                {
                    self.pending.push(Pending::Commit {
                        new,
                        ttl_ms,
                        prepared_at: now_ms,
                    });
                }
            }
            // What a stopped create sent arrives late, in its order.
            50..=59 if !self.pending.is_empty() => {
                let at = usize::try_from(self.rng.below(self.pending.len() as u64)).unwrap();
                match self.pending.swap_remove(at) {
                    Pending::Claim {
                        new,
                        ttl_ms,
                        prepared_at,
                    } => {
                        // Refused past its deadline: an error, nothing written.
                        if let Ok(true) = store
                            .claim_token(&mut op, &new.user_id, &new.token_id, ttl_ms, prepared_at)
                            .await
                        {
                            self.pending.push(Pending::Commit {
                                new,
                                ttl_ms,
                                prepared_at,
                            });
                        }
                    }
                    Pending::Commit {
                        new,
                        ttl_ms,
                        prepared_at,
                    } => {
                        let (user, token) = (
                            USERS
                                .iter()
                                .position(|u| *u == new.user_id.as_str())
                                .unwrap(),
                            TOKENS
                                .iter()
                                .position(|t| *t == new.token_id.as_str())
                                .unwrap(),
                        );
                        // Refused when the slack has passed since the first step.
                        if let Ok(outcome) = store
                            .commit_create(
                                &mut op,
                                new,
                                &FamilyId::generate().unwrap(),
                                (ttl_ms, 86_400_000),
                                prepared_at,
                            )
                            .await
                        {
                            self.created(user, token, &outcome);
                        }
                    }
                }
            }
            60..=71 => {
                let token_id = TokenId::parse("token_id", TOKENS[token].into()).unwrap();
                if let Ok(true) = store
                    .revoke_session(&token_id, Some(&Self::user(user)))
                    .await
                {
                    self.revoked.insert((user, token));
                }
            }
            72..=79 => {
                // Every session live before the call (with time to spare) ends.
                let mut live = Vec::new();
                for (token, name) in TOKENS.iter().enumerate() {
                    let left = self
                        .pttl(self.reader.session_key(&Self::user(user), name))
                        .await;
                    if left > 20 {
                        live.push(token);
                    }
                }
                if store
                    .revoke_all_user_sessions(&Self::user(user))
                    .await
                    .is_ok()
                {
                    self.revoked
                        .extend(live.into_iter().map(|token| (user, token)));
                }
            }
            // A rotation of the family of one of the user's sessions (live or
            // not: a dead one is reuse or NOT_FOUND) to another token id.
            80..=89 => {
                let live: Vec<String> = self
                    .reader
                    .raw_command(
                        redis::cmd("ZRANGE")
                            .arg(self.reader.index_key(&Self::user(user)))
                            .arg(0)
                            .arg(-1),
                    )
                    .await
                    .unwrap();
                if live.is_empty() {
                    return;
                }
                let pick = usize::try_from(self.rng.below(live.len() as u64)).unwrap();
                let presented = TOKENS.iter().position(|t| *t == live[pick]).unwrap();
                let token = usize::try_from(self.rng.below(8)).unwrap();
                let json: Option<String> = self
                    .reader
                    .raw_command(
                        redis::cmd("GET").arg(
                            self.reader
                                .session_key(&Self::user(user), TOKENS[presented]),
                        ),
                    )
                    .await
                    .unwrap();
                let Some(family) = json
                    .and_then(|json| crate::model::Session::from_stored_json(&json).ok())
                    .and_then(|session| session.family_id)
                else {
                    return;
                };
                // Present the current token, or now and then another one.
                let other = usize::try_from(self.rng.below(8)).unwrap();
                let shown = if self.rng.below(4) == 0 {
                    other
                } else {
                    presented
                };
                if shown == token {
                    return;
                }
                let rotation = Rotation {
                    user_id: Self::user(user),
                    family_id: FamilyId::parse("family_id", family).unwrap(),
                    token_id: TokenId::parse("token_id", TOKENS[shown].into()).unwrap(),
                    new_token_id: TokenId::parse("token_id", TOKENS[token].into()).unwrap(),
                    ttl: Some(Duration::from_millis(ttl_ms)),
                    metadata: Default::default(),
                };
                let outcome = store.rotate_session(rotation).await;
                self.log
                    .push(format!("rotate {shown} -> {token}: {outcome:?}"));
                match outcome {
                    Ok(RotateOutcome::Rotated { .. }) => {
                        assert!(
                            !self.revoked.contains(&(user, token)),
                            "a rotation made a revoked token id live"
                        );
                        self.revoked.insert((user, shown));
                        ROTATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(RotateOutcome::ReuseDetected { revoked }) => {
                        let gone = TOKENS.iter().position(|t| *t == revoked).unwrap();
                        self.revoked.insert((user, gone));
                        REUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            // An extension of one session's expiry, later or earlier.
            90..=93 => {
                let token_id = TokenId::parse("token_id", TOKENS[token].into()).unwrap();
                let _ = store
                    .extend_session(
                        &Self::user(user),
                        &token_id,
                        Some(Duration::from_millis(ttl_ms)),
                    )
                    .await;
            }
            _ => {
                let pause = self.rng.pick(&[20, 80, 250, 700]);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }

    /// The invariant, on Redis's state.
    async fn check(&mut self) {
        let store = self.reader.clone();
        for (token, token_name) in TOKENS.iter().enumerate() {
            let owner = self.owner(token).await;
            let token_id = TokenId::parse("token_id", (*token_name).into()).unwrap();
            let reservation = self.pttl(store.owner_key(&token_id)).await;
            for (user, user_name) in USERS.iter().enumerate() {
                let user_id = Self::user(user);
                let holds = owner.as_deref() == Some(*user_name);
                let session = self.pttl(store.session_key(&user_id, token_name)).await;
                if session != -2 {
                    assert!(
                        holds,
                        "{} is live for {} but reserved for {owner:?}",
                        token_name, user_name
                    );
                    // At least the grace (100 ms) longer: the reservation
                    // covers a JWT presented a little after its session ended.
                    assert!(
                        reservation + 2 >= session + 100,
                        "the reservation ({reservation} ms) ends less than the grace after the \
                         session ({session} ms)"
                    );
                }
                if !self.revoked.contains(&(user, token)) {
                    continue;
                }
                assert_eq!(session, -2, "a revoked session is live");
                let marker = self.pttl(store.revoked_key(&user_id, token_name)).await;
                if holds {
                    // Read after the reservation, by a separate command: a
                    // millisecond tick between the two reads is not a fault.
                    assert!(
                        marker + 2 >= reservation,
                        "the marker ({marker} ms) ends before the reservation ({reservation} ms)"
                    );
                }
                if marker < 30 {
                    // Its reservation, if held, ends sooner still: from the
                    // next step on the token id may be created again (any JWT
                    // carrying it has expired).
                    self.revoked.remove(&(user, token));
                }
            }
        }
    }
}

async fn walk(seed: u64, steps: usize) {
    let reader = Settings {
        key_prefix: format!("finality-model-{seed}-{:x}:", super::random_u64()),
        max_sessions_per_user: 2,
        ..Settings::for_tests("redis://127.0.0.1:6379")
    };
    let settings = Settings {
        owner_grace: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
        ..reader.clone()
    };
    assert_eq!(millis(settings.owner_grace + settings.timeout), 300);
    let mut walk = Walk {
        store: Store::new(settings).unwrap(),
        reader: Store::new(reader).unwrap(),
        rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        revoked: HashSet::new(),
        pending: Vec::new(),
        log: Vec::new(),
    };
    for _ in 0..steps {
        walk.step().await;
        let checked = tokio::spawn({
            let mut walk = Walk {
                store: walk.store.clone(),
                reader: walk.reader.clone(),
                rng: Rng(1),
                revoked: std::mem::take(&mut walk.revoked),
                pending: Vec::new(),
                log: Vec::new(),
            };
            async move {
                walk.check().await;
                walk.revoked
            }
        })
        .await;
        match checked {
            Ok(revoked) => walk.revoked = revoked,
            Err(panic) => panic!(
                "seed {seed}, after steps (choice user token ttl) {:?}: {panic}",
                walk.log
            ),
        }
    }
}

/// 24 seeded walks of 80 steps, eight at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_stays_final_under_random_interleavings() {
    for batch in 0..3u64 {
        let walks: Vec<_> = (0..8)
            .map(|i| tokio::spawn(walk(batch * 8 + i, 80)))
            .collect();
        for walk in walks {
            walk.await.unwrap();
        }
    }
    let rotated = ROTATED.load(std::sync::atomic::Ordering::Relaxed);
    let reused = REUSED.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{rotated} rotations and {reused} reuse detections in the walks");
    assert!(
        rotated > 0 && reused > 0,
        "the walks never rotated ({rotated}) or never saw reuse ({reused})"
    );
}
