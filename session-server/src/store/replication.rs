//! Revocations that survive a failover (REVOCATION_MIN_REPLICAS): after a
//! call that ends sessions early, wait until that many replicas of the
//! user's master acknowledged its writes, or answer
//! [`Error::NotReplicated`].
//!
//! Redis's `WAIT n timeout` answers how many replicas acknowledged every
//! write *the connection it is sent on* made before it: Redis 7.0's `call()`
//! sets the client's `woff` to `master_repl_offset` after each of its
//! commands that propagated, and `WAIT` counts the replicas whose
//! acknowledged offset reached `woff`. It also blocks that connection until
//! it answers. The store multiplexes every call on a few shared connections
//! (`connection`), so a `WAIT` there would stall every call queued behind it
//! (GetSession included) for up to REVOCATION_REPLICA_TIMEOUT_MS; and the
//! revocation's own `woff` is that shared connection's.
//!
//! So the wait runs on a connection of its own (a pool of them, at most
//! REDIS_POOL_SIZE; on a cluster, per master). It must reach the master that
//! ran the revocation, and during a failover it may not: an old master still
//! answering as one keeps the revocation while a fresh wait connection
//! reaches the new master, whose replicas would acknowledge anything but the
//! revocation. So the revocation's own connection first writes a proof in
//! the user's slot (`replicated:{user}:<random>`, expiring within
//! REDIS_TIMEOUT_MS), after the revocation on the same connection, so it
//! lands wherever the revocation did; the wait connection's one small write
//! (`replication_proof.lua`) then renews the proof's expiry only where the
//! proof exists, answering UNAVAILABLE where it does not, and then `WAIT`s.
//! The replication stream is one ordered stream per master, and the
//! revocation's script had propagated before its reply reached us, so a
//! replica that acknowledged the small write acknowledged the revocation:
//! `WAIT` on the small write's offset covers every earlier write of every
//! connection. On a cluster the small write is in the user's slot, so it
//! lands on the master that ran the revocation, or is redirected (MOVED) to
//! the one that serves the slot now.
//!
//! Sentinel and Cluster promote the replica with the most data, so a
//! revocation acknowledged by a replica survives its master's failover (best
//! effort, as the `WAIT` docs say: a partition can still lose it).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use redis::{FromRedisValue, Value, aio::MultiplexedConnection};
use tokio::time::{Instant, timeout_at};

use super::{
    Store,
    connection::{Backend, cluster_node_connection},
    key, millis,
    op::{Link, Op},
    record_error,
};
use crate::{
    error::{Contention, Error},
    model::UserId,
};

/// The store operation name of a replication wait: its Redis round trips'
/// latency and errors are recorded under it.
const OP: &str = "replication_wait";

/// A cluster's connections for replication waits: per master, idle ones
/// kept for reuse and at most REDIS_POOL_SIZE waits at once (so a master
/// whose replicas do not answer, its waits each holding a permit until
/// REVOCATION_REPLICA_TIMEOUT_MS, never holds up the waits on the others);
/// and which master serves which slot, as `CLUSTER SLOTS` last said.
pub(crate) struct ClusterWaits {
    size: usize,
    permits: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    idle: Mutex<HashMap<String, Vec<MultiplexedConnection>>>,
    /// (first slot, last slot, master "host:port"); empty until read, and
    /// after a redirection or a failed wait.
    slots: Mutex<Vec<(u16, u16, String)>>,
}

impl std::fmt::Debug for ClusterWaits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWaits").finish_non_exhaustive()
    }
}

impl ClusterWaits {
    /// No connection yet; at most `size` waits at once.
    pub(super) fn new(size: u32) -> Self {
        Self {
            size: usize::try_from(size).unwrap_or(1).max(1),
            permits: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            slots: Mutex::new(Vec::new()),
        }
    }

