//! What readiness asks of Redis beyond PING: whether each master may evict
//! our keys (its `maxmemory-policy` and `maxmemory`, read from `INFO memory`),
//! so that readiness can refuse an evicting Redis; and whether this process
//! can use its keys at all ([`Store::check_access`]), so that a pod with a
//! wrong ACL or pointed at a replica never turns ready.
//!
//! Under any policy but `noeviction`, a Redis at `maxmemory` drops keys to make
//! room, and the rarely read `user_sessions:` indexes and `token_owner:`
//! reservations go first: RevokeAllUserSessions misses sessions, the per-user
//! cap stops counting them, and a token id can be taken by a second user.
//! With `maxmemory` 0 (no limit, the default outside managed services) Redis
//! never reaches the limit and never evicts, whatever the policy says.
//!
//! `INFO`, not `CONFIG GET`: managed Redis services (ElastiCache, Memorystore,
//! Azure Cache) rename or block `CONFIG`, while `INFO` is allowed.

use std::fmt;

use redis::{FromRedisValue, Value};

use super::{RedisMode, Store};
use crate::error::Error;

/// The only `maxmemory-policy` under which Redis never drops a key on its own.
pub const NOEVICTION: &str = "noeviction";

/// One master's eviction policy and memory limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaxmemoryPolicy {
    /// The master as Redis Cluster names it (`host:port`), so a log can point
    /// at the one to fix; `None` in standalone and sentinel modes, where the
    /// store talks to exactly one master.
    pub node: Option<String>,
    /// The `maxmemory_policy` field of `INFO memory`, e.g. `noeviction` or
    /// `volatile-lru`.
    pub policy: String,
    /// The `maxmemory` field of `INFO memory`, in bytes: 0 means no limit,
    /// under which the policy never applies.
    pub maxmemory: u64,
}

impl MaxmemoryPolicy {
    /// Whether this master may evict keys: its policy is not `noeviction`
    /// and it has a memory limit to evict at (`maxmemory` > 0).
    pub fn evicts(&self) -> bool {
        self.policy != NOEVICTION && self.maxmemory > 0
    }
}

impl fmt::Display for MaxmemoryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{node}: {} (maxmemory {})", self.policy, self.maxmemory),
            None => write!(f, "{} (maxmemory {})", self.policy, self.maxmemory),
        }
    }
}

impl Store {
    /// Reads `maxmemory-policy` and `maxmemory` from every master: the one master in
    /// standalone and sentinel modes, each master of a cluster (with its
    /// address), in one operation bound by REDIS_TIMEOUT_MS.
    ///
    /// On a cluster, redis-rs routes `INFO` to all masters by itself
    /// (`RoutingInfo::MultiNode(AllMasters)` with the `Special` response
    /// policy) and answers with a map from each master's address to its reply;
    /// a master that fails fails the whole call, so no master goes unchecked.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] or [`Error::Timeout`] when a master does not
    /// answer or refuses `INFO` (an ACL without `+info`), and
    /// [`Error::Internal`] when a reply has no `maxmemory_policy` or
    /// `maxmemory` field.
    pub async fn maxmemory_policies(&self) -> Result<Vec<MaxmemoryPolicy>, Error> {
        let mut op = self.op("maxmemory_policy").await?;
        let reply: Value = op.query(redis::cmd("INFO").arg("memory")).await?;
        parse_reply(reply)
    }
}

/// The user id of [`Store::check_access`]'s key, and its token id: with a
/// space, which no token id may hold (see `model::validate_id`), so the key
/// cannot be a session's and deleting it is harmless.
const ACCESS_CHECK_USER: &str = "readiness-check";
const ACCESS_CHECK_TOKEN: &str = "no session";

/// Why Redis answers PING but refuses what calls need, as
/// [`Store::check_access`] found.
#[derive(Debug)]
pub enum AccessRefused {
    /// The Redis user may not touch our keys or run our commands (`NOPERM`).
    NoPermission(Error),
    /// The node refuses writes (`READONLY`, or `role:` in `INFO replication`
    /// is not `master`): REDIS_URL names a replica.
    ReadOnly(String),
    /// Any other refusal: the error says what.
    Other(Error),
}

impl AccessRefused {
    /// The Redis error code behind the refusal, for the log.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::NoPermission(_) => "NOPERM",
            Self::ReadOnly(_) => "READONLY",
            Self::Other(_) => "other",
        }
    }

    /// What an operator does about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::NoPermission(_) => {
                "grant the Redis user in REDIS_URL access to the keys under KEY_PREFIX and the store's commands, e.g. `ACL SETUSER <user> ~<KEY_PREFIX>* &<KEY_PREFIX>revocations* +@all` (and persist it in the ACL file or the managed service's user settings)"
            }
            Self::ReadOnly(_) => {
                "point REDIS_URL at the master, not a replica (or use REDIS_MODE=sentinel so the master is found after a failover)"
            }
            Self::Other(_) => "see the error; the store cannot run its commands on this Redis",
        }
    }
}

