//! Session families (#23): RotateSession moves a login to a new token id in
//! one atomic step and never branches, a token the family moved past ends
//! the family, revocations end families even racing a rotation, no family
//! outlives its absolute lifetime, and ExtendSession slides a session's
//! expiry with its throttle. Every test runs on whatever topology the suite
//! is pointed at (standalone, Cluster, Sentinel).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use session_client::{RotateOutcome as ClientOutcome, Rotation, SessionClient};
use session_server::Config;
use sessionstore::v1::{
    CreateOutcome, CreateSessionRequest, ExtendSessionRequest, RevocationReason,
    RevokeAllUserSessionsRequest, RotateOutcome, RotateSessionRequest, RotateSessionResponse,
    Session, WatchRevocationsRequest, WatchRevocationsResponse,
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{
    Client, TestServer, assert_marker_outlives_reservation, count, create, found, get, gone_within,
    inspect, list, login, next_revocations, now_ms, revoke, revoke_others, store_raw_session,
    stream_starts, wait_until,
};

/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

fn rotation(user: &str, family: &str, token: &str, new: &str) -> RotateSessionRequest {
    RotateSessionRequest {
        user_id: user.into(),
        family_id: family.into(),
        token_id: token.into(),
        new_token_id: new.into(),
        ..Default::default()
    }
}

async fn extend(client: &mut Client, user: &str, token: &str, ttl_s: i64) -> Option<Session> {
    client
        .extend_session(ExtendSessionRequest {
            user_id: user.into(),
            token_id: token.into(),
            ttl: seconds(ttl_s),
        })
        .await
        .unwrap()
        .into_inner()
        .session
}

async fn rotate(client: &mut Client, request: RotateSessionRequest) -> RotateSessionResponse {
    client.rotate_session(request).await.unwrap().into_inner()
}

fn outcome(response: &RotateSessionResponse) -> RotateOutcome {
    RotateOutcome::try_from(response.outcome).unwrap()
}

fn ms(timestamp: Option<prost_types::Timestamp>) -> u64 {
    let t = timestamp.expect("a timestamp");
    u64::try_from(t.seconds).unwrap() * 1000 + u64::try_from(t.nanos).unwrap() / 1_000_000
}

async fn login_with(client: &mut Client, request: CreateSessionRequest) -> Session {
    let created = client.create_session(request).await.unwrap().into_inner();
    assert!(created.created, "{created:?}");
    created.session.unwrap()
}

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn millis(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::from(ms / 1000),
        nanos: ms % 1000 * 1_000_000,
    })
}

/// A family is one login: CreateSession starts it (a fresh 128-bit id and an
/// absolute end), ROTATED moves it to the new token in one step (the old one
/// dead and final, the new one live, the count unchanged, the metadata kept
/// unless replaced), and a retry of the same rotation answers its successor.
#[tokio::test]
async fn rotation_moves_the_family_to_its_successor() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = login_with(
        &mut client,
        CreateSessionRequest {
            user_id: "rita".into(),
            token_id: "r-1".into(),
            metadata: HashMap::from([("device".into(), "laptop".into())]),
            ..Default::default()
        },
    )
    .await;
    let family = first.family_id.clone();
    assert_eq!(family.len(), 32, "{family}");
    assert!(family.bytes().all(|b| b.is_ascii_hexdigit()), "{family}");
    let end = ms(first.family_expires_at);
    let created = ms(first.created_at);
    assert_eq!(
        end - created,
        2_592_000_000,
        "SESSION_MAX_LIFETIME's default"
    );
    let other = login(&mut client, "rita", "r-other").await;
    assert_ne!(
        other.family_id, family,
        "every create starts its own family"
    );

    let rotated = rotate(&mut client, rotation("rita", &family, "r-1", "r-2")).await;
    assert_eq!(outcome(&rotated), RotateOutcome::Rotated, "{rotated:?}");
    let successor = rotated.session.unwrap();
    assert_eq!(successor.token_id, "r-2");
    assert_eq!(successor.family_id, family);
    assert_eq!(ms(successor.family_expires_at), end);
    assert_eq!(
        successor.metadata["device"], "laptop",
        "empty metadata keeps it"
    );
    assert!(get(&mut client, "r-1", "rita").await.is_none());
    assert!(get(&mut client, "r-1", "").await.is_none());
    assert_eq!(get(&mut client, "r-2", "").await.unwrap(), successor);
    assert_eq!(count(&mut client, "rita").await, 2);

    // The same rotation again (a retry after a lost answer): its successor.
    let again = rotate(&mut client, rotation("rita", &family, "r-1", "r-2")).await;
    assert_eq!(outcome(&again), RotateOutcome::AlreadyRotated);
    assert_eq!(again.session.unwrap(), successor);
    // Both token ids stay final.
    let replay = create(&mut client, "rita", "r-1").await;
    assert_eq!(
        CreateOutcome::try_from(replay.outcome).unwrap(),
        CreateOutcome::TokenRevoked
    );
    let replay = create(&mut client, "rita", "r-2").await;
    assert_eq!(
        CreateOutcome::try_from(replay.outcome).unwrap(),
        CreateOutcome::AlreadyExists
    );

    // New metadata replaces the old; the ttl is the one asked for.
    let mut request = rotation("rita", &family, "r-2", "r-3");
    request.metadata = HashMap::from([("device".into(), "phone".into())]);
    request.ttl = seconds(60);
    let third = rotate(&mut client, request).await.session.unwrap();
    assert_eq!(third.metadata["device"], "phone");
    assert_eq!(ms(third.expires_at) - ms(third.created_at), 60_000);
    assert!(ms(third.created_at) >= ms(successor.created_at));
}

