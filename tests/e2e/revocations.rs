//! WatchRevocations: every path that ends a session early publishes, in the
//! order Redis made the revocations; streams start with a reset, beat while
//! the server's subscription is alive (each reset and beat with Redis's
//! clock), stop beating when it is lost and reset when it is back; slow receivers are dropped; authentication and shutdown
//! apply as to every RPC.

use std::time::{Duration, Instant};

use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, Revocation, RevocationReason, RevokeSessionRequest,
    WatchRevocationsRequest, WatchRevocationsResponse, session_store_client::SessionStoreClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status, Streaming, metadata::MetadataValue, transport::Channel};

use crate::support::{
    PrivateRedis, TempFiles, TestServer, config_on, create, get, inspect, redis_cli,
    redis_cli_with_password, revoke, revoke_all, wait_until,
};

/// How long a test waits for a message that should come.
const PATIENCE: Duration = Duration::from_secs(10);

async fn watch(client: &mut SessionStoreClient<Channel>) -> Streaming<WatchRevocationsResponse> {
    client
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .expect("WatchRevocations opens")
        .into_inner()
}

/// The next message, or None when none came within `limit`; panics on a
/// stream error or end.
async fn next_within(
    stream: &mut Streaming<WatchRevocationsResponse>,
    limit: Duration,
) -> Option<WatchRevocationsResponse> {
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(Some(Ok(message))) => Some(message),
        Ok(Some(Err(status))) => panic!("stream failed: {status:?}"),
        Ok(None) => panic!("stream ended"),
        Err(_) => None,
    }
}

/// Waits for the stream's opening reset.
async fn started(stream: &mut Streaming<WatchRevocationsResponse>) {
    let first = next_within(stream, PATIENCE)
        .await
        .expect("a first message");
    assert!(first.reset, "the first message must be a reset: {first:?}");
}

/// A revocation stream on `client`, past its opening reset.
async fn watching(client: &mut SessionStoreClient<Channel>) -> Streaming<WatchRevocationsResponse> {
    let mut stream = watch(client).await;
    started(&mut stream).await;
    stream
}

/// Heartbeats every 100 ms and a 300 ms Redis timeout, so a lost
/// subscription is noticed within half a second.
fn quick_beats(config: &mut session_server::Config) {
    config.revocation_heartbeat_ms = 100;
    config.redis_timeout_ms = 300;
}

/// The next `n` revocations, skipping heartbeats; panics on a reset.
async fn revocations(
    stream: &mut Streaming<WatchRevocationsResponse>,
    n: usize,
) -> Vec<Revocation> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = next_within(stream, left)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} revocations came: {seen:?}", seen.len()));
        assert!(!message.reset, "unexpected reset after {seen:?}");
        seen.extend(message.revocations);
    }
    seen
}

/// Creates the session and returns its creation time in milliseconds.
async fn create_at(client: &mut SessionStoreClient<Channel>, user: &str, token: &str) -> u64 {
    let created = create(client, user, token).await;
    assert!(created.created, "{user}/{token}: {created:?}");
    let at = created.session.unwrap().created_at.unwrap();
    at.seconds as u64 * 1000 + at.nanos as u64 / 1_000_000
}

fn millis(revocation: &Revocation) -> u64 {
    let at = revocation.revoked_at.unwrap();
    at.seconds as u64 * 1000 + at.nanos as u64 / 1_000_000
}

fn summary(r: &Revocation) -> (String, String, RevocationReason) {
    (r.user_id.clone(), r.token_id.clone(), r.reason())
}