impl fmt::Display for AccessRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPermission(err) | Self::Other(err) => err.fmt(f),
            Self::ReadOnly(detail) => f.write_str(detail),
        }
    }
}

impl Store {
    /// Checks that calls can work, not only that Redis answers: one of the
    /// store's scripts, run by EVALSHA (loaded on NOSCRIPT, as every call
    /// does) on a key under KEY_PREFIX in the user-slot form of the key
    /// table; a DEL of that key, which cannot exist (a harmless write that
    /// a replica refuses with READONLY and an ACL without write access to
    /// our keys with NOPERM); and, in standalone and sentinel modes, that
    /// `INFO replication` says `role:master` (a replica with
    /// `replica-read-only no` takes the write). An `INFO` the ACL forbids
    /// is skipped: the write already proved what matters.
    ///
    /// # Errors
    ///
    /// `Err(Ok(refusal))` when Redis refuses what calls need;
    /// `Err(Err(error))` when it does not answer (within REDIS_TIMEOUT_MS),
    /// which says nothing about access.
    pub async fn check_access(&self) -> Result<(), Result<AccessRefused, Error>> {
        let refused = |err: Error| match redis_kind(&err) {
            Some(redis::ServerErrorKind::NoPerm) => Ok(AccessRefused::NoPermission(err)),
            Some(redis::ServerErrorKind::ReadOnly) => Ok(AccessRefused::ReadOnly(err.to_string())),
            _ => match err {
                Error::Internal(_) | Error::InvalidArgument { .. } => Ok(AccessRefused::Other(err)),
                Error::Unavailable(_)
                | Error::Timeout(_)
                | Error::Busy(_)
                | Error::NotReplicated { .. }
                | Error::OutOfMemory(_) => Err(err),
            },
        };
        let key = format!(
            "{}session:{{{ACCESS_CHECK_USER}}}:{{{ACCESS_CHECK_TOKEN}}}",
            self.shared.settings.key_prefix
        );
        let mut op = self.op("access_check").await.map_err(Err)?;
        // count_sessions only reads its key (ZCOUNT of a key that is not
        // there: 0).
        let _: i64 = op
            .invoke(&self.shared.scripts.count_sessions.key(&key))
            .await
            .map_err(refused)?;
        let _: i64 = op
            .query(redis::cmd("DEL").arg(&key))
            .await
            .map_err(refused)?;
        if self.shared.settings.mode != RedisMode::Cluster {
            let info: Result<String, Error> = op.query(redis::cmd("INFO").arg("replication")).await;
            match info {
                Ok(info) => match info
                    .lines()
                    .find_map(|line| line.strip_prefix("role:"))
                    .map(str::trim)
                {
                    Some("master") | None => {}
                    Some(role) => {
                        return Err(Ok(AccessRefused::ReadOnly(format!(
                            "INFO replication says role:{role}, not master"
                        ))));
                    }
                },
                Err(err) => match refused(err) {
                    // Forbidden by the ACL: the write above stands for it.
                    Ok(_) => {}
                    Err(unavailable) => return Err(Err(unavailable)),
                },
            }
        }
        Ok(())
    }
}

/// The kind of the Redis error answered, when `err` is one.
fn redis_kind(err: &Error) -> Option<redis::ServerErrorKind> {
    let source: &(dyn std::error::Error + 'static) = match err {
        Error::Internal(source) | Error::Unavailable(source) | Error::OutOfMemory(source) => {
            source.as_ref()
        }
        Error::InvalidArgument { .. }
        | Error::Timeout(_)
        | Error::Busy(_)
        | Error::NotReplicated { .. } => return None,
    };
    match source.downcast_ref::<redis::RedisError>()?.kind() {
        redis::ErrorKind::Server(kind) => Some(kind),
        _ => None,
    }
}

