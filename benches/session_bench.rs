//! A closed-loop load generator for a running SessionStore server: N tasks spread
//! over M HTTP/2 connections each send one RPC, wait for its answer, and send the
//! next. Every latency of the measured window goes into an HDR histogram (no
//! sampling, no averaging of percentiles), and the run ends with one line of
//! `key=value` pairs that `scripts/bench.sh` reads.
//!
//! ```sh
//! cargo bench --bench session_bench -- --url http://127.0.0.1:50051 \
//!     --profile get-hint --concurrency 64 --duration 5
//! ```
//!
//! Closed loop means the offered load adapts to the server: the numbers are
//! the throughput at a given concurrency and the latency each caller saw, not
//! the latency at a fixed arrival rate. Sessions the profile reads, revokes or
//! rotates are created before the warm-up, under user ids unique to the run,
//! so runs against one Redis never see each other's data.
//!
//! Three profiles measure the near-cache and its revocation stream (#12)
//! instead of one RPC: `cached-get` (session-client's near-cache answering
//! from memory, closed loop like the others), `visibility` (how long after
//! RevokeSession returns on one client another client's near-cache stops
//! answering the session) and `revoke-fanout` (each session revoked once
//! while `--subscribers` WatchRevocations streams listen: the server's CPU
//! per revocation and subscriber).

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use session_client::SessionClient;
use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, RecordLoginAttemptRequest, ResetLoginAttemptsRequest,
    RevokeSessionRequest, RotateOutcome, RotateSessionRequest, WatchRevocationsRequest,
    session_store_client::SessionStoreClient,
};
use tonic::transport::Channel;

/// What the load consists of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// GetSession with the user id hint (one Redis GET per call).
    GetHint,
    /// GetSession without the hint (owner lookup, then the session).
    GetNohint,
    /// CreateSession of new tokens for users picked at random.
    Create,
    /// RevokeSession (with the hint) of pre-populated sessions.
    Revoke,
    /// RotateSession (a refresh): `--keyspace` families of `--users` users
    /// are created first, each owned by one task, which rotates its
    /// families in turn to fresh token ids, so no two calls ever race on
    /// one family. ROTATED counts as a hit, any other outcome as a miss.
    /// `--families FILE` hands the families' current tokens to a later
    /// `--no-populate` run (family ids are the server's, not the run's).
    Rotate,
    /// 95 % get-hint, 4 % create, 1 % revoke.
    Mixed,
    /// RecordLoginAttempt without an account, from an address picked at
    /// random among `--keyspace` (IPv4 `10.x.y.z`): a large keyspace keeps
    /// most attempts under the limit (allowed counts as a hit, refused as a
    /// miss). Use a fresh KEY_PREFIX on the server for each run.
    Login,
    /// RecordLoginAttempt with an account picked at random among `--users`
    /// (unique to the run), from an address as in `login`.
    LoginAccount,
    /// As `login-account`, presenting the device token a login issued to the
    /// account (trusted: counted against the device alone). The tokens are
    /// issued before the warm-up (ResetLoginAttempts), or read from
    /// `--devices FILE` with `--no-populate`; issuing writes them there.
    LoginDevice,
    /// As `login-account`, presenting a made-up device token (untrusted:
    /// counted as without one).
    LoginDeviceUntrusted,
    /// `get_user_session` of session-client with its near-cache on, every
    /// session cached before the warm-up: checks answered from memory. Each
    /// of the `--concurrency` tasks runs on an OS thread of its own.
    CachedGet,
    /// Revocation visibility, one session at a time (`--keyspace` of them):
    /// a near-cache client caches the session, a thread polls it there, a
    /// second connection revokes it; the time from RevokeSession returning
    /// to the cache no longer answering it. `--subscribers` more streams
    /// listen meanwhile. Ignores `--concurrency`, `--warmup`, `--duration`.
    Visibility,
    /// Every pre-populated session revoked exactly once, by `--concurrency`
    /// tasks, while `--subscribers` WatchRevocations streams (one HTTP/2
    /// connection each) listen; measured from the first revoke until every
    /// stream received every revocation. Ignores `--warmup`, `--duration`.
    RevokeFanout,
}

/// Load generator for SessionStore.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The server's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    /// HTTP/2 connections (channels) the tasks are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Closed-loop tasks, each with one call in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Profile::GetHint)]
    profile: Profile,
    /// Distinct users the sessions belong to.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    users: u32,
    /// Sessions pre-populated for the get, revoke and mixed profiles, and
    /// families for `rotate` (keep keyspace / users at or below the server's
    /// MAX_SESSIONS_PER_USER, or pre-population evicts what it just made).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    keyspace: u32,
    /// Worker threads of the generator's runtime. The generator shares the
    /// machine with the server and Redis, so it uses few by default.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Processes whose CPU time (and RSS) over the measured window is
    /// reported, as `name=pid`; repeatable.
    #[arg(long = "watch", value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
    /// Names this run's users and tokens; by default unique per run. Reusing
    /// one with `--no-populate` reads the sessions an earlier run made.
    #[arg(long)]
    run_id: Option<String>,
    /// Skips creating the sessions the profile reads (they exist already).
    #[arg(long)]
    no_populate: bool,
    /// Printed as `label=` so a script can tell its runs apart.
    #[arg(long, default_value = "")]
    label: String,
    /// WatchRevocations streams held open besides the load (`visibility`,
    /// `revoke-fanout`), each on its own HTTP/2 connection like separate
    /// client processes, each reading every message.
    #[arg(long, default_value_t = 0)]
    subscribers: u32,
    /// `visibility`: microseconds the polling thread sleeps between two
    /// looks at the cache; 0 spins (yielding the CPU between looks).
    #[arg(long, default_value_t = 0)]
    poll_interval_us: u64,
    /// `revoke-fanout`: microseconds each task pauses after each revoke.
    /// Spaced out, each revocation reaches the streams as a message of its
    /// own (as logouts do); back to back, the server batches them.
    #[arg(long, default_value_t = 0)]
    pause_us: u64,
    /// `rotate`: a file of the families (user, family id, current token, one
    /// tab-separated line each). With `--no-populate` the families are read
    /// from it; after the run their current tokens are written back, so that
    /// one process can populate and another measure.
    #[arg(long)]
    families: Option<std::path::PathBuf>,
    /// `login-device`: a file of the accounts and their device tokens (one
    /// tab-separated line each), written when the tokens are issued and read
    /// with `--no-populate`.
    #[arg(long)]
    devices: Option<std::path::PathBuf>,
}

