//! Redis failing under the server: unreachable, then back.

use std::time::{Duration, Instant};

use sessionstore::v1::{CreateSessionRequest, GetSessionRequest, GetUserSessionCountRequest};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{PrivateRedis, TestServer, config_on, readiness, test_config, wait_until};

/// Redis stopped mid-test: calls fail fast with UNAVAILABLE saying so, readiness
/// goes NOT_SERVING while liveness stays SERVING; after Redis restarts the same
/// server serves again by itself.
#[tokio::test]
async fn redis_down_gives_unavailable_then_recovers() {
    let mut redis = PrivateRedis::start();
    let mut config = config_on(&redis);
    config.redis_timeout_ms = 500;
    let server = TestServer::start_with(config).await;
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
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readiness(&server).await == ServingStatus::Serving as i32
        })
        .await
    );

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
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readiness(&server).await == ServingStatus::NotServing as i32
        })
        .await,
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
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readiness(&server).await == ServingStatus::Serving as i32
        })
        .await
    );
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
/// NOT_SERVING, and answers UNAVAILABLE rather than hanging.
#[tokio::test]
async fn server_starts_without_redis() {
    let mut config = test_config();
    config.redis_url = format!("redis://127.0.0.1:{}", crate::common::free_port());
    config.redis_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let status = client
        .get_session(GetSessionRequest {
            token_id: "t".into(),
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readiness(&server).await == ServingStatus::NotServing as i32
        })
        .await
    );
}

/// Redis paused (CLIENT PAUSE) past REDIS_TIMEOUT_MS: callers get UNAVAILABLE
/// within the timeout plus a margin, never a hang, and calls succeed once the
/// pause ends.
#[tokio::test]
async fn paused_redis_times_out_as_unavailable() {
    let redis = PrivateRedis::start();
    let mut config = config_on(&redis);
    config.redis_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let get = || GetSessionRequest {
        token_id: "p".into(),
        user_id: "paused".into(),
    };
    client.get_session(get()).await.unwrap();

    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
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
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut client = client.clone();
            async move { client.get_session(get()).await.is_ok() }
        })
        .await
    );
}
