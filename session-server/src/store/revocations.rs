//! The revocation stream's Redis side: the scripts that end sessions PUBLISH
//! each revocation on one channel (`P revocations`) in the same atomic step,
//! and one subscriber per process fans what arrives out to every open
//! WatchRevocations stream.
//!
//! # Messages on the channel
//!
//! Plain text, split on `:` (ids never contain one):
//!
//! - `r:<revoked_at_ms>:<reason>:<user_id>:<token_id>`: a revocation; an empty
//!   token id means every session of the user created at or before
//!   `revoked_at_ms` (RevokeAllUserSessions);
//! - `x:<expires_at_ms>:<user_id>:<token_id>`: a live session whose expiry
//!   ExtendSession moved earlier (`extend_session.lua`). Servers older than
//!   this message count it as malformed and ignore it, so during a rolling
//!   upgrade only the new servers' streams carry it;
//! - `h:<id>:<seq>:<master index>:<redis_time_ms>`: a heartbeat, published
//!   by each server process for itself (`id` random for each subscription),
//!   numbered, on each master, with that master's clock (`TIME`) read in the
//!   same script that publishes it (`scripts/heartbeat.lua`). Earlier
//!   versions published `h:<id>`, `h:<id>:<seq>`, then
//!   `h:<id>:<seq>:<master index>`, without the time: during a rolling
//!   upgrade old and new processes share the channel, and to each of them
//!   every message starting with `h:` is another process's heartbeat (only
//!   a process's own beats, found by its id, are read further).
//!
//! # Redis's clock on the stream
//!
//! The near-cache of session-client judges a session's expiry (`expires_at`,
//! Redis's clock) by Redis's clock, not its host's, so every reset and
//! heartbeat a stream sends carries Redis's time ([`RedisClock`]). It comes
//! from the heartbeat that proved the subscription: the time the master read
//! as it published the beat, advanced by this process's monotonic clock from
//! the beat's arrival until the message is built. So it lags Redis's clock by
//! the beat's delivery from Redis to this process only (one pub/sub hop). On a
//! cluster a beat counts once it came back from every master, each with its
//! own clock; the latest of those times is kept, so a receiver's estimate is
//! never behind any master's clock by more than that delay (it may be ahead
//! of a master whose clock is behind the others: a cache then stops
//! answering a session early, which is safe). Within a subscription the
//! clock only moves forward, and each subscription's beats carry a new id,
//! so someone else who may PUBLISH on the channel cannot set it back with a
//! forged beat (one forged ahead only makes caches ask the server sooner).
//!
//! # Why heartbeats go through Redis
//!
//! A subscription can die without its TCP connection closing (a partitioned
//! or failed-over master), and on a cluster a message crossing the cluster bus
//! can be dropped in a link's reconnect while every connection of ours stays
//! up. So the subscriber connects to every master (the one master of
//! standalone and sentinel modes; each master of a cluster, over which that
//! master's own publishes arrive without crossing the bus), and each process
//! publishes its own numbered heartbeat on each master. A beat counts only
//! when it came back from every master over that master's own connection;
//! streams get a heartbeat only then, so they stop beating exactly when
//! revocations may have stopped flowing. A subscription is announced to the
//! streams as a reset only once its first beat came back (what is published
//! from then on arrives); one that misses its beats for the patience
//! (three beats, at least one beat plus REDIS_TIMEOUT_MS), or whose cluster
//! changed masters, is dropped and made again.
//!
//! # Cost when nobody watches
//!
//! None: the subscriber starts with the first WatchRevocations stream and
//! stops at a heartbeat tick that finds no stream open. Publishing costs the
//! revoking scripts one PUBLISH each, subscribed or not.
//!
//! # Topologies
//!
//! Standalone: the one server. Sentinel: the master the sentinels name at
//! subscription time (each attempt asks the next sentinel first, each with
//! its own timeout); after a failover the old connection breaks or misses its
//! heartbeats, and the next subscription goes to the new master. Cluster: one
//! connection per master, as redis-rs's cluster connection sees the masters;
//! a revocation arrives once over its own master's connection and again over
//! the bus on the others, and the copies are dropped.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::broadcast, time::Instant};
use tokio_stream::{StreamExt, StreamMap};

