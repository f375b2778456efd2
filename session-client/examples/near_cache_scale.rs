//! The near-cache at scale (#28; BENCHMARKS.md "Near-cache at a million
//! sessions"): memory per cached session, lookups per second on one and two
//! threads, lookup latency, how long revocations take to apply (alone, and
//! while two threads look up), and the longest lookup while a full cache
//! is flushed. The cache is driven
//! directly (feature `bench-internals`), without a server: a stream synced
//! once, a heartbeat every second, fills as lookups' answers.
//!
//! ```text
//! CARGO_PROFILE_RELEASE_LTO=thin cargo run --release -p session-client \
//!     --features bench-internals --example near_cache_scale -- ENTRIES METADATA SECONDS AGENTS
//! ```
//!
//! Lookup rates are measured twice: with the keys at hand (made before the
//! window, read in order: lines without a prefix) and with each key
//! formatted inside the window (lines with `keys_formatted`, as the first
//! five passes measured them). Lookups are measured on the cache's `Session` answer
//! (`get_user_session`'s from memory), then on its `CompactSession` one
//! (`check_user_session`'s; lines prefixed `compact`), then on a
//! `SessionView` read in place (`with_cached_session`'s, the closure reading
//! the expiry; lines prefixed `view`), then through the
//! client's public methods on a current-thread Tokio runtime (lines
//! prefixed `client`: a client whose near-cache is this one, every lookup
//! a hit).
//!
//! `ENTRIES` (default 1000000) sessions are cached: the first 10 000 belong
//! to users with 10 sessions each, the others to users with 5. `METADATA`
//! is `full` (the default: an ip, a 110-byte user agent and a device, as
//! sessions carry them) or `none` (sessions without metadata). Each rate is
//! measured for `SECONDS` (default 3). `AGENTS` is how many distinct user
//! agents the sessions have (default 1, the issue's yardstick; session `i`
//! has agent `i % AGENTS`), or `all` for every session its own. Run one process per configuration:
//! memory is read from `/proc/self/statm` (resident pages), before and
//! after the fill.

