//! Refusing an evicting Redis: readiness stays NOT_SERVING while any master's
//! `maxmemory-policy` is not `noeviction` and its `maxmemory` is set (with no
//! limit Redis never evicts) (liveness stays SERVING), comes back
//! without a restart once the policy is fixed, and REDIS_ALLOW_EVICTION=true
//! opts out. Standalone, Cluster and Sentinel each run on a deployment of the
//! test's own, since the tests change the policy under the server.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use session_server::{Config, Store, store::RedisMode};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    PrivateRedis, ServerProcess, TestServer, Topology, config_on, liveness, readiness,
    readiness_at, readiness_becomes, redis_cli, sample, scrape, wait_until,
};

/// How soon a fixed policy must make the server ready again (issue #10).
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

/// `redis-server` arguments: an evicting policy with a memory limit to evict
/// at, and a slow log that records every command, so a test can see the
/// server's policy reads happen.
const EVICTING_REDIS: [&str; 8] = [
    "--maxmemory",
    "1gb",
    "--maxmemory-policy",
    "volatile-lru",
    "--slowlog-log-slower-than",
    "0",
    "--slowlog-max-len",
    "4096",
];

/// `redis-server` arguments: an evicting policy with no memory limit, so
/// nothing is ever evicted, and the same slow log.
const UNLIMITED_REDIS: [&str; 8] = [
    "--maxmemory",
    "0",
    "--maxmemory-policy",
    "allkeys-lru",
    "--slowlog-log-slower-than",
    "0",
    "--slowlog-max-len",
    "4096",
];

fn set_policy(port: u16, policy: &str) {
    let answer = redis_cli(port, &["config", "set", "maxmemory-policy", policy]);
    assert_eq!(answer.trim(), "OK", "CONFIG SET on {port}");
}

/// Sets `maxmemory` (bytes, or `1gb`; `0` is no limit) on the node on `port`.
fn set_maxmemory(port: u16, maxmemory: &str) {
    let answer = redis_cli(port, &["config", "set", "maxmemory", maxmemory]);
    assert_eq!(answer.trim(), "OK", "CONFIG SET maxmemory on {port}");
}

/// Makes the node on `port` log every command in its slow log, from now on.
fn record_commands(port: u16) {
    for args in [
        ["config", "set", "slowlog-log-slower-than", "0"],
        ["config", "set", "slowlog-max-len", "4096"],
    ] {
        assert_eq!(redis_cli(port, &args).trim(), "OK", "{args:?} on {port}");
    }
    assert_eq!(redis_cli(port, &["slowlog", "reset"]).trim(), "OK");
}

/// How many `INFO memory` calls (the server's policy reads) the node on `port`
/// has logged; the test itself only sends CONFIG and SLOWLOG there.
async fn policy_reads(port: u16) -> usize {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    type Entry = (i64, i64, i64, Vec<String>, String, String);
    let entries: Vec<Entry> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(4096)
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .iter()
        .filter(|(.., args, _, _)| {
            args.len() == 2
                && args[0].eq_ignore_ascii_case("info")
                && args[1].eq_ignore_ascii_case("memory")
        })
        .count()
}

/// Waits until the server has read the policy on `port` `more` times from now.
async fn more_policy_reads(port: u16, more: usize) {
    let reads = policy_reads(port).await;
    wait_for_policy_reads(port, reads + more).await;
}

/// Waits until the server has read the policy on `port` at least `reads`
/// times. Each read is followed by a readiness update before the next tick,
/// so after two reads readiness reflects the policy, not the start-up state.
async fn wait_for_policy_reads(port: u16, reads: usize) {
    let seen = wait_until(RECOVERY_LIMIT, || async move {
        policy_reads(port).await >= reads
    })
    .await;
    assert!(seen, "the server did not read maxmemory-policy on {port}");
}

