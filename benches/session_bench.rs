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
//! the latency at a fixed arrival rate. Sessions the profile reads or revokes
//! are created before the warm-up, under user ids unique to the run, so runs
//! against one Redis never see each other's data.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, RecordLoginAttemptRequest, RevokeSessionRequest,
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
    /// Sessions pre-populated for the get, revoke and mixed profiles (keep
    /// keyspace / users at or below the server's MAX_SESSIONS_PER_USER, or
    /// pre-population evicts what it just made).
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
    latency_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// Gets that found no session, revokes that revoked nothing, creates
    /// that created nothing: a sign the benchmark measures the wrong thing.
    misses: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs to 60 s with 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("the bounds are valid"),
            errors: BTreeMap::new(),
            misses: 0,
        }
    }

    fn merge(&mut self, other: Self) {
        self.latency_us
            .add(other.latency_us)
            .expect("histograms share their bounds");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.misses += other.misses;
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
        Profile::Login | Profile::LoginAccount => {
            let host = rng.below(keys.keyspace);
            let account = if profile == Profile::LoginAccount {
                format!("bench-{}-{}@example.com", keys.run, rng.below(keys.users))
            } else {
                String::new()
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
                })
                .await?;
            Ok(hit(response.into_inner().allowed))
        }
        Profile::Mixed => unreachable!("mixed picks one of the others above"),
    }
}

/// Runs one closed-loop task until `stop`, recording the calls that both
/// start and finish inside the measured window.
async fn worker(
    mut client: SessionStoreClient<Channel>,
    profile: Profile,
    keys: Keys,
    task: u32,
    measure_from: Instant,
    measure_until: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::new();
    let mut rng = Rng::new(u64::from(task) + 1);
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let outcome = call(&mut client, profile, &keys, &mut rng, task, &mut seq).await;
        let end = Instant::now();
        if start < measure_from || end > measure_until {
            continue;
        }
        let micros = u64::try_from((end - start).as_micros()).unwrap_or(u64::MAX);
        tally.latency_us.saturating_record(micros.max(1));
        match outcome {
            Ok(Outcome::Hit) => {}
            Ok(Outcome::Miss) => tally.misses += 1,
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()).to_lowercase())
                    .or_default() += 1;
            }
        }
    }
    tally
}

/// Creates the sessions the profile reads or revokes, `concurrency` at a time.
async fn populate(
    clients: &[SessionStoreClient<Channel>],
    keys: &Keys,
    concurrency: u32,
) -> Result<(), String> {
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let mut client = clients[task as usize % clients.len()].clone();
        let keys = keys.clone();
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let session = next.fetch_add(1, Ordering::Relaxed);
                if session >= keys.keyspace {
                    return Ok(());
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
                    })
                    .await
                    .map_err(|s| format!("populating session {session}: {s}"))?;
                if !response.into_inner().created {
                    return Err(format!(
                        "populating session {session}: not created (is keyspace / users above MAX_SESSIONS_PER_USER?)"
                    ));
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| e.to_string())??;
    }
    Ok(())
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
        let channel = Channel::from_shared(args.url.clone())
            .map_err(|e| format!("--url: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connecting to {}: {e}", args.url))?;
        clients.push(SessionStoreClient::new(channel));
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
    let keys = Keys {
        run: run_id,
        users: args.users,
        keyspace: args.keyspace,
    };
    let needs_sessions = !args.no_populate
        && matches!(
            args.profile,
            Profile::GetHint | Profile::GetNohint | Profile::Revoke | Profile::Mixed
        );
    if needs_sessions {
        let started = Instant::now();
        populate(&clients, &keys, args.concurrency.clamp(16, 64)).await?;
        eprintln!(
            "populated {} sessions of {} users in {:.1} s",
            keys.keyspace,
            keys.users,
            started.elapsed().as_secs_f64()
        );
    }

    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let now = Instant::now();
    let measure_from = now + warmup;
    let measure_until = measure_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.concurrency {
        tasks.spawn(worker(
            clients[task as usize % clients.len()].clone(),
            args.profile,
            keys.clone(),
            task,
            measure_from,
            measure_until,
            stop.clone(),
        ));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let self_pid = std::process::id().to_string();
    let watched: Vec<(String, String)> = std::iter::once(("loadgen".to_string(), self_pid))
        .chain(
            args.watch
                .iter()
                .map(|(name, pid)| (name.clone(), pid.to_string())),
        )
        .collect();
    let before: Vec<Option<ProcSample>> = watched.iter().map(|(_, pid)| sample(pid)).collect();
    tokio::time::sleep_until(measure_until.into()).await;
    let after: Vec<Option<ProcSample>> = watched.iter().map(|(_, pid)| sample(pid)).collect();
    stop.store(true, Ordering::Relaxed);

    let mut total = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally.map_err(|e| e.to_string())?);
    }

    let h = &total.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let errors: u64 = total.errors.values().sum();
    let mut line = format!(
        "label={} profile={} connections={} concurrency={} requests={} duration_s={:.3} rps={:.0} \
         p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} mean_ms={:.3} errors={} misses={}",
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
        duration.as_secs_f64(),
        h.len() as f64 / duration.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1e3,
        h.mean() / 1e3,
        errors,
        total.misses,
    );
    for (code, n) in &total.errors {
        line.push_str(&format!(" error_{code}={n}"));
    }
    for ((name, _), (before, after)) in watched.iter().zip(before.iter().zip(&after)) {
        if let (Some(before), Some(after)) = (before, after) {
            let cpu = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SECOND;
            line.push_str(&format!(
                " cpu_{name}_s={cpu:.2} rss_{name}_start_kib={} rss_{name}_end_kib={} hwm_{name}_kib={}",
                before.rss_kib, after.rss_kib, after.hwm_kib
            ));
        }
    }
    Ok(line)
}