fn parse_watch(value: &str) -> Result<(String, u32), String> {
    let (name, pid) = value
        .split_once('=')
        .ok_or_else(|| format!("expected name=pid, got {value:?}"))?;
    let pid = pid.parse().map_err(|e| format!("pid {pid:?}: {e}"))?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("bad name {name:?}"));
    }
    Ok((name.to_string(), pid))
}

/// Metadata like a real session's: client address and user agent. Its size
/// makes the stored JSON about as long as `scripts/bench.sh`'s Redis values.
fn metadata() -> std::collections::HashMap<String, String> {
    [
        ("ip".to_string(), "10.12.34.56".to_string()),
        (
            "user_agent".to_string(),
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0".to_string(),
        ),
    ]
    .into()
}

/// Session ids of this run: user `i % users` owns session `i`.
#[derive(Clone, Debug)]
struct Keys {
    run: String,
    users: u32,
    keyspace: u32,
    /// `login-device`: accounts and the device tokens issued to them.
    devices: Arc<Vec<(String, String)>>,
}

impl Keys {
    fn user(&self, user: u32) -> String {
        format!("bench-{}-u{user}", self.run)
    }
    fn token(&self, session: u32) -> String {
        format!("bench-{}-t{session}", self.run)
    }
    fn owner(&self, session: u32) -> String {
        self.user(session % self.users)
    }
    fn account(&self, user: u32) -> String {
        format!("bench-{}-{user}@example.com", self.run)
    }
}

/// One login of the `rotate` profile, as its owning task knows it.
#[derive(Clone, Debug)]
struct Family {
    user: String,
    id: String,
    /// The family's current session, the one the next rotation presents.
    token: String,
}

fn read_families(path: &std::path::Path) -> Result<Vec<Family>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--families {}: {e}", path.display()))?;
    text.lines()
        .map(|line| {
            let mut fields = line.split('\t');
            match (fields.next(), fields.next(), fields.next(), fields.next()) {
                (Some(user), Some(id), Some(token), None) => Ok(Family {
                    user: user.to_string(),
                    id: id.to_string(),
                    token: token.to_string(),
                }),
                _ => Err(format!("--families {}: bad line {line:?}", path.display())),
            }
        })
        .collect()
}

fn write_families(path: &std::path::Path, families: &[Family]) -> Result<(), String> {
    let text: String = families
        .iter()
        .map(|f| format!("{}\t{}\t{}\n", f.user, f.id, f.token))
        .collect();
    std::fs::write(path, text).map_err(|e| format!("--families {}: {e}", path.display()))
}

/// Issues one device token to each of the run's `--users` accounts, as a
/// first successful login does.
async fn issue_devices(
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
) -> Result<Vec<(String, String)>, String> {
    let mut devices = Vec::with_capacity(usize::try_from(keys.users).unwrap_or(0));
    for user in 0..keys.users {
        let mut client = clients[user as usize % clients.len()].clone();
        let account = keys.account(user);
        let token = client
            .reset_login_attempts(ResetLoginAttemptsRequest {
                ip: "10.255.255.1".into(),
                account: account.clone(),
                issue_device_token: true,
                device_token: String::new(),
            })
            .await
            .map_err(|status| format!("issuing a device token: {status}"))?
            .into_inner()
            .device_token;
        devices.push((account, token));
    }
    Ok(devices)
}

fn read_devices(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--devices {}: {e}", path.display()))?;
    text.lines()
        .map(|line| {
            line.split_once('\t')
                .map(|(account, token)| (account.to_string(), token.to_string()))
                .ok_or_else(|| format!("--devices {}: bad line {line:?}", path.display()))
        })
        .collect()
}

fn write_devices(path: &std::path::Path, devices: &[(String, String)]) -> Result<(), String> {
    let text: String = devices
        .iter()
        .map(|(account, token)| format!("{account}\t{token}\n"))
        .collect();
    std::fs::write(path, text).map_err(|e| format!("--devices {}: {e}", path.display()))
}

/// A tiny xorshift generator: enough to pick keys, no dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u32) -> u32 {
        // n is small next to 2^64: the bias is negligible.
        u32::try_from(self.next() % u64::from(n)).unwrap_or(0)
    }
}

