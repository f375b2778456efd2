//! Login rate limiting: a sliding window per client address and per account,
//! resets that clear only what a login proves, and the limits holding against
//! attackers (reset bypass, many addresses, the window boundary, concurrency).

use std::time::{Duration, Instant};

use proptest::{collection::vec, prelude::*, test_runner::TestRunner};
use session_server::{
    Config, Store,
    model::{AccountKey, ClientAddr, LoginLimit},
};
use sessionstore::v1::{LoginLimit as PbLimit, RecordLoginAttemptResponse};

use crate::support::{
    Client, TestServer, inspect, login_account_key, pttl, record_attempt, reset_attempts,
    server_script, test_config,
};

/// Buckets per window, as in `session-server/src/store/login.rs`.
const BUCKETS: u64 = 10;

async fn attempt(c: &mut Client, ip: &str) -> RecordLoginAttemptResponse {
    record_attempt(c, ip, "", "").await
}

async fn attempt_for(c: &mut Client, ip: &str, account: &str) -> RecordLoginAttemptResponse {
    record_attempt(c, ip, account, "").await
}

async fn reset_for(c: &mut Client, ip: &str, account: &str) -> bool {
    reset_attempts(c, ip, account, "", false).await.reset
}

fn ms(d: &prost_types::Duration) -> i64 {
    d.seconds * 1000 + i64::from(d.nanos) / 1_000_000
}

/// The login limiter's `kind` key (`addr`, `pair`) for the address `ip`.
fn addr_tagged_key(config: &Config, kind: &str, ip: &str) -> String {
    let addr = ClientAddr::parse_with_prefix(ip, config.rate_limit_ipv6_prefix).unwrap();
    format!(
        "{}rate_limit:login:{kind}:{{{}}}",
        config.key_prefix,
        addr.as_str()
    )
}

fn addr_key(config: &Config, ip: &str) -> String {
    addr_tagged_key(config, "addr", ip)
}

fn pair_key(config: &Config, ip: &str, account: &str) -> String {
    let account = AccountKey::parse(account).unwrap();
    format!(
        "{}:{}",
        addr_tagged_key(config, "pair", ip),
        account.as_str()
    )
}

/// RATE_LIMIT_MAX_ATTEMPTS attempts are allowed, the next is refused by the
/// address with the exact time until the oldest bucket leaves the window; the
/// counter always has its TTL; reset without an account clears it.
#[tokio::test]
async fn attempts_past_the_limit_are_refused_until_reset() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let ip = "192.0.2.10";
    for n in 1..=5 {
        let verdict = attempt(&mut c, ip).await;
        assert!(verdict.allowed, "attempt {n}");
        assert_eq!(verdict.attempts, n);
        assert_eq!(verdict.remaining, 5 - n);
        assert_eq!(verdict.retry_after, None);
        assert_eq!(verdict.refused_by(), PbLimit::Unspecified);
    }
    let refused = attempt(&mut c, ip).await;
    assert!(!refused.allowed);
    assert_eq!(refused.attempts, 6);
    assert_eq!(refused.remaining, 0);
    assert_eq!(refused.refused_by(), PbLimit::Address);
    // Window 900 s in buckets of 90 s: the first attempts' bucket leaves the
    // span 11 buckets after it began, 900 to 990 s from now.
    let retry = ms(&refused.retry_after.expect("refusal says when to retry"));
    assert!((899_000..=990_000).contains(&retry), "{retry}");
    // Refused attempts are not counted: hammering does not extend the wait.
    let again = attempt(&mut c, ip).await;
    assert_eq!(again.attempts, 6);
    assert!(ms(&again.retry_after.unwrap()) <= retry);

    let ttl = pttl(&server.config, &addr_key(&server.config, ip)).await;
    assert!(ttl > 0 && ttl <= 990_000, "counter without a ttl: {ttl}");

    assert!(reset_for(&mut c, ip, "").await);
    assert!(attempt(&mut c, ip).await.allowed);
    assert_eq!(
        attempt(&mut c, "192.0.2.11").await.attempts,
        1,
        "addresses are counted apart"
    );
    assert!(!reset_for(&mut c, "192.0.2.99", "").await);
}