/// The scenario every topology runs. The master on `port` evicts
/// (`volatile-lru`) before the server starts: readiness stays NOT_SERVING
/// while liveness is SERVING; `CONFIG SET maxmemory-policy noeviction` makes it
/// SERVING within 10 s, and a switch back to an evicting policy at run time
/// makes it NOT_SERVING again. Returns how long recovery took.
async fn refuses_until_fixed(config: Config, port: u16) -> Duration {
    assert!(!config.redis_allow_eviction, "the default refuses");
    let server = TestServer::start_with(config).await;

    wait_for_policy_reads(port, 2).await;
    assert_eq!(
        readiness(&server).await,
        Some(ServingStatus::NotServing),
        "ready although a master evicts"
    );
    assert_eq!(liveness(&server).await, Some(ServingStatus::Serving));

    set_policy(port, "noeviction");
    let fixed = Instant::now();
    let ready = readiness_becomes(&server, ServingStatus::Serving, RECOVERY_LIMIT).await;
    let recovery = fixed.elapsed();
    assert!(
        ready,
        "not ready {RECOVERY_LIMIT:?} after the policy was fixed"
    );

    set_policy(port, "allkeys-lru");
    let refused = readiness_becomes(&server, ServingStatus::NotServing, RECOVERY_LIMIT).await;
    assert!(refused, "still ready after the policy became allkeys-lru");
    assert_eq!(liveness(&server).await, Some(ServingStatus::Serving));
    server.shutdown().await;
    recovery
}

/// Standalone: a Redis under `volatile-lru` keeps readiness NOT_SERVING (and
/// liveness SERVING) until `CONFIG SET maxmemory-policy noeviction`, after
/// which it is SERVING within 10 s without a restart.
#[tokio::test]
async fn standalone_evicting_redis_is_refused_until_fixed() {
    let redis = PrivateRedis::start_with(&EVICTING_REDIS);
    let recovery = refuses_until_fixed(config_on(&redis), redis.port).await;
    eprintln!("standalone: ready {recovery:?} after the fix");
}

/// Sentinel: the same, with the policy set on the master the sentinels name.
#[tokio::test]
async fn sentinel_evicting_master_is_refused_until_fixed() {
    let sentinel = Topology::start("sentinel");
    let master: u16 = sentinel.env["TEST_REDIS_MASTER_PORT"].parse().unwrap();
    set_maxmemory(master, "1gb");
    set_policy(master, "volatile-lru");
    record_commands(master);
    let recovery = refuses_until_fixed(sentinel.config(RedisMode::Sentinel), master).await;
    eprintln!("sentinel: ready {recovery:?} after the fix");
}

/// Cluster: with one master of three evicting (not the first seed node), the
/// store reports every master by address and names that one, readiness stays
/// NOT_SERVING, and fixing that master alone makes the server ready.
#[tokio::test]
async fn cluster_one_evicting_master_is_refused_until_fixed() {
    let cluster = Topology::start("cluster");
    let config = cluster.config(RedisMode::Cluster);
    let seed = cluster.ports()[0];
    let mut masters: Vec<String> = redis_cli(seed, &["cluster", "nodes"])
        .lines()
        // Masters serving slots: a node just made a replica may still call
        // itself a master, with no slots, for a moment after the cluster forms.
        .filter(|line| line.contains("master") && !line.contains("fail"))
        .filter(|line| line.split_whitespace().nth(8).is_some())
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|addr| addr.split('@').next())
        .map(str::to_string)
        .collect();
    masters.sort();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let victim = masters
        .iter()
        .find(|addr| !addr.ends_with(&format!(":{seed}")))
        .unwrap()
        .clone();
    let port: u16 = victim.rsplit(':').next().unwrap().parse().unwrap();
    set_maxmemory(port, "1gb");
    set_policy(port, "volatile-lru");
    record_commands(port);

    let store = Store::new(config.store_settings().unwrap()).unwrap();
    let policies = store.maxmemory_policies().await.unwrap();
    let read: Vec<(String, String)> = policies
        .iter()
        .map(|p| (p.node.clone().unwrap(), p.policy.clone()))
        .collect();
    let expected: Vec<(String, String)> = masters
        .iter()
        .map(|addr| {
            let policy = if *addr == victim {
                "volatile-lru"
            } else {
                "noeviction"
            };
            (addr.clone(), policy.to_string())
        })
        .collect();
    assert_eq!(read, expected, "one policy per master, by address");

    let recovery = refuses_until_fixed(config, port).await;
    eprintln!("cluster: ready {recovery:?} after the fix");
}

