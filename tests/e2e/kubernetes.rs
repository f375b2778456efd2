//! The real `session-server` binary facing what Kubernetes does to it: a
//! shared Redis going away (readiness must not empty every Service at once),
//! connections aged out so load spreads over new pods, and a certificate
//! renewed on a mounted Secret volume.
//!
//! Each test starts its own server process and, where it stops Redis, its
//! own private Redis; `scripts/test-topologies.sh` skips this module (it
//! uses no shared topology).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Child,
    sync::mpsc,
    time::{Duration, Instant},
};

use sessionstore::v1::{GetSessionRequest, session_store_client::SessionStoreClient};
use tonic::{
    Code,
    codegen::{Bytes, http},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    Pki, PrivateRedis, Running, ServerProcess, TempFiles, launch, lookups_work_within, metric,
    readiness_at, server_command, tls_channel, wait_until,
};

/// How long after `start` `check` first holds, asked every `every`; fails
/// the test with `never` if it does not within `limit` of `start`.
async fn first_holds<F, Fut>(
    (start, every, limit): (Instant, Duration, Duration),
    mut check: F,
    never: &str,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while start.elapsed() < limit {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(every).await;
    }
    panic!("{never}");
}

/// The binary on `redis`, with `env` and no shutdown delay.
fn binary(redis: &PrivateRedis, env: &[(&str, &str)]) -> ServerProcess {
    let env = [env, &[("SHUTDOWN_DELAY_MS", "0")]].concat();
    ServerProcess::start(&redis.url(), &env)
}

/// Whether readiness at `url` becomes SERVING within 10 s.
async fn becomes_serving(url: &str) -> bool {
    let serving = || async { readiness_at(url).await == Some(ServingStatus::Serving) };
    wait_until(Duration::from_secs(10), serving).await
}

fn get() -> GetSessionRequest {
    GetSessionRequest {
        token_id: "k8s".into(),
        user_id: "k8s".into(),
    }
}

/// Defaults: Redis stopped for 10 s leaves readiness SERVING on every check
/// (new connections accepted, as kubelet probes and clients make them), while
/// every call answers UNAVAILABLE within REDIS_TIMEOUT_MS; `redis_up` says
/// why. A Redis that hangs (paused) instead of refusing: the same, each call
/// bounded by REDIS_TIMEOUT_MS. Calls succeed again when Redis is back.
#[tokio::test]
async fn redis_outage_leaves_readiness_serving_and_calls_fail_fast() {
    const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);
    let mut redis = PrivateRedis::start();
    let server = binary(
        &redis,
        &[
            ("HEALTH_CHECK_INTERVAL_MS", "100"),
            ("REDIS_TIMEOUT_MS", "1000"),
        ],
    );
    let addr = server.addr.clone();
    let metrics = server.metrics;
    let url = format!("http://{addr}");
    assert!(
        becomes_serving(&url).await,
        "readiness never became SERVING"
    );
    let mut client = SessionStoreClient::connect(url.clone()).await.unwrap();
    client.get_session(get()).await.unwrap();

    redis.kill();
    let down = Instant::now();
    let (mut calls, mut slowest) = (0u64, Duration::ZERO);
    while down.elapsed() < Duration::from_secs(10) {
        let started = Instant::now();
        let status = client.get_session(get()).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        slowest = slowest.max(took);
        calls += 1;
        assert_eq!(
            readiness_at(&url).await,
            Some(ServingStatus::Serving),
            "readiness left SERVING {:?} into the outage",
            down.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < REDIS_TIMEOUT,
        "slowest of {calls} calls with Redis stopped: {slowest:?}"
    );
    eprintln!("Redis stopped 10 s: {calls} calls UNAVAILABLE, slowest {slowest:?}");
    // One "redis unavailable" line a second at most, however many calls fail,
    // each saying how many it stands for.
    let failure_lines: Vec<u64> = server
        .events()
        .into_iter()
        .filter(|event| event["message"] == "redis unavailable")
        .map(|event| event["suppressed"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        !failure_lines.is_empty() && failure_lines.len() <= 12,
        "{} \"redis unavailable\" lines for {calls} failed calls in 10 s",
        failure_lines.len()
    );
    let stood_for: u64 = failure_lines.iter().map(|n| n + 1).sum();
    eprintln!(
        "{} \"redis unavailable\" lines standing for {stood_for} of {calls} failed calls",
        failure_lines.len()
    );
    assert!(
        stood_for >= calls / 2,
        "the lines account for {stood_for} of {calls} calls"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            metric(metrics, "sessionstore_redis_up").await == Some(0.0)
        })
        .await,
        "sessionstore_redis_up is not 0 with Redis stopped"
    );
    assert_eq!(
        metric(metrics, "sessionstore_readiness{state=\"serving\"}").await,
        Some(1.0)
    );

    redis.restart();
    assert!(
        lookups_work_within(Duration::from_secs(10), &client, get).await,
        "calls did not succeed again after Redis came back"
    );

    // Hung rather than gone: every command waits (CLIENT PAUSE) for 5 s.
    // Calls start only while more than REDIS_TIMEOUT_MS (plus a margin) of
    // the pause is left, so none can be answered by the pause ending.
    redis.pause(5000).await;
    let paused = Instant::now();
    let mut slowest = Duration::ZERO;
    while paused.elapsed() < Duration::from_millis(3000) {
        let started = Instant::now();
        let status = client.get_session(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        slowest = slowest.max(started.elapsed());
        assert_eq!(readiness_at(&url).await, Some(ServingStatus::Serving));
    }
    // The bound plus scheduling on a loaded test machine.
    assert!(
        slowest < REDIS_TIMEOUT + Duration::from_millis(500),
        "slowest call with Redis hung: {slowest:?}"
    );
    eprintln!("Redis hung: slowest call {slowest:?} (REDIS_TIMEOUT_MS 1000)");
}

