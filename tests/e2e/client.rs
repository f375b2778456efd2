//! The session-client crate end to end: every call against the real server and
//! Redis, each error variant a call can meet, retries counted by a tiny tonic
//! server, load balancing, lazy and eager connection, TLS and mutual TLS.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use session_client::{CreateOutcome, Error, NewSession, SessionClient};
use tokio::net::TcpListener;
use tonic::Code;

use crate::support::{
    Behaviour, Pki, PrivateRedis, Stub, TempFiles, TestServer, error_chain, free_port,
    grpc_timeout, https_url, test_config, wait_until,
};

/// A client of `server` with the defaults.
async fn client_of(server: &TestServer) -> SessionClient {
    SessionClient::connect(server.url()).await.unwrap()
}

fn no_metadata() -> HashMap<String, String> {
    HashMap::new()
}

/// Create, look up and revoke one session: the spec's calls, with domain types.
#[tokio::test]
async fn create_get_and_revoke_speak_domain_types() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let metadata = HashMap::from([
        ("ip".to_string(), "192.0.2.1".to_string()),
        ("device".to_string(), "phone".to_string()),
    ]);

    assert!(
        client
            .create_session("alice", "tok-1", metadata.clone())
            .await
            .unwrap()
    );
    // Offering a token id that already has a live session changes nothing.
    assert!(
        !client
            .create_session("alice", "tok-1", no_metadata())
            .await
            .unwrap()
    );

    let session = client
        .get_session("tok-1")
        .await
        .unwrap()
        .expect("live session");
    assert_eq!(session.user_id, "alice");
    assert_eq!(session.token_id, "tok-1");
    assert_eq!(session.metadata, metadata);
    // The server's default SESSION_TTL, to the millisecond, by Redis's clock.
    assert_eq!(
        session
            .expires_at
            .duration_since(session.created_at)
            .unwrap(),
        Duration::from_secs(server.config.session_ttl)
    );
    assert!(session.created_at > SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000));

    assert_eq!(client.get_session("tok-unknown").await.unwrap(), None);
    assert!(client.revoke_session("tok-1").await.unwrap());
    assert!(!client.revoke_session("tok-1").await.unwrap());
    assert_eq!(client.get_session("tok-1").await.unwrap(), None);
}