/// 200 concurrent rotations presenting one token, each naming its own
/// successor, through two servers sharing Redis: exactly one ROTATED, every
/// other ALREADY_ROTATED with that same successor, no error, one live session
/// in the family.
#[tokio::test]
async fn concurrent_rotations_of_one_token_yield_one_successor() {
    let (_servers, mut clients) = TestServer::pair().await;
    let family = login(&mut clients[0], "cora", "c-0").await.family_id;
    let calls = (0..200).map(|i| {
        let mut client = clients[i % 2].clone();
        let request = rotation("cora", &family, "c-0", &format!("c-next-{i}"));
        tokio::spawn(async move { client.rotate_session(request).await })
    });
    let mut rotated = Vec::new();
    let mut successors = HashSet::new();
    for call in calls.collect::<Vec<_>>() {
        let answer = call.await.unwrap().expect("no rotation fails").into_inner();
        match outcome(&answer) {
            RotateOutcome::Rotated => rotated.push(answer.session.clone().unwrap()),
            RotateOutcome::AlreadyRotated => {}
            other => panic!("unexpected outcome {other:?}: {answer:?}"),
        }
        successors.insert(answer.session.unwrap().token_id);
    }
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(
        successors,
        HashSet::from([rotated[0].token_id.clone()]),
        "the family branched"
    );
    let mut client = clients[0].clone();
    assert_eq!(count(&mut client, "cora").await, 1);
    let live: Vec<_> = list(&mut client, "cora").await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].token_id, rotated[0].token_id);
}

