//! An auth service on SessionStore, small enough to read in one sitting and
//! complete enough to start from: login with rate limits and trusted devices,
//! refresh with rotation and reuse detection, logout, "sign out everywhere",
//! the user's devices, and an API route protected by session-client's tower
//! layer. Users are in memory; everything else is what a real service does.
//!
//! - `config`: the settings, from the environment.
//! - `tokens`: the access token and refresh credential (HS256 JWTs).
//! - `cookie`: the trusted-device cookie.
//! - `routes`: the handlers, one per route, and the JWT middleware.
//!
//! [`router`] assembles them; `main.rs` serves it.

#![forbid(unsafe_code)]

pub mod config;
pub mod cookie;
pub mod routes;
pub mod tokens;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::request::Parts,
    middleware,
    routing::{get, post},
};
use session_client::{RequireSessionLayer, SessionClient};

pub use config::{Config, ConfigError, User};
use tokens::{Claims, Keys};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The SessionStore client (with its near-cache, when configured).
    pub client: SessionClient,
    /// Signs and checks the service's tokens.
    pub keys: Keys,
    /// The settings.
    pub config: Arc<Config>,
}

/// Connects the SessionStore client `config` asks for.
///
/// # Errors
///
/// [`session_client::Error::Config`] for a malformed URL or token; the
/// connection itself is lazy, so an unreachable SessionStore is not an error
/// here (requests answer 503 until it is reachable).
pub async fn connect(config: &Config) -> session_client::Result<SessionClient> {
    let mut builder = SessionClient::builder(&config.sessionstore_url)
        .timeout(Duration::from_secs(2))
        .lazy(true);
    if let Some(token) = &config.sessionstore_token {
        builder = builder.bearer_token(token);
    }
    if config.near_cache_entries > 0 {
        builder = builder.near_cache(config.near_cache_entries);
        if let Some(staleness) = config.near_cache_max_staleness {
            builder = builder.near_cache_max_staleness(staleness);
        }
    }
    builder.connect().await
}

/// The service's routes. Serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`: login limits count
/// per client address.
///
/// ```text
/// POST /login               {account, password} -> tokens; device cookie
/// POST /refresh             {refresh_token}     -> tokens
/// POST /logout              Bearer access token -> 204
/// POST /logout-everywhere   Bearer, live session -> {ended}
/// POST /logout-others       Bearer, live session -> {ended}
/// GET  /sessions            Bearer, live session -> the user's devices
/// GET  /me                  Bearer, live session -> who and which session
/// ```
pub fn router(config: Config, client: SessionClient) -> Router {
    let state = AppState {
        client: client.clone(),
        keys: Keys::new(&config.jwt_secret),
        config: Arc::new(config),
    };
    // The JWT middleware (signature, expiry, audience) runs first and leaves
    // the claims in the extensions; the session layer then checks that the
    // JWT's session is live (the last `layer` added runs first).
    let require_session = RequireSessionLayer::new(client, |parts: &Parts| {
        let claims = parts.extensions.get::<Claims>()?;
        Some((claims.sub.as_str(), claims.jti.as_str()))
    });
    let verify_jwt = middleware::from_fn_with_state(state.clone(), routes::verify_access_token);
    let protected = Router::new()
        .route("/me", get(routes::me))
        .route("/sessions", get(routes::sessions))
        .route("/logout-everywhere", post(routes::logout_everywhere))
        .route("/logout-others", post(routes::logout_others))
        .layer(require_session)
        .layer(verify_jwt.clone());
    // Logout needs a valid JWT, not a live session: logging out twice, or
    // after "sign out everywhere", is fine.
    let logout = Router::new()
        .route("/logout", post(routes::logout))
        .layer(verify_jwt);
    Router::new()
        .route("/login", post(routes::login))
        .route("/refresh", post(routes::refresh))
        .merge(logout)
        .merge(protected)
        .with_state(state)
}