/// READINESS_FOLLOWS_REDIS=true: readiness turns NOT_SERVING once
/// READINESS_REDIS_FAILURES checks in a row have failed (here 5, 200 ms
/// apart: never sooner than 800 ms after Redis stopped), and SERVING again
/// when Redis answers.
#[tokio::test]
async fn readiness_follows_redis_only_after_the_debounce() {
    let mut redis = PrivateRedis::start();
    let server = binary(
        &redis,
        &[
            ("READINESS_FOLLOWS_REDIS", "true"),
            ("READINESS_REDIS_FAILURES", "5"),
            ("HEALTH_CHECK_INTERVAL_MS", "200"),
        ],
    );
    let addr = server.addr.clone();
    let url = format!("http://{addr}");
    assert!(
        becomes_serving(&url).await,
        "readiness never became SERVING"
    );
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);

    redis.kill();
    let down = Instant::now();
    let not_serving = || {
        let mut health = health.clone();
        async move {
            let request = HealthCheckRequest {
                service: sessionstore::SERVICE_NAME.into(),
            };
            let status = health.check(request).await.unwrap().into_inner().status;
            status == ServingStatus::NotServing as i32
        }
    };
    let polls = (down, Duration::from_millis(10), Duration::from_secs(15));
    let never = "still SERVING 15 s after Redis stopped";
    let not_serving_after = first_holds(polls, not_serving, never).await;
    // Five failed checks need four intervals between them at least.
    assert!(
        not_serving_after >= Duration::from_millis(800),
        "NOT_SERVING after {not_serving_after:?}: before the debounce"
    );
    eprintln!("READINESS_FOLLOWS_REDIS: NOT_SERVING {not_serving_after:?} after Redis stopped");

    redis.restart();
    assert!(
        becomes_serving(&url).await,
        "readiness did not come back with Redis"
    );
}

/// An HTTP/2 connection to `addr` made by hand, so the test sees what the
/// server does to it (GOAWAY, close) rather than a channel hiding it by
/// reconnecting. Returns the sender and the connection's task, which ends
/// with the connection: `Ok` when closed cleanly.
async fn h2_connect(
    addr: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(connection))
}

