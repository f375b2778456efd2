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
//! - `h:<instance>`: a heartbeat, published by each server process for itself.
//!
//! # Why heartbeats go through Redis
//!
//! A subscription can die without its TCP connection closing (a partitioned
//! or failed-over master). Each process publishes its own heartbeat on the
//! channel and forwards a heartbeat to its streams only when that message
//! comes back through its subscription, so streams stop beating exactly when
//! revocations may have stopped flowing; a subscription that misses its own
//! heartbeats is dropped and made again. Every (re)subscription is announced
//! to the streams as a reset, because anything published while it was down
//! may have been missed.
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
//! subscription time; after a failover the old connection breaks (or misses
//! its heartbeats) and the next subscription goes to the new master. Cluster:
//! the first seed node that answers; classic (not sharded) pub/sub messages
//! are broadcast over the cluster bus, so a revocation published by a script
//! on any master reaches a subscriber on any node.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::broadcast, time::Instant};
use tokio_stream::StreamExt;

use super::{Store, connection};
use crate::{
    error::Error,
    metrics::{REVOCATION_EVENTS, REVOCATION_SUBSCRIPTION_UP},
    model::{Revocation, RevocationReason},
};

/// What the subscriber tells every stream.
#[derive(Clone, Debug)]
pub enum RevocationEvent {
    /// The subscription was (re)established: anything before may have been
    /// missed.
    Reset,
    /// This process's heartbeat came back through the subscription.
    Heartbeat,
    /// A session, or every session of a user, ended.
    Revoked(Arc<Revocation>),
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
    /// subscription; `None` until the first one did (or since it was lost).
    proven: Arc<Mutex<Option<Instant>>>,
    /// REVOCATION_HEARTBEAT_MS.
    beat: Duration,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("Hub").field("running", &running).finish()
    }
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
            let subscribed = lock(&running.proven).is_some_and(|at| at.elapsed() < fresh);
            return RevocationFeed { events, subscribed };
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

    /// The subscriber: subscribe, prove the subscription with a heartbeat
    /// that comes back through every master, announce a reset, then forward
    /// what arrives; on loss (or heartbeats that stop coming back complete)
    /// subscribe again, starting from the next node, with backoff.
    async fn subscribe_revocations(
        self,
        events: broadcast::Sender<RevocationEvent>,
        proven: Arc<Mutex<Option<Instant>>>,
    ) {
        let settings = &self.shared.settings;
        let beat = settings.revocation_heartbeat;
        // A heartbeat that has not come back after this long is lost: three
        // beats, and never less than one beat plus a Redis timeout.
        let patience = (beat * 3).max(beat + settings.timeout);
        let channel = self.revocation_channel().to_owned();
        let own = format!("h:{:016x}:", super::random_u64());
        let mut backoff = Backoff::new();
        let mut attempt = 0usize;
        metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);

        loop {
            if self.retire_if_unwatched(&events) {
                return;
            }
            let subscribed = async {
                let mut pubsub = connection::pubsub(settings, attempt).await?;
                tokio::time::timeout(settings.timeout, pubsub.subscribe(&channel))
                    .await
                    .map_err(|_| Error::Timeout(settings.timeout))??;
                Ok::<_, Error>(pubsub)
            };
            let pubsub = match subscribed.await {
                Ok(pubsub) => pubsub,
                Err(err) => {
                    if backoff.attempts == 0 {
                        tracing::warn!(error = %err, "revocation stream: cannot subscribe to Redis; retrying");
                    }
                    attempt = attempt.wrapping_add(1);
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
            let mut messages = pubsub.into_on_message();

            // Heartbeats are published by their own task so that a slow
            // PUBLISH never holds up reading the subscription; it reports how
            // many masters published each one, so a beat counts only once a
            // copy came back from each.
            let (published_tx, mut published) = tokio::sync::mpsc::channel(16);
            let publisher = AbortOnDrop(tokio::spawn(self.clone().publish_heartbeats(
                channel.clone(),
                own.clone(),
                beat,
                published_tx,
            )));
            let mut beats = Beats::default();
            let mut last_beat: Option<Instant> = None;
            let subscribed_at = Instant::now();
            let mut tick = tokio::time::interval(beat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let lost = loop {
                let completed = tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else {
                            break "the connection closed";
                        };
                        let payload = message.get_payload_bytes();
                        if let Some(seq) = own_beat(payload, &own) {
                            beats.arrived(seq)
                        } else {
                            match parse(payload) {
                                Some(Parsed::Revoked(revocation)) => {
                                    metrics::counter!(REVOCATION_EVENTS, "kind" => "revocation").increment(1);
                                    let _ = events.send(RevocationEvent::Revoked(Arc::new(revocation)));
                                }
                                // Another process's heartbeat.
                                Some(Parsed::Heartbeat) => {}
                                None => {
                                    metrics::counter!(REVOCATION_EVENTS, "kind" => "malformed").increment(1);
                                    tracing::debug!(len = payload.len(), "revocation stream: ignored a malformed message");
                                }
                            }
                            false
                        }
                    }
                    Some((seq, masters)) = published.recv() => beats.published(seq, masters),
                    _ = tick.tick() => {
                        if self.retire_if_unwatched(&events) {
                            *lock(&proven) = None;
                            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
                            return;
                        }
                        if last_beat.unwrap_or(subscribed_at).elapsed() > patience {
                            break "its heartbeats stopped coming back";
                        }
                        false
                    }
                };
                if completed {
                    let now = Instant::now();
                    *lock(&proven) = Some(now);
                    if last_beat.replace(now).is_none() {
                        // Proven: what is published from now on arrives.
                        if backoff.attempts > 0 || attempt > 0 {
                            tracing::info!("revocation stream: subscribed to Redis again");
                        }
                        backoff = Backoff::new();
                        metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(1);
                        metrics::counter!(REVOCATION_EVENTS, "kind" => "reset").increment(1);
                        let _ = events.send(RevocationEvent::Reset);
                    } else {
                        let _ = events.send(RevocationEvent::Heartbeat);
                    }
                }
            };
            drop(publisher);
            *lock(&proven) = None;
            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
            tracing::warn!(
                "revocation stream: lost the Redis subscription ({lost}); streams stop beating until it is back, then reset"
            );
            // The next subscription starts from the next seed or sentinel,
            // after a pause when this one never worked.
            attempt = attempt.wrapping_add(1);
            if last_beat.is_none() {
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }

    /// Publishes a numbered heartbeat (`<own><seq>`) on `channel` every
    /// `every` through every master, as the scripts publish revocations, and
    /// reports each one that every master published with their number.
    async fn publish_heartbeats(
        self,
        channel: String,
        own: String,
        every: Duration,
        published: tokio::sync::mpsc::Sender<(u64, usize)>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused_logged = false;
        for seq in 0u64.. {
            tick.tick().await;
            let beat = format!("{own}{seq}");
            let sent = async {
                let mut op = self.op("publish_heartbeat").await?;
                op.publish_on_every_master(&channel, &beat).await
            };
            // A failed beat shows as a missing heartbeat; the store records
            // the error. A refusal is a misconfiguration worth saying once.
            match sent.await {
                Ok(masters) => {
                    if published.send((seq, masters)).await.is_err() {
                        return;
                    }
                }
                Err(Error::Internal(cause)) if !refused_logged => {
                    refused_logged = true;
                    tracing::error!(
                        channel = %channel,
                        error = %cause,
                        "revocation stream: Redis refused a PUBLISH on the revocation channel; \
                         revocations fail the same way: grant the Redis user `&<channel>`"
                    );
                }
                Err(_) => {}
            }
        }
    }
}

/// The sequence number of one of this process's heartbeats (`own` is its
/// `h:<instance>:` prefix).
fn own_beat(payload: &[u8], own: &str) -> Option<u64> {
    let seq = payload.strip_prefix(own.as_bytes())?;
    std::str::from_utf8(seq).ok()?.parse().ok()
}

/// Heartbeats in flight: how many masters published each (once known) and
/// how many copies came back. A beat is complete when a copy came back from
/// every master that published it.
#[derive(Default)]
struct Beats {
    /// seq -> (masters that published it, copies arrived).
    pending: std::collections::BTreeMap<u64, (Option<usize>, usize)>,
}

impl Beats {
    /// Most beats remembered; older ones are given up.
    const KEPT: usize = 16;

    fn published(&mut self, seq: u64, masters: usize) -> bool {
        self.pending.entry(seq).or_default().0 = Some(masters);
        self.complete(seq)
    }

    fn arrived(&mut self, seq: u64) -> bool {
        self.pending.entry(seq).or_default().1 += 1;
        self.complete(seq)
    }

    fn complete(&mut self, seq: u64) -> bool {
        while self.pending.len() > Self::KEPT {
            self.pending.pop_first();
        }
        match self.pending.get(&seq) {
            Some((Some(masters), arrived)) if arrived >= masters => {
                // Older beats are moot once a later one completed.
                self.pending = self.pending.split_off(&(seq + 1));
                true
            }
            _ => false,
        }
    }
}

/// A decoded channel message.
#[derive(Debug, PartialEq)]
enum Parsed {
    Revoked(Revocation),
    Heartbeat,
}

fn parse(payload: &[u8]) -> Option<Parsed> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.starts_with("h:") {
        return Some(Parsed::Heartbeat);
    }
    let mut parts = text.strip_prefix("r:")?.splitn(4, ':');
    let revoked_at_ms = parts.next()?.parse().ok()?;
    let reason = match parts.next()? {
        "revoked" => RevocationReason::Revoked,
        "signed_out_everywhere" => RevocationReason::SignedOutEverywhere,
        "evicted" => RevocationReason::Evicted,
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
    }

    #[test]
    fn refuses_malformed_messages() {
        for bad in [
            &b""[..],
            b"x:1:revoked:a:b",
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
    fn a_beat_completes_when_every_master_sent_a_copy_back() {
        let mut beats = Beats::default();
        // The copies may come back before the publisher's count.
        assert!(!beats.arrived(1));
        assert!(!beats.arrived(1));
        assert!(!beats.published(1, 3));
        assert!(beats.arrived(1));
        // One master short: never complete; a later complete beat is.
        assert!(!beats.published(2, 3));
        assert!(!beats.arrived(2));
        assert!(!beats.arrived(2));
        assert!(!beats.published(3, 1));
        assert!(beats.arrived(3));
        // A straggler of an older beat does not count.
        assert!(!beats.arrived(2));
        assert!(beats.pending.len() <= Beats::KEPT);
        for seq in 10..100 {
            beats.arrived(seq);
        }
        assert!(beats.pending.len() <= Beats::KEPT);
        assert_eq!(own_beat(b"h:ab:42", "h:ab:"), Some(42));
        assert_eq!(own_beat(b"h:cd:42", "h:ab:"), None);
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
