//! The transport: the tonic server with its layers, gRPC health, reflection
//! and graceful shutdown. No session logic lives here.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

mod routes;
mod tls;

use sessionstore::v1::session_store_server::SessionStoreServer;
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::{AuthError, AuthLayer, Tokens},
    config::Config,
    limits::{self, LimitsLayer},
    observe::RpcLogLayer,
    service::SessionService,
    shutdown::EndStreamsLayer,
    store::{
        Store,
        health::{MaxmemoryPolicy, NOEVICTION},
    },
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

/// Bounds on what peers may hold, gathered so tests can shrink them; [`run`]
/// uses [`Bounds::from_config`]. Not part of the supported API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// [`TLS_HANDSHAKE_TIMEOUT`].
    pub tls_handshake_timeout: Duration,
    /// [`limits::MAX_STREAMS`].
    pub max_streams: usize,
    /// Most health Watch streams open at once, both ports together; [`run`]
    /// makes it MAX_CONNECTIONS, [`Bounds::default`]
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
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS as usize,
            connection_idle_timeout: CONNECTION_IDLE_TIMEOUT,
            tls_reload_interval: tls::RELOAD_INTERVAL,
        }
    }
}

impl Bounds {
    /// The bounds [`run`] serves with: the defaults, with MAX_CONNECTIONS
    /// connections per port and as many health Watch streams. gRPC clients'
    /// own health checking opens one Watch per connection and needs no
    /// token, so a smaller pool would let the connections past it (or one
    /// anonymous caller filling it) make healthy pods look unhealthy to
    /// those clients; a Watch costs less memory than the connection it
    /// needs, so this pool adds little to what MAX_CONNECTIONS already
    /// allows.
    pub fn from_config(config: &Config) -> Self {
        let max_connections = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
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
/// [`ServeError`] when the transport fails or reflection cannot be built.
pub async fn run(
    listener: TcpListener,
    config: &Config,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_bounds(
        listener,
        config,
        store,
        shutdown,
        Bounds::from_config(config),
    )
    .await
}

/// [`run`] with other [`Bounds`], for tests. Not part of the supported API.
///
/// # Errors
///
/// As [`run`].
#[doc(hidden)]
pub async fn run_with_bounds(
    listener: TcpListener,
    config: &Config,
    store: Store,
    shutdown: impl Future<Output = ()>,
    bounds: Bounds,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Readiness starts NOT_SERVING until the first check passes.
    health
        .set_service_status(sessionstore::SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let readiness = tokio::spawn(watch_redis(
        store.clone(),
        health.clone(),
        Duration::from_millis(config.health_check_interval_ms),
        ReadinessPolicy {
            allow_eviction: config.redis_allow_eviction,
            follows_redis: config
                .readiness_follows_redis
                .then_some(config.readiness_redis_failures),
        },
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

    // Every method that streams, in every service served here: they hold a
    // stream permit for their whole life (see `limits`).
    let streaming = limits::streaming_methods(&[
        sessionstore::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
    .map_err(tonic_reflection::server::Error::from)?;

    let max_request = usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX);
    let sessions =
        SessionStoreServer::new(SessionService::new(store)).max_decoding_message_size(max_request);
    // One layer guards every service but health, reflection included.
    let tokens = config
        .auth_tokens_file
        .as_deref()
        .map(Tokens::load)
        .transpose()?;
    let reloader = tokens.clone().map(|tokens| tokio::spawn(tokens.watch()));
    let max_calls = usize::try_from(config.max_concurrent_requests).unwrap_or(usize::MAX);
    let rpc_log = RpcLogLayer::default().streaming(streaming.clone());
    // Streams end when a reload removes their token (see `auth`).
    let auth = AuthLayer::new(tokens).streaming(streaming.clone());
    let limits = LimitsLayer::new(max_calls, Duration::from_millis(config.request_timeout_ms))
        .streaming(streaming, bounds.max_streams, bounds.max_health_watches);

    let mut builder = tonic::transport::Server::builder();
    // TLS is done by `tls`, not tonic's `tls_config`, so the certificate can
    // be reloaded when its files change.
    let tls = match tls::TlsFiles::from_config(config) {
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
    let health_port = match config.health_addr {
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
    let max_age =
        (config.max_connection_age > 0).then(|| Duration::from_secs(config.max_connection_age));
    if let Some(age) = max_age {
        builder = builder.max_connection_age(age);
    }
    let closed_at_age =
        max_age.map(|age| age + Duration::from_secs(config.max_connection_age_grace));
    let incoming = guarded(listener, bounds, closed_at_age, "grpc");
    let stop_readiness = readiness.abort_handle();
    let shutdown = {
        let health = health.clone();
        let delay = Duration::from_millis(config.shutdown_delay_ms);
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

/// Binds a listener on `addr`. An unspecified IPv6 address (`[::]`) listens
/// on IPv4 too (IPV6_V6ONLY off, whatever the host's default,
/// `net.ipv6.bindv6only`), so one setting serves IPv4, IPv6-only and
/// dual-stack clusters; IPv4 peers then appear as `::ffff:a.b.c.d`.
///
/// # Errors
///
/// The I/O error of creating, configuring or binding the socket.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};

    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // As std and tokio do: a restarted server can bind while old
    // connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The backlog tokio's `TcpListener::bind` uses.
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
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

/// The connections accepted on `listener`, at most `bounds.max_connections`
/// open at once, each closed once it has sent nothing for
/// `bounds.connection_idle_timeout`, or once it has been open for
/// `closed_at_age` (MAX_CONNECTION_AGE plus its grace) when that is set.
/// `port` names the port in the accept warnings ("grpc" or "health").
fn guarded(
    listener: TcpListener,
    bounds: Bounds,
    closed_at_age: Option<Duration>,
    port: &'static str,
) -> Guard {
    Guard {
        incoming: TcpIncoming::from(listener).with_nodelay(Some(true)),
        permits: Arc::new(Semaphore::new(bounds.max_connections)),
        acquiring: None,
        permit: None,
        idle: bounds.connection_idle_timeout,
        closed_at_age,
        port,
        max_connections: bounds.max_connections,
        paused: None,
        exhausted: AcceptErrors::default(),
    }
}

/// How long accepting pauses after an accept fails for want of a resource
/// (file descriptors, kernel memory). tonic retries a failed accept at once
/// and logs it only at trace level, so without a pause the accept loop spins
/// on EMFILE at 100 % of a core, starving the health port and the calls on
/// open connections, until a connection closes. Connections wait in the
/// kernel's backlog meanwhile. hyper 0.14 paused 1 s (`sleep_on_errors`);
/// 100 ms costs nothing (ten failed `accept` calls a second) and takes up
/// the waiting connections soon after a descriptor is freed.
const ACCEPT_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// The least time between two warnings about failed accepts on one port.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failed accept means the process or the host is out of a
/// resource (file descriptors, memory): retrying at once cannot succeed.
/// Other errors (ECONNABORTED: the peer gave up while queued) concern one
/// connection, and the next accept may succeed at once.
fn is_resource_exhaustion(err: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(err).is_some_and(|errno| {
        [Errno::MFILE, Errno::NFILE, Errno::NOMEM, Errno::NOBUFS].contains(&errno)
    })
}

/// The accepts that failed for want of a resource since the last warning.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// When the last warning was logged.
    warned_at: Option<tokio::time::Instant>,
    /// Failures since then, not yet reported.
    unreported: u64,
}

impl AcceptErrors {
    /// Counts `err` and logs a warning, naming the cause and the fix, unless
    /// one was logged within [`ACCEPT_WARNING_INTERVAL`].
    fn record(&mut self, err: &std::io::Error, port: &'static str, max_connections: usize) {
        self.unreported = self.unreported.saturating_add(1);
        let now = tokio::time::Instant::now();
        if self
            .warned_at
            .is_some_and(|at| now.duration_since(at) < ACCEPT_WARNING_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            port,
            error = %err,
            failed_accepts = self.unreported,
            pause_ms = ACCEPT_EXHAUSTED_PAUSE.as_millis(),
            max_connections,
            "cannot accept connections: the process is out of file descriptors or memory; \
             pausing accepts (connections wait in the backlog). Fix: raise the file \
             descriptor limit (ulimit -n, the container runtime's nofile) above twice \
             MAX_CONNECTIONS plus the Redis pool, or lower MAX_CONNECTIONS"
        );
        self.warned_at = Some(now);
        self.unreported = 0;
    }
}

/// The stream of accepted connections made by [`guarded`]: it takes a
/// connection permit before it accepts, so at the cap it stops accepting
/// rather than accept and close.
struct Guard {
    incoming: TcpIncoming,
    permits: Arc<Semaphore>,
    /// The wait for a permit, while none is free.
    acquiring: Option<Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
    /// The permit for the next connection accepted.
    permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    closed_at_age: Option<Duration>,
    /// The port's name, for the warnings.
    port: &'static str,
    /// MAX_CONNECTIONS, for the warnings.
    max_connections: usize,
    /// Set after an accept failed for want of a resource: no accept until
    /// it fires (see [`ACCEPT_EXHAUSTED_PAUSE`]).
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
    exhausted: AcceptErrors,
}

impl tokio_stream::Stream for Guard {
    type Item = std::io::Result<Guarded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // `Guard` is `Unpin`: its fields are.
        let this = self.get_mut();
        loop {
            if let Some(paused) = this.paused.as_mut() {
                std::task::ready!(paused.as_mut().poll(cx));
                this.paused = None;
            }
            if this.permit.is_none() {
                let permits = &this.permits;
                let acquiring = this.acquiring.get_or_insert_with(|| {
                    let permits = permits.clone();
                    // The semaphore is never closed, so `None` cannot happen;
                    // the stream would end if it did.
                    Box::pin(async move { permits.acquire_owned().await.ok() })
                });
                let permit = std::task::ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                let Some(permit) = permit else {
                    return Poll::Ready(None);
                };
                this.permit = Some(permit);
            }
            let accepted = match std::task::ready!(Pin::new(&mut this.incoming).poll_next(cx)) {
                None => return Poll::Ready(None),
                // Not handed to tonic, which would only retry at once: the
                // pause is polled on the next turn of the loop, so this
                // task wakes when it ends. The permit is kept for the next
                // connection.
                Some(Err(err)) if is_resource_exhaustion(&err) => {
                    this.exhausted.record(&err, this.port, this.max_connections);
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_EXHAUSTED_PAUSE)));
                    continue;
                }
                Some(accepted) => accepted,
            };
            // Any other accept error goes to tonic, which retries at once;
            // the permit is kept for the next connection.
            let inner = match accepted {
                Ok(inner) => inner,
                Err(err) => return Poll::Ready(Some(Err(err))),
            };
            let permit = this.permit.take();
            return Poll::Ready(Some(Ok(Guarded {
                inner,
                _permit: permit,
                idle: this.idle,
                last_read: tokio::time::Instant::now(),
                silent_until: Box::pin(tokio::time::sleep(this.idle)),
                closed_at_age: this.closed_at_age,
                too_old_at: this
                    .closed_at_age
                    .map(|age| Box::pin(tokio::time::sleep(age))),
            })));
        }
    }
}

/// An accepted connection: holds its connection permit until it closes,
/// and fails its next read once the peer has sent nothing for `idle`, or
/// once it is older than MAX_CONNECTION_AGE plus its grace.
struct Guarded {
    inner: tokio::net::TcpStream,
    /// Always `Some` (taken from [`Guard`], which had one before accepting);
    /// an `Option` only so no code path has to assert it.
    _permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    /// When the last read that brought bytes returned.
    last_read: tokio::time::Instant,
    /// Fires at the earliest moment the connection can have been silent for
    /// `idle`; when it fires it is pushed to `last_read + idle` if bytes came
    /// since. Moving the timer on every read instead cost a timer-wheel
    /// removal and insertion per read (BENCHMARKS.md, #15).
    silent_until: Pin<Box<tokio::time::Sleep>>,
    /// MAX_CONNECTION_AGE plus its grace, when set.
    closed_at_age: Option<Duration>,
    /// When the connection, asked to close at MAX_CONNECTION_AGE, has had
    /// its grace: what is still open on it then (a stream) is cut. Counted
    /// from the accept, and again from the end of the TLS handshake (see
    /// [`Guarded::start_age_clock`]).
    too_old_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tls::AgeClock for Guarded {
    /// tonic starts its MAX_CONNECTION_AGE clock when it is handed the
    /// connection: at once in plaintext, after the handshake with TLS. The
    /// grace is counted from the same moment, so a slow handshake does not
    /// eat into it and cut a call before the GOAWAY.
    fn start_age_clock(&mut self) {
        if let (Some(age), Some(at)) = (self.closed_at_age, self.too_old_at.as_mut()) {
            at.as_mut().reset(tokio::time::Instant::now() + age);
        }
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // `Guarded` is `Unpin`: its fields are.
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = tokio::time::Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            // hyper (or the TLS handshake) always has a read waiting, so the
            // timer is polled for as long as the connection is open.
            Poll::Pending => {
                if this
                    .too_old_at
                    .as_mut()
                    .is_some_and(|at| at.as_mut().poll(cx).is_ready())
                {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the connection outlived MAX_CONNECTION_AGE and its grace",
                    )));
                }
                while this.silent_until.as_mut().poll(cx).is_ready() {
                    let due = this.last_read + this.idle;
                    if due <= tokio::time::Instant::now() {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the peer sent nothing within the connection idle timeout",
                        )));
                    }
                    // Bytes came since it was set: wait for the rest.
                    this.silent_until.as_mut().reset(due);
                }
                Poll::Pending
            }
        }
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    // The peer's address, as tonic gives it for a plain `TcpStream`: the
    // rate limits key on it.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// How often an idle connection is pinged, on both ports, so a dead peer's
/// connection is noticed and dropped.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a ping may go unanswered before its connection is dropped.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams per connection beyond the caps, for health checks, which no cap
/// counts.
const HTTP2_PROBE_STREAMS: usize = 16;

/// What readiness asks of Redis, from the configuration.
#[derive(Clone, Copy, Debug)]
struct ReadinessPolicy {
    /// REDIS_ALLOW_EVICTION: an evicting Redis does not block readiness.
    allow_eviction: bool,
    /// READINESS_FOLLOWS_REDIS: `Some(n)` turns readiness NOT_SERVING after
    /// `n` failed checks in a row (READINESS_REDIS_FAILURES); `None` leaves
    /// it SERVING through an outage.
    follows_redis: Option<u32>,
}

/// Keeps the readiness status ("sessionstore.v1.SessionStore") in step with
/// whether this pod should get calls. The overall status ("") stays SERVING:
/// nothing here is fixed by restarting the process.
///
/// Readiness is NOT_SERVING
/// - until Redis has answered once since the start, and answered the access
///   check (`Store::check_access`: a script and a harmless write on a key
///   under KEY_PREFIX, and `role:master`), in both modes: a pod that has
///   never reached Redis, or cannot use its keys (an ACL without them, a
///   REDIS_URL naming a replica), is misconfigured, and a rollout must stop
///   at it rather than replace every working pod with one;
/// - while a master may evict keys (`maxmemory-policy` is not `noeviction`
///   and `maxmemory` is set: with no limit Redis never evicts), unless
///   `allow_eviction` (REDIS_ALLOW_EVICTION) accepts the risk, in both
///   modes: that is a misconfiguration, not an outage;
/// - with READINESS_FOLLOWS_REDIS only, once READINESS_REDIS_FAILURES checks
///   in a row have failed, until one answers.
///
/// By default a Redis outage leaves readiness SERVING: Redis is shared, so
/// it would take every pod out of every endpoint list at once, and clients
/// would see connection refused and back off (up to 120 s with gRPC's
/// default backoff) instead of a fast UNAVAILABLE they retry. REDIS_UP says
/// Redis is down, for the alert.
///
/// The policy is read with `INFO memory` on every tick that PING answers: one
/// more round trip per master per HEALTH_CHECK_INTERVAL_MS, which costs Redis
/// about 3 µs of CPU (`INFO commandstats` on Redis 7.0 with 100,000 keys:
/// 2.84 µs per call, PING 0.04 µs) and a fix made at run time is seen on the
/// next tick, without a restart.
///
/// When `INFO` fails while PING answers (an ACL without `+info`, a proxy that
/// does not forward it) the last policy read stands; if none was ever read,
/// the policy is unknown and does not block readiness: refusing to serve
/// because a diagnostic is forbidden would turn a locked-down Redis into an
/// outage. A warning says so once, and REDIS_EVICTION_POLICY_OK reads -1.
///
/// The access check runs on the ticks where PING answers only until it first
/// passes, not on every tick: it exists to stop a misconfigured pod from ever
/// turning ready, which one success disproves. After that, a Redis that
/// starts refusing (an ACL changed at run time, a failover) is shared by
/// every pod, like an outage: taking them all out of the endpoints at once
/// would turn fast call errors into connection refused, the reason
/// READINESS_FOLLOWS_REDIS is off by default; and a demoted master's
/// connections are replaced on READONLY anyway (`connection.rs`). It also
/// keeps the steady state at PING and INFO: three more round trips per tick
/// would be spent on an answer that does not change.
async fn watch_redis(
    store: Store,
    health: HealthReporter,
    interval: Duration,
    policy: ReadinessPolicy,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = None;
    let mut eviction = Eviction::Unknown;
    let mut info_failing = false;
    let mut readiness = None;
    // Whether Redis has answered (and passed the access check) since the
    // start, and the failed checks since it last answered.
    let mut reached = false;
    let mut failures: u32 = 0;
    // The cause of the access check's last failure, so each is logged once.
    let mut access_refused: Option<&'static str> = None;
    loop {
        ticker.tick().await;
        let ping = store.ping().await;
        let up = ping.is_ok();
        if up && !reached {
            match store.check_access().await {
                Ok(()) => {
                    if access_refused.is_some() {
                        tracing::info!("redis access check passes");
                    }
                    reached = true;
                }
                Err(Ok(refused)) => {
                    if access_refused != Some(refused.cause()) {
                        tracing::error!(
                            cause = refused.cause(),
                            error = %refused,
                            fix = refused.fix(),
                            "redis answers PING but refuses what calls need ({}): readiness stays NOT_SERVING. Fix: {}",
                            refused.cause(),
                            refused.fix()
                        );
                        access_refused = Some(refused.cause());
                    }
                }
                // Not an access problem: the next tick tries again.
                Err(Err(err)) => tracing::debug!(error = %err, "redis access check did not answer"),
            }
        }
        if up {
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
        }
        metrics::gauge!(crate::metrics::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        store.record_pool_metrics();
        if was_up != Some(up) {
            match &ping {
                Ok(()) => tracing::info!("redis answers"),
                Err(err) if policy.follows_redis.is_none() && reached => tracing::warn!(
                    error = %err,
                    "redis does not answer: calls fail with UNAVAILABLE; readiness stays SERVING (READINESS_FOLLOWS_REDIS is off)"
                ),
                Err(err) => tracing::warn!(error = %err, "redis does not answer"),
            }
            was_up = Some(up);
        }

        // A Redis that does not answer PING would not answer INFO either; the
        // last policy read stands until it does.
        if up {
            match store.maxmemory_policies().await {
                Ok(policies) => {
                    if info_failing {
                        tracing::info!("INFO memory answers again");
                        info_failing = false;
                    }
                    let now = Eviction::from_policies(policies);
                    if now != eviction {
                        now.log(policy.allow_eviction);
                        eviction = now;
                    }
                }
                Err(err) if !info_failing => {
                    info_failing = true;
                    tracing::warn!(
                        error = %err,
                        last_known = eviction.describe(),
                        "cannot read maxmemory-policy (INFO memory failed while PING answers): readiness keeps the last policy read, and does not wait for one if none was; allow INFO for this Redis user so eviction can be detected"
                    );
                }
                Err(_) => {}
            }
        }
        metrics::gauge!(crate::metrics::REDIS_EVICTION_POLICY_OK).set(eviction.gauge());

        let now = if matches!(eviction, Eviction::Possible(_)) && !policy.allow_eviction {
            Readiness::RedisEvicts
        } else if !reached || policy.follows_redis.is_some_and(|limit| failures >= limit) {
            Readiness::RedisDown
        } else {
            Readiness::Serving
        };
        for state in crate::metrics::READINESS_STATES {
            let value = if state == now.as_str() { 1.0 } else { 0.0 };
            metrics::gauge!(crate::metrics::READINESS, "state" => state).set(value);
        }
        if readiness != Some(now) {
            let status = if now == Readiness::Serving {
                tracing::info!(state = now.as_str(), "ready: serving");
                ServingStatus::Serving
            } else {
                tracing::warn!(state = now.as_str(), "not ready: not serving");
                ServingStatus::NotServing
            };
            health
                .set_service_status(sessionstore::SERVICE_NAME, status)
                .await;
            readiness = Some(now);
        }
    }
}

/// Why readiness is what it is; the `state` label of the READINESS metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readiness {
    Serving,
    RedisDown,
    RedisEvicts,
}

impl Readiness {
    fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::RedisDown => "redis_down",
            Self::RedisEvicts => "redis_evicts",
        }
    }
}