    /// `master`'s wait permits.
    fn permits(&self, master: &str) -> Arc<tokio::sync::Semaphore> {
        let mut permits = self.permits.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            permits
                .entry(master.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.size))),
        )
    }

    fn master_of(&self, slot: u16) -> Option<String> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, master)| master.clone())
    }

    fn forget_slots(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn take(&self, master: &str) -> Option<MultiplexedConnection> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(master)?
            .pop()
    }

    /// Drops the kept connections to `master`: one broke, so the others
    /// (as old) likely did too.
    fn forget(&self, master: &str) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(master);
    }

    fn put(&self, master: String, conn: MultiplexedConnection) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(master)
            .or_default()
            .push(conn);
    }
}

impl Store {
    /// `P replicated:{user}:<proof>`: the proof a revocation's connection
    /// writes in the user's slot for its replication wait (see the module
    /// docs).
    pub(crate) fn replicated_key(&self, user: &UserId, proof: &str) -> String {
        key(&[self.prefix(), "replicated:{", user.as_str(), "}:", proof])
    }

    /// With REVOCATION_MIN_REPLICAS > 0, waits until that many replicas of
    /// `user`'s master acknowledged every write made there so far (this
    /// call's included), within REVOCATION_REPLICA_TIMEOUT_MS; records the
    /// wait. Called after each write that ends sessions early, and after
    /// the answers a retry of one gets (it must wait again).
    ///
    /// # Errors
    ///
    /// [`Error::NotReplicated`] when fewer acknowledged in time; Redis
    /// failures as [`Error::Unavailable`], [`Error::Timeout`] or
    /// [`Error::Busy`] (every wait connection in use).
    pub(super) async fn replicate(&self, mut op: Op, user: &UserId) -> Result<(), Error> {
        let wanted = self.settings().revocation_min_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let start = std::time::Instant::now();
        // The proof, on the revocation's own connection (see the module
        // docs); then that connection goes back before the wait.
        let proof = crate::model::FamilyId::generate()?;
        let key = self.replicated_key(user, proof.as_str());
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(1)
            .arg("PX")
            .arg(millis(self.settings().timeout).max(1));
        op.query::<()>(&set).await?;
        drop(op);
        let outcome = match self.acknowledgements(&key, wanted).await {
            Ok(acked) if acked >= wanted => Ok(()),
            Ok(acked) => {
                metrics::counter!(crate::metrics::REVOCATIONS_UNREPLICATED).increment(1);
                Err(record_error(
                    OP,
                    Error::NotReplicated {
                        acked,
                        wanted,
                        timeout: self.settings().revocation_replica_timeout,
                    },
                ))
            }
            Err(err) => Err(err),
        };
        let label = match &outcome {
            Ok(()) => "acked",
            Err(Error::NotReplicated { .. }) => "not_replicated",
            Err(_) => "failed",
        };
        metrics::histogram!(crate::metrics::REPLICATION_WAIT, "outcome" => label)
            .record(start.elapsed().as_secs_f64());
        outcome
    }

