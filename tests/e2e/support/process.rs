//! Binaries built by the same cargo that runs the tests: the release
//! `session-server` (one launcher, which reads its JSON log, and a handle
//! that keeps the log and kills the process when the test ends), client
//! examples, and `faketime` to run a process under a shifted clock.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::Duration,
};

use super::unique_prefix;

/// The release `session-server` binary, built with the same command as the
/// Dockerfile (and by the same cargo that runs the tests), for tests of what
/// only the real process shows: environment parsing, logs, the metrics port.
pub(crate) fn server_binary() -> PathBuf {
    let build = ["--release", "--locked", "--quiet", "-p", "session-server"];
    cargo_build(&build, false, "session-server").join("release/session-server")
}

/// An example of session-client (`session-client/examples/<name>.rs`), built
/// (debug) by the same cargo that runs the tests, for tests that must run a
/// client in a process of its own (under libfaketime, say).
pub(crate) fn client_example(name: &str) -> PathBuf {
    let build = [
        "--locked",
        "--quiet",
        "-p",
        "session-client",
        "--example",
        name,
    ];
    // Without the variables cargo sets for this test binary: ring's build
    // script tracks CARGO_MANIFEST_DIR and OUT_DIR (among others), so
    // inheriting them would rebuild ring
    // and its dependents here, and again at the next `cargo test` (about
    // 25 s each way measured).
    cargo_build(&build, true, &format!("the example {name}"))
        .join("debug/examples")
        .join(name)
}

/// Runs `cargo build ARGS` with the cargo that runs the tests, in the
/// workspace, asserting that building `what` succeeded; without the
/// variables cargo set for this test binary when `clean_env`. Returns the
/// target directory.
fn cargo_build(args: &[&str], clean_env: bool, what: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    if clean_env {
        let leaked = std::env::vars().map(|(key, _)| key).filter(|key| {
            key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || matches!(
                    key.as_str(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_LINKS"
                        | "OUT_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
        });
        for key in leaked {
            build.env_remove(key);
        }
    }
    let status = build
        .arg("build")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {what} failed");
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `faketime` (Debian's package of that name, libfaketime's wrapper), which
/// `scripts/ensure-redis.sh` installs. Missing, the test fails saying so
/// rather than skipping: a skipped clock test would hide the regression it
/// is there for.
pub(crate) fn faketime() -> &'static str {
    let found = Command::new("faketime")
        .args(["-f", "+0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "faketime is not installed: run scripts/ensure-redis.sh (or `apt-get install faketime`)"
    );
    "faketime"
}

/// The release binary, run by `command` (the binary itself, or a shell that
/// execs it), configured as the tests run it: the environment cleared, Redis
/// at `redis_url`, both ports 0, a fresh key prefix, JSON logs at INFO on a
/// piped stdout, then `extra_env` (which may override any of these).
pub(crate) fn server_command(
    mut command: Command,
    redis_url: &str,
    extra_env: &[(&str, &str)],
) -> Command {
    command
        .env_clear()
        .env("REDIS_URL", redis_url)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("KEY_PREFIX", unique_prefix())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// Spawns `command` (see [`server_command`]) and reads its log up to
/// "listening". Returns the child, the log lines before that one, the address
/// it logged and the lines after it, as they come.
pub(crate) fn launch(
    mut command: Command,
) -> (
    Child,
    Vec<serde_json::Value>,
    String,
    mpsc::Receiver<serde_json::Value>,
) {
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut early = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["message"] == "listening" {
            break event["addr"].as_str().unwrap().to_string();
        }
        early.push(event);
    };
    // Keep draining stdout, whether or not the test reads the lines.
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str(&line) {
                let _ = sender.send(event);
            }
        }
    });
    (child, early, addr, receiver)
}

/// Starts the binary on port 0 and returns it with the address it logged and
/// the log lines after that one, as they come.
pub(crate) fn spawn_server(
    redis_url: &str,
    extra_env: &[(&str, &str)],
) -> (Child, String, mpsc::Receiver<serde_json::Value>) {
    let command = server_command(Command::new(server_binary()), redis_url, extra_env);
    let (child, _early, addr, logs) = launch(command);
    (child, addr, logs)
}

/// Kills the process when the test ends, however it ends.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary started by [`spawn_server`], killed when dropped, keeping
/// every line it logs for the test to read.
pub(crate) struct ServerProcess {
    _process: Running,
    /// Where it serves gRPC.
    pub(crate) addr: String,
    /// Where it serves /metrics.
    pub(crate) metrics: SocketAddr,
    log: Mutex<(Vec<serde_json::Value>, mpsc::Receiver<serde_json::Value>)>,
}

impl ServerProcess {
    /// Starts the binary as [`spawn_server`] does and waits for its metrics
    /// address.
    pub(crate) fn start(redis_url: &str, extra_env: &[(&str, &str)]) -> Self {
        let command = server_command(Command::new(server_binary()), redis_url, extra_env);
        let (child, early, addr, logs) = launch(command);
        let process = Running(child);
        let (mut seen, mut metrics) = (early, None);
        while metrics.is_none() {
            let event = logs
                .recv_timeout(Duration::from_secs(10))
                .expect("no \"metrics at /metrics\" line");
            if event["message"] == "metrics at /metrics" {
                metrics = event["addr"].as_str().map(|a| a.parse().unwrap());
            }
            seen.push(event);
        }
        Self {
            _process: process,
            addr,
            metrics: metrics.unwrap(),
            log: Mutex::new((seen, logs)),
        }
    }

    /// Every line logged so far.
    pub(crate) fn events(&self) -> Vec<serde_json::Value> {
        let mut log = self.log.lock().unwrap();
        let (seen, logs) = &mut *log;
        seen.extend(logs.try_iter());
        seen.clone()
    }
}
