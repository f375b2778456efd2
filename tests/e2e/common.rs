//! Test harness: a server per test with its own key prefix on the shared Redis,
//! and private `redis-server` processes and deployments (Cluster, Sentinel)
//! for tests that stop, break or reconfigure Redis.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use session_server::{Config, Store, server, store::RedisMode};
use sessionstore::v1::session_store_client::SessionStoreClient;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The Redis most tests share: `TEST_REDIS_URL`, else the local default. With
/// `TEST_REDIS_MODE=cluster` or `sentinel` (see `scripts/redis-topology.sh`)
/// the whole suite runs against that deployment instead.
pub(crate) fn shared_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The shared Redis's mode, from `TEST_REDIS_MODE` (default standalone).
pub(crate) fn shared_redis_mode() -> RedisMode {
    match std::env::var("TEST_REDIS_MODE").as_deref() {
        Ok("cluster") => RedisMode::Cluster,
        Ok("sentinel") => RedisMode::Sentinel,
        Ok("standalone") | Err(_) => RedisMode::Standalone,
        Ok(other) => panic!("TEST_REDIS_MODE={other}: expected standalone, cluster or sentinel"),
    }
}

/// A key prefix no other test (or run) uses, so tests can share one Redis.
pub(crate) fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test-{}-{}-{}:",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

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
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl TestServer {
    /// Starts a server with the test defaults.
    pub(crate) async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    /// Starts a server with `config`, listening on a port-0 listener bound
    /// before the server task is spawned (no sleeps, no fixed ports).
    pub(crate) async fn start_with(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Store::new(config.store_settings().unwrap()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let config = config.clone();
            async move {
                server::run(listener, &config, store, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Self {
            addr,
            config,
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
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server did not stop within 10 s")
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

/// Polls `check` every 20 ms until it holds or `limit` passes; a readiness
/// wait, not a sleep standing in for one.
pub(crate) async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The readiness answer for the SessionStore service.
pub(crate) async fn readiness(server: &TestServer) -> i32 {
    let mut health = server.health().await;
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: sessionstore::SERVICE_NAME.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// A private `redis-server` on a free port, in its own temp dir, killed on drop.
pub(crate) struct PrivateRedis {
    pub(crate) port: u16,
    dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl PrivateRedis {
    /// Starts one with no persistence.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub(crate) fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("sessionstore-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.spawn();
        redis
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A direct connection, for inspecting or poking Redis from a test.
    pub(crate) async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Makes Redis answer no client for `millis` (CLIENT PAUSE ... ALL); the
    /// pause ends by itself (an UNPAUSE would be paused too).
    pub(crate) async fn pause(&self, millis: u64) {
        let mut admin = self.connection().await;
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(millis)
            .arg("ALL")
            .query_async(&mut admin)
            .await
            .unwrap();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process: stopped, Redis keeps
    /// its sockets open and answers nothing, as a hung host does.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the process (SIGKILL: no chance to save), and waits for it to die.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (so an append-only file
    /// written before is loaded), waiting until it answers PING.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let ping = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "ping"])
                .output();
            if ping.is_ok_and(|o| o.stdout.starts_with(b"PONG")) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "private redis did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Cluster or Sentinel deployment started on free ports by
/// `scripts/redis-topology.sh`, stopped on drop: for tests that kill or
/// reconfigure nodes without disturbing the shared Redis.
pub(crate) struct Topology {
    dir: PathBuf,
    /// The KEY=VALUE lines the script printed (`TEST_REDIS_URL`,
    /// `TEST_REDIS_MASTER_PORT`, ...).
    pub(crate) env: HashMap<String, String>,
}

impl Topology {
    /// Starts `kind` (`cluster` or `sentinel`) and waits until it is usable.
    pub(crate) fn start(kind: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sessionstore-{kind}-{}",
            unique_prefix().trim_end_matches(':')
        ));
        let output = Command::new(topology_script())
            .args(["start", kind])
            .arg(&dir)
            .output()
            .expect("scripts/redis-topology.sh runs");
        assert!(
            output.status.success(),
            "starting {kind} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let env = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { dir, env }
    }

    /// SIGKILLs the node on `port`.
    pub(crate) fn kill(&self, port: u16) {
        let status = Command::new(topology_script())
            .arg("kill")
            .arg(&self.dir)
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// A test configuration pointed at this deployment in `mode`.
    pub(crate) fn config(&self, mode: RedisMode) -> Config {
        let mut config = test_config();
        config.redis_mode = mode;
        config.redis_url = self.env["TEST_REDIS_URL"].clone();
        config.redis_sentinel_master = "mymaster".into();
        config.redis_timeout_ms = 500;
        config
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(topology_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn topology_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-topology.sh")
}

/// Runs `redis-cli -p PORT ARGS...` and returns its standard output.
pub(crate) fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `redis-cli -p PORT -a PASSWORD ARGS...` (a Redis with `requirepass`)
/// and returns its standard output.
pub(crate) fn redis_cli_with_password(port: u16, password: &str, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--no-auth-warning", "-a", password])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The release `session-server` binary, built with the same command as the
/// Dockerfile (and by the same cargo that runs the tests), for tests of what
/// only the real process shows: environment parsing, logs, the metrics port.
pub(crate) fn server_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "session-server",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building session-server failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release/session-server")
}

/// An example of session-client (`session-client/examples/<name>.rs`), built
/// (debug) by the same cargo that runs the tests, for tests that must run a
/// client in a process of its own (under libfaketime, say).
pub(crate) fn client_example(name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Without the variables cargo sets for this test binary: ring's build
    // script tracks CARGO_MANIFEST_DIR and OUT_DIR (among others), so
    // inheriting them would rebuild ring
    // and its dependents here, and again at the next `cargo test` (about
    // 25 s each way measured).
    let leaked = std::env::vars().map(|(key, _)| key).filter(|key| {
        key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key.as_str(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_LINKS"
                    | "OUT_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
    });
    let mut build = Command::new(cargo);
    for key in leaked {
        build.env_remove(key);
    }
    let status = build
        .args([
            "build",
            "--locked",
            "--quiet",
            "-p",
            "session-client",
            "--example",
            name,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the example {name} failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("debug/examples").join(name)
}

/// `faketime` (Debian's package of that name, libfaketime's wrapper), which
/// `scripts/ensure-redis.sh` installs. Missing, the test fails saying so
/// rather than skipping: a skipped clock test would hide the regression it
/// is there for.
pub(crate) fn faketime() -> &'static str {
    let found = Command::new("faketime")
        .args(["-f", "+0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "faketime is not installed: run scripts/ensure-redis.sh (or `apt-get install faketime`)"
    );
    "faketime"
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a raw command on the shared Redis (whatever its mode), for tests that
/// inspect the key layout.
pub(crate) async fn inspect<T: redis::FromRedisValue>(config: &Config, cmd: &redis::Cmd) -> T {
    let store = Store::new(config.store_settings().unwrap()).unwrap();
    store.raw_command(cmd).await.unwrap()
}

/// A CA, a server certificate for [`Pki::SERVER_NAME`] and a client
/// certificate, all PEM, made fresh for each test.
pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) server_cert: String,
    pub(crate) server_key: String,
    pub(crate) client_cert: String,
    pub(crate) client_key: String,
    /// A certificate for a Redis listening on 127.0.0.1 (IP SAN).
    pub(crate) redis_cert: String,
    pub(crate) redis_key: String,
}

impl Pki {
    /// Not the address the client dials (127.0.0.1), so passing only when the
    /// client sets `tls_domain_name` proves that setting works.
    pub(crate) const SERVER_NAME: &'static str = "sessionstore.test";

    pub(crate) fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "SessionStore test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec![Self::SERVER_NAME.to_string()]);
        let (client_cert, client_key) = leaf(vec!["client.sessionstore.test".to_string()]);
        let (redis_cert, redis_key) = leaf(vec!["127.0.0.1".to_string()]);
        Self {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
            redis_cert,
            redis_key,
        }
    }

    /// A test configuration serving TLS with this PKI's server certificate,
    /// requiring client certificates from its CA when `mutual`.
    pub(crate) fn server_config(&self, files: &TempFiles, mutual: bool) -> Config {
        let mut config = test_config();
        config.tls_cert = Some(files.write("server.pem", &self.server_cert));
        config.tls_key = Some(files.write("server.key", &self.server_key));
        if mutual {
            config.tls_client_ca = Some(files.write("ca.pem", &self.ca));
        }
        config
    }
}

/// A private temp directory for files the server reads, removed on drop.
pub(crate) struct TempFiles(PathBuf);

impl TempFiles {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sessionstore-files-{}",
            unique_prefix().trim_end_matches(':')
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