/// A near-cache client of `server` whose revocation stream is healthy, and
/// a revocation stream of `client`'s own, opened after it.
async fn watching(
    server: &TestServer,
    client: &mut Client,
) -> (SessionClient, tonic::Streaming<WatchRevocationsResponse>) {
    let cached = SessionClient::builder(server.url())
        .near_cache(1000)
        .near_cache_max_staleness(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let healthy = || async { cached.near_cache_stats().unwrap().healthy };
    assert!(wait_until(PATIENCE, healthy).await);
    let stream = client
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .unwrap()
        .into_inner();
    (cached, stream)
}

/// A token the family has moved past, presented after the grace (or any
/// token older than the previous one, even within it), is reuse: the whole
/// family ends at once, the stream says so, and nothing of it can be rotated
/// or created again. A near-cache on another client drops the session.
#[tokio::test]
async fn reuse_ends_the_family_everywhere() {
    let server = TestServer::start_tuned(|c| c.rotation_grace_ms = 300).await;
    let mut client = server.client().await;
    let (cached, mut stream) = watching(&server, &mut client).await;

    let family = login(&mut client, "reed", "e-1").await.family_id;
    let r = rotate(&mut client, rotation("reed", &family, "e-1", "e-2")).await;
    assert_eq!(outcome(&r), RotateOutcome::Rotated);
    // Within the grace, the previous token gets the current session...
    let r = rotate(&mut client, rotation("reed", &family, "e-1", "e-x")).await;
    assert_eq!(outcome(&r), RotateOutcome::AlreadyRotated);
    assert_eq!(r.session.unwrap().token_id, "e-2");
    // ...but the near-cache of another client holds e-2 from memory.
    for _ in 0..2 {
        assert!(found(&cached, "reed", "e-2").await);
    }
    let hits = cached.near_cache_stats().unwrap().hits;
    assert!(hits >= 1, "e-2 was not answered from memory");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = rotate(&mut client, rotation("reed", &family, "e-1", "e-y")).await;
    assert_eq!(outcome(&r), RotateOutcome::ReuseDetected, "{r:?}");
    assert!(r.session.is_none());
    assert!(get(&mut client, "e-2", "reed").await.is_none());
    assert_eq!(count(&mut client, "reed").await, 0);
    for (token, new) in [("e-2", "e-z"), ("e-1", "e-z")] {
        let again = rotate(&mut client, rotation("reed", &family, token, new)).await;
        assert_eq!(outcome(&again), RotateOutcome::NotFound, "{token}");
    }
    for token in ["e-1", "e-2"] {
        let replay = create(&mut client, "reed", token).await;
        assert_eq!(
            CreateOutcome::try_from(replay.outcome).unwrap(),
            CreateOutcome::TokenRevoked,
            "{token}"
        );
    }
    // The stream: e-1 rotated, then e-2 ended for reuse.
    let seen: Vec<_> = next_revocations(&mut stream, 2, PATIENCE)
        .await
        .into_iter()
        .map(|(_, token, reason)| (token, reason))
        .collect();
    assert_eq!(
        seen,
        [
            ("e-1".to_string(), RevocationReason::Rotated),
            ("e-2".to_string(), RevocationReason::ReuseDetected)
        ]
    );
    assert!(
        gone_within(PATIENCE, &cached, "reed", "e-2").await,
        "the near-cache kept a session of a family ended for reuse"
    );

    // Older than the previous token, even within the grace: reuse.
    let family = login(&mut client, "reed", "f-1").await.family_id;
    for (token, new) in [("f-1", "f-2"), ("f-2", "f-3")] {
        let r = rotate(&mut client, rotation("reed", &family, token, new)).await;
        assert_eq!(outcome(&r), RotateOutcome::Rotated);
    }
    let r = rotate(&mut client, rotation("reed", &family, "f-1", "f-4")).await;
    assert_eq!(outcome(&r), RotateOutcome::ReuseDetected);
    assert!(get(&mut client, "f-3", "reed").await.is_none());
    // A token that never was the family's, with its real id: reuse too.
    let family = login(&mut client, "reed", "g-1").await.family_id;
    let r = rotate(&mut client, rotation("reed", &family, "not-ours", "g-2")).await;
    assert_eq!(outcome(&r), RotateOutcome::ReuseDetected);
    assert!(get(&mut client, "g-1", "reed").await.is_none());
}

/// An ExtendSession that moves an expiry earlier is published on the
/// revocation stream (`shortened`), so another client's near-cache, which
/// was answering the session from memory, never answers it past its new
/// expiry (before #28's fix it kept answering until the old one). One that
/// moves it later publishes nothing.
#[tokio::test]
async fn a_shortened_expiry_reaches_other_near_caches() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (cached, mut stream) = watching(&server, &mut client).await;

    let session = login(&mut client, "shelly", "sh-1").await;
    // Later (900 s to 1,800 s): written, not published.
    let longer = extend(&mut client, "shelly", "sh-1", 1800).await.unwrap();
    assert!(ms(longer.expires_at) > ms(session.expires_at));
    for _ in 0..2 {
        assert!(found(&cached, "shelly", "sh-1").await);
    }
    assert!(
        cached.near_cache_stats().unwrap().hits >= 1,
        "sh-1 was not answered from memory"
    );

    let shortened = extend(&mut client, "shelly", "sh-1", 2).await.unwrap();
    let new_expiry = ms(shortened.expires_at);
    assert!(new_expiry <= now_ms() + 2_000, "{shortened:?}");
    // The stream carries exactly that change, and nothing for the longer one.
    let published = tokio::time::timeout(PATIENCE, async {
        loop {
            let message = stream.next().await.unwrap().unwrap();
            assert!(message.revocations.is_empty(), "{message:?}");
            if let Some(s) = message.shortened.into_iter().next() {
                break s;
            }
        }
    })
    .await
    .expect("the shortening came on the stream");
    assert_eq!(
        (published.user_id.as_str(), published.token_id.as_str()),
        ("shelly", "sh-1")
    );
    assert_eq!(ms(published.expires_at), new_expiry);
    // Within the stream's delivery, the other cache answers the new expiry
    // (or asks the server, which does)...
    let new_expiry_at = UNIX_EPOCH + Duration::from_millis(new_expiry);
    assert!(
        wait_until(PATIENCE, || async {
            cached
                .get_user_session("shelly", "sh-1")
                .await
                .unwrap()
                .is_none_or(|s| s.expires_at <= new_expiry_at)
        })
        .await,
        "the near-cache kept the expiry from before the shortening"
    );
    // ...and nothing once it passed (Redis's clock is this host's here).
    let wait = new_expiry_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    assert!(
        cached
            .get_user_session("shelly", "sh-1")
            .await
            .unwrap()
            .is_none(),
        "answered past its new expiry"
    );
}

/// A rotation racing RevokeSession (of the presented token) or
/// RevokeAllUserSessions: once the revocation returned, nothing of the
/// family is live, and no later rotation brings it back; a successor the
/// rotation reported stays final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_racing_a_rotation_ends_the_family() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut rotated_first = 0;
    for round in 0..60u64 {
        let all = round % 2 == 1;
        let (old, new) = (format!("race-{round}"), format!("race-{round}-next"));
        let family = login(&mut client, "rosa", &old).await.family_id;
        let mut rotating = client.clone();
        let rotate_call = tokio::spawn({
            let request = rotation("rosa", &family, &old, &new);
            async move { rotating.rotate_session(request).await }
        });
        // From at once to after the rotation's three round trips: each
        // order of the race, and the interleavings between. (The rotation
        // runs on another worker thread while this one waits.)
        std::thread::sleep(Duration::from_micros(round % 30 * 60));
        if all {
            client
                .revoke_all_user_sessions(RevokeAllUserSessionsRequest {
                    user_id: "rosa".into(),
                })
                .await
                .unwrap();
        } else {
            revoke(&mut client, &old, "rosa").await;
        }
        // The revocation returned: nothing of the family is live.
        assert!(get(&mut client, &old, "rosa").await.is_none(), "{old}");
        let answer = rotate_call.await.unwrap().unwrap().into_inner();
        let rotated = outcome(&answer) == RotateOutcome::Rotated;
        if rotated {
            rotated_first += 1;
        } else {
            assert_eq!(outcome(&answer), RotateOutcome::NotFound, "{answer:?}");
        }
        assert!(
            get(&mut client, &new, "rosa").await.is_none(),
            "round {round} (revoke all: {all}): the successor survived ({answer:?})"
        );
        assert_eq!(count(&mut client, "rosa").await, 0, "round {round}");
        for (token, next) in [(&old, "x-1"), (&new, "x-2")] {
            let again = rotate(&mut client, rotation("rosa", &family, token, next)).await;
            assert_eq!(outcome(&again), RotateOutcome::NotFound, "round {round}");
        }
        if rotated {
            let replay = create(&mut client, "rosa", &new).await;
            assert_eq!(
                CreateOutcome::try_from(replay.outcome).unwrap(),
                CreateOutcome::TokenRevoked,
                "round {round}"
            );
        }
    }
    eprintln!("{rotated_first} of 60 rotations ran before the revocation reached Redis");
    assert!(
        rotated_first > 0,
        "no rotation won the race: the successor-following path went untested"
    );
}

