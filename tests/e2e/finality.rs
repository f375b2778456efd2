//! Revocation is final: no replayed create, race or burst of logins undoes a
//! revocation, and CreateSession says what it did (`outcome`).

use std::collections::HashSet;

use session_server::store::LimitPolicy;
use sessionstore::v1::{CreateOutcome, CreateSessionRequest, CreateSessionResponse};

use crate::support::{
    Client, OnNeedle, PrivateRedis, TestServer, assert_marker_outlives_reservation, config_on,
    count, create, get, inspect, list, redis_relay, revoke, revoke_all, test_config,
};

fn outcome(response: &CreateSessionResponse) -> CreateOutcome {
    CreateOutcome::try_from(response.outcome).unwrap()
}

async fn live(client: &mut Client, token: &str, hint: &str) -> bool {
    get(client, token, hint).await.is_some()
}

/// Asserts that a replayed create of `token` for `user` is refused as revoked
/// and that the session stays dead, by hint and by token alone.
async fn assert_stays_revoked(client: &mut Client, user: &str, token: &str) {
    let replay = create(client, user, token).await;
    assert_eq!(outcome(&replay), CreateOutcome::TokenRevoked, "{token}");
    assert!(!replay.created);
    assert!(replay.session.is_none());
    assert!(!live(client, token, user).await, "{token} revived");
    assert!(!live(client, token, "").await, "{token} revived");
    // Another user is refused by the token's reservation, as before.
    let other = create(client, &format!("{user}-other"), token).await;
    assert_eq!(outcome(&other), CreateOutcome::TokenTaken);
    assert!(!live(client, token, "").await);
}

/// Each outcome is reported as documented: CREATED, ALREADY_EXISTS with the
/// existing session (a retried create), TOKEN_TAKEN for another user's token.
#[tokio::test]
async fn create_reports_its_outcome() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = create(&mut client, "olga", "o-1").await;
    assert_eq!(outcome(&first), CreateOutcome::Created);
    assert!(first.created);

    // A retry after a lost answer: same user, same token.
    let retry = create(&mut client, "olga", "o-1").await;
    assert_eq!(outcome(&retry), CreateOutcome::AlreadyExists);
    assert!(!retry.created);
    assert_eq!(
        retry.session, first.session,
        "the existing session, unchanged"
    );
    assert!(retry.evicted_token_ids.is_empty());

    let taken = create(&mut client, "mallory", "o-1").await;
    assert_eq!(outcome(&taken), CreateOutcome::TokenTaken);
    assert!(!taken.created);
    assert!(
        taken.session.is_none(),
        "another user's session never leaks"
    );
    assert_eq!(count(&mut client, "olga").await, 1);
    assert_eq!(count(&mut client, "mallory").await, 0);
}

/// Under the reject policy a user at the cap gets LIMIT_REACHED.
#[tokio::test]
async fn create_at_the_cap_under_reject_reports_limit_reached() {
    let server = TestServer::start_tuned(|c| {
        c.max_sessions_per_user = 1;
        c.session_limit_policy = LimitPolicy::Reject;
    })
    .await;
    let mut client = server.client().await;
    create(&mut client, "pia", "p-1").await;
    let refused = create(&mut client, "pia", "p-2").await;
    assert_eq!(outcome(&refused), CreateOutcome::LimitReached);
    assert!(!refused.created);
    assert!(refused.session.is_none());
    assert!(!live(&mut client, "p-2", "").await);
}

/// A create replayed after RevokeSession, with or without the hint, never
/// revives the session.
#[tokio::test]
async fn a_replayed_create_after_revoke_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (token, hint) in [("r-hint", "rita"), ("r-nohint", "")] {
        assert!(create(&mut client, "rita", token).await.created);
        assert!(revoke(&mut client, token, hint).await);
        assert_stays_revoked(&mut client, "rita", token).await;
    }
    assert_eq!(count(&mut client, "rita").await, 0);
}

