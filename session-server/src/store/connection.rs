//! Connections to Redis: a bb8 pool of multiplexed connections (standalone and
//! sentinel) or one cluster connection, and the [`Op`]s (`op.rs`) that use
//! them.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    AsyncConnectionConfig,
    aio::MultiplexedConnection,
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use tokio::time::{Instant, timeout_at};

use super::{
    RedisMode, Settings, Store,
    credentials::{Credentials, Secrets},
    record_error,
};
use crate::error::{Contention, Error};

pub(super) use super::op::Op;
use super::op::{Link, OpDurations};
use super::replication::ClusterWaits;

/// How connections are had: one store, one connection type chosen at start.
pub(super) enum Backend {
    /// Standalone and sentinel: a bb8 pool of multiplexed connections, and
    /// the failures of its connection attempts.
    Pool {
        /// The pool.
        pool: bb8::Pool<RedisManager>,
        /// Shared with the pool's manager.
        failures: Arc<ConnectFailures>,
        /// See [`OpDurations`].
        durations: OpDurations,
        /// Connections kept for replication waits alone (`replication`).
        waits: bb8::Pool<RedisManager>,
    },
    /// Cluster: one cluster connection (itself multiplexed over every node),
    /// made on first use so the server can start while the cluster is down.
    Cluster {
        /// Boxed: the client is large, and there is one per process.
        client: Box<ClusterClient>,
        connection: tokio::sync::OnceCell<ClusterConnection>,
        /// See [`OpDurations`].
        durations: OpDurations,
        /// Connections to each master kept for replication waits alone.
        waits: ClusterWaits,
    },
}

impl Backend {
    /// The connection source for `settings`, with the credentials `secrets`
    /// holds now; nothing is dialled yet.
    pub(super) fn new(settings: &Settings, secrets: &Arc<Secrets>) -> Result<Self, Error> {
        let credentials = secrets.current(settings);
        let connector = || -> Result<Connector, Error> {
            Ok(match settings.mode {
                RedisMode::Standalone => Connector::Direct(std::sync::Mutex::new((
                    credentials.clone(),
                    redis_client(settings)?,
                ))),
                _ => Connector::Sentinel(tokio::sync::Mutex::new((
                    credentials.clone(),
                    sentinel_client(settings)?,
                ))),
            })
        };
        if settings.mode == RedisMode::Cluster {
            return Ok(Backend::Cluster {
                client: Box::new(cluster_client(settings)?),
                connection: tokio::sync::OnceCell::new(),
                durations: OpDurations::default(),
                waits: ClusterWaits::new(settings.pool_size),
            });
        }
        let failures = Arc::new(ConnectFailures::default());
        let pool = redis_pool(settings, secrets, connector()?, &failures);
        // The replication waits' own connections (`replication`): WAIT
        // blocks the connection it is sent on, so it never goes on one that
        // other calls share. Same size bound, nothing dialled until a wait.
        let wait_failures = Arc::new(ConnectFailures::default());
        let waits = redis_pool(settings, secrets, connector()?, &wait_failures);
        Ok(Self::Pool {
            pool,
            failures,
            durations: OpDurations::default(),
            waits,
        })
    }
}

/// A bb8 pool of at most REDIS_POOL_SIZE connections made by `connector`.
fn redis_pool(
    settings: &Settings,
    secrets: &Arc<Secrets>,
    connector: Connector,
    failures: &Arc<ConnectFailures>,
) -> bb8::Pool<RedisManager> {
    let manager = RedisManager {
        connector,
        settings: settings.clone(),
        secrets: Arc::clone(secrets),
        failures: Arc::clone(failures),
        config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            // Each operation is bounded by `Settings::timeout` as a whole.
            .set_response_timeout(None),
    };
    bb8::Pool::builder()
        .max_size(settings.pool_size)
        // A PING per checkout would double the round trips; broken
        // connections are found by `RedisManager::has_broken` instead.
        .test_on_check_out(false)
        .connection_timeout(settings.timeout)
        // One connect attempt per checkout that needs one: a failed attempt
        // wakes the waiting operations (`ConnectFailures`), which fail at
        // once with its error instead of waiting out the timeout.
        .retry_connection(false)
        .build_unchecked(manager)
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pool { pool, .. } => f.debug_tuple("Pool").field(&pool.state()).finish(),
            Self::Cluster { .. } => f.write_str("Cluster"),
        }
    }
}

