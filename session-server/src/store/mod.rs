//! Sessions and login counters in Redis: the key layout, the Lua scripts and
//! the connection pool. This is the only module that speaks to Redis, and it
//! knows nothing of gRPC. One concern per file:
//!
//! - `connection`: the pool or cluster connection;
//! - `op`: one operation on it, bound by a deadline, with its latency histogram;
//! - `credentials`: the Redis password and CA files, re-read for new
//!   connections, and REDIS_URL with its passwords hidden;
//! - `sessions`: create, look up, revoke, count and list sessions;
//! - `families`: rotate a family's session (with reuse detection), extend one;
//! - `login`: the login rate limiter and its trusted devices;
//! - `health`: what readiness asks of Redis beyond PING (the eviction policy);
//! - `revocations`: the revocation stream's subscriber and heartbeats;
//! - `settings`: what the store is told (`Settings`, `LimitPolicy`, `RedisMode`);
//! - `replication`: waiting for replicas to acknowledge revocations
//!   (REVOCATION_MIN_REPLICAS), on connections of its own;
//! - `scripts/`: the Lua scripts, each with a KEYS/ARGV/returns header.
//!
//! # Keys
//!
//! With `P` the optional KEY_PREFIX, and braces kept literally so that they are
//! Redis Cluster hash tags (all of one user's keys share a slot):
//!
//! | key | value |
//! |---|---|
//! | `P session:{user}:{token}` | the session as JSON, expiring with it |
//! | `P user_sessions:{user}` | sorted set of token ids scored by expiry (ms); expires with its newest member |
//! | `P token_owner:{token}` | the token's user id: reserves the token id across users and answers token-only lookups |
//! | `P revoked:{user}:{token}` | revocation marker `{"revoked_at_ms":..,"reason":..}`: the token id is never live again; lives as long as the token's reservation |
//! | `P reservations:{user}` | sorted set of token ids scored by the latest end (ms) a create's (or rotation's, or extension's) token claim may give their reservation, recorded before the claim runs |
//! | `P family:{user}:{family}` | a session family (see `families`): hash of `cur` (its current token id), `prev` (the one before, or empty), `rot` (when `cur` replaced `prev`, ms) and `end` (the family's absolute end, ms); expires with its current session |
//! | `P replicated:{user}` | `1`, written by a replication wait (REVOCATION_MIN_REPLICAS) just before its `WAIT`, on a connection of its own in the user's slot; expires within REDIS_TIMEOUT_MS (see `replication`) |
//! | `P rate_limit:login:addr:{addr}` | login attempts of a client address (IPv4, or IPv6 network `net/len`): hash of bucket index -> allowed attempts (see `login`); expires when its newest bucket leaves the window |
//! | `P rate_limit:login:pair:{addr}:acct` | the part of the address's attempts made for one account (`acct` = SHA-256 hex of the account), same buckets and slot as the address's counter, so a reset with the account can subtract exactly it |
//! | `P rate_limit:login:account:{acct}` | login attempts for one account, from any address; its own slot |
//! | `P rate_limit:login:devices:{acct}` | the account's trusted devices (see `login`): sorted set of device token hashes (SHA-256 hex, never the token) scored by expiry (ms), at most LOGIN_DEVICE_MAX; expires with its newest member; the account's slot |
//! | `P rate_limit:login:device_refusals:{acct}` | hash of device token hash -> refusals over the token's life; expires with the devices set, and a member leaves it with its device |
//! | `P rate_limit:login:device:{acct}:dev` | login attempts of one trusted device (`dev` = its token hash), buckets as the address's counter; the account's slot, so one script sees it beside the devices set |
//!
//! and one pub/sub channel, `P revocations`: every script that ends a session
//! early publishes it there in the same step (see `revocations`).
//!
//! Whether a session is valid is decided in one place: its `session:` key
//! exists. The index and the owner reservation only point at it. A reservation
//! is never deleted early (only extended); it lasts the ttl asked for plus
//! `OWNER_GRACE` plus the operation timeout (the create script refuses to
//! create a session more than the timeout after the create's first step,
//! which ran before the claim), so it outlives every session of its token by
//! at least `OWNER_GRACE`, and a token id revoked for one user cannot be taken by
//! another while a JWT carrying it could still be presented.
//!
//! Revocation is final. Every script that ends a session early (revoke one,
//! revoke all, eviction at the cap) replaces it with a `revoked:` marker in the
//! same atomic step, and the create script refuses a token id with a marker.
//! The invariant: for every token id, while any reservation of it exists, a
//! revocation of it is remembered at least as long. It holds by construction,
//! whichever round trip of a create fails, is cancelled or never runs: a
//! create is three steps (see `sessions`): `prepare_create.lua` in the user's
//! slot answers replays of a revoked or live session (claiming nothing) and
//! otherwise records in `reservations:` the latest end the claim may give the
//! reservation; `claim_token.lua` in the token's slot refuses to run past the
//! deadline that step set; `create_session.lua` in the user's slot creates the
//! session. A revocation keeps its marker until the recorded end (or the
//! session's remaining life plus the slack, if later). All of it lives in the user's
//! slot beside the session, so one script sees both. None of this survives key eviction, which is
//! why readiness requires `maxmemory-policy noeviction`.

