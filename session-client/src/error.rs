//! The client's error type: one variant per case a caller branches on, mapped
//! from the gRPC status once, here. No tonic type appears in its shape, so a
//! tonic upgrade does not break callers; the status stays reachable as the
//! `source()`.

use std::fmt;

use tonic::Status;

/// A boxed error cause, for configuration errors that come from tonic or rustls.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result of every [`SessionClient`](crate::SessionClient) call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a SessionStore call can fail with.
///
/// The variants follow the contract's error codes: branch on
/// [`Error::Unavailable`] to fail open or closed, on [`Error::InvalidArgument`]
/// to reject the caller's input. New variants may be added in a minor
/// release, so a `match` needs a `_` arm; [`is_retryable`](Self::is_retryable)
/// and [`code`](Self::code) answer the common questions without one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field broke the contract (an id with a space, a ttl of zero,
    /// a malformed IP). The server's message names the field, e.g.
    /// `invalid user_id: must not be empty`. Not worth retrying.
    #[error("invalid argument: {}", .0.message())]
    InvalidArgument(#[source] CallError),
    /// SessionStore, or the Redis behind it, could not be reached, or the
    /// connection failed mid-call. Reads were already retried (see
    /// [`Builder::max_attempts`](crate::Builder::max_attempts)), and so were
    /// writes the server provably never processed; any other failed write
    /// may have taken effect.
    #[error("session store unavailable: {}", .0.message())]
    Unavailable(#[source] CallError),
    /// The server refused the call before doing any work because it was at
    /// its limit of concurrent calls (RESOURCE_EXHAUSTED from its concurrency
    /// cap). Reads were already retried; retry later, with backoff.
    #[error("session store overloaded: {}", .0.message())]
    Overloaded(#[source] CallError),
    /// The call did not finish within its budget
    /// ([`Builder::timeout`](crate::Builder::timeout)), retries included. A
    /// write may or may not have taken effect.
    #[error("session store call exceeded its deadline: {}", .0.message())]
    DeadlineExceeded(#[source] CallError),
    /// The server requires a bearer token and none or a wrong one was sent
    /// (see [`Builder::bearer_token`](crate::Builder::bearer_token)).
    #[error("not authenticated to the session store: {}", .0.message())]
    Unauthenticated(#[source] CallError),
    /// Any other failure: RESOURCE_EXHAUSTED other than load shedding (Redis
    /// out of memory), OUT_OF_RANGE (request too large), INTERNAL (a bug, or
    /// a malformed answer), UNKNOWN (a peer refusing the client's TLS
    /// certificate after the handshake). [`code`](Self::code) tells which.
    #[error("session store call failed: {} ({})", .0.code(), .0.message())]
    Other(#[source] CallError),
    /// The client's settings cannot work: a malformed or non-http(s)
    /// endpoint, a TLS option on an `http://` endpoint, a CA or identity
    /// without a PEM certificate, a bearer token over `http://` without
    /// [`allow_plaintext_token`](crate::Builder::allow_plaintext_token), a
    /// bearer token that is not valid header text. Reported by
    /// [`Builder::connect`](crate::Builder::connect) (or
    /// [`set_bearer_token`](crate::SessionClient::set_bearer_token)), never by
    /// a call.
    #[error("invalid session client configuration: {0}")]
    Config(#[source] BoxError),
}

impl Error {
    /// The gRPC code the call failed with; `None` for [`Error::Config`].
    pub fn code(&self) -> Option<Code> {
        self.call_error().map(CallError::code)
    }

    /// The server's (or the transport's) explanation; `None` for
    /// [`Error::Config`], whose `Display` says what is wrong.
    pub fn message(&self) -> Option<&str> {
        self.call_error().map(CallError::message)
    }

    /// Whether making the same call again later may succeed: the failure
    /// was transient (unreachable, overloaded, out of time, a connection cut)
    /// rather than a verdict on the request. Reads were already retried
    /// within their budget. For a write this says nothing about whether a
    /// repeat is safe: a failed write may have taken effect (see
    /// [`SessionClient`](crate::SessionClient)'s notes on writes).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Overloaded(_) | Self::DeadlineExceeded(_) => true,
            Self::Other(call) => call.transport,
            Self::InvalidArgument(_) | Self::Unauthenticated(_) | Self::Config(_) => false,
        }
    }

    fn call_error(&self) -> Option<&CallError> {
        match self {
            Self::InvalidArgument(call)
            | Self::Unavailable(call)
            | Self::Overloaded(call)
            | Self::DeadlineExceeded(call)
            | Self::Unauthenticated(call)
            | Self::Other(call) => Some(call),
            Self::Config(_) => None,
        }
    }

    /// A configuration error carrying `message`.
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config(message.into().into())
    }

    /// An answer the contract does not allow (a session without timestamps):
    /// reported as INTERNAL, as gRPC clients report undecodable responses.
    pub(crate) fn malformed(what: &str) -> Self {
        Self::from(Status::internal(format!(
            "malformed response from the session store: {what}"
        )))
    }
}

/// A failed call's gRPC code and message. The tonic `Status` behind it,
/// metadata and all, is its [`source`](std::error::Error::source).
pub struct CallError {
    status: Status,
    code: Code,
    /// Whether the failure came from this side's transport (a connection
    /// refused, reset or cut) rather than from an answer of the server.
    transport: bool,
}

impl CallError {
    pub(crate) fn new(status: Status) -> Self {
        Self {
            code: Code::from_tonic(status.code()),
            transport: is_transport_failure(&status),
            status,
        }
    }

    /// The gRPC code this failure counts as, always the one of the
    /// [`Error`] variant holding it: a local timer tonic reports as
    /// CANCELLED "Timeout expired" is [`Code::DeadlineExceeded`], a broken
    /// connection tonic reports as UNKNOWN or INTERNAL is
    /// [`Code::Unavailable`]. The status as tonic produced it, with its own
    /// code, is the [`source`](std::error::Error::source).
    pub fn code(&self) -> Code {
        self.code
    }

    /// The same failure counted as `code`, for a status [`Error`] reclassifies.
    fn counted_as(mut self, code: Code) -> Self {
        self.code = code;
        self
    }

    /// The message: the server's for an answer, tonic's for a local failure.
    pub fn message(&self) -> &str {
        self.status.message()
    }
}

impl fmt::Debug for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallError")
            .field("code", &self.code)
            .field("message", &self.status.message())
            .field("transport", &self.transport)
            .finish()
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.status.message())
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.status)
    }
}

