//! A tower layer that observes each RPC: one structured log line (method, gRPC
//! status code, latency) at a level chosen from the code, and the RPC count
//! and latency metrics.
//!
//! It runs on every call, so it is kept cheap: the method label is a static
//! string (no copy of the path), and the metric handles of each (method, code)
//! pair are looked up in the recorder once and then kept, instead of building
//! a labelled key and searching the registry twice per call.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use metrics::{Counter, Histogram};

use tonic::{
    Code,
    codegen::http::{Request, Response},
};
use tower::{Layer, Service};

/// Adds per-RPC logging to a service stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // The server applies the layer once, after `main` installed the
        // recorder, so the handles kept here record into that recorder.
        RpcLog {
            inner,
            handles: Arc::new(Handles::default()),
        }
    }
}

/// The service made by [`RpcLogLayer`].
#[derive(Clone, Debug)]
pub struct RpcLog<S> {
    inner: S,
    handles: Arc<Handles>,
}

/// How many gRPC codes there are (0 OK to 16 UNAUTHENTICATED).
const CODES: usize = 17;

/// The RPC counter and latency histogram of each (method, code) pair, made on
/// first use. Indexed by [`KNOWN`] position (then "other") and code.
struct Handles {
    slots: Box<[OnceLock<(Counter, Histogram)>]>,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            slots: (0..(KNOWN.len() + 1) * CODES)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

impl fmt::Debug for Handles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handles").finish_non_exhaustive()
    }
}

impl Handles {
    fn record(&self, method: Method, code: Code, elapsed_secs: f64) {
        // `Code` values are 0..=16, so the index is in bounds.
        let index = method.index * CODES + code as usize;
        let (requests, duration) = self.slots[index].get_or_init(|| {
            let labels = [("method", method.label), ("code", code_name(code))];
            (
                metrics::counter!(crate::metrics::RPC_REQUESTS, &labels),
                metrics::histogram!(crate::metrics::RPC_DURATION, &labels),
            )
        });
        requests.increment(1);
        duration.record(elapsed_secs);
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = Method::of(path);
        // Only an unknown path is copied, so the log can say what was asked.
        let unknown_path = (method.index == KNOWN.len()).then(|| path.to_owned());
        let handles = self.handles.clone();
        let start = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                // A unary success carries its status in the trailers; an error
                // is sent "trailers-only", with grpc-status in the headers.
                Ok(response) => tonic::Status::from_header_map(response.headers())
                    .map_or(Code::Ok, |status| status.code()),
                Err(_) => Code::Unknown,
            };
            let elapsed = start.elapsed().as_secs_f64();
            log_rpc(
                unknown_path.as_deref().unwrap_or(method.label),
                code,
                elapsed * 1e3,
            );
            handles.record(method, code, elapsed);
            result
        })
    }
}

/// The methods that keep their path as the metric label.
const KNOWN: &[&str] = &[
    "/sessionstore.v1.SessionStore/CreateSession",
    "/sessionstore.v1.SessionStore/GetSession",
    "/sessionstore.v1.SessionStore/RevokeSession",
    "/sessionstore.v1.SessionStore/RevokeAllUserSessions",
    "/sessionstore.v1.SessionStore/GetUserSessionCount",
    "/sessionstore.v1.SessionStore/ListUserSessions",
    "/sessionstore.v1.SessionStore/RecordLoginAttempt",
    "/sessionstore.v1.SessionStore/ResetLoginAttempts",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// The method as a metric label: known services keep their path, anything else
/// is "other", so a caller probing random paths cannot grow the label set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Method {
    /// Position in [`KNOWN`], or `KNOWN.len()` for "other".
    index: usize,
    label: &'static str,
}

impl Method {
    fn of(path: &str) -> Self {
        match KNOWN.iter().position(|known| *known == path) {
            Some(index) => Self {
                index,
                label: KNOWN[index],
            },
            None => Self {
                index: KNOWN.len(),
                label: "other",
            },
        }
    }
}

/// The canonical upper-case name of a gRPC code, as other gRPC stacks label it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How loudly an RPC's outcome is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loudness {
    /// Routine: successes, and health probes whatever their answer.
    Debug,
    /// The caller's mistake: worth seeing, not worth paging for.
    Info,
    /// The service could not do its job (Redis down, overload, deadline).
    Warn,
    /// A bug.
    Error,
}

fn loudness(method: &str, code: Code) -> Loudness {
    if method.starts_with("/grpc.health.v1.Health/") {
        return Loudness::Debug;
    }
    match code {
        Code::Ok => Loudness::Debug,
        Code::Cancelled
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => Loudness::Info,
        Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted | Code::Unavailable => {
            Loudness::Warn
        }
        Code::Unknown | Code::Internal | Code::DataLoss => Loudness::Error,
    }
}

fn log_rpc(method: &str, code: Code, latency_ms: f64) {
    match loudness(method, code) {
        Loudness::Debug => tracing::debug!(method, code = code_name(code), latency_ms, "rpc"),
        Loudness::Info => tracing::info!(method, code = code_name(code), latency_ms, "rpc"),
        Loudness::Warn => tracing::warn!(method, code = code_name(code), latency_ms, "rpc"),
        Loudness::Error => tracing::error!(method, code = code_name(code), latency_ms, "rpc"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label() {
        let get = Method::of("/sessionstore.v1.SessionStore/GetSession");
        assert_eq!(get.label, "/sessionstore.v1.SessionStore/GetSession");
        assert_eq!(KNOWN[get.index], get.label);
        let probe = Method::of("/evil/../path");
        assert_eq!((probe.index, probe.label), (KNOWN.len(), "other"));
    }

    #[test]
    fn every_method_and_code_has_a_slot() {
        let handles = Handles::default();
        for index in 0..=KNOWN.len() {
            for code in 0..CODES {
                let method = Method {
                    index,
                    label: KNOWN.get(index).copied().unwrap_or("other"),
                };
                let code = Code::from_i32(i32::try_from(code).unwrap());
                handles.record(method, code, 0.001);
            }
        }
        assert!(handles.slots.iter().all(|slot| slot.get().is_some()));
    }

    #[test]
    fn levels_follow_the_status() {
        let m = "/sessionstore.v1.SessionStore/GetSession";
        assert_eq!(loudness(m, Code::Ok), Loudness::Debug);
        assert_eq!(loudness(m, Code::InvalidArgument), Loudness::Info);
        assert_eq!(loudness(m, Code::Unavailable), Loudness::Warn);
        assert_eq!(loudness(m, Code::Internal), Loudness::Error);
        assert_eq!(
            loudness("/grpc.health.v1.Health/Check", Code::Unavailable),
            Loudness::Debug
        );
    }
}