/// What one task saw in the measured window.
#[derive(Debug)]
struct Tally {
    /// Nanoseconds: a near-cache hit takes about a microsecond.
    latency_ns: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// Gets that found no session, revokes that revoked nothing, creates
    /// that created nothing: a sign the benchmark measures the wrong thing.
    misses: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 ns to 60 s with 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("the bounds are valid"),
            errors: BTreeMap::new(),
            misses: 0,
        }
    }

    fn merge(&mut self, other: Self) {
        self.latency_ns
            .add(other.latency_ns)
            .expect("histograms share their bounds");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.misses += other.misses;
    }

    fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_ns.saturating_record(nanos.max(1));
    }

    fn error(&mut self, status: &tonic::Status) {
        self.error_named(format!("{:?}", status.code()).to_lowercase());
    }

    fn error_named(&mut self, name: String) {
        *self.errors.entry(name).or_default() += 1;
    }
}

/// One call's outcome: whether it did what the profile expects.
enum Outcome {
    Hit,
    Miss,
}

async fn call(
    client: &mut SessionStoreClient<Channel>,
    profile: Profile,
    keys: &Keys,
    rng: &mut Rng,
    task: u32,
    seq: &mut u64,
    families: &mut [Family],
) -> Result<Outcome, tonic::Status> {
    let profile = match profile {
        Profile::Mixed => match rng.below(100) {
            0..95 => Profile::GetHint,
            95..99 => Profile::Create,
            _ => Profile::Revoke,
        },
        other => other,
    };
    let hit = |yes: bool| if yes { Outcome::Hit } else { Outcome::Miss };
    match profile {
        Profile::GetHint | Profile::GetNohint => {
            let session = rng.below(keys.keyspace);
            let user_id = if profile == Profile::GetHint {
                keys.owner(session)
            } else {
                String::new()
            };
            let response = client
                .get_session(GetSessionRequest {
                    token_id: keys.token(session),
                    user_id,
                })
                .await?;
            Ok(hit(response.into_inner().session.is_some()))
        }
        Profile::Create => {
            *seq += 1;
            let response = client
                .create_session(CreateSessionRequest {
                    user_id: keys.user(rng.below(keys.users)),
                    token_id: format!("bench-{}-c{task}-{seq}", keys.run),
                    metadata: metadata(),
                    ttl: None,
                    max_lifetime: None,
                })
                .await?;
            Ok(hit(response.into_inner().created))
        }
        Profile::Revoke => {
            let session = rng.below(keys.keyspace);
            let response = client
                .revoke_session(RevokeSessionRequest {
                    token_id: keys.token(session),
                    user_id: keys.owner(session),
                })
                .await?;
            // Picked at random, a session may have been revoked already: the
            // call costs the same, so it is counted as a miss, not an error.
            Ok(hit(response.into_inner().revoked))
        }
        Profile::Rotate => {
            if families.is_empty() {
                return Err(tonic::Status::failed_precondition(
                    "this task owns no family (--keyspace below --concurrency)",
                ));
            }
            *seq += 1;
            // The task's families in turn: each waits as long as possible
            // between two rotations, none is ever rotated by two tasks.
            let family = &mut families[usize::try_from(*seq).unwrap_or(0) % families.len()];
            let response = client
                .rotate_session(RotateSessionRequest {
                    user_id: family.user.clone(),
                    family_id: family.id.clone(),
                    token_id: family.token.clone(),
                    new_token_id: format!("bench-{}-r{task}-{seq}", keys.run),
                    ttl: None,
                    metadata: metadata(),
                })
                .await?
                .into_inner();
            if let Some(session) = response.session {
                family.token = session.token_id;
            }
            Ok(hit(response.outcome == RotateOutcome::Rotated as i32))
        }
        Profile::Login
        | Profile::LoginAccount
        | Profile::LoginDevice
        | Profile::LoginDeviceUntrusted => {
            let host = rng.below(keys.keyspace);
            let (account, device_token) = match profile {
                Profile::LoginAccount => (keys.account(rng.below(keys.users)), String::new()),
                Profile::LoginDeviceUntrusted => {
                    (keys.account(rng.below(keys.users)), "0".repeat(64))
                }
                Profile::LoginDevice => {
                    let len = u32::try_from(keys.devices.len()).unwrap_or(u32::MAX);
                    let index = usize::try_from(rng.below(len.max(1))).unwrap_or(0);
                    keys.devices.get(index).cloned().unwrap_or_default()
                }
                _ => (String::new(), String::new()),
            };
            let response = client
                .record_login_attempt(RecordLoginAttemptRequest {
                    ip: format!(
                        "10.{}.{}.{}",
                        host >> 16 & 0xff,
                        host >> 8 & 0xff,
                        host & 0xff
                    ),
                    account,
                    device_token,
                })
                .await?
                .into_inner();
            let trusted_as_expected = response.device_trusted == (profile == Profile::LoginDevice);
            Ok(hit(response.allowed && trusted_as_expected))
        }
        Profile::Mixed => unreachable!("mixed picks one of the others above"),
        Profile::CachedGet | Profile::Visibility | Profile::RevokeFanout => {
            unreachable!("run() measures these itself")
        }
    }
}

