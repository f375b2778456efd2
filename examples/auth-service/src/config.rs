//! The service's settings, read from the environment once in `main` (tests
//! build them directly); every bad value is reported with its variable's
//! name before the service listens.

use std::{fmt, net::SocketAddr, time::Duration};

use argon2::{
    Argon2, PasswordHasher,
    password_hash::{SaltString, rand_core::OsRng},
};

use crate::tokens::random_hex;

/// Everything the service needs to run.
#[derive(Clone)]
pub struct Config {
    /// `AUTH_LISTEN_ADDR`: where the HTTP server listens (default
    /// `127.0.0.1:3000`).
    pub listen_addr: SocketAddr,
    /// `SESSIONSTORE_URL`: the SessionStore server (default
    /// `http://127.0.0.1:50051`).
    pub sessionstore_url: String,
    /// `SESSIONSTORE_TOKEN`: the bearer token SessionStore requires, if it
    /// requires one (its `AUTH_TOKENS_FILE`).
    pub sessionstore_token: Option<String>,
    /// `JWT_SECRET`: the HS256 key of access tokens and refresh credentials,
    /// at least 32 bytes. Unset: a random key per start (tokens do not
    /// survive a restart), with a warning.
    pub jwt_secret: Vec<u8>,
    /// `AUTH_USERS`: the in-memory accounts, `account:password` or
    /// `account:$argon2id$...` (a PHC hash), comma-separated. Default: one
    /// demo account, `alice` with password `wonderland`.
    pub users: Vec<User>,
    /// `ACCESS_TOKEN_TTL_SECS`: the access token's life (default 900).
    pub access_ttl: Duration,
    /// `REFRESH_IDLE_SECS`: the session's ttl at login and each refresh, so
    /// how long a client may go without refreshing (default 86400, the
    /// server's default SESSION_TTL_MAX).
    pub refresh_idle: Duration,
    /// `DEVICE_COOKIE_MAX_AGE_SECS`: the device cookie's `Max-Age`; match
    /// the server's LOGIN_DEVICE_TTL (default 2592000, its default).
    pub device_cookie_max_age: Duration,
    /// `NEAR_CACHE_ENTRIES`: the client's near-cache size, 0 for none
    /// (default 10000): most checks of /me then never leave the process.
    pub near_cache_entries: usize,
    /// `NEAR_CACHE_MAX_STALENESS_MS`: how long a cached answer may be
    /// trusted while the revocation stream is silent (default: the client's).
    pub near_cache_max_staleness: Option<Duration>,
}

/// One in-memory account.
#[derive(Clone, Debug)]
pub struct User {
    /// The stable id sessions are stored under (`user-1`, `user-2`...).
    pub id: String,
    /// What the user types, normalised (trimmed, lower-cased).
    pub account: String,
    /// The Argon2id hash, PHC string.
    pub password_hash: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("sessionstore_url", &self.sessionstore_url)
            .field("accounts", &self.users.len())
            .field("access_ttl", &self.access_ttl)
            .field("refresh_idle", &self.refresh_idle)
            .field("near_cache_entries", &self.near_cache_entries)
            .finish_non_exhaustive()
    }
}

/// A setting that cannot work, with its variable's name.
#[derive(Debug)]
pub struct ConfigError {
    /// The environment variable.
    pub variable: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The settings from the environment; see each field for its variable.
    /// Also returns whether `JWT_SECRET` was unset (a random key is used).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first variable that is malformed.
    pub fn from_env() -> Result<(Self, bool), ConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let secs = |name: &'static str, default: u64| -> Result<Duration, ConfigError> {
            match var(name) {
                None => Ok(Duration::from_secs(default)),
                Some(text) => match text.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => Err(error(name, "must be a positive whole number of seconds")),
                },
            }
        };
        let listen_addr = match var("AUTH_LISTEN_ADDR") {
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
            Some(text) => text
                .parse()
                .map_err(|_| error("AUTH_LISTEN_ADDR", "must be an address like 0.0.0.0:3000"))?,
        };
        let (jwt_secret, random_secret) = match var("JWT_SECRET") {
            Some(secret) if secret.len() >= 32 => (secret.into_bytes(), false),
            Some(_) => return Err(error("JWT_SECRET", "must be at least 32 bytes")),
            None => (random_hex(32).into_bytes(), true),
        };
        let users = users(&var("AUTH_USERS").unwrap_or_else(|| "alice:wonderland".into()))?;
        let near_cache_entries = match var("NEAR_CACHE_ENTRIES") {
            None => 10_000,
            Some(text) => text
                .parse()
                .map_err(|_| error("NEAR_CACHE_ENTRIES", "must be a whole number"))?,
        };
        let near_cache_max_staleness = match var("NEAR_CACHE_MAX_STALENESS_MS") {
            None => None,
            Some(text) => Some(Duration::from_millis(text.parse().map_err(|_| {
                error(
                    "NEAR_CACHE_MAX_STALENESS_MS",
                    "must be a whole number of ms",
                )
            })?)),
        };
        let config = Self {
            listen_addr,
            sessionstore_url: var("SESSIONSTORE_URL")
                .unwrap_or_else(|| "http://127.0.0.1:50051".into()),
            sessionstore_token: var("SESSIONSTORE_TOKEN"),
            jwt_secret,
            users,
            access_ttl: secs("ACCESS_TOKEN_TTL_SECS", 900)?,
            refresh_idle: secs("REFRESH_IDLE_SECS", 86_400)?,
            device_cookie_max_age: secs("DEVICE_COOKIE_MAX_AGE_SECS", 2_592_000)?,
            near_cache_entries,
            near_cache_max_staleness,
        };
        Ok((config, random_secret))
    }
}

/// The accounts of `AUTH_USERS`, passwords hashed now (plain text is never
/// kept).
///
/// # Errors
///
/// [`ConfigError`] on an entry without `:`, an empty account or password, a
/// repeated account, or a hash that is not a PHC string.
pub fn users(spec: &str) -> Result<Vec<User>, ConfigError> {
    let mut users: Vec<User> = Vec::new();
    for (index, entry) in spec.split(',').map(str::trim).enumerate() {
        let Some((account, password)) = entry.split_once(':') else {
            return Err(error("AUTH_USERS", "entries are account:password"));
        };
        let account = normalise_account(account);
        if account.is_empty() || password.is_empty() {
            return Err(error("AUTH_USERS", "an account or password is empty"));
        }
        if users.iter().any(|user| user.account == account) {
            return Err(error("AUTH_USERS", "an account is listed twice"));
        }
        let password_hash = if password.starts_with("$argon2") {
            argon2::PasswordHash::new(password)
                .map_err(|_| error("AUTH_USERS", "a $argon2 hash is not a PHC string"))?;
            password.to_owned()
        } else {
            hash_password(password)
        };
        users.push(User {
            id: format!("user-{}", index + 1),
            account,
            password_hash,
        });
    }
    Ok(users)
}

/// An Argon2id hash of `password` with a random salt, as a PHC string.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    // Hashing with the default parameters and a fresh salt cannot fail
    // (only an over-long salt or output could).
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with its defaults hashes any password")
        .to_string()
}

/// An account as the user typed it, in the one spelling every limit and
/// lookup uses.
pub fn normalise_account(account: &str) -> String {
    account.trim().to_lowercase()
}

fn error(variable: &'static str, reason: &str) -> ConfigError {
    ConfigError {
        variable,
        reason: reason.to_owned(),
    }
}
