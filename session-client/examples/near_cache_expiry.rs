//! Watches one session expire through the near-cache, timed by the monotonic
//! clock only, and prints what the cache answered: the client half of the
//! end-to-end test that runs it under libfaketime with a wall clock minutes
//! off (tests/e2e/near_cache.rs, `expiry_follows_redis_clock_*`), so that
//! the test's own process keeps the real clock.
//!
//! ```text
//! cargo run -p session-client --example near_cache_expiry -- URL USER TOKEN TTL_MS
//! ```
//!
//! It creates the session with the ttl given, looks it up twice (the first
//! call fills the cache, the second should be answered from memory), waits
//! until the session is a second past its expiry (by `Instant`, counted from
//! when the create returned, so after Redis's `expires_at` whatever this
//! host's wall clock says), and looks it up again. It prints `key=value`
//! lines: `wall_minus_redis_ms` (this host's wall clock minus Redis's, from
//! the session's `created_at`: the skew the test asked for, give or take
//! the call), `hit_while_alive`, `found_after_expiry`, `hit_after_expiry`.
//! Exit status 1 on a failed call.

use std::{
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use session_client::{NewSession, SessionClient};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, user, token, ttl_ms] = args.as_slice() else {
        return Err("usage: near_cache_expiry URL USER TOKEN TTL_MS".into());
    };
    let ttl = Duration::from_millis(ttl_ms.parse()?);
    let client = SessionClient::builder(url.as_str())
        .near_cache(100)
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let stats = || client.near_cache_stats().unwrap_or_default();

    // The stream's reset (with Redis's clock) makes the cache healthy.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stats().healthy {
        if Instant::now() > deadline {
            return Err(format!("the near-cache never became healthy: {:?}", stats()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let created = client
        .create_session_with(NewSession::new(user.as_str(), token.as_str()).ttl(ttl))
        .await?;
    let created_at = Instant::now();
    let session = created.session.ok_or("the session was not created")?;
    let wall_minus_redis_ms = match SystemTime::now().duration_since(session.created_at) {
        Ok(ahead) => i128::try_from(ahead.as_millis())?,
        Err(behind) => -i128::try_from(behind.duration().as_millis())?,
    };
    println!("wall_minus_redis_ms={wall_minus_redis_ms}");

    let found = client
        .get_user_session(user.as_str(), token.as_str())
        .await?;
    let hits = stats().hits;
    let again = client
        .get_user_session(user.as_str(), token.as_str())
        .await?;
    println!(
        "hit_while_alive={}",
        found.is_some() && again.is_some() && stats().hits == hits + 1
    );

    tokio::time::sleep_until((created_at + ttl + Duration::from_secs(1)).into()).await;
    let hits = stats().hits;
    let after = client
        .get_user_session(user.as_str(), token.as_str())
        .await?;
    println!("found_after_expiry={}", after.is_some());
    println!("hit_after_expiry={}", stats().hits > hits);
    Ok(())
}