/// Two user-wide revocations of one user in the same Redis millisecond publish
/// the same text: both reach the stream (a session created and cached between
/// them is dropped by the second), while on Cluster the copies of each that
/// arrive over every master's connection still pass once. Published by one
/// script, so the two are certainly in one millisecond; then a marker
/// revocation, so nothing else is pending.
#[tokio::test]
async fn two_user_wide_revocations_in_one_millisecond_both_arrive() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = watching(&mut client).await;

    let channel = format!("{}revocations", server.config.key_prefix);
    let twice = redis::cmd("EVAL")
        .arg(
            "redis.call('PUBLISH', ARGV[1], ARGV[2]) \
             redis.call('PUBLISH', ARGV[1], ARGV[2]) \
             redis.call('PUBLISH', ARGV[1], ARGV[3])",
        )
        .arg(0)
        .arg(&channel)
        .arg("r:1700000000000:signed_out_everywhere:twice:")
        .arg("r:1700000000001:revoked:twice:last")
        .clone();
    let () = inspect(&server.config, &twice).await;
    let seen = revocations(&mut stream, 3).await;
    let seen: Vec<_> = seen.iter().map(summary).collect();
    assert_eq!(
        seen,
        vec![
            (
                "twice".into(),
                String::new(),
                RevocationReason::SignedOutEverywhere
            ),
            (
                "twice".into(),
                String::new(),
                RevocationReason::SignedOutEverywhere
            ),
            ("twice".into(), "last".into(), RevocationReason::Revoked),
        ]
    );
    // Nothing more within a second: no copy got through.
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Some(message) = next_within(
        &mut stream,
        quiet_until.saturating_duration_since(Instant::now()),
    )
    .await
    {
        assert!(message.revocations.is_empty(), "{message:?}");
    }
}

/// RevokeSession (with and without the user hint), RevokeAllUserSessions and
/// eviction at the cap each publish, in order, for users spread over every
/// master on Cluster; calls that revoke nothing publish nothing.
#[tokio::test]
async fn every_revoking_path_publishes_and_no_op_calls_do_not() {
    let server = TestServer::start_tuned(|c| c.max_sessions_per_user = 2).await;
    let mut client = server.client().await;
    let mut stream = watching(&mut client).await;

    // Eight users: their slots fall on every master of a three-master cluster.
    for n in 0..8 {
        let user = format!("pub-{n}");
        let t = |i: u32| format!("{user}-t{i}");
        create_at(&mut client, &user, &t(1)).await;
        create_at(&mut client, &user, &t(2)).await;
        // The cap is 2: the third create evicts the oldest.
        create_at(&mut client, &user, &t(3)).await;
        let evicted = revocations(&mut stream, 1).await;
        assert_eq!(
            evicted.iter().map(summary).collect::<Vec<_>>(),
            [(user.clone(), t(1), RevocationReason::Evicted)]
        );

        assert!(revoke(&mut client, &t(2), &user).await);
        assert!(revoke(&mut client, &t(3), "").await);
        let newest = create_at(&mut client, &user, &t(4)).await;
        assert_eq!(revoke_all(&mut client, &user).await, 1);
        let seen = revocations(&mut stream, 3).await;
        assert_eq!(
            seen.iter().map(summary).collect::<Vec<_>>(),
            [
                (user.clone(), t(2), RevocationReason::Revoked),
                (user.clone(), t(3), RevocationReason::Revoked),
                (
                    user.clone(),
                    String::new(),
                    RevocationReason::SignedOutEverywhere
                ),
            ],
        );
        // The user-wide revocation covers the session created before it.
        assert!(millis(&seen[2]) >= newest, "{seen:?} vs created {newest}");
        assert!(millis(&seen[0]) <= millis(&seen[1]));
    }

    // Nothing to revoke: nothing published. A marker revocation after them
    // must be the very next one on the stream.
    assert!(
        !revoke(&mut client, "pub-0-t1", "pub-0").await,
        "already evicted"
    );
    assert!(!revoke(&mut client, "never-existed", "").await);
    assert!(
        !revoke(&mut client, "pub-0-t4", "pub-1").await,
        "wrong hint"
    );
    assert_eq!(revoke_all(&mut client, "pub-0").await, 0);
    assert_eq!(revoke_all(&mut client, "nobody").await, 0);
    create_at(&mut client, "marker", "marker-t").await;
    assert!(revoke(&mut client, "marker-t", "marker").await);
    let next = revocations(&mut stream, 1).await;
    assert_eq!(
        next.iter().map(summary).collect::<Vec<_>>(),
        [(
            "marker".into(),
            "marker-t".into(),
            RevocationReason::Revoked
        )]
    );
    drop(stream);
    server.shutdown().await;
}

