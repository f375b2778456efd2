//! The transport: the tonic server with its layers, gRPC health, reflection
//! and graceful shutdown. No session logic lives here.

use std::{future::Future, time::Duration};

use sessionstore::v1::session_store_server::SessionStoreServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::{AuthError, BearerAuth, Tokens},
    config::{Config, read_file},
    limits::LimitsLayer,
    observe::RpcLogLayer,
    service::SessionService,
    store::Store,
};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed (accepting connections, HTTP/2).
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// TLS_CERT, TLS_KEY or TLS_CLIENT_CA could not be read or used.
    #[error("{0}")]
    Tls(String),
    /// HEALTH_ADDR could not be bound.
    #[error("binding HEALTH_ADDR {addr}: {source}")]
    HealthListener {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// AUTH_TOKENS_FILE could not be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Serves SessionStore, health and reflection on `listener` until `shutdown`
/// completes; then reports NOT_SERVING, stops accepting connections and waits
/// for in-flight calls to finish.
///
/// The listener is bound by the caller, so tests can bind port 0 and know the
/// address before the server runs.
///
/// # Errors
///
/// [`ServeError`] when the transport fails or reflection cannot be built.
pub async fn run(
    listener: TcpListener,
    config: &Config,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Readiness starts NOT_SERVING until the first PING answers.
    health
        .set_service_status(sessionstore::SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let readiness = tokio::spawn(watch_redis(
        store.clone(),
        health.clone(),
        Duration::from_millis(config.health_check_interval_ms),
    ));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sessionstore::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let max_request = usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX);
    let sessions =
        SessionStoreServer::new(SessionService::new(store)).max_decoding_message_size(max_request);
    // Without AUTH_TOKENS_FILE the interceptor is absent, not a pass-through:
    // `add_optional_service` keeps one router type either way.
    let tokens = config
        .auth_tokens_file
        .as_deref()
        .map(Tokens::load)
        .transpose()?;
    let reloader = tokens.clone().map(|tokens| tokio::spawn(tokens.watch()));
    let (open_sessions, guarded_sessions) = match tokens {
        Some(tokens) => (
            None,
            Some(tonic::service::interceptor::InterceptedService::new(
                sessions,
                BearerAuth::new(tokens),
            )),
        ),
        None => (Some(sessions), None),
    };

    let mut builder = tonic::transport::Server::builder();
    match tls_config(config)? {
        Some(tls) => {
            builder = builder
                .tls_config(tls)
                .map_err(|e| ServeError::Tls(format!("TLS_CERT/TLS_KEY: {e}")))?;
        }
        None => tracing::warn!(
            "TLS_CERT and TLS_KEY are not set: serving plaintext gRPC; use TLS or a mesh outside a trusted network"
        ),
    }

    // Stops the plaintext health port, when there is one, with the main server.
    let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
    let health_port = match config.health_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::HealthListener { addr, source })?;
            tracing::info!(addr = %listener.local_addr().map_err(|source| ServeError::HealthListener { addr, source })?, "plaintext health port");
            Some(tokio::spawn(serve_health(
                listener,
                health_service.clone(),
                health_stopped,
            )))
        }
        None => None,
    };

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight calls");
            // Probes see the pod leave before its listener closes.
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(sessionstore::SERVICE_NAME, ServingStatus::NotServing)
                .await;
        }
    };

    let result = builder
        // Dead client connections are noticed and dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(RpcLogLayer)
        .layer(LimitsLayer::new(
            usize::try_from(config.max_concurrent_requests).unwrap_or(usize::MAX),
            Duration::from_millis(config.request_timeout_ms),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_optional_service(open_sessions)
        .add_optional_service(guarded_sessions)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    readiness.abort();
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    let _ = stop_health.send(true);
    if let Some(health_port) = health_port {
        match health_port.await {
            Ok(Err(err)) => tracing::warn!(error = %err, "health port failed"),
            Err(err) => tracing::warn!(error = %err, "health port task failed"),
            Ok(Ok(())) => {}
        }
    }
    result.map_err(ServeError::from)
}

/// Serves only `grpc.health.v1` in plaintext on HEALTH_ADDR, for kubelet gRPC
/// probes (which cannot speak TLS) when the main port requires TLS.
async fn serve_health<S>(
    listener: TcpListener,
    health_service: S,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error>
where
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await
}

/// The TLS configuration from TLS_CERT, TLS_KEY and TLS_CLIENT_CA, or `None`
/// for plaintext.
fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let cert = read_file("TLS_CERT", cert).map_err(ServeError::Tls)?;
    let key = read_file("TLS_KEY", key).map_err(ServeError::Tls)?;
    let mut tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    if let Some(ca) = &config.tls_client_ca {
        let ca = read_file("TLS_CLIENT_CA", ca).map_err(ServeError::Tls)?;
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
    }
    Ok(Some(tls))
}

/// Keeps the readiness status ("sessionstore.v1.SessionStore") in step with
/// whether Redis answers a PING. The overall status ("") stays SERVING: a Redis
/// outage must take pods out of the Service, not get them restarted.
async fn watch_redis(store: Store, health: HealthReporter, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = None;
    loop {
        ticker.tick().await;
        let result = store.ping().await;
        let up = result.is_ok();
        metrics::gauge!(crate::metrics::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        store.record_pool_metrics();
        if serving != Some(up) {
            match &result {
                Ok(()) => tracing::info!("redis answers: serving"),
                Err(err) => tracing::warn!(error = %err, "redis does not answer: not serving"),
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health
                .set_service_status(sessionstore::SERVICE_NAME, status)
                .await;
            serving = Some(up);
        }
    }
}