use super::{Store, connection};
use crate::{
    error::Error,
    metrics::{REVOCATION_EVENTS, REVOCATION_SUBSCRIPTION_UP},
    model::{Revocation, RevocationReason, Shortened},
};

/// What the subscriber tells every stream.
#[derive(Clone, Debug)]
pub enum RevocationEvent {
    /// The subscription was (re)established: anything before may have been
    /// missed. With the clock of the heartbeat that proved it.
    Reset(Option<RedisClock>),
    /// This process's heartbeat came back through the subscription, with
    /// Redis's clock as it left (`None` only for a beat without a time,
    /// which this version never publishes).
    Heartbeat(Option<RedisClock>),
    /// A session, or every session of a user, ended.
    Revoked(Arc<Revocation>),
    /// A live session's expiry was moved earlier.
    Shortened(Arc<Shortened>),
}

/// A reading of Redis's clock: the time a master's `TIME` gave as it
/// published a heartbeat, and when (by this process's monotonic clock) that
/// heartbeat came back. Streams send [`now`](Self::now), so the time a
/// message spends queued here is accounted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedisClock {
    /// Redis's clock when the heartbeat left Redis.
    pub at: SystemTime,
    /// When the heartbeat arrived here.
    pub seen: Instant,
}

impl RedisClock {
    /// Redis's time now, as estimated from this reading: its time plus the
    /// time elapsed here since it arrived (a monotonic clock, whatever this
    /// host's wall clock says).
    pub fn now(&self) -> SystemTime {
        self.at + self.seen.elapsed()
    }

    /// The later of two readings, compared as estimates of Redis's now.
    fn latest(self, other: Option<Self>) -> Self {
        match other {
            Some(other) if other.now() > self.now() => other,
            _ => self,
        }
    }
}

/// How many events a stream may fall behind before it is dropped. A stream
/// at the limit is a receiver that stopped reading: heartbeats alone take
/// over an hour to fill it.
pub const REVOCATION_BACKLOG: usize = 4096;

/// The subscriber shared by every stream of one process, while any is open.
#[derive(Default)]
pub(super) struct Hub {
    state: Mutex<Option<Running>>,
}

struct Running {
    events: broadcast::Sender<RevocationEvent>,
    /// When a heartbeat last came back complete through the current
    /// subscription, and its clock; `None` until the first one did (or since
    /// it was lost).
    proven: Arc<Mutex<Option<Proof>>>,
    /// REVOCATION_HEARTBEAT_MS.
    beat: Duration,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("Hub").field("running", &running).finish()
    }
}

/// The last complete heartbeat of a subscription.
#[derive(Clone, Copy, Debug)]
struct Proof {
    /// When it came back.
    at: Instant,
    /// Redis's clock it carried.
    clock: Option<RedisClock>,
}

/// One stream's view of the revocations: its receiver, and whether the
/// subscription was proven alive when it was opened.
#[derive(Debug)]
pub struct RevocationFeed {
    /// Every event from the moment the stream was opened.
    pub events: broadcast::Receiver<RevocationEvent>,
    /// True when a heartbeat came back within the last one and a half beats:
    /// the stream may start with its reset at once. Otherwise its start is
    /// the next [`RevocationEvent::Reset`] or [`RevocationEvent::Heartbeat`].
    pub subscribed: bool,
    /// When `subscribed`, the clock of that heartbeat, for the reset.
    pub clock: Option<RedisClock>,
}