/// Revoking a token the family rotated away from ends the family too: its
/// marker names the successor, and the revocation follows it.
#[tokio::test]
async fn revoking_a_rotated_away_token_ends_its_family() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let family = login(&mut client, "ravi", "v-1").await.family_id;
    for (token, new) in [("v-1", "v-2"), ("v-2", "v-3")] {
        let r = rotate(&mut client, rotation("ravi", &family, token, new)).await;
        assert_eq!(outcome(&r), RotateOutcome::Rotated);
    }
    let unrelated = login(&mut client, "ravi", "w-1").await;
    assert!(revoke(&mut client, "v-1", "ravi").await);
    assert!(get(&mut client, "v-3", "ravi").await.is_none());
    assert!(
        get(&mut client, "w-1", "ravi").await.is_some(),
        "{unrelated:?}"
    );
    let again = rotate(&mut client, rotation("ravi", &family, "v-3", "v-4")).await;
    assert_eq!(outcome(&again), RotateOutcome::NotFound);
}

/// No session of a family outlives its `max_lifetime`, however it is
/// rotated or extended; an unrotated family ends with its session's ttl (the
/// idle timeout).
#[tokio::test]
async fn a_family_never_outlives_its_lifetime() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = login_with(
        &mut client,
        CreateSessionRequest {
            user_id: "lena".into(),
            token_id: "l-1".into(),
            ttl: seconds(60),
            max_lifetime: millis(1500),
            ..Default::default()
        },
    )
    .await;
    let end = ms(first.family_expires_at);
    assert_eq!(end - ms(first.created_at), 1500);
    assert_eq!(
        ms(first.expires_at),
        end,
        "a longer ttl is cut to the family's end"
    );
    let mut request = rotation("lena", &first.family_id, "l-1", "l-2");
    request.ttl = seconds(3600);
    let second = rotate(&mut client, request).await.session.unwrap();
    assert_eq!(ms(second.expires_at), end);
    let extended = extend(&mut client, "lena", "l-2", 3600).await.unwrap();
    assert_eq!(ms(extended.expires_at), end);
    let pttl: i64 = inspect(
        &server.config,
        redis::cmd("PTTL").arg(format!(
            "{}session:{{lena}}:{{l-2}}",
            server.config.key_prefix
        )),
    )
    .await;
    assert!(pttl <= 1500, "the key outlives the family: {pttl} ms");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut client = client.clone();
            async move { get(&mut client, "l-2", "lena").await.is_none() }
        })
        .await
    );
    assert!(now_ms() + 2000 >= end, "ended long before its end");
    let late = rotate(
        &mut client,
        rotation("lena", &first.family_id, "l-2", "l-3"),
    )
    .await;
    assert_eq!(outcome(&late), RotateOutcome::NotFound);

    // Idle: a family whose session expires unrotated is gone.
    let idle = login_with(
        &mut client,
        CreateSessionRequest {
            user_id: "lena".into(),
            token_id: "i-1".into(),
            ttl: millis(300),
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = rotate(&mut client, rotation("lena", &idle.family_id, "i-1", "i-2")).await;
    assert_eq!(outcome(&r), RotateOutcome::NotFound);
    // The family's state expired with it: nothing of it is left in Redis.
    let exists: i64 = inspect(
        &server.config,
        redis::cmd("EXISTS").arg(format!(
            "{}family:{{lena}}:{{{}}}",
            server.config.key_prefix, idle.family_id
        )),
    )
    .await;
    assert_eq!(exists, 0);
}

/// A user at MAX_SESSIONS_PER_USER rotates without evicting anyone.
#[tokio::test]
async fn rotation_at_the_cap_evicts_nobody() {
    let server = TestServer::start_tuned(|c| c.max_sessions_per_user = 3).await;
    let mut client = server.client().await;
    let mut families = Vec::new();
    for token in ["k-1", "k-2", "k-3"] {
        families.push(login(&mut client, "kurt", token).await.family_id);
    }
    for (i, family) in families.iter().enumerate() {
        let old = format!("k-{}", i + 1);
        let r = rotate(
            &mut client,
            rotation("kurt", family, &old, &format!("{old}b")),
        )
        .await;
        assert_eq!(outcome(&r), RotateOutcome::Rotated);
        assert_eq!(count(&mut client, "kurt").await, 3);
    }
    for token in ["k-1b", "k-2b", "k-3b"] {
        assert!(get(&mut client, token, "kurt").await.is_some(), "{token}");
    }
}

/// TOKEN_TAKEN when the new token id is another user's, or was this user's
/// and revoked; nothing changes. Unknown families are NOT_FOUND.
#[tokio::test]
async fn a_taken_new_token_id_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let family = login(&mut client, "tara", "t-1").await.family_id;
    login(&mut client, "tom", "t-toms").await;
    login(&mut client, "tara", "t-dead").await;
    assert!(revoke(&mut client, "t-dead", "tara").await);
    login(&mut client, "tara", "t-live").await;
    for taken in ["t-toms", "t-dead", "t-live"] {
        let r = rotate(&mut client, rotation("tara", &family, "t-1", taken)).await;
        assert_eq!(outcome(&r), RotateOutcome::TokenTaken, "{taken}");
        assert!(get(&mut client, "t-1", "tara").await.is_some());
    }
    let r = rotate(&mut client, rotation("tara", &family, "t-1", "t-2")).await;
    assert_eq!(outcome(&r), RotateOutcome::Rotated);
    let unknown = "0".repeat(32);
    let r = rotate(&mut client, rotation("tara", &unknown, "t-2", "t-3")).await;
    assert_eq!(outcome(&r), RotateOutcome::NotFound);
    let r = rotate(&mut client, rotation("tom", &family, "t-2", "t-3")).await;
    assert_eq!(
        outcome(&r),
        RotateOutcome::NotFound,
        "another user's family"
    );
    assert!(get(&mut client, "t-2", "tara").await.is_some());
}

