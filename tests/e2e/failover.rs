//! Failover on Redis Cluster and Sentinel: a master is killed mid-run; once a
//! replica is promoted, calls succeed again without restarting the server, and
//! every acknowledged session and revocation that reached the replica survives;
//! a revocation stream opened before the failover carries revocations made after it.

use std::time::Duration;

use session_server::store::RedisMode;
use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, GetUserSessionCountRequest, RevokeSessionRequest,
    WatchRevocationsRequest, WatchRevocationsResponse, session_store_client::SessionStoreClient,
};
use tokio_stream::StreamExt;
use tonic::{Streaming, transport::Channel};

use crate::support::{
    TestServer, Topology, count, create, get, redis_cli, revoke, stream_starts, wait_until,
};

/// Waits until every replica of the master on `port` has acknowledged all of
/// its writes: what async replication has not shipped, a failover may lose.
async fn wait_for_replication(port: u16) {
    let synced = wait_until(Duration::from_secs(10), || async move {
        let info = redis_cli(port, &["info", "replication"]);
        let master_offset = info
            .lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .map(|v| v.trim().to_string());
        let replicas: Vec<&str> = info.lines().filter(|l| l.starts_with("slave")).collect();
        !replicas.is_empty()
            && replicas.iter().all(|line| {
                master_offset
                    .as_deref()
                    .is_some_and(|offset| line.contains(&format!("offset={offset},")))
            })
    })
    .await;
    assert!(synced, "replicas of {port} did not catch up");
}

/// Creates sessions for `users` (three each) and revokes the first of each;
/// returns (live tokens, revoked tokens).
async fn write_sessions(
    client: &mut SessionStoreClient<Channel>,
    users: &[String],
) -> (Vec<String>, Vec<String>) {
    let (mut live, mut revoked) = (Vec::new(), Vec::new());
    for user in users {
        for i in 0..3 {
            let token = format!("{user}-t{i}");
            let created = create(client, user, &token).await;
            assert!(created.created);
            live.push(token);
        }
        let first = live.remove(live.len() - 3);
        assert!(revoke(client, &first, "").await);
        revoked.push(first);
    }
    (live, revoked)
}

async fn assert_survived(
    client: &mut SessionStoreClient<Channel>,
    users: &[String],
    live: &[String],
    revoked: &[String],
) {
    for token in live {
        let found = get(client, token, "").await;
        assert!(found.is_some(), "acknowledged session {token} was lost");
    }
    for token in revoked {
        let found = get(client, token, "").await;
        assert!(
            found.is_none(),
            "acknowledged revocation of {token} was lost"
        );
    }
    for user in users {
        assert_eq!(count(client, user).await, 2, "{user}");
    }
}

/// A server on a topology, a revocation stream opened on it, and what was
/// written before the failover: the tokens left live and those revoked.
struct Written {
    server: TestServer,
    client: SessionStoreClient<Channel>,
    stream: Streaming<WatchRevocationsResponse>,
    live: Vec<String>,
    revoked: Vec<String>,
}

impl Written {
    /// Starts a server on `topology` in `mode`, opens a revocation stream,
    /// and writes sessions for `users` (see [`write_sessions`]).
    async fn on(topology: &Topology, mode: RedisMode, users: &[String]) -> Self {
        let server = TestServer::start_with(topology.config(mode)).await;
        let mut client = server.client().await;
        let stream = watch(&mut client).await;
        let (live, revoked) = write_sessions(&mut client, users).await;
        Self {
            server,
            client,
            stream,
            live,
            revoked,
        }
    }

    /// Once calls for `users` succeed again after the failover: every
    /// acknowledged session and revocation survived, and writes go to the
    /// promoted replica.
    async fn survived(&mut self, users: &[String]) {
        wait_for_recovery(&self.client, users).await;
        let (live, revoked) = (&self.live, &self.revoked);
        assert_survived(&mut self.client, users, live, revoked).await;
        let created = create(&mut self.client, &users[0], "after-failover").await;
        assert!(created.created, "writes go to the promoted replica");
    }
}

/// Opens a revocation stream and waits for its opening reset.
async fn watch(client: &mut SessionStoreClient<Channel>) -> Streaming<WatchRevocationsResponse> {
    let mut stream = client
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.reset);
    stream
}

/// Creates the session `request` asks for, then revokes it; both must
/// succeed.
async fn create_and_revoke(
    client: &mut SessionStoreClient<Channel>,
    request: CreateSessionRequest,
) {
    let revoke = RevokeSessionRequest {
        token_id: request.token_id.clone(),
        user_id: request.user_id.clone(),
    };
    let created = client.create_session(request).await.unwrap().into_inner();
    assert!(created.created, "{created:?}");
    let revoked = client.revoke_session(revoke).await.unwrap().into_inner();
    assert!(revoked.revoked);
}