/// Heartbeats come every REVOCATION_HEARTBEAT_MS while the subscription is
/// alive; with Redis gone they stop, and the stream stays open; when Redis is
/// back the next message is a reset, and the beats resume.
#[tokio::test]
async fn heartbeats_stop_without_redis_and_a_reset_follows_its_return() {
    let mut redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, quick_beats).await;
    let mut client = server.client().await;
    let mut stream = watching(&mut client).await;

    let mut beats = 0;
    let counting = Instant::now();
    while beats < 5 {
        let message = next_within(&mut stream, Duration::from_secs(2))
            .await
            .expect("heartbeats every 100 ms");
        assert!(
            !message.reset && message.revocations.is_empty(),
            "{message:?}"
        );
        beats += 1;
    }
    assert!(
        counting.elapsed() >= Duration::from_millis(300),
        "beats too fast"
    );

    redis.kill();
    // A beat already on its way may still arrive; after that, silence.
    while next_within(&mut stream, Duration::from_millis(500))
        .await
        .is_some()
    {}
    assert!(
        next_within(&mut stream, Duration::from_secs(2))
            .await
            .is_none(),
        "a heartbeat came while Redis was down"
    );

    redis.restart();
    let back = next_within(&mut stream, PATIENCE)
        .await
        .expect("a message once Redis is back");
    assert!(
        back.reset,
        "the first message after the loss must be a reset: {back:?}"
    );
    let beat = next_within(&mut stream, Duration::from_secs(2)).await;
    assert!(
        beat.is_some_and(|m| !m.reset),
        "beats resume after the reset"
    );
    drop(stream);
    server.shutdown().await;
}

/// A subscription that stops delivering while its connection stays open
/// (Redis paused past the heartbeat patience) is replaced, and the streams
/// are told with a reset; one killed by Redis (CLIENT KILL) likewise.
#[tokio::test]
async fn a_silent_or_killed_subscription_is_replaced_with_a_reset() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, quick_beats).await;
    let mut client = server.client().await;
    let mut stream = watching(&mut client).await;
    next_within(&mut stream, Duration::from_secs(2))
        .await
        .expect("a heartbeat");

    // Paused for 2 s: heartbeats cannot be published, the subscription's
    // TCP connection stays up, and the patience (max(3 beats, beat + Redis
    // timeout) = 400 ms) runs out.
    redis.pause(2_000).await;
    reset_within_patience(&mut stream, "the pause").await;

    let mut admin = redis.connection().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the server holds one subscription");
    reset_within_patience(&mut stream, "the kill").await;
    drop(stream);
    server.shutdown().await;
}

/// Reads the stream until a reset comes, failing the test if none comes
/// within [`PATIENCE`]; `after` names what the reset should follow.
async fn reset_within_patience(stream: &mut Streaming<WatchRevocationsResponse>, after: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = next_within(stream, left)
            .await
            .unwrap_or_else(|| panic!("no reset after {after}"));
        if message.reset {
            return;
        }
    }
}

/// The Redis password rotated (P1 to P2: file replaced, Redis told, every
/// connection cut, the subscription's included), then the file briefly
/// unreadable while the subscription is cut again: the subscriber reconnects
/// with P2, the password the pool uses (the last read), not P1 from the
/// start, so the stream gets its reset again and the revocations made after
/// the rotation. (The pool's side: `faults::an_unreadable_password_file_...`.)
#[tokio::test]
async fn the_subscription_follows_a_rotated_password_like_the_pool() {
    let redis = PrivateRedis::start();
    // Set after the start: the harness's readiness PING sends no password.
    let answer = redis_cli(redis.port, &["config", "set", "requirepass", "first"]);
    assert_eq!(answer.trim(), "OK");
    let files = TempFiles::new();
    let password = files.write("redis-password", "first\n");
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_password_file = Some(password.clone());
        quick_beats(c);
    })
    .await;
    let mut client = server.client().await;
    let mut stream = watching(&mut client).await;
    let cut = |kind: &str| {
        let killed =
            redis_cli_with_password(redis.port, "second", &["client", "kill", "type", kind]);
        assert_ne!(killed.trim(), "0", "no {kind} connection to cut");
    };
    let revoked_after = |token: &'static str| {
        let mut client = client.clone();
        async move {
            // The pool's connections may just have been cut: the first call
            // after a cut can meet the dead connection.
            let served = wait_until(Duration::from_secs(5), || {
                let mut client = client.clone();
                async move {
                    let probe = GetSessionRequest {
                        token_id: "probe".into(),
                        user_id: String::new(),
                    };
                    client.get_session(probe).await.is_ok()
                }
            })
            .await;
            assert!(
                served,
                "the pool did not reconnect with the rotated password"
            );
            create_at(&mut client, "rotated", token).await;
            assert!(revoke(&mut client, token, "rotated").await);
        }
    };

    // Rotate: the new file renamed over the old one, then Redis; every
    // connection is cut, the subscription's too.
    let staged = files.write("redis-password.new", "second\n");
    redis.rotate_password(staged, &password, "first", "second");
    cut("normal");
    cut("pubsub");
    reset_within_patience(&mut stream, "the rotation").await;
    revoked_after("after-rotation").await;
    let seen = revocations(&mut stream, 1).await;
    assert_eq!(seen[0].token_id, "after-rotation", "{seen:?}");

    // The file is gone for a moment (a Secret update in progress) while the
    // subscription is cut: it comes back with the second password.
    std::fs::rename(&password, files.write("elsewhere", "")).unwrap();
    cut("pubsub");
    reset_within_patience(&mut stream, "a cut with the file unreadable").await;
    revoked_after("file-unreadable").await;
    let seen = revocations(&mut stream, 1).await;
    assert_eq!(seen[0].token_id, "file-unreadable", "{seen:?}");
    drop(stream);
    server.shutdown().await;
}

