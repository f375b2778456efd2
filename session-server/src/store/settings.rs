//! The store's settings, as `config` builds them from the environment: what
//! the store needs to know, without the CLI library (`config` maps its own
//! value enums onto [`LimitPolicy`] and [`RedisMode`]).

use std::{fmt, time::Duration};

use super::credentials;

#[cfg(test)]
use super::OWNER_GRACE;

/// What to do when a user already has MAX_SESSIONS_PER_USER live sessions.
/// (`config` parses it from SESSION_LIMIT_POLICY.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Revoke the user's oldest sessions (closest to expiry) to make room.
    EvictOldest,
    /// Refuse the new session (created = false).
    Reject,
}

impl LimitPolicy {
    pub(super) fn as_script_arg(self) -> &'static str {
        match self {
            Self::EvictOldest => "evict_oldest",
            Self::Reject => "reject",
        }
    }
}

/// Which kind of Redis deployment the store talks to. (`config` parses it
/// from REDIS_MODE.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis server (REDIS_URL is its URL).
    Standalone,
    /// Redis Cluster (REDIS_URL is a comma-separated list of seed nodes); the
    /// connection follows MOVED/ASK redirections and failovers itself.
    Cluster,
    /// A master found through Redis Sentinel (REDIS_URL is a comma-separated
    /// list of sentinels, REDIS_SENTINEL_MASTER the master's name); a broken
    /// connection is replaced by one to whichever master the sentinels name.
    Sentinel,
}

/// Everything the store needs to know, decided once at start.
///
/// Its `Debug` output hides the Redis password, in `redis_url` and in
/// `redis_password`.
#[derive(Clone)]
pub struct Settings {
    /// The kind of deployment.
    pub mode: RedisMode,
    /// Redis connection URL (`redis://`, `rediss://`); a comma-separated list
    /// of seed nodes or sentinels in cluster and sentinel modes.
    pub redis_url: String,
    /// The master's name, in sentinel mode.
    pub sentinel_master: String,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Lifetime of a session created without a ttl.
    pub session_ttl: Duration,
    /// The longest ttl a caller may ask for.
    pub session_ttl_max: Duration,
    /// A family's absolute lifetime when CreateSession names none.
    pub session_max_lifetime: Duration,
    /// How long a rotated-away token still gets ALREADY_ROTATED.
    pub rotation_grace: Duration,
    /// Cap on live sessions per user.
    pub max_sessions_per_user: u32,
    /// What happens at the cap.
    pub limit_policy: LimitPolicy,
    /// Length of a login rate-limit window.
    pub rate_limit_window: Duration,
    /// Attempts allowed per client address per window.
    pub rate_limit_max_attempts: u32,
    /// Attempts allowed per account per window, from all addresses together.
    pub rate_limit_account_max_attempts: u32,
    /// The prefix length IPv6 client addresses are grouped by.
    pub rate_limit_ipv6_prefix: u8,
    /// Attempts allowed per trusted device per window.
    pub rate_limit_device_max_attempts: u32,
    /// How long an issued device token trusts its device.
    pub login_device_ttl: Duration,
    /// Device tokens kept per account (issuing past it forgets the oldest).
    pub login_device_max: u32,
    /// Refusals, in multiples of the device limit, after which a device
    /// token is forgotten for good.
    pub login_device_lockout_factor: u32,
    /// Number of multiplexed Redis connections.
    pub pool_size: u32,
    /// Bound on each store operation: pool wait, connect and Redis round trips.
    pub timeout: Duration,
    /// How often each process sends a heartbeat through the revocation
    /// channel (REVOCATION_HEARTBEAT_MS).
    pub revocation_heartbeat: Duration,
    /// REVOCATION_MIN_REPLICAS: how many replicas must acknowledge a
    /// revocation's writes before it is answered OK (0: none asked; see
    /// `replication`).
    pub revocation_min_replicas: u32,
    /// REVOCATION_REPLICA_TIMEOUT_MS: how long a revocation waits for them.
    pub revocation_replica_timeout: Duration,
    /// How much longer a token's reservation and a revocation marker live
    /// than their session, beyond the operation timeout: [`OWNER_GRACE`](super::OWNER_GRACE),
    /// not a setting. Tests shorten it to see reservations and markers end.
    pub owner_grace: Duration,
    /// REDIS_PASSWORD_FILE and REDIS_CA_FILE: re-read for each new pooled
    /// or pub/sub connection (standalone and sentinel modes), so rotated
    /// secrets need no restart; a cluster connection keeps what it started
    /// with.
    pub redis_password_file: Option<std::path::PathBuf>,
    /// See `redis_password_file`.
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Password overriding any in the URL (from REDIS_PASSWORD_FILE).
    pub redis_password: Option<String>,
    /// PEM roots to verify a `rediss://` server with (from REDIS_CA_FILE).
    pub redis_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field does not compile until it is
        // listed here: every field is shown but the password.
        let Self {
            mode,
            redis_url,
            sentinel_master,
            key_prefix,
            session_ttl,
            session_ttl_max,
            session_max_lifetime,
            rotation_grace,
            max_sessions_per_user,
            limit_policy,
            rate_limit_window,
            rate_limit_max_attempts,
            rate_limit_account_max_attempts,
            rate_limit_ipv6_prefix,
            rate_limit_device_max_attempts,
            login_device_ttl,
            login_device_max,
            login_device_lockout_factor,
            pool_size,
            timeout,
            revocation_heartbeat,
            revocation_min_replicas,
            revocation_replica_timeout,
            owner_grace,
            redis_password_file,
            redis_ca_file,
            redis_password,
            redis_ca_pem,
        } = self;
        f.debug_struct("Settings")
            .field("mode", mode)
            .field("redis_url", &credentials::redact_redis_urls(redis_url))
            .field("sentinel_master", sentinel_master)
            .field("key_prefix", key_prefix)
            .field("session_ttl", session_ttl)
            .field("session_ttl_max", session_ttl_max)
            .field("session_max_lifetime", session_max_lifetime)
            .field("rotation_grace", rotation_grace)
            .field("max_sessions_per_user", max_sessions_per_user)
            .field("limit_policy", limit_policy)
            .field("rate_limit_window", rate_limit_window)
            .field("rate_limit_max_attempts", rate_limit_max_attempts)
            .field(
                "rate_limit_account_max_attempts",
                rate_limit_account_max_attempts,
            )
            .field("rate_limit_ipv6_prefix", rate_limit_ipv6_prefix)
            .field(
                "rate_limit_device_max_attempts",
                rate_limit_device_max_attempts,
            )
            .field("login_device_ttl", login_device_ttl)
            .field("login_device_max", login_device_max)
            .field("login_device_lockout_factor", login_device_lockout_factor)
            .field("pool_size", pool_size)
            .field("timeout", timeout)
            .field("revocation_heartbeat", revocation_heartbeat)
            .field("revocation_min_replicas", revocation_min_replicas)
            .field("revocation_replica_timeout", revocation_replica_timeout)
            .field("owner_grace", owner_grace)
            .field("redis_password_file", redis_password_file)
            .field("redis_ca_file", redis_ca_file)
            .field("redis_password", &redis_password.as_ref().map(|_| "***"))
            .field(
                "redis_ca_pem",
                &redis_ca_pem
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .finish()
    }
}

