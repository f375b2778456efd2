//! The server's error type and its one mapping to gRPC status codes.
//!
//! Each variant is a case a caller branches on; causes that only an operator
//! needs are kept as a boxed source and logged, never sent to the caller.

use std::time::Duration;

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
    /// Redis could not be reached or did not answer in time; the call may be retried.
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Redis did not answer within REDIS_TIMEOUT_MS.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis refused a write because it is out of memory (`maxmemory`).
    #[error("redis is out of memory")]
    OutOfMemory(#[source] BoxError),
    /// A write kept losing races with concurrent writes for the same user.
    #[error("too much contention on one user's sessions, retry")]
    Contention,
    /// A bug or a broken invariant: logged with its cause, sent as a generic message.
    #[error("internal error: {0}")]
    Internal(#[source] BoxError),
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
        use redis::ErrorKind;
        // redis-rs has no kind for OOM: it is an "extension" error with that code.
        if err.code() == Some("OOM") {
            return Self::OutOfMemory(err.into());
        }
        match err.kind() {
            // Protocol and type mismatches mean our scripts and this code disagree.
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => Self::Internal(err.into()),
            // Everything else is Redis being unreachable, failing over, loading,
            // read-only or refusing us: the caller should retry, possibly elsewhere.
            _ => Self::Unavailable(err.into()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        // No `_` arm: a new variant must pick its code here before it compiles.
        match err {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(err.to_string()),
            Error::Unavailable(ref cause) => {
                tracing::warn!(error = %cause, "redis unavailable");
                tonic::Status::unavailable(
                    "session store unavailable: redis is unreachable or failing",
                )
            }
            Error::Timeout(limit) => {
                tracing::warn!(?limit, "redis timed out");
                tonic::Status::unavailable(format!(
                    "session store unavailable: redis did not answer within {} ms",
                    limit.as_millis()
                ))
            }
            Error::OutOfMemory(ref cause) => {
                tracing::error!(error = %cause, "redis out of memory");
                tonic::Status::resource_exhausted("session store is out of memory")
            }
            Error::Contention => tonic::Status::aborted(err.to_string()),
            Error::Internal(ref cause) => {
                tracing::error!(error = %cause, "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
