//! The `session-server` binary: reads the configuration, sets up logging,
//! binds the listener and serves until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use session_server::{Config, Store, config::LogFormat, server};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// How long in-flight calls may take to finish after a shutdown signal. Keep
/// it below the pod's terminationGracePeriodSeconds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
    init_tracing(config.log_format);
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
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");

    let metrics = session_server::metrics::install().context("installing the metrics recorder")?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
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
        let config = config.clone();
        async move {
            server::run(listener, &config, store, async {
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
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(result) => result?.context("server failed")?,
        Err(_) => tracing::warn!(
            ?DRAIN_TIMEOUT,
            "calls still in flight after the drain timeout"
        ),
    }
    // Metrics stay up through the drain, so the last scrape sees it.
    let _ = metrics_stop_tx.send(());
    if let Ok(Err(err)) = metrics_server.await {
        tracing::warn!(error = %err, "metrics endpoint failed");
    }
    tracing::info!("stopped");
    Ok(())
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

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
