//! The real `session-server` binary as Kubernetes runs it: configuration
//! errors at start, and SIGTERM under load.

use std::{
    process::{Child, Command},
    sync::mpsc,
    time::Duration,
};

use sessionstore::v1::{GetSessionRequest, session_store_client::SessionStoreClient};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{PrivateRedis, readiness_at, server_binary, spawn_server, wait_until};

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Whether readiness at `url` becomes `status` within `limit`.
async fn readiness_at_becomes(url: &str, status: ServingStatus, limit: Duration) -> bool {
    wait_until(limit, || async { readiness_at(url).await == Some(status) }).await
}

/// The binary on `redis` with SHUTDOWN_DELAY_MS `delay_ms`, sent SIGTERM once
/// ready: asserted SERVING before the signal and NOT_SERVING (on a new
/// connection) within 2 s of it. The process, its URL and its log lines.
async fn terminated_while_ready(
    redis: &PrivateRedis,
    delay_ms: &str,
) -> (Child, String, mpsc::Receiver<serde_json::Value>) {
    let (child, addr, logs) = spawn_server(
        &redis.url(),
        &[
            ("HEALTH_CHECK_INTERVAL_MS", "50"),
            ("SHUTDOWN_DELAY_MS", delay_ms),
        ],
    );
    let url = format!("http://{addr}");
    assert!(
        readiness_at_becomes(&url, ServingStatus::Serving, Duration::from_secs(5)).await,
        "readiness never became SERVING"
    );
    signal(&child, "TERM");
    assert!(
        readiness_at_becomes(&url, ServingStatus::NotServing, Duration::from_secs(2)).await,
        "readiness did not turn NOT_SERVING on a new connection after SIGTERM"
    );
    (child, url, logs)
}

/// How `child` exits, waited for off the runtime.
async fn exited(mut child: Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap()
}

/// The `message` of every log line received so far.
fn messages(logs: &mpsc::Receiver<serde_json::Value>) -> Vec<String> {
    logs.try_iter()
        .filter_map(|event| event["message"].as_str().map(str::to_string))
        .collect()
}

/// A bad setting stops the binary before it listens, with exit status 2 and
/// a message naming the variable.
#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    let cases = [
        ("SESSION_TTL", "0"),
        ("MAX_SESSIONS_PER_USER", "many"),
        ("SESSION_LIMIT_POLICY", "drop_newest"),
        ("REDIS_URL", "http://not-redis"),
        ("AUTH_TOKENS_FILE", "/no/such/tokens"),
        ("TLS_CERT", "/no/such/cert.pem"),
    ];
    for (variable, value) in cases {
        let mut command = Command::new(server_binary());
        command
            .env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env(variable, value);
        if variable == "TLS_CERT" {
            // Set together, so the missing file is what is reported.
            command.env("TLS_KEY", "/no/such/key.pem");
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    }
}

/// SIGTERM under load: calls in flight when the signal arrives complete, the
/// listener closes so new connections are refused, and the process exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_calls_and_exits_0() {
    let redis = PrivateRedis::start();
    let (child, addr, _logs) = spawn_server(
        &redis.url(),
        &[("REDIS_TIMEOUT_MS", "3000"), ("SHUTDOWN_DELAY_MS", "0")],
    );
    let url = format!("http://{addr}");
    let mut client = SessionStoreClient::connect(url.clone()).await.unwrap();
    let get = || GetSessionRequest {
        token_id: "t".into(),
        user_id: "u".into(),
    };
    client.get_session(get()).await.unwrap();

    // Hold calls in flight: Redis answers nothing for 1.5 s.
    redis.pause(1500).await;
    let in_flight: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_session(get()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "TERM");

    for call in in_flight {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "an in-flight call was dropped: {answer:?}");
    }
    let status = exited(child).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let refused = SessionStoreClient::connect(url).await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
    // A call on the old connection fails too, rather than hanging.
    let after = client.get_session(get()).await.unwrap_err();
    assert!(
        matches!(after.code(), Code::Unavailable | Code::Unknown),
        "{after:?}"
    );
}

/// SIGTERM as Kubernetes sends it: readiness turns NOT_SERVING at once while
/// new connections and calls are still served for SHUTDOWN_DELAY_MS; then the
/// listener closes and the process exits 0, with its last log line
/// ("stopped") written out by the non-blocking log writer before it exits.
#[tokio::test]
async fn sigterm_turns_not_ready_first_and_exits_with_the_log_flushed() {
    let redis = PrivateRedis::start();
    // A delay far longer than the checks during it take.
    let (child, url, logs) = terminated_while_ready(&redis, "3000").await;
    // Still accepting and serving: a new connection, a call answered.
    let mut late = SessionStoreClient::connect(url.clone())
        .await
        .expect("the listener closed before the delay ended");
    let answer = late
        .get_session(GetSessionRequest {
            token_id: "late".into(),
            user_id: "late".into(),
        })
        .await;
    assert!(answer.is_ok(), "a call during the delay failed: {answer:?}");

    let status = exited(child).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(readiness_at(&url).await.is_none(), "still listening");
    let messages = messages(&logs);
    let position = |start: &str| {
        messages
            .iter()
            .position(|message| message.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line in {messages:#?}"))
    };
    assert!(position("shutting down") < position("closing the listener"));
    assert_eq!(messages.last().map(String::as_str), Some("stopped"));
}

/// A second signal during the shutdown delay stops the process at once (a
/// second Ctrl-C), instead of after SHUTDOWN_DELAY_MS and the drain.
#[tokio::test]
async fn a_second_signal_stops_at_once() {
    let redis = PrivateRedis::start();
    let (child, _url, logs) = terminated_while_ready(&redis, "120000").await;
    signal(&child, "INT");
    // Far below the 120 s delay.
    let exited = tokio::time::timeout(Duration::from_secs(30), exited(child))
        .await
        .expect("still running 30 s after the second signal");
    assert_eq!(exited.code(), Some(0), "exit status {exited:?}");
    let messages = messages(&logs);
    assert!(
        messages.iter().any(|m| m.starts_with("second signal")),
        "{messages:#?}"
    );
}