/// Revokes fresh sessions of `user` and reads `stream` until a revocation
/// arrives. A revocation may be missed only with a reset after it (the server
/// subscribed again, possibly after it was published; a reset proven before
/// the revocation was sent, still waiting in the stream, does not count):
/// then another is made. Silence (no revocation, no reset within two
/// minutes) fails the test.
async fn revocation_arrives(
    client: &mut SessionStoreClient<Channel>,
    stream: &mut Streaming<WatchRevocationsResponse>,
    user: &str,
    token: &str,
) {
    for attempt in 0..10 {
        let token = format!("{token}-{attempt}");
        let sent = std::time::SystemTime::now();
        create_and_revoke(
            client,
            CreateSessionRequest {
                user_id: user.into(),
                token_id: token.clone(),
                ..Default::default()
            },
        )
        .await;
        let returned = std::time::SystemTime::now();
        // Around a failover the masters change: only a reset excuses a
        // missing revocation, whenever it comes.
        match revocation_or_reset(stream, &token, sent..returned, || true).await {
            Ok("arrived") => return,
            Ok(_) => continue,
            Err(why) => panic!("the revocation of {token}: {why}"),
        }
    }
    panic!("ten resets in a row: the subscription never settled");
}

/// After what a test did to the deployment: a revocation of `user`'s made
/// now reaches `stream` (or is excused by a reset, see
/// [`revocation_arrives`]), and the server still runs.
async fn revocations_still_arrive(
    server: &TestServer,
    client: &mut SessionStoreClient<Channel>,
    stream: &mut Streaming<WatchRevocationsResponse>,
    user: &str,
) {
    revocation_arrives(client, stream, user, &format!("{user}-revoked")).await;
    assert!(server.is_running());
}

