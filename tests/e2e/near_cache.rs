//! The client's near-cache end to end: answers from memory that Redis never
//! sees, revocations by other clients arriving over the real
//! `WatchRevocations` stream, flushes on reset and on the stream's end, the
//! staleness bound, and the fill race, made deterministic by a relay that
//! holds one GetSession answer until the revocation that overtakes it has
//! been delivered.
//!
//! Timings are never asserted: each test waits for a condition with a
//! deadline far beyond what it needs, and what it checks could only hold
//! through the mechanism it names (e.g. a revocation is seen through the
//! stream while the staleness bound is far away).

use std::{collections::BTreeMap, time::Duration};

use crate::support::{
    PrivateRedis, Relay, TestServer, client_example, command_calls, faketime, gone_within,
    wait_until,
};
use session_client::{Error, NearCacheStats, SessionClient};

/// Far beyond any delivery latency, so a test that sees a revocation within
/// it saw the stream deliver it, not the staleness bound expire.
const LONG_STALENESS: Duration = Duration::from_secs(60);
/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

/// A client of `url` with the near-cache on.
async fn cached_client(url: String, max_staleness: Duration) -> SessionClient {
    SessionClient::builder(url)
        .near_cache(1000)
        .near_cache_max_staleness(max_staleness)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

fn stats(client: &SessionClient) -> NearCacheStats {
    client.near_cache_stats().expect("the near-cache is on")
}

/// Waits until the client's stream delivered its reset and is healthy.
async fn healthy(client: &SessionClient) {
    assert!(
        wait_until(PATIENCE, || async { stats(client).healthy }).await,
        "the revocation stream never became healthy: {:?}",
        client.near_cache_stats()
    );
}

/// A relay in front of `server`, and a caching client of the relay (with a
/// staleness bound far away) whose revocation stream is healthy.
async fn healthy_behind_relay(server: &TestServer) -> (Relay, SessionClient) {
    let relay = Relay::start(server).await;
    let cached = cached_client(relay.url(), LONG_STALENESS).await;
    healthy(&cached).await;
    (relay, cached)
}

/// Creates a session through `client` and checks it was stored.
async fn create(client: &SessionClient, user: &str, token: &str) {
    assert!(
        client
            .create_session(user, token, Default::default())
            .await
            .unwrap(),
        "{token} was not created"
    );
}

/// A first lookup (a miss that fills the cache), then a second one
/// answered from memory.
async fn cache(client: &SessionClient, user: &str, token: &str) {
    let before = stats(client);
    let found = client.get_user_session(user, token).await.unwrap();
    assert_eq!(found.map(|s| s.token_id).as_deref(), Some(token));
    let found = client.get_user_session(user, token).await.unwrap();
    assert_eq!(found.map(|s| s.token_id).as_deref(), Some(token));
    let after = stats(client);
    assert_eq!(
        (after.misses - before.misses, after.hits - before.hits),
        (1, 1),
        "one call, then one answer from memory: {after:?}"
    );
}

/// Hits are answered without a single Redis command, where the same lookups
/// without the cache cost one each (counted by Redis's `INFO commandstats`
/// on a private Redis, heartbeats and health PINGs aside).
#[tokio::test]
async fn hits_do_not_touch_redis() {
    const SESSIONS: usize = 10;
    const LOOKUPS: usize = 1000;
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.health_check_interval_ms = 3_600_000;
        c.revocation_heartbeat_ms = 60_000;
    })
    .await;
    let cached = cached_client(server.url(), Duration::from_secs(600)).await;
    let plain = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    let session = |i: usize| (format!("user-{}", i % 3), format!("token-{i}"));
    for i in 0..SESSIONS {
        let (user, token) = session(i);
        create(&plain, &user, &token).await;
        cache(&cached, &user, &token).await;
    }

    let mut conn = redis.connection().await;
    let before = command_calls(&mut conn).await;
    let hits_before = stats(&cached).hits;
    for i in 0..LOOKUPS {
        let (user, token) = session(i % SESSIONS);
        let found = if i % 2 == 0 {
            cached.get_user_session(&user, &token).await
        } else {
            cached.get_session(&token).await
        };
        assert!(found.unwrap().is_some(), "{token} not found");
    }
    let during = delta(&before, &command_calls(&mut conn).await);
    assert_eq!(
        stats(&cached).hits - hits_before,
        LOOKUPS as u64,
        "every lookup answered from memory"
    );
    assert!(
        during.is_empty(),
        "{LOOKUPS} cached lookups sent Redis commands: {during:?}"
    );

    // The same lookups through a client without the cache reach Redis: the
    // counting above would have seen them.
    let before = command_calls(&mut conn).await;
    for i in 0..SESSIONS {
        let (user, token) = session(i);
        assert!(
            plain
                .get_user_session(&user, &token)
                .await
                .unwrap()
                .is_some()
        );
    }
    let uncached: u64 = delta(&before, &command_calls(&mut conn).await)
        .values()
        .sum();
    assert!(
        uncached >= SESSIONS as u64,
        "{SESSIONS} uncached lookups sent {uncached} commands"
    );
    server.shutdown().await;
}

