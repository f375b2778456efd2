//! Health, reflection and shutdown: what Kubernetes probes and operators see.

use std::{net::SocketAddr, time::Duration};

use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, session_store_client::SessionStoreClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

use crate::support::{
    PrivateRedis, TestServer, check_on, create, free_port, lookups_work_within, readiness_at,
    readiness_becomes, test_config,
};

/// With Redis answering, both the overall status ("") and the readiness status
/// of sessionstore.v1.SessionStore are SERVING.
#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let overall = check_on(channel.clone(), "").await.unwrap();
    assert_eq!(overall, ServingStatus::Serving);
    assert_readiness(&server, ServingStatus::Serving).await;
    let unknown = check_on(channel, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// Reflection lists the SessionStore and health services, as grpcurl needs.
#[tokio::test]
async fn reflection_lists_the_services() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"sessionstore.v1.SessionStore".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

/// Reflection v1alpha, all that older grpcurl releases, grpcui and several
/// desktop clients speak, lists the same services as v1 (and itself).
#[tokio::test]
async fn reflection_v1alpha_lists_the_services() {
    let server = TestServer::start().await;
    let names = list_services_v1alpha(server.channel().await, None)
        .await
        .unwrap();
    for service in [
        sessionstore::SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == service), "{service}: {names:?}");
    }
}

/// With AUTH_TOKENS_FILE set, v1alpha reflection is behind the same bearer
/// token as v1: UNAUTHENTICATED without one or with a wrong one, the service
/// list with the right one.
#[tokio::test]
async fn reflection_v1alpha_needs_a_token() {
    let (server, _files) = TestServer::start_requiring_tokens("alpha-secret\n").await;
    let channel = server.channel().await;

    let refused = list_services_v1alpha(channel.clone(), None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let wrong = list_services_v1alpha(channel.clone(), Some("Bearer alpha-wrong"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let names = list_services_v1alpha(channel, Some("Bearer alpha-secret"))
        .await
        .unwrap();
    assert!(
        names.iter().any(|n| n == sessionstore::SERVICE_NAME),
        "{names:?}"
    );
}

/// The services listed through grpc.reflection.v1alpha, sending
/// `authorization: <authorization>` when given.
async fn list_services_v1alpha(
    channel: Channel,
    authorization: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut request = tonic::Request::new(tokio_stream::iter([request]));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(request)
        .await?
        .into_inner();
    let response = responses.next().await.expect("an answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    Ok(list.service.into_iter().map(|s| s.name).collect())
}

/// A shutdown lets an in-flight call finish, then the server stops cleanly and
/// refuses new connections.
#[tokio::test]
async fn shutdown_drains_then_stops() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let mut client = server.client().await;
    create(&mut client, "drain", "drain-1").await;
    let in_flight = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .get_session(GetSessionRequest {
                    token_id: "drain-1".into(),
                    user_id: String::new(),
                })
                .await
        }
    });
    server.shutdown().await;
    let answer = in_flight.await.unwrap();
    // The call either completed before the drain or was answered during it;
    // either way it was not dropped.
    assert!(answer.unwrap().into_inner().session.is_some());
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}

/// A new connection to `addr`: succeeding proves the listener is open.
async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the listener is open")
}

/// Opens a health Watch of `service` at `addr`.
async fn watch(addr: SocketAddr, service: &str) -> Streaming<HealthCheckResponse> {
    HealthClient::new(connect(addr).await)
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Asserts that readiness of `server` becomes `status` within 5 s.
async fn assert_readiness(server: &TestServer, status: ServingStatus) {
    assert!(
        readiness_becomes(server, status, Duration::from_secs(5)).await,
        "readiness never became {status:?}"
    );
}

/// A Watch of `service` on `addr` whose first status is asserted to be
/// `first`.
async fn watch_seeing(
    addr: SocketAddr,
    service: &str,
    first: ServingStatus,
) -> Streaming<HealthCheckResponse> {
    let mut stream = watch(addr, service).await;
    assert_eq!(next_status(&mut stream).await, first);
    stream
}

/// The next status a Watch sends, waiting at most 10 s.
async fn next_status(stream: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no status within 10 s")
        .expect("the stream ended")
        .expect("the stream failed");
    ServingStatus::try_from(answer.status).unwrap()
}

/// Asserts that `stream` has ended (at once: the server is gone), either
/// cleanly or with the UNAVAILABLE that shutdown ends streams with.
async fn assert_ended<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    let last = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream is still open after the server stopped");
    match last {
        None => {}
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Some(Ok(message)) => panic!("a message after shutdown: {message:?}"),
    }
}