/// `create_session_with` sends the ttl and reports the stored session and the
/// sessions evicted to make room, oldest (closest to expiry) first.
#[tokio::test]
async fn create_with_ttl_reports_the_session_and_the_evicted_ids() {
    let server = TestServer::start_tuned(|c| c.max_sessions_per_user = 2).await;
    let client = client_of(&server).await;

    let first = client
        .create_session_with(NewSession::new("bob", "b-1").ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(first.created);
    assert!(first.evicted_token_ids.is_empty());
    let session = first.session.expect("set when created");
    assert_eq!(
        session
            .expires_at
            .duration_since(session.created_at)
            .unwrap(),
        Duration::from_secs(60)
    );

    client
        .create_session_with(NewSession::new("bob", "b-2").ttl(Duration::from_secs(120)))
        .await
        .unwrap();
    let third = client
        .create_session_with(
            NewSession::new("bob", "b-3")
                .metadata("ip", "198.51.100.7")
                .ttl(Duration::from_millis(180_500)),
        )
        .await
        .unwrap();
    assert!(third.created);
    assert_eq!(third.evicted_token_ids, ["b-1"]);
    let session = third.session.unwrap();
    let session_b3 = session.clone();
    assert_eq!(third.outcome, CreateOutcome::Created);
    assert_eq!(session.metadata["ip"], "198.51.100.7");
    assert_eq!(
        session
            .expires_at
            .duration_since(session.created_at)
            .unwrap(),
        Duration::from_millis(180_500)
    );
    assert_eq!(client.get_session("b-1").await.unwrap(), None);

    // A retried create: not created again, the existing session, nothing
    // evicted.
    let again = client
        .create_session_with(NewSession::new("bob", "b-3"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.outcome, CreateOutcome::AlreadyExists);
    assert_eq!(again.session, Some(session_b3));
    assert!(again.evicted_token_ids.is_empty());

    // Another user's token id: refused, and their session never leaks.
    let taken = client
        .create_session_with(NewSession::new("eve", "b-3"))
        .await
        .unwrap();
    assert_eq!(taken.outcome, CreateOutcome::TokenTaken);
    assert_eq!(taken.session, None);

    // A revoked token id is refused for good.
    assert!(client.revoke_session("b-3").await.unwrap());
    let replay = client
        .create_session_with(NewSession::new("bob", "b-3"))
        .await
        .unwrap();
    assert_eq!(replay.outcome, CreateOutcome::TokenRevoked);
    assert!(!replay.created);
    assert_eq!(client.get_session("b-3").await.unwrap(), None);
}

/// The user-id hint finds and revokes only the owner's session.
#[tokio::test]
async fn user_hints_find_and_revoke_only_the_owners_session() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    assert!(
        client
            .create_session("carol", "c-1", no_metadata())
            .await
            .unwrap()
    );

    let found = client.get_user_session("carol", "c-1").await.unwrap();
    assert_eq!(found.map(|s| s.user_id).as_deref(), Some("carol"));
    assert_eq!(
        client.get_user_session("mallory", "c-1").await.unwrap(),
        None
    );

    assert!(!client.revoke_user_session("mallory", "c-1").await.unwrap());
    assert!(client.get_session("c-1").await.unwrap().is_some());
    assert!(client.revoke_user_session("carol", "c-1").await.unwrap());
    assert_eq!(client.get_user_session("carol", "c-1").await.unwrap(), None);
}

/// A lookup that names a user needs one: an empty user id (a JWT without a
/// `sub`) is refused as INVALID_ARGUMENT naming `user_id`, not read as a
/// lookup by token alone, which would answer whoever owns the token; with
/// the near-cache holding the session too. A token alone is looked up with
/// `get_session`.
#[tokio::test]
async fn an_empty_user_is_refused_not_read_as_any_user() {
    let server = TestServer::start().await;
    let plain = client_of(&server).await;
    let cached = SessionClient::builder(server.url())
        .near_cache(100)
        .connect()
        .await
        .unwrap();
    assert!(
        plain
            .create_session("erin", "e-1", no_metadata())
            .await
            .unwrap()
    );
    assert!(
        cached
            .get_user_session("erin", "e-1")
            .await
            .unwrap()
            .is_some()
    );
    for client in [&plain, &cached] {
        let refused = [
            client.get_user_session("", "e-1").await.map(|_| ()),
            client.check_user_session("", "e-1").await.map(|_| ()),
        ];
        for answer in refused {
            let err = answer.expect_err("an empty user is refused");
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert!(err.to_string().contains("user_id"), "{err}");
        }
        assert_eq!(client.with_cached_session("", "e-1", |_| ()), None);
        let alone = client.get_session("e-1").await.unwrap();
        assert_eq!(alone.map(|s| s.user_id).as_deref(), Some("erin"));
    }
}

/// Count and list see exactly the live sessions, newest first; "sign out
/// everywhere" ends them all and says how many.
#[tokio::test]
async fn count_list_and_sign_out_everywhere() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    for token in ["d-1", "d-2", "d-3"] {
        assert!(
            client
                .create_session("dave", token, no_metadata())
                .await
                .unwrap()
        );
    }
    client
        .create_session("erin", "e-1", no_metadata())
        .await
        .unwrap();

    assert_eq!(client.get_user_session_count("dave").await.unwrap(), 3);
    let listed = client.list_user_sessions("dave").await.unwrap();
    let mut tokens: Vec<&str> = listed.iter().map(|s| s.token_id.as_str()).collect();
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at),
        "newest first: {listed:?}"
    );
    assert!(listed.iter().all(|s| s.user_id == "dave"));
    tokens.sort_unstable();
    assert_eq!(tokens, ["d-1", "d-2", "d-3"]);

    assert_eq!(client.revoke_all_user_sessions("dave").await.unwrap(), 3);
    assert_eq!(client.get_user_session_count("dave").await.unwrap(), 0);
    assert!(client.list_user_sessions("dave").await.unwrap().is_empty());
    assert_eq!(client.get_session("d-2").await.unwrap(), None);
    assert_eq!(client.revoke_all_user_sessions("dave").await.unwrap(), 0);
    // Another user's session is untouched.
    assert_eq!(client.get_user_session_count("erin").await.unwrap(), 1);
}