/// A create replayed after RevokeAllUserSessions never revives any of them,
/// while a new token id still works.
#[tokio::test]
async fn a_replayed_create_after_revoke_all_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for token in ["s-1", "s-2", "s-3"] {
        assert!(create(&mut client, "sam", token).await.created);
    }
    let revoked = revoke_all(&mut client, "sam").await;
    assert_eq!(revoked, 3);
    for token in ["s-1", "s-2", "s-3"] {
        assert_stays_revoked(&mut client, "sam", token).await;
    }
    assert_eq!(
        outcome(&create(&mut client, "sam", "s-4").await),
        CreateOutcome::Created
    );
    assert_eq!(count(&mut client, "sam").await, 1);
}

/// A session evicted at the cap is revoked for good: replaying its create does
/// not bring it back (nor evict another session to make room for it).
#[tokio::test]
async fn a_replayed_create_after_eviction_is_refused() {
    let server = TestServer::start_tuned(|c| c.max_sessions_per_user = 2).await;
    let mut client = server.client().await;
    create(&mut client, "tom", "t-1").await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    create(&mut client, "tom", "t-2").await;
    let third = create(&mut client, "tom", "t-3").await;
    assert_eq!(third.evicted_token_ids, ["t-1"]);
    assert_stays_revoked(&mut client, "tom", "t-1").await;
    assert!(
        live(&mut client, "t-2", "tom").await,
        "the replay evicted t-2"
    );
    assert!(live(&mut client, "t-3", "tom").await);
    assert_eq!(count(&mut client, "tom").await, 2);
}