/// Bad input is INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn bad_rotations_and_extensions_name_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let ok = rotation("u", "f", "a", "b");
    let cases: Vec<(&str, RotateSessionRequest)> = vec![
        (
            "user_id",
            RotateSessionRequest {
                user_id: String::new(),
                ..ok.clone()
            },
        ),
        (
            "family_id",
            RotateSessionRequest {
                family_id: String::new(),
                ..ok.clone()
            },
        ),
        (
            "family_id",
            RotateSessionRequest {
                family_id: "a:b".into(),
                ..ok.clone()
            },
        ),
        (
            "token_id",
            RotateSessionRequest {
                token_id: "a b".into(),
                ..ok.clone()
            },
        ),
        (
            "new_token_id",
            RotateSessionRequest {
                new_token_id: String::new(),
                ..ok.clone()
            },
        ),
        (
            "new_token_id",
            RotateSessionRequest {
                new_token_id: "a".into(),
                ..ok.clone()
            },
        ),
        (
            "ttl",
            RotateSessionRequest {
                ttl: seconds(0),
                ..ok.clone()
            },
        ),
        (
            "ttl",
            RotateSessionRequest {
                ttl: seconds(86_401),
                ..ok.clone()
            },
        ),
        (
            "metadata",
            RotateSessionRequest {
                metadata: HashMap::from([(String::new(), "v".into())]),
                ..ok.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let status = client.rotate_session(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("invalid {field}: ")),
            "{field}: {:?}",
            status.message()
        );
    }
    for (field, max_lifetime) in [
        ("max_lifetime", seconds(0)),
        ("max_lifetime", seconds(365 * 86_400 + 1)),
        (
            "max_lifetime",
            millis(1).map(|d| prost_types::Duration {
                nanos: d.nanos + 1,
                ..d
            }),
        ),
    ] {
        let status = client
            .create_session(CreateSessionRequest {
                user_id: "u".into(),
                token_id: "mx".into(),
                max_lifetime,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("invalid {field}: ")),
            "{status:?}"
        );
    }
    for (field, request) in [
        (
            "user_id",
            ExtendSessionRequest {
                user_id: String::new(),
                token_id: "a".into(),
                ttl: None,
            },
        ),
        (
            "token_id",
            ExtendSessionRequest {
                user_id: "u".into(),
                token_id: "{".into(),
                ttl: None,
            },
        ),
        (
            "ttl",
            ExtendSessionRequest {
                user_id: "u".into(),
                token_id: "a".into(),
                ttl: seconds(-1),
            },
        ),
    ] {
        let status = client.extend_session(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("invalid {field}: ")),
            "{status:?}"
        );
    }
}

