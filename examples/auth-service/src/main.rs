//! Runs the example auth service: settings from the environment (see
//! `config.rs` and the README), SessionStore's client, the routes, until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use auth_service::{Config, connect, router};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let (config, random_secret) = Config::from_env()?;
    if random_secret {
        tracing::warn!("JWT_SECRET unset: a random key for this run; tokens end with it");
    }
    let client = connect(&config)
        .await
        .context("SESSIONSTORE_URL or SESSIONSTORE_TOKEN")?;
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("AUTH_LISTEN_ADDR: cannot listen on {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, sessionstore = %config.sessionstore_url, "auth service listening");
    let app = router(config, client).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
        .context("serving")
}

/// SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends).
async fn shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
