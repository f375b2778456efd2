//! Redis commands per call: the cheap guard behind the benchmark. GetSession is
//! the hot path, and its cost is counted in Redis commands, which no timing
//! noise can blur: a per-call PING, an extra lookup or a script where a GET
//! would do shows up here as a failed test.

use std::{collections::BTreeMap, time::Duration};

use sessionstore::v1::{CreateSessionRequest, GetSessionRequest};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{PrivateRedis, TestServer, command_calls, readiness_becomes, reset_attempts};

/// What was called between two snapshots, and how often in all.
fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (u64, BTreeMap<String, u64>) {
    let by_command: BTreeMap<String, u64> = after
        .iter()
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    (by_command.values().sum(), by_command)
}

/// GetSession costs one Redis command with the user id hint and at most two
/// without it, counting every command Redis saw (health PINGs included).
#[tokio::test]
async fn get_session_needs_one_command_with_the_hint_and_two_without() {
    const CALLS: u64 = 100;
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        // One readiness PING at start, then none while the test counts.
        c.health_check_interval_ms = 3_600_000;
    })
    .await;
    assert!(
        readiness_becomes(&server, ServingStatus::Serving, Duration::from_secs(10)).await,
        "the server never saw Redis answer its first PING"
    );

    let mut client = server.client().await;
    let session = |i: u64| (format!("user-{}", i % 10), format!("token-{i}"));
    for i in 0..CALLS {
        let (user_id, token_id) = session(i);
        let created = client
            .create_session(CreateSessionRequest {
                max_lifetime: None,
                user_id,
                token_id,
                metadata: [("ip".to_string(), "10.0.0.1".to_string())].into(),
                ttl: None,
            })
            .await
            .unwrap()
            .into_inner()
            .created;
        assert!(created, "session {i} was not created");
    }

    let mut redis_conn = redis.connection().await;
    for hinted in [true, false] {
        let before = command_calls(&mut redis_conn).await;
        for i in 0..CALLS {
            let (user_id, token_id) = session(i);
            let found = client
                .get_session(GetSessionRequest {
                    token_id,
                    user_id: if hinted { user_id } else { String::new() },
                })
                .await
                .unwrap()
                .into_inner()
                .session;
            // A lookup that found nothing could have skipped Redis altogether.
            assert!(found.is_some(), "session {i} not found (hint: {hinted})");
        }
        let after = command_calls(&mut redis_conn).await;
        let (total, by_command) = delta(&before, &after);
        let allowed = if hinted { CALLS } else { 2 * CALLS };
        assert!(
            total <= allowed,
            "{CALLS} GetSession calls (hint: {hinted}) sent {total} Redis commands, \
             more than {allowed}: {by_command:?}"
        );
    }
    server.shutdown().await;
}

/// RecordLoginAttempt naming an account costs two round trips (scripts) when
/// allowed, whatever device token comes with it: none, a made-up one (the
/// device script counts it for the account itself, #24) or a trusted one
/// (one: its own counter alone). Every step of the call is a script, and
/// INFO commandstats also counts the commands run inside scripts, so the
/// round trips are the EVALSHA (and EVAL) calls.
#[tokio::test]
async fn a_login_attempt_with_a_device_token_costs_no_more_commands_than_without() {
    use sessionstore::v1::RecordLoginAttemptRequest;
    const CALLS: u64 = 20;
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.health_check_interval_ms = 3_600_000;
        c.rate_limit_max_attempts = 1_000;
        c.rate_limit_account_max_attempts = 1_000;
        c.rate_limit_device_max_attempts = 1_000;
    })
    .await;
    let mut client = server.client().await;
    let trusted = reset_attempts(&mut client, "192.0.2.1", "owner@example.com", "", true)
        .await
        .device_token;
    let made_up = "0".repeat(64);
    let mut redis_conn = redis.connection().await;
    for (label, token, allowed_per_call) in [
        ("no token", "", 2),
        ("made-up token", made_up.as_str(), 2),
        ("trusted token", trusted.as_str(), 1),
    ] {
        let attempt = |i: u64| RecordLoginAttemptRequest {
            ip: format!("192.0.2.{}", 10 + i % 100),
            account: "owner@example.com".into(),
            device_token: token.into(),
        };
        // One untimed call: the scripts' first runs load them.
        let first = client.record_login_attempt(attempt(0)).await.unwrap();
        assert!(first.into_inner().allowed, "{label}");
        let before = command_calls(&mut redis_conn).await;
        for i in 1..=CALLS {
            let verdict = client
                .record_login_attempt(attempt(i))
                .await
                .unwrap()
                .into_inner();
            assert!(verdict.allowed, "{label}: attempt {i} refused: {verdict:?}");
            assert_eq!(verdict.device_trusted, label == "trusted token", "{label}");
        }
        let after = command_calls(&mut redis_conn).await;
        let (_, by_command) = delta(&before, &after);
        let scripts: u64 = ["evalsha", "eval"]
            .iter()
            .filter_map(|name| by_command.get(*name))
            .sum();
        assert_eq!(
            scripts,
            allowed_per_call * CALLS,
            "{CALLS} RecordLoginAttempt calls ({label}) ran {scripts} scripts, \
             not {} ({by_command:?})",
            allowed_per_call * CALLS
        );
    }
    server.shutdown().await;
}