/// Shutdown turns readiness NOT_SERVING first, then keeps serving for
/// SHUTDOWN_DELAY_MS: new connections are accepted and new calls answered
/// while probes and watchers see NOT_SERVING. Only then does the server stop.
#[tokio::test]
async fn not_serving_first_then_serving_through_the_delay() {
    let server = TestServer::start_tuned(|c| {
        // Far longer than the checks below take, so they run inside the delay
        // (each opens a new connection, which would fail after it).
        c.shutdown_delay_ms = 3000;
    })
    .await;
    let addr = server.addr;
    assert_readiness(&server, ServingStatus::Serving).await;
    let mut readiness_watch =
        watch_seeing(addr, sessionstore::SERVICE_NAME, ServingStatus::Serving).await;

    let stopping = tokio::spawn(server.shutdown());
    // Watchers hear it first...
    assert_eq!(
        next_status(&mut readiness_watch).await,
        ServingStatus::NotServing
    );
    // ...and so do probes, on new connections, which are still accepted...
    assert_eq!(
        readiness_at(&format!("http://{addr}")).await,
        Some(ServingStatus::NotServing)
    );
    let overall = check_on(connect(addr).await, "").await.unwrap();
    assert_eq!(overall, ServingStatus::NotServing);
    // ...and served.
    let created = SessionStoreClient::new(connect(addr).await)
        .create_session(CreateSessionRequest {
            user_id: "late".into(),
            token_id: "late-1".into(),
            ..Default::default()
        })
        .await;
    assert!(
        created.is_ok(),
        "a call during the delay failed: {created:?}"
    );

    // Then the listener closes and the server stops.
    stopping.await.unwrap();
    assert_ended(&mut readiness_watch).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}

/// Open health watches, on the serving port and on HEALTH_ADDR, and an open
/// reflection stream do not hold the drain: at shutdown each watch gets
/// NOT_SERVING and then ends, the reflection stream ends, and the server task
/// finishes (it would otherwise wait for them forever).
#[tokio::test]
async fn open_streams_end_at_shutdown() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };

    let mut config = test_config();
    let health_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.health_addr = Some(health_addr);
    let server = TestServer::start_with(config).await;
    let addr = server.addr;
    assert_readiness(&server, ServingStatus::Serving).await;
    let mut readiness_watch =
        watch_seeing(addr, sessionstore::SERVICE_NAME, ServingStatus::Serving).await;
    let mut probe_watch = watch_seeing(health_addr, "", ServingStatus::Serving).await;

    // A reflection session whose caller never closes its side.
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let requests = tokio_stream::iter([list]).chain(tokio_stream::pending());
    let mut reflection = ServerReflectionClient::new(connect(addr).await)
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    assert!(reflection.next().await.unwrap().is_ok());

    // The server stops (within TestServer::shutdown's 10 s) while all three
    // streams are still held open by their callers.
    server.shutdown().await;
    assert_eq!(
        next_status(&mut readiness_watch).await,
        ServingStatus::NotServing
    );
    assert_ended(&mut readiness_watch).await;
    assert_eq!(
        next_status(&mut probe_watch).await,
        ServingStatus::NotServing
    );
    assert_ended(&mut probe_watch).await;
    assert_ended(&mut reflection).await;
}

/// Once shutdown has begun, the Redis watcher never turns readiness back to
/// SERVING: here Redis is down when the signal comes and back (the server's
/// calls succeed again) during the delay, yet readiness stays NOT_SERVING
/// until the server stops.
#[tokio::test]
async fn redis_coming_back_during_shutdown_does_not_restore_readiness() {
    let mut redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        // Room for Redis to restart and the pool to reconnect within the delay,
        // and for many health ticks (50 ms) after that.
        c.shutdown_delay_ms = 6000;
        // Readiness must go NOT_SERVING with Redis down, before the signal.
        c.readiness_follows_redis = true;
        c.readiness_redis_failures = 1;
    })
    .await;
    let addr = server.addr;
    let client = server.client().await;
    assert_readiness(&server, ServingStatus::Serving).await;
    redis.kill();
    assert_readiness(&server, ServingStatus::NotServing).await;
    let mut readiness_watch =
        watch_seeing(addr, sessionstore::SERVICE_NAME, ServingStatus::NotServing).await;

    let stopping = tokio::spawn(server.shutdown());
    redis.restart();
    let get = || GetSessionRequest {
        token_id: "back".into(),
        user_id: "back".into(),
    };
    assert!(
        lookups_work_within(Duration::from_secs(4), &client, get).await,
        "the server did not reach Redis again during the delay"
    );
    // Redis answers, so before the fix the watcher set SERVING within a tick
    // or two. Every status until the stream ends must be NOT_SERVING.
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), readiness_watch.next())
            .await
            .expect("the watch neither changed nor ended");
        match next {
            Some(Ok(answer)) => assert_eq!(
                answer.status,
                ServingStatus::NotServing as i32,
                "readiness went back to SERVING during shutdown"
            ),
            Some(Err(status)) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                break;
            }
            None => break,
        }
    }
    stopping.await.unwrap();
}
