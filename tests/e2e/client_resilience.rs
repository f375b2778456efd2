//! The session-client under failure: an endpoint down and back, DNS
//! discovery following addresses, one time budget per call, the retry
//! budget, load shedding, a connection cut mid-call, an eager connect past a
//! stalled endpoint, and settings refused at connect.

use std::{
    collections::HashMap,
    io::Read,
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use session_client::{Code, Error, SessionClient};
use tokio::net::TcpListener;

use crate::support::{
    Behaviour, Pki, PrivateRedis, Stub, TempFiles, TestServer, config_on, error_chain, free_port,
    grpc_timeout, https_url, test_config, unique_prefix,
};

fn no_metadata() -> HashMap<String, String> {
    HashMap::new()
}

/// Creates `n` more sessions of `user` through `client`, tokens numbered on
/// from `made`, each call asserted to succeed.
async fn create_more(client: &SessionClient, user: &str, made: &mut u32, n: u32) {
    for _ in 0..n {
        client
            .create_session(user, format!("{user}-{made}"), no_metadata())
            .await
            .unwrap();
        *made += 1;
    }
}

/// How many of 100 creates for `user` through `client` failed with
/// `Error::DeadlineExceeded`; any other failure panics.
async fn creates_timed_out(client: &SessionClient, user: &str) -> u32 {
    let mut failed = 0;
    for i in 0..100 {
        match client
            .create_session(user, format!("{user}-{i}"), no_metadata())
            .await
        {
            Ok(true) => {}
            Err(Error::DeadlineExceeded(_)) => failed += 1,
            other => panic!("create {i}: {other:?}"),
        }
    }
    failed
}

/// A client of `url` with the call budget `timeout`, making up to `attempts`
/// attempts `backoff` (initial, max) apart, with a retry budget too large to
/// stop it.
async fn unthrottled(
    url: String,
    timeout: Duration,
    attempts: u32,
    backoff: (Duration, Duration),
) -> SessionClient {
    SessionClient::builder(url)
        .timeout(timeout)
        .max_attempts(attempts)
        .initial_backoff(backoff.0)
        .max_backoff(backoff.1)
        .retry_throttling(1000, 1.0)
        .connect()
        .await
        .unwrap()
}

/// Creates the session `token` of `user`, asserted to be new.
async fn assert_created(client: &SessionClient, user: &str, token: &str) {
    assert!(
        client
            .create_session(user, token, no_metadata())
            .await
            .unwrap()
    );
}

/// A configuration with room for many sessions of one user, so that a
/// user's count says how many creates a server took.
fn roomy_config() -> session_server::Config {
    let mut config = test_config();
    config.max_sessions_per_user = 1000;
    config
}

/// How many sessions `user` has on the server at `url` (its own key prefix).
async fn count_on(url: &str, user: &str) -> u32 {
    let direct = SessionClient::connect(url).await.unwrap();
    direct.get_user_session_count(user).await.unwrap()
}

/// With one of two endpoints refusing connections, 200 creates and 200 gets
/// all succeed (the dead endpoint is ejected; a write that never left is sent
/// to the other); once a server listens on the dead port again, calls reach
/// it again while the first one still serves.
#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_used_again_once_it_recovers() {
    let live = TestServer::start_with(roomy_config()).await;
    let dead_port = free_port();
    let dead_url = format!("http://127.0.0.1:{dead_port}");
    let client = SessionClient::builder(live.url())
        .endpoint(&dead_url)
        .connect()
        .await
        .unwrap();

    for i in 0..200 {
        let created = client
            .create_session("dora", format!("dora-{i}"), no_metadata())
            .await;
        assert!(matches!(created, Ok(true)), "create {i}: {created:?}");
    }
    for i in 0..200 {
        let found = client.get_session(format!("dora-{i}")).await;
        assert!(
            matches!(&found, Ok(Some(s)) if s.user_id == "dora"),
            "get {i}: {found:?}"
        );
    }

    // The same address comes back, as a server with its own key prefix so
    // that the sessions created through it can be told apart.
    let mut revived_config = roomy_config();
    revived_config.key_prefix = unique_prefix();
    let listener = TcpListener::bind(("127.0.0.1", dead_port)).await.unwrap();
    let revived = TestServer::serve_on(listener, revived_config);

    let start = Instant::now();
    let mut made = 0;
    while count_on(&dead_url, "eli").await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the revived endpoint got no call in 15 s"
        );
        create_more(&client, "eli", &mut made, 10).await;
    }
    // Both serve now: calls are spread again, none lost.
    create_more(&client, "eli", &mut made, 50).await;
    let (on_live, on_revived) = (
        count_on(&live.url(), "eli").await,
        count_on(&dead_url, "eli").await,
    );
    assert_eq!(on_live + on_revived, made);
    assert!(on_live > 0 && on_revived > 0, "{on_live} / {on_revived}");
    revived.shutdown().await;
}