/// A receiver that stops reading is dropped with RESOURCE_EXHAUSTED once it
/// falls REVOCATION_BACKLOG events behind, instead of the server buffering
/// for it; a new stream works at once.
#[tokio::test]
async fn a_receiver_that_stops_reading_is_dropped() {
    let server = TestServer::start().await;
    // HTTP/2's smallest windows (hyper's client defaults to 2 MB per stream),
    // so that what the transport holds is small next to the flood.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut client = SessionStoreClient::new(channel);
    let mut stream = watching(&mut client).await;

    // A second receiver on its own connection reads everything: once it has
    // seen the whole flood, so has the server's subscriber.
    let mut reader = server.client().await;
    let mut fast = watch(&mut reader).await;
    started(&mut fast).await;
    let flood = 20_000;
    let fast_reader = tokio::spawn(async move {
        let mut got = 0;
        while got < flood {
            let message = next_within(&mut fast, PATIENCE).await.expect("the flood");
            assert!(!message.reset);
            got += message.revocations.len();
        }
        got
    });

    // Far more than the backlog plus what the windows and the server's send
    // buffer hold (about 0.5 MB: ~2,000 revocations of ~230 bytes), published
    // while the slow stream is not read; in chunks, as on Cluster every
    // PUBLISH also crosses the cluster bus and a script must end within the
    // store's timeout.
    let channel = format!("{}revocations", server.config.key_prefix);
    let long_token = "t".repeat(200);
    for chunk in 0..10 {
        let publish = redis::cmd("EVAL")
            .arg(
                "for i = 1, tonumber(ARGV[2]) do \
                 redis.call('PUBLISH', ARGV[1], 'r:1:revoked:flood:' .. ARGV[3] .. i) end",
            )
            .arg(0)
            .arg(&channel)
            .arg(flood / 10)
            .arg(format!("{long_token}-{chunk}-"))
            .clone();
        let () = inspect(&server.config, &publish).await;
    }
    assert_eq!(
        fast_reader.await.unwrap(),
        flood,
        "the reading receiver got all of it"
    );

    let deadline = Instant::now() + PATIENCE;
    let mut got = 0;
    let status: Status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(m))) => {
                got += m.revocations.len();
                continue;
            }
            Ok(Some(Err(status))) => break status,
            Ok(None) => panic!("the stream ended without a status"),
            Err(_) => panic!("the lagging stream was not dropped; got {got}"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("reconnect"), "{status:?}");

    let mut again = watch(&mut client).await;
    started(&mut again).await;
    drop(again);
    server.shutdown().await;
}

/// WatchRevocations needs the bearer token like every other RPC, and server
/// shutdown ends an open stream with UNAVAILABLE.
#[tokio::test]
async fn the_stream_is_authenticated_and_ended_by_shutdown() {
    let (server, _files) = TestServer::start_requiring_tokens("watch-secret\n").await;
    let mut client = server.client().await;

    let refused = client
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let mut request = Request::new(WatchRevocationsRequest {});
    let token: MetadataValue<_> = "Bearer watch-secret".parse().unwrap();
    request.metadata_mut().insert("authorization", token);
    let mut stream = client
        .watch_revocations(request)
        .await
        .unwrap()
        .into_inner();
    started(&mut stream).await;

    server.shutdown().await;
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("shutdown ends the stream");
    match ended {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        None => panic!("the stream ended without saying why"),
        Some(Ok(_)) => unreachable!(),
    }
}