/// Login attempts are counted per address, refused past the limit with a
/// retry-after within the window, and reset.
#[tokio::test]
async fn login_attempts_are_counted_refused_and_reset() {
    let server = TestServer::start_tuned(|c| {
        c.rate_limit_max_attempts = 2;
        c.rate_limit_window = 60;
    })
    .await;
    let client = client_of(&server).await;
    let ip = "203.0.113.9";

    let first = client.record_login_attempt(ip).await.unwrap();
    assert!(first.allowed);
    assert_eq!(
        (first.attempts, first.remaining, first.retry_after),
        (1, 1, None)
    );
    let second = client.record_login_attempt(ip).await.unwrap();
    assert!(second.allowed);
    assert_eq!((second.attempts, second.remaining), (2, 0));
    let third = client.record_login_attempt(ip).await.unwrap();
    assert!(!third.allowed);
    assert_eq!((third.attempts, third.remaining), (3, 0));
    assert_eq!(third.refused_by, Some(session_client::LoginLimit::Address));
    // The window plus at most one bucket (a tenth of it).
    let wait = third.retry_after.expect("set when refused");
    assert!(
        wait > Duration::from_secs(54) && wait <= Duration::from_secs(66),
        "{wait:?}"
    );

    assert!(client.reset_login_attempts(ip).await.unwrap());
    assert!(!client.reset_login_attempts(ip).await.unwrap());
    assert_eq!(client.record_login_attempt(ip).await.unwrap().attempts, 1);

    // With an account: a reset for one's own account keeps the address's
    // attempt for another, and the refusal names the address.
    let other = client
        .record_login_attempt_for(ip, "victim@example.com")
        .await
        .unwrap();
    assert!(other.allowed && other.refused_by.is_none());
    assert_eq!(other.attempts, 2);
    assert!(
        !client
            .reset_login_attempts_for(ip, "me@example.com")
            .await
            .unwrap()
    );
    let refused = client
        .record_login_attempt_for(ip, "me@example.com")
        .await
        .unwrap();
    assert_eq!(
        refused.refused_by,
        Some(session_client::LoginLimit::Address)
    );
    assert!(
        client
            .reset_login_attempts_for(ip, "victim@example.com")
            .await
            .unwrap()
    );
    assert!(
        client
            .record_login_attempt_for(ip, "me@example.com")
            .await
            .unwrap()
            .allowed
    );
}

/// The device-token calls with domain types: a login issues a token, which
/// then counts against its device alone (`device_trusted`) while untrusted
/// attempts are refused by the account, until `forget_login_devices`.
#[tokio::test]
async fn trusted_device_calls_are_typed() {
    let server = TestServer::start_tuned(|c| c.rate_limit_account_max_attempts = 1).await;
    let client = client_of(&server).await;
    let account = "typed@example.com";
    let issued = client
        .reset_login_attempts_with_device("203.0.113.20", account, "", true)
        .await
        .unwrap();
    let token = issued.device_token.clone().expect("a token was asked for");
    assert!(!format!("{issued:?}").contains(&token), "Debug hides it");
    assert!(
        client
            .record_login_attempt_for("203.0.113.21", account)
            .await
            .unwrap()
            .allowed
    );
    let locked = client
        .record_login_attempt_for("203.0.113.22", account)
        .await
        .unwrap();
    assert_eq!(locked.refused_by, Some(session_client::LoginLimit::Account));
    let mine = client
        .record_login_attempt_with_device("203.0.113.22", account, token.as_str())
        .await
        .unwrap();
    assert!(mine.allowed && mine.device_trusted, "{mine:?}");
    // A login from the trusted device replaces its token.
    let renewed = client
        .reset_login_attempts_with_device("203.0.113.22", account, token.as_str(), true)
        .await
        .unwrap();
    assert!(renewed.reset);
    let renewed = renewed.device_token.unwrap();
    assert_ne!(renewed, token);
    assert_eq!(client.forget_login_devices(account).await.unwrap(), 1);
    let forgotten = client
        .record_login_attempt_with_device("203.0.113.23", account, renewed)
        .await
        .unwrap();
    assert!(!forgotten.device_trusted && !forgotten.allowed);
    let bad = client
        .record_login_attempt_with_device("203.0.113.23", account, "not a token")
        .await
        .unwrap_err();
    assert!(
        matches!(bad, session_client::Error::InvalidArgument(_)),
        "{bad:?}"
    );
    assert!(bad.to_string().contains("device_token"), "{bad}");
}