impl Store {
    /// Checks a connection out of the pool, starting the operation's deadline.
    pub(super) async fn op(&self, name: &'static str) -> Result<Op, Error> {
        let timeout = self.shared.settings.timeout;
        let deadline = Instant::now() + timeout;
        let checkout = async {
            match &self.shared.backend {
                // The checkout ends at once: the operation keeps a clone of
                // the multiplexed connection (a cheap handle), so concurrent
                // operations share connections and redis-rs batches their
                // commands into one write. Holding the checkout for the whole
                // operation let each connection carry one command at a time.
                Backend::Pool { pool, failures, .. } => loop {
                    // bb8 hands a failed connect attempt to its error sink and
                    // lets the waiting checkout run into the timeout; listen
                    // for the failure (registered before the checkout starts)
                    // and answer with its error: UNAVAILABLE for a refused
                    // connection, INTERNAL for wrong credentials. A failure
                    // is announced with `notify_waiters`, which a `Notified`
                    // receives from its creation on (tokio's documentation
                    // says so), so it needs no `enable`: the checkout that
                    // finds an idle connection at once (nearly all) never
                    // polls it and so never takes the waiters' lock, where
                    // enabling it took the lock twice (about 180
                    // instructions a GetSession, BENCHMARKS.md "#22 hot
                    // path").
                    let failed = failures.notify.notified();
                    tokio::pin!(failed);
                    let checkout = tokio::select! {
                        biased;
                        checkout = pool.get() => checkout,
                        () = &mut failed => break Err(failures.last(timeout)),
                    };
                    match checkout {
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
                        Err(bb8::RunError::TimedOut) => {
                            break Err(checkout_expired(pool, &self.shared.settings));
                        }
                    }
                },
                Backend::Cluster {
                    client, connection, ..
                } => connection
                    .get_or_try_init(|| client.get_async_connection())
                    .await
                    .map(|conn| Link::Cluster(conn.clone()))
                    .map_err(Error::from),
            }
        };
        let conn = match timeout_at(deadline, checkout).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(record_error(name, err)),
            Err(_) => {
                let err = match &self.shared.backend {
                    Backend::Pool { pool, .. } => checkout_expired(pool, &self.shared.settings),
                    // Waiting for the cluster connection is waiting for the
                    // cluster to answer.
                    Backend::Cluster { .. } => Error::Timeout(timeout),
                };
                return Err(record_error(name, err));
            }
        };
        let (Backend::Pool { durations, .. } | Backend::Cluster { durations, .. }) =
            &self.shared.backend;
        Ok(Op::new(conn, deadline, timeout, name, durations.of(name)))
    }
}

/// Why a pool checkout ran out of time: contention ([`Contention::Pool`])
/// when every connection the pool may hold is open and checked out by other
/// operations; otherwise a connection is being made and Redis has not
/// answered it ([`Error::Timeout`]). Operations hand their checkout back as
/// soon as they have cloned the multiplexed connection, so the first is rare:
/// it takes more operations than connections all between checkout and
/// return at once, which only a starved runtime does.
fn checkout_expired(pool: &bb8::Pool<RedisManager>, settings: &Settings) -> Error {
    let state = pool.state();
    if state.connections >= settings.pool_size && state.idle_connections == 0 {
        Error::Busy(Contention::Pool {
            timeout: settings.timeout,
            size: settings.pool_size,
        })
    } else {
        Error::Timeout(settings.timeout)
    }
}

/// A pooled Redis connection and whether it has failed.
///
/// bb8-redis's manager reports connections as never broken, so with
/// test-on-checkout off a connection killed by a Redis restart would stay in
/// the pool for good; this wrapper lets the failing operation say so.
pub(super) struct PooledRedis {
    pub(super) inner: MultiplexedConnection,
    /// Shared with every operation using a clone of `inner`.
    pub(super) broken: Arc<AtomicBool>,
}

/// Opens multiplexed Redis connections for the bb8 pool, with the store's
/// connect timeout, and drops those that failed.
pub(super) struct RedisManager {
    connector: Connector,
    /// To rebuild the connector when the password or CA files change.
    settings: Settings,
    /// The credentials as last read, shared with the revocation subscriber.
    secrets: Arc<Secrets>,
    config: AsyncConnectionConfig,
    failures: Arc<ConnectFailures>,
}