/// ExtendSession slides the expiry: a move of a tenth of the ttl or less
/// writes nothing; a longer one moves the session, its index entry and the
/// token's reservation (a token-only lookup still finds it); a shorter one
/// moves it earlier; a session that is not live answers nothing.
#[tokio::test]
async fn extend_slides_the_expiry_with_its_throttle() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let config: &Config = &server.config;
    let session = login_with(
        &mut client,
        CreateSessionRequest {
            user_id: "ezra".into(),
            token_id: "x-1".into(),
            ttl: seconds(100),
            ..Default::default()
        },
    )
    .await;
    let extend = |ttl| ExtendSessionRequest {
        user_id: "ezra".into(),
        token_id: "x-1".into(),
        ttl,
    };
    let same = client
        .extend_session(extend(seconds(100)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.session.unwrap(), session, "throttled: nothing written");

    let longer = client
        .extend_session(extend(seconds(3600)))
        .await
        .unwrap()
        .into_inner();
    let longer = longer.session.unwrap();
    assert!(ms(longer.expires_at) >= ms(session.expires_at) + 3_400_000);
    let prefix = &config.key_prefix;
    let pttl =
        |key: String| async move { inspect::<i64>(config, redis::cmd("PTTL").arg(key)).await };
    let session_left = pttl(format!("{prefix}session:{{ezra}}:{{x-1}}")).await;
    let reservation_left = pttl(format!("{prefix}token_owner:{{x-1}}")).await;
    assert!(session_left > 3_500_000, "{session_left}");
    assert!(
        reservation_left >= session_left + 60_000,
        "the reservation ({reservation_left} ms) must outlive the session ({session_left} ms) by OWNER_GRACE"
    );
    assert_eq!(get(&mut client, "x-1", "").await.unwrap(), longer);

    let shorter = client
        .extend_session(extend(seconds(10)))
        .await
        .unwrap()
        .into_inner();
    let shorter = shorter.session.unwrap();
    assert!(ms(shorter.expires_at) < ms(longer.expires_at));
    assert!(pttl(format!("{prefix}session:{{ezra}}:{{x-1}}")).await <= 10_000);

    assert!(revoke(&mut client, "x-1", "ezra").await);
    let gone = client
        .extend_session(extend(seconds(10)))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.session.is_none());
    let unknown = ExtendSessionRequest {
        user_id: "ezra".into(),
        token_id: "nobody".into(),
        ttl: None,
    };
    assert!(
        client
            .extend_session(unknown)
            .await
            .unwrap()
            .into_inner()
            .session
            .is_none()
    );
}

/// A rotation cut off between its round trips (random client deadlines of
/// 0.1 to 4 ms) never leaves two live sessions in the family, nor none where
/// one was acknowledged, nor a rotated-away token live; and the finality
/// invariant holds for the tokens it rotated away: each marker outlives the
/// token's reservation.
#[tokio::test]
async fn cancelled_rotations_never_branch_or_revive() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let config = &server.config;
    let mut current = "cx-0".to_string();
    let family = login(&mut client, "cyd", &current).await.family_id;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut cancelled = 0;
    let mut rotated_away = Vec::new();
    for i in 1..=150 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let next = format!("cx-{i}");
        let deadline = Duration::from_micros(100 + seed % 3_900);
        let call = client.rotate_session(rotation("cyd", &family, &current, &next));
        let answered = match tokio::time::timeout(deadline, call).await {
            Ok(answer) => Some(outcome(&answer.unwrap().into_inner())),
            Err(_) => {
                cancelled += 1;
                None
            }
        };
        let old_live = get(&mut client, &current, "cyd").await.is_some();
        let new_live = get(&mut client, &next, "cyd").await.is_some();
        assert!(
            old_live != new_live,
            "rotation {i} ({answered:?}): old live {old_live}, new live {new_live}"
        );
        if answered == Some(RotateOutcome::Rotated) {
            assert!(
                new_live,
                "rotation {i} acknowledged but its successor is not live"
            );
        }
        if new_live {
            rotated_away.push(std::mem::replace(&mut current, next));
        }
    }
    assert!(
        cancelled > 0,
        "no call was cancelled: the test proves nothing"
    );
    assert_eq!(count(&mut client, "cyd").await, 1);
    for token in &rotated_away {
        assert_marker_outlives_reservation(config, "cyd", token).await;
    }
    eprintln!(
        "{cancelled} of 150 rotations cancelled; {} rotated",
        rotated_away.len()
    );
}

/// Sessions stored by a server older than families (no family fields in
/// their JSON, no family key) keep working: found, counted, listed, extended
/// and revoked; rotating one finds no family. What this version writes has
/// every field the older version reads, with the same types (its parser
/// falls back to serde, which ignores the new fields).
#[tokio::test]
async fn sessions_of_the_version_before_families_keep_working() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let config = &server.config;
    let prefix = &config.key_prefix;
    // What the previous version's create_session.lua wrote.
    let now = now_ms();
    let json = format!(
        r#"{{"user_id":"olaf","token_id":"old-1","metadata":{{"ip":"10.0.0.1"}},"created_at_ms":{now},"expires_at_ms":{}}}"#,
        now + 600_000
    );
    store_raw_session(config, "olaf", "old-1", &json, 600_000).await;
    let found = get(&mut client, "old-1", "").await.unwrap();
    assert_eq!(found.family_id, "");
    assert!(found.family_expires_at.is_none());
    assert_eq!(count(&mut client, "olaf").await, 1);
    let extended = extend(&mut client, "olaf", "old-1", 3600).await.unwrap();
    assert!(ms(extended.expires_at) > now + 3_000_000);
    let r = rotate(
        &mut client,
        rotation("olaf", &"a".repeat(32), "old-1", "old-2"),
    )
    .await;
    assert_eq!(outcome(&r), RotateOutcome::NotFound, "no family to rotate");
    assert!(revoke(&mut client, "old-1", "olaf").await);

    // The older version's `Session` had five fields and no
    // `deny_unknown_fields`: serde reads any JSON object holding them with
    // those types, whatever else it holds. What this version stores does.
    let new = login(&mut client, "olaf", "new-1").await;
    let stored: String = inspect(
        config,
        redis::cmd("GET").arg(format!("{prefix}session:{{olaf}}:{{new-1}}")),
    )
    .await;
    let old: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(old["user_id"], "olaf");
    assert_eq!(old["token_id"], "new-1");
    assert!(old["metadata"].is_object());
    assert_eq!(old["created_at_ms"].as_u64(), Some(ms(new.created_at)));
    assert_eq!(old["expires_at_ms"].as_u64(), Some(ms(new.expires_at)));
}