/// A bad value is `Error::InvalidArgument` whose message names the field, for
/// every call.
#[tokio::test]
async fn bad_values_are_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let (bad_user, bad_token) = ("has space", "has:colon");

    let results: Vec<(&str, Result<(), Error>)> = vec![
        (
            "user_id",
            client
                .create_session(bad_user, "t", no_metadata())
                .await
                .map(drop),
        ),
        (
            "token_id",
            client
                .create_session("u", bad_token, no_metadata())
                .await
                .map(drop),
        ),
        (
            "ttl",
            client
                .create_session_with(NewSession::new("u", "t").ttl(Duration::ZERO))
                .await
                .map(drop),
        ),
        (
            "metadata",
            client
                .create_session_with(NewSession::new("u", "t").metadata("", "empty key"))
                .await
                .map(drop),
        ),
        ("token_id", client.get_session(bad_token).await.map(drop)),
        (
            "user_id",
            client.get_user_session(bad_user, "t").await.map(drop),
        ),
        ("token_id", client.revoke_session("").await.map(drop)),
        (
            "user_id",
            client.revoke_user_session(bad_user, "t").await.map(drop),
        ),
        (
            "user_id",
            client.revoke_all_user_sessions(bad_user).await.map(drop),
        ),
        ("user_id", client.get_user_session_count("").await.map(drop)),
        (
            "user_id",
            client.list_user_sessions(bad_user).await.map(drop),
        ),
        (
            "ip",
            client.record_login_attempt("not-an-ip").await.map(drop),
        ),
        (
            "ip",
            client.reset_login_attempts("300.1.1.1").await.map(drop),
        ),
    ];
    for (field, result) in results {
        match result {
            Err(Error::InvalidArgument(err)) => {
                assert!(err.message().contains(field), "{field}: {err:?}");
            }
            other => panic!("{field}: expected InvalidArgument, got {other:?}"),
        }
    }
    // Nothing was stored by the refused create.
    assert_eq!(client.get_session("t").await.unwrap(), None);
}

/// With Redis killed under the server, reads (after their retries) and writes
/// fail with `Error::Unavailable` carrying the server's explanation.
#[tokio::test]
async fn redis_down_is_unavailable() {
    let mut redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| c.redis_timeout_ms = 500).await;
    let client = SessionClient::builder(server.url())
        .initial_backoff(Duration::from_millis(5))
        .connect()
        .await
        .unwrap();
    assert!(
        client
            .create_session("frank", "f-1", no_metadata())
            .await
            .unwrap()
    );

    redis.kill();
    let results: Vec<(&str, Result<(), Error>)> = vec![
        ("get", client.get_session("f-1").await.map(drop)),
        (
            "count",
            client.get_user_session_count("frank").await.map(drop),
        ),
        ("list", client.list_user_sessions("frank").await.map(drop)),
        (
            "create",
            client
                .create_session("frank", "f-2", no_metadata())
                .await
                .map(drop),
        ),
        (
            "revoke all",
            client.revoke_all_user_sessions("frank").await.map(drop),
        ),
        (
            "login",
            client.record_login_attempt("192.0.2.1").await.map(drop),
        ),
    ];
    for (call, result) in results {
        match result {
            Err(Error::Unavailable(status)) => {
                assert!(status.message().contains("redis"), "{call}: {status:?}");
            }
            other => panic!("{call}: expected Unavailable, got {other:?}"),
        }
    }
}

/// A call still unanswered at the client's per-call timeout fails with
/// `Error::DeadlineExceeded`, while the server would still be waiting on a
/// paused Redis (its own Redis timeout is far longer).
#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_timeout_ms = 10_000;
        c.request_timeout_ms = 20_000;
    })
    .await;
    let client = SessionClient::builder(server.url())
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    // Connected, and the server's Redis pool is warm.
    assert!(
        client
            .create_session("gina", "g-1", no_metadata())
            .await
            .unwrap()
    );

    redis.pause(3000).await;

    let read = client.get_session("g-1").await;
    assert!(matches!(read, Err(Error::DeadlineExceeded(_))), "{read:?}");
    let write = client.create_session("gina", "g-2", no_metadata()).await;
    assert!(
        matches!(write, Err(Error::DeadlineExceeded(_))),
        "{write:?}"
    );
}