/// IPv6 clients are counted per /64 by default: two addresses in one /64
/// share a counter, another /64 has its own.
#[tokio::test]
async fn ipv6_is_counted_per_64() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(attempt(&mut c, "2001:db8:aa:1::1").await.attempts, 1);
    assert_eq!(
        attempt(&mut c, "2001:db8:aa:1:ffff:ffff:ffff:ffff")
            .await
            .attempts,
        2
    );
    assert_eq!(attempt(&mut c, "2001:DB8:AA:1::5").await.attempts, 3);
    assert_eq!(attempt(&mut c, "2001:db8:aa:2::1").await.attempts, 1);
}

/// RATE_LIMIT_IPV6_PREFIX=48 groups a whole /48 into one budget; IPv4-mapped
/// and IPv4-compatible addresses count as their IPv4 address, and the
/// IPv4-compatible form no longer shares a bucket with `::1`.
#[tokio::test]
async fn ipv6_prefix_is_configurable() {
    let server = TestServer::start_tuned(|c| c.rate_limit_ipv6_prefix = 48).await;
    let mut c = server.client().await;
    assert_eq!(attempt(&mut c, "2001:db8:aa:1::1").await.attempts, 1);
    assert_eq!(attempt(&mut c, "2001:db8:aa:ffff::9").await.attempts, 2);
    assert_eq!(attempt(&mut c, "2001:db8:ab::1").await.attempts, 1);
    assert_eq!(attempt(&mut c, "192.0.2.44").await.attempts, 1);
    assert_eq!(attempt(&mut c, "::ffff:192.0.2.44").await.attempts, 2);
    assert_eq!(attempt(&mut c, "::192.0.2.44").await.attempts, 3);
    assert_eq!(attempt(&mut c, "::1").await.attempts, 1);
    let key = addr_key(&server.config, "2001:db8:aa:77::1");
    assert!(key.ends_with("{2001:db8:aa::/48}"), "{key}");
    assert!(pttl(&server.config, &key).await > 0);
}

/// retry_after is exact: an attempt just before it is refused, one after it
/// is allowed.
#[tokio::test]
async fn retry_after_is_exact() {
    let server = TestServer::start_tuned(|c| {
        c.rate_limit_window = 1;
        c.rate_limit_max_attempts = 1;
    })
    .await;
    let mut c = server.client().await;
    let ip = "198.51.100.7";
    assert!(attempt(&mut c, ip).await.allowed);
    let refused = attempt(&mut c, ip).await;
    assert!(!refused.allowed);
    let retry = ms(&refused.retry_after.unwrap());
    // Buckets of 100 ms: between 1000 and 1100 ms after the first attempt.
    assert!((800..=1100).contains(&retry), "{retry}");
    tokio::time::sleep(Duration::from_millis(u64::try_from(retry).unwrap() - 250)).await;
    assert!(
        !attempt(&mut c, ip).await.allowed,
        "allowed before retry_after"
    );
    let refused = attempt(&mut c, ip).await;
    let rest = ms(&refused.retry_after.unwrap());
    tokio::time::sleep(Duration::from_millis(u64::try_from(rest).unwrap())).await;
    let fresh = attempt(&mut c, ip).await;
    assert!(fresh.allowed, "refused after retry_after: {fresh:?}");
    assert_eq!(fresh.attempts, 1);
}