/// With one of two endpoints hung (it answered before; now its port still
/// accepts but nothing answers, as a SIGSTOPped server), it is ejected after
/// a few attempt timeouts: 200 gets all succeed (each timed-out attempt is
/// retried on the healthy endpoint within the call's budget), and of 100
/// creates only those sent to it before its ejection fail, as
/// `DeadlineExceeded` (at most 3, one per unanswered attempt in a row, with
/// calls made one at a time). A brand-new silent endpoint (never answered)
/// is ejected at its first timeout. The hung endpoint is not given calls back
/// while its probe's health check goes unanswered.
#[tokio::test]
async fn a_hung_endpoint_is_ejected_after_a_few_timeouts() {
    let config = roomy_config();
    let healthy = TestServer::start_with(config.clone()).await;
    let behind = TestServer::start_with(config).await;
    let (proxy, hung) = hanging_proxy(behind.addr).await;
    let client = |second: String| {
        SessionClient::builder(healthy.url())
            .endpoint(second)
            .attempt_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(10))
            .connect()
    };
    let reader = client(format!("http://{proxy}")).await.unwrap();
    let writer = client(format!("http://{proxy}")).await.unwrap();
    // Both clients see the proxied server answer before it hangs.
    for i in 0..40 {
        for (n, client) in [&reader, &writer].into_iter().enumerate() {
            client
                .create_session("kim", format!("kim-{i}-{n}"), no_metadata())
                .await
                .unwrap();
        }
        reader
            .create_session("kim", format!("kim-w{i}"), no_metadata())
            .await
            .unwrap();
    }
    assert!(hung.connections() >= 2, "the proxied server got no calls");
    hung.hang();

    for i in 0..200 {
        let found = reader.get_session(format!("kim-w{}", i % 40)).await;
        assert!(
            matches!(&found, Ok(Some(s)) if s.user_id == "kim"),
            "get {i}: {found:?}"
        );
    }

    let failed = creates_timed_out(&writer, "lee").await;
    assert!(failed <= 3, "{failed} creates failed on the hung endpoint");

    // A silent endpoint that never answered: ejected at its first timeout.
    let silent = StdListener::bind("127.0.0.1:0").unwrap();
    let fresh = client(format!("http://{}", silent.local_addr().unwrap()))
        .await
        .unwrap();
    let failed = creates_timed_out(&fresh, "mae").await;
    assert!(
        failed <= 1,
        "{failed} creates failed on the silent endpoint"
    );
    drop(silent);
}

/// A server dying under load (every connection reset at once, then connects
/// refused) with 40 reads in flight on two servers: the reads whose
/// connection broke are retried on the other server without draining the
/// shared retry budget, and all 40 succeed.
#[tokio::test]
async fn a_server_dying_under_load_does_not_drain_the_retry_budget() {
    let redis = PrivateRedis::start();
    let mut config = config_on(&redis);
    // Calls wait out the pause below rather than fail.
    config.redis_timeout_ms = 10_000;
    let survivor = TestServer::start_with(config.clone()).await;
    let doomed = TestServer::start_with(config).await;
    let (proxy, switch) = hanging_proxy(doomed.addr).await;
    let client = SessionClient::builder(survivor.url())
        .endpoint(format!("http://{proxy}"))
        .timeout(Duration::from_secs(20))
        .lazy(false)
        .connect()
        .await
        .unwrap();
    // Both connections open, so that the reads spread over both.
    for _ in 0..20 {
        assert_eq!(client.get_user_session_count("nia").await.unwrap(), 0);
    }
    assert!(switch.connections() >= 1, "the doomed server got no calls");

    // Redis paused: every read stays in flight on one server or the other.
    redis.pause(2_000).await;
    let reads: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get_user_session_count("nia").await })
        })
        .collect();
    // Let the reads reach the servers (if some have not, they meet a
    // refused connect instead, which is retried as well).
    tokio::time::sleep(Duration::from_millis(500)).await;
    switch.kill();
    for (i, read) in reads.into_iter().enumerate() {
        let read = read.await.unwrap();
        assert!(matches!(read, Ok(0)), "read {i}: {read:?}");
    }
}