/// A gRPC status code, as this crate's own type so that tonic stays out of
/// the client's public shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// Not an error; never in an [`Error`].
    Ok,
    /// The call was cancelled, typically by the caller.
    Cancelled,
    /// An error with no better code, such as a transport failure tonic could
    /// not classify.
    Unknown,
    /// The request broke the contract.
    InvalidArgument,
    /// The deadline passed before the call finished.
    DeadlineExceeded,
    /// Something asked for was not found.
    NotFound,
    /// Something to create already exists.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A quota or capacity ran out: the server's concurrency cap, Redis memory.
    ResourceExhausted,
    /// The system is not in a state the call needs.
    FailedPrecondition,
    /// The call was aborted, typically by a concurrency conflict.
    Aborted,
    /// A value was out of range, such as a request above the size limit.
    OutOfRange,
    /// The server does not implement the method.
    Unimplemented,
    /// A bug, or a malformed answer.
    Internal,
    /// The service could not be reached or could not reach Redis.
    Unavailable,
    /// Unrecoverable data loss.
    DataLoss,
    /// No valid credentials were presented.
    Unauthenticated,
}

impl Code {
    fn from_tonic(code: tonic::Code) -> Self {
        // No `_` arm: a new tonic code fails to compile until placed here.
        match code {
            tonic::Code::Ok => Self::Ok,
            tonic::Code::Cancelled => Self::Cancelled,
            tonic::Code::Unknown => Self::Unknown,
            tonic::Code::InvalidArgument => Self::InvalidArgument,
            tonic::Code::DeadlineExceeded => Self::DeadlineExceeded,
            tonic::Code::NotFound => Self::NotFound,
            tonic::Code::AlreadyExists => Self::AlreadyExists,
            tonic::Code::PermissionDenied => Self::PermissionDenied,
            tonic::Code::ResourceExhausted => Self::ResourceExhausted,
            tonic::Code::FailedPrecondition => Self::FailedPrecondition,
            tonic::Code::Aborted => Self::Aborted,
            tonic::Code::OutOfRange => Self::OutOfRange,
            tonic::Code::Unimplemented => Self::Unimplemented,
            tonic::Code::Internal => Self::Internal,
            tonic::Code::Unavailable => Self::Unavailable,
            tonic::Code::DataLoss => Self::DataLoss,
            tonic::Code::Unauthenticated => Self::Unauthenticated,
        }
    }

