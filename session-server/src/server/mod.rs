//! The transport's assembly: the tonic server with its layers, gRPC health,
//! reflection and graceful shutdown, put together from the parts beside it
//! (as tonic's `transport/server/`): `incoming` accepts and guards
//! connections, `tls` does the handshakes, `readiness` keeps the health
//! status in step with Redis, and `routes` dispatches by service. No session
//! logic lives here.

use std::{fmt, future::Future, net::SocketAddr, path::PathBuf, time::Duration};

mod incoming;
mod readiness;
mod routes;
mod tls;

pub use incoming::bind;
pub use readiness::Policy as ReadinessPolicy;
pub use tls::TlsFiles;

use incoming::guarded;
use sessionstore::v1::session_store_server::SessionStoreServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::{
    auth::{AuthError, AuthLayer, Tokens},
    limits::{self, LimitsLayer},
    methods::Methods,
    observe::RpcLogLayer,
    service::SessionService,
    shutdown::EndStreamsLayer,
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

/// How long a peer may take to complete the TLS handshake after opening a
/// connection. Past it the connection is closed, so a peer that connects and
/// sends nothing (slowloris) holds a socket and a task for this long at most.
/// A handshake on a healthy network takes a few round trips; 10 s leaves room
/// for a slow client and a busy server.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may send nothing at all before it is closed. Every
/// live HTTP/2 peer sends something at least every 40 s: the server pings an
/// idle connection every 30 s and drops it if the PONG is not back within
/// 10 s. A peer that never finishes the HTTP/2 preface (plaintext, or after
/// the TLS handshake), or connects and sends nothing, gets no ping, so
/// without this it would hold a connection (and one of MAX_CONNECTIONS)
/// forever.
pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most streams a peer may have opened and already reset (RST_STREAM) while
/// the server has not yet taken them from the connection (h2's "pending
/// accept" queue) before the connection is closed with GOAWAY
/// ENHANCE_YOUR_CALM: the rapid-reset defence (CVE-2023-44487). Set here
/// rather than left to h2's default (20, which tonic passes through): a
/// legitimate client cancels only calls it started, and the server takes
/// streams off the queue between reads of the socket, so its count stays at
/// the cancels that arrive in one read. session-client multiplexes every call
/// over one connection per server, so one burst of cancellations (a fan-out
/// whose caller gave up) past the limit would fail all its calls in flight;
/// 256 leaves it room for a quarter of MAX_CONCURRENT_REQUESTS (1,024)
/// cancelled at once. An attacker's flood writes thousands of open-and-reset
/// pairs per read and is cut off after at most 256 streams queued for
/// nothing (`security::a_rapid_reset_flood_is_cut_off_with_goaway`).
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 256;

/// Most streams the server itself may reset for a peer's protocol errors
/// (malformed headers, a stream refused past `max_concurrent_streams`, ...)
/// over a connection's life before it is closed with GOAWAY
/// ENHANCE_YOUR_CALM. hyper's default is 1,024 (RUSTSEC-2024-0003), but
/// tonic 0.14 passes `None` when the builder leaves it unset, which hyper
/// takes as no limit at all; 1,024 restores it. A correct client (tonic,
/// session-client, grpc-go) causes none: its cancels are its own resets,
/// not counted here.
pub const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// MAX_CONNECTIONS by default: what fits the shipped memory limit (256 MiB,
/// `k8s/base`) with both ports full, at the measured 43 KiB per TLS
/// connection and 32 KiB per plaintext one: 48 MiB + 2000 x 75 KiB = 195
/// MiB.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 2000;

/// Everything the transport needs to know, decided once at start and built by
/// `Config::server_settings` (as the store's `Settings` are), in the units
/// the server uses: nothing here reads the configuration itself.
///
/// Its `Debug` output lists every field; none holds a secret (the token and
/// TLS files are paths, read by the server).
#[derive(Clone)]
pub struct ServerSettings {
    /// HEALTH_ADDR: the plaintext port serving only gRPC health, for kubelet
    /// probes that cannot speak TLS; `None` for none.
    pub health_addr: Option<SocketAddr>,
    /// HEALTH_CHECK_INTERVAL_MS: how often readiness asks Redis.
    pub health_check_interval: Duration,
    /// What readiness asks of Redis (REDIS_ALLOW_EVICTION,
    /// READINESS_FOLLOWS_REDIS and READINESS_REDIS_FAILURES).
    pub readiness: ReadinessPolicy,
    /// MAX_REQUEST_BYTES: larger requests are refused before they are
    /// decoded.
    pub max_request_bytes: usize,
    /// AUTH_TOKENS_FILE: when set, every call but health needs one of its
    /// bearer tokens; read when the server starts, and again on change.
    pub auth_tokens_file: Option<PathBuf>,
    /// MAX_CONCURRENT_REQUESTS: most calls served at once.
    pub max_concurrent_requests: usize,
    /// REQUEST_TIMEOUT_MS: the longest a call may take.
    pub request_timeout: Duration,
    /// MAX_CONNECTION_AGE: when a connection is asked to close (GOAWAY), so
    /// clients rebalance; `None` (the setting's 0) never.
    pub max_connection_age: Option<Duration>,
    /// MAX_CONNECTION_AGE_GRACE: how long past its age a connection stays
    /// open for its calls to finish before it is closed.
    pub max_connection_age_grace: Duration,
    /// SHUTDOWN_DELAY_MS: how long calls are still served after the shutdown
    /// signal, with readiness NOT_SERVING, before the listener closes.
    pub shutdown_delay: Duration,
    /// TLS_CERT, TLS_KEY and TLS_CLIENT_CA; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// What peers may hold: MAX_CONNECTIONS and the fixed bounds beside it.
    pub bounds: Bounds,
}

impl fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field does not compile until it is
        // listed here.
        let Self {
            health_addr,
            health_check_interval,
            readiness,
            max_request_bytes,
            auth_tokens_file,
            max_concurrent_requests,
            request_timeout,
            max_connection_age,
            max_connection_age_grace,
            shutdown_delay,
            tls,
            bounds,
        } = self;
        f.debug_struct("ServerSettings")
            .field("health_addr", health_addr)
            .field("health_check_interval", health_check_interval)
            .field("readiness", readiness)
            .field("max_request_bytes", max_request_bytes)
            .field("auth_tokens_file", auth_tokens_file)
            .field("max_concurrent_requests", max_concurrent_requests)
            .field("request_timeout", request_timeout)
            .field("max_connection_age", max_connection_age)
            .field("max_connection_age_grace", max_connection_age_grace)
            .field("shutdown_delay", shutdown_delay)
            .field("tls", tls)
            .field("bounds", bounds)
            .finish()
    }
}