/// Runs one closed-loop task until `stop`, recording the calls that both
/// start and finish inside the measured window.
async fn worker(
    mut client: SessionStoreClient<Channel>,
    profile: Profile,
    keys: Keys,
    task: u32,
    (measure_from, measure_until): (Instant, Instant),
    stop: Arc<AtomicBool>,
    mut families: Vec<Family>,
) -> (Tally, Vec<Family>) {
    let mut tally = Tally::new();
    let mut rng = Rng::new(u64::from(task) + 1);
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let outcome = call(
            &mut client,
            profile,
            &keys,
            &mut rng,
            task,
            &mut seq,
            &mut families,
        )
        .await;
        let end = Instant::now();
        if start < measure_from || end > measure_until {
            continue;
        }
        tally.record(end - start);
        match outcome {
            Ok(Outcome::Hit) => {}
            Ok(Outcome::Miss) => tally.misses += 1,
            Err(status) => tally.error(&status),
        }
    }
    (tally, families)
}

/// Creates the sessions the profile reads or revokes, `concurrency` at a
/// time, and answers their family ids, in session order.
async fn populate(
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
    concurrency: u32,
) -> Result<Vec<String>, String> {
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let mut client = clients[task as usize % clients.len()].clone();
        let keys = keys.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut families = Vec::new();
            loop {
                let session = next.fetch_add(1, Ordering::Relaxed);
                if session >= keys.keyspace {
                    return Ok(families);
                }
                let response = client
                    .create_session(CreateSessionRequest {
                        user_id: keys.owner(session),
                        token_id: keys.token(session),
                        metadata: metadata(),
                        ttl: Some(prost_types::Duration {
                            seconds: 3600,
                            nanos: 0,
                        }),
                        max_lifetime: None,
                    })
                    .await
                    .map_err(|s| format!("populating session {session}: {s}"))?
                    .into_inner();
                match response.session {
                    Some(stored) if response.created => families.push((session, stored.family_id)),
                    _ => {
                        return Err(format!(
                            "populating session {session}: not created (is keyspace / users above MAX_SESSIONS_PER_USER?)"
                        ));
                    }
                }
            }
        });
    }
    let mut families = Vec::new();
    while let Some(result) = tasks.join_next().await {
        families.extend(result.map_err(|e| e.to_string())??);
    }
    families.sort_unstable_by_key(|&(session, _)| session);
    Ok(families.into_iter().map(|(_, family)| family).collect())
}

/// CPU time (user + system) and resident memory of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let cpu_ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_ticks,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Clock ticks per second of `/proc/*/stat` times: 100 on every Linux
/// configuration in use (USER_HZ), which `getconf CLK_TCK` confirms.
const TICKS_PER_SECOND: f64 = 100.0;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads as usize)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<String, String> {
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        // One Channel is one HTTP/2 connection; tasks share them like the
        // callers of a real service share theirs.
        clients.push(SessionStoreClient::new(connect(&args.url).await?));
    }

    let run_id = args.run_id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() % 1_000_000_000)
                .unwrap_or(0)
        )
    });
    let mut keys = Keys {
        run: run_id,
        users: args.users,
        keyspace: args.keyspace,
        devices: Arc::default(),
    };
    if args.profile == Profile::LoginDevice {
        keys.devices = Arc::new(if args.no_populate {
            let path = args
                .devices
                .as_deref()
                .ok_or("--profile login-device with --no-populate needs --devices FILE")?;
            read_devices(path)?
        } else {
            let started = Instant::now();
            let devices = issue_devices(&clients, &keys).await?;
            eprintln!(
                "issued {} device tokens in {:.1} s",
                devices.len(),
                started.elapsed().as_secs_f64()
            );
            if let Some(path) = &args.devices {
                write_devices(path, &devices)?;
            }
            devices
        });
    }
    let needs_sessions = !args.no_populate
        && matches!(
            args.profile,
            Profile::GetHint
                | Profile::GetNohint
                | Profile::Revoke
                | Profile::Rotate
                | Profile::Mixed
                | Profile::CachedGet
                | Profile::Visibility
                | Profile::RevokeFanout
        );
    let mut families = Vec::new();
    if needs_sessions {
        let started = Instant::now();
        let ids = populate(&clients, &keys, args.concurrency.clamp(16, 64)).await?;
        eprintln!(
            "populated {} sessions of {} users in {:.1} s",
            keys.keyspace,
            keys.users,
            started.elapsed().as_secs_f64()
        );
        if args.profile == Profile::Rotate {
            families = (0..keys.keyspace)
                .zip(ids)
                .map(|(session, id)| Family {
                    user: keys.owner(session),
                    id,
                    token: keys.token(session),
                })
                .collect();
        }
    } else if args.profile == Profile::Rotate {
        let path = args
            .families
            .as_deref()
            .ok_or("--profile rotate with --no-populate needs --families FILE")?;
        families = read_families(path)?;
    }

    let watched = Watched::new(&args);
    let measured = match args.profile {
        Profile::CachedGet => cached_get(&args, &keys, &watched).await?,
        Profile::Visibility => visibility(&args, &clients, &keys, &watched).await?,
        Profile::RevokeFanout => revoke_fanout(&args, &clients, &keys, &watched).await?,
        _ => {
            let (measured, families) =
                closed_loop(&args, &clients, &keys, &watched, families).await?;
            if let (Some(path), Profile::Rotate) = (&args.families, args.profile) {
                write_families(path, &families)?;
            }
            measured
        }
    };
    Ok(report(&args, &watched, &measured))
}

