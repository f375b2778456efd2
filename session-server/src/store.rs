//! Sessions and login counters in Redis: the key layout, the Lua scripts and
//! the connection pool. This is the only module that speaks to Redis, and it
//! knows nothing of gRPC.
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
//! | `P rate_limit:login:{ip}` | login attempt counter, expiring with its window |
//!
//! Whether a session is valid is decided in one place: its `session:` key
//! exists. The index and the owner reservation only point at it. A reservation
//! is never deleted early (only extended); it expires `OWNER_GRACE` after the
//! longest session of its token could have, so a token id revoked for one user
//! cannot be taken by another while a JWT carrying it could still be presented.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, FromRedisValue, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use tokio::time::{Instant, timeout_at};

use crate::{
    error::Error,
    model::{ClientAddr, CreateOutcome, LoginVerdict, NewSession, Session, TokenId, UserId},
};

/// How much longer a token reservation lives than its session: covers the time
/// between reserving the token and creating the session.
const OWNER_GRACE: Duration = Duration::from_secs(60);

/// How many times CreateSession re-runs its script when eviction candidates
/// changed under it before giving up with [`Error::Contention`].
const MAX_CREATE_ATTEMPTS: usize = 5;

/// What to do when a user already has MAX_SESSIONS_PER_USER live sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LimitPolicy {
    /// Revoke the user's oldest sessions (closest to expiry) to make room.
    #[value(name = "evict_oldest", alias = "evict-oldest")]
    EvictOldest,
    /// Refuse the new session (created = false).
    Reject,
}

impl LimitPolicy {
    fn as_script_arg(self) -> &'static str {
        match self {
            Self::EvictOldest => "evict_oldest",
            Self::Reject => "reject",
        }
    }
}

/// Which kind of Redis deployment the store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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
#[derive(Clone, Debug)]
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
    /// Cap on live sessions per user.
    pub max_sessions_per_user: u32,
    /// What happens at the cap.
    pub limit_policy: LimitPolicy,
    /// Length of a login rate-limit window.
    pub rate_limit_window: Duration,
    /// Attempts allowed per window.
    pub rate_limit_max_attempts: u32,
    /// Number of multiplexed Redis connections.
    pub pool_size: u32,
    /// Bound on each store operation: pool wait, connect and Redis round trips.
    pub timeout: Duration,
    /// Password overriding any in the URL (from REDIS_PASSWORD_FILE).
    pub redis_password: Option<String>,
    /// PEM roots to verify a `rediss://` server with (from REDIS_CA_FILE).
    pub redis_ca_pem: Option<Vec<u8>>,
}

/// A cheap-to-clone handle to the session data in Redis.
#[derive(Clone, Debug)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    backend: Backend,
    settings: Settings,
    scripts: Scripts,
}

/// How connections are had: one store, one connection type chosen at start.
enum Backend {
    /// Standalone and sentinel: a bb8 pool of multiplexed connections.
    Pool(bb8::Pool<RedisManager>),
    /// Cluster: one cluster connection (itself multiplexed over every node),
    /// made on first use so the server can start while the cluster is down.
    Cluster {
        /// Boxed: the client is large, and there is one per process.
        client: Box<ClusterClient>,
        connection: tokio::sync::OnceCell<ClusterConnection>,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pool(pool) => f.debug_tuple("Pool").field(&pool.state()).finish(),
            Self::Cluster { .. } => f.write_str("Cluster"),
        }
    }
}

/// The Lua scripts, hashed once; `redis::Script` runs them with EVALSHA and
/// loads them on a NOSCRIPT answer.
struct Scripts {
    claim_token: redis::Script,
    create_session: redis::Script,
    revoke_session: redis::Script,
    revoke_sessions: redis::Script,
    count_sessions: redis::Script,
    login_attempt: redis::Script,
}

impl fmt::Debug for Scripts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scripts")
    }
}

