//! The Prometheus endpoint: scraped after some calls, its counters have moved.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;

use sessionstore::v1::{
    GetSessionRequest, GetUserSessionCountRequest, ListUserSessionsRequest,
    RecordLoginAttemptRequest,
};
use tokio::net::TcpListener;
use tonic_reflection::pb::v1alpha::{
    ServerReflectionRequest, ServerReflectionResponse,
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
};

use crate::support::{PrivateRedis, TestServer, create, reset_attempts, revoke, sample, scrape};

/// The process-wide recorder: installed once, shared by every test that looks.
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| session_server::metrics::install().expect("first install"))
        .clone()
}

/// The value of `series` (name and labels) in `text`, which must show it: a
/// series renamed, or never recorded, fails the test.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no series {series} in the scrape:\n{text}"))
}

/// The value of `series` in `text`, 0 while it is absent: a counter is
/// exported from its first increment, so a scrape taken before it may lack it.
fn value_or_zero(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

/// A Prometheus exporter on a port-0 listener, recording through
/// [`recorder`], stopped by [`Exporter::stop`].
struct Exporter {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Exporter {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(session_server::metrics::serve(
            listener,
            recorder(),
            async {
                let _ = stopped.await;
            },
        ));
        Self { addr, stop, task }
    }

    /// Stops the exporter and asserts it ended cleanly.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// A v1alpha reflection stream that asked for the service list and got it,
/// with its request side still open (so only a reset or the server can end
/// it).
async fn open_reflection(
    channel: tonic::transport::Channel,
) -> (
    tonic::Streaming<ServerReflectionResponse>,
    tokio::sync::mpsc::Sender<ServerReflectionRequest>,
) {
    let (requests, receiver) = tokio::sync::mpsc::channel(1);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap().expect("a service list");
    (responses, requests)
}

/// Scrapes `addr` every 20 ms until `done` holds for the text or 5 s pass;
/// the last scrape.
async fn scrape_until(addr: std::net::SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let started = std::time::Instant::now();
    let mut text = scrape(addr).await;
    while !done(&text) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = scrape(addr).await;
    }
    text
}

/// After creates, gets, a revoke (seen on a revocation stream) and login
/// attempts, a scrape of /metrics shows the RPC, session, login, revocation
/// stream, Redis latency and pool series moved.
#[tokio::test]
async fn counters_move_after_calls() {
    let exporter = Exporter::start().await;

    let server = TestServer::start().await;
    let mut client = server.client().await;
    let before = scrape(exporter.addr).await;
    // A revocation stream, proven (its reset) before the calls below.
    let mut watch = client
        .watch_revocations(sessionstore::v1::WatchRevocationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().unwrap().reset);
    for i in 0..3 {
        create(&mut client, "metered", &format!("m-{i}")).await;
    }
    client
        .get_session(GetSessionRequest {
            token_id: "m-0".into(),
            user_id: String::new(),
        })
        .await
        .unwrap();
    revoke(&mut client, "m-1", "metered").await;
    for _ in 0..6 {
        client
            .record_login_attempt(RecordLoginAttemptRequest {
                ip: "203.0.113.77".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A trusted device's attempt is also counted as one.
    let device_token = reset_attempts(&mut client, "203.0.113.78", "metered@example.com", "", true)
        .await
        .device_token;
    let trusted = client
        .record_login_attempt(RecordLoginAttemptRequest {
            ip: "203.0.113.78".into(),
            account: "metered@example.com".into(),
            device_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(trusted.device_trusted);
    let bad = client
        .get_session(GetSessionRequest {
            token_id: "bad token".into(),
            user_id: String::new(),
        })
        .await;
    assert!(bad.is_err());
    // The revocation reached the stream, so the subscriber has counted it.
    loop {
        let message = watch.message().await.unwrap().unwrap();
        if message.revocations.iter().any(|r| r.token_id == "m-1") {
            break;
        }
    }
    let after = scrape(exporter.addr).await;

    let moved = |series: &str, at_least: f64| {
        let delta = value(&after, series) - value_or_zero(&before, series);
        assert!(
            delta >= at_least,
            "{series} moved by {delta}, expected >= {at_least}\n{after}"
        );
    };
    moved(
        r#"sessionstore_rpc_requests_total{method="/sessionstore.v1.SessionStore/CreateSession",code="OK"}"#,
        3.0,
    );
    moved(
        r#"sessionstore_rpc_requests_total{method="/sessionstore.v1.SessionStore/GetSession",code="INVALID_ARGUMENT"}"#,
        1.0,
    );
    moved(
        r#"sessionstore_rpc_duration_seconds_count{method="/sessionstore.v1.SessionStore/GetSession",code="OK"}"#,
        1.0,
    );
    moved("sessionstore_sessions_created_total", 3.0);
    moved(r#"sessionstore_sessions_revoked_total{how="single"}"#, 1.0);
    moved(
        r#"sessionstore_login_attempts_total{result="allowed"}"#,
        5.0,
    );
    moved(
        r#"sessionstore_login_attempts_total{result="refused"}"#,
        1.0,
    );
    moved(
        r#"sessionstore_login_device_attempts_total{result="allowed"}"#,
        1.0,
    );
    moved(
        r#"sessionstore_redis_command_duration_seconds_count{op="create_session"}"#,
        6.0,
    );
    // A cluster connection is not pooled, so it has no pool gauges.
    if server.config.redis_mode != session_server::store::RedisMode::Cluster {
        assert!(
            after.contains("sessionstore_redis_pool_connections"),
            "{after}"
        );
    }
    assert!(after.contains("sessionstore_redis_up"), "{after}");
    moved(
        r#"sessionstore_revocation_events_total{kind="revocation"}"#,
        1.0,
    );
    moved(r#"sessionstore_revocation_events_total{kind="reset"}"#, 1.0);
    assert!(
        after.contains("sessionstore_revocation_subscription_up"),
        "{after}"
    );
    drop(watch);

    exporter.stop().await;
}

/// Calls that never answer are still counted: one whose caller gives up
/// (drops the call) as CANCELLED, one whose `grpc-timeout` passes (tonic
/// drops it at the deadline) as DEADLINE_EXCEEDED; each with its latency.
#[tokio::test]
async fn cancelled_and_timed_out_calls_are_counted() {
    let exporter = Exporter::start().await;

    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        // Longer than the calls below wait, so Redis's silence does not end them
        // with UNAVAILABLE first.
        c.redis_timeout_ms = 3000;
    })
    .await;
    let mut client = server.client().await;
    let count = || GetUserSessionCountRequest {
        user_id: "slow".into(),
    };
    let list = || ListUserSessionsRequest {
        user_id: "slow".into(),
    };
    client.get_user_session_count(count()).await.unwrap();
    client.list_user_sessions(list()).await.unwrap();

    let cancelled = r#"sessionstore_rpc_requests_total{method="/sessionstore.v1.SessionStore/ListUserSessions",code="CANCELLED"}"#;
    let timed_out = r#"sessionstore_rpc_requests_total{method="/sessionstore.v1.SessionStore/GetUserSessionCount",code="DEADLINE_EXCEEDED"}"#;
    let timed_out_latency = r#"sessionstore_rpc_duration_seconds_count{method="/sessionstore.v1.SessionStore/GetUserSessionCount",code="DEADLINE_EXCEEDED"}"#;
    let before = scrape(exporter.addr).await;

    // Redis answers nothing for 2 s: both calls are in flight when they end.
    redis.pause(2000).await;
    // The caller gives up after 300 ms, with no deadline sent.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.list_user_sessions(list()),
    )
    .await;
    assert!(gave_up.is_err(), "the call answered: {gave_up:?}");
    // A 200 ms deadline, enforced by the server.
    let mut request = tonic::Request::new(count());
    request.set_timeout(Duration::from_millis(200));
    let status = client.get_user_session_count(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

    // Recorded when the server drops each call, which may come a moment
    // after the client has given up.
    let counted = |text: &str| {
        value_or_zero(text, cancelled) > value_or_zero(&before, cancelled)
            && value_or_zero(text, timed_out) > value_or_zero(&before, timed_out)
    };
    let after = scrape_until(exporter.addr, counted).await;
    let counted = counted(&after);
    assert!(counted, "not counted:\n{after}");
    assert!(
        value(&after, timed_out_latency) > value_or_zero(&before, timed_out_latency),
        "{after}"
    );

    exporter.stop().await;
}

/// Streams are counted when they end, not when their headers are sent: 20
/// reflection streams, each answered and then reset by the caller, are
/// counted as CANCELLED, not OK. (v1alpha, which other tests in this binary
/// end cleanly but never reset, so their calls cannot make up the count.)
#[tokio::test]
async fn reset_streams_are_counted_as_cancelled() {
    let exporter = Exporter::start().await;
    let server = TestServer::start().await;
    let channel = server.channel().await;

    let series = |code: &str| {
        format!(
            r#"sessionstore_rpc_requests_total{{method="/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",code="{code}"}}"#
        )
    };
    let (cancelled, ok) = (series("CANCELLED"), series("OK"));
    let before = scrape(exporter.addr).await;

    const STREAMS: usize = 20;
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        // The request side stays open, so only a reset can end the stream.
        open.push(open_reflection(channel.clone()).await);
    }
    // Headers and a message sent, the streams are not over: nothing counted.
    let during = scrape(exporter.addr).await;
    assert!(
        value_or_zero(&during, &cancelled) - value_or_zero(&before, &cancelled) < 1.0,
        "{during}"
    );
    // Dropping the response stream resets it (RST_STREAM CANCEL).
    drop(open);

    let after = scrape_until(exporter.addr, |text| {
        value_or_zero(text, &cancelled) - value_or_zero(&before, &cancelled) >= STREAMS as f64
    })
    .await;
    assert!(
        value(&after, &cancelled) - value_or_zero(&before, &cancelled) >= STREAMS as f64,
        "resets not counted as CANCELLED:\n{after}"
    );
    // Before streams were counted at their end, each was OK at its headers.
    assert!(
        value_or_zero(&after, &ok) - value_or_zero(&before, &ok) < STREAMS as f64,
        "resets counted as OK:\n{after}"
    );

    drop(channel);
    server.shutdown().await;
    exporter.stop().await;
}

/// A stream that shutdown ends is counted with the code its caller got,
/// UNAVAILABLE, not as OK at its headers nor CANCELLED.
#[tokio::test]
async fn streams_ended_by_shutdown_are_counted_as_unavailable() {
    let exporter = Exporter::start().await;
    let server = TestServer::start().await;
    let unavailable = r#"sessionstore_rpc_requests_total{method="/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",code="UNAVAILABLE"}"#;
    let before = scrape(exporter.addr).await;

    let (mut responses, requests) = open_reflection(server.channel().await).await;
    let shutdown = tokio::spawn(server.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended with OK"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("shutdown did not end the stream");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    drop((responses, requests));
    shutdown.await.unwrap();

    let after = scrape(exporter.addr).await;
    assert!(
        value(&after, unavailable) - value_or_zero(&before, unavailable) >= 1.0,
        "not counted as UNAVAILABLE:\n{after}"
    );
    exporter.stop().await;
}