/// What the last successful read of the masters' `maxmemory-policy` found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Eviction {
    /// Never read: INFO has not answered yet (or is forbidden).
    Unknown,
    /// Every master keeps its keys (`noeviction`, or `maxmemory` 0).
    Never,
    /// These masters may evict keys.
    Possible(Vec<MaxmemoryPolicy>),
}

impl Eviction {
    fn from_policies(policies: Vec<MaxmemoryPolicy>) -> Self {
        let evicting: Vec<_> = policies.into_iter().filter(|p| p.evicts()).collect();
        if evicting.is_empty() {
            Self::Never
        } else {
            Self::Possible(evicting)
        }
    }

    fn gauge(&self) -> f64 {
        match self {
            Self::Unknown => -1.0,
            Self::Never => 1.0,
            Self::Possible(_) => 0.0,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Unknown => "unknown".into(),
            Self::Never => NOEVICTION.into(),
            Self::Possible(masters) => masters
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Logs the policy just read, which differs from the one before: an error
    /// per evicting master (a warning when REDIS_ALLOW_EVICTION accepts it),
    /// naming the master, its policy and the fix.
    fn log(&self, allow_eviction: bool) {
        match self {
            Self::Unknown => {}
            Self::Never => tracing::info!(
                maxmemory_policy = NOEVICTION,
                "every Redis master keeps its keys (maxmemory-policy noeviction, or no maxmemory limit)"
            ),
            Self::Possible(masters) => {
                for master in masters {
                    let node = master.node.as_deref().unwrap_or("master");
                    if allow_eviction {
                        tracing::warn!(
                            node,
                            maxmemory_policy = %master.policy,
                            maxmemory = master.maxmemory,
                            "Redis may evict keys (maxmemory-policy {} is not noeviction and maxmemory is {} bytes); serving anyway because REDIS_ALLOW_EVICTION=true: evicted session indexes and token reservations break RevokeAllUserSessions, the per-user session cap and token uniqueness",
                            master.policy,
                            master.maxmemory
                        );
                    } else {
                        tracing::error!(
                            node,
                            maxmemory_policy = %master.policy,
                            maxmemory = master.maxmemory,
                            "Redis may evict keys (maxmemory-policy {} is not noeviction and maxmemory is {} bytes): evicted session indexes and token reservations silently break RevokeAllUserSessions, the per-user session cap and token uniqueness, so readiness stays NOT_SERVING. Fix: run `CONFIG SET maxmemory-policy noeviction` on this master and set `maxmemory-policy noeviction` in its redis.conf (or the managed service's parameters) so a restart keeps it; or set REDIS_ALLOW_EVICTION=true to serve anyway and accept the risk",
                            master.policy,
                            master.maxmemory
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept errors that pause accepting are those of an exhausted
    /// resource; a connection aborted while queued is retried at once.
    #[test]
    fn only_resource_exhaustion_pauses_accepting() {
        for errno in [24, 23, 12, 105] {
            assert!(
                is_resource_exhaustion(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [103, 104, 71, 110] {
            assert!(
                !is_resource_exhaustion(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_resource_exhaustion(&std::io::Error::other("x")));
    }

    /// `run` serves with MAX_CONNECTIONS connections per port and as many
    /// health watches: one Watch per connection always fits.
    #[test]
    fn bounds_follow_max_connections() {
        let mut config = Config::defaults();
        config.max_connections = 3000;
        let bounds = Bounds::from_config(&config);
        assert_eq!(bounds.max_connections, 3000);
        assert_eq!(bounds.max_health_watches, 3000);
        assert_eq!(bounds.max_streams, limits::MAX_STREAMS);
    }

    /// `[::]` takes IPv4 connections too (the manifests' LISTEN_ADDR), and an
    /// IPv4 address binds as before.
    #[tokio::test]
    async fn unspecified_ipv6_listens_on_ipv4_too() {
        let listener = match bind("[::]:0".parse().unwrap()) {
            Ok(listener) => listener,
            // A kernel without IPv6 (ipv6.disable=1) cannot test this.
            Err(err) if err.raw_os_error() == Some(97) => {
                eprintln!("skipped: no IPv6 here ({err})");
                return;
            }
            Err(err) => panic!("binding [::]:0: {err}"),
        };
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|(_, peer)| peer) });
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("an IPv4 client could not connect to [::]");
        let peer = accepted.await.unwrap().unwrap();
        assert_eq!(
            peer.ip(),
            "::ffff:127.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );

        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
    }
}