/// The pool's failed connect attempts, as operations waiting for a connection
/// need them.
#[derive(Default)]
pub(super) struct ConnectFailures {
    /// Woken on every failed attempt.
    notify: tokio::sync::Notify,
    /// The latest failure.
    last: std::sync::Mutex<Option<redis::RedisError>>,
}

impl ConnectFailures {
    fn record(&self, err: &redis::RedisError) {
        // A poisoned lock only means another thread panicked mid-store; the
        // value is a plain Option and still usable.
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.clone());
        self.notify.notify_waiters();
    }

    /// The latest failure as the store's error; a timeout if none is known.
    fn last(&self, timeout: Duration) -> Error {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map_or(Error::Timeout(timeout), Error::from)
    }
}

/// Where a new pooled connection goes, and the credentials its client was
/// built with.
pub(super) enum Connector {
    /// Straight to the one server.
    Direct(std::sync::Mutex<(Credentials, redis::Client)>),
    /// To whichever master the sentinels name at connect time.
    Sentinel(tokio::sync::Mutex<(Credentials, SentinelClient)>),
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
        let rebuild_failed = |err: Error| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "the rotated Redis password or CA is unusable",
                err.to_string(),
            ))
        };
        let connected = match &self.connector {
            Connector::Direct(direct) => {
                let client = {
                    let mut direct = direct.lock().unwrap_or_else(|e| e.into_inner());
                    // Read under the connector's lock, so that a connect that
                    // read earlier cannot rebuild the client with older
                    // credentials after one that read later.
                    let now = self.secrets.current(&self.settings);
                    if direct.0 != now {
                        let client = redis_client(&now.apply(&self.settings))
                            .map_err(rebuild_failed)
                            .inspect_err(|err| self.failures.record(err))?;
                        tracing::info!("Redis credentials changed: new connections use them");
                        *direct = (now, client);
                    }
                    direct.1.clone()
                };
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await
            }
            Connector::Sentinel(sentinel) => {
                let mut sentinel = sentinel.lock().await;
                let now = self.secrets.current(&self.settings);
                if sentinel.0 != now {
                    let client = sentinel_client(&now.apply(&self.settings))
                        .map_err(rebuild_failed)
                        .inspect_err(|err| self.failures.record(err))?;
                    tracing::info!("Redis credentials changed: new connections use them");
                    *sentinel = (now, client);
                }
                sentinel
                    .1
                    .get_async_connection_with_config(&self.config)
                    .await
            }
        };
        let inner = connected.inspect_err(|err| self.failures.record(err))?;
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

/// A dedicated pub/sub connection (for the revocation subscriber): to the
/// server in standalone mode, to the master the sentinels name now in
/// sentinel mode (`attempt` rotates the sentinel asked first, so a hung one
/// costs one attempt, not all of them), and in cluster mode to `master`
/// ("host:port", one of [`Op::cluster_masters`]), with the scheme, user,
/// password and CA of the first seed. The password and CA are those the pool
/// would use now ([`Secrets`]). Bound by the settings' timeout.
pub(super) async fn pubsub(
    settings: &Settings,
    secrets: &Secrets,
    master: Option<&str>,
    attempt: usize,
) -> Result<redis::aio::PubSub, Error> {
    let settings = &secrets.current(settings).apply(settings);
    let timeout = settings.timeout;
    match (settings.mode, master) {
        (RedisMode::Sentinel, _) => {
            let mut sentinels = split_urls(&settings.redis_url);
            let turn = attempt % sentinels.len().max(1);
            sentinels.rotate_left(turn);
            let mut sentinel = sentinel_client_for(settings, sentinels)?;
            bounded(timeout, async move {
                let master = sentinel.async_get_client().await?;
                Ok(master.get_async_pubsub().await?)
            })
            .await
        }
        (RedisMode::Cluster, Some(master)) => {
            let client = cluster_node_client(settings, master)?;
            bounded(timeout, async move { Ok(client.get_async_pubsub().await?) }).await
        }
        (RedisMode::Cluster, None) => Err(Error::Internal(
            "a cluster pub/sub connection needs the master to connect to".into(),
        )),
        (RedisMode::Standalone, _) => {
            let client = redis_client(settings)?;
            bounded(timeout, async move { Ok(client.get_async_pubsub().await?) }).await
        }
    }
}