/// The revocation marker sits in the user's slot beside the session and lives
/// at least as long as the token's reservation could: the session's ttl plus
/// three times (60 s plus REDIS_TIMEOUT_MS), the end its create recorded
/// before claiming the token.
#[tokio::test]
async fn the_revocation_marker_lives_as_long_as_the_reservation() {
    let server = TestServer::start().await;
    let prefix = server.config.key_prefix.clone();
    let mut client = server.client().await;
    client
        .create_session(CreateSessionRequest {
            user_id: "uma".into(),
            token_id: "u-1".into(),
            ttl: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(revoke(&mut client, "u-1", "uma").await);
    let marker_key = format!("{prefix}revoked:{{uma}}:{{u-1}}");
    let marker: String = inspect(&server.config, redis::cmd("GET").arg(&marker_key)).await;
    assert!(
        marker.starts_with("{\"revoked_at_ms\":") && marker.ends_with(",\"reason\":\"revoked\"}"),
        "{marker}"
    );
    let pttl: i64 = inspect(&server.config, redis::cmd("PTTL").arg(&marker_key)).await;
    // The create recorded, before its claim, that the reservation may end up
    // to ttl + 3 x slack after it: the claim's lifetime (ttl + slack) plus its
    // window (slack) plus as much again for the masters' clocks.
    let slack = 60_000 + i64::try_from(server.config.redis_timeout_ms).unwrap();
    assert!(
        (10_000 + 3 * slack - 5_000..=10_000 + 3 * slack).contains(&pttl),
        "marker PTTL {pttl}"
    );
    let owner_pttl: i64 = inspect(
        &server.config,
        redis::cmd("PTTL").arg(format!("{prefix}token_owner:{{u-1}}")),
    )
    .await;
    assert!(
        pttl >= owner_pttl,
        "marker ({pttl} ms) must not end before the reservation ({owner_pttl} ms)"
    );
}

/// A replay that asks for a longer ttl while the session is live is answered
/// from the user's slot: it claims nothing, so the token's reservation is not
/// lengthened, and a later revocation's marker outlives it.
#[tokio::test]
async fn a_marker_outlives_a_reservation_extended_before_the_revocation() {
    let server = TestServer::start().await;
    let prefix = server.config.key_prefix.clone();
    let mut client = server.client().await;
    let mut create_for = async |seconds: i64| {
        let request = with_ttl("yuri", "y-1", seconds);
        client.create_session(request).await.unwrap().into_inner()
    };
    let first = create_for(2).await;
    let replay = create_for(600).await;
    assert_eq!(outcome(&first), CreateOutcome::Created);
    assert_eq!(outcome(&replay), CreateOutcome::AlreadyExists);
    assert_eq!(
        replay.session, first.session,
        "the session is not prolonged"
    );
    assert!(revoke(&mut client, "y-1", "yuri").await);

    let marker: i64 = inspect(
        &server.config,
        redis::cmd("PTTL").arg(format!("{prefix}revoked:{{yuri}}:{{y-1}}")),
    )
    .await;
    let reservation: i64 = inspect(
        &server.config,
        redis::cmd("PTTL").arg(format!("{prefix}token_owner:{{y-1}}")),
    )
    .await;
    assert!(
        reservation < 2_000 + 62_000 + i64::try_from(server.config.redis_timeout_ms).unwrap(),
        "the replay lengthened the reservation: {reservation} ms"
    );
    assert!(
        marker >= reservation,
        "marker ({marker} ms) ends before the reservation ({reservation} ms)"
    );
    assert_stays_revoked(&mut client, "yuri", "y-1").await;
}

/// Replays of a live session's create racing its revocation: the revocation
/// wins for good. No replay ever answers CREATED, and afterwards the session is
/// dead and its token refused.
#[tokio::test]
async fn replays_racing_a_revocation_never_revive_it() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for round in 0..5 {
        let token = format!("v-{round}");
        assert!(create(&mut client.clone(), "vera", &token).await.created);
        let replays: Vec<_> = (0..20)
            .map(|_| {
                let mut client = client.clone();
                let token = token.clone();
                tokio::spawn(async move { create(&mut client, "vera", &token).await })
            })
            .collect();
        let hint = if round % 2 == 0 { "vera" } else { "" };
        assert!(revoke(&mut client.clone(), &token, hint).await);
        for replay in replays {
            let answer = replay.await.unwrap();
            let seen = outcome(&answer);
            assert!(
                matches!(
                    seen,
                    CreateOutcome::AlreadyExists | CreateOutcome::TokenRevoked
                ),
                "a replay of {token} answered {seen:?}"
            );
        }
        assert!(
            !live(&mut client.clone(), &token, "").await,
            "{token} revived"
        );
        assert_stays_revoked(&mut client.clone(), "vera", &token).await;
    }
}

/// 200 concurrent creates for one user through two servers, under each policy:
/// every call answers OK (contention is never an error), the cap holds
/// exactly, and everything evicted is dead and stays dead.
#[tokio::test]
async fn two_hundred_concurrent_creates_for_one_user_all_succeed() {
    for policy in [LimitPolicy::EvictOldest, LimitPolicy::Reject] {
        let mut config = test_config();
        config.session_limit_policy = policy;
        // A small cap and ttls of every length: new sessions land anywhere
        // in the eviction order, the hardest case for the create protocol.
        config.max_sessions_per_user = 3;
        let server = TestServer::start_with(config.clone()).await;
        // A second server on the same keys: two pods racing, each with its
        // own Redis connections.
        let other_pod = TestServer::start_with(config).await;
        let max = server.config.max_sessions_per_user;
        let clients = [server.client().await, other_pod.client().await];
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let mut client = clients[i % 2].clone();
                tokio::spawn(async move {
                    let token = format!("w-{i}");
                    let seconds = 60 + i64::try_from(i * 617 % 3541).unwrap();
                    let answer = client
                        .create_session(CreateSessionRequest {
                            user_id: "walt".into(),
                            token_id: token.clone(),
                            ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
                            ..Default::default()
                        })
                        .await;
                    (token, answer)
                })
            })
            .collect();
        let mut created = HashSet::new();
        let mut evicted = Vec::new();
        let mut refused = 0;
        for call in calls {
            let (token, answer) = call.await.unwrap();
            let answer = match answer {
                Ok(answer) => answer.into_inner(),
                Err(status) => panic!("{policy:?}: create {token} failed: {status:?}"),
            };
            match outcome(&answer) {
                CreateOutcome::Created => {
                    created.insert(token);
                    evicted.extend(answer.evicted_token_ids);
                }
                CreateOutcome::LimitReached => refused += 1,
                other => panic!("{policy:?}: create {token} answered {other:?}"),
            }
        }
        let mut client = clients[0].clone();
        assert_eq!(count(&mut client, "walt").await, max, "{policy:?}");
        let listed = list(&mut client, "walt").await;
        assert_eq!(listed.len(), max as usize, "{policy:?}");
        match policy {
            LimitPolicy::EvictOldest => {
                assert_eq!(created.len(), 200);
                assert_eq!(evicted.len(), 200 - max as usize);
                let unique: HashSet<_> = evicted.iter().collect();
                assert_eq!(unique.len(), evicted.len(), "a session evicted twice");
                for token in &evicted {
                    assert!(!live(&mut client, token, "walt").await, "{token} live");
                    assert!(listed.iter().all(|s| &s.token_id != token));
                }
                // Eviction is a revocation: a replay stays refused.
                assert_stays_revoked(&mut client, "walt", &evicted[0]).await;
            }
            LimitPolicy::Reject => {
                assert_eq!(created.len(), max as usize);
                assert_eq!(refused, 200 - max as usize);
                assert!(evicted.is_empty());
                assert!(listed.iter().all(|s| created.contains(&s.token_id)));
            }
        }
    }
}

