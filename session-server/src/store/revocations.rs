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
    /// Whether the subscription is up right now (a stream opened while it is
    /// down waits for the next reset before its first message).
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("Hub").field("running", &running).finish()
    }
}

/// One stream's view of the revocations: its receiver, and whether the
/// subscription was up when it was opened.
#[derive(Debug)]
pub struct RevocationFeed {
    /// Every event from the moment the stream was opened.
    pub events: broadcast::Receiver<RevocationEvent>,
    /// True when the subscription was up as the receiver was made: the stream
    /// may start with its reset at once. Otherwise the next
    /// [`RevocationEvent::Reset`] is its start.
    pub subscribed: bool,
}

impl Store {
    /// The channel the scripts publish revocations on.
    pub(crate) fn revocation_channel(&self) -> String {
        format!("{}revocations", self.shared.settings.key_prefix)
    }

    /// Opens a feed of revocations, starting the subscriber if no stream had
    /// one running.
    pub fn watch_revocations(&self) -> RevocationFeed {
        use std::sync::atomic::Ordering;
        // A poisoned lock only means a panic elsewhere while holding it; the
        // state is an Option swapped whole, so it is still consistent.
        let mut state = self
            .shared
            .revocations
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = state.as_ref() {
            let events = running.events.subscribe();
            return RevocationFeed {
                events,
                subscribed: running.up.load(Ordering::Acquire),
            };
        }
        let (events, receiver) = broadcast::channel(REVOCATION_BACKLOG);
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        *state = Some(Running {
            events: events.clone(),
            up: Arc::clone(&up),
        });
        tokio::spawn(self.clone().subscribe_revocations(events, up));
        RevocationFeed {
            events: receiver,
            subscribed: false,
        }
    }

    /// Stops the subscriber when no stream is left. Under the hub's lock, so
    /// a stream opened at the same moment either finds it running or starts
    /// a new one.
    fn retire_if_unwatched(&self, events: &broadcast::Sender<RevocationEvent>) -> bool {
        let mut state = self
            .shared
            .revocations
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if events.receiver_count() > 0 {
            return false;
        }
        *state = None;
        true
    }

    /// The subscriber: subscribe, announce a reset, forward what arrives;
    /// on loss (or missed heartbeats) subscribe again, with backoff.
    async fn subscribe_revocations(
        self,
        events: broadcast::Sender<RevocationEvent>,
        up: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::Ordering;
        let settings = &self.shared.settings;
        let beat = settings.revocation_heartbeat;
        // A heartbeat that has not come back after this long is lost: three
        // beats, and never less than one beat plus a Redis timeout.
        let patience = (beat * 3).max(beat + settings.timeout);
        let channel = self.revocation_channel();
        let instance = format!("{:016x}", super::random_u64());
        let own_beat = format!("h:{instance}");
        let mut backoff = Backoff::new();
        metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);

        'subscribe: loop {
            if self.retire_if_unwatched(&events) {
                return;
            }
            let subscribed = tokio::time::timeout(settings.timeout, async {
                let mut pubsub = connection::pubsub(settings).await?;
                pubsub.subscribe(&channel).await.map_err(Error::from)?;
                Ok::<_, Error>(pubsub)
            })
            .await
            .unwrap_or(Err(Error::Timeout(settings.timeout)));
            let pubsub = match subscribed {
                Ok(pubsub) => pubsub,
                Err(err) => {
                    if backoff.attempts == 0 {
                        tracing::warn!(error = %err, "revocation stream: cannot subscribe to Redis; retrying");
                    }
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
            if backoff.attempts > 0 {
                tracing::info!("revocation stream: subscribed to Redis again");
            }
            backoff = Backoff::new();
            let mut messages = pubsub.into_on_message();
            up.store(true, Ordering::Release);
            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(1);
            let _ = events.send(RevocationEvent::Reset);
            metrics::counter!(REVOCATION_EVENTS, "kind" => "reset").increment(1);

            // Heartbeats are published by their own task so that a slow
            // PUBLISH never holds up reading the subscription.
            let publisher = AbortOnDrop(tokio::spawn(self.clone().publish_heartbeats(
                channel.clone(),
                own_beat.clone(),
                beat,
            )));
            let mut last_beat = Instant::now();
            let mut tick = tokio::time::interval(beat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let lost = loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else {
                            break "the connection closed";
                        };
                        let payload = message.get_payload_bytes();
                        if payload == own_beat.as_bytes() {
                            last_beat = Instant::now();
                            let _ = events.send(RevocationEvent::Heartbeat);
                            continue;
                        }
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
                    }
                    _ = tick.tick() => {
                        if self.retire_if_unwatched(&events) {
                            up.store(false, Ordering::Release);
                            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
                            return;
                        }
                        if last_beat.elapsed() > patience {
                            break "its heartbeats stopped coming back";
                        }
                    }
                }
            };
            drop(publisher);
            up.store(false, Ordering::Release);
            metrics::gauge!(REVOCATION_SUBSCRIPTION_UP).set(0);
            tracing::warn!(
                "revocation stream: lost the Redis subscription ({lost}); streams stop beating until it is back, then reset"
            );
            continue 'subscribe;
        }
    }

    /// Publishes `beat` on `channel` every `every`, through the store's own
    /// connection, as revocations are.
    async fn publish_heartbeats(self, channel: String, beat: String, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // On Cluster a keyless PUBLISH goes to a random node, perhaps one
            // that just failed: one more try (likely elsewhere) before the
            // beat is counted lost. A failure shows as a missing heartbeat;
            // the store records it.
            for _ in 0..2 {
                let published = async {
                    let mut op = self.op("publish_heartbeat").await?;
                    op.query::<i64>(redis::cmd("PUBLISH").arg(&channel).arg(&beat))
                        .await
                };
                if published.await.is_ok() {
                    break;
                }
            }
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
