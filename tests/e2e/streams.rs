//! Guards against callers that hold connections and streams open: streams
//! behind authentication and their own cap, reflection included, and the TLS
//! handshake timeout.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use session_server::{Config, server};
use sessionstore::v1::{GetUserSessionCountRequest, session_store_client::SessionStoreClient};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse,
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

use crate::support::{Pki, TempFiles, TestServer, check_on, test_config, tls_channel, wait_until};

/// A tokens file holding `token`, and a config that requires it.
fn auth_config(files: &TempFiles, token: &str) -> (Config, PathBuf) {
    let path = files.write("tokens", &format!("# test\n{token}\n"));
    let mut config = test_config();
    config.auth_tokens_file = Some(path.clone());
    (config, path)
}

/// `request` with `authorization: <scheme> <token>`.
fn with_token<T>(mut request: Request<T>, scheme: &str, token: &str) -> Request<T> {
    let value: MetadataValue<_> = format!("{scheme} {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn list_services() -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }
}

/// An open reflection stream: it ends when dropped (the request side ends,
/// so the server ends the response).
#[derive(Debug)]
struct Reflection {
    responses: tonic::Streaming<ServerReflectionResponse>,
    _requests: tokio::sync::mpsc::Sender<ServerReflectionRequest>,
}

/// Opens a reflection stream, with `authorization: <authorization>` when
/// given, that asks for the service list and then stays open; returns it once
/// the server answered the headers, or the refusal.
async fn open_reflection(
    channel: Channel,
    authorization: Option<&str>,
) -> Result<Reflection, Status> {
    let (requests, receiver) = tokio::sync::mpsc::channel(1);
    requests.send(list_services()).await.unwrap();
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    if let Some(value) = authorization {
        let value: MetadataValue<_> = value.parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    let responses = ServerReflectionClient::new(channel)
        .server_reflection_info(request)
        .await?
        .into_inner();
    Ok(Reflection {
        responses,
        _requests: requests,
    })
}

/// The service names a reflection stream lists first.
async fn listed(stream: &mut Reflection) -> Vec<String> {
    let response = stream.responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// A server on `config` with the default bounds changed by `tune`.
async fn bounded(config: Config, tune: impl FnOnce(&mut server::Bounds)) -> TestServer {
    let mut bounds = server::Bounds::default();
    tune(&mut bounds);
    TestServer::start_bounded(config, bounds).await
}

/// Whether the server closes `peer` within 10 s, reading (and dropping)
/// whatever it sends until then.
async fn closes(peer: &mut TcpStream) -> bool {
    let mut byte = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match peer.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A health watch of `service` on `channel`, or its refusal.
async fn health_watch(
    channel: Channel,
    service: &'static str,
) -> Result<tonic::Streaming<HealthCheckResponse>, Status> {
    HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A health probe (Check) on `channel`, asserted to be answered.
async fn probe(channel: Channel) {
    check_on(channel, "")
        .await
        .expect("a health probe was refused");
}

/// Opens 1,000 health watches at once on `channel`: asserts the watch pool
/// admits exactly its size and refuses the rest with RESOURCE_EXHAUSTED;
/// the open ones.
async fn a_thousand_watches(channel: &Channel) -> Vec<tonic::Streaming<HealthCheckResponse>> {
    let watches: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(health_watch(channel.clone(), "")))
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for watch in watches {
        match watch.await.unwrap() {
            Ok(stream) => open.push(stream),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("health watches"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(open.len(), session_server::limits::MAX_HEALTH_WATCHES);
    assert_eq!(refused, 1000 - session_server::limits::MAX_HEALTH_WATCHES);
    open
}

fn count(user: &str) -> Request<GetUserSessionCountRequest> {
    Request::new(GetUserSessionCountRequest {
        user_id: user.into(),
    })
}

/// With AUTH_TOKENS_FILE set, reflection without a token is UNAUTHENTICATED
/// (it would show an attacker the whole API); with one, in a lower-case
/// `bearer` scheme (RFC 6750: case-insensitive), it lists the services.
#[tokio::test]
async fn reflection_needs_a_token() {
    let files = TempFiles::new();
    let (config, _) = auth_config(&files, "reflect-secret");
    let server = TestServer::start_bounded(config, server::Bounds::default()).await;
    let channel = server.channel().await;

    let refused = open_reflection(channel.clone(), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let wrong = open_reflection(channel.clone(), Some("Bearer reflect-secreT"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");

    let mut stream = open_reflection(channel.clone(), Some("bearer reflect-secret"))
        .await
        .unwrap();
    let names = listed(&mut stream).await;
    assert!(
        names.iter().any(|n| n == sessionstore::SERVICE_NAME),
        "{names:?}"
    );
    // The same lower-case scheme works on the session service.
    SessionStoreClient::new(channel)
        .get_user_session_count(with_token(count("reflector"), "bearer", "reflect-secret"))
        .await
        .unwrap();
    drop(stream);
    server.shutdown().await;
}

/// With authentication on, 1,000 streams opened at once without a token are
/// all refused (UNAUTHENTICATED, before taking a permit), and the 1,000 health
/// watches anyone may open get no more than their own pool: the rest are
/// refused with RESOURCE_EXHAUSTED, while probes, authenticated streams and
/// unary calls are still served.
#[tokio::test]
async fn a_thousand_unauthenticated_streams_are_refused() {
    let files = TempFiles::new();
    let (config, _) = auth_config(&files, "stream-secret");
    let server = TestServer::start_bounded(config, server::Bounds::default()).await;
    let channel = server.channel().await;

    let opened: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(open_reflection(channel.clone(), None)))
        .collect();
    for stream in opened {
        let status = stream.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    let open = a_thousand_watches(&channel).await;

    // Everything else still works while those watches are open.
    probe(channel.clone()).await;
    let mut authed = open_reflection(channel.clone(), Some("Bearer stream-secret"))
        .await
        .unwrap();
    assert!(!listed(&mut authed).await.is_empty());
    SessionStoreClient::new(channel.clone())
        .get_user_session_count(with_token(count("streamer"), "Bearer", "stream-secret"))
        .await
        .unwrap();
    drop((open, authed, channel));
    server.shutdown().await;
}

/// The plaintext health port (HEALTH_ADDR) has the main port's bounds: of
/// 1,000 health watches opened on one connection there, no more than the
/// watch pool are admitted and the rest are refused with RESOURCE_EXHAUSTED;
/// the pool is the main port's (a watch there is refused too, rather than a
/// second pool doubling what anonymous callers may hold), probes still
/// answer on both ports, and a watch that ends makes room for another.
#[tokio::test]
async fn the_health_port_caps_watches_with_the_main_port() {
    let mut config = test_config();
    let health_addr: SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    config.health_addr = Some(health_addr);
    let server = TestServer::start_bounded(config, server::Bounds::default()).await;
    let main = server.channel().await;
    let endpoint = Channel::from_shared(format!("http://{health_addr}")).unwrap();
    // HEALTH_ADDR is bound by the server task, which may not have run yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(err) if Instant::now() > deadline => panic!("health port never accepted: {err}"),
            Err(_) => tokio::task::yield_now().await,
        }
    };
    let mut open = a_thousand_watches(&channel).await;

    let status = health_watch(main.clone(), "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for channel in [&channel, &main] {
        probe(channel.clone()).await;
    }

    // A watch that ends gives its permit back.
    open.pop();
    let reopened = wait_until(Duration::from_secs(5), || {
        let channel = channel.clone();
        async move { health_watch(channel, "").await.is_ok() }
    })
    .await;
    assert!(reopened, "an ended watch did not free its permit");
    drop((open, channel, main));
    server.shutdown().await;
}

/// Without authentication, streams past the stream cap get RESOURCE_EXHAUSTED
/// while the open ones keep their permits (released only when a stream ends,
/// not when its headers are sent), unary calls are still served, and a
/// stream that ends makes room for another.
#[tokio::test]
async fn streams_past_their_cap_are_refused_and_unary_calls_still_work() {
    let server = bounded(test_config(), |b| b.max_streams = 4).await;
    let channel = server.channel().await;

    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = open_reflection(channel.clone(), None).await.unwrap();
        assert!(!listed(&mut stream).await.is_empty());
        open.push(stream);
    }
    for _ in 0..3 {
        let status = open_reflection(channel.clone(), None).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("limit of 4 concurrent streams"),
            "{status:?}"
        );
    }
    let mut sessions = SessionStoreClient::new(channel.clone());
    for _ in 0..10 {
        let answer = sessions.get_user_session_count(count("unary")).await;
        assert_eq!(answer.unwrap().into_inner().count, 0);
    }

    // One stream ends (the caller drops it): its permit comes back.
    open.pop();
    let reopened = wait_until(Duration::from_secs(5), || {
        let channel = channel.clone();
        async move { open_reflection(channel, None).await.is_ok() }
    })
    .await;
    assert!(reopened, "a closed stream's permit never came back");
    drop((open, sessions, channel));
    server.shutdown().await;
}

/// A peer that opens a TCP connection to the TLS port and never starts the
/// handshake is disconnected once the handshake timeout passes, while a
/// mutual-TLS client (certificate from TLS_CLIENT_CA) is still served.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let config = pki.server_config(&files, true);
    let bound = Duration::from_millis(500);
    let server = bounded(config, |b| b.tls_handshake_timeout = bound).await;

    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("the server never closed a connection that sent nothing");
    let elapsed = started.elapsed();
    // Closed (EOF) or reset, with nothing sent: the server gave up.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(elapsed >= bound - Duration::from_millis(50), "{elapsed:?}");
    assert!(elapsed < bound * 4, "{elapsed:?}");

    let identity = Some((pki.client_cert.as_str(), pki.client_key.as_str()));
    let channel = tls_channel(server.addr, &pki.ca, identity).await.unwrap();
    SessionStoreClient::new(channel)
        .get_user_session_count(count("tls"))
        .await
        .expect("a mutual-TLS client is served");
    server.shutdown().await;
}

/// A connection that sends nothing, or stops inside the HTTP/2 preface, is
/// closed once the connection idle timeout passes (not before), while calls
/// keep working.
#[tokio::test]
async fn silent_and_half_preface_connections_are_closed() {
    let idle = Duration::from_millis(500);
    let server = bounded(test_config(), |b| b.connection_idle_timeout = idle).await;

    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut peer = TcpStream::connect(server.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut peer, sent)
            .await
            .unwrap();
        let started = Instant::now();
        // Whatever the server wrote (nothing, or its SETTINGS), until it
        // closes.
        let closed = closes(&mut peer).await;
        assert!(closed, "a silent connection stayed open ({sent:?})");
        assert!(started.elapsed() >= idle - Duration::from_millis(50));
    }

    probe(server.channel().await).await;
    server.shutdown().await;
}

/// The idle timeout counts from the last byte received: a peer that keeps
/// sending (here the preface, a byte every 150 ms) stays open well past it,
/// and is closed once it stops, the timeout after its last byte.
#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_byte() {
    let idle = Duration::from_millis(500);
    let server = bounded(test_config(), |b| b.connection_idle_timeout = idle).await;
    let mut peer = TcpStream::connect(server.addr).await.unwrap();
    let mut byte = [0u8; 64];
    // 12 bytes over 1.8 s: more than three idle timeouts.
    for b in &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..12] {
        tokio::io::AsyncWriteExt::write_all(&mut peer, std::slice::from_ref(b))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        match peer.try_read(&mut byte) {
            Ok(0) => panic!("a peer still sending was closed"),
            Ok(_) => {}
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}"),
        }
    }
    let last_byte = Instant::now();
    let closed = closes(&mut peer).await;
    assert!(closed, "the connection stayed open once silent");
    // The last byte went out 150 ms before `last_byte`.
    assert!(last_byte.elapsed() >= idle - Duration::from_millis(200));
    server.shutdown().await;
}

/// At the connection cap the server stops accepting: a new client's call
/// waits, and is served as soon as another connection closes.
#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let server = bounded(test_config(), |b| b.max_connections = 2).await;
    a_third_connection_waits_for_a_free_slot(server.addr).await;
    server.shutdown().await;
}