/// Locks `mutex`, ignoring poisoning: every value behind these locks is
/// replaced whole, so a panic elsewhere cannot leave it half written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// The channel the scripts publish revocations on: `P revocations`, with
    /// the database number appended (`P revocations:db3`) when it is not 0,
    /// because pub/sub channels are shared by every database of a server.
    pub(crate) fn revocation_channel(&self) -> &str {
        &self.shared.revocation_channel
    }

    /// Opens a feed of revocations, starting the subscriber if no stream had
    /// one running.
    pub fn watch_revocations(&self) -> RevocationFeed {
        let mut state = lock(&self.shared.revocations.state);
        if let Some(running) = state.as_ref() {
            let events = running.events.subscribe();
            let fresh = running.beat * 3 / 2;
            let proof = lock(&running.proven).filter(|proof| proof.at.elapsed() < fresh);
            return RevocationFeed {
                events,
                subscribed: proof.is_some(),
                clock: proof.and_then(|proof| proof.clock),
            };
        }
        let (events, receiver) = broadcast::channel(REVOCATION_BACKLOG);
        let proven = Arc::new(Mutex::new(None));
        *state = Some(Running {
            events: events.clone(),
            proven: Arc::clone(&proven),
            beat: self.shared.settings.revocation_heartbeat,
        });
        tokio::spawn(self.clone().subscribe_revocations(events, proven));
        RevocationFeed {
            events: receiver,
            subscribed: false,
            clock: None,
        }
    }

    /// Stops the subscriber when no stream is left. Under the hub's lock, so
    /// a stream opened at the same moment either finds it running or starts
    /// a new one.
    fn retire_if_unwatched(&self, events: &broadcast::Sender<RevocationEvent>) -> bool {
        let mut state = lock(&self.shared.revocations.state);
        if events.receiver_count() > 0 {
            return false;
        }
        *state = None;
        true
    }

    /// The subscriber: subscribe (on every master of a cluster), prove the
    /// subscription with a heartbeat that comes back from every master over
    /// that master's own connection, announce a reset, then forward what
    /// arrives; on loss (a connection closed, heartbeats that stop coming
    /// back complete, the cluster's masters changed) subscribe again, with
    /// backoff when the last subscription never worked.
    async fn subscribe_revocations(
        self,
        events: broadcast::Sender<RevocationEvent>,
        proven: Arc<Mutex<Option<Proof>>>,
    ) {
        let settings = &self.shared.settings;
        let beat = settings.revocation_heartbeat;
        // A heartbeat that has not come back after this long is lost: three
        // beats, and never less than one beat plus a Redis timeout.
        let patience = (beat * 3).max(beat + settings.timeout);
        let channel = self.revocation_channel().to_owned();
        let mut backoff = Backoff::new();
        let mut attempt = 0usize;
        metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);

        loop {
            if self.retire_if_unwatched(&events) {
                return;
            }
            let mut messages = match self.subscribe_everywhere(&channel, attempt).await {
                Ok(subscription) => subscription,
                Err(err) => {
                    if backoff.attempts == 0 {
                        tracing::warn!(error = %err, "revocation stream: cannot subscribe to Redis; retrying");
                    }
                    attempt = attempt.wrapping_add(1);
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };

            // A new id for each subscription: its first beat, whose clock
            // the reset carries, cannot be forged ahead of time by someone
            // else who may PUBLISH on the channel (see `Proof`'s clock).
            let own = format!("h:{:016x}:", super::random_u64());
            // Heartbeats are published by their own task so that a slow
            // PUBLISH never holds up reading the subscriptions; it also
            // watches the cluster's masters and says when they changed.
            let (changed_tx, mut changed) = tokio::sync::mpsc::channel(1);
            let publisher = AbortOnDrop(tokio::spawn(self.clone().publish_heartbeats(
                channel.clone(),
                own.clone(),
                beat,
                messages.masters.clone(),
                changed_tx,
            )));
            let mut beats = Beats::new(messages.masters.len());
            let mut recent = Recent::default();
            let mut last_beat: Option<Instant> = None;
            let mut last_clock: Option<RedisClock> = None;
            let subscribed_at = Instant::now();
            let mut tick = tokio::time::interval(beat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let lost = loop {
                let completed = tokio::select! {
                    next = messages.streams.next() => {
                        let Some((source, message)) = next else {
                            break "every connection closed".to_owned();
                        };
                        let Some(message) = message else {
                            break format!("the connection to {} closed", messages.name(source));
                        };
                        let payload = message.get_payload_bytes();
                        if let Some(beat) = own_beat(payload, &own) {
                            // Only the copy that came over its own master's
                            // connection proves that connection (copies of
                            // other masters' beats come over the cluster bus).
                            if beat.master != source {
                                continue;
                            }
                            let clock = beat.redis_time.map(|at| RedisClock {
                                at,
                                seen: Instant::now(),
                            });
                            match beats.arrived(beat.seq, source, clock) {
                                Some(clock) => Some(clock),
                                None => continue,
                            }
                        } else {
                            // On a cluster each revocation arrives once per
                            // master: over its own master's connection, and
                            // over the bus on the others.
                            if !recent.first_time(payload, source) {
                                continue;
                            }
                            match parse(payload) {
                                Some(Parsed::Revoked(revocation)) => {
                                    metrics::counter!(REVOCATION_EVENTS, "kind" => "revocation").increment(1);
                                    let _ = events.send(RevocationEvent::Revoked(Arc::new(revocation)));
                                }
                                Some(Parsed::Shortened(shortened)) => {
                                    metrics::counter!(REVOCATION_EVENTS, "kind" => "shortened").increment(1);
                                    let _ = events.send(RevocationEvent::Shortened(Arc::new(shortened)));
                                }
                                // Another process's heartbeat.
                                Some(Parsed::Heartbeat) => {}
                                None => {
                                    metrics::counter!(REVOCATION_EVENTS, "kind" => "malformed").increment(1);
                                    tracing::debug!(len = payload.len(), "revocation stream: ignored a malformed message");
                                }
                            }
                            None
                        }
                    }
                    Some(()) = changed.recv() => break "the cluster's masters changed".to_owned(),
                    _ = tick.tick() => {
                        if self.retire_if_unwatched(&events) {
                            *lock(&proven) = None;
                            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
                            return;
                        }
                        if last_beat.unwrap_or(subscribed_at).elapsed() > patience {
                            break "its heartbeats stopped coming back".to_owned();
                        }
                        None
                    }
                };
                // A beat that came back from every master, with its clock.
                if let Some(clock) = completed {
                    // Forward only within a subscription: a beat forged with
                    // an earlier time (by someone else who may PUBLISH on the
                    // channel and read this one's id) cannot set it back.
                    let clock = clock.map(|clock| clock.latest(last_clock));
                    last_clock = clock.or(last_clock);
                    let now = Instant::now();
                    *lock(&proven) = Some(Proof { at: now, clock });
                    if last_beat.replace(now).is_none() {
                        // Proven: what is published from now on arrives.
                        if backoff.attempts > 0 || attempt > 0 {
                            tracing::info!("revocation stream: subscribed to Redis again");
                        }
                        backoff = Backoff::new();
                        metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(1);
                        metrics::counter!(REVOCATION_EVENTS, "kind" => "reset").increment(1);
                        let _ = events.send(RevocationEvent::Reset(clock));
                    } else {
                        let _ = events.send(RevocationEvent::Heartbeat(clock));
                    }
                }
            };
            drop(publisher);
            *lock(&proven) = None;
            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
            tracing::warn!(
                "revocation stream: lost the Redis subscription ({lost}); streams stop beating until it is back, then reset"
            );
            // The next subscription starts from the next sentinel, after a
            // pause when this one never worked.
            attempt = attempt.wrapping_add(1);
            if last_beat.is_none() {
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }

    /// Subscribes to `channel` on the master (on each master of a cluster:
    /// a message that crosses the cluster bus can be lost in a link's
    /// reconnect without any connection of ours breaking, while one a
    /// master delivers to its own subscribers cannot).
    async fn subscribe_everywhere(
        &self,
        channel: &str,
        attempt: usize,
    ) -> Result<Subscription, Error> {
        let settings = &self.shared.settings;
        let masters: Vec<Option<String>> =
            match self.op("cluster_masters").await?.cluster_masters().await? {
                Some(masters) => masters.into_iter().map(Some).collect(),
                None => vec![None],
            };
        let mut streams = StreamMap::new();
        for (source, master) in masters.iter().enumerate() {
            let mut pubsub =
                connection::pubsub(settings, &self.shared.secrets, master.as_deref(), attempt)
                    .await?;
            tokio::time::timeout(settings.timeout, pubsub.subscribe(channel))
                .await
                .map_err(|_| Error::Timeout(settings.timeout))??;
            // Each message as `Some`, then one `None` when the connection
            // closes, so a loss is seen (StreamMap drops ended streams
            // silently).
            let messages: SourceStream = Box::pin(
                pubsub
                    .into_on_message()
                    .map(Some)
                    .chain(tokio_stream::once(None)),
            );
            streams.insert(source, messages);
        }
        Ok(Subscription { masters, streams })
    }

    /// Publishes a numbered heartbeat on `channel` every `every`, on each
    /// master in `masters` (`<own><seq>:<index>:<redis_time_ms>`, the time
    /// read by the master in the script that publishes it), as the scripts
    /// publish revocations; on a cluster also checks that the masters are
    /// still those, and says on `changed` when they are not.
    async fn publish_heartbeats(
        self,
        channel: String,
        own: String,
        every: Duration,
        masters: Vec<Option<String>>,
        changed: tokio::sync::mpsc::Sender<()>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused_logged = false;
        let cluster = masters.iter().any(Option::is_some);
        for seq in 0u64.. {
            tick.tick().await;
            let Ok(mut op) = self.op("publish_heartbeat").await else {
                continue;
            };
            if cluster
                && let Ok(Some(now)) = op.cluster_masters().await
                && now.iter().map(Some).ne(masters.iter().map(Option::as_ref))
            {
                let _ = changed.try_send(());
                return;
            }
            for (index, master) in masters.iter().enumerate() {
                // EVAL rather than EVALSHA: once a beat per master, the
                // script's hashing costs Redis nothing worth a NOSCRIPT
                // round trip after each restart or failover, and EVAL is
                // told apart from the request path's EVALSHA in Redis's
                // command statistics.
                let mut beat = redis::cmd("EVAL");
                beat.arg(HEARTBEAT_SCRIPT)
                    .arg(0)
                    .arg(&channel)
                    .arg(format!("{own}{seq}:{index}"));
                // A failed beat shows as a missing heartbeat; the store
                // records the error. A refusal is a misconfiguration worth
                // saying once.
                match op.run_on(master.as_deref(), &beat).await {
                    Err(Error::Internal(cause)) if !refused_logged => {
                        refused_logged = true;
                        tracing::error!(
                            channel = %channel,
                            error = %cause,
                            "revocation stream: Redis refused a PUBLISH on the revocation channel; \
                             revocations fail the same way: grant the Redis user `&<channel>`"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One message stream per master, each ending with `None` when its
/// connection closes.
type SourceStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Option<redis::Msg>> + Send>>;

/// The subscriber's connections: one per master, keyed by index in
/// `masters` (`None`: the one master of standalone and sentinel modes).
struct Subscription {
    masters: Vec<Option<String>>,
    streams: StreamMap<usize, SourceStream>,
}

impl Subscription {
    fn name(&self, source: usize) -> &str {
        self.masters
            .get(source)
            .and_then(Option::as_deref)
            .unwrap_or("Redis")
    }
}

/// The heartbeat script (`scripts/heartbeat.lua`).
const HEARTBEAT_SCRIPT: &str = include_str!("scripts/heartbeat.lua");

/// One of this process's heartbeats, as it came back.
#[derive(Debug, PartialEq, Eq)]
struct OwnBeat {
    seq: u64,
    /// The index of the master it was published on.
    master: usize,
    /// That master's clock as it published the beat; `None` for a beat
    /// without one (the format before the time was added).
    redis_time: Option<SystemTime>,
}

/// One of this process's heartbeats (`own` is the `h:<id>:` prefix):
/// `<seq>:<master index>`, then `:<redis_time_ms>`.
fn own_beat(payload: &[u8], own: &str) -> Option<OwnBeat> {
    let rest = std::str::from_utf8(payload.strip_prefix(own.as_bytes())?).ok()?;
    let mut parts = rest.splitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let master = parts.next()?.parse().ok()?;
    let redis_time = match parts.next() {
        Some(ms) => Some(UNIX_EPOCH + Duration::from_millis(ms.parse().ok()?)),
        None => None,
    };
    Some(OwnBeat {
        seq,
        master,
        redis_time,
    })
}

/// Heartbeats in flight: from which masters each came back. A beat is
/// complete when it came back from every master over that master's own
/// connection.
struct Beats {
    masters: usize,
    /// seq -> the masters it came back from, and the latest of their clocks.
    pending: std::collections::BTreeMap<u64, Pending>,
}

/// One heartbeat not yet back from every master.
#[derive(Default)]
struct Pending {
    from: std::collections::BTreeSet<usize>,
    clock: Option<RedisClock>,
}

impl Beats {
    /// Most beats remembered; older ones are given up.
    const KEPT: usize = 16;

    fn new(masters: usize) -> Self {
        Self {
            masters,
            pending: std::collections::BTreeMap::new(),
        }
    }

    /// Beat `seq` came back from `master`, with that master's clock.
    /// `Some` when that completes it, with the latest of its masters'
    /// clocks (see the module docs: the safe side for a cache).
    fn arrived(
        &mut self,
        seq: u64,
        master: usize,
        clock: Option<RedisClock>,
    ) -> Option<Option<RedisClock>> {
        let pending = self.pending.entry(seq).or_default();
        pending.from.insert(master);
        if let Some(clock) = clock {
            pending.clock = Some(clock.latest(pending.clock));
        }
        let complete = (pending.from.len() >= self.masters).then_some(pending.clock);
        if complete.is_some() {
            // Older beats are moot once a later one completed.
            self.pending = self.pending.split_off(&(seq + 1));
        }
        while self.pending.len() > Self::KEPT {
            self.pending.pop_first();
        }
        complete
    }
}

/// Revocation messages seen in the last 10 to 20 s, with how many times each
/// came over each master's connection. On a cluster one PUBLISH arrives once
/// per master (over its own master's connection, and over the bus on the
/// others), and two publishes can carry the same text (two
/// RevokeAllUserSessions of one user in one Redis millisecond). So the n-th
/// arrival of a text over any one connection is the n-th publish of it: a
/// message passes when some connection delivers it more often than any had
/// before, and only the copies of one publish are dropped.
#[derive(Default)]
struct Recent {
    current: std::collections::HashMap<Box<[u8]>, Arrivals>,
    previous: std::collections::HashMap<Box<[u8]>, Arrivals>,
    since: Option<Instant>,
}

/// How often one text arrived: per source (master index), and the most over
/// any source, which is how many publishes of it passed.
#[derive(Default)]
struct Arrivals {
    by_source: Vec<u32>,
    passed: u32,
}

impl Recent {
    const SPAN: Duration = Duration::from_secs(10);

    /// Whether `payload`, arriving over `source`'s connection, is a publish
    /// not passed on yet.
    fn first_time(&mut self, payload: &[u8], source: usize) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > Self::SPAN {
            self.previous = std::mem::take(&mut self.current);
            self.since = Some(Instant::now());
        }
        if !self.current.contains_key(payload) {
            let carried = self.previous.remove(payload).unwrap_or_default();
            self.current.insert(payload.into(), carried);
        }
        let Some(arrivals) = self.current.get_mut(payload) else {
            return true;
        };
        if arrivals.by_source.len() <= source {
            arrivals.by_source.resize(source + 1, 0);
        }
        let count = &mut arrivals.by_source[source];
        *count = count.saturating_add(1);
        if *count > arrivals.passed {
            arrivals.passed = *count;
            true
        } else {
            false
        }
    }
}

/// A decoded channel message.
#[derive(Debug, PartialEq)]
enum Parsed {
    Revoked(Revocation),
    Shortened(Shortened),
    Heartbeat,
}

fn parse(payload: &[u8]) -> Option<Parsed> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.starts_with("h:") {
        return Some(Parsed::Heartbeat);
    }
    if let Some(rest) = text.strip_prefix("x:") {
        let mut parts = rest.splitn(3, ':');
        let expires_at_ms = parts.next()?.parse().ok()?;
        let user_id = parts.next().filter(|u| !u.is_empty())?.to_owned();
        let token_id = parts
            .next()
            .filter(|t| !t.is_empty() && !t.contains(':'))?
            .to_owned();
        return Some(Parsed::Shortened(Shortened {
            user_id,
            token_id,
            expires_at_ms,
        }));
    }
    let mut parts = text.strip_prefix("r:")?.splitn(4, ':');
    let revoked_at_ms = parts.next()?.parse().ok()?;
    let reason = match parts.next()? {
        "revoked" => RevocationReason::Revoked,
        "signed_out_everywhere" => RevocationReason::SignedOutEverywhere,
        "evicted" => RevocationReason::Evicted,
        "rotated" => RevocationReason::Rotated,
        "reuse_detected" => RevocationReason::ReuseDetected,
        _ => return None,
    };
    let user_id = parts.next().filter(|u| !u.is_empty())?.to_owned();
    let token_id = parts.next()?;
    if token_id.contains(':') {
        return None;
    }
    Some(Parsed::Revoked(Revocation {
        user_id,
        token_id: (!token_id.is_empty()).then(|| token_id.to_owned()),
        revoked_at_ms,
        reason,
    }))
}

/// Jittered exponential backoff between subscription attempts: 100 ms
/// doubling to 5 s.
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { attempts: 0 }
    }

    fn next(&mut self) -> Duration {
        let base = 100u64.saturating_mul(1 << self.attempts.min(6)).min(5_000);
        self.attempts = self.attempts.saturating_add(1);
        // Full jitter over the upper half, so restarted pods spread out.
        Duration::from_millis(base / 2 + super::random_u64() % (base / 2 + 1))
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_message_kind() {
        assert_eq!(
            parse(b"r:1700000000123:revoked:alice:t-1"),
            Some(Parsed::Revoked(Revocation {
                user_id: "alice".into(),
                token_id: Some("t-1".into()),
                revoked_at_ms: 1_700_000_000_123,
                reason: RevocationReason::Revoked,
            }))
        );
        assert_eq!(
            parse(b"r:5:signed_out_everywhere:bob:"),
            Some(Parsed::Revoked(Revocation {
                user_id: "bob".into(),
                token_id: None,
                revoked_at_ms: 5,
                reason: RevocationReason::SignedOutEverywhere,
            }))
        );
        assert!(matches!(
            parse(b"r:5:evicted:bob:t"),
            Some(Parsed::Revoked(Revocation {
                reason: RevocationReason::Evicted,
                ..
            }))
        ));
        assert_eq!(parse(b"h:00ff"), Some(Parsed::Heartbeat));
        assert_eq!(
            parse(b"x:1700000000123:alice:t-1"),
            Some(Parsed::Shortened(Shortened {
                user_id: "alice".into(),
                token_id: "t-1".into(),
                expires_at_ms: 1_700_000_000_123,
            }))
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        for bad in [
            &b""[..],
            b"q:1:revoked:a:b",
            b"x:1:revoked:a:b",
            b"x:1:a:",
            b"x:1::b",
            b"x:abc:a:b",
            b"x:1:a",
            b"r:abc:revoked:a:b",
            b"r:1:unknown:a:b",
            b"r:1:revoked::b",
            b"r:1:revoked:a",
            b"r:1:revoked:a:b:c",
            b"r:-1:revoked:a:b",
            b"\xff",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_beat_completes_when_every_master_sent_it_back() {
        let mut beats = Beats::new(3);
        assert_eq!(beats.arrived(1, 0, None), None);
        assert_eq!(
            beats.arrived(1, 0, None),
            None,
            "a copy from the same master twice"
        );
        assert_eq!(beats.arrived(1, 2, None), None);
        assert_eq!(beats.arrived(1, 1, None), Some(None));
        // One master short: never complete; a later complete beat is.
        assert_eq!(beats.arrived(2, 0, None), None);
        assert_eq!(beats.arrived(2, 1, None), None);
        for master in 0..3 {
            assert_eq!(beats.arrived(3, master, None).is_some(), master == 2);
        }
        // A straggler of an older beat does not count.
        assert_eq!(beats.arrived(2, 2, None), None);
        for seq in 10..100 {
            beats.arrived(seq, 0, None);
        }
        assert!(beats.pending.len() <= Beats::KEPT);
    }

    /// A complete beat carries the latest of its masters' clocks: the one
    /// that makes a receiver's estimate of Redis's now err late, never early
    /// (a cache then stops answering a session sooner, not later).
    #[test]
    fn a_complete_beat_keeps_the_latest_masters_clock() {
        let seen = Instant::now();
        let at = |ms: u64| RedisClock {
            at: UNIX_EPOCH + Duration::from_millis(ms),
            seen,
        };
        let mut beats = Beats::new(3);
        assert_eq!(beats.arrived(7, 0, Some(at(1_000))), None);
        assert_eq!(beats.arrived(7, 1, Some(at(3_000))), None);
        assert_eq!(beats.arrived(7, 2, Some(at(2_000))), Some(Some(at(3_000))));
        // A later arrival with an earlier clock is judged by its estimate.
        let later = RedisClock {
            at: UNIX_EPOCH + Duration::from_millis(3_000),
            seen: seen + Duration::from_secs(1),
        };
        assert_eq!(at(3_000).latest(Some(later)), at(3_000));
        assert_eq!(later.latest(Some(at(3_500))), at(3_500));
    }

    /// Its own beats are read with their time, and without one (the format
    /// before the time was added); other processes' beats, old and new, are
    /// heartbeats of theirs.
    #[test]
    fn own_beats_parse_with_and_without_their_time() {
        assert_eq!(
            own_beat(b"h:ab:42:1:1700000000123", "h:ab:"),
            Some(OwnBeat {
                seq: 42,
                master: 1,
                redis_time: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            })
        );
        assert_eq!(
            own_beat(b"h:ab:42:1", "h:ab:"),
            Some(OwnBeat {
                seq: 42,
                master: 1,
                redis_time: None,
            })
        );
        assert_eq!(own_beat(b"h:cd:42:1:5", "h:ab:"), None);
        assert_eq!(own_beat(b"h:ab:42", "h:ab:"), None);
        assert_eq!(own_beat(b"h:ab:42:1:soon", "h:ab:"), None);
        for other in [&b"h:cd"[..], b"h:cd:42:1", b"h:cd:42:1:1700000000123"] {
            assert_eq!(parse(other), Some(Parsed::Heartbeat));
        }
    }

    #[test]
    fn copies_of_a_revocation_pass_once() {
        let mut recent = Recent::default();
        // One publish, arriving over three masters' connections.
        assert!(recent.first_time(b"r:1:revoked:u:t", 0));
        assert!(!recent.first_time(b"r:1:revoked:u:t", 2));
        assert!(!recent.first_time(b"r:1:revoked:u:t", 1));
        assert!(recent.first_time(b"r:1:revoked:u:t2", 1));
    }

    /// Two publishes of one text (two user-wide revocations in one Redis
    /// millisecond) both pass, in any order of their copies; their copies
    /// do not; and on one connection (standalone) every publish passes.
    #[test]
    fn two_publishes_of_one_text_pass_twice() {
        let text = b"r:5:signed_out_everywhere:u:";
        for order in [[0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]] {
            let mut recent = Recent::default();
            let passed = order
                .iter()
                .filter(|source| recent.first_time(text, **source))
                .count();
            assert_eq!(passed, 2, "{order:?}");
        }
        let mut recent = Recent::default();
        assert!(recent.first_time(text, 0));
        assert!(recent.first_time(text, 0));
        assert!(recent.first_time(text, 0));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let first = backoff.next();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
        for _ in 0..20 {
            backoff.next();
        }
        let late = backoff.next();
        assert!((Duration::from_millis(2_500)..=Duration::from_millis(5_000)).contains(&late));
    }
}
