//! The server's error type and its one mapping to gRPC status codes.
//!
//! Each variant is a case a caller branches on; causes that only an operator
//! needs are kept as a boxed source and logged, never sent to the caller.

use std::time::{Duration, Instant};

use crate::log_gate::LogGate;

/// A boxed error cause, kept for logs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything a SessionStore operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent a value that breaks the contract.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, as named in the proto.
        field: &'static str,
        /// What rule it broke.
        reason: String,
    },
    /// Redis is in a state a retry can get past: unreachable (refused,
    /// dropped, timed out), loading its dataset, failing over (read-only,
    /// master down, cluster down, redirections), or busy with a long script.
    /// Anything else Redis answers is [`Error::Internal`].
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Redis did not answer within REDIS_TIMEOUT_MS.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// REDIS_TIMEOUT_MS ran out while the operation waited for this
    /// process's other calls, not for Redis: the cause is load on this
    /// server, and a retry (here later, or on another instance) can pass.
    #[error("session store busy: {0}")]
    Busy(Contention),
    /// A call that ends sessions early was applied on the Redis master, but
    /// fewer than REVOCATION_MIN_REPLICAS replicas acknowledged its writes
    /// within REVOCATION_REPLICA_TIMEOUT_MS: a failover now could undo it.
    /// The call is idempotent, and its retry waits again.
    #[error(
        "{acked} of the {wanted} replicas REVOCATION_MIN_REPLICAS asks for acknowledged within \
         {} ms",
        timeout.as_millis()
    )]
    NotReplicated {
        /// How many replicas acknowledged (WAIT's answer).
        acked: u32,
        /// REVOCATION_MIN_REPLICAS.
        wanted: u32,
        /// REVOCATION_REPLICA_TIMEOUT_MS.
        timeout: Duration,
    },
    /// Redis refused a write because it is out of memory (`maxmemory`).
    #[error("redis is out of memory")]
    OutOfMemory(#[source] BoxError),
    /// A bug, a broken invariant or a misconfiguration that no retry fixes
    /// (a wrong Redis password, a missing ACL permission, a wrong key type):
    /// logged with its cause, sent as a generic message.
    #[error("internal error: {0}")]
    Internal(#[source] BoxError),
}

/// What an operation waited for when it ran out of time without Redis being
/// slow ([`Error::Busy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contention {
    /// Every pooled Redis connection was checked out by other operations.
    Pool {
        /// REDIS_TIMEOUT_MS.
        timeout: Duration,
        /// REDIS_POOL_SIZE.
        size: u32,
    },
    /// Other creates for the same user held its turn (creates that must
    /// evict take turns per user, and back off from other instances').
    UserCreates {
        /// REDIS_TIMEOUT_MS.
        timeout: Duration,
    },
}

impl std::fmt::Display for Contention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pool { timeout, size } => write!(
                f,
                "no Redis connection free within {} ms (pool of {size}); retry",
                timeout.as_millis()
            ),
            Self::UserCreates { timeout } => write!(
                f,
                "concurrent creates for this user did not let this one run within {} ms; retry",
                timeout.as_millis()
            ),
        }
    }
}

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        match RedisFailure::of(&err) {
            RedisFailure::Transient => Self::Unavailable(err.into()),
            RedisFailure::OutOfMemory => Self::OutOfMemory(err.into()),
            RedisFailure::Credentials => Self::Internal(Box::new(CredentialsRejected(err))),
            RedisFailure::Permanent => Self::Internal(err.into()),
        }
    }
}

/// What a Redis error means for the caller: the decision behind
/// `From<redis::RedisError> for Error`, kept apart so that it reads as a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RedisFailure {
    /// A retry, possibly after a pause or elsewhere, can succeed.
    Transient,
    /// Redis refused a write at `maxmemory`.
    OutOfMemory,
    /// Redis refused our user name or password.
    Credentials,
    /// Our code, our scripts or the configuration are wrong: retrying gives
    /// the same answer.
    Permanent,
}

