//! Redis failing under the server: unreachable, then back.

use std::time::{Duration, Instant};

use sessionstore::v1::{CreateSessionRequest, GetSessionRequest, GetUserSessionCountRequest};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    OnNeedle, PrivateRedis, TempFiles, TestServer, config_on, count, create, get, liveness,
    lookups_work_within, readiness, readiness_becomes, redis_cli, redis_cli_with_password,
    redis_relay, revoke, revoke_all, wait_until,
};

/// Redis stopped mid-test: calls fail fast with UNAVAILABLE saying so, readiness
/// (following Redis, READINESS_FOLLOWS_REDIS) goes NOT_SERVING while liveness
/// stays SERVING; after Redis restarts the same server serves again by itself.
/// (The default, readiness staying SERVING: `kubernetes::`.)
#[tokio::test]
async fn redis_down_gives_unavailable_then_recovers() {
    let mut redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_timeout_ms = 500;
        c.readiness_follows_redis = true;
        c.readiness_redis_failures = 1;
    })
    .await;
    let mut client = server.client().await;
    let create = |token: &str| CreateSessionRequest {
        user_id: "faulty".into(),
        token_id: token.into(),
        ..Default::default()
    };
    assert!(
        client
            .create_session(create("before"))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    assert!(readiness_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);

    redis.kill();
    for token in ["during-1", "during-2", "during-3"] {
        let started = Instant::now();
        let status = client.create_session(create(token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("redis"), "{:?}", status.message());
        // REDIS_TIMEOUT_MS plus a margin for a loaded test machine.
        assert!(
            started.elapsed() < Duration::from_millis(500 + 2000),
            "{:?}",
            started.elapsed()
        );
    }
    let status = client
        .get_user_session_count(GetUserSessionCountRequest {
            user_id: "faulty".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // The refused connection itself, not the pool's wait running into
    // REDIS_TIMEOUT_MS ("did not answer within").
    assert!(
        status.message().contains("unreachable"),
        "{:?}",
        status.message()
    );
    assert!(
        readiness_becomes(&server, ServingStatus::NotServing, Duration::from_secs(5)).await,
        "readiness stayed SERVING with Redis down"
    );
    let mut health = server.health().await;
    let overall = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        overall.status,
        ServingStatus::Serving as i32,
        "liveness must not fail"
    );
    assert!(server.is_running());

    redis.restart();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move { client.create_session(create("after")).await.is_ok() }
        })
        .await,
        "calls did not succeed again after Redis came back"
    );
    assert!(readiness_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);
    let found = client
        .get_session(GetSessionRequest {
            token_id: "after".into(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(found.session.is_some());
    assert!(server.is_running());
}

/// A server started while Redis is unreachable still starts, reports
/// NOT_SERVING, and answers UNAVAILABLE with the connect error rather than
/// waiting for the pool's timeout.
#[tokio::test]
async fn server_starts_without_redis() {
    let server = TestServer::start_tuned(|c| {
        c.redis_url = format!("redis://127.0.0.1:{}", crate::support::free_port());
        c.redis_timeout_ms = 300;
    })
    .await;
    let mut client = server.client().await;
    let status = client
        .get_session(GetSessionRequest {
            token_id: "t".into(),
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(readiness_becomes(&server, ServingStatus::NotServing, Duration::from_secs(5)).await);
}

/// Redis paused (CLIENT PAUSE) past REDIS_TIMEOUT_MS: callers get UNAVAILABLE
/// within the timeout plus a margin, never a hang, and calls succeed once the
/// pause ends.
#[tokio::test]
async fn paused_redis_times_out_as_unavailable() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| c.redis_timeout_ms = 300).await;
    let mut client = server.client().await;
    let get = || GetSessionRequest {
        token_id: "p".into(),
        user_id: "paused".into(),
    };
    client.get_session(get()).await.unwrap();

    redis.pause(1500).await;
    let started = Instant::now();
    let status = client.get_session(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("300 ms"),
        "{:?}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_millis(300 + 1500),
        "{:?}",
        started.elapsed()
    );

    // The pause ends by itself (an UNPAUSE would be paused too).
    assert!(lookups_work_within(Duration::from_secs(5), &client, get).await);
}

/// Redis restarted with appendonly (fsync always): every session whose
/// CreateSession was acknowledged is still readable, and every acknowledged
/// revocation is still in force. Nothing acknowledged is lost.
#[tokio::test]
async fn acknowledged_writes_survive_a_restart_with_appendonly() {
    let mut redis = PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let config = config_on(&redis);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let mut live = Vec::new();
    let mut revoked = Vec::new();
    for i in 0..30 {
        let token = format!("aof-{i}");
        let created = create(&mut client, &format!("aof-user-{}", i % 5), &token).await;
        assert!(created.created);
        if i % 3 == 0 {
            assert!(revoke(&mut client, &token, "").await);
            revoked.push(token);
        } else {
            live.push(token);
        }
    }
    assert!(revoke_all(&mut client, "aof-user-4").await > 0);
    let (gone, kept): (Vec<_>, Vec<_>) = live.into_iter().partition(|token| {
        let i: usize = token.trim_start_matches("aof-").parse().unwrap();
        i % 5 == 4
    });
    revoked.extend(gone);

    redis.restart();
    assert!(lookups_work_within(Duration::from_secs(10), &client, || get_request("aof-1")).await);
    for token in &kept {
        let found = get(&mut client, token, "").await;
        assert!(found.is_some(), "acknowledged {token} lost in the restart");
    }
    for token in &revoked {
        let found = get(&mut client, token, "").await;
        assert!(found.is_none(), "revocation of {token} lost in the restart");
    }
}

fn get_request(token: &str) -> GetSessionRequest {
    GetSessionRequest {
        token_id: token.into(),
        user_id: String::new(),
    }
}

/// A Redis that refuses writes (a read-only replica) gives UNAVAILABLE for
/// writes, saying so, while reads still answer; the server does not crash,
/// and it never turns ready: the access check's write meets READONLY.
#[tokio::test]
async fn a_read_only_replica_refuses_writes_cleanly() {
    let primary = PrivateRedis::start();
    let replica = PrivateRedis::start_with(&["--replica-read-only", "yes"]);
    let mut admin = replica.connection().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port)
        .query_async(&mut admin)
        .await
        .unwrap();
    let server = TestServer::start_with(config_on(&replica)).await;
    let mut client = server.client().await;
    let status = client
        .create_session(CreateSessionRequest {
            user_id: "ro".into(),
            token_id: "ro-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let found = client
        .get_session(get_request("ro-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(found.session.is_none());
    assert!(server.is_running());
    never_ready(&server, ACCESS_CHECK_TICKS).await;
}

/// How long a test watches a server that must not turn ready: 20 health
/// ticks (HEALTH_CHECK_INTERVAL_MS is 50 in tests).
const ACCESS_CHECK_TICKS: Duration = Duration::from_secs(1);

/// Asserts that readiness answers NOT_SERVING on every look for `during`.
async fn never_ready(server: &TestServer, during: Duration) {
    let start = Instant::now();
    let mut looks = 0;
    while start.elapsed() < during {
        assert_eq!(
            readiness(server).await,
            Some(ServingStatus::NotServing),
            "ready after {:?} although calls cannot work",
            start.elapsed()
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(looks > 5, "{looks}");
}

/// A Redis user that can PING and INFO but not touch KEY_PREFIX keys: every
/// call fails, and the server never turns ready (PING alone would make it
/// ready); once the ACL grants the keys, it turns SERVING without a restart.
#[tokio::test]
async fn an_acl_without_our_keys_keeps_readiness_not_serving() {
    let redis = PrivateRedis::start();
    let acl = |keys: &str| {
        let answer = redis_cli(
            redis.port,
            &[
                "acl",
                "setuser",
                "app",
                "on",
                ">apppw",
                "resetkeys",
                keys,
                "+@all",
            ],
        );
        assert_eq!(answer.trim(), "OK");
    };
    acl("~other:*");
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_url = format!("redis://app:apppw@127.0.0.1:{}", redis.port);
        c.key_prefix = "sessionstore:".into();
    })
    .await;
    let mut client = server.client().await;
    let status = client.get_session(get_request("t")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    never_ready(&server, ACCESS_CHECK_TICKS).await;
    assert_eq!(
        liveness(&server).await,
        Some(ServingStatus::Serving),
        "liveness stays SERVING"
    );

    acl("~*");
    let ready = readiness_becomes(&server, ServingStatus::Serving, Duration::from_secs(10)).await;
    assert!(ready, "not ready once the ACL grants the keys");
    client
        .get_session(get_request("t"))
        .await
        .expect("calls work once the ACL grants the keys");
    server.shutdown().await;
}

/// The Redis password rotated (P1 to P2: file replaced, Redis told, old
/// connections cut), then the file briefly unreadable while connections are
/// cut again: new connections use P2, the last password read, not P1 from
/// the start, so calls still succeed.
#[tokio::test]
async fn an_unreadable_password_file_keeps_the_last_password_read() {
    let redis = PrivateRedis::start();
    // Set after the start: the harness's readiness PING sends no password.
    let answer = redis_cli(
        redis.port,
        &["config", "set", "requirepass", "first-secret"],
    );
    assert_eq!(answer.trim(), "OK");
    let files = TempFiles::new();
    let password = files.write("redis-password", "first-secret\n");
    let server =
        TestServer::on_tuned(&redis, |c| c.redis_password_file = Some(password.clone())).await;
    let mut client = server.client().await;
    client
        .get_session(get_request("t"))
        .await
        .expect("served with the first password");
    let cut_connections = |secret: &str| {
        redis_cli_with_password(redis.port, secret, &["client", "kill", "type", "normal"]);
    };
    let served = || lookups_work_within(Duration::from_secs(5), &client, || get_request("t"));

    // Rotate: the new file renamed over the old one, then Redis.
    let staged = files.write("redis-password.new", "second-secret\n");
    redis.rotate_password(staged, &password, "first-secret", "second-secret");
    cut_connections("second-secret");
    assert!(served().await, "not served with the rotated password");

    // The file is gone for a moment (a Secret update in progress): new
    // connections keep the second password.
    std::fs::rename(&password, files.write("elsewhere", "")).unwrap();
    cut_connections("second-secret");
    assert!(
        served().await,
        "an unreadable password file brought back the first password"
    );
    server.shutdown().await;
}

/// A Redis out of memory (maxmemory, noeviction) gives RESOURCE_EXHAUSTED for
/// writes, reads still answer, and the server does not crash.
#[tokio::test]
async fn redis_out_of_memory_is_resource_exhausted() {
    let redis =
        PrivateRedis::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let server = TestServer::start_with(config_on(&redis)).await;
    let mut client = server.client().await;
    let big: std::collections::HashMap<String, String> = (0..32)
        .map(|i| (format!("k{i}"), "v".repeat(1024)))
        .collect();
    let mut last = None;
    for i in 0..200 {
        let result = client
            .create_session(CreateSessionRequest {
                max_lifetime: None,
                user_id: format!("oom-{}", i % 50),
                token_id: format!("oom-t{i}"),
                metadata: big.clone(),
                ttl: None,
            })
            .await;
        if let Err(status) = result {
            last = Some(status);
            break;
        }
    }
    let status = last.expect("2 MB filled up without an error");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("out of memory"), "{status:?}");
    let found = client
        .get_session(get_request("oom-t0"))
        .await
        .unwrap()
        .into_inner();
    assert!(found.session.is_some(), "reads still work");
    assert!(server.is_running());
}

/// A Redis that stops answering altogether (SIGSTOP: its sockets stay open,
/// nothing is read) answers UNAVAILABLE saying Redis did not answer within
/// REDIS_TIMEOUT_MS, and never that the store is busy; once it runs again
/// (SIGCONT) calls succeed.
#[tokio::test]
async fn a_stopped_redis_is_blamed_not_contention() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| c.redis_timeout_ms = 300).await;
    let mut client = server.client().await;
    client.get_session(get_request("s")).await.unwrap();

    redis.signal("STOP");
    let status = client.get_session(get_request("s")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "session store unavailable: redis did not answer within 300 ms"
    );
    // The next calls reconnect to the stopped Redis: a connect that gets no
    // answer, still not contention.
    for token in ["s1", "s2"] {
        let status = client
            .create_session(CreateSessionRequest {
                user_id: "stopped".into(),
                token_id: token.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(!status.message().contains("busy"), "{status:?}");
        assert!(status.message().contains("redis"), "{status:?}");
    }
    redis.signal("CONT");
    assert!(
        lookups_work_within(Duration::from_secs(5), &client, || get_request("s")).await,
        "not served after SIGCONT"
    );
    server.shutdown().await;
}

/// Creates for one user at its cap take turns in the server (each must
/// evict). The first to take its turn meets a Redis that stalls (a relay
/// holds every command naming the session to evict) and keeps the turn
/// until its REDIS_TIMEOUT_MS passes: it answers UNAVAILABLE naming Redis,
/// and every other, having outwaited its turn behind it, answers UNAVAILABLE
/// naming the contention, not Redis; none is created. No timing is
/// asserted: the stall lasts past every call's deadline, however fast the
/// machine.
#[tokio::test]
async fn creates_outwaiting_their_turn_say_busy_not_redis() {
    let redis = PrivateRedis::start();
    let mut config = config_on(&redis);
    config.max_sessions_per_user = 1;
    // The user at its cap, through a server straight on Redis.
    let direct = TestServer::start_with(config.clone()).await;
    create(&mut direct.client().await, "crowd", "crowd-first").await;
    config.redis_url = redis_relay(redis.port, "crowd-first".into(), OnNeedle::Hold).await;
    config.redis_timeout_ms = 1000;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // The pool's connection made, through the relay.
    assert_eq!(count(&mut client, "crowd").await, 1);
    // Redis holds its answers a moment, so every create's first round trip
    // is sent before the first answer, and none goes out behind the held
    // command on its connection.
    assert_eq!(
        redis_cli(redis.port, &["client", "pause", "200"]).trim(),
        "OK"
    );
    let calls: Vec<_> = (0..CROWD)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .create_session(CreateSessionRequest {
                        user_id: "crowd".into(),
                        token_id: format!("crowd-{i}"),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let (mut created, mut busy, mut redis_blamed) = (0, 0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(answer) => {
                assert!(answer.into_inner().created);
                created += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                if status
                    .message()
                    .starts_with("session store busy: concurrent creates for this user")
                {
                    busy += 1;
                } else {
                    // The turn's holder: Redis never answered it.
                    assert!(
                        status.message().contains("redis did not answer"),
                        "{status:?}"
                    );
                    redis_blamed += 1;
                }
            }
        }
    }
    eprintln!("{CROWD} creates: {created} created, {busy} busy, {redis_blamed} blamed on redis");
    assert_eq!(
        created, 0,
        "a create evicted the session whose eviction stalls"
    );
    assert_eq!(redis_blamed, 1, "only the turn's holder waited on Redis");
    assert_eq!(busy, CROWD - 1, "those behind it outwaited their turn");
}

/// How many creates race in `creates_outwaiting_their_turn_say_busy_not_redis`.
const CROWD: usize = 20;