    /// The small write (renewing the proof `key`, where it exists) and
    /// `WAIT wanted timeout` on a wait connection to the user's master;
    /// `WAIT`'s answer.
    async fn acknowledgements(&self, key: &str, wanted: u32) -> Result<u32, Error> {
        let settings = self.settings();
        let deadline = Instant::now() + settings.timeout;
        let mut renew = self.shared.scripts.replication_proof.prepare_invoke();
        renew.key(key).arg(millis(settings.timeout).max(1));
        let absent = || {
            record_error(
                OP,
                Error::Unavailable(
                    "the revocation is applied, but the Redis master this replication wait \
                     reached does not hold it (a failover is under way); retrying is safe"
                        .into(),
                ),
            )
        };
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted)
            .arg(millis(settings.revocation_replica_timeout));
        let op = |link| {
            let (Backend::Pool { durations, .. } | Backend::Cluster { durations, .. }) =
                &self.shared.backend;
            Op::new(link, deadline, settings.timeout, OP, durations.of(OP))
        };
        match &self.shared.backend {
            Backend::Pool { waits, .. } => {
                let pooled = loop {
                    match timeout_at(deadline, waits.get()).await {
                        Ok(Ok(pooled)) if pooled.broken.load(Ordering::Relaxed) => drop(pooled),
                        Ok(Ok(pooled)) => break pooled,
                        Ok(Err(bb8::RunError::User(err))) => {
                            return Err(record_error(OP, err.into()));
                        }
                        Ok(Err(bb8::RunError::TimedOut)) | Err(_) => {
                            let state = waits.state();
                            let err = if state.idle_connections == 0
                                && state.connections >= settings.pool_size
                            {
                                Error::Busy(Contention::Pool {
                                    timeout: settings.timeout,
                                    size: settings.pool_size,
                                })
                            } else {
                                Error::Timeout(settings.timeout)
                            };
                            return Err(record_error(OP, err));
                        }
                    }
                };
                // The checkout is held until `WAIT` answers: this connection
                // carries one wait at a time.
                let mut op = op(Link::Shared {
                    conn: pooled.inner.clone(),
                    broken: Arc::clone(&pooled.broken),
                });
                if op.invoke::<u8>(&renew).await? == 0 {
                    return Err(absent());
                }
                op.query(&wait).await
            }
            Backend::Cluster { waits, .. } => {
                let slot = slot(key);
                let mut master = match waits.master_of(slot) {
                    Some(master) => master,
                    None => {
                        self.read_slots(waits).await?;
                        waits.master_of(slot).ok_or_else(|| {
                            Error::Unavailable(format!("no master serves slot {slot}").into())
                        })?
                    }
                };
                // One more attempt follows a redirection (the slot moved: a
                // failover, a resharding, since the table was read) or
                // replaces a kept connection that broke while idle (its
                // master restarted or was demoted).
                for _ in 0..2 {
                    let _permit = timeout_at(deadline, waits.permits(&master).acquire_owned())
                        .await
                        .map_err(|_| {
                            record_error(
                                OP,
                                Error::Busy(Contention::Pool {
                                    timeout: settings.timeout,
                                    size: settings.pool_size,
                                }),
                            )
                        })?
                        .map_err(|_| Error::Internal("a wait semaphore is never closed".into()))?;
                    let (conn, kept) = match waits.take(&master) {
                        Some(conn) => (conn, true),
                        None => (
                            timeout_at(
                                deadline,
                                cluster_node_connection(settings, &self.shared.secrets, &master),
                            )
                            .await
                            .map_err(|_| record_error(OP, Error::Timeout(settings.timeout)))?
                            .map_err(|err| record_error(OP, err))?,
                            false,
                        ),
                    };
                    let broken = Arc::new(AtomicBool::new(false));
                    let mut op = op(Link::Shared {
                        conn: conn.clone(),
                        broken: Arc::clone(&broken),
                    });
                    let renewed = op.invoke::<u8>(&renew).await;
                    if let Ok(0) = renewed {
                        if !broken.load(Ordering::Relaxed) {
                            waits.put(master, conn);
                        }
                        return Err(absent());
                    }
                    if let Err(err) = renewed {
                        waits.forget_slots();
                        let Some(moved) = redirection(&err) else {
                            if kept && broken.load(Ordering::Relaxed) {
                                waits.forget(&master);
                                continue;
                            }
                            return Err(err);
                        };
                        if !broken.load(Ordering::Relaxed) {
                            waits.put(master, conn);
                        }
                        master = moved;
                        continue;
                    }
                    let acked = op.query(&wait).await;
                    if acked.is_err() {
                        waits.forget_slots();
                    }
                    if !broken.load(Ordering::Relaxed) {
                        waits.put(master, conn);
                    }
                    return acked;
                }
                Err(Error::Unavailable(
                    "the user's master changed twice during a replication wait; retry".into(),
                ))
            }
        }
    }

    /// Reads `CLUSTER SLOTS` into `waits`, through the shared cluster
    /// connection (an ordinary command that blocks nothing).
    async fn read_slots(&self, waits: &ClusterWaits) -> Result<(), Error> {
        let reply: Value = self
            .op("cluster_slots")
            .await?
            .query(redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        let slots = parse_slots(reply)?;
        *waits.slots.lock().unwrap_or_else(PoisonError::into_inner) = slots;
        Ok(())
    }

    /// Replicas connected to each master (`connected_slaves` of `INFO
    /// replication`): `None` names the one master of standalone and
    /// sentinel modes, `Some("host:port")` each master of a cluster.
    ///
    /// # Errors
    ///
    /// As [`Store::maxmemory_policies`](super::Store::maxmemory_policies).
    pub async fn connected_replicas(&self) -> Result<Vec<(Option<String>, u32)>, Error> {
        let mut op = self.op("connected_replicas").await?;
        let reply: Value = op.query(redis::cmd("INFO").arg("replication")).await?;
        let count = |info: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix("connected_slaves:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .ok_or_else(|| Error::Internal("INFO replication has no connected_slaves".into()))
        };
        let text = |value: Value| {
            String::from_redis_value(value).map_err(|e| Error::Internal(Box::new(e)))
        };
        match reply {
            Value::Map(nodes) => {
                let mut counts = nodes
                    .into_iter()
                    .map(|(node, info)| Ok((Some(text(node)?), count(&text(info)?)?)))
                    .collect::<Result<Vec<_>, Error>>()?;
                counts.sort();
                Ok(counts)
            }
            single => Ok(vec![(None, count(&text(single)?)?)]),
        }
    }
}