/// Starts a grpc.health.v1 call (`Check` or `Watch`) for the overall status
/// on `send`; `Err` when the connection takes no new streams.
async fn health_call(
    send: &h2::client::SendRequest<Bytes>,
    method: &str,
) -> Result<h2::RecvStream, h2::Error> {
    let mut send = send.clone().ready().await?;
    let request = http::Request::post(format!(
        "http://session-store/grpc.health.v1.Health/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = send.send_request(request, false)?;
    // One empty HealthCheckRequest: uncompressed, 0 bytes long.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let response = response.await?;
    assert_eq!(response.status(), 200);
    Ok(response.into_body())
}

/// MAX_CONNECTION_AGE=1 s with a 5 s grace: the server sends GOAWAY once the
/// connection is a second old (new streams refused, NO_ERROR: the client
/// reconnects), lets a stream already open run on through the grace, and
/// closes the connection when the grace ends. A connection with nothing open
/// closes cleanly right after the GOAWAY.
#[tokio::test]
async fn connections_are_closed_gracefully_after_max_connection_age() {
    let redis = PrivateRedis::start();
    let server = binary(
        &redis,
        &[
            ("MAX_CONNECTION_AGE", "1"),
            ("MAX_CONNECTION_AGE_GRACE", "5"),
        ],
    );
    let addr = server.addr.clone();

    // Idle: GOAWAY at 1 s, then a clean close.
    let opened = Instant::now();
    let (send, connection) = h2_connect(&addr).await;
    let mut check = health_call(&send, "Check").await.unwrap();
    assert!(check.data().await.is_some());
    let closed = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("an idle connection was not closed 10 s after MAX_CONNECTION_AGE")
        .unwrap();
    let idle_closed_after = opened.elapsed();
    assert!(closed.is_ok(), "not a clean close: {closed:?}");
    assert!(
        idle_closed_after >= Duration::from_millis(950)
            && idle_closed_after < Duration::from_secs(4),
        "idle connection closed after {idle_closed_after:?}"
    );

    // A stream open across the age: it outlives the GOAWAY, then the grace
    // ends the connection.
    let opened = Instant::now();
    let (send, connection) = h2_connect(&addr).await;
    let mut watch = health_call(&send, "Watch").await.unwrap();
    assert!(watch.data().await.is_some(), "no first status on the watch");
    let goaway = || {
        let send = &send;
        async move {
            let Err(err) = health_call(send, "Check").await else {
                return false;
            };
            assert!(err.is_go_away(), "{err:?}");
            assert_eq!(err.reason(), Some(h2::Reason::NO_ERROR), "{err:?}");
            true
        }
    };
    let polls = (opened, Duration::from_millis(50), Duration::from_secs(5));
    let goaway_after = first_holds(polls, goaway, "no GOAWAY within 5 s").await;
    assert!(
        goaway_after >= Duration::from_millis(950),
        "GOAWAY after {goaway_after:?}, before MAX_CONNECTION_AGE"
    );
    // The open stream is not cut by the GOAWAY.
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.data()).await;
    let cut_after = opened.elapsed();
    assert!(
        ended.is_ok(),
        "the stream outlived MAX_CONNECTION_AGE plus its grace by far"
    );
    assert!(
        cut_after >= Duration::from_millis(5900),
        "the open stream was cut after {cut_after:?}, within the grace"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .is_ok(),
        "the connection outlived its grace"
    );
    eprintln!(
        "MAX_CONNECTION_AGE 1 s, grace 5 s: idle closed after {idle_closed_after:?}, GOAWAY after \
         {goaway_after:?}, open stream cut after {cut_after:?}"
    );
}

/// A Secret volume as the kubelet writes it: files in a timestamped
/// directory, `..data` pointing at it, and each key a symlink through
/// `..data`; an update writes a new directory and swaps `..data` at once.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(files: &TempFiles, keys: &[(&str, &str)]) -> Self {
        let dir = files.write("secret-volume-marker", "");
        let dir = dir.parent().unwrap().join("tls-volume");
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = Self { dir, generation: 0 };
        volume.update(keys);
        for (key, _) in keys {
            std::os::unix::fs::symlink(Path::new("..data").join(key), volume.dir.join(key))
                .unwrap();
        }
        volume
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn update(&mut self, keys: &[(&str, &str)]) {
        self.generation += 1;
        let data = format!("..{}", self.generation);
        std::fs::create_dir_all(self.dir.join(&data)).unwrap();
        for (key, contents) in keys {
            std::fs::write(self.dir.join(&data).join(key), contents).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// A new TLS connection to `addr` trusting only `ca`, served: whether the
/// server's certificate now comes from that CA.
async fn handshake_trusting(addr: &str, ca: &str) -> bool {
    let Ok(channel) = tls_channel(addr, ca, None).await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok()
}

/// A certificate renewed on a Secret volume (the kubelet's symlink swap) is
/// served to the next handshake without a restart; a connection made before
/// keeps working; a broken update (a key that is not the certificate's)
/// keeps the certificate in use and counts a reload failure; the expiry
/// gauge follows the certificate served.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let (first, second) = (Pki::new(), Pki::new());
    let files = TempFiles::new();
    let mut volume = SecretVolume::new(
        &files,
        &[
            ("tls.crt", &first.server_cert),
            ("tls.key", &first.server_key),
        ],
    );
    let cert = volume.path("tls.crt");
    let key = volume.path("tls.key");
    let redis = PrivateRedis::start();
    let server = binary(
        &redis,
        &[
            ("TLS_CERT", cert.to_str().unwrap()),
            ("TLS_KEY", key.to_str().unwrap()),
        ],
    );
    let addr = server.addr.clone();
    let metrics = server.metrics;
    assert!(handshake_trusting(&addr, &first.ca).await);
    assert!(!handshake_trusting(&addr, &second.ca).await);
    let expiry_before = metric(metrics, "sessionstore_tls_cert_expiry_timestamp_seconds")
        .await
        .expect("no certificate expiry metric");
    let earlier = tls_channel(&addr, &first.ca, None).await.unwrap();

    // A broken update: the second certificate with the first key.
    volume.update(&[
        ("tls.crt", &second.server_cert),
        ("tls.key", &first.server_key),
    ]);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            metric(metrics, "sessionstore_tls_reload_failures_total").await >= Some(1.0)
        })
        .await,
        "a key that is not the certificate's was not reported"
    );
    assert!(
        handshake_trusting(&addr, &first.ca).await,
        "the old pair was dropped"
    );

    // The renewal proper.
    volume.update(&[
        ("tls.crt", &second.server_cert),
        ("tls.key", &second.server_key),
    ]);
    let swapped = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || handshake_trusting(
            &addr, &second.ca
        ))
        .await,
        "the renewed certificate was not served within 20 s"
    );
    eprintln!(
        "renewed certificate served {:?} after the swap",
        swapped.elapsed()
    );
    assert!(!handshake_trusting(&addr, &first.ca).await);
    assert_eq!(
        metric(metrics, "sessionstore_tls_reloads_total").await,
        Some(1.0)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry_after = metric(metrics, "sessionstore_tls_cert_expiry_timestamp_seconds")
        .await
        .expect("no certificate expiry metric after the reload");
    assert!(
        expiry_before > now && expiry_after > now,
        "{expiry_before} {expiry_after}"
    );
    // The connection made before the renewal still works.
    HealthClient::new(earlier)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a connection made before the renewal broke");
}

