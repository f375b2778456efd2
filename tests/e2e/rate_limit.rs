//! Login rate limiting: a fixed window per client address.

use std::time::Duration;

use sessionstore::v1::{
    RecordLoginAttemptRequest, RecordLoginAttemptResponse, ResetLoginAttemptsRequest,
    session_store_client::SessionStoreClient,
};
use tonic::transport::Channel;

use crate::common::{TestServer, inspect, test_config};

async fn attempt(c: &mut SessionStoreClient<Channel>, ip: &str) -> RecordLoginAttemptResponse {
    c.record_login_attempt(RecordLoginAttemptRequest { ip: ip.into() })
        .await
        .unwrap()
        .into_inner()
}

/// RATE_LIMIT_MAX_ATTEMPTS attempts are allowed, the next is refused with the
/// time left in the window; the counter always has its TTL; reset clears it.
#[tokio::test]
async fn attempts_past_the_limit_are_refused_until_reset() {
    let server = TestServer::start().await;
    let prefix = server.config.key_prefix.clone();
    let mut c = server.client().await;
    let ip = "192.0.2.10";
    for n in 1..=5 {
        let verdict = attempt(&mut c, ip).await;
        assert!(verdict.allowed, "attempt {n}");
        assert_eq!(verdict.attempts, n);
        assert_eq!(verdict.remaining, 5 - n);
        assert_eq!(verdict.retry_after, None);
    }
    let refused = attempt(&mut c, ip).await;
    assert!(!refused.allowed);
    assert_eq!(refused.attempts, 6);
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after.expect("refusal says when to retry");
    assert!(retry.seconds > 890 && retry.seconds <= 900, "{retry:?}");

    let key = format!("{prefix}rate_limit:login:{{{ip}}}");
    let ttl: i64 = inspect(&server.config, redis::cmd("PTTL").arg(&key)).await;
    assert!(ttl > 0 && ttl <= 900_000, "counter without a ttl: {ttl}");

    let reset = c
        .reset_login_attempts(ResetLoginAttemptsRequest { ip: ip.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(reset.reset);
    assert!(attempt(&mut c, ip).await.allowed);
    assert_eq!(
        attempt(&mut c, "192.0.2.11").await.attempts,
        1,
        "addresses are counted apart"
    );
    let nothing = c
        .reset_login_attempts(ResetLoginAttemptsRequest {
            ip: "192.0.2.99".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!nothing.reset);
}

/// IPv6 clients are counted per /64: two addresses in one /64 share a counter,
/// another /64 has its own.
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

/// The window is fixed: once it ends, the counter starts again.
#[tokio::test]
async fn the_window_ends() {
    let mut config = test_config();
    config.rate_limit_window = 1;
    config.rate_limit_max_attempts = 1;
    let server = TestServer::start_with(config).await;
    let mut c = server.client().await;
    assert!(attempt(&mut c, "198.51.100.7").await.allowed);
    let refused = attempt(&mut c, "198.51.100.7").await;
    assert!(!refused.allowed);
    assert!(refused.retry_after.unwrap().seconds <= 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = attempt(&mut c, "198.51.100.7").await;
    assert!(fresh.allowed);
    assert_eq!(fresh.attempts, 1);
}