/// A Redis user without the revocation channel (Redis 7 denies channels by
/// default): a revoke or an evicting create fails with INTERNAL having changed
/// nothing (the PUBLISH comes before any write), so no revocation is ever done
/// without being published, and a retry after the grant succeeds.
#[tokio::test]
async fn a_redis_user_without_the_channel_changes_nothing() {
    let redis = PrivateRedis::start();
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "app",
            "on",
            ">pw",
            "~*",
            "+@all",
            "resetchannels",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut config = config_on(&redis);
    config.redis_url = format!("redis://app:pw@127.0.0.1:{}", redis.port);
    config.max_sessions_per_user = 1;
    let channel = format!("{}revocations", config.key_prefix);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let alive = |client: &mut SessionStoreClient<Channel>, token: &'static str| {
        let mut client = client.clone();
        async move { get(&mut client, token, "acl-user").await.is_some() }
    };

    create_at(&mut client, "acl-user", "acl-1").await;
    let revoking = RevokeSessionRequest {
        token_id: "acl-1".into(),
        user_id: "acl-user".into(),
    };
    let evicting = CreateSessionRequest {
        user_id: "acl-user".into(),
        token_id: "acl-2".into(),
        ..Default::default()
    };
    refused_as_internal(client.revoke_session(revoking).await);
    let unchanged = alive(&mut client, "acl-1").await;
    assert!(unchanged, "a refused revoke changed nothing");
    refused_as_internal(client.create_session(evicting).await);
    let unchanged = alive(&mut client, "acl-1").await;
    assert!(unchanged, "a refused eviction changed nothing");
    assert!(!alive(&mut client, "acl-2").await);

    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "app", &format!("&{channel}")])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(revoke(&mut client, "acl-1", "acl-user").await);
    assert!(!alive(&mut client, "acl-1").await);
    server.shutdown().await;
}

/// A user-wide revocation's `revoked_at` covers every session it ended, even
/// one whose `created_at` is later than the revoking master's clock (created
/// by a master whose clock ran ahead, before a failover): receivers that drop
/// sessions created at or before it drop that one too.
#[tokio::test]
async fn a_user_wide_revocation_covers_sessions_from_a_clock_ahead() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = create_at(&mut client, "clock-user", "clock-t").await;
    let key = format!(
        "{}session:{{clock-user}}:{{clock-t}}",
        server.config.key_prefix
    );
    let json: String = inspect(&server.config, redis::cmd("GET").arg(&key)).await;
    let ahead = created + 5_000;
    let moved = json.replace(
        &format!("\"created_at_ms\":{created}"),
        &format!("\"created_at_ms\":{ahead}"),
    );
    assert_ne!(moved, json);
    let () = inspect(
        &server.config,
        redis::cmd("SET").arg(&key).arg(&moved).arg("KEEPTTL"),
    )
    .await;

    let mut stream = watching(&mut client).await;
    assert_eq!(revoke_all(&mut client, "clock-user").await, 1);
    let seen = revocations(&mut stream, 1).await;
    assert_eq!(seen[0].token_id, "");
    assert!(
        millis(&seen[0]) >= ahead,
        "revoked_at {} is before the session's created_at {ahead}",
        millis(&seen[0])
    );
    drop(stream);
    server.shutdown().await;
}