mod connection;
pub(crate) mod credentials;
mod families;
#[cfg(test)]
mod finality_model;
pub mod health;
mod login;
mod op;
mod replication;
mod revocations;
mod sessions;
mod settings;

pub use replication::ReplicaShortfall;
pub use revocations::{REVOCATION_BACKLOG, RedisClock, RevocationEvent, RevocationFeed};
pub use sessions::MAX_LIFETIME;
pub use settings::{LimitPolicy, RedisMode, Settings};

use std::{fmt, sync::Arc, time::Duration};

use redis::FromRedisValue;

use crate::{
    error::Error,
    model::{AccountKey, ClientAddr, FamilyId, TokenId, UserId},
};

use connection::Backend;

/// A random number for jitter and instance ids; not for secrets. A fresh
/// `RandomState` is randomly keyed: its hash of nothing is a random number,
/// without a dependency on a random number crate.
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(())
}

/// How much longer a token reservation and a revocation marker live than their
/// session, beyond the operation timeout (which covers the time between
/// reserving the token and creating the session): clock skew between the
/// JWT's issuer and Redis.
pub const OWNER_GRACE: Duration = Duration::from_secs(60);

/// A cheap-to-clone handle to the session data in Redis.
#[derive(Clone, Debug)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    backend: Backend,
    /// The Redis password and CA as last read, for the pool's new connections
    /// and the revocation subscriber's alike.
    secrets: Arc<credentials::Secrets>,
    settings: Settings,
    scripts: Scripts,
    /// Creates for one user that must evict take turns within this process
    /// (see `Store::create_session`): one lock per user id hash, striped so
    /// the table stays small. Users sharing a stripe only wait for each
    /// other's eviction round trip.
    create_turns: CreateTurns,
    /// The revocation subscriber, while a WatchRevocations stream is open.
    revocations: revocations::Hub,
    /// See [`Store::revocation_channel`].
    revocation_channel: String,
}

/// The striped per-user locks of [`Shared::create_turns`].
struct CreateTurns {
    hasher: std::hash::RandomState,
    stripes: Box<[tokio::sync::Mutex<()>]>,
}

impl fmt::Debug for CreateTurns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTurns")
            .field("stripes", &self.stripes.len())
            .finish_non_exhaustive()
    }
}

/// How many locks [`CreateTurns`] stripes users over.
const CREATE_TURN_STRIPES: usize = 1024;

/// The Lua scripts, hashed once; `redis::Script` runs them with EVALSHA and
/// loads them on a NOSCRIPT answer.
struct Scripts {
    prepare_create: redis::Script,
    claim_token: redis::Script,
    create_session: redis::Script,
    prepare_rotate: redis::Script,
    rotate_session: redis::Script,
    prepare_extend: redis::Script,
    extend_session: redis::Script,
    revoke_sessions: redis::Script,
    count_sessions: redis::Script,
    login_attempt: redis::Script,
    login_undo: redis::Script,
    login_account_undo: redis::Script,
    login_account_reset: redis::Script,
    replication_proof: redis::Script,
    login_reset: redis::Script,
    login_device_attempt: redis::Script,
    login_device_reset: redis::Script,
    login_device_forget: redis::Script,
}

impl fmt::Debug for Scripts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scripts")
    }
}