/// A session-client on `server` with a near-cache.
async fn cached_client(server: &TestServer) -> SessionClient {
    SessionClient::builder(server.url())
        .near_cache(1000)
        .connect()
        .await
        .unwrap()
}

/// session-client: rotate_session answers the outcome as its enum, and the
/// near-cache never answers the rotated-away session from memory afterwards.
#[tokio::test]
async fn the_client_rotates_and_its_near_cache_drops_the_old_session() {
    let server = TestServer::start().await;
    let client = cached_client(&server).await;
    let created = client
        .create_session_with(session_client::NewSession::new("cleo", "cl-1"))
        .await
        .unwrap();
    let session = created.session.expect("created");
    let cl_1 = async || client.get_user_session("cleo", "cl-1").await.unwrap();
    let rotate = async || {
        let rotation = Rotation::new("cleo", &session.family_id, "cl-1", "cl-2");
        client.rotate_session(rotation).await.unwrap()
    };
    for _ in 0..2 {
        assert!(cl_1().await.is_some());
    }
    let outcome = rotate().await;
    let ClientOutcome::Rotated(next) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(next.token_id, "cl-2");
    assert!(cl_1().await.is_none());
    let again = rotate().await;
    assert!(
        matches!(&again, ClientOutcome::AlreadyRotated(s) if s.token_id == "cl-2"),
        "{again:?}"
    );
    let extended = client
        .extend_session("cleo", "cl-2", Some(Duration::from_secs(3600)))
        .await
        .unwrap()
        .unwrap();
    assert!(extended.expires_at > next.expires_at);
}

/// The client's "sign out other devices": `Some` with how many ended, the
/// kept session still answered and the others no longer (its near-cache
/// held all three), and `None` from a session that is not live.
#[tokio::test]
async fn the_client_signs_out_other_devices() {
    let server = TestServer::start().await;
    let client = cached_client(&server).await;
    for token in ["dv-1", "dv-2", "dv-3"] {
        let created = client
            .create_session_with(session_client::NewSession::new("dev", token))
            .await
            .unwrap();
        assert!(created.session.is_some(), "{token}");
        assert!(found(&client, "dev", token).await, "{token}");
    }
    let ended = client.revoke_other_user_sessions("dev", "dv-1").await;
    assert_eq!(ended.unwrap(), Some(2));
    assert!(!found(&client, "dev", "dv-2").await);
    assert!(!found(&client, "dev", "dv-3").await);
    assert!(found(&client, "dev", "dv-1").await);
    let dead = client.revoke_other_user_sessions("dev", "dv-2").await;
    assert_eq!(dead.unwrap(), None);
    assert!(found(&client, "dev", "dv-1").await);
}

/// Found by review: a token id this user reserved before, whose session
/// simply expired, is taken for a rotation (it was a token id); and a
/// revocation following a rotated-away token's marker revokes the successor
/// only while it is still of that family (it may have expired and been
/// created again since, in another login).
#[tokio::test]
async fn expired_ids_stay_taken_and_revocations_stay_in_their_family() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let short = |token: &str, ttl| CreateSessionRequest {
        user_id: "hugo".into(),
        token_id: token.into(),
        ttl: millis(ttl),
        ..Default::default()
    };
    login_with(&mut client, short("h-old", 300)).await;
    let family = login(&mut client, "hugo", "h-1").await.family_id;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(get(&mut client, "h-old", "hugo").await.is_none());
    let r = rotate(&mut client, rotation("hugo", &family, "h-1", "h-old")).await;
    assert_eq!(outcome(&r), RotateOutcome::TokenTaken, "{r:?}");
    assert!(get(&mut client, "h-old", "hugo").await.is_none());

    // a-1 rotated to a-2, which expires; a-2 is created again (a new
    // login); revoking a-1 leaves that login alone.
    let family = login(&mut client, "hugo", "a-1").await.family_id;
    let mut request = rotation("hugo", &family, "a-1", "a-2");
    request.ttl = millis(300);
    assert_eq!(
        outcome(&rotate(&mut client, request).await),
        RotateOutcome::Rotated
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = login(&mut client, "hugo", "a-2").await;
    assert_ne!(again.family_id, family);
    assert!(!revoke(&mut client, "a-1", "hugo").await);
    assert!(
        get(&mut client, "a-2", "hugo").await.is_some(),
        "a revocation of the old family's token ended another login"
    );
}