/// A session key without a TTL (written or PERSISTed by someone else) is still
/// revoked for good, its marker kept for SESSION_TTL_MAX plus the reservation's
/// slack.
#[tokio::test]
async fn a_session_without_a_ttl_is_still_revoked_for_good() {
    let server = TestServer::start().await;
    let prefix = server.config.key_prefix.clone();
    let mut client = server.client().await;
    create(&mut client, "xena", "x-1").await;
    let session_key = format!("{prefix}session:{{xena}}:{{x-1}}");
    let persisted: i64 = inspect(&server.config, redis::cmd("PERSIST").arg(&session_key)).await;
    assert_eq!(persisted, 1);
    assert!(revoke(&mut client, "x-1", "xena").await);
    let pttl: i64 = inspect(
        &server.config,
        redis::cmd("PTTL").arg(format!("{prefix}revoked:{{xena}}:{{x-1}}")),
    )
    .await;
    let expected = i64::try_from(
        server.config.session_ttl_max * 1000 + 60_000 + server.config.redis_timeout_ms,
    )
    .unwrap();
    assert!((expected - 5_000..=expected).contains(&pttl), "{pttl}");
    assert_stays_revoked(&mut client, "xena", "x-1").await;
}

/// A create request for `user` and `token` with a ttl of `seconds`.
/// Creates `token` for `user` with a 2 s TTL, asserting it was created, then
/// revokes it, asserting a live session was revoked.
async fn create_and_revoke(client: &mut Client, user: &str, token: &str) {
    let created = client.create_session(with_ttl(user, token, 2)).await;
    assert_eq!(
        outcome(&created.unwrap().into_inner()),
        CreateOutcome::Created
    );
    assert!(revoke(client, token, user).await);
}

fn with_ttl(user: &str, token: &str, seconds: i64) -> CreateSessionRequest {
    CreateSessionRequest {
        user_id: user.into(),
        token_id: token.into(),
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    }
}

