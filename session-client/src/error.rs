//! The client's error type: one variant per case a caller branches on, mapped
//! from the gRPC status once, here.

use tonic::{Code, Status};

/// A boxed error cause, for configuration errors that come from tonic or rustls.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result of every [`SessionClient`](crate::SessionClient) call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a SessionStore call can fail with.
///
/// The variants follow the contract's error codes: branch on
/// [`Error::Unavailable`] to fail open or closed, on [`Error::InvalidArgument`]
/// to reject the caller's input. The [`Status`] is kept as the source, for
/// its message and metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field broke the contract (an id with a space, a ttl of zero,
    /// a malformed IP). The server's message names the field, e.g.
    /// `invalid user_id: must not be empty`. Not worth retrying.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// SessionStore, or the Redis behind it, could not be reached or answered
    /// too slowly. Reads were already retried (see
    /// [`Builder::max_attempts`](crate::Builder::max_attempts)); a write may be
    /// retried by the caller when repeating it is acceptable.
    #[error("session store unavailable: {}", .0.message())]
    Unavailable(#[source] Status),
    /// The call did not finish within the per-call timeout
    /// ([`Builder::timeout`](crate::Builder::timeout)). A write may or may
    /// not have taken effect.
    #[error("session store call exceeded its deadline: {}", .0.message())]
    DeadlineExceeded(#[source] Status),
    /// The server requires a bearer token and none or a wrong one was sent
    /// (see [`Builder::bearer_token`](crate::Builder::bearer_token)).
    #[error("not authenticated to the session store: {}", .0.message())]
    Unauthenticated(#[source] Status),
    /// Any other status: RESOURCE_EXHAUSTED (server overloaded or Redis out of
    /// memory), OUT_OF_RANGE (request too large), INTERNAL (a bug, or a malformed answer), UNKNOWN
    /// (a connection failing mid-call, such as a server refusing the client's
    /// TLS certificate after the handshake).
    #[error("session store call failed: {} ({})", .0.code(), .0.message())]
    Other(#[source] Status),
    /// The client's settings cannot work: a malformed or non-http(s)
    /// endpoint, a TLS option on an `http://` endpoint, unreadable PEM, a
    /// bearer token that is not valid header text. Reported by
    /// [`Builder::connect`](crate::Builder::connect), never by a call.
    #[error("invalid session client configuration: {0}")]
    Config(#[source] BoxError),
}

impl Error {
    /// The gRPC status behind this error, when there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Unavailable(status)
            | Self::DeadlineExceeded(status)
            | Self::Unauthenticated(status)
            | Self::Other(status) => Some(status),
            Self::InvalidArgument(_) | Self::Config(_) => None,
        }
    }

    /// A configuration error carrying `message`.
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config(message.into().into())
    }

    /// An answer the contract does not allow (a session without timestamps):
    /// reported as INTERNAL, as gRPC clients report undecodable responses.
    pub(crate) fn malformed(what: &str) -> Self {
        Self::Other(Status::internal(format!(
            "malformed response from the session store: {what}"
        )))
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        // No `_` arm: every code is placed here on purpose.
        match status.code() {
            Code::InvalidArgument => Self::InvalidArgument(status.message().to_owned()),
            Code::Unavailable => Self::Unavailable(status),
            Code::DeadlineExceeded => Self::DeadlineExceeded(status),
            // tonic reports its own expired timers (the client's per-call
            // timeout, or the server's reading of grpc-timeout) as CANCELLED
            // "Timeout expired"; to the caller that is a missed deadline.
            Code::Cancelled if is_timeout(&status) => Self::DeadlineExceeded(status),
            Code::Unauthenticated => Self::Unauthenticated(status),
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => Self::Other(status),
        }
    }
}

/// Whether a CANCELLED status is tonic's expired timer rather than a real
/// cancellation: the local timer leaves [`tonic::TimeoutExpired`] in the
/// source chain; the server's only its message.
fn is_timeout(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    status.message() == tonic::TimeoutExpired(()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each gRPC code lands in the variant a caller branches on, keeping the status.
    #[test]
    fn codes_map_to_the_variants_callers_branch_on() {
        let err = Error::from(Status::invalid_argument(
            "invalid user_id: must not be empty",
        ));
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m == "invalid user_id: must not be empty")
        );
        assert!(err.status().is_none());

        let err = Error::from(Status::unavailable("redis is down"));
        assert!(matches!(&err, Error::Unavailable(s) if s.message() == "redis is down"));
        assert_eq!(err.status().map(Status::code), Some(Code::Unavailable));

        let err = Error::from(Status::deadline_exceeded("late"));
        assert!(matches!(err, Error::DeadlineExceeded(_)));

        for code in [
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
        ] {
            let err = Error::from(Status::new(code, "x"));
            assert!(
                matches!(&err, Error::Other(s) if s.code() == code),
                "{code:?}"
            );
        }
    }

    /// UNAUTHENTICATED is its own variant, the status its source; also proven
    /// against the real server in `tests/e2e/client.rs`.
    #[test]
    fn unauthenticated_maps_to_its_own_variant_keeping_the_status() {
        let err = Error::from(Status::unauthenticated("missing bearer token"));
        let Error::Unauthenticated(status) = &err else {
            panic!("expected Unauthenticated, got {err:?}");
        };
        assert_eq!(status.message(), "missing bearer token");
        let source = std::error::Error::source(&err).expect("the status is the source");
        assert!(source.is::<Status>());
        assert!(err.to_string().contains("missing bearer token"));
    }

    /// tonic's expired timers (local or the server's) are DeadlineExceeded; a real cancel is not.
    #[test]
    fn tonic_timer_expiry_is_a_deadline_but_a_plain_cancel_is_not() {
        let local = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(local.code(), Code::Cancelled);
        assert!(matches!(Error::from(local), Error::DeadlineExceeded(_)));

        let remote = Status::cancelled("Timeout expired");
        assert!(matches!(Error::from(remote), Error::DeadlineExceeded(_)));

        let cancelled = Status::cancelled("the caller went away");
        assert!(matches!(Error::from(cancelled), Error::Other(_)));
    }
}
