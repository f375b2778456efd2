//! session-client's tower layer (`RequireSessionLayer`, feature `tower`) in
//! front of a real axum service and a real tonic service, checking sessions
//! against the real server and Redis: each answer (live, missing, revoked,
//! expired, no ids, SessionStore unable to answer, the opt-in to pass
//! unchecked) for HTTP and for gRPC, and the near-cache answering repeated
//! checks.

use std::{net::SocketAddr, time::Duration};

use axum::{Extension, Router, http::request::Parts, routing::get};
use session_client::{
    CompactSession, NearCacheStats, NewSession, RequireSessionLayer, Session, SessionClient,
    SessionUnchecked,
};
use tokio::net::TcpListener;
use tonic::{Code, transport::Server};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{PrivateRedis, Serving, TestServer, config_on, http, wait_until};

/// The request's ids, from two headers: what a JWT middleware would leave in
/// the extensions, kept simple for the test.
fn ids(parts: &Parts) -> Option<(&str, &str)> {
    let user = parts.headers.get("x-user")?.to_str().ok()?;
    let token = parts.headers.get("x-token")?.to_str().ok()?;
    Some((user, token))
}

/// A client of `url` with a one-second budget, with or without a near-cache.
async fn client(url: String, near_cache: bool) -> SessionClient {
    let mut builder = SessionClient::builder(url).timeout(Duration::from_secs(1));
    if near_cache {
        builder = builder.near_cache(100);
    }
    builder.connect().await.unwrap()
}

/// A client with the near-cache on, once its revocation stream is healthy
/// (before that every lookup asks the server).
async fn cached_client(url: String) -> SessionClient {
    let client = client(url, true).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            client.near_cache_stats().unwrap().healthy
        })
        .await
    );
    client
}

/// Checks `u-1`'s session `t-live` through the layer at `addr` `times`
/// times, each answered `body`; the client's near-cache stats before and
/// after.
async fn checked_repeatedly(
    client: &SessionClient,
    addr: SocketAddr,
    times: usize,
    body: &str,
) -> (NearCacheStats, NearCacheStats) {
    let before = client.near_cache_stats().unwrap();
    for _ in 0..times {
        let answer = get_with(addr, Some(("u-1", "t-live"))).await;
        assert_eq!(answer.body, body);
    }
    (before, client.near_cache_stats().unwrap())
}

/// An axum service behind `layer`: `/` answers which session it was given
/// (`live <user> <token>`; `compact live <user> <token>` for a
/// [`CompactSession`]), or `unchecked`.
async fn serve_http<F>(layer: RequireSessionLayer<F>) -> (SocketAddr, Serving)
where
    F: Fn(&Parts) -> Option<(&str, &str)> + Clone + Send + Sync + 'static,
{
    async fn answer(
        session: Option<Extension<Session>>,
        compact: Option<Extension<CompactSession>>,
        unchecked: Option<Extension<SessionUnchecked>>,
    ) -> String {
        match (session, compact, unchecked) {
            (Some(Extension(s)), None, None) => format!("live {} {}", s.user_id, s.token_id),
            (None, Some(Extension(s)), None) => {
                format!("compact live {} {}", s.user_id(), s.token_id())
            }
            (None, None, Some(_)) => "unchecked".to_owned(),
            other => panic!("not one: {:?}", (other.0.is_some(), other.1.is_some())),
        }
    }
    let app = Router::new().route("/", get(answer)).layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, Serving(task))
}

/// A tonic service (gRPC health) behind `layer`, and a client of it.
async fn serve_grpc<F>(
    layer: RequireSessionLayer<F>,
) -> (HealthClient<tonic::transport::Channel>, Serving)
where
    F: Fn(&Parts) -> Option<(&str, &str)> + Clone + Send + Sync + 'static,
{
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (HealthClient::new(channel), Serving(task))
}

/// GET / with the ids, if any.
async fn get_with(addr: SocketAddr, ids: Option<(&str, &str)>) -> crate::support::HttpAnswer {
    match ids {
        Some((user, token)) => {
            http(
                addr,
                "GET",
                "/",
                &[("x-user", user), ("x-token", token)],
                None,
            )
            .await
        }
        None => http(addr, "GET", "/", &[], None).await,
    }
}