/// Reads `stream` until a reset arrives: the server subscribed again; fails
/// saying `why` one was expected when none comes within 30 s.
async fn reset_arrives(stream: &mut Streaming<WatchRevocationsResponse>, why: &str) {
    let reset = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = stream.next().await {
            if message.expect("the stream outlives the failover").reset {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(reset, Ok(true), "no reset after {why}");
}

/// Waits until a read of every user succeeds again after a failover.
async fn wait_for_recovery(client: &SessionStoreClient<Channel>, users: &[String]) {
    let recovered = wait_until(Duration::from_secs(30), || {
        let mut client = client.clone();
        let users = users.to_vec();
        async move {
            for user in users {
                let ok = client
                    .get_user_session_count(GetUserSessionCountRequest { user_id: user })
                    .await
                    .is_ok();
                if !ok {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(recovered, "calls did not succeed again after the failover");
}

/// Redis Cluster: the master holding some users' slots is killed; after its
/// replica takes over, the same server serves those users again and nothing
/// replicated is lost.
#[tokio::test]
async fn cluster_master_failover() {
    let cluster = Topology::start("cluster");
    let users: Vec<String> = (0..12).map(|i| format!("fo-user-{i}")).collect();
    let mut written = Written::on(&cluster, RedisMode::Cluster, &users).await;

    // The master serving slot of the first user's keys.
    let seed = cluster.ports()[0];
    let victim = master_of(seed, &users[0]);
    let nodes = redis_cli(seed, &["cluster", "nodes"]);
    for line in nodes.lines().filter(|l| l.contains("master")) {
        let port: u16 = line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .split(['@', ':'])
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        wait_for_replication(port).await;
    }

    cluster.kill(victim);
    written.survived(&users).await;
    // Revocations made on the promoted replica reach the stream opened before
    // the failover (through a new subscription, announced by a reset, when
    // the killed master held it).
    let Written { client, stream, .. } = &mut written;
    revocation_arrives(client, stream, &users[0], "revoked-after-failover").await;
    assert!(written.server.is_running());
}

/// Redis Cluster: a graceful failover (`CLUSTER FAILOVER` on a replica)
/// leaves the old master running, as a replica. It still takes PUBLISH, and
/// redis-rs, which learns of a failover only from a redirect, still lists it
/// as a master while no call touches its slots, as here. The heartbeats find
/// out instead (a beat is published only by a node that is a master now), and
/// the stream subscribes again on the new masters, announced by a reset: a
/// subscription on the demoted node hears the new master's revocations only
/// second-hand, over the cluster bus, so its beats must not vouch for it.
/// Before the role check the beats went on through the demoted node and no
/// reset came.
#[tokio::test]
async fn cluster_graceful_failover_moves_the_subscription_to_the_new_master() {
    let cluster = Topology::start("cluster");
    let seed = cluster.ports()[0];
    let user = "graceful-failover-user";
    let server = TestServer::start_with(cluster.config(RedisMode::Cluster)).await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, Duration::from_secs(10)).await;

    let old = master_of(seed, user);
    let new = replica_of(seed, old);
    wait_for_replication(old).await;
    assert_eq!(redis_cli(new, &["cluster", "failover"]).trim(), "OK");
    let promoted = wait_until(Duration::from_secs(20), || async move {
        try_master_of(seed, user) == Some(new)
    })
    .await;
    assert!(promoted, "the replica on {new} was not promoted");

    reset_arrives(&mut stream, "the subscription's master was demoted").await;
    revocations_still_arrive(&server, &mut client, &mut stream, user).await;
}

/// Redis Cluster with a Redis user that may not run `INFO` (it is in
/// `@dangerous`, so `+@all -@dangerous` users lack it): the heartbeats'
/// role check cannot ask, and the beats are published unchecked, as before
/// the check existed, instead of failing: the stream starts and carries
/// revocations (README, "Redis requirements").
#[tokio::test]
async fn cluster_stream_works_for_a_redis_user_without_info() {
    let cluster = Topology::start("cluster");
    for port in cluster.ports() {
        let user = [
            "acl",
            "setuser",
            "app",
            "on",
            ">app-secret",
            "~*",
            "&*",
            "+@all",
            "-info",
        ];
        assert_eq!(redis_cli(port, &user).trim(), "OK", "on {port}");
    }
    let mut config = cluster.config(RedisMode::Cluster);
    config.redis_url = config
        .redis_url
        .replace("redis://", "redis://app:app-secret@");
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, Duration::from_secs(15)).await;
    revocations_still_arrive(&server, &mut client, &mut stream, "no-info-user").await;
}

/// Sentinel: the master is killed; once the sentinels promote the replica, the
/// same server reconnects to the new master by itself and nothing replicated
/// is lost.
#[tokio::test]
async fn sentinel_master_failover() {
    let sentinel = Topology::start("sentinel");
    let users: Vec<String> = (0..4).map(|i| format!("sf-user-{i}")).collect();
    let mut written = Written::on(&sentinel, RedisMode::Sentinel, &users).await;
    let master: u16 = sentinel.env["TEST_REDIS_MASTER_PORT"].parse().unwrap();
    wait_for_replication(master).await;

    sentinel.kill(master);
    written.survived(&users).await;
    // The subscription was on the killed master: the server subscribes to the
    // promoted one and says so with a reset (what was published before it may
    // be missed); revocations after it arrive.
    let Written { client, stream, .. } = &mut written;
    reset_arrives(stream, "the subscription's node died").await;
    revocation_arrives(client, stream, &users[0], "revoked-after-failover").await;
    assert!(written.server.is_running());
}

/// The port of the master that serves the slot of hash tag `tag`, as the
/// cluster node on `seed` sees it.
fn master_of(seed: u16, tag: &str) -> u16 {
    try_master_of(seed, tag).expect("a master owns the slot")
}

/// [`master_of`], or None while no healthy master is listed for the slot (as
/// during a failover).
fn try_master_of(seed: u16, tag: &str) -> Option<u16> {
    let slot: u16 = redis_cli(seed, &["cluster", "keyslot", tag])
        .trim()
        .parse()
        .unwrap();
    redis_cli(seed, &["cluster", "nodes"])
        .lines()
        .filter(|line| line.contains("master") && !line.contains("fail"))
        .find(|line| {
            line.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                (lo.parse::<u16>().unwrap_or(u16::MAX)..=hi.parse().unwrap_or(0)).contains(&slot)
            })
        })
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|addr| addr.split(['@', ':']).nth(1))
        .map(|port| port.parse().unwrap())
}

/// Redis Cluster, #21: a day-long replay of a revoked token while the user's
/// master is stopped and the token's master answers; the stopped master is
/// then killed and its replica promoted, so whatever the replay sent it never
/// runs. The token's reservation must not outlive the revocation marker on
/// the promoted replica, and the token stays revoked. On the old protocol the
/// claim on the token's master ran first and lengthened the reservation to a
/// day while the marker kept about a minute.
#[tokio::test]
async fn cluster_replay_cut_off_by_the_users_master_failing_leaves_the_token_revoked() {
    let cluster = Topology::start("cluster");
    let mut config = cluster.config(RedisMode::Cluster);
    config.session_ttl_max = 86_400;
    let prefix = config.key_prefix.clone();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let all = cluster.ports();
    let user = "halt-user";
    let user_master = master_of(all[0], user);
    let token = (0..)
        .map(|i| format!("halt-token-{i}"))
        .find(|token| master_of(all[0], token) != user_master)
        .unwrap();
    let token_master = master_of(all[0], &token);
    let request = |seconds| CreateSessionRequest {
        user_id: user.into(),
        token_id: token.clone(),
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    create_and_revoke(&mut client, request(2)).await;
    wait_for_replication(user_master).await;

    let stopped = Stopped::node(user_master);
    let replay = client.create_session(request(86_400)).await;
    assert!(replay.is_err(), "{replay:?}");
    cluster.kill(user_master);
    drop(stopped);
    wait_for_recovery(&client, &[user.to_owned()]).await;

    // The surviving nodes may not all list the promoted replica as master yet.
    let alive = all.iter().copied().find(|p| *p != user_master).unwrap();
    let mut new_master = None;
    let promoted = wait_until(Duration::from_secs(30), || {
        new_master = try_master_of(alive, user).filter(|port| *port != user_master);
        std::future::ready(new_master.is_some())
    })
    .await;
    assert!(promoted, "no node lists a new master for the user's slot");
    let new_master = new_master.unwrap();
    let pttl = |port: u16, key: String| -> i64 {
        redis_cli(port, &["pttl", &key]).trim().parse().unwrap()
    };
    let reservation = pttl(token_master, format!("{prefix}token_owner:{{{token}}}"));
    let marker = pttl(
        new_master,
        format!("{prefix}revoked:{{{user}}}:{{{token}}}"),
    );
    eprintln!("reservation {reservation} ms, marker {marker} ms");
    assert!(marker > 0, "no marker: {marker}");
    assert!(
        marker >= reservation,
        "the marker ({marker} ms) ends before the reservation ({reservation} ms)"
    );
    let replay = client
        .create_session(request(86_400))
        .await
        .unwrap()
        .into_inner();
    assert!(!replay.created, "{replay:?}");
    assert_eq!(
        replay.outcome,
        sessionstore::v1::CreateOutcome::TokenRevoked as i32
    );
}

/// A comma-separated URL list of `first`, then the other ports.
fn seeds_starting_with(first: u16, all: &[u16]) -> String {
    std::iter::once(first)
        .chain(all.iter().copied().filter(|p| *p != first))
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A process stopped with SIGSTOP, continued when dropped (also on panic).
struct Stopped(String);

impl Stopped {
    fn node(port: u16) -> Self {
        let pid = redis_cli(port, &["info", "server"])
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .unwrap()
            .trim()
            .to_owned();
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap();
        assert!(stopped.success());
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// Cluster: the bus from one master to the subscription's node drops
/// messages (a partial partition: that node FORGETs the master, and ignores
/// its PUBLISH frames for a minute). Heartbeats go through every master, so
/// the stream stops beating and the server subscribes elsewhere, with a
/// reset; revocations made on the cut-off master after that arrive. Before,
/// every beat went through one master and the stream beat on while that
/// master's revocations were lost.
#[tokio::test]
async fn cluster_partition_from_one_master_stops_the_beat() {
    let cluster = Topology::start("cluster");
    let all = cluster.ports();
    let role = |port: u16| redis_cli(port, &["role"]);
    let masters: Vec<u16> = all
        .iter()
        .copied()
        .filter(|p| role(*p).starts_with("master"))
        .collect();
    let slot_of = |name: &str| -> u16 {
        redis_cli(masters[0], &["cluster", "keyslot", name])
            .trim()
            .parse()
            .unwrap()
    };
    let nodes = redis_cli(masters[0], &["cluster", "nodes"]);
    let owner = |slot: u16| -> u16 {
        nodes
            .lines()
            .filter(|line| line.contains("master"))
            .find(|line| {
                line.split_whitespace().skip(8).any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    (lo.parse().unwrap_or(u16::MAX)..=hi.parse().unwrap_or(0)).contains(&slot)
                })
            })
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|addr| addr.split(['@', ':']).nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut config = cluster.config(RedisMode::Cluster);
    // Cut off a master that does not own the channel name's slot: a PUBLISH
    // routed by the channel name never goes through it.
    let channel_owner = owner(slot_of(&format!("{}revocations", config.key_prefix)));
    let cut_off = *masters.iter().find(|m| **m != channel_owner).unwrap();
    // The subscription's node: a replica of another master.
    let subscriber = *all
        .iter()
        .find(|p| role(**p).starts_with("slave") && !role(**p).contains(&format!("\n{cut_off}\n")))
        .expect("a replica of another master");
    config.redis_url = seeds_starting_with(subscriber, &all);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, Duration::from_secs(10)).await;

    let id = redis_cli(cut_off, &["cluster", "myid"]).trim().to_owned();
    assert!(redis_cli(subscriber, &["cluster", "forget", &id]).starts_with("OK"));
    // A user whose sessions live on the cut-off master.
    let user = (0..)
        .map(|n| format!("cut-{n}"))
        .find(|user| owner(slot_of(user)) == cut_off)
        .unwrap();
    revocation_arrives(&mut client, &mut stream, &user, "cut-off").await;
    assert!(server.is_running());
}

/// Cluster: the first seed leaves the cluster but keeps running (CLUSTER RESET
/// and FORGET): it still accepts the subscription, but no heartbeat comes back
/// through it, so no reset is announced for it; the server moves on to the
/// next seed, and revocations flow.
#[tokio::test]
async fn cluster_seed_removed_from_the_cluster_is_left_behind() {
    let cluster = Topology::start("cluster");
    let all = cluster.ports();
    let removed = *all
        .iter()
        .find(|p| redis_cli(**p, &["role"]).starts_with("slave"))
        .expect("a replica");
    let mut config = cluster.config(RedisMode::Cluster);
    config.redis_url = seeds_starting_with(removed, &all);
    let id = redis_cli(removed, &["cluster", "myid"]).trim().to_owned();
    assert!(redis_cli(removed, &["cluster", "reset", "hard"]).starts_with("OK"));
    for port in all.iter().filter(|p| **p != removed) {
        redis_cli(*port, &["cluster", "forget", &id]);
    }
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, Duration::from_secs(20)).await;
    // Proven: heartbeats follow the reset.
    let beat = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a heartbeat")
        .unwrap()
        .unwrap();
    assert!(!beat.reset && beat.revocations.is_empty(), "{beat:?}");
    revocation_arrives(&mut client, &mut stream, "left-behind", "left").await;
}

/// Sentinel: the first sentinel hangs (SIGSTOP: it accepts connections and
/// never answers). Each sentinel gets its own timeout and the next attempt
/// starts from the next one, so the stream still starts.
#[tokio::test]
async fn sentinel_hung_first_sentinel_is_skipped() {
    let sentinel = Topology::start("sentinel");
    let config = sentinel.config(RedisMode::Sentinel);
    let first = sentinel.ports()[0];
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    client
        .get_user_session_count(GetUserSessionCountRequest {
            user_id: "hung".into(),
        })
        .await
        .unwrap();
    let _hung = Stopped::node(first);
    let mut stream = stream_starts(&mut client, Duration::from_secs(15)).await;
    revocation_arrives(&mut client, &mut stream, "hung-user", "hung").await;
}

/// Cluster: a PUBLISH that crosses the cluster bus while a link reconnects is
/// lost without any client connection breaking (Redis drops the link's
/// pending messages). The server subscribes on every master, so each
/// master's revocations reach it over that master's own connection: a
/// revocation made right as every bus link is cut still arrives, or a reset
/// says it may not (before, it was lost with the stream beating on).
#[tokio::test]
async fn cluster_bus_link_reconnects_lose_no_revocation() {
    let cluster = Topology::start("cluster");
    let all = cluster.ports();
    let ids: Vec<String> = all
        .iter()
        .map(|p| redis_cli(*p, &["cluster", "myid"]).trim().to_owned())
        .collect();
    let server = TestServer::start_with(cluster.config(RedisMode::Cluster)).await;
    let mut client = server.client().await;
    let mut stream = stream_starts(&mut client, Duration::from_secs(10)).await;
    let mut lost = Vec::new();
    let mut tested = 0;
    for round in 0..3 {
        let (user, token) = (format!("blip-user-{round}"), format!("blip-{round}"));
        // The previous round's cut may still make the cluster refuse briefly.
        let created = wait_until(Duration::from_secs(10), || {
            let mut client = client.clone();
            let (user, token) = (user.clone(), token.clone());
            async move {
                client
                    .create_session(CreateSessionRequest {
                        user_id: user,
                        token_id: token,
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|created| {
                        let created = created.into_inner();
                        created.created
                            || created.outcome
                                == sessionstore::v1::CreateOutcome::AlreadyExists as i32
                    })
            }
        })
        .await;
        if !created {
            // Cutting links again and again can leave redis-rs's cluster
            // connection timing out for a while: not what this test is about.
            continue;
        }
        tested += 1;
        let before = masters_of(all[1]);
        // Every other node drops its bus link to the first seed (where a
        // subscription on one node would be), all at once; the links
        // reconnect within about 100 ms.
        let kills: Vec<_> = all
            .iter()
            .skip(1)
            .map(|port| {
                std::process::Command::new("redis-cli")
                    .args([
                        "-p",
                        &port.to_string(),
                        "debug",
                        "clusterlink",
                        "kill",
                        "to",
                        &ids[0],
                    ])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // A node may have no such link at that instant: not a failure.
        for mut cli in kills {
            cli.wait().unwrap();
        }
        let sent = std::time::SystemTime::now();
        let Ok(revoked) = client
            .revoke_session(RevokeSessionRequest {
                token_id: token.clone(),
                user_id: user.clone(),
            })
            .await
        else {
            continue; // the cluster refused for a moment: nothing was revoked
        };
        assert!(revoked.into_inner().revoked);
        let returned = std::time::SystemTime::now();
        let failed_over = || masters_of(all[1]) != before;
        if let Err(why) =
            revocation_or_reset(&mut stream, &token, sent..returned, failed_over).await
        {
            lost.push(format!("{token}: {why}"));
        }
    }
    assert!(tested > 0, "no round could create its session");
    assert!(lost.is_empty(), "lost: {lost:?}");
}

/// Reads `stream` after a revocation of `token` sent and returned within
/// `made` until it arrives or a reset says it may have been missed: `Ok`
/// with which. A reset counts only if its subscription was proven after the
/// revocation was sent (its Redis time is later): one proven before, still
/// waiting in the stream, says the revocation comes on that subscription.
/// A heartbeat whose Redis time is 2 s past the return is an `Err`:
/// that beat was published on every master after the revocation (a round of
/// beats takes at most the 500 ms Redis timeout, and the nodes share this
/// host's clock) and came back over each master's own connection, which
/// would have carried the revocation first, so the stream beats on without
/// it. Unless `failed_over()`: a replica promoted meanwhile (the cut links
/// can outlast the 1 s node timeout on a loaded machine) may have made the
/// revocation outside the masters the server subscribed on, and beats to
/// the demoted one complete until the server sees the change at its next
/// beat; then only a reset answers. Judged by Redis's clock, not by how
/// long a loaded machine takes: a lost subscription may take many seconds
/// to come back, and its reset is a correct answer whenever it comes. The
/// stream ending, or two minutes with neither, is an `Err` too.
async fn revocation_or_reset(
    stream: &mut Streaming<WatchRevocationsResponse>,
    token: &str,
    made: std::ops::Range<std::time::SystemTime>,
    failed_over: impl Fn() -> bool,
) -> Result<&'static str, String> {
    let started = std::time::Instant::now();
    let past = made.end + Duration::from_secs(2);
    let judged = tokio::time::timeout(Duration::from_secs(120), async {
        let mut beats = 0;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|status| format!("the stream failed: {status}"))?;
            if message.revocations.iter().any(|r| r.token_id == token) {
                return Ok("arrived");
            }
            let at = message
                .redis_time
                .and_then(|at| std::time::SystemTime::try_from(at).ok());
            if message.reset && at.is_none_or(|at| at > made.start) {
                return Ok("reset");
            }
            beats += 1;
            if at.is_some_and(|at| at > past) && !failed_over() {
                return Err(format!(
                    "a heartbeat {:?} after the revocation returned (message {beats} \
                     since, {:?} later) came without it or a reset",
                    at.and_then(|at| at.duration_since(made.end).ok()),
                    started.elapsed()
                ));
            }
        }
        Err("the stream ended".to_owned())
    })
    .await;
    judged.unwrap_or_else(|_| Err("neither the revocation nor a reset in 120 s".to_owned()))
}

/// The cluster's masters as the node on `port` sees them (their ids, sorted).
fn masters_of(port: u16) -> Vec<String> {
    let mut masters: Vec<String> = redis_cli(port, &["cluster", "nodes"])
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|flag| flag == "master"))
        })
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    masters.sort();
    masters
}

