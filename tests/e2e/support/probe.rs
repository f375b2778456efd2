//! Health probes: what the gRPC health service answers, asked on a new
//! connection each time, as the kubelet and a new client do.

use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{server::TestServer, wait_until};

/// The status of `service` ("" is liveness) at `url`, or `None` when no
/// connection can be made or the check fails.
pub(crate) async fn health_status(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(url.to_string())
        .ok()?
        .connect()
        .await
        .ok()?;
    check_on(channel, service).await.ok()
}

/// What the health service answers for `service` ("" is liveness) on
/// `channel`: the status, or the refusal.
pub(crate) async fn check_on(
    channel: Channel,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status;
    Ok(ServingStatus::try_from(status).expect("a known serving status"))
}

/// Readiness of the SessionStore service at `url` (`http://host:port`).
pub(crate) async fn readiness_at(url: &str) -> Option<ServingStatus> {
    health_status(url, sessionstore::SERVICE_NAME).await
}

/// Readiness of the SessionStore service of an in-process server.
pub(crate) async fn readiness(server: &TestServer) -> Option<ServingStatus> {
    readiness_at(&server.url()).await
}

/// Whether readiness of `server` becomes `status` within `limit`, asked
/// every 20 ms.
pub(crate) async fn readiness_becomes(
    server: &TestServer,
    status: ServingStatus,
    limit: Duration,
) -> bool {
    wait_until(limit, || async { readiness(server).await == Some(status) }).await
}

/// Liveness (the overall status, service "") of an in-process server.
pub(crate) async fn liveness(server: &TestServer) -> Option<ServingStatus> {
    health_status(&server.url(), "").await
}