/// Bounds on what peers may hold, gathered so tests can shrink them; the
/// server runs with [`Bounds::with_max_connections`] (a field of
/// [`ServerSettings`]). Not part of the supported API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// [`TLS_HANDSHAKE_TIMEOUT`].
    pub tls_handshake_timeout: Duration,
    /// [`limits::MAX_STREAMS`].
    pub max_streams: usize,
    /// Most health Watch streams open at once, both ports together; the
    /// server makes it MAX_CONNECTIONS, [`Bounds::default`]
    /// [`limits::MAX_HEALTH_WATCHES`].
    pub max_health_watches: usize,
    /// MAX_CONNECTIONS: most connections open at once, per port.
    pub max_connections: usize,
    /// [`CONNECTION_IDLE_TIMEOUT`].
    pub connection_idle_timeout: Duration,
    /// How often the TLS files are read again for a changed certificate.
    pub tls_reload_interval: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            max_streams: limits::MAX_STREAMS,
            max_health_watches: limits::MAX_HEALTH_WATCHES,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            connection_idle_timeout: CONNECTION_IDLE_TIMEOUT,
            tls_reload_interval: tls::RELOAD_INTERVAL,
        }
    }
}

impl Bounds {
    /// The bounds the server runs with: the defaults, with `max_connections`
    /// (MAX_CONNECTIONS) connections per port and as many health Watch
    /// streams. gRPC clients'
    /// own health checking opens one Watch per connection and needs no
    /// token, so a smaller pool would let the connections past it (or one
    /// anonymous caller filling it) make healthy pods look unhealthy to
    /// those clients; a Watch costs less memory than the connection it
    /// needs, so this pool adds little to what MAX_CONNECTIONS already
    /// allows.
    pub fn with_max_connections(max_connections: usize) -> Self {
        Self {
            max_connections,
            max_health_watches: max_connections,
            ..Self::default()
        }
    }
}