/// `builder`'s client, connected, following DNS: its names resolved through
/// `resolver` every 50 ms.
async fn discovering<F, Fut>(builder: session_client::Builder, resolver: F) -> SessionClient
where
    F: Fn(String, u16) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static,
{
    builder
        .dns_discovery(Duration::from_millis(50))
        .dns_resolver(resolver)
        .connect()
        .await
        .unwrap()
}

/// DNS discovery (a resolver the test controls, as a headless Service's
/// name): an address added to the answer gets calls, an address removed
/// gets none.
#[tokio::test]
async fn dns_discovery_follows_addresses_added_and_removed() {
    let first = TestServer::start_with(roomy_config()).await;
    let second = TestServer::start_with(roomy_config()).await;
    let answer = Arc::new(Mutex::new(vec![first.addr]));
    let resolver = {
        let answer = answer.clone();
        move |host: String, port: u16| {
            let addresses = answer.lock().unwrap().clone();
            async move {
                assert_eq!((host.as_str(), port), ("sessionstore-headless.test", 50051));
                Ok::<Vec<SocketAddr>, std::io::Error>(addresses)
            }
        }
    };
    let client = discovering(
        SessionClient::builder("http://sessionstore-headless.test:50051"),
        resolver,
    )
    .await;
    let mut made = 0;
    let mut create = async |n: u32| {
        create_more(&client, "fay", &mut made, n).await;
    };

    create(20).await;
    assert_eq!(count_on(&first.url(), "fay").await, 20);
    assert_eq!(count_on(&second.url(), "fay").await, 0);

    // Added: the second address starts getting calls.
    *answer.lock().unwrap() = vec![first.addr, second.addr];
    let start = Instant::now();
    while count_on(&second.url(), "fay").await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "added address unused"
        );
        create(10).await;
    }

    // Removed: the first address gets no more calls.
    *answer.lock().unwrap() = vec![second.addr];
    let start = Instant::now();
    loop {
        let before = count_on(&first.url(), "fay").await;
        create(10).await;
        if count_on(&first.url(), "fay").await == before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "removed address used"
        );
    }
    let (first_before, second_before) = (
        count_on(&first.url(), "fay").await,
        count_on(&second.url(), "fay").await,
    );
    create(50).await;
    assert_eq!(count_on(&first.url(), "fay").await, first_before);
    assert_eq!(count_on(&second.url(), "fay").await, second_before + 50);
}

/// Over TLS, each discovered address is expected to present a certificate
/// for the DNS name (not its IP address), so mutual TLS works with discovery
/// and no `tls_domain_name`.
#[tokio::test]
async fn dns_discovery_over_tls_checks_the_name() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, true)).await;
    let addr = server.addr;
    let client = SessionClient::builder(format!("https://{}:50051", Pki::SERVER_NAME))
        .dns_discovery(Duration::from_secs(60))
        .dns_resolver(move |_, _| async move { Ok(vec![addr]) })
        .ca_certificate(pki.ca.clone())
        .identity(pki.client_cert.clone(), pki.client_key.clone())
        .lazy(false)
        .connect()
        .await
        .unwrap();
    assert_eq!(client.get_user_session_count("jo").await.unwrap(), 0);
}

/// DNS discovery with two names: once one name stops resolving, the other's
/// changes are still followed (a new address gets calls, a removed one gets
/// none), and the failing name's last known address keeps getting calls.
#[tokio::test]
async fn one_name_failing_to_resolve_does_not_freeze_the_others() {
    let kept = TestServer::start_with(roomy_config()).await;
    let old = TestServer::start_with(roomy_config()).await;
    let new = TestServer::start_with(roomy_config()).await;
    let broken = Arc::new(Mutex::new(false));
    let answer = Arc::new(Mutex::new(vec![old.addr]));
    let resolver = {
        let (broken, answer, kept) = (broken.clone(), answer.clone(), kept.addr);
        move |host: String, _port: u16| {
            let result = match host.as_str() {
                "flaky.test" if *broken.lock().unwrap() => Err(std::io::Error::other("SERVFAIL")),
                "flaky.test" => Ok(vec![kept]),
                _ => Ok(answer.lock().unwrap().clone()),
            };
            async move { result }
        }
    };
    let builder =
        SessionClient::builder("http://flaky.test:50051").endpoint("http://steady.test:50051");
    let client = discovering(builder, resolver).await;
    *broken.lock().unwrap() = true;
    *answer.lock().unwrap() = vec![new.addr];

    let mut made = 0;
    let start = Instant::now();
    loop {
        let before = count_on(&old.url(), "ivy").await;
        create_more(&client, "ivy", &mut made, 20).await;
        if count_on(&old.url(), "ivy").await == before && count_on(&new.url(), "ivy").await > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the steady name's new answer was not followed while the other failed"
        );
    }
    // Settled: the failing name's address and the new one share the calls.
    let before = (
        count_on(&kept.url(), "ivy").await,
        count_on(&old.url(), "ivy").await,
        count_on(&new.url(), "ivy").await,
    );
    create_more(&client, "ivy", &mut made, 100).await;
    let after = (
        count_on(&kept.url(), "ivy").await,
        count_on(&old.url(), "ivy").await,
        count_on(&new.url(), "ivy").await,
    );
    assert_eq!(after.1, before.1, "the removed address got calls");
    assert!(
        after.0 > before.0,
        "the failing name's last address got none"
    );
    assert!(after.2 > before.2, "the new address got none");
    assert_eq!(after.0 + after.1 + after.2, made);
}

