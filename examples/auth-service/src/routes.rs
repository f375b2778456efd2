//! The handlers, one per route, and the JWT middleware that runs before the
//! protected ones. Each handler follows the README's flows in their order:
//! the comments number the steps.

use std::{
    net::SocketAddr,
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::{
    Extension, Json,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use session_client::{CreateOutcome, Error, NewSession, RotateOutcome, Rotation, Session};

use crate::{
    AppState,
    config::{hash_password, normalise_account},
    cookie,
    tokens::{Claims, random_hex, unix},
};

/// The body of `POST /login`.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// As the user typed it; normalised before any use.
    pub account: String,
    /// Checked against the account's Argon2id hash.
    pub password: String,
}

/// The body of `POST /refresh`.
#[derive(Debug, Deserialize)]
pub struct RefreshForm {
    /// The refresh credential from the last login or refresh.
    pub refresh_token: String,
}

/// The answer to a login or a refresh.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tokens {
    /// The JWT for `Authorization: Bearer` on API calls.
    pub access_token: String,
    /// What `/refresh` takes; a browser app would rather keep it in an
    /// HttpOnly cookie scoped to `/refresh`.
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// The access token's life, seconds.
    pub expires_in: u64,
}

/// A verified password hash for accounts that do not exist, so that an
/// unknown account takes as long to refuse as a wrong password.
static UNKNOWN_ACCOUNT_HASH: LazyLock<String> =
    LazyLock::new(|| hash_password("no account has this password"));