/// Serves SessionStore, health and reflection on `listener` until `shutdown`
/// completes; then shuts down in this order: readiness (and the overall
/// status) turn NOT_SERVING and stay so; new calls are still served for
/// SHUTDOWN_DELAY_MS, while load balancers and clients notice; the listener
/// closes and open streams (health watches, reflection) end with
/// UNAVAILABLE; in-flight calls finish, and `run` returns.
///
/// The listener is bound by the caller, so tests can bind port 0 and know the
/// address before the server runs.
///
/// # Errors
///
/// [`ServeError`] when the transport fails, reflection cannot be built, or
/// the TLS or token files or HEALTH_ADDR cannot be used.
pub async fn run(
    listener: TcpListener,
    settings: &ServerSettings,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let bounds = settings.bounds;
    let (health, health_service) = tonic_health::server::health_reporter();
    // Readiness starts NOT_SERVING until the first check passes.
    health
        .set_service_status(sessionstore::SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let readiness = tokio::spawn(readiness::watch_redis(
        store.clone(),
        health.clone(),
        settings.health_check_interval,
        settings.readiness,
    ));

    // Both reflection versions: grpc.reflection.v1, and v1alpha for the tools
    // that still speak only it (older grpcurl, grpcui, desktop clients).
    let describe = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sessionstore::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = describe().build_v1()?;
    let reflection_v1alpha = describe().build_v1alpha()?;

    // Every method of every service served here, with its label, whether it
    // streams and whether it is health's: what the layers ask of a call's
    // path (see `methods`).
    let methods = Methods::served().map_err(tonic_reflection::server::Error::from)?;

    let sessions = SessionStoreServer::new(SessionService::new(store))
        .max_decoding_message_size(settings.max_request_bytes);
    // One layer guards every service but health, reflection included.
    let tokens = settings
        .auth_tokens_file
        .as_deref()
        .map(Tokens::load)
        .transpose()?;
    let reloader = tokens.clone().map(|tokens| tokio::spawn(tokens.watch()));
    let max_calls = settings.max_concurrent_requests;
    let rpc_log = RpcLogLayer::new(methods);
    // Streams end when a reload removes their token (see `auth`).
    let auth = AuthLayer::new(tokens, methods);
    let limits = LimitsLayer::new(methods, max_calls, settings.request_timeout)
        .stream_caps(bounds.max_streams, bounds.max_health_watches);

    let mut builder = tonic::transport::Server::builder();
    // TLS is done by `tls`, not tonic's `tls_config`, so the certificate can
    // be reloaded when its files change.
    let tls = match settings.tls.clone() {
        Some(files) => Some(tls::ReloadingTls::load(files).map_err(ServeError::Tls)?),
        None => {
            tracing::warn!(
                "TLS_CERT and TLS_KEY are not set: serving plaintext gRPC; use TLS or a mesh outside a trusted network"
            );
            None
        }
    };
    let tls_reloader = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(bounds.tls_reload_interval)));

    // Stops the plaintext health port, when there is one, with the main server.
    let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
    // Turns true when the listener closes: open streams then end, on both
    // ports, so the drain waits only for calls that end by themselves.
    let (close_streams, closing) = tokio::sync::watch::channel(false);
    let health_port = match settings.health_addr {
        Some(addr) => {
            let listener =
                bind(addr).map_err(|source| ServeError::HealthListener { addr, source })?;
            tracing::info!(addr = %listener.local_addr().map_err(|source| ServeError::HealthListener { addr, source })?, "plaintext health port");
            Some(tokio::spawn(serve_health(
                listener,
                health_service.clone(),
                // The same layer, so the same pools: see `serve_health`.
                limits.clone(),
                bounds,
                health_stopped,
                closing.clone(),
            )))
        }
        None => None,
    };

    // MAX_CONNECTION_AGE: tonic sends the GOAWAY (hyper's graceful
    // shutdown of the connection: calls in flight finish, the client opens a
    // new connection for the next ones, through the Service, to any pod).
    // The grace is enforced below, by `Guarded`, not with tonic's
    // `max_connection_age_grace`: in tonic 0.14.9 setting that replaces the
    // GOAWAY at MAX_CONNECTION_AGE with an abrupt close at age + grace
    // (`connection_timeout_future` returns only ForcefulShutdown then), so
    // every aged connection would be cut, not drained.
    let max_age = settings.max_connection_age;
    if let Some(age) = max_age {
        builder = builder.max_connection_age(age);
    }
    let closed_at_age = max_age.map(|age| age + settings.max_connection_age_grace);
    let incoming = guarded(listener, bounds, closed_at_age, "grpc");
    let stop_readiness = readiness.abort_handle();
    let shutdown = {
        let health = health.clone();
        let delay = settings.shutdown_delay;
        async move {
            shutdown.await;
            // The Redis watcher stops first and for good (awaited, so it is
            // not midway through an update): Redis answering again must not
            // turn readiness back to SERVING during the delay or the drain.
            readiness.abort();
            let _ = readiness.await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(sessionstore::SERVICE_NAME, ServingStatus::NotServing)
                .await;
            tracing::info!(
                delay_ms = delay.as_millis(),
                "shutting down: NOT_SERVING; still serving until SHUTDOWN_DELAY_MS has passed"
            );
            // Load balancers, clients watching health and Kubernetes (its
            // endpoints) stop sending new calls meanwhile.
            tokio::time::sleep(delay).await;
            tracing::info!("closing the listener: ending open streams, draining in-flight calls");
            let _ = close_streams.send(true);
        }
    };

    // tonic's `Router` (axum) is bypassed: see `routes`.
    let routes = routes::route(
        sessions,
        routes::route(
            health_service,
            routes::route(
                reflection,
                routes::route(reflection_v1alpha, routes::Unimplemented),
            ),
        ),
    );
    let server = builder
        // Dead client connections are noticed and dropped.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // See `HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS`.
        .http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS))
        // Without a limit tonic lets one connection open any number of
        // streams (hyper's default of 200 is overridden). One connection may
        // use every permit (session-client multiplexes all its calls over one
        // connection per server), plus room for probes; more could only be
        // refused, so the peer is told to wait instead.
        .max_concurrent_streams(
            u32::try_from(
                max_calls
                    .saturating_add(bounds.max_streams)
                    .saturating_add(bounds.max_health_watches)
                    .saturating_add(HTTP2_PROBE_STREAMS),
            )
            .unwrap_or(u32::MAX),
        )
        // Outermost first: every call is logged, with the code its caller
        // saw (a stream's UNAVAILABLE at shutdown included, hence outside
        // `EndStreamsLayer`); a caller without a token is refused before it
        // takes a permit.
        .layer(rpc_log)
        // Around every service, so every body of every call can be ended at
        // shutdown.
        .layer(EndStreamsLayer::new(closing))
        .layer(auth)
        .layer(limits);
    let result = match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(
                    routes,
                    tls::accept(incoming, tls, bounds.tls_handshake_timeout),
                    shutdown,
                )
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(routes, incoming, shutdown)
                .await
        }
    };
    // Already stopped if the shutdown signal came; not if the transport failed.
    stop_readiness.abort();
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    if let Some(reloader) = tls_reloader {
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
/// probes (which cannot speak TLS) when the main port requires TLS. It keeps
/// answering through the main port's drain; its health watches end when
/// `closing` turns true, with the main port's streams.
///
/// Anyone who can reach the port may call it (health needs no token), so it
/// has the main port's bounds: `limits` is the main port's [`LimitsLayer`]
/// (a clone shares its pools), so Check has the same deadline and Watch
/// streams come out of the same pool of `max_health_watches`. One pool, not
/// one per port: Watch needs no token on either port, so a second pool would
/// protect nothing and would double what anonymous callers may hold open;
/// shared, the process holds at most `max_health_watches` of them whichever
/// port they came in on, and probes (Check, exempt from the caps) still
/// answer when the pool is full. HTTP/2 lets one connection open that many
/// streams plus [`HTTP2_PROBE_STREAMS`]; a peer asking for more is told to
/// wait instead of holding memory for streams that could only be refused.
async fn serve_health<S>(
    listener: TcpListener,
    health_service: S,
    limits: LimitsLayer,
    bounds: Bounds,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    closing: tokio::sync::watch::Receiver<bool>,
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
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_concurrent_streams(
            u32::try_from(
                bounds
                    .max_health_watches
                    .saturating_add(HTTP2_PROBE_STREAMS),
            )
            .unwrap_or(u32::MAX),
        )
        .layer(EndStreamsLayer::new(closing))
        .layer(limits)
        .add_service(health_service)
        // No MAX_CONNECTION_AGE here: probes open a connection each, and
        // nothing needs balancing.
        .serve_with_incoming_shutdown(guarded(listener, bounds, None, "health"), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await
}

/// How often an idle connection is pinged, on both ports, so a dead peer's
/// connection is noticed and dropped.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a ping may go unanswered before its connection is dropped.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams per connection beyond the caps, for health checks, which no cap
/// counts.
const HTTP2_PROBE_STREAMS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// The server runs with MAX_CONNECTIONS connections per port and as
    /// many health watches: one Watch per connection always fits.
    #[test]
    fn bounds_follow_max_connections() {
        let bounds = Bounds::with_max_connections(3000);
        assert_eq!(bounds.max_connections, 3000);
        assert_eq!(bounds.max_health_watches, 3000);
        assert_eq!(bounds.max_streams, limits::MAX_STREAMS);
    }
}
