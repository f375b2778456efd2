//! Client-side balancing: one tonic channel per endpoint address, each with
//! its own health, and the pick of an address for each attempt.
//!
//! Written out rather than taken from `Channel::balance_list`: there, a lazy
//! endpoint whose connect failed reports itself ready and hands its error to
//! the next call, and every endpoint reports the same load, so one endpoint
//! down fails about half of all calls. Here an address whose connection
//! cannot be opened, or that leaves [`EJECT_AFTER_TIMEOUTS`] attempts in a row
//! unanswered (a hung server: the port accepts, nothing answers), is
//! *ejected*: no call is sent to it while a background probe reconnects with
//! exponential backoff, and it rejoins only when the probe's health check is
//! answered (a TCP connect alone proves nothing about a hung server), or
//! when, every address being ejected, a call through it is. Among the addresses not
//! ejected, each attempt takes the less busy of two picked at random ("power
//! of two choices" on calls in flight), which spreads load without a shared
//! queue. With DNS discovery the set of addresses is replaced as the name
//! resolves to new ones; calls in flight on a removed address finish there.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, RwLock, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::{Channel, Endpoint};

use crate::{
    endpoint::{Dialer, connect_failed},
    error::{Error, Result},
    retry::{later, random},
};

/// The first pause before an ejected address is probed again; doubled per
/// failed probe up to [`EJECT_MAX`]. 100 ms: a restarting pod is usually
/// back within a few probes.
const EJECT_BASE: Duration = Duration::from_millis(100);
/// The longest pause between two probes of an ejected address: bounds how
/// long a recovered server waits to get calls again. A probe is one TCP (and
/// TLS) connect and one health check, so probing every few seconds costs
/// nothing worth saving.
const EJECT_MAX: Duration = Duration::from_secs(3);
/// Attempts in a row that an address that answered before may leave
/// unanswered (past the attempt's time) before it is ejected. More than one,
/// so a single slow call does not eject a healthy server; few, because while
/// the address stays in the pick, writes sent to it fail with an unknown
/// outcome. An address that never answered is ejected at its first timeout.
pub(crate) const EJECT_AFTER_TIMEOUTS: u32 = 3;
/// How long a probe waits for the answer to its health check: a server that
/// cannot answer one in this time is not given calls back.
const PROBE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How soon an empty address set (a name that resolved to nothing, or could
/// not be resolved) is resolved again, when the refresh interval is longer.
const EMPTY_REFRESH: Duration = Duration::from_secs(1);

/// Resolves a host name and port to socket addresses.
pub(crate) type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The operating system's resolver (A and AAAA records, `/etc/hosts`).
pub(crate) fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host.as_str(), port)).await?;
            Ok(addresses.collect())
        })
    })
}

/// The addresses a client spreads its calls over, shared by every clone.
pub(crate) struct Pool {
    members: RwLock<Arc<[Arc<Member>]>>,
}

impl Pool {
    pub(crate) fn new(members: Vec<Arc<Member>>) -> Arc<Self> {
        Arc::new(Self {
            members: RwLock::new(members.into()),
        })
    }

