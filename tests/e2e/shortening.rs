//! Shortened expiries on the stream (#28, `WatchRevocationsResponse.shortened`):
//! ExtendSession calls
//! that race each other (shortening and lengthening, through two servers),
//! a rotation or a revocation, while a near-cache keeps filling the session,
//! never leave that near-cache holding a later expiry than Redis's once the
//! stream delivered what was published before; and `x:` messages forged by
//! someone who may PUBLISH on the channel only ever make a cache ask the
//! server sooner. Runs on whatever topology the suite is pointed at.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use session_client::SessionClient;
use sessionstore::v1::{ExtendSessionRequest, RotateSessionRequest, Session};
use tokio_stream::StreamExt;

use crate::support::{
    Client, TestServer, create, found, get, inspect, revoke, stream_starts, test_config, wait_until,
};

/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

fn duration(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap(),
        nanos: i32::try_from(ms % 1000).unwrap() * 1_000_000,
    })
}

async fn extend_ms(client: &mut Client, user: &str, token: &str, ttl_ms: u64) -> Option<Session> {
    client
        .extend_session(ExtendSessionRequest {
            user_id: user.into(),
            token_id: token.into(),
            ttl: duration(ttl_ms),
        })
        .await
        .unwrap()
        .into_inner()
        .session
}

fn at(timestamp: Option<prost_types::Timestamp>) -> SystemTime {
    let t = timestamp.expect("a timestamp");
    UNIX_EPOCH
        + Duration::from_secs(u64::try_from(t.seconds).unwrap())
        + Duration::from_nanos(u64::try_from(t.nanos).unwrap())
}