/// A lazy client is built with no server listening, its calls fail with
/// `Error::Unavailable`, and it connects by itself once the server is up.
#[tokio::test]
async fn a_lazy_client_starts_before_the_server() {
    let port = free_port();
    let client = SessionClient::builder(format!("http://127.0.0.1:{port}"))
        .initial_backoff(Duration::from_millis(5))
        .connect()
        .await
        .expect("lazy: nothing to connect to yet, still built");
    let early = client.get_user_session_count("hank").await;
    assert!(matches!(early, Err(Error::Unavailable(_))), "{early:?}");
    let write = client.revoke_all_user_sessions("hank").await;
    assert!(matches!(write, Err(Error::Unavailable(_))), "{write:?}");

    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let server = TestServer::serve_on(listener, test_config());
    assert!(
        wait_until(Duration::from_secs(10), || async {
            client.get_user_session_count("hank").await.is_ok()
        })
        .await
    );
    assert!(
        client
            .create_session("hank", "h-1", no_metadata())
            .await
            .unwrap()
    );
    server.shutdown().await;
}

/// An eager client fails to connect with `Error::Unavailable` when nothing
/// listens, and connects at once when the server is up.
#[tokio::test]
async fn an_eager_client_connects_before_returning() {
    let eager = async |url: String| SessionClient::builder(url).lazy(false).connect().await;
    let nowhere = eager(format!("http://127.0.0.1:{}", free_port())).await;
    assert!(matches!(nowhere, Err(Error::Unavailable(_))), "{nowhere:?}");

    let server = TestServer::start().await;
    let client = eager(server.url()).await.unwrap();
    assert_eq!(client.get_user_session_count("ivy").await.unwrap(), 0);
}

/// Clones share one channel: concurrent calls through clones of one client all
/// succeed.
#[tokio::test]
async fn clones_share_one_client() {
    let server = TestServer::start().await;
    let client = client_of(&server).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let created = client
                    .create_session(format!("jack-{i}"), format!("j-{i}"), no_metadata())
                    .await?;
                let found = client.get_session(format!("j-{i}")).await?;
                Ok::<_, Error>((created, found.map(|s| s.user_id)))
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (created, owner) = task.await.unwrap().unwrap();
        assert!(created);
        assert_eq!(owner, Some(format!("jack-{i}")));
    }
}

// ---------------------------------------------------------------------------
// Retries, metadata and balancing, observed by a tiny tonic server that counts
// the requests it receives: the real client code over real gRPC, with answers
// the real server cannot be made to give on demand.