    /// The current addresses.
    pub(crate) fn members(&self) -> Arc<[Arc<Member>]> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The address for the next attempt, avoiding `avoid` (the one the last
    /// attempt failed on) when another is available; `None` when there are no
    /// addresses at all.
    ///
    /// Picks among addresses not ejected; when all are, the one whose
    /// ejection ends first, so a call still gets a real answer (fast, when
    /// connections are refused) rather than waiting for a probe.
    pub(crate) fn pick(&self, avoid: Option<&Arc<Member>>) -> Option<Arc<Member>> {
        let members = self.members();
        let now = Instant::now();
        let available: Vec<&Arc<Member>> = members.iter().filter(|m| m.available(now)).collect();
        let preferred: Vec<&Arc<Member>> = available
            .iter()
            .copied()
            .filter(|m| avoid.is_none_or(|a| !Arc::ptr_eq(a, m)))
            .collect();
        let candidates = if preferred.is_empty() {
            available
        } else {
            preferred
        };
        let chosen = match candidates.as_slice() {
            [] => members.iter().min_by_key(|m| m.ejected_until())?,
            [only] => only,
            several => {
                // Power of two choices: two distinct random candidates, the
                // one with fewer calls in flight.
                let len = several.len() as u64;
                let first = (random() % len) as usize;
                let offset = 1 + (random() % (len - 1)) as usize;
                let second = (first + offset) % several.len();
                let (a, b) = (several[first], several[second]);
                if b.in_flight() < a.in_flight() { b } else { a }
            }
        };
        Some(chosen.clone())
    }

    /// Tries every member at once and returns when one connects, so an eager
    /// client with several endpoints fails only when none can be reached, and a
    /// blackholed endpoint does not delay it. Until its connect ends, a member
    /// gets no calls; those that connect keep their connection, those that fail
    /// are ejected and probed in the background.
    pub(crate) async fn connect_any(&self, connect_timeout: Duration) -> Result<()> {
        let members = self.members();
        let (sender, mut results) = tokio::sync::mpsc::channel(members.len().max(1));
        let until = later(connect_timeout);
        for member in members.iter() {
            member.hold(until);
        }
        for member in members.iter() {
            let member = member.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let result = match member.endpoint().connect().await {
                    Ok(channel) => {
                        member.connected(channel);
                        Ok(())
                    }
                    Err(err) => {
                        member.connect_failed();
                        Err(err)
                    }
                };
                let _ = sender.send(result).await;
            });
        }
        drop(sender);
        let mut last = None;
        while let Some(result) = results.recv().await {
            match result {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err),
            }
        }
        Err(match last {
            Some(err) => connect_failed(err),
            None => Error::from(tonic::Status::unavailable(
                "cannot connect: no address to connect to",
            )),
        })
    }

    /// Whether an address other than `avoid` is available now.
    pub(crate) fn has_other_available(&self, avoid: &Arc<Member>) -> bool {
        let now = Instant::now();
        self.members()
            .iter()
            .any(|m| !Arc::ptr_eq(m, avoid) && m.available(now))
    }

    /// Replaces the addresses with `targets` (URL and endpoint), keeping the
    /// members (and connections) of addresses already present.
    pub(crate) fn replace(&self, targets: Vec<(String, Endpoint)>) {
        let mut slot = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let mut current: HashMap<&str, &Arc<Member>> =
            slot.iter().map(|m| (m.url.as_str(), m)).collect();
        let next: Vec<Arc<Member>> = targets
            .into_iter()
            .map(|(url, endpoint)| match current.remove(url.as_str()) {
                Some(kept) => kept.clone(),
                None => Member::lazy(url, endpoint),
            })
            .collect();
        for removed in current.values() {
            removed.removed.store(true, Ordering::Relaxed);
        }
        *slot = next.into();
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.members().iter()).finish()
    }
}

/// One address: its channel, its calls in flight and its health.
pub(crate) struct Member {
    /// The URL the channel dials (an address, for a discovered one).
    url: String,
    endpoint: Endpoint,
    /// Replaced by a probe's freshly connected channel when it recovers.
    channel: RwLock<Channel>,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    /// Set when discovery dropped the address, to end its probe.
    removed: AtomicBool,
}

#[derive(Debug, Default)]
struct Health {
    /// Connect failures (and ejections for timeouts) since the last success.
    failures: u32,
    /// Attempts in a row that got no answer in time.
    timeouts: u32,
    /// No calls before this instant; `None` when healthy.
    ejected_until: Option<Instant>,
    /// Whether a probe task is running for this member.
    probing: bool,
    /// Whether the server at this address answered since it was last
    /// ejected (or ever).
    confirmed: bool,
}

impl Member {
    /// A member whose channel connects on its first call.
    pub(crate) fn lazy(url: String, endpoint: Endpoint) -> Arc<Self> {
        let channel = endpoint.connect_lazy();
        Arc::new(Self {
            url,
            endpoint,
            channel: RwLock::new(channel),
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            removed: AtomicBool::new(false),
        })
    }

