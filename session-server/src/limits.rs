//! Bounds on each call, as a tower layer inside authentication (a refused
//! caller never takes a permit):
//!
//! - a cap on concurrent unary calls (MAX_CONCURRENT_REQUESTS) and a deadline
//!   (the caller's `grpc-timeout`, shortened to the server's
//!   REQUEST_TIMEOUT_MS) past which the work is dropped and the caller gets
//!   DEADLINE_EXCEEDED;
//! - a separate cap on open streaming calls ([`MAX_STREAMS`]: reflection, the
//!   revocation stream), each holding its permit for its whole life, until
//!   its response ends or the caller goes away. Streams are long-lived by
//!   design, so they have their own pool: a full set of open streams cannot
//!   starve unary calls, and a burst of unary calls cannot close the streams.
//!   REQUEST_TIMEOUT_MS bounds only the wait for a stream's response headers;
//!   the caller's `grpc-timeout`, when sent, bounds the whole stream;
//! - health: Check is exempt from the caps (an overloaded pod is still alive,
//!   and probes must not queue behind, or be refused by, the calls that
//!   overload it) but not from the deadline; Watch streams, which anyone may
//!   open since health needs no token, have a pool of their own
//!   ([`MAX_HEALTH_WATCHES`]) so they can starve neither probes nor the
//!   authenticated streams.
//!
//! Which methods stream, and which are health's, is read from the method
//! table ([`crate::methods`], built from the services' descriptor sets), so
//! a new streaming method is counted as a stream without a list to keep up
//! to date. Every cap refuses the excess with
//! RESOURCE_EXHAUSTED at once, never a growing queue.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::Frame;
use tokio::time::{Instant, Sleep, Timeout};
use tonic::codegen::{
    Bytes,
    http::{HeaderMap, HeaderName, Request, Response},
};
use tower::{Layer, Service};

use crate::methods::Methods;

/// Most streaming calls other than health Watch open at once (reflection,
/// the revocation stream). One per watching client process is the expected
/// use; a fixed bound rather than a setting until a deployment needs more.
pub const MAX_STREAMS: usize = 1024;

/// Most health Watch streams open at once. Health needs no token, so these
/// have their own pool: an anonymous caller filling it refuses only other
/// Watch streams, never probes (Check) or authenticated streams. Kubelet and
/// load balancers probe with Check; Watch is for gRPC clients' own health
/// checking, one stream per connection. The server sizes the pool to
/// MAX_CONNECTIONS (`server::Bounds`); this is the default of `Bounds`
/// only, which in-process tests use.
pub const MAX_HEALTH_WATCHES: usize = 256;

/// A pool of permits and what its refusal says.
///
/// A count of the permits taken rather than a `tokio::sync::Semaphore`:
/// no call ever waits for a permit (the excess is refused at once), and a
/// semaphore's release takes its waiters' lock on every call, for waiters
/// there never are (about 130 instructions a call; BENCHMARKS.md, "#22 hot
/// path").
#[derive(Debug)]
struct Pool {
    /// Permits taken, at most `max`.
    taken: Arc<AtomicUsize>,
    max: usize,
    /// The noun in the refusal: "calls", "streams", "health watches".
    what: &'static str,
}

/// A permit of a [`Pool`], given back when dropped.
#[derive(Debug)]
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Pool {
    fn new(max: usize, what: &'static str) -> Self {
        Self {
            taken: Arc::new(AtomicUsize::new(0)),
            max,
            what,
        }
    }

    /// A permit, unless all `max` are taken.
    fn try_acquire(&self) -> Option<Permit> {
        self.taken
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |taken| {
                (taken < self.max).then_some(taken + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(&self.taken)))
    }

    /// The RESOURCE_EXHAUSTED answer when no permit is left.
    fn refusal(&self) -> Response<tonic::body::Body> {
        tonic::Status::resource_exhausted(format!(
            "server is at its limit of {} concurrent {}; retry with backoff",
            self.max, self.what
        ))
        .into_http()
    }
}

#[derive(Debug)]
struct Shared {
    calls: Pool,
    streams: Pool,
    health_watches: Pool,
    timeout: Duration,
    /// Which calls stream, and which are health's.
    methods: &'static Methods,
}

/// Adds the caps and the deadline to a service stack.
#[derive(Clone, Debug)]
pub struct LimitsLayer {
    shared: Arc<Shared>,
}