/// The commands called between two snapshots, without INFO itself and the
/// server's own heartbeats (an EVAL of a script that calls TIME and
/// PUBLISH; Redis 7 counts the script's commands too) and health checks
/// (PING), which run whatever the clients do. The request path runs its
/// scripts with EVALSHA, which stays counted.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "info" | "eval" | "time" | "publish" | "spublish" | "ping"
            )
        })
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// A session revoked by another client (one, then all of a user's) leaves
/// the cache through the stream: seen as a revocation applied, with no
/// flush, while the staleness bound is a minute away.
#[tokio::test]
async fn a_revocation_by_another_client_drops_the_entry() {
    let server = TestServer::start().await;
    let cached = cached_client(server.url(), LONG_STALENESS).await;
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    create(&other, "alice", "a-1").await;
    create(&other, "alice", "a-2").await;
    create(&other, "bob", "b-1").await;
    cache(&cached, "alice", "a-1").await;
    cache(&cached, "alice", "a-2").await;
    cache(&cached, "bob", "b-1").await;
    let before = stats(&cached);
    assert_eq!(before.entries, 3);

    assert!(other.revoke_session("a-1").await.unwrap());
    assert!(
        wait_until(PATIENCE, || async { stats(&cached).entries == 2 }).await,
        "the revocation never reached the cache: {:?}",
        stats(&cached)
    );
    assert_eq!(cached.get_user_session("alice", "a-1").await.unwrap(), None);
    assert!(cached.get_session("a-2").await.unwrap().is_some());

    assert_eq!(other.revoke_all_user_sessions("alice").await.unwrap(), 1);
    assert!(
        wait_until(PATIENCE, || async { stats(&cached).entries == 1 }).await,
        "the user-wide revocation never reached the cache: {:?}",
        stats(&cached)
    );
    assert_eq!(cached.get_session("a-2").await.unwrap(), None);
    // Bob's session is untouched, and still answered from memory.
    let hits = stats(&cached).hits;
    assert!(
        cached
            .get_user_session("bob", "b-1")
            .await
            .unwrap()
            .is_some()
    );
    let after = stats(&cached);
    assert_eq!(after.hits, hits + 1);
    assert!(after.revocations_applied >= before.revocations_applied + 2);
    assert_eq!(after.resets, before.resets, "no flush explains it");
    assert!(after.healthy);
    server.shutdown().await;
}

/// "Not found" is never cached: a session created right after a lookup
/// missed it is found by the next lookup.
#[tokio::test]
async fn not_found_is_never_cached() {
    let server = TestServer::start().await;
    let cached = cached_client(server.url(), LONG_STALENESS).await;
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    assert_eq!(cached.get_user_session("carol", "c-1").await.unwrap(), None);
    assert_eq!(cached.get_session("c-1").await.unwrap(), None);
    assert_eq!(stats(&cached).entries, 0);
    create(&other, "carol", "c-1").await;
    cache(&cached, "carol", "c-1").await;
    server.shutdown().await;
}