/// A health check carrying the ids; its gRPC code.
async fn check_with(
    grpc: &mut HealthClient<tonic::transport::Channel>,
    ids: Option<(&str, &str)>,
) -> Code {
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    if let Some((user, token)) = ids {
        request
            .metadata_mut()
            .insert("x-user", user.parse().unwrap());
        request
            .metadata_mut()
            .insert("x-token", token.parse().unwrap());
    }
    match grpc.check(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Asserts the 401 of a session that is not live.
fn assert_denied(answer: &crate::support::HttpAnswer) {
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{answer:?}"
    );
}

/// Over HTTP: a live session reaches the service with its `Session`; an
/// unknown token, another user's token, a revoked and an expired session, and
/// a request without ids are answered 401 with the bearer challenge.
#[tokio::test]
async fn http_requests_pass_only_with_a_live_session() {
    let server = TestServer::start().await;
    let client = client(server.url(), false).await;
    let (addr, _serving) = serve_http(RequireSessionLayer::new(client.clone(), ids)).await;

    client
        .create_session("u-1", "t-live", Default::default())
        .await
        .unwrap();
    let answer = get_with(addr, Some(("u-1", "t-live"))).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "live u-1 t-live")
    );

    assert_denied(&get_with(addr, Some(("u-1", "t-unknown"))).await);
    assert_denied(&get_with(addr, Some(("u-2", "t-live"))).await);
    assert_denied(&get_with(addr, None).await);
    // An id the server refuses as malformed is not a live session either.
    assert_denied(&get_with(addr, Some(("u-1", "t:colon"))).await);
    // An empty user id does not ask for the token's session whoever owns
    // it, and an id longer than any SessionStore accepts is no session
    // (not "unavailable").
    assert_denied(&get_with(addr, Some(("", "t-live"))).await);
    assert_denied(&get_with(addr, Some(("u-1", &"t".repeat(70_000)))).await);

    client.revoke_session("t-live").await.unwrap();
    assert_denied(&get_with(addr, Some(("u-1", "t-live"))).await);

    let short = NewSession::new("u-1", "t-short").ttl(Duration::from_millis(1500));
    client.create_session_with(short).await.unwrap();
    assert_eq!(get_with(addr, Some(("u-1", "t-short"))).await.status, 200);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            get_with(addr, Some(("u-1", "t-short"))).await.status == 401
        })
        .await,
        "the expired session was still let through"
    );
}

/// Over gRPC (told by its content type): a live session reaches the tonic
/// service; an unknown, revoked or expired one and a call without ids are
/// UNAUTHENTICATED.
#[tokio::test]
async fn grpc_calls_pass_only_with_a_live_session() {
    let server = TestServer::start().await;
    let client = client(server.url(), false).await;
    let (mut grpc, _serving) = serve_grpc(RequireSessionLayer::new(client.clone(), ids)).await;

    client
        .create_session("u-1", "t-live", Default::default())
        .await
        .unwrap();
    assert_eq!(
        check_with(&mut grpc, Some(("u-1", "t-live"))).await,
        Code::Ok
    );
    assert_eq!(
        check_with(&mut grpc, Some(("u-1", "t-unknown"))).await,
        Code::Unauthenticated
    );
    assert_eq!(check_with(&mut grpc, None).await, Code::Unauthenticated);

    client.revoke_session("t-live").await.unwrap();
    assert_eq!(
        check_with(&mut grpc, Some(("u-1", "t-live"))).await,
        Code::Unauthenticated
    );

    let short = NewSession::new("u-1", "t-short").ttl(Duration::from_millis(1500));
    client.create_session_with(short).await.unwrap();
    assert_eq!(
        check_with(&mut grpc, Some(("u-1", "t-short"))).await,
        Code::Ok
    );
    let mut expired = false;
    for _ in 0..300 {
        if check_with(&mut grpc, Some(("u-1", "t-short"))).await == Code::Unauthenticated {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expired, "the expired session was still let through");
}

/// When SessionStore cannot answer (its Redis is gone), the layer fails
/// closed: 503 over HTTP, UNAVAILABLE over gRPC, for a session that was live;
/// only a layer built with `pass_when_unavailable` passes the request on,
/// marked `SessionUnchecked`, and still refuses sessions the server says are
/// not live before the outage.
#[tokio::test]
async fn an_unanswering_session_store_fails_closed_unless_told_otherwise() {
    let mut redis = PrivateRedis::start();
    let server = TestServer::start_with(config_on(&redis)).await;
    let client = client(server.url(), false).await;
    client
        .create_session("u-1", "t-live", Default::default())
        .await
        .unwrap();

    let (closed, _a) = serve_http(RequireSessionLayer::new(client.clone(), ids)).await;
    let (open, _b) =
        serve_http(RequireSessionLayer::new(client.clone(), ids).pass_when_unavailable()).await;
    let (mut grpc, _c) = serve_grpc(RequireSessionLayer::new(client.clone(), ids)).await;
    let (mut grpc_open, _d) =
        serve_grpc(RequireSessionLayer::new(client.clone(), ids).pass_when_unavailable()).await;
    let live = Some(("u-1", "t-live"));
    assert_eq!(get_with(closed, live).await.status, 200);
    assert_eq!(get_with(open, live).await.body, "live u-1 t-live");
    assert_eq!(get_with(open, Some(("u-1", "t-unknown"))).await.status, 401);
    assert_eq!(check_with(&mut grpc, live).await, Code::Ok);

    redis.kill();
    let answer = get_with(closed, live).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.header("www-authenticate").is_none());
    assert_eq!(check_with(&mut grpc, live).await, Code::Unavailable);
    let answer = get_with(open, live).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "unchecked"));
    assert_eq!(check_with(&mut grpc_open, live).await, Code::Ok);
    // No ids is still no session, outage or not.
    assert_eq!(get_with(open, None).await.status, 401);
}