/// Writes 1 MiB values to the master on `master` until its output buffer
/// for its (stopped) replica holds megabytes the kernel's socket buffers
/// could not take (`omem` of the replica's `CLIENT LIST` line, past 2 MiB):
/// whatever the master writes after that stays in its memory, and a SIGKILL
/// loses it. Stopping the replica alone loses nothing: the socket buffers
/// hold megabytes of replication stream, and a resumed replica applies it.
/// Nor is `omem > 0` enough: on Redis 7.0 it counts the shared replication
/// buffer's current block (tens of KiB) while the socket still takes
/// writes; past ~3 MiB written it grows by each write's size.
///
/// The keys are in the slot of hash tag `tag`, which `master` serves.
async fn fill_replication_link(master: u16, tag: &str) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{master}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let junk = vec![b'x'; 1 << 20];
    for i in 0..256 {
        let _: () = redis::cmd("SET")
            .arg(format!("replication-filler:{{{tag}}}:{i}"))
            .arg(&junk)
            .query_async(&mut conn)
            .await
            .unwrap();
        let replica_omem = redis_cli(master, &["client", "list", "type", "replica"])
            .split_whitespace()
            .find_map(|field| field.strip_prefix("omem="))
            .and_then(|omem| omem.parse::<u64>().ok())
            .unwrap_or(0);
        if replica_omem > 2 << 20 {
            return;
        }
    }
    panic!("256 MiB written and the replica's link never backed up into the master");
}

