//! Test support shared by every area of the end-to-end suite, one concern per
//! file: the in-process server, the binary launcher, private Redis
//! deployments, the readiness probe, the metrics scrape, fake servers, PKI
//! and OTLP collectors.
//! Test modules import from here, never from each other.

use std::{
    net::TcpListener as StdListener,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tonic::metadata::MetadataMap;

mod fake;
mod http;
mod metrics;
mod otlp;
mod pki;
mod probe;
mod process;
mod redis;
mod rpc;
mod server;

pub(crate) use self::{
    fake::{Behaviour, Relay, Stub},
    http::{HttpAnswer, Serving, http},
    metrics::{metric, sample, scrape},
    otlp::{Collector, attribute, caller_tracing, hanging_collector, string_attribute},
    pki::{Pki, tls_channel},
    probe::{check_on, liveness, readiness, readiness_at, readiness_becomes},
    process::{
        Running, ServerProcess, client_example, faketime, launch, server_binary, server_command,
        spawn_server,
    },
    redis::{
        OnNeedle, PrivateRedis, Topology, assert_marker_outlives_reservation, command_calls,
        inspect, login_account_key, pttl, redis_cli, redis_cli_with_password, redis_relay,
        server_script, shared_redis_mode, shared_redis_url, store_raw_session,
    },
    rpc::{
        Client, HELD, count, create, direct_and_held, found, get, gone_within, list, login,
        lookups_work_within, next_revocations, now_ms, record_attempt, reset_attempts, revoke,
        revoke_all, revoke_others, stream_starts,
    },
    server::{TestServer, config_on, https_url, test_config},
};

/// A key prefix no other test (or run) uses, so tests can share one Redis.
pub(crate) fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test-{}-{}-{}:",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 20 ms until it holds or `limit` passes; a readiness
/// wait, not a sleep standing in for one.
pub(crate) async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An error and all its sources, for asserting on a cause deep in the chain.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{err:?}");
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(" <- {cause:?}"));
        source = cause.source();
    }
    text
}

/// The `grpc-timeout` a request carried, decoded.
pub(crate) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// A private temp directory for files the server reads, removed on drop.
pub(crate) struct TempFiles(PathBuf);

impl TempFiles {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sessionstore-files-{}",
            unique_prefix().trim_end_matches(':')
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