/// A client for one cluster node, `master` ("host:port"), with the scheme,
/// user, password and CA of the first seed.
fn cluster_node_client(settings: &Settings, master: &str) -> Result<redis::Client, Error> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let seed = split_urls(&settings.redis_url)
        .first()
        .copied()
        .unwrap_or_default()
        .into_connection_info()
        .map_err(|e| Error::invalid("REDIS_URL", e.to_string()))?;
    let (host, port) = split_host_port(master)?;
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    client_for(settings, seed.set_addr(addr))
}

/// A connection of its own to the cluster node `master` ("host:port"), with
/// the credentials the pool would use now, bound by the settings' timeout.
pub(super) async fn cluster_node_connection(
    settings: &Settings,
    secrets: &Secrets,
    master: &str,
) -> Result<MultiplexedConnection, Error> {
    let settings = &secrets.current(settings).apply(settings);
    let client = cluster_node_client(settings, master)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(None);
    bounded(settings.timeout, async move {
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    })
    .await
}

/// `host:port` as its parts.
pub(super) fn split_host_port(address: &str) -> Result<(&str, u16), Error> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse().ok()?)))
        .ok_or_else(|| {
            Error::Internal(format!("a cluster node address without a port: {address:?}").into())
        })
}

/// `work`, or [`Error::Timeout`] when it takes longer than `timeout`.
async fn bounded<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(Error::Timeout(timeout)))
}

/// The database number of the settings' URL (0 in cluster and sentinel
/// modes, which always use database 0, and for a URL that does not parse).
pub(super) fn database(settings: &Settings) -> i64 {
    use redis::IntoConnectionInfo;
    match settings.mode {
        RedisMode::Standalone => settings
            .redis_url
            .as_str()
            .into_connection_info()
            .map_or(0, |info| info.redis_settings().db()),
        RedisMode::Sentinel | RedisMode::Cluster => 0,
    }
}

/// A Redis client for the settings' URL, with the password and CA applied.
pub(super) fn redis_client(settings: &Settings) -> Result<redis::Client, Error> {
    node_client(settings, &settings.redis_url)
}

/// A Redis client for `url`, one server, with the settings' password and CA.
fn node_client(settings: &Settings, url: &str) -> Result<redis::Client, Error> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| Error::invalid("REDIS_URL", e.to_string()))?;
    client_for(settings, info)
}

/// A Redis client for `info`, with the settings' password and CA applied.
fn client_for(
    settings: &Settings,
    mut info: redis::ConnectionInfo,
) -> Result<redis::Client, Error> {
    let invalid = |e: redis::RedisError| Error::invalid("REDIS_URL", e.to_string());
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
pub(super) fn sentinel_client(settings: &Settings) -> Result<SentinelClient, Error> {
    sentinel_client_for(settings, split_urls(&settings.redis_url))
}

/// A sentinel client asking `sentinels`, in order.
fn sentinel_client_for(settings: &Settings, sentinels: Vec<&str>) -> Result<SentinelClient, Error> {
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
pub(super) fn cluster_client(settings: &Settings) -> Result<ClusterClient, Error> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Store settings for the Redis at `url`, with a pool of one connection
    /// and a short timeout.
    fn settings(url: &str) -> Settings {
        Settings {
            pool_size: 1,
            timeout: Duration::from_millis(200),
            ..Settings::for_tests(url)
        }
    }

    /// A checkout that runs out of time while every pooled connection is
    /// held elsewhere is contention naming the pool, not Redis failing to
    /// answer; one that runs out of time while a connection is being made to
    /// a peer that never answers is not contention. Against the local Redis.
    #[tokio::test]
    async fn a_checkout_timeout_names_its_cause() {
        let store = Store::new(settings("redis://127.0.0.1:6379")).unwrap();
        store.ping().await.expect("the local Redis answers");
        let Backend::Pool { pool, .. } = &store.shared.backend else {
            unreachable!("standalone mode is pooled");
        };
        let held = pool.get().await.expect("the pool's one connection");
        let err = store.ping().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Busy(Contention::Pool { size: 1, timeout }) if timeout == Duration::from_millis(200)
            ),
            "{err:?}"
        );
        drop(held);
        store.ping().await.expect("the connection is free again");

        // Accepted by the kernel, never read: the connect gets no answer.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", silent.local_addr().unwrap());
        let store = Store::new(settings(&url)).unwrap();
        let err = store.ping().await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout(_) | Error::Unavailable(_)),
            "{err:?}"
        );
    }
}