impl RedisFailure {
    fn of(err: &redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        // The connection failed (refused, reset, closed, timed out, DNS):
        // another connection may well work.
        if err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
        {
            return Self::Transient;
        }
        match err.kind() {
            ErrorKind::Server(kind) => match kind {
                // Loading a dump, failing over, or a cluster resharding or
                // healing: all pass by themselves.
                ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask => Self::Transient,
                // Redis refuses new clients past `maxclients` with a plain
                // ERR: a capacity problem, not a bug.
                ServerErrorKind::ResponseError
                    if err
                        .detail()
                        .is_some_and(|d| d.starts_with("max number of clients reached")) =>
                {
                    Self::Transient
                }
                // A script runtime error, a rejected command, a missing ACL
                // permission, keys in several slots, an aborted transaction,
                // a script Redis lost after `redis::Script` reloaded it.
                ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::NoScript
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NotBusy
                | ServerErrorKind::NoSub
                | ServerErrorKind::NoPerm => Self::Permanent,
                // The enum is non-exhaustive: a kind added by a later redis-rs
                // is treated as a bug (logged loudly) until someone decides
                // it is retryable and lists it above.
                _ => Self::Permanent,
            },
            // Codes redis-rs has no kind for.
            ErrorKind::Extension => match err.code() {
                Some("OOM") => Self::OutOfMemory,
                // BUSY: a script ran past `busy-reply-threshold`; it ends or
                // is killed. NOREPLICAS: fewer replicas than
                // `min-replicas-to-write` are in sync, as during a failover.
                // UNBLOCKED: the node changed role (failover) under a call.
                Some("BUSY" | "NOREPLICAS" | "UNBLOCKED") => Self::Transient,
                Some("NOAUTH" | "WRONGPASS") => Self::Credentials,
                // WRONGTYPE (a key holds what our scripts do not expect),
                // MISCONF (Redis cannot persist and refuses writes) and codes
                // unknown to us: an operator must look.
                _ => Self::Permanent,
            },
            ErrorKind::AuthenticationFailed => Self::Credentials,
            // Sentinels that do not (yet) know a master or a replica, or a
            // cluster without a connection to the slot's node: failover or
            // reconnection in progress.
            ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::NoValidReplicasFoundBySentinel
            | ErrorKind::ClusterConnectionNotFound => Self::Transient,
            // Already answered above; listed so that the table is complete.
            ErrorKind::Io => Self::Transient,
            // A reply our code cannot read, a bad client configuration (TLS
            // included), no sentinels, a server without RESP3.
            ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::InvalidClientConfig
            | ErrorKind::Client
            | ErrorKind::EmptySentinelList
            | ErrorKind::RESP3NotSupported => Self::Permanent,
            // Non-exhaustive, as above: unknown kinds are bugs until listed.
            _ => Self::Permanent,
        }
    }
}