    /// The canonical upper-case name, as in `grpc-status` documentation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let call = CallError::new(status);
        let status = &call.status;
        // No `_` arm: every code is placed here on purpose.
        match status.code() {
            tonic::Code::InvalidArgument => Self::InvalidArgument(call),
            tonic::Code::Unavailable => Self::Unavailable(call),
            tonic::Code::DeadlineExceeded => Self::DeadlineExceeded(call),
            // tonic reports its own expired timers (the client's per-call
            // timeout, or the server's reading of grpc-timeout) as CANCELLED
            // "Timeout expired"; to the caller that is a missed deadline.
            tonic::Code::Cancelled if is_timeout(status) => {
                Self::DeadlineExceeded(call.counted_as(Code::DeadlineExceeded))
            }
            tonic::Code::Unauthenticated => Self::Unauthenticated(call),
            tonic::Code::ResourceExhausted if is_load_shedding(status) => Self::Overloaded(call),
            // A connection refused, reset or cut under the call: the server
            // is, for this call, unreachable.
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
                if call.transport =>
            {
                Self::Unavailable(call.counted_as(Code::Unavailable))
            }
            tonic::Code::Ok
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::PermissionDenied
            | tonic::Code::ResourceExhausted
            | tonic::Code::FailedPrecondition
            | tonic::Code::Aborted
            | tonic::Code::OutOfRange
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss => Self::Other(call),
        }
    }
}

/// Whether a CANCELLED status is tonic's expired timer rather than a real
/// cancellation: the local timer leaves [`tonic::TimeoutExpired`] in the
/// source chain; the server's only its message.
pub(crate) fn is_timeout(status: &Status) -> bool {
    chain_has::<tonic::TimeoutExpired>(status)
        || status.message() == tonic::TimeoutExpired(()).to_string()
}

/// Whether `status` is this side's timer expiring (tonic's own timeout),
/// rather than the server answering that its reading of `grpc-timeout`
/// expired: the server at the other end did not answer in time.
pub(crate) fn is_local_timeout(status: &Status) -> bool {
    chain_has::<tonic::TimeoutExpired>(status)
}

/// Whether a read failing with `status` is worth another attempt: the server
/// or its Redis unreachable, a connection cut mid-call, the server's load
/// shedding, or an attempt past its own deadline (the call's budget decides
/// whether another fits). Exactly the statuses [`Error::is_retryable`] calls
/// retryable.
pub(crate) fn is_transient(status: &Status) -> bool {
    // No `_` arm: every code is placed here on purpose.
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
        tonic::Code::ResourceExhausted => is_load_shedding(status),
        tonic::Code::Cancelled => is_timeout(status) || is_transport_failure(status),
        tonic::Code::Unknown | tonic::Code::Internal => is_transport_failure(status),
        tonic::Code::Ok
        | tonic::Code::InvalidArgument
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists
        | tonic::Code::PermissionDenied
        | tonic::Code::FailedPrecondition
        | tonic::Code::Aborted
        | tonic::Code::OutOfRange
        | tonic::Code::Unimplemented
        | tonic::Code::DataLoss
        | tonic::Code::Unauthenticated => false,
    }
}