/// "Sign out other devices": every other session of the user ends as with
/// RevokeSession (gone, its token id refused by CreateSession, one
/// revocation each on the stream, none user-wide, so caches keep the kept
/// one), the kept session goes on, another user's sessions are untouched,
/// and a repeat revokes nothing more.
#[tokio::test]
async fn revoking_the_other_sessions_keeps_the_asking_one() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, PATIENCE).await;
    for token in ["o-1", "o-2", "o-3", "o-4"] {
        login(&mut client, "olga", token).await;
    }
    login(&mut client, "oscar", "o-5").await;

    let answer = revoke_others(&mut client, "olga", "o-2").await;
    assert!(answer.kept, "{answer:?}");
    assert_eq!(answer.revoked_count, 3);
    assert!(get(&mut client, "o-2", "olga").await.is_some());
    assert!(get(&mut client, "o-5", "oscar").await.is_some());
    assert_eq!(count(&mut client, "olga").await, 1);
    for token in ["o-1", "o-3", "o-4"] {
        assert_eq!(get(&mut client, token, "").await, None, "{token}");
        let again = create(&mut client, "olga", token).await;
        assert_eq!(again.outcome(), CreateOutcome::TokenRevoked, "{token}");
    }

    let mut ended = Vec::new();
    for (user, token, reason) in next_revocations(&mut stream, 3, PATIENCE).await {
        assert_eq!((user.as_str(), reason), ("olga", RevocationReason::Revoked));
        ended.push(token);
    }
    ended.sort();
    assert_eq!(ended, ["o-1", "o-3", "o-4"], "one each, none user-wide");

    let repeat = revoke_others(&mut client, "olga", "o-2").await;
    assert_eq!((repeat.kept, repeat.revoked_count), (true, 0));
    assert!(get(&mut client, "o-2", "olga").await.is_some());
}

/// The kept session must be a live session of the user: one revoked,
/// expired, unknown or another user's revokes nothing and says so (bad ids:
/// `validation::malformed_ids_are_refused_by_every_rpc`).
#[tokio::test]
async fn revoking_the_others_of_a_dead_session_revokes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    login(&mut client, "pia", "p-1").await;
    login(&mut client, "pia", "p-2").await;
    login(&mut client, "piet", "p-3").await;
    let short = client
        .create_session(CreateSessionRequest {
            user_id: "pia".into(),
            token_id: "p-4".into(),
            ttl: millis(300),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(short.created);
    assert!(revoke(&mut client, "p-1", "pia").await);
    let expired = wait_until(Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { get(&mut client, "p-4", "pia").await.is_none() }
    })
    .await;
    assert!(expired, "p-4 outlived its 300 ms");

    for keep in ["p-1", "p-3", "p-4", "p-unknown"] {
        let answer = revoke_others(&mut client, "pia", keep).await;
        assert_eq!((answer.kept, answer.revoked_count), (false, 0), "{keep}");
    }
    assert!(get(&mut client, "p-2", "pia").await.is_some());
    assert!(get(&mut client, "p-3", "piet").await.is_some());
}

/// Rotations racing the call (the windows held open one at a time:
/// `review_others::a_retry_from_a_rotated_away_token_leaves_its_family_alone`,
/// `review_others::rotations_between_the_index_read_and_the_revocation_are_followed`):
/// the kept session's rotation leaves its
/// successor live (the family goes on), another session's rotation is
/// followed to its successor, which ends. Each round races both rotations
/// against the call on separate connections; whatever the order, the kept
/// family has exactly one live session unless the call came after its
/// rotation (then it kept nothing and revoked nothing), and the other family
/// none when the call kept.
#[tokio::test]
async fn revoking_the_others_races_rotations_without_ending_the_kept_family() {
    let server = TestServer::start().await;
    let (mut a, mut b, mut c) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let mut kept_rounds = 0;
    for round in 0..40 {
        let user = format!("race-{round}");
        let mine = login(&mut a, &user, &format!("m-{round}")).await;
        let other = login(&mut a, &user, &format!("x-{round}")).await;
        let (call, _, _) = tokio::join!(
            revoke_others(&mut a, &user, &mine.token_id),
            rotate(
                &mut b,
                rotation(
                    &user,
                    &mine.family_id,
                    &mine.token_id,
                    &format!("m2-{round}")
                )
            ),
            rotate(
                &mut c,
                rotation(
                    &user,
                    &other.family_id,
                    &other.token_id,
                    &format!("x2-{round}")
                )
            ),
        );
        let live = |sessions: Vec<Session>, family: &str| {
            sessions.iter().filter(|s| s.family_id == family).count()
        };
        let sessions = list(&mut a, &user).await;
        assert_eq!(
            live(sessions.clone(), &mine.family_id),
            1,
            "round {round}: {call:?} {sessions:?}"
        );
        if call.kept {
            kept_rounds += 1;
            assert_eq!(
                live(sessions, &other.family_id),
                0,
                "round {round}: {call:?}"
            );
            assert_eq!(call.revoked_count, 1, "round {round}");
        } else {
            assert_eq!(call.revoked_count, 0, "round {round}");
        }
    }
    assert!(
        kept_rounds > 0,
        "no round kept: the race never ran the call first"
    );
}