/// A near-cache client on `url`, healthy.
async fn cached_client(url: String) -> SessionClient {
    let cached = SessionClient::builder(url)
        .near_cache(1000)
        .near_cache_max_staleness(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    assert!(
        wait_until(PATIENCE, || async {
            cached.near_cache_stats().unwrap().healthy
        })
        .await
    );
    cached
}

/// Waits until `cached` applied a revocation published (in `user`'s slot)
/// after everything before this call: what was published before it, on the
/// same master, came on the stream before it.
async fn barrier(cached: &SessionClient, writer: &mut Client, user: &str, marker: &str) {
    let applied = cached.near_cache_stats().unwrap().revocations_applied;
    assert!(create(writer, user, marker).await.created);
    assert!(revoke(writer, marker, user).await);
    assert!(
        wait_until(PATIENCE, || async {
            cached.near_cache_stats().unwrap().revocations_applied > applied
        })
        .await,
        "the marker's revocation never reached the near-cache"
    );
}

/// What the race does besides the extensions.
#[derive(Clone, Copy, Debug)]
enum Also {
    Nothing,
    Rotate,
    Revoke,
}

/// Rounds of ExtendSession calls racing (ttls from a few ms to an hour,
/// shortening, lengthening and throttled, through two servers), sometimes a
/// rotation or a revocation, while a near-cache on one of the servers keeps
/// looking the session up (fills in flight all along). Once the stream
/// delivered a marker published after the race, the near-cache answers no
/// expiry later than Redis's, and nothing Redis does not hold.
#[tokio::test]
async fn racing_extensions_never_leave_a_near_cache_past_redis() {
    let (servers, mut writers) = TestServer::pair().await;
    let cached = Arc::new(cached_client(servers[0].url()).await);
    let user = "rhea";
    // Session ttl 900 s by default: 850 s is throttled (moves it by less
    // than a tenth), 700 s and below shorten it, 1,800 s and up lengthen.
    let plans: [&[u64]; 10] = [
        &[2_000, 3_600_000],
        &[3_600_000, 2_000],
        &[700_000, 1_800_000, 3_000, 850_000],
        &[50, 3_600_000, 1_800_000],
        &[850_000, 600_000, 3_600_000, 1_000],
        &[1_800_000, 1_800_000, 5_000, 5_000],
        &[300_000, 3_600_000, 300_000, 3_600_000, 300_000],
        &[10_000, 20_000, 30_000, 3_600_000],
        &[300_000, 5_000, 60_000],
        &[3_600_000, 60_000, 600_000, 30_000],
    ];
    let mut rounds = 0;
    for round in 0..60 {
        let plan = plans[round % plans.len()];
        let also = match round % 6 {
            4 => Also::Rotate,
            5 => Also::Revoke,
            _ => Also::Nothing,
        };
        let token = format!("rh-{round}");
        let created = create(&mut writers[0], user, &token).await;
        assert!(created.created, "{created:?}");
        let family = created.session.unwrap().family_id;
        for _ in 0..2 {
            assert!(found(&cached, user, &token).await);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (cached, stop, token) = (cached.clone(), stop.clone(), token.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = cached.get_user_session(user, &token).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut calls = Vec::new();
        for (i, &ttl_ms) in plan.iter().enumerate() {
            let mut writer = writers[(i + round) % 2].clone();
            let token = token.clone();
            // Staggered by 0 to 4 ms, so that each call is sometimes the
            // last to write (a lengthening takes a round trip more).
            let delay = Duration::from_millis(((round * 7 + i * 3) % 5) as u64);
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // An error (UNAVAILABLE under load) is an outcome the race
                // may have too: whatever Redis holds after it is the truth.
                let _ = writer
                    .extend_session(ExtendSessionRequest {
                        user_id: user.into(),
                        token_id: token,
                        ttl: duration(ttl_ms),
                    })
                    .await;
            }));
        }
        match also {
            Also::Nothing => {}
            Also::Rotate => {
                let mut writer = writers[(round + 1) % 2].clone();
                let request = RotateSessionRequest {
                    user_id: user.into(),
                    family_id: family.clone(),
                    token_id: token.clone(),
                    new_token_id: format!("{token}-next"),
                    ..Default::default()
                };
                calls.push(tokio::spawn(async move {
                    let _ = writer.rotate_session(request).await;
                }));
            }
            Also::Revoke => {
                let mut writer = writers[(round + 1) % 2].clone();
                let token = token.clone();
                calls.push(tokio::spawn(async move {
                    revoke(&mut writer, &token, user).await;
                }));
            }
        }
        for call in calls {
            call.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        hammer.await.unwrap();

        barrier(
            &cached,
            &mut writers[0],
            user,
            &format!("rh-{round}-marker"),
        )
        .await;
        let truth = get(&mut writers[1], &token, user).await;
        let answered = cached.get_user_session(user, &token).await.unwrap();
        match (&truth, &answered) {
            (None, Some(a)) => panic!(
                "round {round} ({plan:?}, {also:?}): the near-cache answered {a:?}, Redis holds nothing"
            ),
            (Some(t), Some(a)) => assert!(
                a.expires_at <= at(t.expires_at),
                "round {round} ({plan:?}, {also:?}): the near-cache answered {:?}, Redis {:?}",
                a.expires_at,
                at(t.expires_at)
            ),
            _ => {}
        }
        rounds += 1;
    }
    assert_eq!(rounds, 60);
    assert!(
        cached.near_cache_stats().unwrap().hits > 60,
        "the near-cache never answered from memory: the test proves nothing"
    );
}

/// `x:` messages forged on the revocation channel (by someone with PUBLISH
/// rights on it) can only make a near-cache ask the server sooner: one naming
/// a cached session drops it or keeps the earlier expiry, a far-future or
/// out-of-range time never lengthens one, malformed ones are dropped by the
/// server, and none of them ends the stream or resets the cache.
#[tokio::test]
async fn forged_shortenings_only_cost_a_cache_miss() {
    let config = test_config();
    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let cached = cached_client(server.url()).await;
    let mut stream = stream_starts(&mut client, PATIENCE).await;
    let channel = format!("{}revocations", config.key_prefix);
    let publish = |payload: String| {
        let config = config.clone();
        let channel = channel.clone();
        async move {
            let _: i64 = inspect(&config, redis::cmd("PUBLISH").arg(&channel).arg(payload)).await;
        }
    };
    let user = "faye";
    for token in ["f-1", "f-2", "f-3"] {
        assert!(create(&mut client, user, token).await.created);
        for _ in 0..2 {
            assert!(found(&cached, user, token).await);
        }
    }
    // f-1 shortened for real to 60 s.
    let short = extend_ms(&mut client, user, "f-1", 60_000).await.unwrap();
    let short_at = at(short.expires_at);
    let resets = cached.near_cache_stats().unwrap().resets;

    // Forged: f-1 far in the future (must not lengthen), u64::MAX ms (out of
    // range for the cache: dropped), malformed ones, and a time in the past
    // for f-3 (dropped: the server still answers it).
    for payload in [
        format!("x:{}:{user}:f-1", 4_102_444_800_000u64),
        format!("x:{}:{user}:f-2", u64::MAX),
        format!("x:{}:{user}:f-2:extra", 1),
        format!("x:-5:{user}:f-2"),
        format!("x:1:{user}:"),
        format!("x:1:{user}:f-3"),
    ] {
        publish(payload).await;
    }
    // The server's stream carried the well-formed ones and is still up...
    let mut shortened = Vec::new();
    while shortened.len() < 4 {
        let message = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the stream still works")
            .unwrap()
            .unwrap();
        assert!(!message.reset || shortened.is_empty(), "{message:?}");
        shortened.extend(message.shortened.into_iter().map(|s| s.token_id));
    }
    shortened.sort();
    assert_eq!(shortened, ["f-1", "f-1", "f-2", "f-3"]);
    // ...and the near-cache's stream (same server) has had them once a
    // revocation published after that arrived.
    barrier(&cached, &mut client, user, "f-marker").await;

    let f1 = cached.get_user_session(user, "f-1").await.unwrap().unwrap();
    assert!(
        f1.expires_at <= short_at,
        "a forged later expiry lengthened f-1: {:?} > {short_at:?}",
        f1.expires_at
    );
    // f-2 and f-3 were dropped, not ended: the server answers them alive.
    for token in ["f-2", "f-3"] {
        assert!(found(&cached, user, token).await);
    }
    let stats = cached.near_cache_stats().unwrap();
    assert!(stats.healthy);
    assert_eq!(stats.resets, resets, "a forged message reset the cache");
}
