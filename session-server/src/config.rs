//! The server's configuration: every setting is an environment variable with an
//! equal command-line flag, parsed and checked once in `main` before listening.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::store::{LimitPolicy, RedisMode, Settings};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The SessionStore gRPC server: user sessions and login rate limits in Redis.
#[derive(Clone, Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Redis to use (`redis://[:password@]host:port[/db]`, or `rediss://` for TLS).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Kind of Redis deployment: standalone, cluster or sentinel.
    #[arg(long, env = "REDIS_MODE", value_enum, default_value_t = RedisMode::Standalone)]
    pub redis_mode: RedisMode,

    /// Name of the master the sentinels watch (sentinel mode only).
    #[arg(long, env = "REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    pub redis_sentinel_master: String,

    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// Optional extra address serving only gRPC health, always in plaintext:
    /// for kubelet gRPC probes, which cannot speak TLS, when TLS_CERT is set.
    #[arg(long, env = "HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,

    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Lifetime of a session created without a ttl, in seconds.
    #[arg(long, env = "SESSION_TTL", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub session_ttl: u64,

    /// Longest ttl a caller may ask for, in seconds.
    #[arg(long, env = "SESSION_TTL_MAX", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub session_ttl_max: u64,

    /// Most live sessions one user may have.
    #[arg(long, env = "MAX_SESSIONS_PER_USER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_sessions_per_user: u32,

    /// What happens when a user at the cap creates another session.
    #[arg(long, env = "SESSION_LIMIT_POLICY", value_enum, default_value_t = LimitPolicy::EvictOldest)]
    pub session_limit_policy: LimitPolicy,

    /// Length of a login rate-limit window, in seconds.
    #[arg(long, env = "RATE_LIMIT_WINDOW", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate_limit_window: u64,

    /// Login attempts allowed per client address per window.
    #[arg(long, env = "RATE_LIMIT_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_max_attempts: u32,

    /// Prepended to every Redis key, so several deployments can share one Redis.
    /// Must not contain `{` or `}` (they would break the cluster hash tags).
    #[arg(long, env = "KEY_PREFIX", default_value = "", value_parser = parse_key_prefix)]
    pub key_prefix: String,

    /// Number of pooled (multiplexed) Redis connections.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_pool_size: u32,

    /// Bound on each Redis operation (pool wait, connect, round trips), in ms;
    /// past it the caller gets UNAVAILABLE.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,

    /// Serve even when Redis may evict keys (`maxmemory-policy` other than
    /// `noeviction`). Eviction silently drops session indexes and token
    /// reservations, breaking RevokeAllUserSessions, the per-user cap and
    /// revocation finality; by default such a Redis keeps readiness NOT_SERVING.
    #[arg(long, env = "REDIS_ALLOW_EVICTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_allow_eviction: bool,

    /// How often Redis is pinged for the readiness status, in ms.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub health_check_interval_ms: u64,

    /// Most calls served at once; the excess gets RESOURCE_EXHAUSTED at once
    /// instead of queueing. Health checks are not counted.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_requests: u32,

    /// Longest a call may take, in ms; a shorter `grpc-timeout` from the
    /// caller wins. Past it the work is dropped and the caller gets
    /// DEADLINE_EXCEEDED.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,

    /// PEM certificate chain for TLS on the gRPC port (with TLS_KEY).
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the gRPC port (with TLS_CERT).
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: when set, callers must present a client certificate
    /// signed by it (mutual TLS). Needs TLS_CERT and TLS_KEY.
    #[arg(long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// File of accepted bearer tokens, one per line; when set, every call but
    /// health must send `authorization: Bearer <token>`. Reloaded on change
    /// and on SIGHUP.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// File holding the Redis password (overrides one in REDIS_URL), so the
    /// password can come from a mounted Secret rather than the environment.
    #[arg(long, env = "REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM CA bundle to verify a `rediss://` server with, instead of the
    /// system's roots.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest request accepted, in bytes; larger ones get OUT_OF_RANGE
    /// before they are decoded.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=4 * 1024 * 1024))]
    pub max_request_bytes: u64,
}