/// Whether RESOURCE_EXHAUSTED is the server's load shedding (its concurrency
/// cap refused the call before any work) rather than Redis out of memory.
/// The server says so in its message (session-server/src/limits.rs); the
/// end-to-end test `an_overloaded_server_is_overloaded` pins that wording.
pub(crate) fn is_load_shedding(status: &Status) -> bool {
    status.code() == tonic::Code::ResourceExhausted
        && status.message().starts_with("server is at its limit of ")
}

/// Whether the status was made by this side's transport (tonic keeps the
/// transport error as its source) rather than sent by the server, whose
/// statuses arrive without one.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    chain_has::<tonic::transport::Error>(status) || chain_has::<tonic::ConnectError>(status)
}

/// Whether the request provably never left this process: the connection it
/// was to use could not be opened (TCP refused or timed out, TLS handshake
/// failed), so the server cannot have seen it.
pub(crate) fn never_sent(status: &Status) -> bool {
    chain_has::<tonic::ConnectError>(status)
}

/// Whether the server provably never processed the request, on a connection
/// that was open: the case of gRPC's "transparent retry", safe to repeat for
/// any method, writes included. Three failures prove it, each found by its
/// type in the status's source chain (tonic keeps hyper's error there, and
/// hyper keeps h2's):
///
/// - hyper's `Canceled`: the request was still in hyper's queue for the
///   connection, never handed to HTTP/2, when the connection closed
///   ("connection closed"), or the connection was already closed when it was
///   queued ("connection was not ready"). On an HTTP/2 client connection
///   hyper makes no other `Canceled` (hyper `client/dispatch.rs`,
///   `client/conn/http2.rs`). This is what a GOAWAY does to the calls
///   queued behind it: hyper's dispatcher ends as soon as h2 reports the
///   connection going away, and drops its queue.
/// - h2's error for a GOAWAY received from the server: h2 gives it to the
///   streams whose id is above the GOAWAY's last-stream-id (RFC 9113 6.8:
///   the server did not and will not process them) and to any stream opened
///   after the GOAWAY arrived (never sent). hyper also gives it to a request
///   whose stream h2 opened just as the GOAWAY arrived (`poll_ready` failing
///   right after `send_request`, hyper `proto/h2/client.rs`): its HEADERS
///   may have left, but never its body, which hyper drops (h2 then resets
///   the stream); a gRPC request without its message (tonic always sends
///   one) cannot be processed. A stream the server accepted, with its body,
///   and then lost to the connection closing fails with an I/O error
///   instead.
/// - h2's `REFUSED_STREAM` reset from the server: the stream was closed
///   "prior to any processing" (RFC 9113 8.7), as a server over its
///   concurrent stream limit does.
///
/// MAX_CONNECTION_AGE makes the first two on every connection it ages out
/// under load.
pub(crate) fn never_processed(status: &Status) -> bool {
    chain_any(status, |err| {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        false
    })
}

fn chain_has<E: std::error::Error + 'static>(status: &Status) -> bool {
    chain_any(status, |err| err.is::<E>())
}