impl LimitsLayer {
    /// At most `max_concurrent` unary calls at once, each at most `timeout`
    /// long; [`MAX_STREAMS`] streams and [`MAX_HEALTH_WATCHES`] health Watch
    /// streams (until [`LimitsLayer::stream_caps`] says otherwise). Which
    /// calls stream, and which are health's, `methods` says.
    pub fn new(methods: &'static Methods, max_concurrent: usize, timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                calls: Pool::new(max_concurrent, "calls"),
                streams: Pool::new(MAX_STREAMS, "streams"),
                health_watches: Pool::new(MAX_HEALTH_WATCHES, "health watches"),
                timeout,
                methods,
            }),
        }
    }

    /// At most `max_streams` streams open at once, and `max_health_watches`
    /// health Watch streams.
    pub fn stream_caps(self, max_streams: usize, max_health_watches: usize) -> Self {
        let shared = &self.shared;
        Self {
            shared: Arc::new(Shared {
                calls: Pool::new(shared.calls.max, "calls"),
                streams: Pool::new(max_streams, "streams"),
                health_watches: Pool::new(max_health_watches, "health watches"),
                timeout: shared.timeout,
                methods: shared.methods,
            }),
        }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`LimitsLayer`].
#[derive(Clone, Debug)]
pub struct Limits<S> {
    inner: S,
    layer: LimitsLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Limits<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = LimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &self.layer.shared;
        let method = shared.methods.resolve(request.uri().path());
        let (health, stream) = (method.is_health(), method.is_streaming());
        let pool = match (health, stream) {
            (true, false) => None,
            (true, true) => Some(&shared.health_watches),
            (false, true) => Some(&shared.streams),
            (false, false) => Some(&shared.calls),
        };
        let permit = match pool {
            None => None,
            Some(pool) => match pool.try_acquire() {
                Some(permit) => Some(permit),
                None => {
                    return LimitsFuture {
                        call: None,
                        refusal: Some(pool.refusal()),
                        permit: None,
                        stream_deadline: None,
                        timeout: shared.timeout,
                    };
                }
            },
        };
        let caller = caller_timeout(request.headers());
        let timeout = caller.map_or(shared.timeout, |t| t.min(shared.timeout));
        // A stream's whole life is bounded only by the caller's deadline.
        let stream_deadline = if stream {
            Some(caller.and_then(|t| Instant::now().checked_add(t)))
        } else {
            None
        };
        LimitsFuture {
            call: Some(tokio::time::timeout(timeout, self.inner.call(request))),
            refusal: None,
            permit,
            stream_deadline,
            timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Limits`]: the call under its deadline,
    /// holding its permit, or a refusal. Not boxed: it is polled inside the
    /// future of the layer around it.
    #[derive(Debug)]
    pub struct LimitsFuture<F> {
        // `None` when the call was refused.
        #[pin]
        call: Option<Timeout<F>>,
        refusal: Option<Response<tonic::body::Body>>,
        // A unary call's permit goes back when the answer comes; a stream's
        // goes into its body.
        permit: Option<Permit>,
        // `Some` for a stream: the caller's deadline, if it gave one.
        stream_deadline: Option<Option<Instant>>,
        timeout: Duration,
    }
}

impl<F, B, E> Future for LimitsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_pin_mut() else {
            // Taken only here, when the future completes; a future may not be
            // polled after that (the `Future` contract).
            let refusal = this
                .refusal
                .take()
                .expect("LimitsFuture polled after completion");
            return Poll::Ready(Ok(refusal));
        };
        let result = std::task::ready!(call.poll(cx));
        // The unary permit goes back here: the work is done, the body only
        // carries what it produced.
        let permit = this.permit.take();
        Poll::Ready(match result {
            Ok(Ok(response)) => match this.stream_deadline.take() {
                None => Ok(response.map(tonic::body::Body::new)),
                Some(deadline) => Ok(response.map(|body| {
                    tonic::body::Body::new(HeldBody {
                        inner: tonic::body::Body::new(body),
                        permit,
                        deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                        trailers_sent: false,
                    })
                })),
            },
            Ok(Err(err)) => Err(err),
            // Dropping the inner future cancels the work, Redis round trip
            // included.
            Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                "deadline of {} ms exceeded",
                this.timeout.as_millis()
            ))
            .into_http()),
        })
    }
}

/// A stream's response body, holding the stream's permit until it ends or
/// is dropped (the caller cancelled or went away), and ending it with
/// DEADLINE_EXCEEDED when the caller's deadline passes.
struct HeldBody {
    inner: tonic::body::Body,
    permit: Option<Permit>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Trailers end a gRPC response; nothing may follow them.
    trailers_sent: bool,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if !this.trailers_sent
            && let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            // Dropping the inner body ends the stream's work.
            this.inner = tonic::body::Body::empty();
            this.permit = None;
            this.deadline = None;
            this.trailers_sent = true;
            let (parts, _) = tonic::Status::deadline_exceeded("deadline exceeded")
                .into_http::<()>()
                .into_parts();
            return Poll::Ready(Some(Ok(Frame::trailers(parts.headers))));
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) if frame.is_trailers() => this.trailers_sent = true,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                this.trailers_sent = true;
                this.permit = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The caller's deadline from the `grpc-timeout` header: 1 to 8 ASCII digits
/// and a unit (H, M, S, m, u, n), as the gRPC spec writes it and tonic reads
/// it to enforce it. Anything else (a sign, a decimal point, a space) is
/// malformed and ignored, as gRPC servers do. The one parser of the header:
/// [`crate::observe`] uses it too, so the deadline a call is held to and the
/// one its metrics judge it by are the same.
pub(crate) fn caller_timeout(headers: &HeaderMap) -> Option<Duration> {
    // A `HeaderName` made once: looking the header up by `&str` parses and
    // validates the name on every call (twice per call: here and in
    // `observe`).
    static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    // Found by comparing names, not by `HeaderMap::get`: a gRPC request
    // carries a handful of headers, most of them standard names that differ
    // from this custom one at the first comparison, where `get` hashes the
    // name byte by byte and probes (about 145 instructions, twice a call;
    // BENCHMARKS.md "#22 hot path"). The first value, as `get` gives.
    let value = headers
        .iter()
        .find_map(|(name, value)| (*name == GRPC_TIMEOUT).then_some(value))?
        .to_str()
        .ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    // `u64::from_str` alone would accept a leading `+`.
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn methods() -> &'static Methods {
        Methods::served().unwrap()
    }

    fn header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            caller_timeout(&header("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            caller_timeout(&header("3M")),
            Some(Duration::from_secs(180))
        );
        assert_eq!(caller_timeout(&header("5S")), Some(Duration::from_secs(5)));
        assert_eq!(
            caller_timeout(&header("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            caller_timeout(&header("7u")),
            Some(Duration::from_micros(7))
        );
        assert_eq!(caller_timeout(&header("9n")), Some(Duration::from_nanos(9)));
    }

    /// A service that takes `delay` and records whether it ran to the end.
    fn slow_service(
        delay: Duration,
        finished: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl Service<
        Request<()>,
        Response = Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<Response<tonic::body::Body>, std::convert::Infallible>>
                 + Send
                 + 'static,
    > + Clone {
        tower::service_fn(move |_request: Request<()>| {
            let finished = finished.clone();
            async move {
                tokio::time::sleep(delay).await;
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default()))
            }
        })
    }

    fn grpc_status(response: &Response<tonic::body::Body>) -> Option<tonic::Code> {
        tonic::Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_cuts_the_call_short_and_drops_the_work() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(methods(), 8, Duration::from_secs(5))
            .layer(slow_service(Duration::from_secs(2), finished.clone()));
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        let started = tokio::time::Instant::now();
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !finished.load(std::sync::atomic::Ordering::SeqCst),
            "work was not cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_server_timeout_caps_a_longer_caller_deadline() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(methods(), 8, Duration::from_millis(300))
            .layer(slow_service(Duration::from_secs(2), finished));
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "10S".parse().unwrap());
        let started = tokio::time::Instant::now();
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn excess_calls_are_refused_and_health_is_exempt() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(methods(), 1, Duration::from_secs(5))
            .layer(slow_service(Duration::from_secs(1), finished));
        let first = service.call(Request::new(()));
        let refused = service.call(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&refused), Some(tonic::Code::ResourceExhausted));
        let mut probe = Request::new(());
        *probe.uri_mut() = "/grpc.health.v1.Health/Check".parse().unwrap();
        let probed = service.call(probe).await.unwrap();
        assert_eq!(grpc_status(&probed), None, "health was refused");
        let first = first.await.unwrap();
        assert_eq!(grpc_status(&first), None);
        // The permit is back once the first call is done.
        let again = service.call(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    /// A response body that never ends on its own, like an idle stream.
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            Poll::Pending
        }
    }

    /// Answers at once with an [`Endless`] body.
    fn streaming_service() -> impl Service<
        Request<()>,
        Response = Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<Response<tonic::body::Body>, std::convert::Infallible>>
                 + Send
                 + 'static,
    > + Clone {
        tower::service_fn(|_request: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::new(Endless)))
        })
    }

    const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

    fn to(path: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.uri_mut() = path.parse().unwrap();
        request
    }

    /// A stream keeps its permit until its response is dropped (the caller
    /// went away), not just until its headers are sent; a full stream pool
    /// refuses streams only, and health Watch streams have their own pool.
    #[tokio::test]
    async fn a_stream_holds_its_permit_for_its_whole_life() {
        let mut service = LimitsLayer::new(methods(), 1, Duration::from_secs(5))
            .stream_caps(1, 1)
            .layer(streaming_service());
        let first = service.call(to(REFLECTION)).await.unwrap();
        assert_eq!(grpc_status(&first), None);
        let refused = service.call(to(REFLECTION)).await.unwrap();
        assert_eq!(grpc_status(&refused), Some(tonic::Code::ResourceExhausted));
        assert!(
            tonic::Status::from_header_map(refused.headers())
                .unwrap()
                .message()
                .contains("limit of 1 concurrent streams")
        );
        // Unary calls and health do not share the stream pool.
        let unary = service.call(to("/sessionstore.v1.SessionStore/GetSession"));
        assert_eq!(grpc_status(&unary.await.unwrap()), None);
        let watch = service.call(to(HEALTH_WATCH)).await.unwrap();
        assert_eq!(grpc_status(&watch), None);
        let second_watch = service.call(to(HEALTH_WATCH)).await.unwrap();
        assert_eq!(
            grpc_status(&second_watch),
            Some(tonic::Code::ResourceExhausted)
        );
        let check = service.call(to("/grpc.health.v1.Health/Check")).await;
        assert_eq!(grpc_status(&check.unwrap()), None);
        // The caller goes away: the permit comes back.
        drop(first);
        let again = service.call(to(REFLECTION)).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    /// The caller's deadline ends a stream that outlives it, with
    /// DEADLINE_EXCEEDED in the trailers, and frees its permit; without a
    /// caller deadline a stream outlives REQUEST_TIMEOUT_MS.
    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_ends_a_stream() {
        let mut service = LimitsLayer::new(methods(), 8, Duration::from_millis(300))
            .stream_caps(1, 1)
            .layer(streaming_service());
        let mut request = to(REFLECTION);
        request
            .headers_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        let started = tokio::time::Instant::now();
        let mut body = service.call(request).await.unwrap().into_body();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(
            tonic::Status::from_header_map(&trailers).map(|s| s.code()),
            Some(tonic::Code::DeadlineExceeded)
        );
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(end.is_none());
        // The permit is back even though the body itself is still held.
        let mut open = service.call(to(REFLECTION)).await.unwrap().into_body();
        let idle = tokio::time::timeout(
            Duration::from_secs(60),
            std::future::poll_fn(|cx| Pin::new(&mut open).poll_frame(cx)),
        )
        .await;
        assert!(idle.is_err(), "a stream without a caller deadline ended");
    }

    /// Health Check is exempt from the cap but not from the deadline: a probe
    /// that never finishes cannot hold a task forever.
    #[tokio::test(start_paused = true)]
    async fn health_checks_have_a_deadline() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(methods(), 1, Duration::from_millis(300))
            .layer(slow_service(Duration::from_secs(60), finished));
        let response = service
            .call(to("/grpc.health.v1.Health/Check"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::DeadlineExceeded));
    }

    #[test]
    fn malformed_grpc_timeout_is_ignored() {
        for bad in [
            "",
            "m",
            "123456789m",
            "10x",
            "-1S",
            "+5S",
            "+1m",
            " 5S",
            "1.5S",
            "5 S",
        ] {
            assert_eq!(caller_timeout(&header(bad)), None, "{bad:?}");
        }
        assert_eq!(caller_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_timeout_is_found_among_other_headers_and_its_first_value_counts() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        headers.insert("te", "trailers".parse().unwrap());
        headers.insert("x-custom", "5S".parse().unwrap());
        headers.append("grpc-timeout", "250m".parse().unwrap());
        headers.append("grpc-timeout", "9S".parse().unwrap());
        headers.insert("user-agent", "tonic".parse().unwrap());
        assert_eq!(caller_timeout(&headers), Some(Duration::from_millis(250)));
        headers.remove("grpc-timeout");
        assert_eq!(caller_timeout(&headers), None);
    }
}