impl Scripts {
    fn load() -> Self {
        Self {
            claim_token: redis::Script::new(include_str!("scripts/claim_token.lua")),
            create_session: redis::Script::new(include_str!("scripts/create_session.lua")),
            revoke_session: redis::Script::new(include_str!("scripts/revoke_session.lua")),
            revoke_sessions: redis::Script::new(include_str!("scripts/revoke_sessions.lua")),
            count_sessions: redis::Script::new(include_str!("scripts/count_sessions.lua")),
            login_attempt: redis::Script::new(include_str!("scripts/login_attempt.lua")),
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
        let connector = match settings.mode {
            RedisMode::Standalone => Connector::Direct(redis_client(&settings)?),
            RedisMode::Sentinel => {
                Connector::Sentinel(tokio::sync::Mutex::new(sentinel_client(&settings)?))
            }
            RedisMode::Cluster => {
                let backend = Backend::Cluster {
                    client: Box::new(cluster_client(&settings)?),
                    connection: tokio::sync::OnceCell::new(),
                };
                return Ok(Self::with_backend(backend, settings));
            }
        };
        let manager = RedisManager {
            connector,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                // Each operation is bounded by `Settings::timeout` as a whole.
                .set_response_timeout(None),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.pool_size)
            // A PING per checkout would double the round trips; broken
            // connections are found by `RedisManager::has_broken` instead.
            .test_on_check_out(false)
            .connection_timeout(settings.timeout)
            // Fail at once when Redis refuses connections rather than spinning
            // until the timeout: the caller gets UNAVAILABLE and may retry.
            .retry_connection(false)
            .build_unchecked(manager);
        Ok(Self::with_backend(Backend::Pool(pool), settings))
    }

    fn with_backend(backend: Backend, settings: Settings) -> Self {
        Self {
            shared: Arc::new(Shared {
                backend,
                settings,
                scripts: Scripts::load(),
            }),
        }
    }

    /// The settings the store was built with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Publishes the pool's size and use as gauges.
    pub fn record_pool_metrics(&self) {
        let Backend::Pool(pool) = &self.shared.backend else {
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

    /// Stores a new session, reserving its token id first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ttl` when it is zero or above
    /// SESSION_TTL_MAX; Redis failures as [`Error::Unavailable`],
    /// [`Error::Timeout`] or [`Error::OutOfMemory`]; [`Error::Contention`]
    /// when eviction candidates kept changing.
    pub async fn create_session(&self, new: NewSession) -> Result<CreateOutcome, Error> {
        let settings = self.settings();
        let ttl = match new.ttl {
            None => settings.session_ttl,
            Some(ttl) if ttl.is_zero() => {
                return Err(Error::invalid("ttl", "must be positive"));
            }
            Some(ttl) if ttl > settings.session_ttl_max => {
                return Err(Error::invalid(
                    "ttl",
                    format!(
                        "must be at most SESSION_TTL_MAX ({} s), got {:?}",
                        settings.session_ttl_max.as_secs(),
                        ttl
                    ),
                ));
            }
            Some(ttl) if ttl.subsec_nanos() % 1_000_000 != 0 => {
                return Err(Error::invalid(
                    "ttl",
                    "must be a whole number of milliseconds",
                ));
            }
            Some(ttl) => ttl,
        };
        let ttl_ms = millis(ttl);
        let scripts = &self.shared.scripts;
        let mut op = self.op("create_session").await?;

        let reserved: i64 = op
            .invoke(
                scripts
                    .claim_token
                    .key(self.owner_key(&new.token_id))
                    .arg(new.user_id.as_str())
                    .arg(ttl_ms + millis(OWNER_GRACE)),
            )
            .await?;
        if reserved == 0 {
            return Ok(CreateOutcome::TokenTaken);
        }

        let head = session_json_head(&new)?;
        let session_key = self.session_key(&new.user_id, new.token_id.as_str());
        let index_key = self.index_key(&new.user_id);
        let mut candidates: Vec<String> = Vec::new();
        for _ in 0..MAX_CREATE_ATTEMPTS {
            let mut invocation = scripts.create_session.key(&session_key);
            invocation
                .key(&index_key)
                .arg(new.token_id.as_str())
                .arg(ttl_ms)
                .arg(settings.max_sessions_per_user)
                .arg(settings.limit_policy.as_script_arg())
                .arg(&head);
            for token in &candidates {
                invocation
                    .key(self.session_key(&new.user_id, token))
                    .arg(token);
            }
            let reply: Vec<Value> = op.invoke(&invocation).await?;
            let (status, created_at_ms, expires_at_ms, tokens) = parse_create_reply(reply)?;
            match status {
                0 => return Ok(CreateOutcome::TokenTaken),
                1 => {
                    return Ok(CreateOutcome::Created {
                        session: Session {
                            user_id: new.user_id.into_string(),
                            token_id: new.token_id.into_string(),
                            metadata: new.metadata,
                            created_at_ms,
                            expires_at_ms,
                        },
                        evicted: tokens,
                    });
                }
                2 => return Ok(CreateOutcome::LimitReached),
                3 => candidates = tokens,
                other => {
                    return Err(Error::Internal(
                        format!("create_session.lua returned status {other}").into(),
                    ));
                }
            }
        }
        Err(Error::Contention)
    }

    /// Looks a session up; `owner` is the optional user id hint.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn get_session(
        &self,
        token: &TokenId,
        owner: Option<&UserId>,
    ) -> Result<Option<Session>, Error> {
        let mut op = self.op("get_session").await?;
        let Some(owner) = self.resolve_owner(&mut op, token, owner).await? else {
            return Ok(None);
        };
        let json: Option<String> = op
            .query(redis::cmd("GET").arg(self.session_key(&owner, token.as_str())))
            .await?;
        json.map(|json| parse_session(&json)).transpose()
    }

    /// Revokes one session; `owner` is the optional user id hint. Returns
    /// whether a live session was revoked.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn revoke_session(
        &self,
        token: &TokenId,
        owner: Option<&UserId>,
    ) -> Result<bool, Error> {
        let mut op = self.op("revoke_session").await?;
        let Some(owner) = self.resolve_owner(&mut op, token, owner).await? else {
            return Ok(false);
        };
        let revoked: i64 = op
            .invoke(
                self.shared
                    .scripts
                    .revoke_session
                    .key(self.session_key(&owner, token.as_str()))
                    .key(self.index_key(&owner))
                    .arg(token.as_str()),
            )
            .await?;
        Ok(revoked == 1)
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
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn revoke_all_user_sessions(&self, user: &UserId) -> Result<u32, Error> {
        let mut op = self.op("revoke_all_user_sessions").await?;
        let tokens = self.index_members(&mut op, user).await?;
        if tokens.is_empty() {
            return Ok(0);
        }
        let mut invocation = self
            .shared
            .scripts
            .revoke_sessions
            .key(self.index_key(user));
        for token in &tokens {
            invocation.key(self.session_key(user, token)).arg(token);
        }
        let revoked: u32 = op.invoke(&invocation).await?;
        Ok(revoked)
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
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn record_login_attempt(&self, addr: &ClientAddr) -> Result<LoginVerdict, Error> {
        let settings = self.settings();
        let mut op = self.op("record_login_attempt").await?;
        let (attempts, left_ms): (u64, u64) = op
            .invoke(
                self.shared
                    .scripts
                    .login_attempt
                    .key(self.rate_limit_key(addr))
                    .arg(millis(settings.rate_limit_window)),
            )
            .await?;
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        let max = settings.rate_limit_max_attempts;
        let allowed = attempts <= max;
        Ok(LoginVerdict {
            allowed,
            attempts,
            remaining: max.saturating_sub(attempts),
            retry_after: (!allowed).then(|| Duration::from_millis(left_ms)),
        })
    }

    /// Clears the login attempt counter of `addr`; returns whether one existed.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn reset_login_attempts(&self, addr: &ClientAddr) -> Result<bool, Error> {
        let mut op = self.op("reset_login_attempts").await?;
        let deleted: i64 = op
            .query(redis::cmd("DEL").arg(self.rate_limit_key(addr)))
            .await?;
        Ok(deleted == 1)
    }

    /// The user a token belongs to: the caller's hint when given (a wrong
    /// hint simply finds no session), else the token's reservation.
    async fn resolve_owner(
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
    async fn index_members(&self, op: &mut Op, user: &UserId) -> Result<Vec<String>, Error> {
        op.query(
            redis::cmd("ZRANGE")
                .arg(self.index_key(user))
                .arg(0)
                .arg(-1),
        )
        .await
    }

    async fn find_owner(&self, op: &mut Op, token: &TokenId) -> Result<Option<UserId>, Error> {
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

    /// Checks a connection out of the pool, starting the operation's deadline.
    async fn op(&self, name: &'static str) -> Result<Op, Error> {
        let timeout = self.shared.settings.timeout;
        let deadline = Instant::now() + timeout;
        let checkout = async {
            match &self.shared.backend {
                // The checkout ends at once: the operation keeps a clone of
                // the multiplexed connection (a cheap handle), so concurrent
                // operations share connections and redis-rs batches their
                // commands into one write. Holding the checkout for the whole
                // operation let each connection carry one command at a time.
                Backend::Pool(pool) => loop {
                    match pool.get().await {
                        // Marked broken by an operation since it was last
                        // returned: handing it back makes the pool drop it.
                        Ok(pooled) if pooled.broken.load(Ordering::Relaxed) => drop(pooled),
                        Ok(pooled) => {
                            break Ok(Link::Shared {
                                conn: pooled.inner.clone(),
                                broken: Arc::clone(&pooled.broken),
                            });
                        }
                        Err(bb8::RunError::User(err)) => break Err(Error::from(err)),
                        Err(bb8::RunError::TimedOut) => break Err(Error::Timeout(timeout)),
                    }
                },
                Backend::Cluster { client, connection } => connection
                    .get_or_try_init(|| client.get_async_connection())
                    .await
                    .map(|conn| Link::Cluster(conn.clone()))
                    .map_err(Error::from),
            }
        };
        let conn = match timeout_at(deadline, checkout).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(record_error(name, err)),
            Err(_) => return Err(record_error(name, Error::Timeout(timeout))),
        };
        Ok(Op {
            conn,
            deadline,
            timeout,
            name,
        })
    }

    pub(crate) fn session_key(&self, user: &UserId, token: &str) -> String {
        format!(
            "{}session:{{{user}}}:{{{token}}}",
            self.shared.settings.key_prefix
        )
    }

    pub(crate) fn index_key(&self, user: &UserId) -> String {
        format!(
            "{}user_sessions:{{{user}}}",
            self.shared.settings.key_prefix
        )
    }

    pub(crate) fn owner_key(&self, token: &TokenId) -> String {
        format!("{}token_owner:{{{token}}}", self.shared.settings.key_prefix)
    }

    pub(crate) fn rate_limit_key(&self, addr: &ClientAddr) -> String {
        format!(
            "{}rate_limit:login:{{{}}}",
            self.shared.settings.key_prefix,
            addr.as_str()
        )
    }
}

/// One store operation: a pooled connection and the deadline that bounds all
/// of the operation's round trips.
struct Op {
    conn: Link,
    deadline: Instant,
    timeout: Duration,
    /// The store operation, as the `op` metric label.
    name: &'static str,
}

impl Op {
    async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, Error> {
        let start = std::time::Instant::now();
        let result = timeout_at(self.deadline, cmd.query_async(&mut self.conn)).await;
        self.settle(start, result)
    }

    async fn invoke<T: FromRedisValue>(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        let start = std::time::Instant::now();
        let result = timeout_at(self.deadline, invocation.invoke_async(&mut self.conn)).await;
        self.settle(start, result)
    }

    /// Maps a round trip's outcome, marking the connection broken when it can
    /// no longer be trusted, so the pool replaces it instead of reusing it.
    fn settle<T>(
        &mut self,
        start: std::time::Instant,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Error> {
        metrics::histogram!(crate::metrics::REDIS_DURATION, "op" => self.name)
            .record(start.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                // READONLY: the master we hold was demoted by a failover.
                if err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_unrecoverable_error()
                    || err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                {
                    self.conn.mark_broken();
                }
                Err(err.into())
            }
            Err(_elapsed) => {
                // A silent peer (host gone, network partition) never resets the
                // socket: reconnect rather than queue behind it.
                self.conn.mark_broken();
                Err(Error::Timeout(self.timeout))
            }
        };
        outcome.map_err(|err| record_error(self.name, err))
    }
}

/// The connection one operation uses.
enum Link {
    /// A handle on a pooled multiplexed connection, and the pool's flag for
    /// whether it has failed.
    Shared {
        conn: MultiplexedConnection,
        broken: Arc<AtomicBool>,
    },
    /// A handle on the shared cluster connection.
    Cluster(ClusterConnection),
}

impl Link {
    /// Tells the pool not to reuse this connection. A cluster connection
    /// repairs itself, so there is nothing to do for it.
    fn mark_broken(&mut self) {
        if let Self::Shared { broken, .. } = self {
            broken.store(true, Ordering::Relaxed);
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Shared { conn, .. } => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Shared { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Shared { conn, .. } => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A pooled Redis connection and whether it has failed.
///
/// bb8-redis's manager reports connections as never broken, so with
/// test-on-checkout off a connection killed by a Redis restart would stay in
/// the pool for good; this wrapper lets the failing operation say so.
pub(crate) struct PooledRedis {
    inner: MultiplexedConnection,
    /// Shared with every operation using a clone of `inner`.
    broken: Arc<AtomicBool>,
}

/// Opens multiplexed Redis connections for the bb8 pool, with the store's
/// connect timeout, and drops those that failed.
pub(crate) struct RedisManager {
    connector: Connector,
    config: AsyncConnectionConfig,
}

/// Where a new pooled connection goes.
enum Connector {
    /// Straight to the one server.
    Direct(redis::Client),
    /// To whichever master the sentinels name at connect time.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl fmt::Debug for RedisManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection info may carry a password: never print it.
        f.debug_struct("RedisManager").finish_non_exhaustive()
    }
}

impl bb8::ManageConnection for RedisManager {
    type Connection = PooledRedis;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let inner = match &self.connector {
            Connector::Direct(client) => {
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?
            }
            Connector::Sentinel(sentinel) => {
                sentinel
                    .lock()
                    .await
                    .get_async_connection_with_config(&self.config)
                    .await?
            }
        };
        Ok(PooledRedis {
            inner,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query_async(&mut conn.inner).await
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// A Redis client for the settings' URL, with the password and CA applied.
fn redis_client(settings: &Settings) -> Result<redis::Client, Error> {
    use redis::IntoConnectionInfo;
    let invalid = |e: redis::RedisError| Error::invalid("REDIS_URL", e.to_string());
    let mut info = settings
        .redis_url
        .as_str()
        .into_connection_info()
        .map_err(invalid)?;
    if let Some(password) = &settings.redis_password {
        let redis = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis);
    }
    match &settings.redis_ca_pem {
        Some(ca) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        )
        .map_err(|e| Error::invalid("REDIS_CA_FILE", e.to_string())),
        None => redis::Client::open(info).map_err(invalid),
    }
}

/// A sentinel client for the settings' comma-separated sentinel URLs.
fn sentinel_client(settings: &Settings) -> Result<SentinelClient, Error> {
    let sentinels = split_urls(&settings.redis_url);
    let mut node = redis::RedisConnectionInfo::default();
    if let Some(password) = &settings.redis_password {
        node = node.set_password(password);
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
    SentinelClient::build(
        sentinels,
        settings.sentinel_master.as_str(),
        Some(node),
        SentinelServerType::Master,
    )
    .map_err(|e| Error::invalid("REDIS_URL", e.to_string()))
}

/// A cluster client for the settings' comma-separated seed nodes.
fn cluster_client(settings: &Settings) -> Result<ClusterClient, Error> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(split_urls(&settings.redis_url))
        .connection_timeout(settings.timeout)
        .response_timeout(settings.timeout);
    if let Some(password) = &settings.redis_password {
        builder = builder.password(password);
    }
    if let Some(ca) = &settings.redis_ca_pem {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        });
    }
    builder
        .build()
        .map_err(|e| Error::invalid("REDIS_URL", e.to_string()))
}

fn split_urls(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Counts a failed store operation by kind, and passes the error on.
fn record_error(op: &'static str, err: Error) -> Error {
    let kind = match &err {
        Error::InvalidArgument { .. } => "invalid_argument",
        Error::Unavailable(_) => "unavailable",
        Error::Timeout(_) => "timeout",
        Error::OutOfMemory(_) => "out_of_memory",
        Error::Contention => "contention",
        Error::Internal(_) => "internal",
    };
    metrics::counter!(crate::metrics::REDIS_ERRORS, "op" => op, "kind" => kind).increment(1);
    err
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The session JSON up to its timestamps, which the create script appends from
/// Redis's clock.
fn session_json_head(new: &NewSession) -> Result<String, Error> {
    #[derive(serde::Serialize)]
    struct Head<'a> {
        user_id: &'a str,
        token_id: &'a str,
        metadata: &'a crate::model::Metadata,
    }
    let mut json = serde_json::to_string(&Head {
        user_id: new.user_id.as_str(),
        token_id: new.token_id.as_str(),
        metadata: &new.metadata,
    })
    .map_err(|e| Error::Internal(e.into()))?;
    // Serialising a struct always ends with its closing brace.
    json.pop();
    Ok(json)
}

fn parse_session(json: &str) -> Result<Session, Error> {
    serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("corrupt session JSON: {e}").into()))
}

type CreateReply = (i64, u64, u64, Vec<String>);

fn parse_create_reply(reply: Vec<Value>) -> Result<CreateReply, Error> {
    let malformed = || Error::Internal("create_session.lua returned a malformed reply".into());
    let mut values = reply.into_iter();
    let mut int = || -> Result<i64, Error> {
        values
            .next()
            .map(i64::from_redis_value)
            .transpose()
            .map_err(|e| Error::Internal(e.into()))?
            .ok_or_else(malformed)
    };
    let status = int()?;
    let created = u64::try_from(int()?).map_err(|_| malformed())?;
    let expires = u64::try_from(int()?).map_err(|_| malformed())?;
    let tokens = values
        .map(String::from_redis_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(e.into()))?;
    Ok((status, created, expires, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis Cluster slot of a key: CRC16-XMODEM of the hash tag (the text
    /// inside the first `{...}` when non-empty) or of the whole key, mod 16384.
    fn slot(key: &str) -> u16 {
        let bytes = key.as_bytes();
        let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        });
        let mut crc: u16 = 0;
        for &byte in tagged.unwrap_or(bytes) {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    fn store(prefix: &str) -> Store {
        let mut config = crate::Config::defaults();
        config.key_prefix = prefix.into();
        Store::new(config.store_settings().unwrap()).unwrap()
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
                // create_session, revoke_session, revoke_sessions, list's MGET.
                let mut keys = vec![index.clone()];
                keys.extend(tokens.iter().map(|t| store.session_key(&user, t)));
                let slots: std::collections::HashSet<_> = keys.iter().map(|k| slot(k)).collect();
                assert_eq!(slots.len(), 1, "keys of {user} span slots: {keys:?}");
                assert_eq!(
                    slot(&index),
                    slot(user.as_str()),
                    "the hash tag is the user id"
                );
            }
            // claim_token, count_sessions and login_attempt touch one key each.
            let token = TokenId::parse("token_id", "tok".into()).unwrap();
            assert_eq!(slot(&store.owner_key(&token)), slot("tok"));
            let addr = ClientAddr::parse("2001:db8::1").unwrap();
            assert_eq!(slot(&store.rate_limit_key(&addr)), slot("2001:db8::/64"));
        }
    }

    #[test]
    fn json_head_plus_script_suffix_is_a_session() {
        let new = NewSession {
            user_id: UserId::parse("user_id", "u\"1".into()).unwrap(),
            token_id: TokenId::parse("token_id", "t1".into()).unwrap(),
            metadata: [("ip".to_string(), "10.0.0.1".to_string())].into(),
            ttl: None,
        };
        let json = format!(
            "{},\"created_at_ms\":1,\"expires_at_ms\":2}}",
            session_json_head(&new).unwrap()
        );
        let session = parse_session(&json).unwrap();
        assert_eq!(session.user_id, "u\"1");
        assert_eq!(session.metadata["ip"], "10.0.0.1");
        assert_eq!((session.created_at_ms, session.expires_at_ms), (1, 2));
    }
}
