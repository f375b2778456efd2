//! The `session-server` binary: reads the configuration, sets up logging,
//! binds the listener and serves until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use session_server::{Config, Store, config::LogFormat, server, trace::Tracing};
use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::{
    EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt,
};

/// mimalloc instead of glibc malloc: 10 % fewer instructions per GetSession,
/// 13 % per CreateSession, and fewer than jemalloc, for a larger but bounded
/// RSS (BENCHMARKS.md, "#15 hot path").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The longest the shutdown waits for the queued spans to be exported (with
/// traces on), within what is left of SHUTDOWN_DELAY_MS plus the drain: a
/// collector that does not answer costs the spans, not the pod's grace
/// period.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long in-flight calls may take to finish once the listener has closed
/// (SHUTDOWN_DELAY_MS after the shutdown signal). Keep SHUTDOWN_DELAY_MS plus
/// this below the pod's terminationGracePeriodSeconds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Most log lines waiting for stdout. Lines are written by a thread of their
/// own, so a slow or blocked stdout (a stalled log collector, a full pipe)
/// never makes a worker wait: once this many lines are queued, new lines are
/// dropped and counted (LOG_LINES_DROPPED). At a few hundred bytes a line
/// this is a few MiB at most, and with the RPC lines rate-limited
/// (`observe.rs`) it is reached only when stdout stops for a while.
const LOG_BUFFER_LINES: usize = 8192;