/// A script of `scripts/` as Redis runs it: `scripts/lib.lua`'s helpers, then
/// the script.
macro_rules! script {
    ($name:literal) => {
        redis::Script::new(concat!(
            include_str!("scripts/lib.lua"),
            include_str!(concat!("scripts/", $name, ".lua"))
        ))
    };
}

impl Scripts {
    fn load() -> Self {
        Self {
            prepare_create: script!("prepare_create"),
            claim_token: script!("claim_token"),
            create_session: script!("create_session"),
            prepare_rotate: script!("prepare_rotate"),
            rotate_session: script!("rotate_session"),
            prepare_extend: script!("prepare_extend"),
            extend_session: script!("extend_session"),
            revoke_sessions: script!("revoke_sessions"),
            count_sessions: script!("count_sessions"),
            login_attempt: script!("login_attempt"),
            login_undo: script!("login_undo"),
            login_account_undo: script!("login_account_undo"),
            login_account_reset: script!("login_account_reset"),
            replication_proof: script!("replication_proof"),
            login_reset: script!("login_reset"),
            login_device_attempt: script!("login_device_attempt"),
            login_device_reset: script!("login_device_reset"),
            login_device_forget: script!("login_device_forget"),
        }
    }
}

impl Store {
    /// Builds the store and its pool. Connections are made on demand, so the
    /// server can start (and report NOT_SERVING) while Redis is down.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `REDIS_URL` when the URL does not parse.
    pub fn new(settings: Settings) -> Result<Self, Error> {
        let secrets = Arc::new(credentials::Secrets::new(&settings));
        let backend = Backend::new(&settings, &secrets)?;
        Ok(Self::with_backend(backend, secrets, settings))
    }

    fn with_backend(
        backend: Backend,
        secrets: Arc<credentials::Secrets>,
        settings: Settings,
    ) -> Self {
        let revocation_channel = match connection::database(&settings) {
            0 => format!("{}revocations", settings.key_prefix),
            db => format!("{}revocations:db{db}", settings.key_prefix),
        };
        Self {
            shared: Arc::new(Shared {
                backend,
                secrets,
                settings,
                scripts: Scripts::load(),
                create_turns: CreateTurns {
                    hasher: std::hash::RandomState::new(),
                    stripes: (0..CREATE_TURN_STRIPES)
                        .map(|_| tokio::sync::Mutex::new(()))
                        .collect(),
                },
                revocations: revocations::Hub::default(),
                revocation_channel,
            }),
        }
    }

    /// The settings the store was built with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Publishes the pool's size and use as gauges.
    pub fn record_pool_metrics(&self) {
        let Backend::Pool { pool, .. } = &self.shared.backend else {
            // A cluster connection is not pooled: one multiplexed link per node.
            return;
        };
        let state = pool.state();
        metrics::gauge!(crate::metrics::POOL_CONNECTIONS).set(state.connections);
        metrics::gauge!(crate::metrics::POOL_IN_USE)
            .set(state.connections.saturating_sub(state.idle_connections));
        metrics::gauge!(crate::metrics::POOL_MAX).set(self.shared.settings.pool_size);
    }

    /// Checks that Redis answers, within the timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] or [`Error::Timeout`] when it does not.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut op = self.op("ping").await?;
        let _: String = op.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// Runs one raw command on the store's connection, whatever the mode, for
    /// diagnostics and for tests that inspect the key layout.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn raw_command<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        self.op("raw_command").await?.query(cmd).await
    }
}

/// `parts` joined: the keys are built on every call, and `format!` cost
/// about 700 instructions a key (its formatting machinery and a growing
/// buffer) where one exact allocation and a few copies do (BENCHMARKS.md, #15).
fn key(parts: &[&str]) -> String {
    let mut key = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        key.push_str(part);
    }
    key
}

/// A key as its parts, written straight into a command as one argument:
/// where a command is built on every call (GetSession's GET), the key's own
/// `String` (an allocation, the copies and a free) is saved
/// (BENCHMARKS.md, "#22 hot path"). The same bytes as [`key`] joins.
pub(crate) struct KeyParts<'a, const N: usize>([&'a str; N]);

impl<const N: usize> KeyParts<'_, N> {
    /// The key's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(|part| part.len()).sum()
    }
}

impl<const N: usize> redis::ToRedisArgs for KeyParts<'_, N> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.0 {
            // The command's buffer is a `Vec`, whose writes do not fail.
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