/// The reset bypass fails: an attacker that guesses against a victim and
/// logs in to its own account between rounds (reset with its account) never
/// gets more guesses than the address's limit.
#[tokio::test]
async fn reset_with_an_account_does_not_clear_guesses_against_others() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let ip = "198.51.100.20";
    let mut guesses = 0;
    let mut refusals = Vec::new();
    for round in 0..10 {
        for _ in 0..4 {
            let verdict = attempt_for(&mut c, ip, "victim@example.com").await;
            if verdict.allowed {
                guesses += 1;
            } else {
                refusals.push(verdict.refused_by());
            }
        }
        let own = attempt_for(&mut c, ip, "mallory@example.com").await;
        let cleared = reset_for(&mut c, ip, "mallory@example.com").await;
        assert_eq!(cleared, own.allowed, "round {round}");
    }
    assert_eq!(guesses, 5, "only the address's budget");
    assert!(
        refusals.iter().all(|r| *r == PbLimit::Address),
        "{refusals:?}"
    );
    // The victim logging in clears the victim's account and the victim's
    // address, not the attacker's address.
    assert!(reset_for(&mut c, "192.0.2.200", "victim@example.com").await);
    let still = attempt_for(&mut c, ip, "victim@example.com").await;
    assert!(!still.allowed);
    assert_eq!(still.refused_by(), PbLimit::Address);
    // The weaker reset without an account clears the address's counter.
    assert!(reset_for(&mut c, ip, "").await);
    assert!(attempt_for(&mut c, ip, "victim@example.com").await.allowed);
}

/// Guesses against one account spread over 50 addresses are refused at the
/// account's limit; the refused attempts are given back to their addresses.
#[tokio::test]
async fn distributed_attack_is_refused_at_the_account_limit() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut allowed = 0;
    for host in 1..=50 {
        let ip = format!("203.0.113.{host}");
        let verdict = attempt_for(&mut c, &ip, "victim").await;
        if verdict.allowed {
            allowed += 1;
            assert_eq!(verdict.remaining, (10 - host).min(4));
        } else {
            assert_eq!(verdict.refused_by(), PbLimit::Account, "{ip}");
            assert_eq!(verdict.attempts, 11);
            let retry = ms(verdict.retry_after.as_ref().unwrap());
            assert!((899_000..=990_000).contains(&retry), "{retry}");
        }
    }
    assert_eq!(allowed, 10);
    // The 50th address's refused attempt left nothing behind.
    let key = addr_key(&server.config, "203.0.113.50");
    assert_eq!(pttl(&server.config, &key).await, -2);
    assert_eq!(
        attempt_for(&mut c, "203.0.113.50", "other").await.attempts,
        1
    );
    // The owner logging in clears the account's counter.
    assert!(reset_for(&mut c, "192.0.2.1", "victim").await);
    assert!(attempt_for(&mut c, "203.0.113.50", "victim").await.allowed);
}

/// Every counter key an attempt, a give-back or a reset leaves has a TTL no
/// longer than the window plus one bucket.
#[tokio::test]
async fn every_counter_key_has_a_ttl() {
    let server = TestServer::start_tuned(|c| c.rate_limit_account_max_attempts = 1).await;
    let cfg = server.config.clone();
    let mut c = server.client().await;
    let check = |keys: Vec<String>| {
        let cfg = cfg.clone();
        async move {
            for key in keys {
                let ttl = pttl(&cfg, &key).await;
                assert!(ttl == -2 || (1..=990_000).contains(&ttl), "{key}: {ttl}");
            }
        }
    };
    let ip = "192.0.2.77";
    assert!(attempt_for(&mut c, ip, "a").await.allowed);
    for key in [
        addr_key(&cfg, ip),
        pair_key(&cfg, ip, "a"),
        login_account_key(&cfg, "account", "a"),
    ] {
        assert!(pttl(&cfg, &key).await > 0, "{key}");
    }
    // Refused by the account: the address's attempt is given back.
    assert!(!attempt_for(&mut c, ip, "a").await.allowed);
    assert!(attempt_for(&mut c, ip, "b").await.allowed);
    assert!(reset_for(&mut c, ip, "a").await);
    assert_eq!(pttl(&cfg, &pair_key(&cfg, ip, "a")).await, -2);
    assert_eq!(
        pttl(&cfg, &login_account_key(&cfg, "account", "a")).await,
        -2
    );
    check(vec![
        addr_key(&cfg, ip),
        pair_key(&cfg, ip, "b"),
        login_account_key(&cfg, "account", "b"),
    ])
    .await;
    let left: std::collections::HashMap<String, u32> =
        inspect(&cfg, redis::cmd("HGETALL").arg(addr_key(&cfg, ip))).await;
    assert_eq!(left.values().sum::<u32>(), 1, "only b's attempt: {left:?}");
}