/// With Redis paused and many retries allowed, a read with `timeout(300 ms)`
/// returns within its budget (the old per-attempt timeout took attempts ×
/// timeout), with a transient error.
#[tokio::test]
async fn the_call_budget_holds_with_redis_paused_and_retries_on() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        // Each attempt fails fast with UNAVAILABLE, so a per-attempt timeout
        // would allow 20 of them: about 2 s.
        c.redis_timeout_ms = 100;
    })
    .await;
    let budget = Duration::from_millis(300);
    let backoff = (Duration::from_millis(10), Duration::from_millis(20));
    let client = unthrottled(server.url(), budget, 20, backoff).await;
    assert_created(&client, "gus", "g-1").await;

    redis.pause(5000).await;
    let start = Instant::now();
    let result = client.get_session("g-1").await;
    let elapsed = start.elapsed();
    assert!(
        matches!(
            &result,
            Err(Error::Unavailable(_) | Error::DeadlineExceeded(_))
        ),
        "{result:?}"
    );
    assert!(result.unwrap_err().is_retryable());
    // A correctness bound, not a speed one: generous for a loaded machine.
    assert!(elapsed < budget + Duration::from_secs(1), "{elapsed:?}");
}

/// Each attempt sends the time left of the call's budget as `grpc-timeout`
/// (shrinking from attempt to attempt), capped by `attempt_timeout`.
#[tokio::test]
async fn each_attempt_sends_the_time_left_as_grpc_timeout() {
    let stub = Stub::start(Behaviour::unavailable_forever()).await;
    let budget = Duration::from_secs(3);
    let client = stub
        .client()
        .timeout(budget)
        .max_attempts(4)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let result = client.get_user_session_count("u").await;
    assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    let sent: Vec<Duration> = stub
        .metadata()
        .iter()
        .map(|m| grpc_timeout(m).expect("grpc-timeout"))
        .collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert!(sent[0] <= budget, "{sent:?}");
    for pair in sent.windows(2) {
        // At least half the 100 ms backoff passed between two attempts.
        assert!(pair[1] + Duration::from_millis(50) <= pair[0], "{sent:?}");
    }

    let capped = stub
        .client()
        .timeout(budget)
        .attempt_timeout(Duration::from_millis(200))
        .max_attempts(2)
        .connect()
        .await
        .unwrap();
    let _ = capped.get_user_session_count("u").await;
    let sent: Vec<Duration> = stub.metadata()[4..]
        .iter()
        .map(|m| grpc_timeout(m).expect("grpc-timeout"))
        .collect();
    assert_eq!(sent.len(), 2);
    assert!(
        sent.iter().all(|t| *t <= Duration::from_millis(200)),
        "{sent:?}"
    );
}