/// Standalone, in process: `allkeys-lru` with `maxmemory 0` (no limit, so
/// nothing is ever evicted) leaves readiness SERVING through several policy
/// reads; setting `maxmemory` makes it NOT_SERVING, as before.
#[tokio::test]
async fn allkeys_lru_without_a_limit_stays_ready() {
    let redis = PrivateRedis::start_with(&UNLIMITED_REDIS);
    let server = TestServer::start_with(config_on(&redis)).await;
    let ready = readiness_becomes(&server, ServingStatus::Serving, RECOVERY_LIMIT).await;
    assert!(ready, "not ready on allkeys-lru without maxmemory");
    more_policy_reads(redis.port, 3).await;
    assert_eq!(readiness(&server).await, Some(ServingStatus::Serving));

    set_maxmemory(redis.port, "64mb");
    let refused = readiness_becomes(&server, ServingStatus::NotServing, RECOVERY_LIMIT).await;
    assert!(refused, "still ready with allkeys-lru and maxmemory 64mb");
    assert_eq!(liveness(&server).await, Some(ServingStatus::Serving));
    server.shutdown().await;
}

/// INFO forbidden by an ACL while PING works: an unknown policy does not block
/// readiness; once INFO is allowed the evicting policy is seen and refused;
/// and when INFO is forbidden again the last policy read still holds.
#[tokio::test]
async fn info_forbidden_by_acl_keeps_the_last_known_policy() {
    let redis = PrivateRedis::start_with(&EVICTING_REDIS);
    let acl = |rules: &[&str]| {
        let mut args = vec!["acl", "setuser", "app"];
        args.extend_from_slice(rules);
        assert_eq!(redis_cli(redis.port, &args).trim(), "OK");
    };
    acl(&["on", ">app-secret", "~*", "&*", "+@all", "-info"]);
    let rejected_infos = || {
        let stats = redis_cli(redis.port, &["info", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_info:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("rejected_calls=")))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_url = format!("redis://app:app-secret@127.0.0.1:{}", redis.port);
    })
    .await;

    let ready = readiness_becomes(&server, ServingStatus::Serving, RECOVERY_LIMIT).await;
    assert!(ready, "an unreadable policy blocked readiness");
    assert!(rejected_infos() >= 1, "the server never tried INFO");

    acl(&["+info"]);
    let refused = readiness_becomes(&server, ServingStatus::NotServing, RECOVERY_LIMIT).await;
    assert!(refused, "ready although INFO now shows volatile-lru");

    acl(&["-info"]);
    let before = rejected_infos();
    let retried = wait_until(RECOVERY_LIMIT, || async { rejected_infos() >= before + 2 }).await;
    assert!(retried, "the server stopped reading the policy");
    assert_eq!(
        readiness(&server).await,
        Some(ServingStatus::NotServing),
        "a failed INFO forgot the evicting policy"
    );
    server.shutdown().await;
}

/// A private Redis started with `redis_args`, and the binary on it (health
/// checked every 50 ms) with `extra_env`.
fn binary_on(redis_args: &[&str], extra_env: &[(&str, &str)]) -> (PrivateRedis, ServerProcess) {
    let redis = PrivateRedis::start_with(redis_args);
    let env = [&[("HEALTH_CHECK_INTERVAL_MS", "50")], extra_env].concat();
    let server = ServerProcess::start(&redis.url(), &env);
    (redis, server)
}

/// The lines `server` logged at `level` (`ERROR`, `WARN`, `INFO`).
fn events_at(server: &ServerProcess, level: &str) -> Vec<serde_json::Value> {
    let mut events = server.events();
    events.retain(|e| e["level"] == level);
    events
}

/// Waits until a scrape shows every `(series, value)` in `expected`.
async fn wait_for_samples(addr: SocketAddr, expected: &[(&str, f64)]) {
    let shown = wait_until(RECOVERY_LIMIT, || async {
        let text = scrape(addr).await;
        expected
            .iter()
            .all(|(series, value)| sample(&text, series) == Some(*value))
    })
    .await;
    assert!(
        shown,
        "metrics never showed {expected:?}:\n{}",
        scrape(addr).await
    );
}

const POLICY_OK: &str = "sessionstore_redis_eviction_policy_ok";

fn readiness_state(state: &str) -> String {
    format!("sessionstore_readiness{{state=\"{state}\"}}")
}