/// How often the count of dropped log lines is copied to its metric.
const LOG_DROPS_INTERVAL: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
    // Traces, when OTEL_EXPORTER_OTLP_ENDPOINT is set: started before the
    // log so its layer joins the subscriber; the exporter connects lazily.
    let traces = match config
        .trace_settings()
        .map(|s| Tracing::start(&s))
        .transpose()
    {
        Ok(traces) => traces,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    // Kept to the end of `main`: dropping it flushes the queued lines, so the
    // last ones (the drain, "stopped") are not lost at exit.
    let (_log_flush, log_drops) = init_tracing(config.log_format, traces.as_ref());
    if let Some(settings) = config.trace_settings() {
        tracing::info!(
            endpoint = %settings.endpoint,
            service = %settings.service_name,
            sampler = ?settings.sampler,
            ratio = settings.ratio,
            "exporting traces"
        );
    }
    raise_fd_limit(&config);
    // rustls needs a process-wide crypto provider before the first TLS
    // handshake (gRPC TLS or rediss://); both use ring. An Err means one is
    // already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let settings = match config.store_settings() {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let store = Store::new(settings).context("REDIS_URL")?;
    if let Err(err) = store.ping().await {
        tracing::warn!(error = %err, "redis does not answer yet; starting NOT_SERVING");
    }
    // `server::bind`: `[::]` (the manifests' setting) takes IPv4 too.
    let listener = server::bind(config.listen_addr)
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");

    let metrics = session_server::metrics::install().context("installing the metrics recorder")?;
    tokio::spawn(count_log_drops(log_drops));
    let metrics_listener = server::bind(config.metrics_addr)
        .with_context(|| format!("binding METRICS_ADDR {}", config.metrics_addr))?;
    tracing::info!(addr = %metrics_listener.local_addr()?, "metrics at /metrics");
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = tokio::spawn(session_server::metrics::serve(
        metrics_listener,
        metrics,
        async {
            let _ = metrics_stop_rx.await;
        },
    ));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let server_settings = config.server_settings();
        async move {
            server::run(listener, &server_settings, store, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => return result?.context("server failed"),
        () = shutdown_signal() => {}
    }
    let _ = stop_tx.send(());
    let stopping = tokio::time::Instant::now();
    // The server serves on through the delay, then drains. A second signal
    // (a second Ctrl-C) stops it at once, dropping what is in flight.
    let limit = Duration::from_millis(config.shutdown_delay_ms) + DRAIN_TIMEOUT;
    tokio::select! {
        finished = tokio::time::timeout(limit, &mut server) => match finished {
            Ok(result) => result?.context("server failed")?,
            Err(_) => tracing::warn!(
                ?DRAIN_TIMEOUT,
                "calls still in flight after the drain timeout"
            ),
        },
        () = shutdown_signal() => tracing::warn!(
            "second signal: stopping now, without waiting for SHUTDOWN_DELAY_MS or the drain"
        ),
    }
    // Metrics stay up through the drain, so the last scrape sees it.
    let _ = metrics_stop_tx.send(());
    if let Ok(Err(err)) = metrics_server.await {
        tracing::warn!(error = %err, "metrics endpoint failed");
    }
    if let Some(traces) = traces {
        let budget = limit
            .saturating_sub(stopping.elapsed())
            .min(TRACE_FLUSH_TIMEOUT);
        // The SDK's shutdown blocks until its export thread answers.
        let flushed = tokio::task::spawn_blocking(move || traces.shutdown(budget)).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, ?budget, "queued spans not exported"),
            Err(err) => tracing::warn!(error = %err, "the span export did not stop"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// File descriptors the process needs besides its client connections: the
/// standard streams, the runtime's epoll and wakers, the three listeners,
/// metrics scrapes, the revocation subscription, the TLS and token files
/// read again, Redis connections being replaced. The Redis pool is counted
/// apart.
const FD_RESERVE: u64 = 64;

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit, as
/// Go's runtime does: the soft limit is often 1024 while MAX_CONNECTIONS
/// per port needs far more, and a process out of descriptors cannot accept
/// even a health probe. Logs the limit in force, and warns when
/// MAX_CONNECTIONS on every port, the Redis pool and [`FD_RESERVE`] do not
/// fit under it (the server then runs out of descriptors before it reaches
/// MAX_CONNECTIONS, and pauses accepting, with a warning, whenever it does).
fn raise_fd_limit(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};

    let before = getrlimit(Resource::Nofile);
    if before.current.is_some() && before.current != before.maximum {
        let raised = rustix::process::Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(
                error = %err,
                soft = before.current,
                hard = before.maximum,
                "cannot raise the open file limit (RLIMIT_NOFILE) to its hard limit"
            );
        }
    }
    // `None` is unlimited.
    let limit = getrlimit(Resource::Nofile).current;
    let ports: u64 = if config.health_addr.is_some() { 2 } else { 1 };
    let needed = ports
        .saturating_mul(u64::from(config.max_connections))
        .saturating_add(u64::from(config.redis_pool_size))
        .saturating_add(FD_RESERVE);
    tracing::info!(
        soft = limit,
        hard = before.maximum,
        was = before.current,
        needed,
        "open file limit (RLIMIT_NOFILE)"
    );
    if let Some(limit) = limit.filter(|&limit| limit < needed) {
        tracing::warn!(
            limit,
            needed,
            max_connections = config.max_connections,
            ports,
            "the open file limit is below MAX_CONNECTIONS on every port plus the Redis pool \
             and a reserve: the server will run out of file descriptors before it reaches \
             MAX_CONNECTIONS (accepting then pauses). Fix: raise the hard limit (ulimit -Hn, \
             the container runtime's nofile) or lower MAX_CONNECTIONS"
        );
    }
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (a terminal).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// Installs the log subscriber, writing to stdout through a bounded, lossy
/// queue (see [`LOG_BUFFER_LINES`]), and the traces' layer when `traces`.
/// Returns the guard that flushes the queue when dropped, and the count of
/// lines dropped because the queue was full.
fn init_tracing(format: LogFormat, traces: Option<&Tracing>) -> (WorkerGuard, ErrorCounter) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("log-writer")
        .finish(std::io::stdout());
    let drops = writer.error_counter();
    // The spans that become traces are the traces' layer's alone.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(session_server::trace::log_directive());
    let Some(traces) = traces else {
        // Without traces, one global filter and no per-layer filters, as
        // before traces existed: what every call pays stays as it was.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .init(),
        }
        return (guard, drops);
    };
    // With traces, each layer has its own filter: the log's as above, the
    // traces' its target alone. (No `Option` of a layer: a missing layer
    // says it wants everything, which would enable every call site.)
    let log = tracing_subscriber::fmt::layer().with_writer(writer);
    let log = match format {
        LogFormat::Text => log.with_filter(filter).boxed(),
        LogFormat::Json => log
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    Registry::default().with(traces.layer()).with(log).init();
    (guard, drops)
}

/// Copies the count of log lines dropped for a full queue to
/// LOG_LINES_DROPPED, and says so in the log (if there is room) when it grows.
async fn count_log_drops(drops: ErrorCounter) {
    let counter = metrics::counter!(session_server::metrics::LOG_LINES_DROPPED);
    let mut ticker = tokio::time::interval(LOG_DROPS_INTERVAL);
    let mut reported = 0;
    loop {
        ticker.tick().await;
        let dropped = drops.dropped_lines();
        if dropped > reported {
            counter.absolute(u64::try_from(dropped).unwrap_or(u64::MAX));
            tracing::warn!(
                dropped = dropped - reported,
                "log lines dropped: stdout did not keep up"
            );
            reported = dropped;
        }
    }
}
