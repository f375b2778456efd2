//! Redis for tests: the shared one's address and mode, private
//! `redis-server` processes and Cluster/Sentinel deployments on free ports,
//! `redis-cli`, and raw commands for inspecting the key layout.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use session_server::{Config, Store, store::RedisMode};

use super::{free_port, server::test_config, unique_prefix};

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

    /// The ports of its nodes, in `TEST_REDIS_URL` order (the seeds first).
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.env["TEST_REDIS_URL"]
            .split(',')
            .map(|url| url.rsplit(':').next().unwrap().parse().unwrap())
            .collect()
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

impl PrivateRedis {
    /// Rotates its password from `old` to `new` as an operator does: the
    /// new password file (`TempFiles`' `staged`) renamed over `file`, then
    /// Redis told. Connections already open stay authenticated.
    pub(crate) fn rotate_password(&self, staged: PathBuf, file: &Path, old: &str, new: &str) {
        std::fs::rename(&staged, file).unwrap();
        let answer =
            redis_cli_with_password(self.port, old, &["config", "set", "requirepass", new]);
        assert_eq!(answer.trim(), "OK");
    }
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

/// Runs a raw command on the shared Redis (whatever its mode), for tests that
/// inspect the key layout.
pub(crate) async fn inspect<T: redis::FromRedisValue>(config: &Config, cmd: &redis::Cmd) -> T {
    let store = Store::new(config.store_settings().unwrap()).unwrap();
    store.raw_command(cmd).await.unwrap()
}

/// Writes a session straight into Redis as another version of the server
/// would have (`json` is its stored form): its key, its index entry and its
/// token's owner, all for `ttl_ms` from now (the owner a minute longer, as
/// the server's reservations are).
pub(crate) async fn store_raw_session(
    config: &Config,
    user: &str,
    token: &str,
    json: &str,
    ttl_ms: u64,
) {
    let prefix = &config.key_prefix;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let mut session = redis::cmd("SET");
    session
        .arg(format!("{prefix}session:{{{user}}}:{{{token}}}"))
        .arg(json)
        .arg("PX")
        .arg(ttl_ms);
    let mut index = redis::cmd("ZADD");
    index
        .arg(format!("{prefix}user_sessions:{{{user}}}"))
        .arg(now + ttl_ms)
        .arg(token);
    let mut owner = redis::cmd("SET");
    owner
        .arg(format!("{prefix}token_owner:{{{token}}}"))
        .arg(user)
        .arg("PX")
        .arg(ttl_ms + 60_000);
    for cmd in [session, index, owner] {
        let _: () = inspect(config, &cmd).await;
    }
}

/// The key's PTTL: -2 when it does not exist, -1 when it has no TTL.
pub(crate) async fn pttl(config: &Config, key: &str) -> i64 {
    inspect(config, redis::cmd("PTTL").arg(key)).await
}

/// The login limiter's `kind` key (`account`, `devices`, `device_refusals`)
/// for `account`, as `session-server/src/store/login.rs` names it.
pub(crate) fn login_account_key(config: &Config, kind: &str, account: &str) -> String {
    let account = session_server::model::AccountKey::parse(account).unwrap();
    format!(
        "{}rate_limit:login:{kind}:{{{}}}",
        config.key_prefix,
        account.as_str()
    )
}

/// A store script's source as the server loads it (store/mod.rs `script!`):
/// the shared helpers of `lib.lua`, then the script; for tests that run the
/// steps of a race by hand, in the order the race produces.
pub(crate) fn server_script(name: &str) -> String {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/session-server/src/store/scripts/"
    );
    let read = |file: &str| {
        std::fs::read_to_string(format!("{dir}{file}.lua"))
            .unwrap_or_else(|e| panic!("script {file}: {e}"))
    };
    read("lib") + &read(name)
}

/// The calls Redis has answered so far, by command (`INFO commandstats`),
/// without INFO itself.
pub(crate) async fn command_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    // Lines look like `cmdstat_get:calls=100,usec=250,usec_per_call=2.50,...`.
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

/// The invariant revocation finality rests on, read from Redis: while the
/// token's reservation lasts, its revocation marker lasts at least as long.
/// The reservation is read first, so the marker's later reading only errs
/// towards failing.
pub(crate) async fn assert_marker_outlives_reservation(config: &Config, user: &str, token: &str) {
    let prefix = &config.key_prefix;
    let reservation: i64 = inspect(
        config,
        redis::cmd("PTTL").arg(format!("{prefix}token_owner:{{{token}}}")),
    )
    .await;
    let marker: i64 = inspect(
        config,
        redis::cmd("PTTL").arg(format!("{prefix}revoked:{{{user}}}:{{{token}}}")),
    )
    .await;
    eprintln!("{token}: reservation {reservation} ms, marker {marker} ms");
    assert!(marker > 0, "{token}: no marker ({marker})");
    assert!(
        marker >= reservation,
        "{token}: the marker ({marker} ms) ends before the reservation ({reservation} ms)"
    );
}

/// What a [`redis_relay`] does with a command that names its needle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnNeedle {
    /// The first such command reaches Redis, then its connection is cut
    /// before the answer comes back: the step ran, and the server saw it fail.
    CutAfterFirst,
    /// Every such command is held back, and what its connection sends after
    /// it: the connection stays open and Redis never answers, as a Redis
    /// that stalls on that one command would.
    Hold,
    /// Every such command, and what its connection sends after it, reaches
    /// Redis this much later: a window between two round trips of one call,
    /// held open for another call to land in.
    Delay(Duration),
}

/// A TCP relay to the Redis on `target`, doing `on` with the commands that
/// name `needle` (at the first write that holds it: what that write carries
/// besides goes with it); its `redis://` URL.
pub(crate) async fn redis_relay(target: u16, needle: String, on: OnNeedle) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let armed = armed.clone();
            let needle = needle.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let cut = std::sync::Arc::new(tokio::sync::Notify::new());
                let cut_up = cut.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let hit = buf[..n]
                            .windows(needle.len())
                            .any(|w| w == needle.as_bytes());
                        if let (true, OnNeedle::Delay(delay)) = (hit, on) {
                            tokio::time::sleep(delay).await;
                        }
                        if hit && on == OnNeedle::Hold {
                            // Neither this nor what follows reaches Redis;
                            // the connection stays open.
                            let _held = (client_read, upstream_write);
                            return std::future::pending().await;
                        }
                        if upstream_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if hit
                            && on == OnNeedle::CutAfterFirst
                            && armed.swap(false, std::sync::atomic::Ordering::SeqCst)
                        {
                            // Redis runs it; its answer never comes back.
                            cut_up.notify_one();
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    tokio::select! {
                        _ = cut.notified() => break,
                        read = upstream_read.read(&mut buf) => {
                            let n = match read {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                up.abort();
            });
        }
    });
    format!("redis://{addr}")
}
