//! The real server in-process: a test configuration on the shared Redis with
//! a fresh key prefix, and servers on port-0 listeners stopped by a signal.

use std::{net::SocketAddr, time::Duration};

use session_server::{Config, Store, server, store::RedisMode};
use sessionstore::v1::session_store_client::SessionStoreClient;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use super::{
    TempFiles,
    redis::{PrivateRedis, shared_redis_mode, shared_redis_url},
    unique_prefix,
};

/// A configuration for tests: defaults, the shared Redis, a fresh key prefix,
/// and a short health interval so readiness changes are seen quickly.
pub(crate) fn test_config() -> Config {
    let mut config = Config::defaults();
    config.redis_url = shared_redis_url();
    config.redis_mode = shared_redis_mode();
    if let Ok(master) = std::env::var("TEST_REDIS_SENTINEL_MASTER") {
        config.redis_sentinel_master = master;
    }
    config.key_prefix = unique_prefix();
    config.health_check_interval_ms = 50;
    config.redis_timeout_ms = 1000;
    // Tests that stop a server want it gone at once; the shutdown tests set
    // their own delay.
    config.shutdown_delay_ms = 0;
    config
}

/// A test configuration pointed at a private standalone Redis.
pub(crate) fn config_on(redis: &PrivateRedis) -> Config {
    let mut config = test_config();
    config.redis_url = redis.url();
    config.redis_mode = RedisMode::Standalone;
    config
}

/// A running in-process server.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) config: Config,
    /// How long [`TestServer::shutdown`] waits for the drain.
    drain_limit: Duration,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl TestServer {
    /// Starts a server with the test defaults.
    pub(crate) async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    /// Starts a server with the test defaults changed by `tune`.
    pub(crate) async fn start_tuned(tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        tune(&mut config);
        Self::start_with(config).await
    }

    /// Starts a server that requires one of the bearer `tokens` (the
    /// AUTH_TOKENS_FILE contents); the file lives as long as the returned
    /// [`TempFiles`].
    pub(crate) async fn start_requiring_tokens(tokens: &str) -> (Self, TempFiles) {
        let files = TempFiles::new();
        let path = files.write("tokens", tokens);
        let server = Self::start_tuned(|c| c.auth_tokens_file = Some(path)).await;
        (server, files)
    }

    /// Starts a server on the private standalone `redis`, with the test
    /// defaults changed by `tune`.
    pub(crate) async fn on_tuned(redis: &PrivateRedis, tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = config_on(redis);
        tune(&mut config);
        Self::start_with(config).await
    }

    /// Two servers sharing one Redis and key prefix (two replicas of one
    /// deployment), with a client of each.
    pub(crate) async fn pair() -> ([Self; 2], Vec<super::Client>) {
        let config = test_config();
        let servers = [
            Self::start_with(config.clone()).await,
            Self::start_with(config).await,
        ];
        let mut clients = Vec::new();
        for server in &servers {
            clients.push(server.client().await);
        }
        (servers, clients)
    }

    /// Starts a server with `config`, listening on a port-0 listener bound
    /// before the server task is spawned (no sleeps, no fixed ports).
    pub(crate) async fn start_with(config: Config) -> Self {
        let bounds = config.server_settings().bounds;
        Self::start_bounded(config, bounds).await
    }

    /// Starts a server with `bounds` in place of those `config` gives, for
    /// bounds too large (or too long) to reach in a test at their production
    /// values; its shutdown may take up to 30 s to drain.
    pub(crate) async fn start_bounded(config: Config, bounds: server::Bounds) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Self::spawn(listener, config, bounds);
        server.drain_limit = Duration::from_secs(30);
        server
    }

    /// The real server, with its usual transport, on a listener the test
    /// bound itself (to know the port before the server starts, say).
    pub(crate) fn serve_on(listener: TcpListener, config: Config) -> Self {
        let bounds = config.server_settings().bounds;
        Self::spawn(listener, config, bounds)
    }

    fn spawn(listener: TcpListener, config: Config, bounds: server::Bounds) -> Self {
        let addr = listener.local_addr().unwrap();
        let store = Store::new(config.store_settings().unwrap()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = server::ServerSettings {
            bounds,
            ..config.server_settings()
        };
        let task = tokio::spawn(async move {
            server::run(listener, &settings, store, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            config,
            drain_limit: Duration::from_secs(10),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The server's URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the server.
    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A raw generated client.
    pub(crate) async fn client(&self) -> SessionStoreClient<Channel> {
        SessionStoreClient::new(self.channel().await)
    }

    /// A client of the standard gRPC health service.
    pub(crate) async fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel().await)
    }

    /// Asks the server to stop and waits for it to finish draining.
    pub(crate) async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let task = self.task.take().unwrap();
        let limit = self.drain_limit;
        tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("server did not stop within {limit:?}"))
            .unwrap()
            .unwrap();
    }

    /// Whether the server task is still running.
    pub(crate) fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `https://` URL of a test server serving TLS.
pub(crate) fn https_url(server: &TestServer) -> String {
    format!("https://127.0.0.1:{}", server.addr.port())
}