/// The Redis password rotated the way a mounted Secret is (the file replaced
/// in place, Redis told the new one, old connections cut): new connections
/// use the new password without a restart, so calls succeed again.
#[tokio::test]
async fn a_rotated_redis_password_is_used_by_new_connections() {
    let redis = PrivateRedis::start();
    let mut setup = redis.connection().await;
    let () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "first-secret"])
        .query_async(&mut setup)
        .await
        .unwrap();
    drop(setup);
    let files = TempFiles::new();
    let password = files.write("redis-password", "first-secret\n");
    let mut config = crate::support::config_on(&redis);
    config.redis_password_file = Some(password.clone());
    let server = crate::support::TestServer::start_with(config).await;
    let mut client = server.client().await;
    client
        .get_session(get())
        .await
        .expect("served with the first password");

    // Rotate: the new file first (written beside, renamed over), then Redis.
    let staged = files.write("redis-password.new", "second-secret\n");
    std::fs::rename(&staged, &password).unwrap();
    let mut admin = redis::Client::open(format!("redis://:first-secret@127.0.0.1:{}", redis.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "second-secret"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut admin)
        .await
        .unwrap();

    let served = lookups_work_within(Duration::from_secs(10), &client, get).await;
    assert!(served, "new connections did not use the rotated password");
    server.shutdown().await;
}

/// Starts the binary as `spawn_server` does, under a file descriptor limit
/// (soft `soft`, hard `hard`, set by the shell that then execs it), with
/// `HEALTH_ADDR` on `health`. Returns the log lines up to "listening", the
/// address and the lines after it.
fn spawn_with_fd_limit(
    redis_url: &str,
    soft: u32,
    hard: u32,
    health: &str,
) -> (
    Child,
    Vec<serde_json::Value>,
    String,
    mpsc::Receiver<serde_json::Value>,
) {
    let mut shell = std::process::Command::new("sh");
    shell
        .args([
            "-c",
            &format!("ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\""),
        ])
        .arg(crate::support::server_binary());
    launch(server_command(
        shell,
        redis_url,
        &[
            ("HEALTH_ADDR", health),
            ("REDIS_POOL_SIZE", "2"),
            ("SHUTDOWN_DELAY_MS", "0"),
        ],
    ))
}

/// Whether a health check on a new connection to `url` answers.
async fn answers(url: String) -> bool {
    readiness_at(&url).await.is_some()
}