/// With two connections open to `addr` and a cap of two, a third client's
/// call waits, and is served as soon as one of the two closes.
async fn a_third_connection_waits_for_a_free_slot(addr: std::net::SocketAddr) {
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let check = || {
        let mut health = HealthClient::new(channel.clone());
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    };
    let waiting = tokio::time::timeout(Duration::from_millis(500), check()).await;
    assert!(
        waiting.is_err(),
        "a third connection was served: {waiting:?}"
    );

    drop(first);
    tokio::time::timeout(Duration::from_secs(5), check())
        .await
        .expect("not served once a connection closed")
        .unwrap();
    drop((second, channel));
}

/// The connection cap is the MAX_CONNECTIONS setting, as `server::run`
/// serves it: with 2, a third client waits until a connection closes.
#[tokio::test]
async fn max_connections_setting_caps_connections() {
    let server = TestServer::start_tuned(|c| c.max_connections = 2).await;
    a_third_connection_waits_for_a_free_slot(server.addr).await;
    server.shutdown().await;
}

/// Health watches (no token needed; gRPC clients' own health checking opens
/// one per connection) are bounded by MAX_CONNECTIONS, not by a fixed 256
/// that clients beyond it would find full: with MAX_CONNECTIONS=300 all 300
/// watches are served, and the one past the bound is refused.
#[tokio::test]
async fn health_watches_are_sized_to_max_connections() {
    let server = TestServer::start_tuned(|c| c.max_connections = 300).await;
    let channel = server.channel().await;
    let watch = |channel| health_watch(channel, sessionstore::SERVICE_NAME);
    let watches: Vec<_> = (0..300)
        .map(|_| tokio::spawn(watch(channel.clone())))
        .collect();
    let mut open = Vec::new();
    for watch in watches {
        open.push(
            watch
                .await
                .unwrap()
                .expect("a watch within MAX_CONNECTIONS was refused"),
        );
    }
    let status = watch(channel.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("health watches"), "{status:?}");
    drop(open);
    server.shutdown().await;
}
