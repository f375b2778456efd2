//! Health, reflection and shutdown: what Kubernetes probes and operators see.

use sessionstore::v1::{CreateSessionRequest, GetSessionRequest};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::common::{TestServer, readiness, wait_until};

/// With Redis answering, both the overall status ("") and the readiness status
/// of sessionstore.v1.SessionStore are SERVING.
#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = server.health().await;
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || async {
            readiness(&server).await == ServingStatus::Serving as i32
        })
        .await,
        "readiness never became SERVING"
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
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

/// A shutdown lets an in-flight call finish, then the server stops cleanly and
/// refuses new connections.
#[tokio::test]
async fn shutdown_drains_then_stops() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let mut client = server.client().await;
    client
        .create_session(CreateSessionRequest {
            user_id: "drain".into(),
            token_id: "drain-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
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
