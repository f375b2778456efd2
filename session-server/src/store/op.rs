//! One store operation, [`Op`]: the connection it uses ([`Link`], pooled or
//! cluster), the deadline that bounds all its round trips, and its Redis
//! latency histogram ([`OpDurations`]), and, with traces on, its span
//! (a child of the RPC's, only for a sampled RPC: see [`crate::trace`]; on
//! a cluster it names the slot of the operation's key, see [`key_slot`] for
//! why not its master). `connection` makes them.

use std::{
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics::Histogram;
use redis::{
    FromRedisValue, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
};
use tokio::time::{Instant, timeout_at};

use super::{connection::split_host_port, record_error};
use crate::error::{Contention, Error};

/// The Redis latency histogram of each store operation, looked up in the
/// metrics registry once per store rather than on every round trip (the
/// lookup hashes the label set and takes a lock), as observe.rs does for the
/// RPC series. Per store, not per process: a handle is bound to the recorder
/// in force when it is made.
///
/// Filled as operations first run, so no list of operation names is kept:
/// a new `op("...")` gets its slot on its first call. The slots fill in
/// order, one at a time under `filling`, and are never emptied, so a reader
/// scans them without a lock and stops at the first empty one; names are
/// string literals, so a hit is nearly always a pointer comparison.
pub(super) struct OpDurations {
    /// Each operation's name and histogram, in order of first use.
    slots: Box<[OnceLock<(&'static str, Histogram)>]>,
    /// Held while a slot is filled, so two first calls of one operation do
    /// not take two slots.
    filling: Mutex<()>,
}

/// Most operation names kept: the store has about fifteen. Past it, an
/// operation's histogram is looked up in the registry on each use, which is
/// only slower, and `every_operation_of_the_store_fits` fails first.
const MAX_OPS: usize = 64;

impl Default for OpDurations {
    fn default() -> Self {
        Self {
            slots: (0..MAX_OPS).map(|_| OnceLock::new()).collect(),
            filling: Mutex::new(()),
        }
    }
}

/// Whether two operation names are one: the same literal is nearly always
/// at the same address, and else the bytes decide.
fn same_op(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl OpDurations {
    /// The histogram of operation `name`.
    pub(super) fn of(&self, name: &'static str) -> Histogram {
        for slot in &self.slots {
            match slot.get() {
                Some((op, histogram)) if same_op(op, name) => return histogram.clone(),
                Some(_) => {}
                None => break,
            }
        }
        self.fill(name)
    }

    /// The histogram of an operation not found by [`OpDurations::of`]:
    /// made, and kept in the next free slot unless another call of the
    /// same operation kept it first.
    #[cold]
    fn fill(&self, name: &'static str) -> Histogram {
        let make = || metrics::histogram!(crate::metrics::REDIS_DURATION, "op" => name);
        // A poisoned lock guards nothing broken: the slots are set whole.
        let _filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in &self.slots {
            match slot.get() {
                Some((op, histogram)) if same_op(op, name) => return histogram.clone(),
                Some(_) => {}
                None => {
                    let histogram = make();
                    // Under `filling`, and seen empty: the set succeeds.
                    let _ = slot.set((name, histogram.clone()));
                    return histogram;
                }
            }
        }
        make()
    }
}

/// One store operation: a pooled connection and the deadline that bounds all
/// of the operation's round trips.
pub(super) struct Op {
    conn: Link,
    deadline: Instant,
    timeout: Duration,
    /// The store operation, as the `op` metric label.
    name: &'static str,
    /// The operation's Redis latency histogram.
    duration: Histogram,
    /// How long the operation has waited for other calls of this process
    /// (not for Redis), and for what: when the deadline passes in a round
    /// trip shorter than that wait, the wait is the cause.
    contended: Option<(Duration, Contention)>,
    /// The operation's span, from its start (the pool checkout) to its
    /// drop; disabled (and free) unless traces are on and the operation
    /// serves an RPC.
    span: tracing::Span,
    /// Round trips made so far, for the span.
    round_trips: u32,
}

/// The span of store operation `name`, child of the current span (the
/// RPC's). Disabled when traces are off, when the RPC is not sampled (it
/// then has no span: see [`crate::trace::sample`]), and for operations
/// outside any RPC (readiness checks, the revocation subscriber's
/// heartbeats), which would otherwise each start a trace of their own. It
/// holds the operation's name and round trips, and on a cluster the key's
/// slot, never a key: keys hold user and token ids.
fn op_span(name: &'static str) -> tracing::Span {
    use tracing::field::Empty;
    if !tracing::enabled!(target: crate::trace::TARGET, tracing::Level::INFO) {
        return tracing::Span::none();
    }
    // Only an RPC's span is a parent: a span the log wants (another
    // target's, at a verbose RUST_LOG) is no trace to join.
    let parent = tracing::Span::current();
    if parent
        .metadata()
        .is_none_or(|meta| meta.target() != crate::trace::TARGET)
    {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: crate::trace::TARGET,
        parent: &parent,
        "redis",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        db.system = "redis",
        db.system.name = "redis",
        db.operation.name = name,
        db.redis.round_trips = Empty,
        db.redis.slot = Empty,
        "error.type" = Empty,
    )
}

impl Op {
    /// An operation on `conn`, bound by `deadline` (its `timeout` from the
    /// start), recording its round trips in `duration` under `name`.
    pub(super) fn new(
        conn: Link,
        deadline: Instant,
        timeout: Duration,
        name: &'static str,
        duration: Histogram,
    ) -> Self {
        Self {
            conn,
            deadline,
            timeout,
            name,
            duration,
            contended: None,
            span: op_span(name),
            round_trips: 0,
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, Error> {
        if !self.span.is_disabled() {
            self.note_slot(key_slot(cmd));
        }
        let start = std::time::Instant::now();
        let result = timeout_at(self.deadline, cmd.query_async(&mut self.conn)).await;
        self.settle(start, result)
    }

    pub(super) async fn invoke<T: FromRedisValue>(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        let start = std::time::Instant::now();
        if self.span.is_disabled() || !matches!(self.conn, Link::Cluster(_)) {
            let result = timeout_at(self.deadline, invocation.invoke_async(&mut self.conn)).await;
            return self.settle(start, result);
        }
        // A traced operation on a cluster: the script's keys are known only
        // to the command redis-rs builds from the invocation, so the slot
        // is read from that command on its way out.
        let mut noted = SlotNoted {
            link: &mut self.conn,
            slot: None,
        };
        let result = timeout_at(self.deadline, invocation.invoke_async(&mut noted)).await;
        let slot = noted.slot;
        self.note_slot(slot);
        self.settle(start, result)
    }

    /// Records in the span the cluster slot the operation's command went
    /// to (see [`key_slot`]); nothing outside a cluster, where one master
    /// serves every key.
    fn note_slot(&self, slot: Option<u16>) {
        if let (Link::Cluster(_), Some(slot)) = (&self.conn, slot) {
            self.span.record("db.redis.slot", i64::from(slot));
        }
    }

    /// The masters of a cluster ("host:port", sorted) as redis-rs sees them
    /// now; `None` in standalone and sentinel modes (one master, reached
    /// through the pool).
    ///
    /// # Errors
    ///
    /// As [`query`](Self::query), and when a master does not answer.
    pub(super) async fn cluster_masters(&mut self) -> Result<Option<Vec<String>>, Error> {
        let Link::Cluster(cluster) = &mut self.conn else {
            return Ok(None);
        };
        // Without a response policy redis-rs answers a map from each master's
        // address to its reply.
        let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let start = std::time::Instant::now();
        let result = timeout_at(
            self.deadline,
            cluster.route_command(redis::cmd("PING"), routing),
        )
        .await;
        match self.settle(start, result)? {
            Value::Map(replies) => {
                let mut masters = Vec::with_capacity(replies.len());
                for (node, reply) in replies {
                    if let Value::ServerError(refusal) = reply {
                        return Err(Error::Internal(
                            format!("PING on {node:?} failed: {refusal:?}").into(),
                        ));
                    }
                    let node = String::from_redis_value(node).map_err(|e| {
                        Error::Internal(format!("a cluster node address: {e}").into())
                    })?;
                    masters.push(node);
                }
                masters.sort();
                Ok(Some(masters))
            }
            other => Err(Error::Internal(
                format!("PING on every master answered {other:?}").into(),
            )),
        }
    }

    /// Runs `cmd`, whose reply is an integer, on one master (`master`,
    /// "host:port", on a cluster; the one master otherwise), and answers
    /// that integer. The revocation stream's heartbeats use it: each must
    /// leave from a given master (see `revocations`), which the cluster's
    /// key-slot routing cannot express.
    ///
    /// # Errors
    ///
    /// As [`query`](Self::query); [`Error::Internal`] when the master
    /// refuses the command (an ACL without the channel, a script error) or
    /// answers something other than an integer.
    pub(super) async fn run_on(
        &mut self,
        master: Option<&str>,
        cmd: &redis::Cmd,
    ) -> Result<i64, Error> {
        let start = std::time::Instant::now();
        let (Link::Cluster(cluster), Some(master)) = (&mut self.conn, master) else {
            let result = timeout_at(self.deadline, cmd.query_async::<i64>(&mut self.conn)).await;
            return self.settle(start, result);
        };
        let (host, port) = split_host_port(master)?;
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        });
        let result = timeout_at(self.deadline, cluster.route_command(cmd.clone(), routing)).await;
        match self.settle(start, result)? {
            Value::Int(reply) => Ok(reply),
            Value::ServerError(refusal) => Err(Error::Internal(
                format!("a command on {master} was refused: {refusal:?}").into(),
            )),
            other => Err(Error::Internal(
                format!("a command on {master} answered {other:?}, not an integer").into(),
            )),
        }
    }

    /// Waits for `turn` (this user's turn among concurrent creates: a wait
    /// for other calls, not for Redis) within the operation's deadline, or
    /// fails with [`Error::Busy`].
    pub(super) async fn wait_for_turn<F: std::future::Future>(
        &mut self,
        turn: F,
    ) -> Result<F::Output, Error> {
        let start = Instant::now();
        let outcome = timeout_at(self.deadline, turn).await;
        let contention = self.contend(start);
        outcome.map_err(|_| record_error(self.name, Error::Busy(contention)))
    }

    /// Waits `pause` (a backoff from concurrent creates for the same user on
    /// other instances) before the operation's next round trip, or fails with
    /// [`Error::Busy`] when that would pass its deadline.
    pub(super) async fn pause(&mut self, pause: Duration) -> Result<(), Error> {
        let start = Instant::now();
        let until = start + pause;
        if until >= self.deadline {
            let contention = self.contend(start);
            return Err(record_error(self.name, Error::Busy(contention)));
        }
        tokio::time::sleep_until(until).await;
        self.contend(start);
        Ok(())
    }

    /// Adds the wait since `start` for concurrent creates of one user to
    /// [`Op::contended`].
    fn contend(&mut self, start: Instant) -> Contention {
        let contention = Contention::UserCreates {
            timeout: self.timeout,
        };
        let before = self.contended.map_or(Duration::ZERO, |(waited, _)| waited);
        self.contended = Some((before + start.elapsed(), contention));
        contention
    }

    /// Maps a round trip's outcome, marking the connection broken when it can
    /// no longer be trusted, so the pool replaces it instead of reusing it.
    fn settle<T>(
        &mut self,
        start: std::time::Instant,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Error> {
        self.duration.record(start.elapsed().as_secs_f64());
        self.round_trips += 1;
        if !self.span.is_disabled() {
            self.span
                .record("db.redis.round_trips", i64::from(self.round_trips));
        }
        let outcome = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                // READONLY: the master we hold was demoted by a failover.
                if err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_unrecoverable_error()
                    || err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                {
                    self.conn.mark_broken();
                }
                Err(err.into())
            }
            Err(_elapsed) => match self.contended {
                // The deadline passed in a round trip shorter than the time
                // the operation had waited for other calls: they took most of
                // REDIS_TIMEOUT_MS, not Redis; the connection is fine.
                Some((waited, contention)) if waited >= start.elapsed() => {
                    Err(Error::Busy(contention))
                }
                _ => {
                    // A silent peer (host gone, network partition) never
                    // resets the socket: reconnect rather than queue behind it.
                    self.conn.mark_broken();
                    Err(Error::Timeout(self.timeout))
                }
            },
        };
        outcome.map_err(|err| {
            if !self.span.is_disabled() {
                self.span.record("otel.status_code", "ERROR");
                self.span.record("error.type", super::error_kind(&err));
            }
            record_error(self.name, err)
        })
    }
}

/// The cluster slot of a command's key, for the span of a traced operation:
/// a script's first key (EVALSHA, EVAL), or the key of the few keyed
/// commands the store sends outside scripts (DEL, SET, GET). Other commands
/// (PING, INFO, WAIT, CLUSTER) have no key and so no slot. Every key of
/// one script shares a hash tag, hence one slot.
///
/// Why the slot and not its master: redis-rs 1.8 routes a cluster command
/// by its own slot map, which its async `ClusterConnection` does not expose
/// (its public API routes commands; the map and the address a command went
/// to stay inside), and the reply does not say which node answered. Naming
/// a master from a map of our own (a `CLUSTER SLOTS` read, as replication
/// waits keep) could name the wrong one after a failover or a resharding,
/// or cost a round trip per operation; the slot is exact, and `CLUSTER
/// SLOTS` (or the collector, joined with it) says which master serves it.
fn key_slot(cmd: &redis::Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    let key = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _script = args.next()?;
        let keys = args.next()?;
        if keys == b"0" {
            return None;
        }
        args.next()?
    } else if [b"DEL".as_slice(), b"SET", b"GET"]
        .iter()
        .any(|keyed| name.eq_ignore_ascii_case(keyed))
    {
        args.next()?
    } else {
        return None;
    };
    std::str::from_utf8(key).ok().map(super::replication::slot)
}

/// A traced cluster operation's connection: passes each command on, noting
/// the slot of its key ([`key_slot`]).
struct SlotNoted<'a> {
    link: &'a mut Link,
    slot: Option<u16>,
}

impl ConnectionLike for SlotNoted<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        if let Some(slot) = key_slot(cmd) {
            self.slot = Some(slot);
        }
        self.link.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.link.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.link.get_db()
    }
}

