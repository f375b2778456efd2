//! The revocation channel's subscriber: one task per process while any
//! stream is open. It subscribes on every master, proves the subscription
//! with a heartbeat back from each, announces a reset, forwards what
//! arrives, and subscribes again (with backoff when the last subscription
//! never worked) when a connection closes, the beats stop or the cluster's
//! masters change.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::broadcast, time::Instant};
use tokio_stream::{StreamExt, StreamMap};

use super::{
    Proof, RedisClock, RevocationEvent,
    heartbeats::{Beats, own_beat},
    lock,
    messages::{Parsed, Recent, parse},
};
use crate::{
    error::Error,
    metrics::{REVOCATION_EVENTS, REVOCATION_SUBSCRIPTION_UP},
    store::{Store, connection, random_u64},
};

impl Store {
    /// The subscriber: subscribe (on every master of a cluster), prove the
    /// subscription with a heartbeat that comes back from every master over
    /// that master's own connection, announce a reset, then forward what
    /// arrives; on loss (a connection closed, heartbeats that stop coming
    /// back complete, the cluster's masters changed) subscribe again, with
    /// backoff when the last subscription never worked.
    pub(super) async fn subscribe_revocations(
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
            let own = format!("h:{:016x}:", random_u64());
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
        Duration::from_millis(base / 2 + random_u64() % (base / 2 + 1))
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