/// The master a MOVED answer redirects to, "host:port".
fn redirection(err: &Error) -> Option<String> {
    let Error::Unavailable(source) = err else {
        return None;
    };
    let (host, port) = source
        .downcast_ref::<redis::RedisError>()?
        .redirect_node()?;
    Some(format!("{host}:{port}"))
}

/// `CLUSTER SLOTS`' ranges and their masters.
fn parse_slots(reply: Value) -> Result<Vec<(u16, u16, String)>, Error> {
    let malformed = || Error::Internal("CLUSTER SLOTS: an unexpected reply".into());
    let Value::Array(ranges) = reply else {
        return Err(malformed());
    };
    let mut slots = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(range) = range else {
            return Err(malformed());
        };
        let mut range = range.into_iter();
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (range.next(), range.next(), range.next())
        else {
            return Err(malformed());
        };
        let mut master = master.into_iter();
        let (Some(host), Some(Value::Int(port))) = (master.next(), master.next()) else {
            return Err(malformed());
        };
        let host = String::from_redis_value(host).map_err(|_| malformed())?;
        let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
            return Err(malformed());
        };
        slots.push((first, last, format!("{host}:{port}")));
    }
    Ok(slots)
}

/// The Redis Cluster slot of a key: CRC16-XMODEM of the hash tag (the text
/// inside the first `{...}` when non-empty) or of the whole key, mod 16384.
pub(super) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Which masters have fewer connected replicas than REVOCATION_MIN_REPLICAS
/// (every revocation on them answers UNAVAILABLE), as last logged: the
/// readiness loop logs at ERROR once per change, not once per tick.
#[derive(Debug, Default)]
pub struct ReplicaShortfall {
    last: Option<Vec<(Option<String>, u32)>>,
}