/// The connection one operation uses.
pub(super) enum Link {
    /// A handle on a pooled multiplexed connection, and the pool's flag for
    /// whether it has failed.
    Shared {
        conn: MultiplexedConnection,
        broken: Arc<AtomicBool>,
    },
    /// A handle on the shared cluster connection.
    Cluster(ClusterConnection),
}

impl Link {
    /// Tells the pool not to reuse this connection. A cluster connection
    /// repairs itself, so there is nothing to do for it.
    fn mark_broken(&mut self) {
        if let Self::Shared { broken, .. } = self {
            broken.store(true, Ordering::Relaxed);
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Shared { conn, .. } => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Shared { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Shared { conn, .. } => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each operation name takes one slot on its first use and keeps it,
    /// whether it comes as the same literal or as equal bytes elsewhere.
    #[test]
    fn an_operation_keeps_its_histogram() {
        let durations = OpDurations::default();
        let filled = || durations.slots.iter().filter(|s| s.get().is_some()).count();
        let elsewhere: &'static str = String::from("get_session").leak();
        for name in ["get_session", "ping", "get_session", elsewhere] {
            let _ = durations.of(name);
        }
        assert_eq!(filled(), 2);
        let names: Vec<&str> = durations
            .slots
            .iter()
            .filter_map(|s| s.get().map(|(name, _)| *name))
            .collect();
        assert_eq!(names, ["get_session", "ping"]);
    }

    /// A command's slot is its key's: a script's first key, a keyed
    /// command's key; none for commands without a key.
    #[test]
    fn a_command_is_in_its_keys_slot() {
        let script = redis::Script::new("return 1");
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(script.get_hash())
            .arg(2)
            .arg("s:{u1}:t")
            .arg("s:{u1}:x");
        let slot = super::super::replication::slot("{u1}");
        assert_eq!(key_slot(&evalsha), Some(slot));
        assert_eq!(key_slot(redis::cmd("DEL").arg("s:{u1}:t")), Some(slot));
        assert_ne!(key_slot(redis::cmd("DEL").arg("s:{u2}:t")), Some(slot));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg(script.get_hash()).arg(0).arg("arg");
        assert_eq!(key_slot(&keyless), None);
        assert_eq!(key_slot(redis::cmd("INFO").arg("memory")), None);
        assert_eq!(key_slot(&redis::cmd("PING")), None);
    }

    /// Every operation name the store passes to `op` has a slot to spare,
    /// so none is looked up in the registry on each use.
    #[test]
    fn every_operation_of_the_store_fits() {
        // The store's files, its modules' subdirectories included.
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/store"
        ))];
        let mut names = std::collections::BTreeSet::new();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(path).unwrap_or_default();
                for rest in text.split(".op(\"").skip(1) {
                    names.insert(rest.split('"').next().unwrap().to_owned());
                }
            }
        }
        for op in ["get_session", "revoke_session", "publish_heartbeat"] {
            assert!(names.contains(op), "{op} not found in {names:?}");
        }
        assert!(names.len() * 2 <= MAX_OPS, "{names:?}");
    }
}
