//! Prometheus metrics: the names recorded across the server, the recorder, and
//! the `/metrics` endpoint on its own port (METRICS_ADDR).
//!
//! Recording goes through the `metrics` facade, so code that records does not
//! depend on the exporter; `metrics-exporter-prometheus` renders the text format.

use std::{future::Future, time::Duration};

use axum::{Router, routing::get};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// RPCs handled, by `method` and gRPC `code`.
pub const RPC_REQUESTS: &str = "sessionstore_rpc_requests_total";
/// RPC latency in seconds, by `method` and `code`.
pub const RPC_DURATION: &str = "sessionstore_rpc_duration_seconds";
/// RPC log lines left out by the per-code rate limit (`observe.rs`), by
/// `code`; the RPC counters above still count every call.
pub const RPC_LOG_LINES_SUPPRESSED: &str = "sessionstore_rpc_log_lines_suppressed_total";
/// Log lines dropped because the log buffer was full (stdout could not keep
/// up); logging never makes a call wait.
pub const LOG_LINES_DROPPED: &str = "sessionstore_log_lines_dropped_total";
/// Latency of one Redis round trip in seconds, by store `op`.
pub const REDIS_DURATION: &str = "sessionstore_redis_command_duration_seconds";
/// Failed Redis operations, by store `op` and error `kind`.
pub const REDIS_ERRORS: &str = "sessionstore_redis_errors_total";
/// Open connections in the Redis pool.
pub const POOL_CONNECTIONS: &str = "sessionstore_redis_pool_connections";
/// Pooled connections checked out right now.
pub const POOL_IN_USE: &str = "sessionstore_redis_pool_in_use_connections";
/// Configured maximum pool size.
pub const POOL_MAX: &str = "sessionstore_redis_pool_max_connections";
/// Sessions created.
pub const SESSIONS_CREATED: &str = "sessionstore_sessions_created_total";
/// CreateSession calls that stored nothing, by `reason` (already_exists,
/// token_taken, token_revoked, limit_reached).
pub const SESSIONS_REFUSED: &str = "sessionstore_sessions_refused_total";
/// Sessions revoked, by `how` (single, all, others).
pub const SESSIONS_REVOKED: &str = "sessionstore_sessions_revoked_total";
/// Sessions evicted to keep a user under the cap.
pub const SESSIONS_EVICTED: &str = "sessionstore_sessions_evicted_total";
/// RotateSession answers, by `outcome` (rotated, already_rotated,
/// reuse_detected, not_found, token_taken).
pub const ROTATIONS: &str = "sessionstore_rotations_total";
/// Families ended because RotateSession saw a token they had rotated past
/// (a replayed refresh credential): each one deserves a look.
pub const REUSE_DETECTED: &str = "sessionstore_refresh_reuse_detected_total";
/// Login attempts, by `result` (allowed, refused).
pub const LOGIN_ATTEMPTS: &str = "sessionstore_login_attempts_total";
/// The part of the login attempts that presented a trusted device token,
/// by `result` (allowed, refused): counted against the device alone.
pub const LOGIN_DEVICE_ATTEMPTS: &str = "sessionstore_login_device_attempts_total";
/// 1 while this process's revocation subscription is up (heartbeats come
/// back through it), 0 while it is down or nobody watches.
pub const REVOCATION_SUBSCRIPTION_UP: &str = "sessionstore_revocation_subscription_up";
/// Events the revocation subscriber received, by `kind` (revocation,
/// shortened, reset, malformed).
pub const REVOCATION_EVENTS: &str = "sessionstore_revocation_events_total";
/// WatchRevocations streams ended because their receiver fell
/// REVOCATION_BACKLOG events behind (it reconnects and resets).
pub const REVOCATION_WATCHERS_DROPPED: &str = "sessionstore_revocation_watchers_dropped_total";
/// How long calls that end sessions early waited for their replicas'
/// acknowledgements (REVOCATION_MIN_REPLICAS > 0), in seconds, by `outcome`
/// (`acked`; `not_replicated`: fewer acknowledged in time; `failed`: the wait
/// itself failed, Redis unreachable).
pub const REPLICATION_WAIT: &str = "sessionstore_revocation_replication_wait_duration_seconds";
/// Calls that end sessions early answered UNAVAILABLE because fewer than
/// REVOCATION_MIN_REPLICAS replicas acknowledged them in time: applied on
/// the master, possibly undone by a failover until the caller's retry passes.
pub const REVOCATIONS_UNREPLICATED: &str = "sessionstore_revocations_unreplicated_total";
/// Replicas connected to each master (`INFO replication`), by `node`
/// (`host:port` on a cluster, `master` otherwise); read by the readiness
/// loop while REVOCATION_MIN_REPLICAS > 0.
pub const REDIS_CONNECTED_REPLICAS: &str = "sessionstore_redis_connected_replicas";
/// 1 while Redis answers the readiness PING, else 0.
pub const REDIS_UP: &str = "sessionstore_redis_up";
/// Whether Redis keeps every key until it expires: 1 while every master's
/// `maxmemory-policy` is `noeviction`, 0 while one may evict (even when
/// REDIS_ALLOW_EVICTION accepts it), -1 while unknown (`INFO` has never
/// answered, e.g. an ACL forbids it). Alert on `== 0`.
pub const REDIS_EVICTION_POLICY_OK: &str = "sessionstore_redis_eviction_policy_ok";
/// Why readiness is what it is: a state set with label `state`, one of
/// [`READINESS_STATES`], exactly one series at 1 and the others at 0.
pub const READINESS: &str = "sessionstore_readiness";
/// The `state` values of [`READINESS`]: `serving`; `redis_down` (Redis has
/// not answered since the start, or, with READINESS_FOLLOWS_REDIS,
/// READINESS_REDIS_FAILURES checks in a row failed; by default an outage
/// later leaves `serving`, and [`REDIS_UP`] says Redis is down);
/// `redis_evicts` (a master's `maxmemory-policy` is not `noeviction` and
/// REDIS_ALLOW_EVICTION is off).
pub const READINESS_STATES: [&str; 3] = ["serving", "redis_down", "redis_evicts"];
/// When the TLS certificate in use expires, in seconds since the Unix epoch
/// (its `notAfter`). Alert while it is near: a renewal that is not being
/// picked up (see TLS_RELOAD_FAILURES) ends in failed handshakes.
pub const TLS_CERT_EXPIRY: &str = "sessionstore_tls_cert_expiry_timestamp_seconds";
/// Changed TLS files that could not be used (unreadable, a key that is not
/// the certificate's, bad PEM): the previous certificate stays in use.
pub const TLS_RELOAD_FAILURES: &str = "sessionstore_tls_reload_failures_total";
/// TLS certificate reloads that took effect.
pub const TLS_RELOADS: &str = "sessionstore_tls_reloads_total";
/// AUTH_TOKENS_FILE reloads that kept the previous tokens (the file could not
/// be read, or changed while it was read). Alert on any increase.
pub const AUTH_TOKENS_RELOAD_FAILURES: &str = "sessionstore_auth_tokens_reload_failures_total";
/// Trace spans dropped, by `reason`: `queue_full` (the export queue,
/// OTEL_BSP_MAX_QUEUE_SIZE, was full: the collector is slow or away; a call
/// never waits for it) or `export_failed` (the collector refused the batch
/// or did not answer in time). Only with OTEL_EXPORTER_OTLP_ENDPOINT set.
pub const TRACE_SPANS_DROPPED: &str = "sessionstore_trace_spans_dropped_total";

/// Latency buckets in seconds: from 100 µs (a local Redis GET) to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the process-wide Prometheus recorder and returns the handle that
/// renders it.
///
/// # Errors
///
/// [`BuildError`] when a recorder is already installed or buckets are invalid.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    // A counter appears at its first increment, which `increase()` cannot
    // see: one whose every increment an alert must catch exists from the
    // start, at 0.
    metrics::counter!(REUSE_DETECTED).absolute(0);
    metrics::counter!(REVOCATIONS_UNREPLICATED).absolute(0);
    Ok(handle)
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
///
/// # Errors
///
/// The I/O error that stopped the HTTP server.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Histograms keep raw samples until upkeep folds them in; the exporter's
    // own listener would do this, the handle alone does not.
    let upkeep = tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            loop {
                ticker.tick().await;
                handle.run_upkeep();
            }
        }
    });
    let app = Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    result
}