/// The policies in an `INFO memory` reply: one text from a single server, or
/// a map of node address to text from a cluster.
fn parse_reply(reply: Value) -> Result<Vec<MaxmemoryPolicy>, Error> {
    let text = |value: Value| String::from_redis_value(value).map_err(internal);
    match reply {
        Value::Map(nodes) => {
            let mut policies = nodes
                .into_iter()
                .map(|(node, info)| {
                    let node = text(node)?;
                    let (policy, maxmemory) = policy_in(&text(info)?, Some(&node))?;
                    Ok(MaxmemoryPolicy {
                        node: Some(node),
                        policy,
                        maxmemory,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            // A stable order, so logs and comparisons do not depend on which
            // master answered first.
            policies.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(policies)
        }
        single => {
            let (policy, maxmemory) = policy_in(&text(single)?, None)?;
            Ok(vec![MaxmemoryPolicy {
                node: None,
                policy,
                maxmemory,
            }])
        }
    }
}

/// The values of the `maxmemory_policy:` and `maxmemory:` lines of an `INFO`
/// text.
fn policy_in(info: &str, node: Option<&str>) -> Result<(String, u64), Error> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or_else(|| {
                let node = node.map(|n| format!(" from {n}")).unwrap_or_default();
                Error::Internal(format!("INFO memory{node} has no {name} field").into())
            })
    };
    let policy = field("maxmemory_policy")?.to_string();
    let maxmemory = field("maxmemory")?;
    let maxmemory = maxmemory.parse().map_err(|e| {
        let node = node.map(|n| format!(" from {n}")).unwrap_or_default();
        Error::Internal(format!("INFO memory{node}: maxmemory {maxmemory:?}: {e}").into())
    })?;
    Ok((policy, maxmemory))
}

fn internal(err: redis::ParsingError) -> Error {
    Error::Internal(Box::new(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Memory\r\nused_memory:1086336\r\nmaxmemory:0\r\n\
                        maxmemory_human:0B\r\nmaxmemory_policy:volatile-lru\r\n\
                        allocator_frag_ratio:1.00\r\n";

    /// A standalone reply is one unnamed master; `volatile-lru` without a
    /// limit (`maxmemory:0`) does not evict.
    #[test]
    fn standalone_reply_has_one_unnamed_policy() {
        for reply in [
            Value::BulkString(INFO.as_bytes().to_vec()),
            Value::VerbatimString {
                format: redis::VerbatimFormat::Text,
                text: INFO.into(),
            },
        ] {
            let policies = parse_reply(reply).unwrap();
            assert_eq!(
                policies,
                [MaxmemoryPolicy {
                    node: None,
                    policy: "volatile-lru".into(),
                    maxmemory: 0,
                }]
            );
            assert!(!policies[0].evicts(), "maxmemory 0 never evicts");
        }
    }

    /// Only a policy other than `noeviction` together with a memory limit
    /// evicts.
    #[test]
    fn evicts_only_with_a_policy_and_a_limit() {
        for (policy, maxmemory, evicts) in [
            ("allkeys-lru", 0, false),
            ("allkeys-lru", 1, true),
            ("volatile-ttl", 2_147_483_648, true),
            ("noeviction", 0, false),
            ("noeviction", 1_048_576, false),
        ] {
            let info =
                format!("# Memory\r\nmaxmemory:{maxmemory}\r\nmaxmemory_policy:{policy}\r\n");
            let policies = parse_reply(Value::BulkString(info.into_bytes())).unwrap();
            assert_eq!(policies[0].maxmemory, maxmemory);
            assert_eq!(policies[0].evicts(), evicts, "{policy} at {maxmemory}");
            assert_eq!(
                policies[0].to_string(),
                format!("{policy} (maxmemory {maxmemory})")
            );
        }
    }

    #[test]
    fn cluster_reply_names_each_master_in_address_order() {
        let node = |addr: &str, policy: &str, maxmemory: u64| {
            (
                Value::BulkString(addr.as_bytes().to_vec()),
                Value::BulkString(
                    format!("# Memory\r\nmaxmemory:{maxmemory}\r\nmaxmemory_policy:{policy}\r\n")
                        .into(),
                ),
            )
        };
        let reply = Value::Map(vec![
            node("10.0.0.3:6379", "noeviction", 1024),
            node("10.0.0.1:6379", "allkeys-lru", 1024),
            node("10.0.0.4:6379", "allkeys-lru", 0),
            node("10.0.0.2:6379", "noeviction", 1024),
        ]);
        let policies = parse_reply(reply).unwrap();
        let seen: Vec<String> = policies.iter().map(ToString::to_string).collect();
        assert_eq!(
            seen,
            [
                "10.0.0.1:6379: allkeys-lru (maxmemory 1024)",
                "10.0.0.2:6379: noeviction (maxmemory 1024)",
                "10.0.0.3:6379: noeviction (maxmemory 1024)",
                "10.0.0.4:6379: allkeys-lru (maxmemory 0)"
            ]
        );
        let evicting: Vec<bool> = policies.iter().map(MaxmemoryPolicy::evicts).collect();
        assert_eq!(evicting, [true, false, false, false]);
    }

    #[test]
    fn a_reply_without_the_field_is_an_error_naming_the_node() {
        let reply = Value::Map(vec![(
            Value::BulkString(b"10.0.0.9:6379".to_vec()),
            Value::BulkString(b"# Memory\r\nused_memory:1\r\n".to_vec()),
        )]);
        let err = parse_reply(reply).unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "internal error: INFO memory from 10.0.0.9:6379 has no maxmemory_policy field"
        );
    }
}