/// Revocations made through the caching client itself apply before the call
/// returns, even when the stream delivers nothing (a relay drops its
/// messages).
#[tokio::test]
async fn own_revocations_apply_before_the_call_returns() {
    let server = TestServer::start().await;
    let (relay, cached) = healthy_behind_relay(&server).await;
    create(&cached, "dave", "d-1").await;
    create(&cached, "dave", "d-2").await;
    create(&cached, "dave", "d-3").await;
    for token in ["d-1", "d-2", "d-3"] {
        cache(&cached, "dave", token).await;
    }
    relay.mute();

    assert!(cached.revoke_session("d-1").await.unwrap());
    assert_eq!(cached.get_session("d-1").await.unwrap(), None);
    assert!(cached.revoke_user_session("dave", "d-2").await.unwrap());
    assert_eq!(cached.get_user_session("dave", "d-2").await.unwrap(), None);
    assert!(
        cached
            .get_user_session("dave", "d-3")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(cached.revoke_all_user_sessions("dave").await.unwrap(), 1);
    assert_eq!(cached.get_user_session("dave", "d-3").await.unwrap(), None);
    let after = stats(&cached);
    assert_eq!(after.entries, 0);
    assert!(
        after.healthy,
        "answered by the revocations, not by staleness"
    );
    server.shutdown().await;
}

/// A revoke made through the caching client whose future is dropped after
/// the request left (a caller's timeout, a `select!`) still drops the entry
/// from its own cache, with the stream muted so that only the client itself
/// can have dropped it.
#[tokio::test]
async fn a_cancelled_own_revoke_still_drops_the_entry() {
    let server = TestServer::start().await;
    let (relay, cached) = healthy_behind_relay(&server).await;
    create(&cached, "judy", "j-1").await;
    cache(&cached, "judy", "j-1").await;
    relay.mute();

    let mut held = relay.hold_next("RevokeSession");
    let revoke = tokio::spawn({
        let cached = cached.clone();
        async move { cached.revoke_session("j-1").await }
    });
    // The server has revoked it; its answer is held: the caller gives up.
    held.read().await;
    revoke.abort();
    assert!(revoke.await.unwrap_err().is_cancelled());
    held.release();

    let misses = stats(&cached).misses;
    assert_eq!(cached.get_user_session("judy", "j-1").await.unwrap(), None);
    let after = stats(&cached);
    assert_eq!(after.misses, misses + 1, "asked the server, not the cache");
    assert_eq!(after.entries, 0);
    assert!(after.healthy, "dropped by the revoke, not by staleness");
    server.shutdown().await;
}

/// The server's MAX_CONNECTION_AGE (3 s here, 1 s grace: every stream it
/// lets run would be cut at 4 s) no longer empties the cache: the client
/// replaces its stream every second, make before break, so over 10 s a
/// session looked up every few milliseconds is answered from memory every
/// time, the cache never stops being healthy, no reset flushes it, and
/// every revocation made meanwhile by another client still reaches it.
#[tokio::test]
async fn streams_are_replaced_without_a_flush() {
    const SESSIONS: usize = 20;
    let server = TestServer::start_tuned(|c| {
        c.max_connection_age = 3;
        c.max_connection_age_grace = 1;
        c.revocation_heartbeat_ms = 100;
    })
    .await;
    let cached = SessionClient::builder(server.url())
        .near_cache(1000)
        .near_cache_max_staleness(Duration::from_secs(1))
        .near_cache_stream_lifetime(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    create(&other, "kim", "k-hot").await;
    cache(&cached, "kim", "k-hot").await;
    for i in 0..SESSIONS {
        // A user each: a user's session cap must not evict any.
        create(&other, &format!("kim-{i}"), &format!("k-{i}")).await;
        cache(&cached, &format!("kim-{i}"), &format!("k-{i}")).await;
    }
    let before = stats(&cached);

    let started = std::time::Instant::now();
    let mut revoked = 0;
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let hot = cached.get_user_session("kim", "k-hot").await.unwrap();
        assert!(hot.is_some());
        let now = stats(&cached);
        assert!(
            now.healthy,
            "unhealthy after {:?}: {now:?}",
            started.elapsed()
        );
        samples += 1;
        // A revocation by another client every half second.
        if revoked < SESSIONS && started.elapsed() > Duration::from_millis(500 * revoked as u64) {
            revoke_through_age_outs(&other, &format!("k-{revoked}")).await;
            revoked += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = stats(&cached);
    assert_eq!(after.misses, before.misses, "a lookup missed: {after:?}");
    assert_eq!(after.hits - before.hits, samples);
    assert_eq!(after.resets, before.resets, "a reset flushed: {after:?}");
    assert!(
        after.switches >= before.switches + 5,
        "the stream was not replaced every second: {after:?}"
    );
    // Every revocation reached the cache, across the switches.
    assert!(
        wait_until(PATIENCE, || async {
            stats(&cached).entries == (SESSIONS - revoked + 1) as u64
        })
        .await,
        "{revoked} revoked, cache holds {:?}",
        stats(&cached)
    );
    for i in 0..revoked {
        assert_eq!(cached.get_session(format!("k-{i}")).await.unwrap(), None);
    }
    eprintln!("{samples} lookups over 10 s with MAX_CONNECTION_AGE 3 s: {after:?}");
    server.shutdown().await;
}

/// Revokes `token` through a client without the near-cache, repeating the
/// call when its connection, aged out by the server, failed it (a write is
/// not retried once it may have left; repeating a revoke is safe).
async fn revoke_through_age_outs(client: &SessionClient, token: &str) {
    for _ in 0..5 {
        match client.revoke_session(token).await {
            Ok(_) => return,
            Err(Error::Unavailable(_)) => {}
            Err(other) => panic!("revoking {token}: {other:?}"),
        }
    }
    panic!("{token} could not be revoked");
}

/// A reset flushes the cache: Redis restarted under the server (with its
/// data kept), the server's subscription is re-established and says so,
/// and the next lookup goes to the server again.
#[tokio::test]
async fn a_reset_flushes_the_cache() {
    let mut redis = PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let server = TestServer::on_tuned(&redis, |c| c.revocation_heartbeat_ms = 100).await;
    let cached = cached_client(server.url(), LONG_STALENESS).await;
    healthy(&cached).await;
    create(&cached, "erin", "e-1").await;
    cache(&cached, "erin", "e-1").await;
    let before = stats(&cached);
    assert_eq!(before.entries, 1);

    redis.restart();
    assert!(
        wait_until(PATIENCE, || async {
            let now = stats(&cached);
            now.resets > before.resets && now.healthy
        })
        .await,
        "no reset after Redis restarted: {:?}",
        stats(&cached)
    );
    assert_eq!(stats(&cached).entries, 0, "flushed");
    let misses = stats(&cached).misses;
    let found = cached.get_user_session("erin", "e-1").await.unwrap();
    assert!(
        found.is_some(),
        "the session survived in the append-only file"
    );
    assert_eq!(stats(&cached).misses, misses + 1, "asked the server");
    server.shutdown().await;
}

/// A stream that goes silent (a relay drops its messages) stops answers
/// from memory after max_staleness: a session revoked meanwhile, whose
/// revocation never arrives, is then answered "not found" by the server.
#[tokio::test]
async fn a_silent_stream_stops_answers_after_max_staleness() {
    let server = TestServer::start_tuned(|c| c.revocation_heartbeat_ms = 100).await;
    let relay = Relay::start(&server).await;
    // 20 heartbeats: a loaded test machine does not make it stale early.
    let cached = cached_client(relay.url(), Duration::from_secs(2)).await;
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    create(&other, "frank", "f-1").await;
    cache(&cached, "frank", "f-1").await;

    relay.mute();
    let applied = stats(&cached).revocations_applied;
    assert!(other.revoke_session("f-1").await.unwrap());
    assert!(
        gone_within(PATIENCE, &cached, "frank", "f-1").await,
        "still answered from memory long after max_staleness"
    );
    let after = stats(&cached);
    assert_eq!(
        after.revocations_applied, applied,
        "the revocation never arrived: staleness ended the answers"
    );
    assert!(!after.healthy);
    assert_eq!(after.entries, 0, "a silent stream flushes the cache");
    server.shutdown().await;
}

/// When the server goes away the stream ends: the cache is flushed at once
/// and lookups go to the (absent) server and fail, rather than being
/// answered from memory.
#[tokio::test]
async fn a_lost_stream_flushes_and_lookups_fail() {
    let server = TestServer::start().await;
    let cached = SessionClient::builder(server.url())
        .near_cache(10)
        .near_cache_max_staleness(LONG_STALENESS)
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    healthy(&cached).await;
    create(&cached, "grace", "g-1").await;
    cache(&cached, "grace", "g-1").await;

    server.shutdown().await;
    assert!(
        wait_until(PATIENCE, || async {
            let now = stats(&cached);
            !now.healthy && now.entries == 0
        })
        .await,
        "the stream's end went unnoticed: {:?}",
        stats(&cached)
    );
    match cached.get_user_session("grace", "g-1").await {
        Err(Error::Unavailable(_) | Error::DeadlineExceeded(_)) => {}
        other => panic!("expected the absent server's failure, got {other:?}"),
    }
}

/// The fill race, made deterministic: a lookup's answer (alive, read before
/// the revocation) is held by a relay until the revocation made meanwhile
/// has been delivered to the cache; that answer is returned but not cached,
/// so the next lookup asks the server and finds nothing. Once for a token
/// revocation and a lookup naming its user, once for a user-wide revocation
/// and a lookup that does not.
#[tokio::test]
async fn an_answer_overtaken_by_its_revocation_is_not_cached() {
    let server = TestServer::start().await;
    let relay = Relay::start(&server).await;
    let cached = cached_client(relay.url(), LONG_STALENESS).await;
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    create(&other, "heidi", "h-1").await;
    create(&other, "heidi", "h-2").await;

    for hinted in [true, false] {
        let token = if hinted { "h-1" } else { "h-2" };
        let mut held = relay.hold_next("GetSession");
        let lookup = tokio::spawn({
            let cached = cached.clone();
            async move {
                if hinted {
                    cached.get_user_session("heidi", token).await
                } else {
                    cached.get_session(token).await
                }
            }
        });
        held.read().await;
        // The server has answered "alive"; now the revocation overtakes it.
        let applied = stats(&cached).revocations_applied;
        if hinted {
            assert!(other.revoke_session(token).await.unwrap());
        } else {
            assert_eq!(other.revoke_all_user_sessions("heidi").await.unwrap(), 1);
        }
        assert!(
            wait_until(PATIENCE, || async {
                stats(&cached).revocations_applied > applied
            })
            .await,
            "the revocation never arrived"
        );
        held.release();
        let answer = lookup.await.unwrap().unwrap();
        assert!(answer.is_some(), "the relay returns what Redis said then");
        assert_eq!(stats(&cached).entries, 0, "the overtaken answer was cached");
        let misses = stats(&cached).misses;
        assert_eq!(cached.get_session(token).await.unwrap(), None);
        assert_eq!(stats(&cached).misses, misses + 1);
    }
    server.shutdown().await;
}

/// The stream carries the client's bearer token like every call: against a
/// server that requires one, the client with the right token gets a healthy
/// stream and answers from memory; one with a wrong token never does.
#[tokio::test]
async fn the_stream_carries_the_bearer_token() {
    let (server, _files) = TestServer::start_requiring_tokens("right-token\n").await;
    let with_token = |token: &str| {
        SessionClient::builder(server.url())
            .bearer_token(token)
            .allow_plaintext_token(true)
            .near_cache(10)
            .connect()
    };
    let right = with_token("right-token").await.unwrap();
    healthy(&right).await;
    create(&right, "ivan", "i-1").await;
    cache(&right, "ivan", "i-1").await;

    let wrong = with_token("wrong-token").await.unwrap();
    assert!(
        !wait_until(Duration::from_secs(1), || async { stats(&wrong).healthy }).await,
        "a stream opened with a wrong token became healthy"
    );
    let refused = wrong.get_user_session("ivan", "i-1").await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );
    server.shutdown().await;
}

/// Runs session-client's `near_cache_expiry` example against the server at `url` with
/// the wall clock `offset` off (libfaketime's `-f` format, e.g. `-120`: two
/// minutes behind) and the monotonic clock left real, and returns what it
/// printed, checking that its wall clock was indeed that far off Redis's.
fn skewed_expiry(url: &str, offset: &str, token: &str) -> BTreeMap<String, String> {
    let output = std::process::Command::new(faketime())
        .args(["-f", offset])
        .arg(client_example("near_cache_expiry"))
        .args([url, "skewed-user", token, "2000"])
        // Instant (CLOCK_MONOTONIC) stays real: only the wall clock is off.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("DONT_FAKE_MONOTONIC", "1")
        .output()
        .expect("faketime runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the example failed under faketime {offset}: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: BTreeMap<String, String> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let skew_ms: i128 = printed["wall_minus_redis_ms"].parse().unwrap();
    let wanted_ms = i128::from(offset.parse::<i64>().unwrap()) * 1000;
    assert!(
        (skew_ms - wanted_ms).abs() < 5_000,
        "faketime {offset} did not skew the example's wall clock: {printed:?}"
    );
    printed
}

/// A caching client whose host clock is two minutes behind Redis's stops
/// answering a session from memory once Redis expired it (judged by the
/// wall clock it would answer it for two more minutes), and one ten minutes
/// ahead still caches and answers a live session (judged by the wall clock
/// it would think it long expired): expiry follows Redis's clock as the
/// stream tells it, measured on from there by the monotonic clock. Each
/// client runs in a process of its own under libfaketime.
#[tokio::test]
async fn expiry_follows_redis_clock_whatever_the_hosts_clock_says() {
    let server = TestServer::start().await;
    // Both at once, off the runtime that serves them (a blocking wait here
    // would stall the in-process server).
    let runs = [("-120", "behind-1"), ("+600", "ahead-1")].map(|(offset, token)| {
        let url = server.url();
        tokio::task::spawn_blocking(move || (offset, skewed_expiry(&url, offset, token)))
    });
    let mut done = Vec::new();
    for run in runs {
        done.push(run.await.unwrap());
    }
    let runs = done;
    // Every failure of both runs at once, to see which directions broke.
    let mut failures = Vec::new();
    for (offset, printed) in &runs {
        for (key, wanted, what) in [
            (
                "hit_while_alive",
                "true",
                "a live session was not answered from memory",
            ),
            (
                "found_after_expiry",
                "false",
                "found a second after Redis expired it",
            ),
            (
                "hit_after_expiry",
                "false",
                "answered from memory after Redis expired it",
            ),
        ] {
            if printed[key] != wanted {
                failures.push(format!("clock {offset} s: {what}: {printed:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    server.shutdown().await;
}

/// With the host's clock right (the test's own process, on Redis's host), a
/// cached session is answered from memory up to its `expires_at` and not
/// after it by more than the stream's delivery delay: looked up every
/// millisecond, its last answer from memory comes at most 200 ms after
/// `expires_at` (a few milliseconds measured), and the first answer after
/// that is the server's "not found".
#[tokio::test]
async fn answers_from_memory_end_at_redis_expiry() {
    let server = TestServer::start().await;
    let cached = cached_client(server.url(), LONG_STALENESS).await;
    healthy(&cached).await;
    let ttl = Duration::from_millis(1500);
    let created = cached
        .create_session_with(session_client::NewSession::new("erin", "e-1").ttl(ttl))
        .await
        .unwrap();
    let expires_at = created.session.unwrap().expires_at;
    cache(&cached, "erin", "e-1").await;
    let mut last_hit = None;
    let deadline = std::time::Instant::now() + ttl + PATIENCE;
    loop {
        assert!(std::time::Instant::now() < deadline, "never expired");
        let hits = stats(&cached).hits;
        let found = cached.get_user_session("erin", "e-1").await.unwrap();
        let answered_at = std::time::SystemTime::now();
        if stats(&cached).hits > hits {
            assert!(found.is_some());
            last_hit = Some(answered_at);
        } else if found.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let last_hit = last_hit.expect("answered from memory at least once");
    // Positive: after expires_at.
    let late_ms: i128 = match last_hit.duration_since(expires_at) {
        Ok(after) => i128::try_from(after.as_millis()).unwrap(),
        Err(before) => -i128::try_from(before.duration().as_millis()).unwrap(),
    };
    eprintln!("last answer from memory {late_ms} ms after expires_at");
    assert!(
        late_ms <= 200,
        "answered from memory {late_ms} ms past expires_at"
    );
    server.shutdown().await;
}

/// A server that tells no Redis clock on its stream (older than
/// `redis_time`, stood for by a relay that strips it) gets every lookup:
/// its stream's resets and heartbeats arrive, yet the near-cache never calls
/// itself healthy, caches nothing and answers nothing from memory.
#[tokio::test]
async fn without_redis_clock_every_lookup_goes_to_the_server() {
    let server = TestServer::start().await;
    let relay = Relay::start_timeless(&server).await;
    let cached = cached_client(relay.url(), LONG_STALENESS).await;
    assert!(
        wait_until(PATIENCE, || async { stats(&cached).resets >= 1 }).await,
        "the stream's reset never arrived: {:?}",
        stats(&cached)
    );
    create(&cached, "frank", "f-1").await;
    for _ in 0..3 {
        assert!(
            cached
                .get_user_session("frank", "f-1")
                .await
                .unwrap()
                .is_some()
        );
    }
    let after = stats(&cached);
    assert_eq!((after.hits, after.misses, after.entries), (0, 3, 0));
    assert!(!after.healthy, "{after:?}");
    server.shutdown().await;
}

/// `with_cached_session` reads a cached session in place: `None` (and no
/// call) before the session is cached, then the very session
/// `check_user_session` and `get_user_session` answer, its metadata
/// included; another user's is not answered, and a revocation by another
/// client ends it; a client without the near-cache never answers.
#[tokio::test]
async fn with_cached_session_reads_hits_in_place() {
    let server = TestServer::start().await;
    let cached = cached_client(server.url(), LONG_STALENESS).await;
    let other = SessionClient::connect(server.url()).await.unwrap();
    healthy(&cached).await;
    let agent = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
    let metadata = [
        ("device".to_owned(), "phone".to_owned()),
        ("user_agent".to_owned(), agent.to_owned()),
    ];
    assert!(
        other
            .create_session("dana", "d-1", metadata.into())
            .await
            .unwrap()
    );
    assert_eq!(cached.with_cached_session("dana", "d-1", |_| ()), None);
    assert_eq!(stats(&cached).entries, 0, "a miss here fills nothing");

    let compact = cached
        .check_user_session("dana", "d-1")
        .await
        .unwrap()
        .expect("live");
    let hits = stats(&cached).hits;
    let (session, device, compacted) = cached
        .with_cached_session("dana", "d-1", |view| {
            (
                view.to_session(),
                view.metadata_value("device").map(str::to_owned),
                view.to_compact(),
            )
        })
        .expect("cached");
    assert_eq!(stats(&cached).hits, hits + 1, "answered from memory");
    assert_eq!(
        Some(&session),
        cached
            .get_user_session("dana", "d-1")
            .await
            .unwrap()
            .as_ref()
    );
    assert_eq!(compacted, compact);
    assert_eq!(device.as_deref(), Some("phone"));
    assert_eq!(
        session.metadata.get("user_agent").map(String::as_str),
        Some(agent)
    );
    assert_eq!(cached.with_cached_session("erin", "d-1", |_| ()), None);
    assert_eq!(
        cached.with_cached_session("", "d-1", |view| view.user_id().to_owned()),
        None,
        "no user named: nobody's session, not any user's"
    );
    assert_eq!(
        other.with_cached_session("dana", "d-1", |_| ()),
        None,
        "no near-cache"
    );

    assert!(other.revoke_session("d-1").await.unwrap());
    assert!(
        wait_until(PATIENCE, || async {
            cached.with_cached_session("dana", "d-1", |_| ()).is_none()
        })
        .await,
        "the revocation never reached the cache: {:?}",
        stats(&cached)
    );
    assert_eq!(stats(&cached).entries, 0);
    server.shutdown().await;
}
