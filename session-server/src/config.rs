//! The server's configuration: every setting is an environment variable with an
//! equal command-line flag, parsed and checked once in `main` before listening.
//!
//! This file defines the settings ([`Config`]: names, defaults, ranges, help)
//! and how `Debug` prints them; the rest is one file per step:
//!
//! - `values`: how single values parse (the store's and traces' enums, the
//!   sampler ratio, the key prefix);
//! - `validate`: the rules across settings ([`Config::validate`]);
//! - `components`: the typed settings each component is built from
//!   ([`Config::store_settings`], [`Config::server_settings`],
//!   [`Config::trace_settings`]).
//!
//! Imports point one way: `config` uses the components' settings types, and
//! no component imports `config`.

use std::{fmt, net::SocketAddr, path::PathBuf};

use clap::Parser;

use crate::server::DEFAULT_MAX_CONNECTIONS;
use crate::store::{LimitPolicy, RedisMode, credentials::redact_redis_urls};
use crate::trace::TraceSampler;

use values::{parse_key_prefix, parse_ratio};

mod components;
mod validate;
mod values;

/// The longest SESSION_TTL, SESSION_TTL_MAX and RATE_LIMIT_WINDOW, in
/// seconds: 365 days. Far below where the store's arithmetic could overflow: a
/// ttl in ms plus the reservation's 60 s grace stays near 3.2e10, and Redis's
/// clock plus that
/// (about 1.8e12 ms) stays exact in the scripts' Lua doubles (below 2^53) and
/// within Redis's `PX` limits.
const MAX_TTL_SECS: u64 = 365 * 24 * 60 * 60;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The SessionStore gRPC server: user sessions and login rate limits in Redis.
///
/// Its `Debug` output hides the passwords in REDIS_URL.
#[derive(Clone, Parser)]
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

    /// Lifetime of a session created without a ttl, in seconds; at most
    /// 31536000 (365 days).
    #[arg(long, env = "SESSION_TTL", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub session_ttl: u64,

    /// Longest ttl a caller may ask for, in seconds; at most 31536000 (365
    /// days), which keeps every expiry the store computes exact.
    #[arg(long, env = "SESSION_TTL_MAX", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub session_ttl_max: u64,

    /// Absolute lifetime of a session family (one login and its rotations)
    /// started without `max_lifetime`, in seconds: no session of the family
    /// outlives its start plus this, however often it is rotated or extended.
    /// At most 31536000 (365 days).
    #[arg(long, env = "SESSION_MAX_LIFETIME", default_value_t = 2_592_000, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub session_max_lifetime: u64,

    /// How long after a rotation the rotated-away token may still be
    /// presented to RotateSession and get the family's current session
    /// (ALREADY_ROTATED: a retry after a lost answer, two tabs refreshing at
    /// once) rather than count as reuse, in ms; 0 to 300000.
    #[arg(long, env = "ROTATION_GRACE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=300_000))]
    pub rotation_grace_ms: u64,

    /// Most live sessions one user may have.
    #[arg(long, env = "MAX_SESSIONS_PER_USER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_sessions_per_user: u32,

    /// What happens when a user at the cap creates another session.
    #[arg(long, env = "SESSION_LIMIT_POLICY", value_enum, default_value_t = LimitPolicy::EvictOldest)]
    pub session_limit_policy: LimitPolicy,

    /// Length of a login rate-limit window, in seconds (at most 365 days).
    #[arg(long, env = "RATE_LIMIT_WINDOW", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub rate_limit_window: u64,

    /// Login attempts allowed per client address per window.
    #[arg(long, env = "RATE_LIMIT_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_max_attempts: u32,

    /// Login attempts allowed per account per window, from all addresses
    /// together (for attempts that name the account).
    #[arg(long, env = "RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_account_max_attempts: u32,

    /// Prefix length by which IPv6 client addresses are grouped for the login
    /// limit (32 to 128; a client usually holds a whole /64, some a /48).
    #[arg(long, env = "RATE_LIMIT_IPV6_PREFIX", default_value_t = 64, value_parser = clap::value_parser!(u8).range(32..=128))]
    pub rate_limit_ipv6_prefix: u8,

    /// Login attempts allowed per trusted device per window: attempts that
    /// present a device token valid for their account count here instead of
    /// against the address and the account.
    #[arg(long, env = "RATE_LIMIT_DEVICE_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_device_max_attempts: u32,

    /// How long a device token issued by ResetLoginAttempts trusts its
    /// device, in seconds (1 s to 365 days).
    #[arg(long, env = "LOGIN_DEVICE_TTL", default_value_t = 2_592_000, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub login_device_ttl: u64,

    /// Device tokens kept per account; issuing past it forgets the oldest.
    #[arg(long, env = "LOGIN_DEVICE_MAX", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub login_device_max: u32,

    /// A device token refused this many times its limit in total (over its
    /// whole life) is forgotten: untrusted for good.
    #[arg(long, env = "LOGIN_DEVICE_LOCKOUT_FACTOR", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub login_device_lockout_factor: u32,

    /// Prepended to every Redis key, so several deployments can share one Redis.
    /// Must not contain `{` or `}` (they would break the cluster hash tags).
    #[arg(long, env = "KEY_PREFIX", default_value = "", value_parser = parse_key_prefix)]
    pub key_prefix: String,

    /// Number of pooled (multiplexed) Redis connections.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_pool_size: u32,

    /// Bound on each Redis operation (pool wait, connect, round trips), in ms;
    /// past it the caller gets UNAVAILABLE, though a command already sent to
    /// Redis may still run.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,

    /// How often, in ms, each server sends a heartbeat through Redis on the
    /// revocation channel; WatchRevocations streams carry one per beat while
    /// the server's subscription is alive. Receivers treat a stream silent
    /// for a few beats as stale (session-client: 3).
    #[arg(long, env = "REVOCATION_HEARTBEAT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub revocation_heartbeat_ms: u64,

    /// How many replicas must have acknowledged a revocation (RevokeSession,
    /// RevokeAllUserSessions, eviction at the cap, a rotation's revocation of
    /// the presented token, reuse detection) before it is answered OK; with
    /// fewer within REVOCATION_REPLICA_TIMEOUT_MS the call answers
    /// UNAVAILABLE (applied on the master, not yet replicated; retrying is
    /// safe). 0: answer as soon as the master applied it (a failover may
    /// then lose it).
    #[arg(long, env = "REVOCATION_MIN_REPLICAS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub revocation_min_replicas: u32,

    /// With REVOCATION_MIN_REPLICAS > 0, how long, in ms, a revocation waits
    /// for its replicas' acknowledgements; below REDIS_TIMEOUT_MS.
    #[arg(long, env = "REVOCATION_REPLICA_TIMEOUT_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub revocation_replica_timeout_ms: u64,

    /// Serve even when Redis may evict keys (`maxmemory-policy` other than
    /// `noeviction`). Eviction silently drops session indexes and token
    /// reservations, breaking RevokeAllUserSessions, the per-user cap and
    /// revocation finality; by default such a Redis keeps readiness NOT_SERVING.
    #[arg(long, env = "REDIS_ALLOW_EVICTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_allow_eviction: bool,

    /// Readiness ("sessionstore.v1.SessionStore") turns NOT_SERVING when
    /// Redis stops answering, after READINESS_REDIS_FAILURES checks in a row
    /// fail. Off by default: Redis is shared by every pod, so an outage would
    /// take them all out of their Services at once, gaining nothing (no
    /// healthy pod is left) while clients get connection refused and back
    /// off for far longer than the outage. With it off, a pod that has
    /// reached Redis once stays ready through an outage, calls fail fast with
    /// UNAVAILABLE, and `sessionstore_redis_up` (and its alert) says why. An
    /// evicting Redis keeps readiness NOT_SERVING in both modes.
    #[arg(long, env = "READINESS_FOLLOWS_REDIS", default_value_t = false, action = clap::ArgAction::Set)]
    pub readiness_follows_redis: bool,

    /// With READINESS_FOLLOWS_REDIS, how many Redis checks in a row must fail
    /// (one every HEALTH_CHECK_INTERVAL_MS, each bound by REDIS_TIMEOUT_MS)
    /// before readiness turns NOT_SERVING, so a failover or a blip of a few
    /// seconds does not empty the Services. One check that answers makes
    /// the pod ready again.
    #[arg(long, env = "READINESS_REDIS_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub readiness_redis_failures: u32,

    /// How often Redis is pinged for the readiness status, in ms.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub health_check_interval_ms: u64,

    /// Most calls served at once; the excess gets RESOURCE_EXHAUSTED at once
    /// instead of queueing. Health checks are not counted.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_requests: u32,

    /// Longest a call may take, in ms; a shorter `grpc-timeout` from the
    /// caller wins. Past it the server stops waiting and the caller gets
    /// DEADLINE_EXCEEDED, but a command already sent to Redis still runs:
    /// the call may have taken effect.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,

    /// How long the server keeps serving after SIGTERM or SIGINT, in ms, with
    /// readiness already NOT_SERVING, before it closes its listener and
    /// drains: time for Kubernetes to take the pod out of its Services, and
    /// for clients and load balancers watching gRPC health to stop sending
    /// new calls. It replaces a preStop sleep; SHUTDOWN_DELAY_MS plus the
    /// 20 s drain must fit in the pod's terminationGracePeriodSeconds. 0
    /// closes the listener at once.
    #[arg(long, env = "SHUTDOWN_DELAY_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=120_000))]
    pub shutdown_delay_ms: u64,

    /// Age in seconds after which a client connection is asked to close
    /// (an HTTP/2 GOAWAY: calls in flight finish, new ones go to a new
    /// connection), so long-lived gRPC connections rebalance over the pods:
    /// without it a client stays on the pod it first reached, and pods added
    /// by the autoscaler get no load. 0 never closes a connection for its age.
    #[arg(long, env = "MAX_CONNECTION_AGE", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub max_connection_age: u64,

    /// Seconds a connection past MAX_CONNECTION_AGE may stay open for its
    /// calls and streams to finish; then it is closed, cutting what is left
    /// (a health Watch, a revocation stream: their callers reconnect). At
    /// least REQUEST_TIMEOUT_MS, so no unary call is cut. With TLS both
    /// clocks start when the handshake completes, so a slow handshake does
    /// not eat into the grace.
    #[arg(long, env = "MAX_CONNECTION_AGE_GRACE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_connection_age_grace: u64,

    /// Most client connections open at once, on the gRPC port and on
    /// HEALTH_ADDR each (1 to 1000000). Past it the server stops accepting
    /// (new connections wait in the kernel's backlog) until one closes, so a
    /// flood of idle connections cannot exhaust the process's memory or file
    /// descriptors. Each open connection costs about 32 KiB (plaintext
    /// HTTP/2) to 43 KiB (TLS) of memory: keep 48 MiB plus MAX_CONNECTIONS x
    /// 75 KiB (both ports full) under the memory limit, and twice this plus
    /// the Redis pool under `ulimit -n`. Also the most health Watch streams
    /// open at once (one per connection, as gRPC clients' health checking
    /// opens them).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

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

    /// OTLP/gRPC address of an OpenTelemetry collector
    /// (`http://otel-collector:4317`). Set, each RPC is a span (child of the
    /// caller's `traceparent`) with a child span per Redis operation,
    /// exported there; unset or empty, no traces. The exporter also reads
    /// the standard OTEL_EXPORTER_OTLP_HEADERS, _COMPRESSION and _TIMEOUT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// The `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "sessionstore")]
    pub otel_service_name: String,

    /// Which traces are recorded (as the OpenTelemetry SDKs read it).
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = TraceSampler::ParentBasedAlwaysOn)]
    pub otel_traces_sampler: TraceSampler,

    /// The fraction of traces the `traceidratio` samplers keep, 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = parse_ratio)]
    pub otel_traces_sampler_arg: f64,

    /// Most ended spans waiting for export; past it spans are dropped (and
    /// counted in sessionstore_trace_spans_dropped_total), so a slow or
    /// absent collector never makes a call wait. About 1 KiB a span.
    #[arg(long, env = "OTEL_BSP_MAX_QUEUE_SIZE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub otel_bsp_max_queue_size: u32,
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn defaults() -> Self {
        // Parsing no arguments and no environment cannot fail: every field
        // has a valid default.
        Self::parse_from(["session-server"])
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field does not compile until it is
        // listed here, and REDIS_URL's passwords are never printed.
        let Self {
            redis_url,
            redis_mode,
            redis_sentinel_master,
            listen_addr,
            health_addr,
            metrics_addr,
            session_ttl,
            session_ttl_max,
            session_max_lifetime,
            rotation_grace_ms,
            max_sessions_per_user,
            session_limit_policy,
            rate_limit_window,
            rate_limit_max_attempts,
            rate_limit_account_max_attempts,
            rate_limit_ipv6_prefix,
            rate_limit_device_max_attempts,
            login_device_ttl,
            login_device_max,
            login_device_lockout_factor,
            key_prefix,
            redis_pool_size,
            redis_timeout_ms,
            revocation_heartbeat_ms,
            revocation_min_replicas,
            revocation_replica_timeout_ms,
            redis_allow_eviction,
            readiness_follows_redis,
            readiness_redis_failures,
            health_check_interval_ms,
            max_concurrent_requests,
            request_timeout_ms,
            shutdown_delay_ms,
            max_connection_age,
            max_connection_age_grace,
            max_connections,
            tls_cert,
            tls_key,
            tls_client_ca,
            auth_tokens_file,
            redis_password_file,
            redis_ca_file,
            log_format,
            max_request_bytes,
            otel_exporter_otlp_endpoint,
            otel_service_name,
            otel_traces_sampler,
            otel_traces_sampler_arg,
            otel_bsp_max_queue_size,
        } = self;
        f.debug_struct("Config")
            .field("redis_url", &redact_redis_urls(redis_url))
            .field("redis_mode", redis_mode)
            .field("redis_sentinel_master", redis_sentinel_master)
            .field("listen_addr", listen_addr)
            .field("health_addr", health_addr)
            .field("metrics_addr", metrics_addr)
            .field("session_ttl", session_ttl)
            .field("session_ttl_max", session_ttl_max)
            .field("session_max_lifetime", session_max_lifetime)
            .field("rotation_grace_ms", rotation_grace_ms)
            .field("max_sessions_per_user", max_sessions_per_user)
            .field("session_limit_policy", session_limit_policy)
            .field("rate_limit_window", rate_limit_window)
            .field("rate_limit_max_attempts", rate_limit_max_attempts)
            .field(
                "rate_limit_account_max_attempts",
                rate_limit_account_max_attempts,
            )
            .field("rate_limit_ipv6_prefix", rate_limit_ipv6_prefix)
            .field(
                "rate_limit_device_max_attempts",
                rate_limit_device_max_attempts,
            )
            .field("login_device_ttl", login_device_ttl)
            .field("login_device_max", login_device_max)
            .field("login_device_lockout_factor", login_device_lockout_factor)
            .field("key_prefix", key_prefix)
            .field("redis_pool_size", redis_pool_size)
            .field("redis_timeout_ms", redis_timeout_ms)
            .field("revocation_heartbeat_ms", revocation_heartbeat_ms)
            .field("revocation_min_replicas", revocation_min_replicas)
            .field(
                "revocation_replica_timeout_ms",
                revocation_replica_timeout_ms,
            )
            .field("redis_allow_eviction", redis_allow_eviction)
            .field("readiness_follows_redis", readiness_follows_redis)
            .field("readiness_redis_failures", readiness_redis_failures)
            .field("health_check_interval_ms", health_check_interval_ms)
            .field("max_concurrent_requests", max_concurrent_requests)
            .field("request_timeout_ms", request_timeout_ms)
            .field("shutdown_delay_ms", shutdown_delay_ms)
            .field("max_connection_age", max_connection_age)
            .field("max_connection_age_grace", max_connection_age_grace)
            .field("max_connections", max_connections)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("tls_client_ca", tls_client_ca)
            .field("auth_tokens_file", auth_tokens_file)
            .field("redis_password_file", redis_password_file)
            .field("redis_ca_file", redis_ca_file)
            .field("log_format", log_format)
            .field("max_request_bytes", max_request_bytes)
            .field("otel_exporter_otlp_endpoint", otel_exporter_otlp_endpoint)
            .field("otel_service_name", otel_service_name)
            .field("otel_traces_sampler", otel_traces_sampler)
            .field("otel_traces_sampler_arg", otel_traces_sampler_arg)
            .field("otel_bsp_max_queue_size", otel_bsp_max_queue_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Settings;

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
        let config =
            Config::try_parse_from(["s", "--session-ttl", "100", "--session-max-lifetime", "99"])
                .unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("SESSION_MAX_LIFETIME")
        );
        for grace in ["-1", "300001"] {
            assert!(
                Config::try_parse_from(["s", "--rotation-grace-ms", grace]).is_err(),
                "{grace}"
            );
        }
        assert!(Config::try_parse_from(["s", "--session-max-lifetime", "31536001"]).is_err());
        assert!(Config::try_parse_from(["s", "--key-prefix", "a{b"]).is_err());
    }

    /// Ttls are bounded so that the store's millisecond arithmetic cannot
    /// overflow; the refusal names the variable.
    #[test]
    fn ttls_above_365_days_are_refused() {
        for (flag, variable) in [
            ("--session-ttl-max", "SESSION_TTL_MAX"),
            ("--session-ttl", "SESSION_TTL"),
        ] {
            let config = Config::try_parse_from(["s", flag, "31536000"]).unwrap();
            assert_eq!(
                config.session_ttl_max.max(config.session_ttl),
                31_536_000,
                "{flag} accepts 365 days"
            );
            for too_long in ["31536001", "18446744073709551615"] {
                let err = Config::try_parse_from(["s", flag, too_long]).unwrap_err();
                assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
                let message = err.to_string();
                assert!(message.contains(&format!("<{variable}>")), "{message}");
            }
        }
    }

    /// REVOCATION_REPLICA_TIMEOUT_MS must be below REDIS_TIMEOUT_MS (the wait
    /// is one round trip of the revocation's operation); the refusal names
    /// both. REVOCATION_MIN_REPLICAS defaults to 0 and is bounded.
    #[test]
    fn revocation_replica_settings_are_validated() {
        let config = Config::defaults();
        assert_eq!(config.revocation_min_replicas, 0);
        assert_eq!(config.revocation_replica_timeout_ms, 200);
        config.validate().unwrap();
        let config = Config::try_parse_from([
            "s",
            "--revocation-replica-timeout-ms",
            "1000",
            "--redis-timeout-ms",
            "1000",
        ])
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("REVOCATION_REPLICA_TIMEOUT_MS (1000)"),
            "{err}"
        );
        assert!(err.contains("REDIS_TIMEOUT_MS (1000)"), "{err}");
        let err = Config::try_parse_from(["s", "--revocation-min-replicas", "17"]).unwrap_err();
        assert!(err.to_string().contains("REVOCATION_MIN_REPLICAS"), "{err}");
        let config = Config::try_parse_from(["s", "--revocation-min-replicas", "1"]).unwrap();
        let settings = config.store_settings().unwrap();
        assert_eq!(settings.revocation_min_replicas, 1);
        assert_eq!(
            settings.revocation_replica_timeout,
            Duration::from_millis(200)
        );
    }

    /// MAX_CONNECTIONS is a setting, 1..=1000000, defaulting to what fits
    /// the shipped memory limit; out of range, the error names it.
    #[test]
    fn max_connections_is_bounded() {
        assert_eq!(Config::defaults().max_connections, DEFAULT_MAX_CONNECTIONS);
        let config = Config::try_parse_from(["s", "--max-connections", "1000000"]).unwrap();
        assert_eq!(config.max_connections, 1_000_000);
        for bad in ["0", "1000001", "many"] {
            let err = Config::try_parse_from(["s", "--max-connections", bad]).unwrap_err();
            assert!(err.to_string().contains("MAX_CONNECTIONS"), "{err}");
        }
    }

    /// REDIS_MODE and SESSION_LIMIT_POLICY accept exactly the spellings
    /// they always did, and a bad value lists them.
    #[test]
    fn store_enums_parse_as_before() {
        for (value, mode) in [
            ("standalone", RedisMode::Standalone),
            ("cluster", RedisMode::Cluster),
            ("sentinel", RedisMode::Sentinel),
        ] {
            let config = Config::try_parse_from(["s", "--redis-mode", value]).unwrap();
            assert_eq!(config.redis_mode, mode);
        }
        for (value, policy) in [
            ("evict_oldest", LimitPolicy::EvictOldest),
            ("evict-oldest", LimitPolicy::EvictOldest),
            ("reject", LimitPolicy::Reject),
        ] {
            let config = Config::try_parse_from(["s", "--session-limit-policy", value]).unwrap();
            assert_eq!(config.session_limit_policy, policy);
        }
        assert_eq!(Config::defaults().redis_mode, RedisMode::Standalone);
        assert_eq!(
            Config::defaults().session_limit_policy,
            LimitPolicy::EvictOldest
        );
        for (flag, listed) in [
            (
                "--redis-mode",
                "[possible values: standalone, cluster, sentinel]",
            ),
            (
                "--session-limit-policy",
                "[possible values: evict_oldest, reject]",
            ),
        ] {
            for bad in ["bogus", "Cluster", "evict oldest", "EVICT_OLDEST"] {
                let err = Config::try_parse_from(["s", flag, bad]).unwrap_err();
                assert_eq!(
                    err.kind(),
                    clap::error::ErrorKind::InvalidValue,
                    "{flag} {bad}"
                );
                assert!(err.to_string().contains(listed), "{err}");
            }
        }
    }

    /// The store's test settings are the defaults' store settings.
    #[test]
    fn store_test_settings_are_the_defaults() {
        let url = "redis://127.0.0.1:6379";
        assert_eq!(
            format!("{:?}", Config::defaults().store_settings().unwrap()),
            format!("{:?}", Settings::for_tests(url))
        );
    }

    /// The server's settings are the configuration's, in the server's units:
    /// ms and s to `Duration`, 0 to no MAX_CONNECTION_AGE, the readiness
    /// flags to one policy, TLS only with both a certificate and a key.
    #[test]
    fn server_settings_convert_units() {
        let defaults = Config::defaults().server_settings();
        assert_eq!(defaults.health_addr, None);
        assert_eq!(defaults.health_check_interval, Duration::from_secs(1));
        assert!(!defaults.readiness.allow_eviction);
        assert_eq!(defaults.readiness.follows_redis, None);
        assert_eq!(defaults.max_request_bytes, 64 * 1024);
        assert_eq!(defaults.auth_tokens_file, None);
        assert_eq!(defaults.max_concurrent_requests, 1024);
        assert_eq!(defaults.request_timeout, Duration::from_secs(5));
        assert_eq!(defaults.max_connection_age, Some(Duration::from_secs(300)));
        assert_eq!(defaults.max_connection_age_grace, Duration::from_secs(30));
        assert_eq!(defaults.shutdown_delay, Duration::from_secs(5));
        assert!(defaults.tls.is_none());
        assert_eq!(defaults.bounds.max_connections, 2000);
        assert_eq!(defaults.bounds.max_health_watches, 2000);

        let config = Config::try_parse_from([
            "s",
            "--health-addr",
            "127.0.0.1:8081",
            "--health-check-interval-ms",
            "250",
            "--redis-allow-eviction",
            "true",
            "--readiness-follows-redis",
            "true",
            "--readiness-redis-failures",
            "7",
            "--max-request-bytes",
            "2048",
            "--auth-tokens-file",
            "/run/tokens",
            "--max-concurrent-requests",
            "10",
            "--request-timeout-ms",
            "1500",
            "--max-connection-age",
            "0",
            "--max-connection-age-grace",
            "2",
            "--shutdown-delay-ms",
            "0",
            "--max-connections",
            "300",
            "--tls-cert",
            "/tls/cert.pem",
            "--tls-key",
            "/tls/key.pem",
            "--tls-client-ca",
            "/tls/ca.pem",
        ])
        .unwrap();
        let settings = config.server_settings();
        assert_eq!(
            settings.health_addr,
            Some("127.0.0.1:8081".parse().unwrap())
        );
        assert_eq!(settings.health_check_interval, Duration::from_millis(250));
        assert!(settings.readiness.allow_eviction);
        assert_eq!(settings.readiness.follows_redis, Some(7));
        assert_eq!(settings.max_request_bytes, 2048);
        assert_eq!(
            settings.auth_tokens_file.as_deref(),
            Some(std::path::Path::new("/run/tokens"))
        );
        assert_eq!(settings.max_concurrent_requests, 10);
        assert_eq!(settings.request_timeout, Duration::from_millis(1500));
        assert_eq!(settings.max_connection_age, None);
        assert_eq!(settings.max_connection_age_grace, Duration::from_secs(2));
        assert_eq!(settings.shutdown_delay, Duration::ZERO);
        assert_eq!(settings.bounds.max_connections, 300);
        assert_eq!(settings.bounds.max_health_watches, 300);
        let tls = settings.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/tls/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/tls/key.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.pem")));
        // Every field is listed, the paths among them.
        let debug = format!("{settings:?}");
        for shown in ["health_addr", "bounds", "/run/tokens", "/tls/key.pem"] {
            assert!(debug.contains(shown), "{debug}");
        }

        let key_only = Config::try_parse_from(["s", "--tls-key", "/tls/key.pem"]).unwrap();
        assert!(key_only.server_settings().tls.is_none());
    }

    /// Neither `Config`, nor the store's `Settings`, nor a `Store` print the
    /// Redis password, from REDIS_URL or from REDIS_PASSWORD_FILE.
    #[tokio::test]
    async fn debug_output_hides_redis_passwords() {
        let dir = std::env::temp_dir().join(format!("config-debug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password_file = dir.join("password");
        std::fs::write(&password_file, "file-secret\n").unwrap();
        for (mode, url) in [
            (
                RedisMode::Standalone,
                "redis://:url-secret@redis-host:6379/0",
            ),
            (
                RedisMode::Standalone,
                "rediss://app:url-secret@redis-host:6380",
            ),
            (
                RedisMode::Cluster,
                "redis://:url-secret@redis-host:7000,redis://:url-secret@redis-host:7001",
            ),
            (
                RedisMode::Sentinel,
                "redis://:url-secret@redis-host:26379,redis://:url-secret@redis-host:26380",
            ),
        ] {
            let mut config = Config::defaults();
            config.redis_mode = mode;
            config.redis_url = url.into();
            config.redis_password_file = Some(password_file.clone());
            let settings = config.store_settings().unwrap();
            assert_eq!(settings.redis_password.as_deref(), Some("file-secret"));
            let store = crate::Store::new(settings.clone()).unwrap();
            for (what, debug) in [
                ("Config", format!("{config:?}")),
                ("Settings", format!("{settings:?}")),
                ("Store", format!("{store:?}")),
                ("Config (pretty)", format!("{config:#?}")),
            ] {
                // The passwords themselves: "secret" alone also matches the
                // store's `secrets` field, which holds none.
                for password in ["url-secret", "file-secret"] {
                    assert!(!debug.contains(password), "{what} leaks: {debug}");
                }
                assert!(
                    debug.contains("redis-host"),
                    "{what} hides the host: {debug}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