/// The outside reproduction of #21: a replay whose first round trip runs and
/// whose second is refused (an ACL letting the server's Redis user touch only
/// `token_owner:` keys) must not leave the token's reservation outliving its
/// revocation marker; once the ACL is restored the token stays revoked. On
/// the old protocol the claim ran first and lengthened the reservation to a
/// day while the marker kept about a minute.
#[tokio::test]
async fn a_replay_refused_half_way_by_an_acl_leaves_the_token_revoked() {
    let redis = PrivateRedis::start();
    let mut admin = redis.connection().await;
    let acl = |rules: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg("app")
            .arg("reset")
            .arg("on")
            .arg(">pw");
        cmd.arg("&*").arg("+@all");
        for rule in rules {
            cmd.arg(*rule);
        }
        cmd
    };
    let _: () = acl(&["~*"]).query_async(&mut admin).await.unwrap();
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_url = format!("redis://app:pw@127.0.0.1:{}", redis.port);
        c.session_ttl_max = 86_400;
    })
    .await;
    let mut client = server.client().await;

    create_and_revoke(&mut client, "ada", "acl-1").await;

    let _: () = acl(&["~*token_owner:*"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let replay = client
        .create_session(with_ttl("ada", "acl-1", 86_400))
        .await;
    assert!(replay.is_err(), "{replay:?}");
    let _: () = acl(&["~*"]).query_async(&mut admin).await.unwrap();

    assert_marker_outlives_reservation(&server.config, "ada", "acl-1").await;
    assert_stays_revoked(&mut client, "ada", "acl-1").await;
}

/// A first create cut off after its token claim ran (the claim asked for a
/// day), retried with a short ttl and then revoked: the marker outlives the
/// reservation the cut-off claim made, and a replay stays revoked. On the
/// old protocol the claim's day-long reservation was unknown to the user's
/// slot, and the marker kept only the retried session's minute.
#[tokio::test]
async fn a_create_cut_off_after_its_claim_cannot_outlive_the_revocation() {
    let redis = PrivateRedis::start();
    let mut config = config_on(&redis);
    config.session_ttl_max = 86_400;
    let token_owner = format!("{}token_owner:{{cut-1}}", config.key_prefix);
    config.redis_url = redis_relay(redis.port, token_owner, OnNeedle::CutAfterFirst).await;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // Loads the scripts into Redis through another token: the cut must hit a
    // claim that runs, not an EVALSHA answered NOSCRIPT.
    let warm = create(&mut client, "cy", "warm-up").await;
    assert_eq!(outcome(&warm), CreateOutcome::Created);

    let cut = client
        .create_session(with_ttl("cy", "cut-1", 86_400))
        .await
        .expect_err("the connection is cut before the claim's answer");
    assert_eq!(cut.code(), tonic::Code::Unavailable, "{cut:?}");
    // The retry is created (nothing was stored), and revoked.
    create_and_revoke(&mut client, "cy", "cut-1").await;
    assert_marker_outlives_reservation(&server.config, "cy", "cut-1").await;
    assert_stays_revoked(&mut client, "cy", "cut-1").await;
}

/// Creates asking for a day, each cancelled by its caller at a random point
/// (a deadline of 0.1 to 4 ms), then created again with a short ttl and
/// revoked: whichever round trip the cancellation fell between, the marker
/// outlives the token's reservation and the token stays revoked.
#[tokio::test]
async fn cancelled_creates_never_outlive_the_revocation() {
    let server = TestServer::start_tuned(|c| c.session_ttl_max = 86_400).await;
    let mut client = server.client().await;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut cancelled = 0;
    for i in 0..150 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let token = format!("cancel-{i}");
        let deadline = std::time::Duration::from_micros(100 + seed % 3_900);
        let call = client.create_session(with_ttl("cal", &token, 86_400));
        if tokio::time::timeout(deadline, call).await.is_err() {
            cancelled += 1;
        }
        let again = client
            .create_session(with_ttl("cal", &token, 2))
            .await
            .unwrap()
            .into_inner();
        assert!(
            matches!(
                outcome(&again),
                CreateOutcome::Created | CreateOutcome::AlreadyExists
            ),
            "{again:?}"
        );
        assert!(revoke(&mut client, &token, "cal").await, "{token}");
        assert_marker_outlives_reservation(&server.config, "cal", &token).await;
    }
    assert!(
        cancelled > 0,
        "no call was cancelled: the test proves nothing"
    );
    let replay = create(&mut client, "cal", "cancel-0").await;
    assert_eq!(outcome(&replay), CreateOutcome::TokenRevoked);
}