impl Config {
    /// Checks the rules that involve more than one setting.
    ///
    /// # Errors
    ///
    /// A message naming the variables at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_ttl > self.session_ttl_max {
            return Err(format!(
                "SESSION_TTL ({}) must not exceed SESSION_TTL_MAX ({})",
                self.session_ttl, self.session_ttl_max
            ));
        }
        for url in self.redis_url.split(',').map(str::trim) {
            if let Err(e) = redis::Client::open(url) {
                // The redis error never echoes the URL, so no password leaks here.
                return Err(format!("REDIS_URL is not a valid Redis URL: {e}"));
            }
        }
        if self.redis_mode == RedisMode::Standalone && self.redis_url.contains(',') {
            return Err("REDIS_URL lists several nodes: set REDIS_MODE=cluster or sentinel".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("TLS_CERT and TLS_KEY must be set together".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY".into());
        }
        let files = [
            ("TLS_CERT", &self.tls_cert),
            ("TLS_KEY", &self.tls_key),
            ("TLS_CLIENT_CA", &self.tls_client_ca),
            ("AUTH_TOKENS_FILE", &self.auth_tokens_file),
            ("REDIS_PASSWORD_FILE", &self.redis_password_file),
            ("REDIS_CA_FILE", &self.redis_ca_file),
        ];
        for (variable, path) in files {
            if let Some(path) = path {
                read_file(variable, path)?;
            }
        }
        if self.redis_timeout_ms >= self.request_timeout_ms {
            return Err(format!(
                "REDIS_TIMEOUT_MS ({}) must be below REQUEST_TIMEOUT_MS ({}), so Redis trouble is \
                 reported as UNAVAILABLE before the call's deadline",
                self.redis_timeout_ms, self.request_timeout_ms
            ));
        }
        Ok(())
    }

    /// The store's share of the configuration, reading the Redis password and
    /// CA files.
    ///
    /// # Errors
    ///
    /// A message naming the variable whose file cannot be read.
    pub fn store_settings(&self) -> Result<Settings, String> {
        let redis_password = self
            .redis_password_file
            .as_ref()
            .map(|path| read_file("REDIS_PASSWORD_FILE", path))
            .transpose()?
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches(['\r', '\n'])
                    .to_string()
            });
        let redis_ca_pem = self
            .redis_ca_file
            .as_ref()
            .map(|path| read_file("REDIS_CA_FILE", path))
            .transpose()?;
        Ok(Settings {
            mode: self.redis_mode,
            redis_url: self.redis_url.clone(),
            sentinel_master: self.redis_sentinel_master.clone(),
            key_prefix: self.key_prefix.clone(),
            session_ttl: Duration::from_secs(self.session_ttl),
            session_ttl_max: Duration::from_secs(self.session_ttl_max),
            max_sessions_per_user: self.max_sessions_per_user,
            limit_policy: self.session_limit_policy,
            rate_limit_window: Duration::from_secs(self.rate_limit_window),
            rate_limit_max_attempts: self.rate_limit_max_attempts,
            pool_size: self.redis_pool_size,
            timeout: Duration::from_millis(self.redis_timeout_ms),
            redis_password,
            redis_ca_pem,
        })
    }

    /// A configuration with every default, for tests and embedding.
    pub fn defaults() -> Self {
        // Parsing no arguments and no environment cannot fail: every field
        // has a valid default.
        Self::parse_from(["session-server"])
    }
}

/// Reads a file named by a setting, naming the setting on failure.
///
/// # Errors
///
/// A message naming `variable` and the path.
pub fn read_file(variable: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{variable} {}: {e}", path.display()))
}

fn parse_key_prefix(value: &str) -> Result<String, String> {
    if value.contains(['{', '}']) {
        return Err("must not contain '{' or '}'".into());
    }
    if value.len() > 128 {
        return Err("must be at most 128 bytes".into());
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = Config::try_parse_from(["s", "--max-sessions-per-user", "0"]).unwrap_err();
        assert!(
            err.to_string().contains("MAX_SESSIONS_PER_USER")
                || err.to_string().contains("max-sessions-per-user")
        );
        let config =
            Config::try_parse_from(["s", "--session-ttl", "100", "--session-ttl-max", "10"])
                .unwrap();
        assert!(config.validate().unwrap_err().contains("SESSION_TTL_MAX"));
        assert!(Config::try_parse_from(["s", "--key-prefix", "a{b"]).is_err());
    }
}