impl Store {
    fn prefix(&self) -> &str {
        &self.shared.settings.key_prefix
    }

    pub(crate) fn session_key(&self, user: &UserId, token: &str) -> String {
        key(&self.session_key_parts(user, token).0)
    }

    /// [`Store::session_key`] as its parts, for a command built per call.
    pub(crate) fn session_key_parts<'a>(
        &'a self,
        user: &'a UserId,
        token: &'a str,
    ) -> KeyParts<'a, 6> {
        KeyParts([self.prefix(), "session:{", user.as_str(), "}:{", token, "}"])
    }

    pub(crate) fn revoked_key(&self, user: &UserId, token: &str) -> String {
        key(&[self.prefix(), "revoked:{", user.as_str(), "}:{", token, "}"])
    }

    pub(crate) fn reservations_key(&self, user: &UserId) -> String {
        key(&[self.prefix(), "reservations:{", user.as_str(), "}"])
    }

    pub(crate) fn family_key(&self, user: &UserId, family: &FamilyId) -> String {
        key(&[
            self.prefix(),
            "family:{",
            user.as_str(),
            "}:{",
            family.as_str(),
            "}",
        ])
    }

    /// Waits for this process's turn to run an evicting create for `user`.
    pub(crate) async fn create_turn(&self, user: &UserId) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::BuildHasher;
        let turns = &self.shared.create_turns;
        // The modulo keeps the index below the stripe count, which fits a usize.
        let stripe = usize::try_from(turns.hasher.hash_one(user) % turns.stripes.len() as u64)
            .unwrap_or_default();
        turns.stripes[stripe].lock().await
    }

    pub(crate) fn index_key(&self, user: &UserId) -> String {
        key(&[self.prefix(), "user_sessions:{", user.as_str(), "}"])
    }

    pub(crate) fn owner_key(&self, token: &TokenId) -> String {
        key(&[self.prefix(), "token_owner:{", token.as_str(), "}"])
    }

    pub(crate) fn rate_limit_key(&self, addr: &ClientAddr) -> String {
        key(&[self.prefix(), "rate_limit:login:addr:{", addr.as_str(), "}"])
    }

    /// The (address, account) pair counter: tagged by the address, so it
    /// shares the slot of [`Store::rate_limit_key`].
    pub(crate) fn login_pair_key(&self, addr: &ClientAddr, account: &AccountKey) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:pair:{",
            addr.as_str(),
            "}:",
            account.as_str(),
        ])
    }

    /// The account's trusted devices: tagged by the account, as are the two
    /// below, so one script sees the set and a device's counters.
    pub(crate) fn login_devices_key(&self, account: &AccountKey) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:devices:{",
            account.as_str(),
            "}",
        ])
    }

    pub(crate) fn login_device_refusals_key(&self, account: &AccountKey) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:device_refusals:{",
            account.as_str(),
            "}",
        ])
    }

    /// One device's counter; `device` is the token's hash.
    pub(crate) fn login_device_key(&self, account: &AccountKey, device: &str) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:device:{",
            account.as_str(),
            "}:",
            device,
        ])
    }

    pub(crate) fn login_account_key(&self, account: &AccountKey) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:account:{",
            account.as_str(),
            "}",
        ])
    }

    /// The account counter's reset epoch (login_account_reset.lua), in its
    /// slot.
    pub(crate) fn login_account_epoch_key(&self, account: &AccountKey) -> String {
        key(&[
            self.prefix(),
            "rate_limit:login:account_epoch:{",
            account.as_str(),
            "}",
        ])
    }
}

/// Counts a failed store operation by kind, and passes the error on.
fn record_error(op: &'static str, err: Error) -> Error {
    let kind = error_kind(&err);
    metrics::counter!(crate::metrics::REDIS_ERRORS, "op" => op, "kind" => kind).increment(1);
    err
}