/// At the window boundary no more than the limit is allowed in any
/// window-long interval, per address and per account: each allowed attempt's
/// call ends at least a window after the call of the attempt `limit` earlier
/// began. (A fixed window would let 2 × limit through within a moment.)
#[tokio::test]
async fn no_burst_at_the_window_boundary() {
    let server = TestServer::start_tuned(|c| {
        c.rate_limit_window = 1;
        c.rate_limit_max_attempts = 3;
        c.rate_limit_account_max_attempts = 3;
    })
    .await;
    let mut c = server.client().await;
    for (subject, account) in [("address", ""), ("account", "boundary")] {
        let mut allowed: Vec<(Instant, Instant)> = Vec::new();
        let until = Instant::now() + Duration::from_millis(2600);
        let mut n = 0u32;
        while Instant::now() < until {
            n += 1;
            // Per account, the attempts come from ever new addresses.
            let ip = if account.is_empty() {
                "198.51.100.99".to_string()
            } else {
                format!("10.1.{}.{}", n / 250, n % 250)
            };
            let start = Instant::now();
            let verdict = attempt_for(&mut c, &ip, account).await;
            if verdict.allowed {
                allowed.push((start, Instant::now()));
            }
        }
        for pair in allowed.windows(4) {
            let span = pair[3].1 - pair[0].0;
            assert!(span >= Duration::from_secs(1), "{subject}: 4 in {span:?}");
        }
        assert!(
            allowed.len() >= 6,
            "{subject}: only {} allowed",
            allowed.len()
        );
    }
}

/// Concurrent attempts never exceed a limit: 64 at once from one address, and
/// 64 at once for one account from 64 addresses, allow exactly the limit.
#[tokio::test]
async fn concurrent_attempts_never_exceed_the_limit() {
    let server = TestServer::start().await;
    let c = server.client().await;
    for per_account in [false, true] {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    if per_account {
                        attempt_for(&mut c, &format!("10.9.0.{i}"), "crowd").await
                    } else {
                        attempt(&mut c, "10.9.1.1").await
                    }
                })
            })
            .collect();
        let mut allowed = 0;
        for task in tasks {
            allowed += u32::from(task.await.unwrap().allowed);
        }
        let limit = if per_account { 10 } else { 5 };
        assert_eq!(allowed, limit, "per_account={per_account}");
    }
}

/// The limiter agrees with a reference model over random arrival times: a
/// plain log of allowed attempts, refusing when `limit` of them lie in the
/// last N + 1 buckets, with retry_after when enough have left. The model also
/// checks the contract directly: no window-long interval holds more than
/// `limit` allowed attempts.
#[test]
fn limiter_matches_a_reference_model() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 3,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let gaps = vec(0u64..70, 30..45);
    runner
        .run(&gaps, |gaps| {
            runtime.block_on(check_against_model(&gaps));
            Ok(())
        })
        .unwrap();
}