/// One HTTP/2 connection to the server.
async fn connect(url: &str) -> Result<Channel, String> {
    Channel::from_shared(url.to_string())
        .map_err(|e| format!("--url: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))
}

/// The processes whose CPU time and memory a run reports: this one, and the
/// ones named with `--watch`.
#[derive(Debug)]
struct Watched(Vec<(String, String)>);

impl Watched {
    fn new(args: &Args) -> Self {
        let self_pid = std::process::id().to_string();
        Self(
            std::iter::once(("loadgen".to_string(), self_pid))
                .chain(
                    args.watch
                        .iter()
                        .map(|(name, pid)| (name.clone(), pid.to_string())),
                )
                .collect(),
        )
    }

    fn sample(&self) -> Vec<Option<ProcSample>> {
        self.0.iter().map(|(_, pid)| sample(pid)).collect()
    }
}

/// What a profile measured: every call's latency and outcome, over how long,
/// the `/proc` samples framing the measurement, and `key=value` fields only
/// this profile reports (each with a leading space).
#[derive(Debug)]
struct Measured {
    tally: Tally,
    duration: Duration,
    before: Vec<Option<ProcSample>>,
    after: Vec<Option<ProcSample>>,
    extra: String,
}

/// The result line.
fn report(args: &Args, watched: &Watched, measured: &Measured) -> String {
    let h = &measured.tally.latency_ns;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let errors: u64 = measured.tally.errors.values().sum();
    let seconds = measured.duration.as_secs_f64();
    let mut line = format!(
        "label={} profile={} connections={} concurrency={} requests={} duration_s={:.3} rps={:.0} \
         p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} mean_ms={:.3} \
         p50_us={:.3} p99_us={:.3} p999_us={:.3} max_us={:.3} errors={} misses={}",
        if args.label.is_empty() {
            "-"
        } else {
            &args.label
        },
        args.profile
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        args.connections,
        args.concurrency,
        h.len(),
        seconds,
        h.len() as f64 / seconds,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1e6,
        h.mean() / 1e6,
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1e3,
        errors,
        measured.tally.misses,
    );
    line.push_str(&measured.extra);
    for (code, n) in &measured.tally.errors {
        line.push_str(&format!(" error_{code}={n}"));
    }
    for ((name, _), (before, after)) in watched
        .0
        .iter()
        .zip(measured.before.iter().zip(&measured.after))
    {
        if let (Some(before), Some(after)) = (before, after) {
            let cpu = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SECOND;
            line.push_str(&format!(
                " cpu_{name}_s={cpu:.2} rss_{name}_start_kib={} rss_{name}_end_kib={} hwm_{name}_kib={}",
                before.rss_kib, after.rss_kib, after.hwm_kib
            ));
        }
    }
    line
}

/// The RPC profiles: `concurrency` closed-loop tasks for `warmup`, then
/// `duration` measured. `families` (of `rotate`) are dealt out to the tasks,
/// family `i` to task `i % concurrency`, and answered back with their
/// current tokens.
async fn closed_loop(
    args: &Args,
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
    watched: &Watched,
    families: Vec<Family>,
) -> Result<(Measured, Vec<Family>), String> {
    let mut owned: Vec<Vec<Family>> = vec![Vec::new(); args.concurrency as usize];
    for (i, family) in families.into_iter().enumerate() {
        owned[i % args.concurrency as usize].push(family);
    }
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let now = Instant::now();
    let measure_from = now + warmup;
    let measure_until = measure_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (task, families) in (0..args.concurrency).zip(owned) {
        tasks.spawn(worker(
            clients[task as usize % clients.len()].clone(),
            args.profile,
            keys.clone(),
            task,
            (measure_from, measure_until),
            stop.clone(),
            families,
        ));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let before = watched.sample();
    tokio::time::sleep_until(measure_until.into()).await;
    let after = watched.sample();
    stop.store(true, Ordering::Relaxed);

    let mut tally = Tally::new();
    let mut families = Vec::new();
    while let Some(task) = tasks.join_next().await {
        let (task_tally, task_families) = task.map_err(|e| e.to_string())?;
        tally.merge(task_tally);
        families.extend(task_families);
    }
    Ok((
        Measured {
            tally,
            duration,
            before,
            after,
            extra: String::new(),
        },
        families,
    ))
}

/// A session-client with its near-cache on, as an application would build it.
async fn near_cache_client(url: &str, max_entries: usize) -> Result<SessionClient, String> {
    SessionClient::builder(url)
        .near_cache(max_entries)
        .connect()
        .await
        .map_err(|e| format!("near-cache client of {url}: {e}"))
}

/// Waits until the client's revocation stream delivered its reset: before
/// that, nothing is answered from memory or cached.
async fn wait_healthy(client: &SessionClient) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.near_cache_stats().is_some_and(|s| s.healthy) {
        if Instant::now() > deadline {
            return Err("the near-cache's stream is not healthy after 10 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn client_error(err: &session_client::Error) -> String {
    match err.code() {
        Some(code) => format!("{code:?}").to_lowercase(),
        None => "client".to_string(),
    }
}

/// `cached-get`: caches every session through one near-cache client (its
/// clones share the cache, as an application's tasks would), then checks
/// sessions picked at random, closed loop.
async fn cached_get(args: &Args, keys: &Keys, watched: &Watched) -> Result<Measured, String> {
    let client = near_cache_client(&args.url, keys.keyspace as usize).await?;
    wait_healthy(&client).await?;
    let pairs: Arc<Vec<(String, String)>> = Arc::new(
        (0..keys.keyspace)
            .map(|session| (keys.owner(session), keys.token(session)))
            .collect(),
    );

    // Every session once through the client: a miss, which caches it.
    let next = Arc::new(AtomicU32::new(0));
    let mut fills = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, pairs, next) = (client.clone(), pairs.clone(), next.clone());
        fills.spawn(async move {
            loop {
                let Some((user, token)) = pairs.get(next.fetch_add(1, Ordering::Relaxed) as usize)
                else {
                    return Ok(());
                };
                match client.get_user_session(user.as_str(), token.as_str()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(format!("filling the near-cache: {token} not found")),
                    Err(err) => return Err(format!("filling the near-cache: {err}")),
                }
            }
        });
    }
    while let Some(fill) = fills.join_next().await {
        fill.map_err(|e| e.to_string())??;
    }
    let cached = client.near_cache_stats().map_or(0, |s| s.entries);
    if cached != u64::from(keys.keyspace) {
        return Err(format!(
            "{cached} of {} sessions cached after filling",
            keys.keyspace
        ));
    }

    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let measure_from = Instant::now() + warmup;
    let measure_until = measure_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for task in 0..args.concurrency {
        let (client, pairs, stop) = (client.clone(), pairs.clone(), stop.clone());
        // A thread and a runtime of its own per task: tasks that never wait
        // stay on the worker that runs them, and on one multi-thread runtime
        // two of them were seen sharing one worker (one core's CPU time).
        threads.push(std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| {
                    runtime.block_on(cached_worker(
                        client,
                        pairs,
                        task,
                        measure_from,
                        measure_until,
                        stop,
                    ))
                })
                .map_err(|e| format!("a checking thread's runtime: {e}"))
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let stats_before = client.near_cache_stats().unwrap_or_default();
    let before = watched.sample();
    tokio::time::sleep_until(measure_until.into()).await;
    let after = watched.sample();
    let stats_after = client.near_cache_stats().unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::new();
    for thread in threads {
        tally.merge(
            thread
                .join()
                .map_err(|_| "a checking thread panicked".to_string())??,
        );
    }
    Ok(Measured {
        tally,
        duration,
        before,
        after,
        // From the cache's own counters over the window: misses went to the
        // server, resets flushed the cache.
        extra: format!(
            " cache_hits={} cache_misses={} cache_resets={} cache_entries={}",
            stats_after.hits - stats_before.hits,
            stats_after.misses - stats_before.misses,
            stats_after.resets - stats_before.resets,
            stats_after.entries,
        ),
    })
}

/// One closed-loop task of `cached-get`.
async fn cached_worker(
    client: SessionClient,
    pairs: Arc<Vec<(String, String)>>,
    task: u32,
    measure_from: Instant,
    measure_until: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::new();
    let mut rng = Rng::new(u64::from(task) + 1);
    let count = u32::try_from(pairs.len()).unwrap_or(u32::MAX);
    let mut calls = 0_u32;
    while !stop.load(Ordering::Relaxed) {
        let (user, token) = &pairs[rng.below(count) as usize];
        let start = Instant::now();
        let outcome = client.get_user_session(user.as_str(), token.as_str()).await;
        let end = Instant::now();
        calls = calls.wrapping_add(1);
        if calls.is_multiple_of(64) {
            // A hit never waits: on a runtime shared with other tasks (the
            // stream's, the timers) this loop would keep its worker for good.
            // Each runs on a runtime of its own now; the yield costs little.
            tokio::task::yield_now().await;
        }
        if start < measure_from || end > measure_until {
            continue;
        }
        tally.record(end - start);
        match outcome {
            Ok(Some(_)) => {}
            Ok(None) => tally.misses += 1,
            Err(err) => tally.error_named(client_error(&err)),
        }
    }
    tally
}

/// What the subscriber streams of `visibility` and `revoke-fanout` received,
/// summed over the streams.
#[derive(Debug, Default)]
struct Subscribers {
    /// Streams that delivered their first message (a reset).
    started: AtomicU32,
    /// Streams that ended (an error status or end of stream).
    ended: AtomicU32,
    messages: AtomicU64,
    revocations: AtomicU64,
    resets: AtomicU64,
}

/// Opens `count` WatchRevocations streams, each on its own connection, reads
/// them until the returned tasks are dropped, and waits for every first
/// message.
async fn subscribe(
    url: &str,
    count: u32,
) -> Result<(Arc<Subscribers>, tokio::task::JoinSet<()>), String> {
    let subscribers = Arc::new(Subscribers::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let mut stub = SessionStoreClient::new(connect(url).await?);
        let mut stream = stub
            .watch_revocations(WatchRevocationsRequest {})
            .await
            .map_err(|s| format!("WatchRevocations: {s}"))?
            .into_inner();
        let subscribers = subscribers.clone();
        tasks.spawn(async move {
            let mut started = false;
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        if !started {
                            started = true;
                            subscribers.started.fetch_add(1, Ordering::Relaxed);
                        }
                        subscribers.messages.fetch_add(1, Ordering::Relaxed);
                        subscribers
                            .revocations
                            .fetch_add(message.revocations.len() as u64, Ordering::Relaxed);
                        if message.reset {
                            subscribers.resets.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => {
                        eprintln!("subscriber: the stream ended");
                        break;
                    }
                    Err(status) => {
                        eprintln!("subscriber: {status}");
                        break;
                    }
                }
            }
            subscribers.ended.fetch_add(1, Ordering::Relaxed);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers.started.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline || subscribers.ended.load(Ordering::Relaxed) > 0 {
            return Err(format!(
                "{} of {count} subscriber streams started",
                subscribers.started.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((subscribers, tasks))
}

/// A signed difference in nanoseconds: `a - b`.
fn signed_nanos(a: Instant, b: Instant) -> i64 {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if a >= b { nanos(a - b) } else { -nanos(b - a) }
}

/// `p50 p99 max min` of signed nanoseconds, as `{name}_p50_ms=...` fields.
fn quantile_fields(name: &str, values: &mut [i64]) -> String {
    if values.is_empty() {
        return String::new();
    }
    values.sort_unstable();
    let at = |q: f64| {
        let rank = (q * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1] as f64 / 1e6
    };
    format!(
        " {name}_p50_ms={:.3} {name}_p99_ms={:.3} {name}_max_ms={:.3} {name}_min_ms={:.3}",
        at(0.5),
        at(0.99),
        at(1.0),
        values[0] as f64 / 1e6
    )
}

/// A session the polling thread watches in the near-cache.
#[derive(Debug)]
struct Probe {
    user: String,
    token: String,
    /// Sent once the session is seen answered from memory; dropped when it
    /// is not (the measurement of this session is void).
    armed: tokio::sync::oneshot::Sender<()>,
    done: tokio::sync::oneshot::Sender<Seen>,
}

/// How a probe ended.
#[derive(Debug)]
enum Seen {
    /// The cache stopped answering the session: `gone_at` is the start of
    /// the first lookup it did not answer (the call then asked the server,
    /// which did not find it); `applied_at` the first look at the cache's
    /// counters that showed a revocation applied.
    Gone {
        gone_at: Instant,
        applied_at: Instant,
    },
    /// The cache was flushed or unhealthy meanwhile: not a measurement.
    Flushed,
    /// Still answered after 5 s, or a lookup failed.
    Failed,
}

/// The polling thread of `visibility`: for each probe, looks the session up
/// through the near-cache client as fast as it can (spinning, or sleeping
/// `interval` between looks) until the cache stops answering it. A thread of
/// its own, so that polling never waits for, nor holds up, the runtime's
/// workers that carry the revocation stream.
fn poll_cache(
    client: &SessionClient,
    runtime: &tokio::runtime::Handle,
    interval: Duration,
    probes: &std::sync::mpsc::Receiver<Probe>,
) {
    let stats = || client.near_cache_stats().unwrap_or_default();
    while let Ok(probe) = probes.recv() {
        let lookup = || {
            let start = Instant::now();
            let found = runtime
                .block_on(client.get_user_session(probe.user.as_str(), probe.token.as_str()));
            (start, found)
        };
        // Armed only when the session is answered from memory right now.
        let base = stats();
        let (_, found) = lookup();
        if !matches!(found, Ok(Some(_))) || stats().hits != base.hits + 1 {
            continue;
        }
        let base = stats();
        if probe.armed.send(()).is_err() {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut applied_at = None;
        let seen = loop {
            let look = Instant::now();
            let now = stats();
            if now.resets != base.resets || !now.healthy {
                break Seen::Flushed;
            }
            if applied_at.is_none() && now.revocations_applied > base.revocations_applied {
                applied_at = Some(look);
            }
            match lookup() {
                (_, Ok(Some(_))) if look < deadline => {}
                (start, Ok(None)) => {
                    let now = stats();
                    break if now.resets != base.resets || !now.healthy {
                        Seen::Flushed
                    } else {
                        Seen::Gone {
                            gone_at: start,
                            applied_at: applied_at.unwrap_or(start),
                        }
                    };
                }
                _ => break Seen::Failed,
            }
            if interval.is_zero() {
                std::thread::yield_now();
            } else {
                std::thread::sleep(interval);
            }
        };
        let _ = probe.done.send(seen);
    }
}

/// `visibility`: for each session in turn, caches it in a near-cache
/// client, arms the polling thread, revokes the session over another
/// connection, and records when the cache stopped answering it, relative to
/// RevokeSession returning. The revokes are the calls of the result line.
async fn visibility(
    args: &Args,
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
    watched: &Watched,
) -> Result<Measured, String> {
    let (subscribers, _streams) = subscribe(&args.url, args.subscribers).await?;
    let cache = near_cache_client(&args.url, 1024).await?;
    wait_healthy(&cache).await?;
    let (probes, receiver) = std::sync::mpsc::channel::<Probe>();
    let poller = {
        let (client, runtime) = (cache.clone(), tokio::runtime::Handle::current());
        let interval = Duration::from_micros(args.poll_interval_us);
        std::thread::spawn(move || poll_cache(&client, &runtime, interval, &receiver))
    };
    let mut revoker = clients[0].clone();
    let mut tally = Tally::new();
    let (mut visible, mut applied, mut from_call) = (Vec::new(), Vec::new(), Vec::new());
    let (mut not_cached, mut flushed, mut failed) = (0_u32, 0_u32, 0_u32);
    let base = subscribers.revocations.load(Ordering::Relaxed);
    let before = watched.sample();
    let started = Instant::now();
    for session in 0..keys.keyspace {
        let (user, token) = (keys.owner(session), keys.token(session));
        // A miss, which caches it.
        match cache.get_user_session(user.as_str(), token.as_str()).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                not_cached += 1;
                continue;
            }
            Err(err) => {
                tally.error_named(client_error(&err));
                continue;
            }
        }
        let (armed, armed_rx) = tokio::sync::oneshot::channel();
        let (done, done_rx) = tokio::sync::oneshot::channel();
        probes
            .send(Probe {
                user: user.clone(),
                token: token.clone(),
                armed,
                done,
            })
            .map_err(|_| "the polling thread ended".to_string())?;
        if armed_rx.await.is_err() {
            not_cached += 1;
            continue;
        }
        let sent = Instant::now();
        let response = revoker
            .revoke_session(RevokeSessionRequest {
                token_id: token,
                user_id: user,
            })
            .await;
        let returned = Instant::now();
        tally.record(returned - sent);
        match response {
            Ok(response) if response.get_ref().revoked => {}
            Ok(_) => tally.misses += 1,
            Err(status) => tally.error(&status),
        }
        match done_rx.await {
            Ok(Seen::Gone {
                gone_at,
                applied_at,
            }) => {
                visible.push(signed_nanos(gone_at, returned));
                applied.push(signed_nanos(applied_at, returned));
                from_call.push(signed_nanos(gone_at, sent));
            }
            Ok(Seen::Flushed) => flushed += 1,
            Ok(Seen::Failed) | Err(_) => failed += 1,
        }
    }
    let duration = started.elapsed();
    let after = watched.sample();
    drop(probes);
    poller
        .join()
        .map_err(|_| "the polling thread panicked".to_string())?;
    let before_return = visible.iter().filter(|&&v| v <= 0).count();
    let mut extra = format!(
        " revocations={} subscribers={} visible_before_return={before_return} not_cached={not_cached} \
         flushed={flushed} unseen={failed} subscriber_revocations={} subscribers_ended={}",
        visible.len(),
        args.subscribers,
        subscribers.revocations.load(Ordering::Relaxed) - base,
        subscribers.ended.load(Ordering::Relaxed),
    );
    extra.push_str(&quantile_fields("visible", &mut visible));
    extra.push_str(&quantile_fields("applied", &mut applied));
    extra.push_str(&quantile_fields("from_call", &mut from_call));
    Ok(Measured {
        tally,
        duration,
        before,
        after,
        extra,
    })
}

/// `revoke-fanout`: revokes every session once, `concurrency` at a time,
/// with `subscribers` streams open, and measures until every stream has
/// received every revocation (or one ended, or 60 s passed).
async fn revoke_fanout(
    args: &Args,
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
    watched: &Watched,
) -> Result<Measured, String> {
    let (subscribers, _streams) = subscribe(&args.url, args.subscribers).await?;
    let base_messages = subscribers.messages.load(Ordering::Relaxed);
    let base_revocations = subscribers.revocations.load(Ordering::Relaxed);
    let base_resets = subscribers.resets.load(Ordering::Relaxed);
    let next = Arc::new(AtomicU32::new(0));
    let pause = Duration::from_micros(args.pause_us);
    let before = watched.sample();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.concurrency {
        let mut client = clients[task as usize % clients.len()].clone();
        let (keys, next) = (keys.clone(), next.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            loop {
                let session = next.fetch_add(1, Ordering::Relaxed);
                if session >= keys.keyspace {
                    return tally;
                }
                let sent = Instant::now();
                let response = client
                    .revoke_session(RevokeSessionRequest {
                        token_id: keys.token(session),
                        user_id: keys.owner(session),
                    })
                    .await;
                tally.record(sent.elapsed());
                match response {
                    Ok(response) if response.get_ref().revoked => {}
                    Ok(_) => tally.misses += 1,
                    Err(status) => tally.error(&status),
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        });
    }
    let mut tally = Tally::new();
    while let Some(task) = tasks.join_next().await {
        tally.merge(task.map_err(|e| e.to_string())?);
    }
    let revoked_in = started.elapsed();
    let errors: u64 = tally.errors.values().sum();
    let revoked = tally.latency_ns.len() - tally.misses - errors;
    let expected = base_revocations + revoked * u64::from(args.subscribers);
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscribers.revocations.load(Ordering::Relaxed) < expected
        && subscribers.ended.load(Ordering::Relaxed) == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let delivered_in = started.elapsed();
    let after = watched.sample();
    let extra = format!(
        " revoked={revoked} subscribers={} pause_us={} revoke_s={:.3} delivered_s={:.3} subscriber_messages={} \
         subscriber_revocations={} subscriber_resets={} subscribers_ended={}",
        args.subscribers,
        args.pause_us,
        revoked_in.as_secs_f64(),
        delivered_in.as_secs_f64(),
        subscribers.messages.load(Ordering::Relaxed) - base_messages,
        subscribers.revocations.load(Ordering::Relaxed) - base_revocations,
        subscribers.resets.load(Ordering::Relaxed) - base_resets,
        subscribers.ended.load(Ordering::Relaxed),
    );
    Ok(Measured {
        tally,
        duration: revoked_in,
        before,
        after,
        extra,
    })
}