/// Reads meeting UNAVAILABLE are attempted `max_attempts` times in all, then
/// fail with `Error::Unavailable`.
#[tokio::test]
async fn reads_are_retried_on_unavailable_until_attempts_run_out() {
    let stub = Stub::start(Behaviour::unavailable_forever()).await;
    let client = stub.client().max_attempts(3).connect().await.unwrap();

    let results: Vec<(&str, Result<(), Error>)> = vec![
        ("GetSession", client.get_session("t").await.map(drop)),
        (
            "GetSession",
            client.get_user_session("u", "t").await.map(drop),
        ),
        (
            "GetUserSessionCount",
            client.get_user_session_count("u").await.map(drop),
        ),
        (
            "ListUserSessions",
            client.list_user_sessions("u").await.map(drop),
        ),
    ];
    for (method, result) in results {
        assert!(
            matches!(result, Err(Error::Unavailable(_))),
            "{method}: {result:?}"
        );
    }
    assert_eq!(stub.calls("GetSession"), 6);
    assert_eq!(stub.calls("GetUserSessionCount"), 3);
    assert_eq!(stub.calls("ListUserSessions"), 3);

    // `max_attempts(1)` turns retries off.
    let once = stub.client().max_attempts(1).connect().await.unwrap();
    assert!(matches!(
        once.get_user_session_count("u").await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(stub.calls("GetUserSessionCount"), 4);
}

/// Writes are sent exactly once, even when the answer is UNAVAILABLE: it may
/// come after the write took effect.
#[tokio::test]
async fn writes_are_never_retried() {
    let stub = Stub::start(Behaviour::unavailable_forever()).await;
    let client = stub.client().max_attempts(5).connect().await.unwrap();

    let results: Vec<Result<(), Error>> = vec![
        client
            .create_session("u", "t", no_metadata())
            .await
            .map(drop),
        client
            .create_session_with(NewSession::new("u", "t2"))
            .await
            .map(drop),
        client.revoke_session("t").await.map(drop),
        client.revoke_user_session("u", "t").await.map(drop),
        client.revoke_all_user_sessions("u").await.map(drop),
        client.record_login_attempt("192.0.2.1").await.map(drop),
        client.reset_login_attempts("192.0.2.1").await.map(drop),
    ];
    for result in results {
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
    assert_eq!(stub.calls("CreateSession"), 2);
    assert_eq!(stub.calls("RevokeSession"), 2);
    assert_eq!(stub.calls("RevokeAllUserSessions"), 1);
    assert_eq!(stub.calls("RecordLoginAttempt"), 1);
    assert_eq!(stub.calls("ResetLoginAttempts"), 1);
}

/// A read that meets UNAVAILABLE twice succeeds on its third attempt, with the
/// answer of that attempt.
#[tokio::test]
async fn a_transient_unavailable_is_ridden_out_by_reads() {
    let stub = Stub::start(Behaviour {
        unavailable_first: 2,
        then: Code::Ok,
    })
    .await;
    let client = stub.client().max_attempts(3).connect().await.unwrap();
    assert_eq!(
        client.get_user_session_count("u").await.unwrap(),
        Stub::COUNT
    );
    assert_eq!(stub.calls("GetUserSessionCount"), 3);
}

/// Only transient failures are retried: other failures of a read (RESOURCE_EXHAUSTED
/// that is not load shedding included) are returned after one attempt, as
/// their own variants.
#[tokio::test]
async fn only_transient_failures_are_retried() {
    for code in [
        Code::InvalidArgument,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::Internal,
    ] {
        let stub = Stub::start(Behaviour {
            unavailable_first: 0,
            then: code,
        })
        .await;
        let client = stub.client().max_attempts(3).connect().await.unwrap();
        let result = client.get_user_session_count("u").await;
        let matched = match (&result, code) {
            (Err(Error::InvalidArgument(err)), Code::InvalidArgument) => err.message() == "stub",
            (Err(Error::Unauthenticated(_)), Code::Unauthenticated) => true,
            // The client's own Code names its variants as tonic's.
            (Err(Error::Other(err)), _) => format!("{:?}", err.code()) == format!("{code:?}"),
            _ => false,
        };
        assert!(
            result.as_ref().is_err_and(|e| !e.is_retryable()),
            "{code:?}"
        );
        assert!(matched, "{code:?}: {result:?}");
        assert_eq!(stub.calls("GetUserSessionCount"), 1, "{code:?}");
    }
}

/// Every call carries `authorization: Bearer <token>` when one is configured
/// (none otherwise) and the per-call timeout as `grpc-timeout`.
#[tokio::test]
async fn bearer_token_and_deadline_travel_with_every_call() {
    let stub = Stub::start(Behaviour::ok()).await;
    let timeout = Duration::from_millis(1500);
    let client = stub
        .client()
        .bearer_token("s3cret-token")
        .allow_plaintext_token(true)
        .timeout(timeout)
        .connect()
        .await
        .unwrap();
    client.get_session("t").await.unwrap();
    client
        .create_session("u", "t", no_metadata())
        .await
        .unwrap();
    client.record_login_attempt("192.0.2.1").await.unwrap();

    let seen = stub.metadata();
    assert_eq!(seen.len(), 3);
    for metadata in &seen {
        assert_eq!(
            metadata.get("authorization").map(|v| v.to_str().unwrap()),
            Some("Bearer s3cret-token")
        );
        // The time left of the call's budget: at most the timeout, and most
        // of it for a first attempt.
        let sent = grpc_timeout(metadata).expect("grpc-timeout sent");
        assert!(sent <= timeout && sent > timeout / 2, "{sent:?}");
    }

    let anonymous = stub.client().connect().await.unwrap();
    anonymous.get_session("t").await.unwrap();
    assert!(stub.metadata()[3].get("authorization").is_none());
}

/// With several endpoints, calls are spread over all of them.
#[tokio::test]
async fn several_endpoints_share_the_calls() {
    let first = Stub::start(Behaviour::ok()).await;
    let second = Stub::start(Behaviour::ok()).await;
    let client = SessionClient::builder(first.url())
        .endpoint(second.url())
        .connect()
        .await
        .unwrap();
    let mut made = 0;
    while made < 500
        && (first.calls("GetUserSessionCount") == 0 || second.calls("GetUserSessionCount") == 0)
    {
        assert_eq!(
            client.get_user_session_count("u").await.unwrap(),
            Stub::COUNT
        );
        made += 1;
    }
    assert!(
        first.calls("GetUserSessionCount") > 0,
        "first endpoint unused"
    );
    assert!(
        second.calls("GetUserSessionCount") > 0,
        "second endpoint unused"
    );
}

// ---------------------------------------------------------------------------
// Bearer tokens and TLS against the real server's own settings
// (AUTH_TOKENS_FILE, TLS_CERT, TLS_KEY, TLS_CLIENT_CA), with files made for
// the test.

/// Against a server that requires bearer tokens, a missing or wrong token is
/// `Error::Unauthenticated`, and the configured one is sent and served.
#[tokio::test]
async fn bearer_tokens_are_sent_and_refusals_are_unauthenticated() {
    let (server, _files) = TestServer::start_requiring_tokens("right-token\n").await;

    let anonymous = client_of(&server).await;
    let missing = anonymous.get_user_session_count("lee").await;
    assert!(
        matches!(missing, Err(Error::Unauthenticated(_))),
        "{missing:?}"
    );
    let wrong = SessionClient::builder(server.url())
        .bearer_token("wrong-token")
        .allow_plaintext_token(true)
        .connect()
        .await
        .unwrap();
    let refused = wrong.create_session("lee", "l-1", no_metadata()).await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );

    let right = SessionClient::builder(server.url())
        .bearer_token("right-token")
        .allow_plaintext_token(true)
        .connect()
        .await
        .unwrap();
    assert!(
        right
            .create_session("lee", "l-1", no_metadata())
            .await
            .unwrap()
    );
    assert_eq!(right.get_user_session_count("lee").await.unwrap(), 1);
}

/// With the CA, a client certificate and the certificate's name, the client
/// reaches the real server over mutual TLS (and the first TLS connection
/// finds a rustls crypto provider).
#[tokio::test]
async fn mutual_tls_reaches_the_server() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, true)).await;
    let client = SessionClient::builder(https_url(&server))
        .ca_certificate(pki.ca.clone())
        .identity(pki.client_cert.clone(), pki.client_key.clone())
        .tls_domain_name(Pki::SERVER_NAME)
        .lazy(false)
        .connect()
        .await
        .unwrap();
    assert!(
        client
            .create_session("kim", "k-1", no_metadata())
            .await
            .unwrap()
    );
    let session = client
        .get_session("k-1")
        .await
        .unwrap()
        .expect("stored over TLS");
    assert_eq!(session.user_id, "kim");
}

