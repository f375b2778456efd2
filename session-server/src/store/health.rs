//! Whether Redis may evict our keys: each master's `maxmemory-policy`, read
//! from `INFO memory` so that readiness can refuse an evicting Redis.
//!
//! Under any policy but `noeviction`, a Redis at `maxmemory` drops keys to make
//! room, and the rarely read `user_sessions:` indexes and `token_owner:`
//! reservations go first: RevokeAllUserSessions misses sessions, the per-user
//! cap stops counting them, and a token id can be taken by a second user.
//!
//! `INFO`, not `CONFIG GET`: managed Redis services (ElastiCache, Memorystore,
//! Azure Cache) rename or block `CONFIG`, while `INFO` is allowed.

use std::fmt;

use redis::{FromRedisValue, Value};

use super::Store;
use crate::error::Error;

/// The only `maxmemory-policy` under which Redis never drops a key on its own.
pub const NOEVICTION: &str = "noeviction";

/// One master's eviction policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaxmemoryPolicy {
    /// The master as Redis Cluster names it (`host:port`), so a log can point
    /// at the one to fix; `None` in standalone and sentinel modes, where the
    /// store talks to exactly one master.
    pub node: Option<String>,
    /// The `maxmemory_policy` field of `INFO memory`, e.g. `noeviction` or
    /// `volatile-lru`.
    pub policy: String,
}

impl MaxmemoryPolicy {
    /// Whether this master may evict keys, i.e. its policy is not `noeviction`.
    pub fn evicts(&self) -> bool {
        self.policy != NOEVICTION
    }
}

impl fmt::Display for MaxmemoryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{node}: {}", self.policy),
            None => f.write_str(&self.policy),
        }
    }
}

impl Store {
    /// Reads `maxmemory-policy` from every master: the one master in
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
    /// [`Error::Internal`] when a reply has no `maxmemory_policy` field.
    pub async fn maxmemory_policies(&self) -> Result<Vec<MaxmemoryPolicy>, Error> {
        let mut op = self.op("maxmemory_policy").await?;
        let reply: Value = op.query(redis::cmd("INFO").arg("memory")).await?;
        parse_reply(reply)
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
                    let policy = policy_in(&text(info)?, Some(&node))?;
                    Ok(MaxmemoryPolicy {
                        node: Some(node),
                        policy,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            // A stable order, so logs and comparisons do not depend on which
            // master answered first.
            policies.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(policies)
        }
        single => Ok(vec![MaxmemoryPolicy {
            node: None,
            policy: policy_in(&text(single)?, None)?,
        }]),
    }
}

/// The value of the `maxmemory_policy:` line of an `INFO` text.
fn policy_in(info: &str, node: Option<&str>) -> Result<String, Error> {
    info.lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(|policy| policy.trim().to_string())
        .ok_or_else(|| {
            let node = node.map(|n| format!(" from {n}")).unwrap_or_default();
            Error::Internal(format!("INFO memory{node} has no maxmemory_policy field").into())
        })
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
                    policy: "volatile-lru".into()
                }]
            );
            assert!(policies[0].evicts());
        }
    }

    #[test]
    fn cluster_reply_names_each_master_in_address_order() {
        let node = |addr: &str, policy: &str| {
            (
                Value::BulkString(addr.as_bytes().to_vec()),
                Value::BulkString(format!("# Memory\r\nmaxmemory_policy:{policy}\r\n").into()),
            )
        };
        let reply = Value::Map(vec![
            node("10.0.0.3:6379", "noeviction"),
            node("10.0.0.1:6379", "allkeys-lru"),
            node("10.0.0.2:6379", "noeviction"),
        ]);
        let policies = parse_reply(reply).unwrap();
        let seen: Vec<String> = policies.iter().map(ToString::to_string).collect();
        assert_eq!(
            seen,
            [
                "10.0.0.1:6379: allkeys-lru",
                "10.0.0.2:6379: noeviction",
                "10.0.0.3:6379: noeviction"
            ]
        );
        let evicting: Vec<bool> = policies.iter().map(MaxmemoryPolicy::evicts).collect();
        assert_eq!(evicting, [true, false, false]);
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