    /// The channel to send an attempt on.
    pub(crate) fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The endpoint, for an eager connect.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Counts a call in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether calls may be sent here: not ejected, or its ejection (or
    /// eager-connect hold) is over and no probe is deciding its fate. An
    /// ejected address is given calls back by its probe, not by the clock.
    fn available(&self, now: Instant) -> bool {
        let health = self.health();
        match health.ejected_until {
            None => true,
            Some(until) => until <= now && !health.probing,
        }
    }

    fn ejected_until(&self) -> Option<Instant> {
        self.health().ejected_until
    }

    /// The server at this address answered (whatever it said): healthy.
    pub(crate) fn answered(&self) {
        let mut health = self.health();
        health.failures = 0;
        health.timeouts = 0;
        health.ejected_until = None;
        health.confirmed = true;
    }

    /// An attempt got no answer in time. On an address that has not answered
    /// since it was (re)connected, that is most likely a connection that
    /// cannot open (a blackholed address: tonic reports it only after the
    /// connect timeout), so it is ejected at once; on one that did, after
    /// [`EJECT_AFTER_TIMEOUTS`] in a row (a hung server whose port still
    /// accepts). Either way later calls go elsewhere, and the probe's health
    /// check brings back a server that was merely slow.
    pub(crate) fn timed_out(self: &Arc<Self>) {
        let eject = {
            let mut health = self.health();
            if health.probing {
                // Already ejected: calls that were in flight when it was
                // do not lengthen the ejection.
                return;
            }
            health.timeouts = health.timeouts.saturating_add(1);
            !health.confirmed || health.timeouts >= EJECT_AFTER_TIMEOUTS
        };
        if eject {
            self.connect_failed();
        }
    }

    /// A connection to this address could not be opened: eject it and
    /// probe it in the background until it can.
    pub(crate) fn connect_failed(self: &Arc<Self>) {
        let spawn = {
            let mut health = self.health();
            health.failures = health.failures.saturating_add(1);
            health.ejected_until = Some(Instant::now() + eject_backoff(health.failures));
            health.confirmed = false;
            health.timeouts = 0;
            !std::mem::replace(&mut health.probing, true)
        };
        if spawn {
            tokio::spawn(probe(Arc::downgrade(self)));
        }
    }

    /// Keeps calls away until `until` while an eager connect is under way,
    /// so that a call does not open a second connection to an address that
    /// may be blackholed.
    pub(crate) fn hold(&self, until: Instant) {
        self.health().ejected_until = Some(until);
    }

    /// A connected channel from an eager connect: calls may go to it, but
    /// it counts as answering only once a call (or a probe's health check)
    /// is answered, so that a hung server is ejected at its first timeout.
    pub(crate) fn connected(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(PoisonError::into_inner) = channel;
        let mut health = self.health();
        health.failures = 0;
        health.ejected_until = None;
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let health = self.health();
        f.debug_struct("Member")
            .field("url", &self.url)
            .field("in_flight", &self.in_flight())
            .field("failures", &health.failures)
            .field("ejected", &health.ejected_until.is_some())
            .finish()
    }
}

/// A call in flight on a member, counted for the pick until dropped.
pub(crate) struct InFlight(Arc<Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The ejection after `failures` consecutive connect failures.
fn eject_backoff(failures: u32) -> Duration {
    let factor = 2_u32.saturating_pow(failures.saturating_sub(1).min(16));
    EJECT_BASE.saturating_mul(factor).min(EJECT_MAX)
}

/// Reconnects an ejected member in the background: waits out its ejection,
/// connects, sends a health check on the new connection, and installs the
/// connection when the check is answered (or ejects it for longer when the
/// connect fails or the check gets no answer). Holds only a weak reference
/// between tries, so a dropped client or a removed address ends it.
async fn probe(member: Weak<Member>) {
    loop {
        let wait = {
            let Some(member) = member.upgrade() else {
                return;
            };
            let mut health = member.health();
            match health.ejected_until {
                Some(until) if !member.removed.load(Ordering::Relaxed) => {
                    until.saturating_duration_since(Instant::now())
                }
                // Recovered through a call, or dropped by discovery.
                _ => {
                    health.probing = false;
                    return;
                }
            }
        };
        tokio::time::sleep(wait).await;
        let endpoint = match member.upgrade() {
            Some(member) if member.ejected_until().is_some() => member.endpoint.clone(),
            Some(member) => {
                member.health().probing = false;
                return;
            }
            None => return,
        };
        let answered = match endpoint.connect().await {
            Ok(channel) if answers_health_check(channel.clone()).await => Some(channel),
            Ok(_) | Err(_) => None,
        };
        let Some(member) = member.upgrade() else {
            return;
        };
        match answered {
            Some(channel) => {
                *member
                    .channel
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = channel;
                member.answered();
                member.health().probing = false;
                return;
            }
            None => {
                let mut health = member.health();
                health.failures = health.failures.saturating_add(1);
                health.ejected_until = Some(Instant::now() + eject_backoff(health.failures));
            }
        }
    }
}

/// Whether the server behind `channel` answers a `grpc.health.v1` check
/// within [`PROBE_CHECK_TIMEOUT`]. Any answer counts, whatever it says (not
/// serving while its Redis is down, or UNIMPLEMENTED, UNAUTHENTICATED): the
/// question is whether the server answers at all; calls to a server that
/// answers "unavailable" fail fast and are retried elsewhere.
async fn answers_health_check(channel: Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(PROBE_CHECK_TIMEOUT, check).await {
        Ok(Ok(_)) => true,
        Ok(Err(status)) => {
            !crate::error::is_transport_failure(&status) && !crate::error::is_local_timeout(&status)
        }
        Err(_elapsed) => false,
    }
}

/// Where DNS discovery looks: each endpoint's scheme, host and port.
#[derive(Clone, Debug)]
pub(crate) struct Seed {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// Resolves the seeds to the addresses to keep channels to.
#[derive(Clone)]
pub(crate) struct Discovery {
    pub(crate) seeds: Vec<Seed>,
    pub(crate) resolver: Resolver,
    pub(crate) dialer: Dialer,
    pub(crate) refresh: Duration,
    /// Each seed's last non-empty answer (same order as `seeds`), kept when a
    /// later lookup of that seed fails or finds nothing: each seed is
    /// resolved on its own, so one name failing freezes only its own
    /// addresses, never the others'.
    pub(crate) known: Vec<Vec<(String, Endpoint)>>,
}

impl Discovery {
    /// Resolves every seed on its own and returns every address known, as
    /// (URL, endpoint): a seed's fresh answer when its lookup found
    /// addresses, else its last known ones. An error only when no seed has
    /// any address (each lookup failed or found nothing, and none ever
    /// found any), with the first lookup error if there was one.
    pub(crate) async fn resolve(&mut self) -> Result<Vec<(String, Endpoint)>> {
        self.known.resize(self.seeds.len(), Vec::new());
        let mut first_error = None;
        for (seed, known) in self.seeds.iter().zip(self.known.iter_mut()) {
            match resolve_seed(&self.resolver, &self.dialer, seed).await {
                Ok(fresh) if !fresh.is_empty() => *known = fresh,
                // Nothing found: the seed's last known addresses stay.
                Ok(_) => {}
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let mut targets: Vec<(String, Endpoint)> = Vec::new();
        for (url, endpoint) in self.known.iter().flatten() {
            if !targets.iter().any(|(known, _)| known == url) {
                targets.push((url.clone(), endpoint.clone()));
            }
        }
        match first_error {
            Some(err) if targets.is_empty() => Err(err),
            _ => Ok(targets),
        }
    }

    /// Re-resolves every `refresh` (sooner while there are no addresses) and
    /// installs the result, until the pool is dropped. A seed whose lookup
    /// fails or finds nothing keeps its last known addresses (a DNS hiccup
    /// must not take servers away); the other seeds are updated regardless.
    pub(crate) async fn run(mut self, pool: Weak<Pool>) {
        loop {
            let empty = match pool.upgrade() {
                Some(pool) => pool.members().is_empty(),
                None => return,
            };
            let wait = if empty {
                self.refresh.min(EMPTY_REFRESH)
            } else {
                self.refresh
            };
            tokio::time::sleep(wait).await;
            let Ok(targets) = self.resolve().await else {
                continue;
            };
            if targets.is_empty() {
                continue;
            }
            match pool.upgrade() {
                Some(pool) => pool.replace(targets),
                None => return,
            }
        }
    }
}

/// One seed's addresses, as (URL, endpoint); an error when it cannot be
/// resolved within the connect timeout.
async fn resolve_seed(
    resolver: &Resolver,
    dialer: &Dialer,
    seed: &Seed,
) -> Result<Vec<(String, Endpoint)>> {
    let resolved = tokio::time::timeout(
        dialer.connect_timeout,
        resolver(seed.host.clone(), seed.port),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))
    .and_then(|result| result)
    .map_err(|e| {
        Error::from(tonic::Status::unavailable(format!(
            "cannot resolve {}:{}: {e}",
            seed.host, seed.port
        )))
    })?;
    let scheme = if seed.https { "https" } else { "http" };
    let mut targets = Vec::with_capacity(resolved.len());
    for address in resolved {
        let url = format!("{scheme}://{address}");
        let endpoint = dialer.endpoint(&url, Some(&seed.host))?;
        targets.push((url, endpoint));
    }
    Ok(targets)
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("seeds", &self.seeds)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(port: u16) -> Arc<Member> {
        let url = format!("http://127.0.0.1:{port}");
        let endpoint = Endpoint::from_shared(url.clone()).unwrap();
        Member::lazy(url, endpoint)
    }

    /// Ejection doubles per failure up to its cap.
    #[test]
    fn ejection_backs_off_exponentially_to_a_cap() {
        let pauses: Vec<u128> = (1..=7).map(|f| eject_backoff(f).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3000, 3000]);
        assert_eq!(eject_backoff(u32::MAX), EJECT_MAX);
    }

    /// An ejected member is not picked while another is available; when all
    /// are ejected the one whose ejection ends first is; answering restores it.
    #[tokio::test]
    async fn ejected_members_are_skipped_until_they_answer() {
        let (a, b) = (member(1), member(2));
        let pool = Pool::new(vec![a.clone(), b.clone()]);
        a.connect_failed();
        for _ in 0..50 {
            assert!(Arc::ptr_eq(&pool.pick(None).unwrap(), &b));
        }
        b.connect_failed();
        b.connect_failed();
        // Both ejected: `a` (one failure, shorter ejection) comes back first.
        assert!(Arc::ptr_eq(&pool.pick(None).unwrap(), &a));
        a.answered();
        assert!(Arc::ptr_eq(&pool.pick(Some(&b)).unwrap(), &a));
        assert!(!pool.has_other_available(&a));
    }

    /// A timeout ejects an address that never answered (a connect that may
    /// be stalled) at once, one that did only after several in a row (a
    /// hung server, not one slow call); an answer in between resets the
    /// count, and an ejected member is not picked while its probe runs.
    #[tokio::test]
    async fn timeouts_eject_an_unconfirmed_member_at_once_and_others_in_a_row() {
        let (a, b) = (member(1), member(2));
        let pool = Pool::new(vec![a.clone(), b.clone()]);
        a.timed_out();
        assert!(a.ejected_until().is_some());
        b.answered();
        for _ in 1..EJECT_AFTER_TIMEOUTS {
            b.timed_out();
        }
        b.answered();
        for _ in 1..EJECT_AFTER_TIMEOUTS {
            b.timed_out();
        }
        assert!(b.ejected_until().is_none());
        b.timed_out();
        assert!(b.ejected_until().is_some());
        // Past its ejection, with its probe still running, `a` stays out.
        let later = Instant::now() + EJECT_MAX;
        assert!(!a.available(later));
        b.answered();
        assert!(Arc::ptr_eq(&pool.pick(None).unwrap(), &b));
    }

    /// Power of two choices prefers the member with fewer calls in flight,
    /// and `avoid` steers a retry elsewhere.
    #[tokio::test]
    async fn the_less_busy_member_is_picked_and_avoid_is_honoured() {
        let (a, b) = (member(1), member(2));
        let pool = Pool::new(vec![a.clone(), b.clone()]);
        let _busy: Vec<InFlight> = (0..3).map(|_| a.start()).collect();
        for _ in 0..50 {
            assert!(Arc::ptr_eq(&pool.pick(None).unwrap(), &b));
        }
        for _ in 0..50 {
            assert!(Arc::ptr_eq(&pool.pick(Some(&b)).unwrap(), &a));
        }
    }

    /// Replacing the set keeps known members (and their state), adds new ones
    /// and marks removed ones.
    #[tokio::test]
    async fn replace_keeps_known_members_and_marks_removed_ones() {
        let (a, b) = (member(1), member(2));
        let pool = Pool::new(vec![a.clone(), b.clone()]);
        let c = "http://127.0.0.1:3".to_string();
        pool.replace(vec![
            (a.url.clone(), a.endpoint.clone()),
            (c.clone(), Endpoint::from_shared(c.clone()).unwrap()),
        ]);
        let members = pool.members();
        assert_eq!(members.len(), 2);
        assert!(Arc::ptr_eq(&members[0], &a));
        assert_eq!(members[1].url, c);
        assert!(b.removed.load(Ordering::Relaxed));
        assert!(!a.removed.load(Ordering::Relaxed));
        pool.replace(Vec::new());
        assert!(pool.pick(None).is_none());
    }
}