/// With the client's near-cache on, repeated checks of a live session are
/// answered from memory (counted as hits, the server not asked), and a
/// revocation still ends them.
#[tokio::test]
async fn the_near_cache_answers_repeated_checks() {
    let server = TestServer::start().await;
    let client = cached_client(server.url()).await;
    let (addr, _serving) = serve_http(RequireSessionLayer::new(client.clone(), ids)).await;
    client
        .create_session("u-1", "t-live", Default::default())
        .await
        .unwrap();

    assert_eq!(get_with(addr, Some(("u-1", "t-live"))).await.status, 200);
    let (before, after) = checked_repeatedly(&client, addr, 5, "live u-1 t-live").await;
    assert_eq!(after.hits - before.hits, 5, "{before:?} -> {after:?}");
    assert_eq!(after.misses, before.misses, "{before:?} -> {after:?}");

    client.revoke_session("t-live").await.unwrap();
    assert_denied(&get_with(addr, Some(("u-1", "t-live"))).await);
}

/// A layer built `compact()` puts a `CompactSession` in the extensions,
/// from the server's answer on a miss and from memory on a hit (the same
/// session `check_user_session` answers, and `get_user_session` in full);
/// a revocation ends both.
#[tokio::test]
async fn the_compact_layer_passes_compact_sessions() {
    let server = TestServer::start().await;
    let client = cached_client(server.url()).await;
    let (addr, _serving) =
        serve_http(RequireSessionLayer::new(client.clone(), ids).compact()).await;
    assert!(
        client
            .create_session(
                "u-1",
                "t-live",
                [("device".to_owned(), "phone".to_owned())].into()
            )
            .await
            .unwrap()
    );

    let (before, after) = checked_repeatedly(&client, addr, 3, "compact live u-1 t-live").await;
    assert_eq!(after.misses - before.misses, 1, "{before:?} -> {after:?}");
    assert_eq!(after.hits - before.hits, 2, "{before:?} -> {after:?}");

    let compact = client
        .check_user_session("u-1", "t-live")
        .await
        .unwrap()
        .expect("live");
    let full = client.get_user_session("u-1", "t-live").await.unwrap();
    assert_eq!(Some(compact.to_session()), full);
    assert_eq!(compact.metadata_value("device"), Some("phone"));
    assert_eq!((compact.user_id(), compact.token_id()), ("u-1", "t-live"));
    assert_eq!(
        client.check_user_session("u-2", "t-live").await.unwrap(),
        None
    );

    client.revoke_session("t-live").await.unwrap();
    assert_denied(&get_with(addr, Some(("u-1", "t-live"))).await);
    assert_eq!(
        client.check_user_session("u-1", "t-live").await.unwrap(),
        None
    );
}