/// Whether `check` holds for the status or any error in its source chain.
fn chain_any(status: &Status, check: impl Fn(&(dyn std::error::Error + 'static)) -> bool) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(err) = source {
        if check(err) {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// Each gRPC code lands in the variant a caller branches on, keeping the status.
    #[test]
    fn codes_map_to_the_variants_callers_branch_on() {
        let err = Error::from(Status::invalid_argument(
            "invalid user_id: must not be empty",
        ));
        assert!(
            matches!(&err, Error::InvalidArgument(e) if e.message() == "invalid user_id: must not be empty")
        );
        assert_eq!(err.code(), Some(Code::InvalidArgument));
        assert!(!err.is_retryable());

        let err = Error::from(Status::unavailable("redis is down"));
        assert!(matches!(&err, Error::Unavailable(e) if e.message() == "redis is down"));
        assert_eq!(err.code(), Some(Code::Unavailable));
        assert!(err.is_retryable());

        let err = Error::from(Status::deadline_exceeded("late"));
        assert!(matches!(err, Error::DeadlineExceeded(_)));
        assert!(err.is_retryable());

        let err = Error::from(Status::resource_exhausted(
            "server is at its limit of 4 concurrent calls; retry with backoff",
        ));
        assert!(matches!(err, Error::Overloaded(_)), "{err:?}");
        assert!(err.is_retryable());

        for code in [
            tonic::Code::ResourceExhausted,
            tonic::Code::Aborted,
            tonic::Code::Internal,
            tonic::Code::Unknown,
        ] {
            let err = Error::from(Status::new(code, "x"));
            assert!(
                matches!(&err, Error::Other(e) if e.code() == Code::from_tonic(code)),
                "{code:?}"
            );
            assert!(!err.is_retryable(), "{code:?}");
        }
        let config = Error::config("bad");
        assert_eq!((config.code(), config.message()), (None, None));
        assert!(!config.is_retryable());
    }

    /// The tonic status is reachable as the source, with its message.
    #[test]
    fn the_status_is_the_source() {
        let err = Error::from(Status::unauthenticated("missing bearer token"));
        assert!(matches!(&err, Error::Unauthenticated(_)), "{err:?}");
        let call = err.source().expect("a call error");
        let status = call.source().expect("the status");
        let status = status.downcast_ref::<Status>().expect("a tonic status");
        assert_eq!(status.message(), "missing bearer token");
        assert!(err.to_string().contains("missing bearer token"));
    }

    /// tonic's expired timers (local or the server's) are DeadlineExceeded; a real cancel is not.
    #[test]
    fn tonic_timer_expiry_is_a_deadline_but_a_plain_cancel_is_not() {
        let local = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(local.code(), tonic::Code::Cancelled);
        assert!(matches!(Error::from(local), Error::DeadlineExceeded(_)));

        let remote = Status::cancelled("Timeout expired");
        assert!(matches!(Error::from(remote), Error::DeadlineExceeded(_)));

        let cancelled = Status::cancelled("the caller went away");
        assert!(matches!(Error::from(cancelled), Error::Other(_)));
    }

    /// `code()` always agrees with the variant, and the status tonic produced
    /// (with its own code) stays reachable as the source.
    #[test]
    fn the_code_agrees_with_the_variant_and_the_source_keeps_the_original() {
        fn source_code(err: &Error) -> tonic::Code {
            let call = err.source().expect("a call error");
            let status = call.source().expect("the status");
            status.downcast_ref::<Status>().expect("a status").code()
        }
        let local = Error::from(Status::from_error(Box::new(tonic::TimeoutExpired(()))));
        assert!(matches!(local, Error::DeadlineExceeded(_)), "{local:?}");
        assert_eq!(local.code(), Some(Code::DeadlineExceeded));
        assert_eq!(source_code(&local), tonic::Code::Cancelled);

        let remote = Error::from(Status::cancelled("Timeout expired"));
        assert_eq!(remote.code(), Some(Code::DeadlineExceeded));

        // A connection cut mid-call: tonic says UNKNOWN "transport error"
        // (or INTERNAL, CANCELLED) with its transport error as the source.
        let transport_status = |code| {
            let cut = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
            let mut status = Status::new(code, "transport error");
            status.set_source(std::sync::Arc::new(tonic::ConnectError(Box::new(cut))));
            status
        };
        for code in [
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::Cancelled,
        ] {
            let err = Error::from(transport_status(code));
            assert!(matches!(err, Error::Unavailable(_)), "{code:?}: {err:?}");
            assert_eq!(err.code(), Some(Code::Unavailable), "{code:?}");
            assert_eq!(source_code(&err), code);
        }
        for code in [
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::Cancelled,
        ] {
            let err = Error::from(Status::new(code, "x"));
            assert!(matches!(err, Error::Other(_)), "{code:?}");
            assert_eq!(err.code(), Some(Code::from_tonic(code)));
        }
    }

    /// A refused connection is a never-sent transport failure; a server's answer is neither.
    #[test]
    fn connect_errors_are_never_sent_and_answers_are_not_transport() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(never_sent(&status) && is_transport_failure(&status));

        let answer = Status::unavailable("redis is down");
        assert!(!never_sent(&answer) && !is_transport_failure(&answer));
    }

    /// The status tonic makes of a transport error (it keeps the error as
    /// the source).
    fn tonic_status(err: impl std::error::Error + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(err))
    }

    /// Real hyper and h2 errors, made over an in-memory HTTP/2 connection:
    /// a request hyper never handed to the connection, a stream the server
    /// refused and one opened after its GOAWAY were never processed; a
    /// stream the server accepted and then cancelled, or lost to the
    /// connection closing after its GOAWAY, may have been; an answer or a
    /// plain cancel is neither.
    #[tokio::test]
    async fn only_failures_the_server_never_processed_are_unprocessed() {
        // hyper: the connection's dispatcher is gone before the request is
        // queued, as when a GOAWAY ends it with calls still queued.
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .unwrap();
        drop(connection);
        let canceled = sender
            .send_request(http::Request::new(String::new()))
            .await
            .unwrap_err();
        assert!(canceled.is_canceled(), "{canceled:?}");
        let status = tonic_status(canceled);
        assert_eq!(status.message(), "operation was canceled");
        assert!(never_processed(&status) && !never_sent(&status));

        // h2: a server that refuses stream 1, cancels stream 3 after taking
        // it, and closes the connection (GOAWAY, last stream 5) with stream
        // 5 taken and unanswered.
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (_, mut refused) = connection.accept().await.unwrap().unwrap();
            refused.send_reset(h2::Reason::REFUSED_STREAM);
            let (_, mut cancelled) = connection.accept().await.unwrap().unwrap();
            cancelled.send_reset(h2::Reason::CANCEL);
            let (_, _taken) = connection.accept().await.unwrap().unwrap();
            connection.abrupt_shutdown(h2::Reason::NO_ERROR);
            while connection.accept().await.is_some() {}
        });
        let (send, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut send = send.ready().await.unwrap();
        let mut call = || -> Result<h2::client::ResponseFuture, h2::Error> {
            let request = http::Request::post("http://test/m").body(()).unwrap();
            Ok(send.send_request(request, true)?.0)
        };
        let refused = call().unwrap().await.unwrap_err();
        assert_eq!(refused.reason(), Some(h2::Reason::REFUSED_STREAM));
        assert!(never_processed(&tonic_status(refused)));

        let cancelled = call().unwrap().await.unwrap_err();
        assert_eq!(cancelled.reason(), Some(h2::Reason::CANCEL));
        assert!(!never_processed(&tonic_status(cancelled)));

        let lost = call().unwrap().await.unwrap_err();
        assert!(lost.is_io(), "accepted, then cut: {lost:?}");
        assert!(!never_processed(&tonic_status(lost)));

        let after_goaway = call().unwrap_err();
        assert!(
            after_goaway.is_go_away() && after_goaway.is_remote(),
            "{after_goaway:?}"
        );
        assert!(never_processed(&tonic_status(after_goaway)));
        server.await.unwrap();

        for status in [
            Status::unavailable("redis is down"),
            Status::cancelled("the caller went away"),
            Status::internal("h2 protocol error: http2 error"),
        ] {
            assert!(!never_processed(&status), "{status:?}");
        }
    }
}
