//! Distributed traces (#27): the release binary exporting to an OTLP
//! receiver run by the test. A process per test, because OpenTelemetry's
//! export settings are the process's: each test's server has its own
//! collector. The caller's side runs in the test, with its own
//! current-thread `tracing` subscriber.

use std::{
    process::{Child, Command},
    sync::mpsc,
    time::{Duration, Instant},
};

use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry_proto::tonic::{
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind as ProtoKind},
};
use session_client::SessionClient;
use sessionstore::v1::{GetSessionRequest, session_store_client::SessionStoreClient};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use session_server::store::RedisMode;

use crate::support::{
    Behaviour, Collector, PrivateRedis, Stub, attribute, caller_tracing, hanging_collector,
    inspect, scrape, shared_redis_mode, shared_redis_url, spawn_server, string_attribute,
    test_config, unique_prefix,
};

/// How long a span may take to reach the collector: the server exports
/// every 100 ms in these tests.
const EXPORTED_WITHIN: Duration = Duration::from_secs(10);

/// The server's settings for these tests: traces to `endpoint`, batches
/// every 100 ms, the RPC log lines of successes (DEBUG) written.
fn traced(endpoint: &str) -> Vec<(&str, &str)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "sessionstore-traces-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("SHUTDOWN_DELAY_MS", "0"),
        ("RUST_LOG", "info,session_server::observe=debug"),
    ]
}