/// Waits until the binary's metrics say the policy is `ok` (or not), with
/// readiness following it (`serving`, or `redis_evicts`), and asserts its
/// health service agrees.
async fn expect_policy(server: &ServerProcess, ok: bool) {
    let (evicts, serving) = (readiness_state("redis_evicts"), readiness_state("serving"));
    let (yes, no) = if ok { (1.0, 0.0) } else { (0.0, 1.0) };
    let expected = [(POLICY_OK, yes), (evicts.as_str(), no), (&serving, yes)];
    wait_for_samples(server.metrics, &expected).await;
    let status = if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    assert_eq!(readiness_of(server).await, Some(status));
}

/// Readiness of the binary's SessionStore service.
async fn readiness_of(server: &ServerProcess) -> Option<ServingStatus> {
    readiness_at(&format!("http://{}", server.addr)).await
}

/// The binary on an evicting Redis logs one ERROR naming `maxmemory-policy`,
/// its value and the fixes, however many checks follow, and its metrics say
/// why it is not ready; after the fix they say it is, and an INFO line says so.
#[tokio::test]
async fn binary_logs_the_policy_once_and_exports_why() {
    let (redis, server) = binary_on(&EVICTING_REDIS, &[]);
    expect_policy(&server, false).await;

    // Several more checks: still exactly one error.
    more_policy_reads(redis.port, 5).await;
    let errors = events_at(&server, "ERROR");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let error = &errors[0];
    assert_eq!(error["maxmemory_policy"], "volatile-lru", "{error}");
    assert_eq!(error["maxmemory"], 1_u64 << 30, "{error}");
    assert_eq!(error["node"], "master", "{error}");
    let message = error["message"].as_str().unwrap();
    for needle in [
        "maxmemory-policy volatile-lru",
        "maxmemory is 1073741824 bytes",
        "CONFIG SET maxmemory-policy noeviction",
        "redis.conf",
        "REDIS_ALLOW_EVICTION=true",
    ] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }

    set_policy(redis.port, "noeviction");
    expect_policy(&server, true).await;
    let fixed = events_at(&server, "INFO")
        .into_iter()
        .filter(|e| e["maxmemory_policy"] == "noeviction")
        .count();
    assert_eq!(fixed, 1, "one INFO line when the policy is fixed");
    assert_eq!(events_at(&server, "ERROR").len(), 1);
}

/// REDIS_ALLOW_EVICTION=true: the binary serves on an evicting Redis, with one
/// WARN naming the policy (and none at ERROR), while the policy metric still
/// reads 0.
#[tokio::test]
async fn allow_eviction_serves_on_an_evicting_redis() {
    let (redis, server) = binary_on(&EVICTING_REDIS, &[("REDIS_ALLOW_EVICTION", "true")]);
    let serving = readiness_state("serving");
    wait_for_samples(server.metrics, &[(POLICY_OK, 0.0), (&serving, 1.0)]).await;
    assert_eq!(readiness_of(&server).await, Some(ServingStatus::Serving));

    more_policy_reads(redis.port, 5).await;
    assert_eq!(events_at(&server, "ERROR"), Vec::<serde_json::Value>::new());
    let warned: Vec<_> = events_at(&server, "WARN")
        .into_iter()
        .filter(|e| e["maxmemory_policy"] == "volatile-lru")
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
}

/// With `maxmemory` 0 (no limit) Redis never evicts, whatever its policy: the
/// binary on `allkeys-lru` without a limit is ready, its policy metric reads
/// 1 and nothing is logged at ERROR; once `maxmemory` is set the same policy
/// makes it NOT_SERVING, with one ERROR giving both values; back to no limit,
/// it is ready again.
#[tokio::test]
async fn an_evicting_policy_without_maxmemory_does_not_block_readiness() {
    let (redis, server) = binary_on(&UNLIMITED_REDIS, &[]);
    expect_policy(&server, true).await;
    more_policy_reads(redis.port, 3).await;
    assert_eq!(readiness_of(&server).await, Some(ServingStatus::Serving));
    assert_eq!(events_at(&server, "ERROR"), Vec::<serde_json::Value>::new());

    set_maxmemory(redis.port, "64mb");
    expect_policy(&server, false).await;
    let errors = events_at(&server, "ERROR");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0]["maxmemory_policy"], "allkeys-lru", "{errors:?}");
    assert_eq!(errors[0]["maxmemory"], 64_u64 << 20, "{errors:?}");

    set_maxmemory(redis.port, "0");
    expect_policy(&server, true).await;
}