/// Every reset and heartbeat carries Redis's clock (`redis_time`), within a
/// second of what `TIME` answers around it and never going back, including
/// while heartbeats of other server versions arrive on the channel (a
/// rolling upgrade: `h:<id>`, `h:<id>:<seq>`, `h:<id>:<seq>:<index>`), and
/// when someone else who may PUBLISH copies the server's own heartbeat id
/// with a time an hour back. A private standalone Redis, so that one
/// PUBLISH is a whole beat.
#[tokio::test]
async fn resets_and_heartbeats_carry_redis_clock() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| c.revocation_heartbeat_ms = 100).await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client).await;
    let mut conn = redis.connection().await;
    let timer = conn.clone();
    let redis_time = || {
        let mut conn = timer.clone();
        async move {
            let (seconds, micros): (u64, u64) =
                redis::cmd("TIME").query_async(&mut conn).await.unwrap();
            std::time::UNIX_EPOCH + Duration::from_micros(seconds * 1_000_000 + micros)
        }
    };
    let clock = |message: &WatchRevocationsResponse| {
        std::time::SystemTime::try_from(
            message
                .redis_time
                .unwrap_or_else(|| panic!("no redis_time on {message:?}")),
        )
        .unwrap()
    };
    let second = Duration::from_secs(1);
    let before = redis_time().await;
    let first = next_within(&mut stream, PATIENCE).await.expect("a reset");
    let after = redis_time().await;
    assert!(first.reset);
    let mut last = clock(&first);
    assert!(
        last + second >= before && last <= after + second,
        "{last:?} not within {before:?}..{after:?}"
    );

    // The server's own heartbeat, as anyone subscribed sees it.
    let channel = format!("{}revocations", server.config.key_prefix);
    let mut spy = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    spy.subscribe(&channel).await.unwrap();
    let own: String = tokio::time::timeout(PATIENCE, spy.on_message().next())
        .await
        .expect("a heartbeat on the channel")
        .unwrap()
        .get_payload()
        .unwrap();
    let mut parts = own.split(':');
    let (id, seq) = (parts.nth(1).unwrap(), parts.next().unwrap());
    let seq: u64 = seq.parse().unwrap();
    assert_eq!(
        own.split(':').count(),
        5,
        "h:<id>:<seq>:<index>:<ms>: {own}"
    );
    let an_hour_ago = (before - Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut beats = vec![
        "h:00000000000000aa".to_owned(),
        "h:00000000000000aa:7".to_owned(),
        "h:00000000000000aa:7:0".to_owned(),
        format!("h:00000000000000aa:7:0:{an_hour_ago}"),
    ];
    // Beats of the server's own id, ahead of its sequence, an hour back.
    beats.extend((1..=5).map(|k| format!("h:{id}:{}:0:{an_hour_ago}", seq + k)));
    for beat in &beats {
        let _receivers: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(beat)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for _ in 0..10 {
        let before = redis_time().await;
        let message = next_within(&mut stream, PATIENCE)
            .await
            .expect("a heartbeat");
        let after = redis_time().await;
        assert!(!message.reset, "{message:?}");
        let now = clock(&message);
        assert!(now >= last, "went back from {last:?} to {now:?}");
        assert!(
            now + second >= before && now <= after + second,
            "{now:?} not within {before:?}..{after:?}"
        );
        last = now;
    }
    server.shutdown().await;
}

/// Pub/sub ignores database numbers: two deployments on one Redis in
/// databases 1 and 2 with the same KEY_PREFIX get separate channels, so one's
/// stream never carries the other's revocations.
#[tokio::test]
async fn deployments_in_other_databases_have_their_own_channel() {
    let redis = PrivateRedis::start();
    let prefix = crate::support::unique_prefix();
    let mut a = config_on(&redis);
    a.redis_url = format!("{}/1", redis.url());
    a.key_prefix = prefix.clone();
    let mut b = config_on(&redis);
    b.redis_url = format!("{}/2", redis.url());
    b.key_prefix = prefix;
    let server_a = TestServer::start_with(a).await;
    let server_b = TestServer::start_with(b).await;
    let mut client_a = server_a.client().await;
    let mut client_b = server_b.client().await;
    let mut stream = watch(&mut client_a).await;
    started(&mut stream).await;

    create_at(&mut client_b, "db-user", "db-b").await;
    assert!(revoke(&mut client_b, "db-b", "db-user").await);
    create_at(&mut client_a, "db-user", "db-a").await;
    assert!(revoke(&mut client_a, "db-a", "db-user").await);
    let seen = revocations(&mut stream, 1).await;
    assert_eq!(seen[0].token_id, "db-a", "{seen:?}");
    drop(stream);
    server_a.shutdown().await;
    server_b.shutdown().await;
}

/// Asserts a call was refused with INTERNAL.
fn refused_as_internal<T: std::fmt::Debug>(answer: Result<tonic::Response<T>, tonic::Status>) {
    let status = answer.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
}