/// The server process, stopped (SIGKILL) when the test ends however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address the server logged for its metrics.
fn metrics_addr(logs: &mpsc::Receiver<serde_json::Value>) -> String {
    loop {
        let event = logs
            .recv_timeout(Duration::from_secs(10))
            .expect("no \"metrics at /metrics\" line");
        if event["message"] == "metrics at /metrics" {
            return event["addr"].as_str().unwrap().to_string();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_get_session_server_span(span: &Span) -> bool {
    span.kind == ProtoKind::Server as i32
        && string_attribute(&span.attributes, "rpc.method").as_deref() == Some("GetSession")
}

/// A call made by session-client inside the caller's span arrives as a
/// server span of the caller's trace whose parent is the client's attempt
/// span (itself under the client's call span, under the caller's span); the
/// Redis operation is a child of the server span; the attributes follow
/// OpenTelemetry's RPC and database conventions; the RPC's log line carries
/// the trace id; and no user id or token id appears anywhere in what was
/// exported.
#[tokio::test]
async fn a_client_call_in_a_span_continues_the_callers_trace_into_redis() {
    let redis = PrivateRedis::start();
    let collector = Collector::start().await;
    let (child, addr, logs) = spawn_server(&redis.url(), &traced(&collector.endpoint));
    let _server = Running(child);
    let (subscriber, caller_spans) = caller_tracing();
    let _tracing = tracing::subscriber::set_default(subscriber);

    let prefix = unique_prefix().replace(':', "");
    let user = format!("traced-user-{prefix}");
    let token = format!("traced-token-{prefix}");
    let client = SessionClient::builder(format!("http://{addr}"))
        .connect()
        .await
        .unwrap();
    assert!(
        client
            .create_session(&user, &token, Default::default())
            .await
            .unwrap()
    );

    let caller = tracing::info_span!("caller");
    let caller_context = caller.context().span().span_context().clone();
    assert!(caller_context.is_valid());
    let session = client
        .get_user_session(&user, &token)
        .instrument(caller.clone())
        .await
        .unwrap();
    assert!(session.is_some());
    drop(caller);

    let trace_id = caller_context.trace_id().to_bytes().to_vec();
    let (service, server) = collector
        .span(EXPORTED_WITHIN, |span| {
            span.trace_id == trace_id && is_get_session_server_span(span)
        })
        .await
        .expect("the call's server span did not arrive in the caller's trace");
    assert_eq!(service, "sessionstore-traces-test");

    // Its parent is the client's attempt span, the call span's child.
    let ended = caller_spans.ended();
    let attempt = ended
        .iter()
        .find(|span| {
            span.span_kind == SpanKind::Client
                && span.name == "sessionstore.v1.SessionStore/GetSession"
        })
        .expect("no client attempt span");
    assert_eq!(
        server.parent_span_id,
        attempt.span_context.span_id().to_bytes()
    );
    let call = ended
        .iter()
        .find(|span| span.span_context.span_id() == attempt.parent_span_id)
        .expect("the attempt span has no call span");
    assert_eq!(call.name, "sessionstore.v1.SessionStore/GetSession call");
    assert_eq!(call.parent_span_id, caller_context.span_id());
    assert!(
        attempt
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "attempt" && kv.value.as_str() == "1"),
        "{:?}",
        attempt.attributes
    );

    // The RPC semantic conventions.
    assert_eq!(server.name, "sessionstore.v1.SessionStore/GetSession");
    let attrs = &server.attributes;
    assert_eq!(
        string_attribute(attrs, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        string_attribute(attrs, "rpc.service").as_deref(),
        Some("sessionstore.v1.SessionStore")
    );
    assert_eq!(
        attribute(attrs, "rpc.grpc.status_code"),
        Some(&Value::IntValue(0))
    );

    // The Redis operation, under the server span.
    let (_, redis_span) = collector
        .span(EXPORTED_WITHIN, |span| {
            span.trace_id == trace_id && span.parent_span_id == server.span_id
        })
        .await
        .expect("no Redis span under the server span");
    assert_eq!(redis_span.kind, ProtoKind::Client as i32);
    let attrs = &redis_span.attributes;
    assert_eq!(
        string_attribute(attrs, "db.system").as_deref(),
        Some("redis")
    );
    assert_eq!(
        string_attribute(attrs, "db.operation.name").as_deref(),
        Some("get_session")
    );
    assert_eq!(
        attribute(attrs, "db.redis.round_trips"),
        Some(&Value::IntValue(1))
    );

    // The log line and the trace meet.
    let hex_trace_id = hex(&trace_id);
    let logged =
        std::iter::from_fn(|| logs.recv_timeout(Duration::from_secs(5)).ok()).find(|event| {
            event["message"] == "rpc"
                && event["method"] == "/sessionstore.v1.SessionStore/GetSession"
                && event["trace_id"] == hex_trace_id.as_str()
        });
    assert!(
        logged.is_some(),
        "no RPC log line with trace id {hex_trace_id}"
    );

    // Nothing exported names the user or the token.
    let exported = format!("{:?}", collector.requests());
    assert!(exported.contains("get_session"), "{exported}");
    assert!(!exported.contains(&user), "the user id was exported");
    assert!(!exported.contains(&token), "the token id was exported");
}

/// On Redis Cluster a Redis span names the hash slot its keys live in
/// (`db.redis.slot`: the user's, by the `{user}` tag); with one master
/// (standalone, Sentinel) it names none. Runs against the suite's shared
/// Redis, so the CI's Cluster run checks the slot against the cluster's
/// own `CLUSTER KEYSLOT`.
#[tokio::test]
async fn the_redis_span_names_the_slot_on_cluster() {
    let collector = Collector::start().await;
    let mode = shared_redis_mode();
    let master = std::env::var("TEST_REDIS_SENTINEL_MASTER").unwrap_or_else(|_| "mymaster".into());
    let mut env = traced(&collector.endpoint);
    env.push((
        "REDIS_MODE",
        match mode {
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
            RedisMode::Standalone => "standalone",
        },
    ));
    env.push(("REDIS_SENTINEL_MASTER", &master));
    let (child, addr, _logs) = spawn_server(&shared_redis_url(), &env);
    let _server = Running(child);
    let mut stub = SessionStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let user = format!("slotted-{}", unique_prefix().replace(':', ""));
    stub.get_session(GetSessionRequest {
        token_id: "t".into(),
        user_id: user.clone(),
    })
    .await
    .unwrap();

    let (_, span) = collector
        .span(EXPORTED_WITHIN, |span| {
            string_attribute(&span.attributes, "db.operation.name").as_deref()
                == Some("get_session")
        })
        .await
        .expect("no Redis span for the call");
    let slot = attribute(&span.attributes, "db.redis.slot");
    if mode == RedisMode::Cluster {
        // The cluster's own answer for the user's hash tag.
        let expected: i64 = inspect(
            &test_config(),
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{{{user}}}")),
        )
        .await;
        assert_eq!(
            slot,
            Some(&Value::IntValue(expected)),
            "{:?}",
            span.attributes
        );
    } else {
        assert_eq!(
            slot, None,
            "one master serves every key: {:?}",
            span.attributes
        );
    }
}

/// A malformed `traceparent` is no error: the call is answered and its span
/// starts a new trace (no parent). A valid one makes the span its child.
#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let redis = PrivateRedis::start();
    let collector = Collector::start().await;
    let (child, addr, _logs) = spawn_server(&redis.url(), &traced(&collector.endpoint));
    let _server = Running(child);
    let mut stub = SessionStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let get = |user: &str, traceparent: &str| {
        let mut request = tonic::Request::new(GetSessionRequest {
            token_id: "t".into(),
            user_id: user.into(),
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        request
    };

    let malformed = "00-not-a-trace-01";
    let answer = stub.get_session(get("malformed", malformed)).await;
    assert!(answer.is_ok(), "{answer:?}");
    let (_, root) = collector
        .span(EXPORTED_WITHIN, is_get_session_server_span)
        .await
        .expect("no server span for the call with a malformed traceparent");
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(root.trace_id.len(), 16);
    assert!(root.trace_id.iter().any(|&b| b != 0));

    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    stub.get_session(get("valid", valid)).await.unwrap();
    let (_, child_span) = collector
        .span(EXPORTED_WITHIN, |span| {
            hex(&span.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736"
                && is_get_session_server_span(span)
        })
        .await
        .expect("no server span in the caller's trace");
    assert_eq!(hex(&child_span.parent_span_id), "00f067aa0ba902b7");
    assert_ne!(root.trace_id, child_span.trace_id);
}

/// The sample is decided before any span is made: a call the sampler
/// drops (a caller's unsampled `traceparent` under a parent-based sampler;
/// no `traceparent` at ratio 0) exports no span at all, neither its own nor
/// its Redis operation's, while a sampled caller's call exports both.
#[tokio::test]
async fn an_unsampled_call_exports_no_span() {
    let redis = PrivateRedis::start();
    let collector = Collector::start().await;
    let mut settings = traced(&collector.endpoint);
    settings.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"));
    settings.push(("OTEL_TRACES_SAMPLER_ARG", "0"));
    let (child, addr, _logs) = spawn_server(&redis.url(), &settings);
    let _server = Running(child);
    let mut stub = SessionStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let get = |traceparent: Option<&str>| {
        let mut request = tonic::Request::new(GetSessionRequest {
            token_id: "t".into(),
            user_id: "u".into(),
        });
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        request
    };

    let unsampled = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    stub.get_session(get(Some(unsampled))).await.unwrap();
    stub.get_session(get(None)).await.unwrap();
    let sampled = "00-6bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    stub.get_session(get(Some(sampled))).await.unwrap();
    let (_, server_span) = collector
        .span(EXPORTED_WITHIN, |span| {
            hex(&span.trace_id) == "6bf92f3577b34da6a3ce929d0e0e4736"
                && is_get_session_server_span(span)
        })
        .await
        .expect("no server span for the sampled caller");
    collector
        .span(EXPORTED_WITHIN, |span| {
            span.parent_span_id == server_span.span_id && span.kind == ProtoKind::Client as i32
        })
        .await
        .expect("no Redis span under the sampled call");
    // The calls before it were answered first, and their spans, had there
    // been any, would have ended first: every span exported is the
    // sampled call's.
    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    for (_, span) in &spans {
        assert_eq!(
            hex(&span.trace_id),
            "6bf92f3577b34da6a3ce929d0e0e4736",
            "{span:?}"
        );
    }
}

/// A collector that accepts connections and never answers: calls keep
/// their latency (export never makes a call wait), the spans that do not
/// fit the export queue are dropped and counted, and SIGTERM still stops
/// the server within the flush's budget (5 s) rather than the exporter's
/// 10 s timeout.
#[tokio::test]
async fn a_hanging_collector_costs_spans_not_latency() {
    let redis = PrivateRedis::start();
    let endpoint = hanging_collector().await;
    let mut env = traced(&endpoint);
    env.push(("OTEL_BSP_MAX_QUEUE_SIZE", "16"));
    let (child, addr, logs) = spawn_server(&redis.url(), &env);
    let metrics = metrics_addr(&logs);
    let mut server = Running(child);
    let mut stub = SessionStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let get = || GetSessionRequest {
        token_id: "t".into(),
        user_id: "u".into(),
    };
    stub.get_session(get()).await.unwrap();
    // Past the first export, which then hangs.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let start = Instant::now();
        stub.get_session(get()).await.unwrap();
        slowest = slowest.max(start.elapsed());
    }
    // A call waiting on the export would take the exporter's 10 s timeout.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest call {slowest:?}"
    );

    let text = scrape(metrics.as_str()).await;
    let dropped: u64 = text
        .lines()
        .find(|line| {
            line.starts_with(r#"sessionstore_trace_spans_dropped_total{reason="queue_full"}"#)
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no dropped spans counted: {text}"));
    // 2 spans a call (the RPC's, the Redis operation's), 16 queued.
    assert!(dropped >= 2 * 200 - 16 - 2, "dropped {dropped}");

    let stopping = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = server.0.wait().unwrap();
        (status, server)
    })
    .await
    .unwrap()
    .0;
    let took = stopping.elapsed();
    assert_eq!(exited.code(), Some(0), "{exited:?}");
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
}

/// Retries are sibling spans: a read answered UNAVAILABLE twice, then OK,
/// is one call span with three attempt spans under it, numbered 1 to 3,
/// each attempt carrying its own span as `traceparent` in the caller's
/// trace.
#[tokio::test]
async fn each_attempt_is_a_sibling_span_and_carries_its_traceparent() {
    let stub = Stub::start(Behaviour {
        unavailable_first: 2,
        then: tonic::Code::Ok,
    })
    .await;
    let client = stub.client().max_attempts(3).connect().await.unwrap();
    let (subscriber, caller_spans) = caller_tracing();
    let _tracing = tracing::subscriber::set_default(subscriber);
    let caller = tracing::info_span!("caller");
    let trace_id = caller.context().span().span_context().trace_id();
    client
        .get_user_session_count("u")
        .instrument(caller.clone())
        .await
        .unwrap();
    drop(caller);

    let ended = caller_spans.ended();
    let call = ended
        .iter()
        .find(|span| span.name == "sessionstore.v1.SessionStore/GetUserSessionCount call")
        .expect("no call span");
    let mut attempts: Vec<_> = ended
        .iter()
        .filter(|span| span.span_kind == SpanKind::Client)
        .collect();
    attempts.sort_by_key(|span| span.start_time);
    assert_eq!(attempts.len(), 3);
    let sent: Vec<String> = stub
        .metadata()
        .iter()
        .map(|metadata| {
            metadata
                .get("traceparent")
                .expect("an attempt without traceparent")
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(sent.len(), 3);
    for (number, (attempt, traceparent)) in attempts.iter().zip(&sent).enumerate() {
        assert_eq!(attempt.parent_span_id, call.span_context.span_id());
        assert_eq!(attempt.span_context.trace_id(), trace_id);
        let number = (number + 1).to_string();
        assert!(
            attempt
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "attempt" && kv.value.as_str() == number),
            "{:?}",
            attempt.attributes
        );
        assert_eq!(
            *traceparent,
            format!("00-{}-{}-01", trace_id, attempt.span_context.span_id())
        );
    }
}