impl ReplicaShortfall {
    /// Takes a reading of [`Store::connected_replicas`]; returns the masters
    /// short of `wanted` replicas when that set (or a short master's count)
    /// changed since the last reading, `Some(empty)` when the last short
    /// master recovered, `None` when nothing changed.
    pub fn observe(
        &mut self,
        replicas: &[(Option<String>, u32)],
        wanted: u32,
    ) -> Option<Vec<(Option<String>, u32)>> {
        let short: Vec<_> = replicas
            .iter()
            .filter(|(_, connected)| *connected < wanted)
            .cloned()
            .collect();
        let changed = match &self.last {
            None => !short.is_empty(),
            Some(last) => *last != short,
        };
        self.last = Some(short.clone());
        changed.then_some(short)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Settings;

    fn user(id: &str) -> UserId {
        UserId::parse("user_id", id.into()).unwrap()
    }

    /// The shortfall is reported on its first reading and on each change,
    /// not on every tick; its end is reported once.
    #[test]
    fn a_shortfall_is_logged_once_per_change() {
        let mut shortfall = ReplicaShortfall::default();
        let healthy = [(None, 1)];
        assert_eq!(shortfall.observe(&healthy, 1), None);
        assert_eq!(shortfall.observe(&[(None, 0)], 1), Some(vec![(None, 0)]));
        assert_eq!(shortfall.observe(&[(None, 0)], 1), None);
        assert_eq!(shortfall.observe(&healthy, 1), Some(vec![]));
        assert_eq!(shortfall.observe(&healthy, 1), None);
        let mut shortfall = ReplicaShortfall::default();
        let a = Some("a:1".to_owned());
        let b = Some("b:1".to_owned());
        assert_eq!(
            shortfall.observe(&[(a.clone(), 0), (b.clone(), 2)], 1),
            Some(vec![(a.clone(), 0)])
        );
        assert_eq!(
            shortfall.observe(&[(a.clone(), 0), (b.clone(), 0)], 1),
            Some(vec![(a, 0), (b, 0)])
        );
    }

    #[test]
    fn cluster_slots_are_parsed() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(5460),
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(30001),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])]);
        assert_eq!(
            parse_slots(reply).unwrap(),
            vec![(0, 5460, "127.0.0.1:30001".to_owned())]
        );
        assert!(parse_slots(Value::Int(1)).is_err());
    }

    /// The local Redis (6379) has no replica: with REVOCATION_MIN_REPLICAS
    /// 1 a wait answers NotReplicated (0 of 1) after about the replica
    /// timeout, and GetSession-style reads on the shared connections are
    /// not held up meanwhile; with 0 no wait is made.
    #[tokio::test]
    async fn without_replicas_a_wait_answers_not_replicated_and_blocks_no_read() {
        let store = Store::new(Settings {
            revocation_min_replicas: 1,
            revocation_replica_timeout: Duration::from_millis(300),
            pool_size: 1,
            ..Settings::for_tests("redis://127.0.0.1:6379")
        })
        .unwrap();
        let someone = user("replication-test");
        let start = std::time::Instant::now();
        let waiting = {
            let store = store.clone();
            let someone = someone.clone();
            tokio::spawn(async move {
                let op = store.op("test").await.unwrap();
                store.replicate(op, &someone).await
            })
        };
        // While the wait blocks its connection, the one shared connection
        // answers at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let read = std::time::Instant::now();
        store.ping().await.unwrap();
        assert!(
            read.elapsed() < Duration::from_millis(100),
            "a read waited {:?} behind the WAIT",
            read.elapsed()
        );
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotReplicated {
                    acked: 0,
                    wanted: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "WAIT waited out REVOCATION_REPLICA_TIMEOUT_MS"
        );

        let store = Store::new(Settings::for_tests("redis://127.0.0.1:6379")).unwrap();
        let op = store.op("test").await.unwrap();
        store.replicate(op, &someone).await.unwrap();
    }

    /// A wait that reaches a master without the revocation's proof (not the
    /// master that ran it: a failover under way) answers UNAVAILABLE at once,
    /// writing nothing, rather than waiting for replicas of the wrong master.
    #[tokio::test]
    async fn a_wait_where_the_proof_is_absent_fails_closed() {
        let store = Store::new(Settings {
            revocation_min_replicas: 1,
            ..Settings::for_tests("redis://127.0.0.1:6379")
        })
        .unwrap();
        let key = store.replicated_key(&user("replication-test"), "never-written");
        let err = store.acknowledgements(&key, 1).await.unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(message) if message.to_string().contains("does not hold it")),
            "{err:?}"
        );
        let exists: i64 = store
            .raw_command(redis::cmd("EXISTS").arg(&key))
            .await
            .unwrap();
        assert_eq!(exists, 0, "the renewal wrote nothing");
    }
}