/// The retry budget is shared across calls: once failures drained it, reads
/// get one attempt each instead of `max_attempts`.
#[tokio::test]
async fn the_retry_budget_stops_retries_across_calls() {
    let stub = Stub::start(Behaviour::unavailable_forever()).await;
    let client = stub
        .client()
        .max_attempts(3)
        .retry_throttling(4, 0.1)
        .connect()
        .await
        .unwrap();
    for _ in 0..5 {
        let result = client.get_user_session_count("u").await;
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
    // 4 tokens, retries while more than 2 are left: the first call gets
    // 2 attempts (4 → 3 → 2), every later one a single attempt.
    assert_eq!(stub.calls("GetUserSessionCount"), 2 + 4);
    // A clone shares the budget.
    let clone = client.clone();
    let _ = clone.get_user_session_count("u").await;
    assert_eq!(stub.calls("GetUserSessionCount"), 7);
}

/// The real server's load shedding (its concurrency cap) is
/// `Error::Overloaded`, retryable, for reads and writes alike.
#[tokio::test]
async fn an_overloaded_server_is_overloaded() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.max_concurrent_requests = 1;
        c.redis_timeout_ms = 7000;
        c.request_timeout_ms = 9000;
    })
    .await;
    let client = SessionClient::builder(server.url())
        .timeout(Duration::from_millis(200))
        .max_attempts(1)
        .connect()
        .await
        .unwrap();
    assert_created(&client, "hal", "h-1").await;

    redis.pause(5000).await;
    // One call holds the only permit, waiting on the paused Redis. It may
    // itself be shed while a probe below holds the permit: the client
    // retries it (reads are retried on load shedding) until it gets in.
    let holder = {
        let backoff = (Duration::from_millis(1), Duration::from_millis(5));
        let slow = unthrottled(server.url(), Duration::from_secs(8), 1000, backoff).await;
        tokio::spawn(async move { slow.get_session("h-1").await })
    };
    let start = Instant::now();
    let shed = loop {
        match client.get_session("h-1").await {
            Err(err @ Error::Overloaded(_)) => break err,
            other => {
                assert!(
                    start.elapsed() < Duration::from_secs(4),
                    "never shed: {other:?}"
                );
                // A probe that took the permit itself leaves a gap for
                // the holder's retries to get in.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(shed.code(), Some(Code::ResourceExhausted));
    assert!(shed.is_retryable());
    let write = client.create_session("hal", "h-2", no_metadata()).await;
    assert!(matches!(write, Err(Error::Overloaded(_))), "{write:?}");
    // The held call completes once Redis resumes.
    let held = holder.await.unwrap();
    assert!(matches!(held, Ok(Some(_))), "{held:?}");
}

/// A connection cut after the request was sent fails the attempt with a
/// transport error: a read is retried (on a new connection) and succeeds, a
/// write is not repeated (it may have reached the server) and fails as
/// `Unavailable`.
#[tokio::test]
async fn a_connection_cut_mid_call_is_retried_for_reads_only() {
    let stub = Stub::start(Behaviour::ok()).await;
    // A client whose first connection is cut after one request.
    let cut_once = async || {
        let proxy = cutting_proxy(stub.server.addr, 1);
        SessionClient::builder(format!("http://{proxy}"))
            .initial_backoff(Duration::from_millis(5))
            .connect()
            .await
            .unwrap()
    };
    let client = cut_once().await;
    assert_eq!(
        client.get_user_session_count("u").await.unwrap(),
        Stub::COUNT
    );
    assert_eq!(stub.calls("GetUserSessionCount"), 1);

    let client = cut_once().await;
    let write = client.revoke_all_user_sessions("u").await;
    match write {
        Err(err @ Error::Unavailable(_)) => assert!(err.is_retryable()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(stub.calls("RevokeAllUserSessions"), 0);
    // The next call gets a new connection.
    client.revoke_all_user_sessions("u").await.unwrap();
    assert_eq!(stub.calls("RevokeAllUserSessions"), 1);
}

/// An eager client with a stalled endpoint first (TCP accepted, TLS never
/// answered) connects through the other one without waiting for the stalled
/// one's connect timeout, and sends it no calls.
#[tokio::test]
async fn an_eager_connect_does_not_wait_for_a_stalled_endpoint() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, false)).await;
    let stalled = StdListener::bind("127.0.0.1:0").unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    // Accepts and never answers; the sockets live as long as the thread.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in stalled.incoming() {
            held.push(stream);
        }
    });

    let start = Instant::now();
    let client = SessionClient::builder(format!("https://{stalled_addr}"))
        .endpoint(https_url(&server))
        .ca_certificate(pki.ca.clone())
        .tls_domain_name(Pki::SERVER_NAME)
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(5))
        .lazy(false)
        .connect()
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(client.get_user_session_count("ida").await.unwrap(), 0);
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// Settings that cannot work fail at connect with `Error::Config`: a path
/// passed as the CA or the identity, a bearer token to an `http://` server
/// without the opt-in.
#[tokio::test]
async fn misconfiguration_fails_at_connect() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, true)).await;
    let path_as_ca = SessionClient::builder(https_url(&server))
        .ca_certificate("/etc/sessionstore/ca.pem")
        .connect()
        .await;
    match path_as_ca {
        Err(Error::Config(cause)) => {
            assert!(cause.to_string().contains("no PEM certificate"), "{cause}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    let path_as_identity = SessionClient::builder(https_url(&server))
        .ca_certificate(pki.ca.clone())
        .identity("/etc/client.pem", pki.client_key.clone())
        .connect()
        .await;
    assert!(
        matches!(path_as_identity, Err(Error::Config(_))),
        "{path_as_identity:?}"
    );

    let plain = TestServer::start().await;
    let token_in_clear = SessionClient::builder(plain.url())
        .bearer_token("t")
        .connect()
        .await;
    assert!(
        matches!(&token_in_clear, Err(Error::Config(c)) if c.to_string().contains("allow_plaintext_token")),
        "{token_in_clear:?}"
    );
}

/// A rotated bearer token is used by the client and its clones without a
/// rebuild; a token that would go out in plaintext cannot be set later
/// either.
#[tokio::test]
async fn a_bearer_token_rotates_without_a_rebuild() {
    let (server, _files) = TestServer::start_requiring_tokens("new-token\n").await;
    let client = SessionClient::builder(server.url())
        .bearer_token("old-token")
        .allow_plaintext_token(true)
        .connect()
        .await
        .unwrap();
    let clone = client.clone();
    let refused = clone.get_user_session_count("ivy").await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );
    client.set_bearer_token("new-token").unwrap();
    assert_eq!(clone.get_user_session_count("ivy").await.unwrap(), 0);
    assert!(matches!(
        client.set_bearer_token("bad\ntoken"),
        Err(Error::Config(_))
    ));
    assert_eq!(client.get_user_session_count("ivy").await.unwrap(), 0);

    let anonymous = SessionClient::connect(server.url()).await.unwrap();
    let err = anonymous.set_bearer_token("new-token").unwrap_err();
    assert!(
        err.to_string().contains("plaintext"),
        "{}",
        error_chain(&err)
    );
}

/// A TCP proxy to `target` whose first `cut` connections are closed once the
/// client's request has arrived (after 200 ms without further bytes); later
/// ones are forwarded. Plain threads: the workspace's tokio has no io-util.
fn cutting_proxy(target: SocketAddr, cut: usize) -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, inbound) in listener.incoming().enumerate() {
            let Ok(mut inbound) = inbound else { return };
            if n < cut {
                inbound
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = [0_u8; 4096];
                let mut got = 0;
                loop {
                    match inbound.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(_) if got > 0 => break,
                        Err(_) => {}
                    }
                }
                drop(inbound);
                continue;
            }
            let Ok(outbound) = StdStream::connect(target) else {
                return;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// A TCP proxy to `target` that forwards until [`Hang::hang`], then stops
/// forwarding in both directions on every connection, old and new, while
/// keeping them open: a hung server, as seen from a client. [`Hang::kill`]
/// instead closes every connection and the listener: a server that died.
async fn hanging_proxy(target: SocketAddr) -> (SocketAddr, Hang) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hang = Hang {
        hung: Arc::default(),
        accepted: Arc::default(),
        killed: Arc::new(tokio::sync::watch::channel(false).0),
    };
    let state = hang.clone();
    tokio::spawn(async move {
        let mut killed = state.killed.subscribe();
        loop {
            let inbound = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((inbound, _)) => inbound,
                    Err(_) => return,
                },
                // Dropping the listener: connects are refused from now on.
                _ = killed.wait_for(|k| *k) => return,
            };
            state.accepted.fetch_add(1, Ordering::Relaxed);
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let (client_read, client_write) = inbound.into_split();
            let (server_read, server_write) = outbound.into_split();
            for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                let state = state.clone();
                tokio::spawn(async move {
                    let mut killed = state.killed.subscribe();
                    let mut buf = [0_u8; 16 * 1024];
                    loop {
                        let n = tokio::select! {
                            read = from.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            },
                            // Dropping both halves closes the connection.
                            _ = killed.wait_for(|k| *k) => return,
                        };
                        if state.hung.load(Ordering::Relaxed) {
                            // Hold both halves open, never forward again.
                            let _ = killed.wait_for(|k| *k).await;
                            return;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, hang)
}

/// The switches of a [`hanging_proxy`], and what it saw.
#[derive(Clone)]
struct Hang {
    hung: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    killed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Hang {
    fn hang(&self) {
        self.hung.store(true, Ordering::Relaxed);
    }

    fn kill(&self) {
        self.killed.send_replace(true);
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}