#[cfg(test)]
impl Settings {
    /// The settings `Config::defaults` gives, for the Redis at `redis_url`:
    /// built here so the store's unit tests need no `config` (a test in
    /// `config` checks the two agree).
    pub(crate) fn for_tests(redis_url: &str) -> Self {
        Self {
            mode: RedisMode::Standalone,
            redis_url: redis_url.into(),
            sentinel_master: "mymaster".into(),
            key_prefix: String::new(),
            session_ttl: Duration::from_secs(900),
            session_ttl_max: Duration::from_secs(86_400),
            session_max_lifetime: Duration::from_secs(2_592_000),
            rotation_grace: Duration::from_secs(30),
            max_sessions_per_user: 10,
            limit_policy: LimitPolicy::EvictOldest,
            rate_limit_window: Duration::from_secs(900),
            rate_limit_max_attempts: 5,
            rate_limit_account_max_attempts: 10,
            rate_limit_ipv6_prefix: 64,
            rate_limit_device_max_attempts: 10,
            login_device_ttl: Duration::from_secs(2_592_000),
            login_device_max: 20,
            login_device_lockout_factor: 10,
            pool_size: 8,
            timeout: Duration::from_millis(1000),
            revocation_heartbeat: Duration::from_millis(1000),
            revocation_min_replicas: 0,
            revocation_replica_timeout: Duration::from_millis(200),
            owner_grace: OWNER_GRACE,
            redis_password_file: None,
            redis_ca_file: None,
            redis_password: None,
            redis_ca_pem: None,
        }
    }
}