/// A store error's kind: the `kind` label of REDIS_ERRORS and the
/// `error.type` of an operation's span; never its message, which may name a
/// key.
fn error_kind(err: &Error) -> &'static str {
    match err {
        Error::InvalidArgument { .. } => "invalid_argument",
        Error::Unavailable(_) => "unavailable",
        Error::Timeout(_) => "timeout",
        Error::Busy(_) => "busy",
        Error::NotReplicated { .. } => "not_replicated",
        Error::OutOfMemory(_) => "out_of_memory",
        Error::Internal(_) => "internal",
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::replication::slot;

    fn store(prefix: &str) -> Store {
        Store::new(Settings {
            key_prefix: prefix.into(),
            ..Settings::for_tests("redis://127.0.0.1:6379")
        })
        .unwrap()
    }

    /// A key written into a command from its parts is the key, as one
    /// argument, and [`KeyParts::len`] its length.
    #[tokio::test]
    async fn key_parts_write_the_key_as_one_argument() {
        let store = store("tenant-a:");
        let user = UserId::parse("user_id", "u-1".into()).unwrap();
        let parts = store.session_key_parts(&user, "tok-2");
        let key = store.session_key(&user, "tok-2");
        assert_eq!(key, "tenant-a:session:{u-1}:{tok-2}");
        assert_eq!(parts.len(), key.len());
        let mut from_parts = redis::Cmd::with_capacity(2, 3 + parts.len());
        from_parts.arg("GET").arg(&parts);
        assert_eq!(
            from_parts.get_packed_command(),
            redis::cmd("GET").arg(&key).get_packed_command()
        );
    }

    #[test]
    fn slot_rule_matches_redis() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(slot("123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
    }

    /// Every script's keys (and the MGET of ListUserSessions) hash to one slot,
    /// so no call can meet CROSSSLOT on Redis Cluster.
    #[tokio::test]
    async fn every_scripts_keys_share_a_slot() {
        let users = ["alice", "u-1", "x", "~!@#$%^&*()", "a".repeat(256).leak()];
        let tokens = ["t", "tok-2", "jti.abc", "z".repeat(256).leak()];
        for prefix in ["", "tenant-a:", "a:b:"] {
            let store = store(prefix);
            for user in users {
                let user = UserId::parse("user_id", user.to_string()).unwrap();
                let index = store.index_key(&user);
                // create_session, revoke_sessions, list's MGET, and the
                // families' scripts (prepare_rotate, rotate_session,
                // prepare_extend, extend_session).
                let family = crate::model::FamilyId::generate().unwrap();
                let mut keys = vec![
                    index.clone(),
                    store.replicated_key(&user, "proof"),
                    store.reservations_key(&user),
                    store.family_key(&user, &family),
                ];
                keys.extend(tokens.iter().map(|t| store.session_key(&user, t)));
                keys.extend(tokens.iter().map(|t| store.revoked_key(&user, t)));
                let slots: std::collections::HashSet<_> = keys.iter().map(|k| slot(k)).collect();
                assert_eq!(slots.len(), 1, "keys of {user} span slots: {keys:?}");
                assert_eq!(
                    slot(&index),
                    slot(user.as_str()),
                    "the hash tag is the user id"
                );
            }
            // claim_token and count_sessions touch one key each.
            let token = TokenId::parse("token_id", "tok".into()).unwrap();
            assert_eq!(slot(&store.owner_key(&token)), slot("tok"));
            // login_attempt, login_undo and login_reset: the address's counter
            // and its pair counters share the address's slot; the account's
            // counter is used alone (see `login` for why that is correct).
            for (ip, tag) in [
                ("2001:db8::1", "2001:db8::/64"),
                ("192.0.2.1", "192.0.2.1"),
                ("::ffff:192.0.2.1", "192.0.2.1"),
            ] {
                let addr = ClientAddr::parse(ip).unwrap();
                let counter = store.rate_limit_key(&addr);
                assert_eq!(slot(&counter), slot(tag));
                for account in ["alice", "bob@example.com", "{x}:y"] {
                    let account = AccountKey::parse(account).unwrap();
                    assert_eq!(slot(&store.login_pair_key(&addr, &account)), slot(&counter));
                    let alone = store.login_account_key(&account);
                    assert_eq!(slot(&alone), slot(account.as_str()));
                    // The device scripts: the set, the refusals, a
                    // device's counter and the account counter's reset
                    // epoch share the account's slot.
                    let device = crate::model::DeviceToken::generate().unwrap().key();
                    for device_key in [
                        store.login_devices_key(&account),
                        store.login_device_refusals_key(&account),
                        store.login_device_key(&account, &device),
                        store.login_account_epoch_key(&account),
                    ] {
                        assert_eq!(slot(&device_key), slot(&alone));
                    }
                }
            }
        }
    }
}