/// `POST /login`: the login flow of the README, in its order.
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(form): Json<LoginForm>,
) -> Response {
    let account = normalise_account(&form.account);
    let ip = peer.ip().to_string();
    // 0. The device cookie for this account, if this browser has one.
    let cookie_name = cookie::name(&account);
    let device = cookie::get(&headers, &cookie_name).unwrap_or("").to_owned();

    // 1. Count the attempt before checking the password.
    let attempt = match state
        .client
        .record_login_attempt_with_device(&ip, &account, &device)
        .await
    {
        Ok(attempt) => attempt,
        Err(err) => return unavailable(&err),
    };
    if !attempt.allowed {
        let wait = attempt.retry_after.unwrap_or(Duration::from_secs(1));
        // Whole seconds, rounded up: never invite a retry that is refused.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = problem(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return response;
    }

    // 2. Check the password (off the async threads: Argon2 is meant to be slow).
    let user = state.config.users.iter().find(|u| u.account == account);
    let hash = user.map_or_else(|| UNKNOWN_ACCOUNT_HASH.clone(), |u| u.password_hash.clone());
    let password = form.password;
    let matches = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false);
    let Some(user) = user.filter(|_| matches) else {
        // The attempt stays counted.
        return problem(StatusCode::UNAUTHORIZED, "invalid_credentials");
    };

    // 3. Right: clear what this login proved, and trust this device.
    let mut set_cookie = None;
    match state
        .client
        .reset_login_attempts_with_device(&ip, &account, &device, true)
        .await
    {
        Ok(reset) => {
            set_cookie = reset.device_token.and_then(|token| {
                cookie::set(&cookie_name, &token, state.config.device_cookie_max_age)
            });
        }
        // The password was right: let the user in, untrusted this time.
        Err(err) => tracing::warn!(%err, "could not reset login attempts"),
    }

    // A session for a fresh token id; a taken or revoked id (astronomically
    // unlikely with 128 random bits) gets another.
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect::<String>();
    let mut session = None;
    for _ in 0..3 {
        let new = NewSession::new(&user.id, random_hex(16))
            .metadata("ip", &ip)
            .metadata("user_agent", &user_agent)
            .ttl(state.config.refresh_idle);
        match state.client.create_session_with(new).await {
            Ok(created) => match created.outcome {
                CreateOutcome::TokenTaken | CreateOutcome::TokenRevoked => continue,
                CreateOutcome::LimitReached => {
                    return problem(StatusCode::FORBIDDEN, "too_many_sessions");
                }
                _ => {
                    session = created.session;
                    break;
                }
            },
            Err(err) => return unavailable(&err),
        }
    }
    let Some(session) = session else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "no_session");
    };

    let mut response = issue(&state, &session).into_response();
    if let Some(value) = set_cookie {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /refresh`: rotate the presented session, acting on every outcome.
pub async fn refresh(State(state): State<AppState>, Json(form): Json<RefreshForm>) -> Response {
    let Some(claims) = state.keys.check_refresh(&form.refresh_token) else {
        return problem(StatusCode::UNAUTHORIZED, "invalid_refresh_token");
    };
    let mut new_token_id = random_hex(16);
    let mut retried = false;
    for _ in 0..4 {
        let rotation = Rotation::new(&claims.sub, &claims.sid, &claims.jti, &new_token_id)
            .ttl(state.config.refresh_idle);
        match state.client.rotate_session(rotation).await {
            // Tokens for the returned session, whichever request made it:
            // two tabs refreshing at once both get the same successor.
            Ok(RotateOutcome::Rotated(session) | RotateOutcome::AlreadyRotated(session)) => {
                return issue(&state, &session).into_response();
            }
            Ok(RotateOutcome::ReuseDetected) => {
                // The whole family is gone, the real client's tokens too.
                tracing::warn!(user = %claims.sub, "refresh credential reused: family revoked");
                return problem(StatusCode::UNAUTHORIZED, "refresh_token_reused");
            }
            Ok(RotateOutcome::NotFound) => {
                return problem(StatusCode::UNAUTHORIZED, "session_ended");
            }
            // Nothing changed: try another id.
            Ok(RotateOutcome::TokenTaken) => new_token_id = random_hex(16),
            Ok(_) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "unknown_outcome"),
            // The rotation may have happened: retry at once with the same
            // id, which answers ALREADY_ROTATED within the grace if it did.
            Err(Error::Unavailable(_) | Error::DeadlineExceeded(_)) if !retried => retried = true,
            Err(err) => return unavailable(&err),
        }
    }
    problem(StatusCode::SERVICE_UNAVAILABLE, "session_store_unavailable")
}

/// `POST /logout`: ends the caller's session, and with it its family (the
/// refresh credential stops working too).
pub async fn logout(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
) -> Response {
    match state
        .client
        .revoke_user_session(&claims.sub, &claims.jti)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => unavailable(&err),
    }
}

/// `POST /logout-everywhere`: ends every session of the caller's user.
pub async fn logout_everywhere(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
) -> Response {
    match state.client.revoke_all_user_sessions(&claims.sub).await {
        Ok(ended) => Json(serde_json::json!({ "ended": ended })).into_response(),
        Err(err) => unavailable(&err),
    }
}

/// `POST /logout-others`: ends every other session of the caller's user
/// ("sign out other devices"); the caller's own session, and its refresh
/// credential, go on.
pub async fn logout_others(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
) -> Response {
    match state
        .client
        .revoke_other_user_sessions(&claims.sub, &claims.jti)
        .await
    {
        Ok(Some(ended)) => Json(serde_json::json!({ "ended": ended })).into_response(),
        // Ended between the session check and this call.
        Ok(None) => problem(StatusCode::UNAUTHORIZED, "session_ended"),
        Err(err) => unavailable(&err),
    }
}

/// One device in `GET /sessions`. No ids: token and family ids are secrets.
#[derive(Debug, Serialize, Deserialize)]
pub struct Device {
    /// Login time (or last refresh), Unix seconds.
    pub created_at: u64,
    /// When the session ends unless refreshed, Unix seconds.
    pub expires_at: u64,
    /// The address it logged in from.
    pub ip: String,
    /// Its `User-Agent`.
    pub user_agent: String,
    /// Whether it is the caller's own session.
    pub current: bool,
}

/// `GET /sessions`: the user's live sessions, newest first.
pub async fn sessions(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
) -> Response {
    match state.client.list_user_sessions(&claims.sub).await {
        Ok(sessions) => {
            let devices: Vec<Device> = sessions
                .into_iter()
                .map(|mut session| Device {
                    created_at: unix(session.created_at),
                    expires_at: unix(session.expires_at),
                    ip: session.metadata.remove("ip").unwrap_or_default(),
                    user_agent: session.metadata.remove("user_agent").unwrap_or_default(),
                    current: session.family_id == claims.sid,
                })
                .collect();
            Json(devices).into_response()
        }
        Err(err) => unavailable(&err),
    }
}

/// `GET /me`: who the caller is; reached only with a live session, which the
/// layer put in the request's extensions.
pub async fn me(State(state): State<AppState>, Extension(session): Extension<Session>) -> Response {
    let account = state
        .config
        .users
        .iter()
        .find(|user| user.id == session.user_id)
        .map(|user| user.account.clone());
    Json(serde_json::json!({
        "user_id": session.user_id,
        "account": account,
        "session": {
            "created_at": unix(session.created_at),
            "expires_at": unix(session.expires_at),
        },
    }))
    .into_response()
}

/// Checks the `Authorization: Bearer` access token (signature, expiry,
/// audience) and leaves its [`Claims`] in the request's extensions for the
/// session layer and the handlers. Whether its session is live is the
/// layer's question, not this one's.
pub async fn verify_access_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(token) = token else {
        return bearer_challenge(HeaderValue::from_static("Bearer"));
    };
    let Some(claims) = state.keys.check_access(token) else {
        return bearer_challenge(HeaderValue::from_static("Bearer error=\"invalid_token\""));
    };
    request.extensions_mut().insert(claims);
    next.run(request).await
}

/// The access and refresh tokens for `session`.
fn issue(state: &AppState, session: &Session) -> Json<Tokens> {
    let config = &state.config;
    let family_end = session
        .family_expires_at
        .unwrap_or_else(|| SystemTime::now() + config.refresh_idle);
    Json(Tokens {
        access_token: state.keys.access(
            &session.user_id,
            &session.token_id,
            &session.family_id,
            config.access_ttl,
        ),
        refresh_token: state.keys.refresh(
            &session.user_id,
            &session.token_id,
            &session.family_id,
            family_end,
        ),
        token_type: "Bearer".to_owned(),
        expires_in: config.access_ttl.as_secs(),
    })
}

/// A 401 with the `WWW-Authenticate` challenge `challenge`.
fn bearer_challenge(challenge: HeaderValue) -> Response {
    let mut response = problem(StatusCode::UNAUTHORIZED, "invalid_token");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

/// SessionStore could not answer: 503, fail closed.
fn unavailable(err: &Error) -> Response {
    tracing::warn!(%err, "session store call failed");
    problem(StatusCode::SERVICE_UNAVAILABLE, "session_store_unavailable")
}

/// An error answer: `{"error": "..."}`.
fn problem(status: StatusCode, error: &'static str) -> Response {
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}