/// CPU time (user plus system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 14th and 15th of the line.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Out of file descriptors (a flood of idle connections past `ulimit -n`),
/// the server pauses accepting instead of retrying the failing accept at
/// once: its CPU stays near idle (a spin burns a core), a warning names the
/// cause and the fix, and once the flood closes both ports answer health
/// checks again. At start it raises the soft limit to the hard one and
/// warns that MAX_CONNECTIONS cannot fit under it.
#[tokio::test]
async fn running_out_of_file_descriptors_does_not_spin() {
    let redis = PrivateRedis::start();
    let health = format!("127.0.0.1:{}", crate::support::free_port());
    let (child, early, addr, logs) = spawn_with_fd_limit(&redis.url(), 32, 64, &health);
    let server = Running(child);
    let pid = server.0.id();

    let limit = early
        .iter()
        .find(|event| event["message"] == "open file limit (RLIMIT_NOFILE)")
        .expect("the fd limit is not logged");
    assert_eq!(limit["soft"], 64, "the soft limit was not raised: {limit}");
    assert_eq!(limit["was"], 32, "{limit}");
    assert!(
        early.iter().any(|event| event["level"] == "WARN"
            && event["message"]
                .as_str()
                .is_some_and(|m| m.contains("below MAX_CONNECTIONS"))),
        "no warning that MAX_CONNECTIONS cannot fit: {early:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || answers(format!(
            "http://{health}"
        )))
        .await,
        "the health port never answered"
    );

    // More idle connections than descriptors: the kernel completes them
    // (the backlog), the server runs out of descriptors accepting them.
    let flood: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let warning = loop {
        let event = logs
            .recv_timeout(Duration::from_secs(10))
            .expect("no warning about failed accepts");
        if event["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot accept connections"))
        {
            break event;
        }
    };
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["port"], "grpc", "{warning}");
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files")),
        "{warning}"
    );

    // A spinning accept loop burns about a second of CPU per second.
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time(pid) - before;
    eprintln!("CPU used in 3 s out of file descriptors: {used:?}");
    assert!(
        used < Duration::from_millis(300),
        "the server used {used:?} of CPU in 3 s while out of file descriptors"
    );

    drop(flood);
    for url in [format!("http://{health}"), format!("http://{addr}")] {
        assert!(
            wait_until(Duration::from_secs(10), || answers(url.clone())).await,
            "{url} does not answer health checks after the flood closed"
        );
    }
}

/// A TCP relay to `target` for one connection, which holds the client's
/// first bytes (a TLS ClientHello) for `delay`: the server accepts the
/// connection at once, the handshake ends `delay` later.
async fn slow_handshake_relay(target: &str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = target.to_string();
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = tokio::net::TcpStream::connect(&target).await.unwrap();
        tokio::time::sleep(delay).await;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    addr
}

/// With TLS, MAX_CONNECTION_AGE_GRACE counts from the end of the handshake,
/// as tonic's MAX_CONNECTION_AGE does: a handshake that takes 1.5 s does not
/// shorten the grace, so a stream open on the connection is cut only age
/// plus grace after the handshake (after the GOAWAY), not 1.5 s earlier
/// (before any GOAWAY, which would cut calls without warning).
#[tokio::test]
async fn a_slow_tls_handshake_does_not_eat_the_grace() {
    let redis = PrivateRedis::start();
    let pki = Pki::new();
    let files = TempFiles::new();
    let cert = files.write("server.pem", &pki.server_cert);
    let key = files.write("server.key", &pki.server_key);
    let server = binary(
        &redis,
        &[
            ("TLS_CERT", cert.to_str().unwrap()),
            ("TLS_KEY", key.to_str().unwrap()),
            ("MAX_CONNECTION_AGE", "2"),
            ("MAX_CONNECTION_AGE_GRACE", "1"),
            ("REQUEST_TIMEOUT_MS", "1000"),
            ("REDIS_TIMEOUT_MS", "500"),
        ],
    );
    let addr = server.addr.clone();

    let relay = slow_handshake_relay(&addr, Duration::from_millis(1500)).await;
    let started = Instant::now();
    let channel = tls_channel(relay, &pki.ca, None).await.unwrap();
    let connected = Instant::now();
    assert!(
        connected - started >= Duration::from_millis(1400),
        "the handshake was not slowed: {:?}",
        connected - started
    );
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());
    // The watch sends nothing more until the connection is cut.
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.message()).await;
    let cut_after = connected.elapsed();
    assert!(ended.is_ok(), "the stream outlived age plus grace by far");
    eprintln!("TLS handshake 1.5 s, age 2 s, grace 1 s: stream cut {cut_after:?} after it");
    assert!(
        cut_after >= Duration::from_millis(2700),
        "the stream was cut {cut_after:?} after the handshake, before age plus grace (3 s)"
    );
}