/// A RevokeSession's answer: OK (with whether a session was live) or the
/// status.
async fn try_revoke(
    client: &mut SessionStoreClient<Channel>,
    token: &str,
) -> Result<bool, tonic::Status> {
    client
        .revoke_session(RevokeSessionRequest {
            token_id: token.into(),
            user_id: String::new(),
        })
        .await
        .map(|answer| answer.into_inner().revoked)
}

/// Whether `token` is live, and what a replayed CreateSession of it answers.
async fn after_failover(
    client: &mut SessionStoreClient<Channel>,
    user: &str,
    token: &str,
) -> (bool, i32) {
    let live = client
        .get_session(GetSessionRequest {
            token_id: token.into(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .is_some();
    let replay = create(client, user, token).await;
    (live, replay.outcome)
}

/// #25, Sentinel: with REVOCATION_MIN_REPLICAS=1, every revocation answered
/// OK survives the master's failover, and those its replica never received
/// answered UNAVAILABLE (see [`acknowledged_revocations_survive`]).
#[tokio::test]
async fn sentinel_revocations_acknowledged_by_a_replica_survive_failover() {
    let sentinel = Topology::start("sentinel");
    let master: u16 = sentinel.env["TEST_REDIS_MASTER_PORT"].parse().unwrap();
    let replica: u16 = sentinel.env["TEST_REDIS_REPLICA_PORT"].parse().unwrap();
    let users = ["rw-safe".to_owned(), "rw-unsafe".to_owned()];
    acknowledged_revocations_survive(&sentinel, RedisMode::Sentinel, &users, (master, replica))
        .await;
}

/// #25, Cluster (3 masters, 3 replicas): the same, with the master that
/// owns both users' slot killed.
#[tokio::test]
async fn cluster_revocations_acknowledged_by_a_replica_survive_failover() {
    let cluster = Topology::start("cluster");
    let seed = cluster.ports()[0];
    let safe = "rc-safe".to_owned();
    let victim = master_of(seed, &safe);
    // A second user on the same master, for the server that does not wait.
    let unsafe_ = (0..)
        .map(|i| format!("rc-unsafe-{i}"))
        .find(|user| master_of(seed, user) == victim)
        .unwrap();
    let replica = replica_of(seed, victim);
    acknowledged_revocations_survive(
        &cluster,
        RedisMode::Cluster,
        &[safe, unsafe_],
        (victim, replica),
    )
    .await;
}

/// The port of the replica of the cluster master on `master`, as the node on
/// `seed` sees it; polled, since a new cluster's nodes learn who replicates
/// whom by gossip, some moments after the topology script returns.
fn replica_of(seed: u16, master: u16) -> u16 {
    let port_of = |line: &str| -> u16 {
        line.split_whitespace()
            .nth(1)
            .and_then(|addr| addr.split(['@', ':']).nth(1))
            .and_then(|port| port.parse().ok())
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    loop {
        let nodes = redis_cli(seed, &["cluster", "nodes"]);
        let replica = nodes
            .lines()
            .find(|line| line.contains("master") && port_of(line) == master)
            .and_then(|line| line.split_whitespace().next())
            .and_then(|id| {
                nodes
                    .lines()
                    .find(|line| {
                        line.contains("slave") && line.split_whitespace().nth(3) == Some(id)
                    })
                    .map(port_of)
            });
        match replica {
            Some(port) => return port,
            None if started.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            None => panic!("no replica of the master on {master} after 20 s:\n{nodes}"),
        }
    }
}

/// #25 on `topology`: `users[0]`'s sessions go through a server with
/// REVOCATION_MIN_REPLICAS=1, `users[1]`'s through one with 0; both users'
/// keys live on the master on `master`, replicated by the one on `replica`.
/// Sessions are created and replicated; a revocation with the replica
/// healthy answers OK (and reaches a near-cache through the revocation
/// stream); then replication is held up (the replica stopped, its link
/// filled until the master buffers for it), and revocations through the
/// first server answer UNAVAILABLE (saying a retry is safe; the retry too)
/// while the second answers OK; the master is SIGKILLed, the replica resumed
/// and promoted. On the new master the first server's OK'd revocations are
/// in force (GetSession finds nothing, a replayed CreateSession answers
/// TOKEN_REVOKED), and the near-cache, after a reset on its stream, answers
/// none of them alive; the second server's is printed: lost.
async fn acknowledged_revocations_survive(
    topology: &Topology,
    mode: RedisMode,
    users: &[String],
    (master, replica): (u16, u16),
) {
    let mut config = topology.config(mode);
    config.revocation_min_replicas = 1;
    config.revocation_replica_timeout_ms = 200;
    config.validate().unwrap();
    let waiting = TestServer::start_with(config.clone()).await;
    config.revocation_min_replicas = 0;
    let not_waiting = TestServer::start_with(config).await;
    let mut safe = waiting.client().await;
    let mut unsafe_ = not_waiting.client().await;
    let cached = session_client::SessionClient::builder(waiting.url())
        .near_cache(100)
        .near_cache_max_staleness(Duration::from_secs(60))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let token = |user: usize, i: usize| format!("{}-t{i}", users[user]);
    for i in 0..4 {
        assert!(create(&mut safe, &users[0], &token(0, i)).await.created);
        assert!(create(&mut unsafe_, &users[1], &token(1, i)).await.created);
    }
    // Once the replica has synced, it acknowledges: OK.
    wait_for_replication(master).await;
    let stats = || cached.near_cache_stats().expect("the near-cache is on");
    assert!(
        wait_until(Duration::from_secs(15), || async { stats().healthy }).await,
        "the near-cache's stream never became healthy"
    );
    for (i, expect) in [(0, true), (3, true)] {
        assert!(cached.get_session(token(0, i)).await.unwrap().is_some());
        assert_eq!(try_revoke(&mut safe, &token(0, i)).await.unwrap(), expect);
    }
    let revoked_ok = [token(0, 0), token(0, 3)];
    assert!(
        wait_until(Duration::from_secs(15), || async {
            stats().revocations_applied >= 2
        })
        .await,
        "the near-cache never heard of the revocations: {:?}",
        stats()
    );
    wait_for_replication(master).await;

    let held = Stopped::node(replica);
    fill_replication_link(master, &users[0]).await;
    let started = std::time::Instant::now();
    let refused = try_revoke(&mut safe, &token(0, 1)).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("applied on the Redis master but not yet replicated")
            && refused.message().contains("retrying is safe"),
        "{}",
        refused.message()
    );
    // The retry waits again, and is refused again.
    let retried = try_revoke(&mut safe, &token(0, 1)).await.unwrap_err();
    assert_eq!(retried.code(), tonic::Code::Unavailable, "{retried:?}");
    let everything = safe
        .revoke_all_user_sessions(sessionstore::v1::RevokeAllUserSessionsRequest {
            user_id: users[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        everything.code(),
        tonic::Code::Unavailable,
        "{everything:?}"
    );
    assert!(try_revoke(&mut unsafe_, &token(1, 0)).await.unwrap());
    println!("held revocation answered UNAVAILABLE after {waited:?}");
    let resets = stats().resets;

    topology.kill(master);
    drop(held);
    wait_for_recovery(&safe, users).await;
    wait_for_recovery(&unsafe_, users).await;

    for revoked in &revoked_ok {
        let (live, replay) = after_failover(&mut safe, &users[0], revoked).await;
        assert!(!live, "the revocation of {revoked}, answered OK, was lost");
        assert_eq!(
            replay,
            sessionstore::v1::CreateOutcome::TokenRevoked as i32,
            "a replayed create of {revoked}"
        );
    }
    for i in [1, 2] {
        let live = get(&mut safe, &token(0, i), "").await.is_some();
        println!(
            "{} (its revocation answered UNAVAILABLE) live after the failover: {live}",
            token(0, i)
        );
    }
    // The near-cache: a reset on its stream (its server's subscription
    // moved), and no revoked session answered alive.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            stats().resets > resets && stats().healthy
        })
        .await,
        "no reset on the near-cache's stream after the failover: {:?}",
        stats()
    );
    for revoked in &revoked_ok {
        assert_eq!(
            cached.get_session(revoked.clone()).await.unwrap(),
            None,
            "the near-cache answered {revoked} alive"
        );
    }
    let (live, _) = after_failover(&mut unsafe_, &users[1], &token(1, 0)).await;
    if live {
        println!(
            "REVOCATION_MIN_REPLICAS=0: the revocation of {} was answered OK and the failover \
             lost it: the session is live again",
            token(1, 0)
        );
    } else {
        println!(
            "REVOCATION_MIN_REPLICAS=0: the revocation of {} survived this time",
            token(1, 0)
        );
    }
}