/// Redis refused the credentials it was given: logged so that the operator
/// knows where to look. The message carries Redis's answer, never the password.
#[derive(Debug, thiserror::Error)]
#[error(
    "redis rejected the credentials: check the password in REDIS_PASSWORD_FILE or \
     REDIS_URL and the user name in REDIS_URL ({0})"
)]
struct CredentialsRejected(redis::RedisError);

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        // No `_` arm: a new variant must pick its code here before it compiles.
        match err {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(err.to_string()),
            Error::Unavailable(ref cause) => {
                if let Some(suppressed) = REDIS_FAILURE_LOG.admit(Instant::now()) {
                    tracing::warn!(error = %cause, suppressed, "redis unavailable");
                }
                tonic::Status::unavailable(
                    "session store unavailable: redis is unreachable or failing",
                )
            }
            Error::Timeout(limit) => {
                if let Some(suppressed) = REDIS_FAILURE_LOG.admit(Instant::now()) {
                    tracing::warn!(?limit, suppressed, "redis timed out");
                }
                tonic::Status::unavailable(format!(
                    "session store unavailable: redis did not answer within {} ms",
                    limit.as_millis()
                ))
            }
            Error::NotReplicated { .. } => {
                if let Some(suppressed) = REDIS_FAILURE_LOG.admit(Instant::now()) {
                    tracing::warn!(error = %err, suppressed, "revocation not replicated");
                }
                tonic::Status::unavailable(format!(
                    "the revocation is applied on the Redis master but not yet replicated: {err}; \
                     retrying is safe: the call is idempotent and the retry waits for the \
                     replicas again"
                ))
            }
            Error::Busy(contention) => {
                if let Some(suppressed) = BUSY_LOG.admit(Instant::now()) {
                    tracing::warn!(%contention, suppressed, "session store busy");
                }
                tonic::Status::unavailable(format!("session store busy: {contention}"))
            }
            Error::OutOfMemory(ref cause) => {
                tracing::error!(error = %cause, "redis out of memory");
                tonic::Status::resource_exhausted("session store is out of memory")
            }
            Error::Internal(ref cause) => {
                tracing::error!(error = %cause, "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}

/// The "redis unavailable" and "redis timed out" lines: one per failed call
/// would be a flood exactly when Redis is down (20,000 lines a second at
/// 20,000 calls a second), so at most one a second is written, carrying how
/// many were left out since the last (`suppressed`). The calls are still
/// counted exactly (`sessionstore_redis_errors_total`,
/// `sessionstore_rpc_requests_total`), and each still gets its own
/// (separately rate-limited) RPC log line.
static REDIS_FAILURE_LOG: LogGate = LogGate::new(1, Duration::from_secs(1));

/// The "session store busy" lines, limited for the same reason: contention
/// comes in floods.
static BUSY_LOG: LogGate = LogGate::new(1, Duration::from_secs(1));

#[cfg(test)]
mod tests {
    use std::io;

    use redis::{ErrorKind, RedisError};
    use tonic::Code;

    use super::*;

    /// A revocation short of its replicas is UNAVAILABLE, saying it is
    /// applied on the master, not yet replicated, and that a retry is safe.
    #[test]
    fn not_replicated_is_unavailable_and_says_retrying_is_safe() {
        let status = tonic::Status::from(Error::NotReplicated {
            acked: 0,
            wanted: 1,
            timeout: Duration::from_millis(200),
        });
        assert_eq!(status.code(), Code::Unavailable);
        for part in [
            "applied on the Redis master but not yet replicated",
            "0 of the 1 replicas REVOCATION_MIN_REPLICAS asks for acknowledged within 200 ms",
            "retrying is safe",
        ] {
            assert!(status.message().contains(part), "{}", status.message());
        }
    }

    /// A Redis error reply as it comes off the wire (`-CODE detail`).
    fn reply(line: &str) -> RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    /// Maps `err` and asserts the variant's name and, through
    /// `tonic::Status::from`, the gRPC code; returns the mapped error.
    fn assert_maps(err: RedisError, variant: &str, code: Code) -> Error {
        let described = err.to_string();
        let status = tonic::Status::from(Error::from(err.clone()));
        let mapped = Error::from(err);
        let name = match &mapped {
            Error::InvalidArgument { .. } => "InvalidArgument",
            Error::Unavailable(_) => "Unavailable",
            Error::Timeout(_) => "Timeout",
            Error::Busy(_) => "Busy",
            Error::NotReplicated { .. } => "NotReplicated",
            Error::OutOfMemory(_) => "OutOfMemory",
            Error::Internal(_) => "Internal",
        };
        assert_eq!(name, variant, "{described}");
        assert_eq!(status.code(), code, "{described}");
        mapped
    }

    #[test]
    fn connection_failures_are_unavailable() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
            // DNS and other socket failures.
            io::ErrorKind::Other,
        ] {
            let err = RedisError::from(io::Error::from(kind));
            assert_maps(err, "Unavailable", Code::Unavailable);
        }
        let err = RedisError::from((ErrorKind::Io, "connection closed"));
        assert_maps(err, "Unavailable", Code::Unavailable);
    }

    #[test]
    fn loading_failover_and_cluster_changes_are_unavailable() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "NOREPLICAS Not enough good replicas to write.",
            "UNBLOCKED force unblock from blocking operation, instance state changed",
            "ERR max number of clients reached",
        ] {
            assert_maps(reply(line), "Unavailable", Code::Unavailable);
        }
    }

    #[test]
    fn a_long_running_script_is_unavailable() {
        let err = reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL");
        assert_eq!(err.code(), Some("BUSY"));
        assert_maps(err, "Unavailable", Code::Unavailable);
        let err = redis::make_extension_error("BUSY".into(), None);
        assert_maps(err, "Unavailable", Code::Unavailable);
    }

    #[test]
    fn sentinel_and_cluster_routing_gaps_are_unavailable() {
        for kind in [
            ErrorKind::MasterNameNotFoundBySentinel,
            ErrorKind::NoValidReplicasFoundBySentinel,
            ErrorKind::ClusterConnectionNotFound,
        ] {
            assert_maps(
                RedisError::from((kind, "gap")),
                "Unavailable",
                Code::Unavailable,
            );
        }
    }

    #[test]
    fn out_of_memory_is_resource_exhausted() {
        let err = reply("OOM command not allowed when used memory > 'maxmemory'.");
        assert_maps(err, "OutOfMemory", Code::ResourceExhausted);
    }

    #[test]
    fn a_wrong_key_type_is_internal() {
        let err = reply("WRONGTYPE Operation against a key holding the wrong kind of value");
        assert_maps(err, "Internal", Code::Internal);
        let err = redis::make_extension_error(
            "WRONGTYPE".into(),
            Some("Operation against a key holding the wrong kind of value".into()),
        );
        assert_maps(err, "Internal", Code::Internal);
    }

    #[test]
    fn script_errors_and_refused_commands_are_internal() {
        for line in [
            "ERR Error running script (call to f_0123): @user_script:12: user_script:12: \
             attempt to compare nil with number",
            "ERR unknown command 'EVALSHA_RO'",
            "NOPERM this user has no permissions to run the 'evalsha' command",
            "CROSSSLOT Keys in request don't hash to the same slot",
            "EXECABORT Transaction discarded because of previous errors.",
            "NOSCRIPT No matching script. Please use EVAL.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "SOMENEWCODE a code nobody here knows",
        ] {
            assert_maps(reply(line), "Internal", Code::Internal);
        }
    }

    #[test]
    fn client_side_failures_are_internal() {
        for kind in [
            ErrorKind::Parse,
            ErrorKind::UnexpectedReturnType,
            ErrorKind::InvalidClientConfig,
            ErrorKind::Client,
            ErrorKind::EmptySentinelList,
            ErrorKind::RESP3NotSupported,
        ] {
            assert_maps(RedisError::from((kind, "ours")), "Internal", Code::Internal);
        }
    }

    #[test]
    fn rejected_credentials_are_internal_and_name_the_settings() {
        for err in [
            reply("NOAUTH Authentication required."),
            reply("WRONGPASS invalid username-password pair or user is disabled."),
            RedisError::from((
                ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
        ] {
            let Error::Internal(cause) = assert_maps(err, "Internal", Code::Internal) else {
                unreachable!("assert_maps checked the variant");
            };
            let logged = cause.to_string();
            assert!(logged.contains("REDIS_PASSWORD_FILE"), "{logged}");
            assert!(logged.contains("REDIS_URL"), "{logged}");
        }
    }

    /// Contention is UNAVAILABLE (a retry can pass) and says it is not
    /// Redis: the pool's size and the user's concurrent creates are named.
    #[test]
    fn contention_is_unavailable_and_does_not_blame_redis() {
        let timeout = Duration::from_millis(250);
        let status = tonic::Status::from(Error::Busy(Contention::Pool { timeout, size: 4 }));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "session store busy: no Redis connection free within 250 ms (pool of 4); retry"
        );
        let status = tonic::Status::from(Error::Busy(Contention::UserCreates { timeout }));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status
                .message()
                .starts_with("session store busy: concurrent creates for this user"),
            "{}",
            status.message()
        );
        let status = tonic::Status::from(Error::Timeout(timeout));
        assert_eq!(
            status.message(),
            "session store unavailable: redis did not answer within 250 ms"
        );
    }

    #[test]
    fn internal_statuses_do_not_carry_the_cause() {
        let status = tonic::Status::from(Error::from(reply("WRONGTYPE secret detail")));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