/// Against a server with TLS but no client certificates, the CA alone is
/// enough.
#[tokio::test]
async fn server_tls_needs_only_the_ca() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, false)).await;
    let client = SessionClient::builder(https_url(&server))
        .ca_certificate(pki.ca.clone())
        .tls_domain_name(Pki::SERVER_NAME)
        .connect()
        .await
        .unwrap();
    assert_eq!(client.get_user_session_count("lou").await.unwrap(), 0);
}

/// TLS refuses what it should: a server certificate from another CA, and a
/// client without a certificate when the server requires one.
#[tokio::test]
async fn tls_refuses_an_untrusted_server_and_a_client_without_identity() {
    let pki = Pki::new();
    let other = Pki::new();
    let files = TempFiles::new();
    let server = TestServer::start_with(pki.server_config(&files, true)).await;

    let untrusting = SessionClient::builder(https_url(&server))
        .ca_certificate(other.ca.clone())
        .identity(pki.client_cert.clone(), pki.client_key.clone())
        .tls_domain_name(Pki::SERVER_NAME)
        .lazy(false)
        .connect()
        .await;
    assert!(
        matches!(untrusting, Err(Error::Unavailable(_))),
        "{untrusting:?}"
    );

    let anonymous = SessionClient::builder(https_url(&server))
        .ca_certificate(pki.ca.clone())
        .tls_domain_name(Pki::SERVER_NAME)
        .max_attempts(1)
        .connect()
        .await
        .unwrap();
    // Under TLS 1.3 the client's handshake completes before the server checks
    // for a certificate; its refusal arrives as an alert on the connection, a
    // transport failure after the request left: Unavailable, its cause in the
    // source chain.
    let result = anonymous.get_session("k-1").await;
    match result {
        Err(err @ Error::Unavailable(_)) => {
            let cause = error_chain(&err);
            assert!(cause.contains("CertificateRequired"), "{cause}");
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
}