use std::{
    collections::HashMap,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use hdrhistogram::Histogram;
use session_client::__near_cache_bench::BenchCache;

const USER_AGENT: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
                          (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.3";

/// Sessions of the users with 10 each (the user-wide revocations' targets).
const TEN_SESSION_SESSIONS: usize = 10_000;

fn main() {
    assert_eq!(USER_AGENT.len(), 110);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let entries: usize = args
        .first()
        .map_or(1_000_000, |a| a.parse().expect("ENTRIES"));
    let metadata = args.get(1).map_or("full", String::as_str) == "full";
    let seconds: u64 = args.get(2).map_or(3, |a| a.parse().expect("SECONDS"));
    let window = Duration::from_secs(seconds);
    let agents: usize = match args.get(3).map(String::as_str) {
        None => 1,
        Some("all") => entries,
        Some(n) => n.parse().expect("AGENTS"),
    };
    assert!(agents > 0, "AGENTS: at least 1");

    let keys = Arc::new(Keys(entries));

    let cache = BenchCache::new(entries, Duration::from_secs(3), metadata);
    cache.sync(SystemTime::now());
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeats = {
        let (cache, stop) = (cache.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1000));
                cache.heartbeat(SystemTime::now());
            }
        })
    };

    let rss_before = rss();
    let started = Instant::now();
    let created = SystemTime::now();
    let expires = created + Duration::from_secs(3600);
    for i in 0..entries {
        let meta = if metadata {
            HashMap::from([
                ("ip".to_owned(), format!("203.0.{}.{}", i % 251, i % 253)),
                ("user_agent".to_owned(), user_agent(i % agents)),
                ("device".to_owned(), "desktop".to_owned()),
            ])
        } else {
            HashMap::new()
        };
        let (token, user) = keys.key(i);
        let family = format!("{:032x}", mix(i as u64 ^ 0xfa51));
        assert!(cache.fill(
            user.as_str(),
            token.as_str(),
            &family,
            meta,
            created,
            expires
        ));
    }
    let fill_took = started.elapsed();
    let rss_after = rss();
    let stats = cache.stats();
    assert_eq!(stats.entries, entries as u64, "every session cached");
    println!("entries={entries} metadata={metadata} agents={agents}");
    println!(
        "fill_s={:.2} rss_before_mb={:.1} rss_after_mb={:.1} bytes_per_entry={:.0} anon_huge_mb={:.0}",
        fill_took.as_secs_f64(),
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6,
        (rss_after - rss_before) as f64 / entries as f64,
        anon_huge() as f64 / 1e6,
    );

    // A second of lookups on two threads, not measured: the first window
    // after the fill otherwise pays for what the fill left behind (in this
    // program's sixth-pass runs, `Session` lookups measured first scaled
    // 1.56-1.84 x on two threads, and 2.18 x measured again last).
    run_threads(2, |t| {
        let (cache, keys) = (cache.clone(), keys.clone());
        move || {
            rate(
                &cache,
                &keys,
                Duration::from_secs(1),
                t + 50,
                Answer::Session,
                false,
            )
        }
    });
    for (label, answer) in [
        ("", Answer::Session),
        ("compact ", Answer::Compact),
        ("view ", Answer::View),
    ] {
        for (keys_made, at_hand) in [("", true), ("keys_formatted ", false)] {
            for threads in [1, 2] {
                let rates = run_threads(threads, |t| {
                    let (cache, keys) = (cache.clone(), keys.clone());
                    move || rate(&cache, &keys, window, t, answer, at_hand)
                });
                let total: f64 = rates.iter().sum();
                println!(
                    "{label}{keys_made}threads={threads} lookups_per_s={total:.0} per_thread={:?}",
                    rates.iter().map(|r| r.round()).collect::<Vec<_>>()
                );
            }
        }
        for threads in [1, 2] {
            let hists = run_threads(threads, |t| {
                let (cache, keys) = (cache.clone(), keys.clone());
                move || timed(&cache, &keys, window, t, answer)
            });
            let mut all = hists[0].clone();
            for h in &hists[1..] {
                all.add(h).expect("same bounds");
            }
            println!(
                "{label}threads={threads} timed_lookups={} p50_ns={} p99_ns={} p999_ns={} max_ns={}",
                all.len(),
                all.value_at_quantile(0.5),
                all.value_at_quantile(0.99),
                all.value_at_quantile(0.999),
                all.max()
            );
        }
    }
    for (method, compact) in [("get_user_session", false), ("check_user_session", true)] {
        let rate = client_rate(&cache, &keys, window, compact);
        println!("client {method} threads=1 lookups_per_s={rate:.0}");
    }

    // Revocations applied to the full cache, each timed: single sessions,
    // then every session of users with 10 cached.
    let mut single = histogram();
    for k in 0..1000 {
        let i = TEN_SESSION_SESSIONS + (mix(k + 77) as usize % (entries - TEN_SESSION_SESSIONS));
        let at = Instant::now();
        let (token, user) = keys.key(i);
        cache.revoke(user.as_str(), Some(token.as_str()), Some(SystemTime::now()));
        single.record(at.elapsed().as_nanos() as u64).ok();
    }
    let mut user_wide = histogram();
    for u in 0..(TEN_SESSION_SESSIONS / 10).min(entries / 10) {
        let i = u * 10;
        let at = Instant::now();
        cache.revoke(keys.key(i).1.as_str(), None, Some(SystemTime::now()));
        user_wide.record(at.elapsed().as_nanos() as u64).ok();
        assert!(
            cache.lookup(keys.key(i + 9).0.as_str(), None).is_none(),
            "revoked"
        );
    }
    let left = cache.stats().entries;
    println!(
        "revoke_single n={} p50_ns={} p99_ns={} max_ns={}",
        single.len(),
        single.value_at_quantile(0.5),
        single.value_at_quantile(0.99),
        single.max()
    );
    println!(
        "revoke_user_of_10 n={} p50_ns={} p99_ns={} max_ns={} entries_left={left}",
        user_wide.len(),
        user_wide.value_at_quantile(0.5),
        user_wide.value_at_quantile(0.99),
        user_wide.max()
    );

    // Single revocations while two threads look up in place, each timed:
    // a change waits for the readers of every stripe of its shard. Spread
    // out (a revocation every 200 µs), as a stream delivers them.
    let looking = Arc::new(AtomicBool::new(true));
    let lookers: Vec<_> = (0..2)
        .map(|t| {
            let (cache, keys, looking) = (cache.clone(), keys.clone(), looking.clone());
            thread::spawn(move || {
                let mut rng = mix(t + 555);
                while looking.load(Ordering::Relaxed) {
                    rng = mix(rng);
                    let (token, user) = keys.key(rng as usize % keys.len());
                    black_box(
                        cache.lookup_view(token.as_str(), Some(user.as_str()), |view| {
                            black_box(view.expires_at())
                        }),
                    );
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    let mut during_lookups = histogram();
    for k in 0..1000 {
        let i = TEN_SESSION_SESSIONS + (mix(k + 7777) as usize % (entries - TEN_SESSION_SESSIONS));
        let (token, user) = keys.key(i);
        let at = Instant::now();
        cache.revoke(user.as_str(), Some(token.as_str()), Some(SystemTime::now()));
        during_lookups.record(at.elapsed().as_nanos() as u64).ok();
        thread::sleep(Duration::from_micros(200));
    }
    looking.store(false, Ordering::Relaxed);
    for looker in lookers {
        looker.join().unwrap();
    }
    println!(
        "revoke_single_during_lookups n={} p50_ns={} p99_ns={} p999_ns={} max_ns={}",
        during_lookups.len(),
        during_lookups.value_at_quantile(0.5),
        during_lookups.value_at_quantile(0.99),
        during_lookups.value_at_quantile(0.999),
        during_lookups.max()
    );

    // A reset of the full cache while two threads look up: every lookup
    // timed, in the second before it and in the second from it on.
    let flushed = Arc::new(AtomicBool::new(false));
    let flush_at = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let lookers: Vec<_> = (0..2)
        .map(|t| {
            let (cache, keys, flushed, flush_at) = (
                cache.clone(),
                keys.clone(),
                flushed.clone(),
                flush_at.clone(),
            );
            thread::spawn(move || {
                let (mut before, mut during) = (histogram(), histogram());
                let mut rng = mix(t + 991);
                let end_after_flush = Duration::from_secs(1);
                loop {
                    rng = mix(rng);
                    let i = rng as usize % keys.len();
                    let (token, user) = keys.key(i);
                    let at = Instant::now();
                    black_box(cache.lookup(token.as_str(), Some(user.as_str())));
                    let took = at.elapsed().as_nanos() as u64;
                    if flushed.load(Ordering::Acquire) {
                        during.record(took).ok();
                        let since = epoch.elapsed().as_nanos() as u64;
                        if since
                            > flush_at.load(Ordering::Relaxed) + end_after_flush.as_nanos() as u64
                        {
                            return (before, during);
                        }
                    } else {
                        before.record(took).ok();
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1000));
    let rss_full = rss();
    flush_at.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    flushed.store(true, Ordering::Release);
    let at = Instant::now();
    cache.reset(SystemTime::now());
    let reset_took = at.elapsed();
    let (mut before, mut during) = (histogram(), histogram());
    for looker in lookers {
        let (b, d) = looker.join().unwrap();
        before.add(b).expect("same bounds");
        during.add(d).expect("same bounds");
    }
    thread::sleep(Duration::from_millis(500));
    println!(
        "reset_call_us={} entries_after={} rss_full_mb={:.1} rss_after_flush_mb={:.1}",
        reset_took.as_micros(),
        cache.stats().entries,
        rss_full as f64 / 1e6,
        rss() as f64 / 1e6,
    );
    for (window, h) in [
        ("second_before_reset", before),
        ("second_from_reset", during),
    ] {
        println!(
            "{window}: lookups={} p999_us={:.1} p9999_us={:.1} max_us={:.1} over_1ms={}",
            h.len(),
            h.value_at_quantile(0.999) as f64 / 1e3,
            h.value_at_quantile(0.9999) as f64 / 1e3,
            h.max() as f64 / 1e3,
            h.count_between(1_000_000, u64::MAX),
        );
    }
    stop.store(true, Ordering::Relaxed);
    heartbeats.join().unwrap();
}

/// User agent number `n`: the 110-byte one, its last digits made `n` (the
/// first is [`USER_AGENT`] itself).
fn user_agent(n: usize) -> String {
    if n == 0 {
        return USER_AGENT.to_owned();
    }
    let tail = format!("{n}");
    format!("{}{tail}", &USER_AGENT[..USER_AGENT.len() - tail.len()])
}

fn run_threads<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    threads: u64,
    make: impl Fn(u64) -> F,
) -> Vec<T> {
    let handles: Vec<_> = (0..threads).map(|t| thread::spawn(make(t))).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// How a lookup is made: through the cache's `Session` answer, its
/// `CompactSession` one (`check_user_session`'s), or a `SessionView`
/// (`with_cached_session`'s).
#[derive(Clone, Copy, Debug)]
enum Answer {
    Session,
    Compact,
    /// `with_cached_session`'s, the closure reading the expiry.
    View,
}

impl Answer {
    /// Looks `token` of `user` up; whether it was answered.
    #[inline]
    fn lookup(self, cache: &BenchCache, token: &str, user: &str) -> bool {
        match self {
            Answer::Session => black_box(cache.lookup(token, Some(user))).is_some(),
            Answer::Compact => black_box(cache.lookup_compact(token, Some(user))).is_some(),
            Answer::View => {
                black_box(cache.lookup_view(token, Some(user), |view| black_box(view.expires_at())))
                    .is_some()
            }
        }
    }
}

/// Lookups of random cached sessions for `window`: the rate.
///
/// `at_hand`: the keys are made before the window, as many random picks as
/// there are sessions (up to 2^20), and read one after the other (as a
/// service has the token it checks in memory: the reads are sequential, so
/// the processor fetches them ahead, and the picks cover most of the cache,
/// so the sessions read are no more often in its caches than before).
/// Otherwise each key is formatted in the loop, inside the window, as the
/// first five passes measured (about 35 ns a key on the VM of the sixth).
fn rate(
    cache: &BenchCache,
    keys: &Keys,
    window: Duration,
    seed: u64,
    answer: Answer,
    at_hand: bool,
) -> f64 {
    const KEY: usize = 36 + 12;
    let mut rng = mix(seed + 1);
    // The picks' token and user ids one after the other, in one string.
    let mut ring = String::new();
    if at_hand {
        for _ in 0..keys.len().min(1 << 20) {
            rng = mix(rng);
            let (token, user) = keys.key(rng as usize % keys.len());
            ring.push_str(token.as_str());
            ring.push_str(user.as_str());
        }
    }
    let mut next = 0;
    let started = Instant::now();
    let (mut done, mut hits) = (0_u64, 0_u64);
    loop {
        for _ in 0..1024 {
            let hit = if at_hand {
                let (token, user) = ring[next..next + KEY].split_at(36);
                next = (next + KEY) % ring.len();
                answer.lookup(cache, token, user)
            } else {
                rng = mix(rng);
                let (token, user) = keys.key(rng as usize % keys.len());
                answer.lookup(cache, token.as_str(), user.as_str())
            };
            hits += u64::from(hit);
        }
        done += 1024;
        let elapsed = started.elapsed();
        if elapsed >= window {
            assert_eq!(hits, done, "every lookup answered from memory");
            return done as f64 / elapsed.as_secs_f64();
        }
    }
}

/// Lookups of random cached sessions for `window`, each timed.
fn timed(
    cache: &BenchCache,
    keys: &Keys,
    window: Duration,
    seed: u64,
    answer: Answer,
) -> Histogram<u64> {
    let mut rng = mix(seed + 101);
    let mut hist = histogram();
    let started = Instant::now();
    while started.elapsed() < window {
        for _ in 0..256 {
            rng = mix(rng);
            let i = rng as usize % keys.len();
            let (token, user) = keys.key(i);
            let at = Instant::now();
            let found = answer.lookup(cache, token.as_str(), user.as_str());
            hist.record(at.elapsed().as_nanos() as u64).ok();
            assert!(found);
        }
    }
    hist
}

/// Lookups of random cached sessions through the client's public methods
/// for `window`, on a current-thread runtime: `get_user_session`, or
/// `check_user_session` when `compact`. The rate.
fn client_rate(cache: &BenchCache, keys: &Keys, window: Duration, compact: bool) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Nothing listens there: every lookup must be a hit.
        let client = cache.client("http://127.0.0.1:1").await.expect("client");
        let mut rng = mix(7);
        let started = Instant::now();
        let (mut done, mut hits) = (0_u64, 0_u64);
        loop {
            for _ in 0..1024 {
                rng = mix(rng);
                let i = rng as usize % keys.len();
                let (token, user) = keys.key(i);
                let found = if compact {
                    black_box(
                        client
                            .check_user_session(user.as_str(), token.as_str())
                            .await,
                    )
                    .expect("answered")
                    .is_some()
                } else {
                    black_box(client.get_user_session(user.as_str(), token.as_str()).await)
                        .expect("answered")
                        .is_some()
                };
                hits += u64::from(found);
            }
            done += 1024;
            let elapsed = started.elapsed();
            if elapsed >= window {
                assert_eq!(hits, done, "every lookup answered from memory");
                return done as f64 / elapsed.as_secs_f64();
            }
        }
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// The sessions' keys, made from their number on the stack when needed, as
/// a service has the token it checks at hand: a table of a million strings
/// would add its own cache misses to every lookup measured.
struct Keys(usize);

impl Keys {
    fn len(&self) -> usize {
        self.0
    }

    /// Session `i`'s token id (a UUID's 36 characters, as a jti) and user
    /// id: 10 sessions each for the first users, 5 for the others.
    fn key(&self, i: usize) -> (Text<36>, Text<12>) {
        let (a, b) = (mix(i as u64), mix(!(i as u64)));
        let mut token = Text([b'-'; 36]);
        let mut at = 0;
        for (value, digits) in [
            (a >> 32, 8),
            ((a >> 16) & 0xffff, 4),
            (a & 0xffff, 4),
            (b >> 48, 4),
            (b & 0xffff_ffff_ffff, 12),
        ] {
            hex(&mut token.0[at..at + digits], value);
            at += digits + 1;
        }
        let u = if i < TEN_SESSION_SESSIONS {
            i / 10
        } else {
            TEN_SESSION_SESSIONS / 10 + (i - TEN_SESSION_SESSIONS) / 5
        };
        let mut user = Text(*b"user-0000000");
        let mut n = u;
        for digit in user.0[5..].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        (token, user)
    }
}

/// An ASCII string of `N` bytes on the stack.
struct Text<const N: usize>([u8; N]);

impl<const N: usize> Text<N> {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

fn hex(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// splitmix64: a cheap, well-mixed pseudo-random step.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// This process's anonymous memory in transparent huge pages, in bytes
/// (`/proc/self/smaps_rollup`; 0 where it cannot be read).
fn anon_huge() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