async fn check_against_model(gaps: &[u64]) {
    const LIMIT: u32 = 4;
    const WINDOW_MS: u64 = 1000;
    let mut config = test_config();
    config.rate_limit_window = 1;
    config.rate_limit_max_attempts = LIMIT;
    config.rate_limit_account_max_attempts = 100;
    let store = Store::new(config.store_settings().unwrap()).unwrap();
    let addr = ClientAddr::parse("192.0.2.123").unwrap();
    let account = AccountKey::parse("model").unwrap();
    let bucket_ms = WINDOW_MS.div_ceil(BUCKETS);
    let mut log: Vec<u64> = Vec::new();
    for (i, gap) in gaps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*gap)).await;
        let verdict = store
            .record_login_attempt(&addr, Some(&account), None)
            .await
            .unwrap();
        let now = verdict.decided_at_ms;
        let oldest = now / bucket_ms - BUCKETS;
        let in_span: Vec<u64> = log
            .iter()
            .copied()
            .filter(|t| t / bucket_ms >= oldest)
            .collect();
        let model_allowed = in_span.len() < LIMIT as usize;
        assert_eq!(
            verdict.allowed, model_allowed,
            "attempt {i} at {now}: {log:?}"
        );
        if model_allowed {
            log.push(now);
            assert_eq!(verdict.retry_after, None);
        } else {
            assert_eq!(verdict.refused_by, Some(LoginLimit::Address));
            // Enough of the oldest must leave that fewer than LIMIT remain.
            let last_to_leave = in_span[in_span.len() - LIMIT as usize];
            let free_at = (last_to_leave / bucket_ms + BUCKETS + 1) * bucket_ms;
            assert_eq!(
                verdict.retry_after,
                Some(Duration::from_millis(free_at - now)),
                "attempt {i} at {now}: {log:?}"
            );
        }
    }
    for pair in log.windows(LIMIT as usize + 1) {
        assert!(pair[LIMIT as usize] - pair[0] >= WINDOW_MS, "{log:?}");
    }
}

/// A give-back (the account refused an attempt the address had counted) that
/// lands after a reset with that account gives nothing back: the reset already
/// took the attempt off the address, and a second decrement would erase a
/// guess the address made against another account. The server's three
/// scripts, run by hand in the order a race produces.
#[tokio::test]
async fn a_give_back_after_a_reset_never_erases_guesses_against_another_account() {
    let attempt_script = server_script("login_attempt");
    let reset_script = server_script("login_reset");
    let undo_script = server_script("login_undo");
    let config = test_config();
    let prefix = &config.key_prefix;
    let addr = format!("{prefix}race:{{x}}addr");
    let pair_victim = format!("{prefix}race:{{x}}pair-v");
    let pair_own = format!("{prefix}race:{{x}}pair-a");
    let take = |pair: &str| {
        let mut cmd = redis::cmd("EVAL");
        // One huge bucket, so every step lands in it; limit 3.
        cmd.arg(&attempt_script)
            .arg(2)
            .arg(&addr)
            .arg(pair)
            .arg(1_000_000_000_u64)
            .arg(10)
            .arg(3)
            .arg("take");
        cmd
    };
    let allowed = |reply: Vec<i64>| reply[0] == 1;
    // Two guesses against the victim, then an attempt naming the attacker's
    // own account, which that account's limit will refuse.
    assert!(allowed(inspect(&config, &take(&pair_victim)).await));
    assert!(allowed(inspect(&config, &take(&pair_victim)).await));
    let own: Vec<i64> = inspect(&config, &take(&pair_own)).await;
    assert!(allowed(own.clone()));
    let bucket = own[3];
    // The attacker's successful login resets its own account first...
    let _: i64 = inspect(
        &config,
        redis::cmd("EVAL")
            .arg(&reset_script)
            .arg(2)
            .arg(&addr)
            .arg(&pair_own),
    )
    .await;
    // ...then the refused attempt's give-back arrives: nothing to give back.
    let undone: i64 = inspect(
        &config,
        redis::cmd("EVAL")
            .arg(&undo_script)
            .arg(2)
            .arg(&addr)
            .arg(&pair_own)
            .arg(bucket),
    )
    .await;
    assert_eq!(undone, 0);
    // The two guesses against the victim still count: one more is allowed,
    // the next refused.
    assert!(allowed(inspect(&config, &take(&pair_victim)).await));
    assert!(!allowed(inspect(&config, &take(&pair_victim)).await));
    let _: i64 = inspect(
        &config,
        redis::cmd("DEL")
            .arg(&addr)
            .arg(&pair_victim)
            .arg(&pair_own),
    )
    .await;
}
