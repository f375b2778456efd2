//! A tower layer that observes each RPC: one structured log line (method, gRPC
//! status code, latency) at a level chosen from the code, and the RPC count
//! and latency metrics.
//!
//! Every call is recorded exactly once. A unary call is recorded when its
//! response future ends: with the code it answered, or, when the future is
//! dropped first (the caller cancelled, or tonic's own `grpc-timeout` timer
//! fired outside this layer), as CANCELLED or DEADLINE_EXCEEDED. A streaming
//! call is recorded when its response body ends, since its headers say
//! nothing of how it will end: with the `grpc-status` of its trailers (OK,
//! DEADLINE_EXCEEDED from the caller's deadline, UNAVAILABLE at shutdown, a
//! handler's error), or CANCELLED (DEADLINE_EXCEEDED at its deadline) when
//! the body is dropped before its end (the caller reset the stream or went
//! away), and its latency is the stream's whole life. A stream refused
//! outright (trailers-only) is recorded at once, like a unary call. A drop
//! guard does the recording, so no path out of a call skips it.
//!
//! Counters are exact; log lines are not. A flood of refusals (calls shed by
//! the concurrency cap, unauthenticated or invalid calls, probes of unknown
//! paths) would otherwise write a line per call exactly when the server is
//! busiest, so lines at INFO and above are rate-limited per gRPC code (see
//! [`LOG_LINES_PER_SECOND`]); the next line written for a code says how many
//! were left out, and RPC_LOG_LINES_SUPPRESSED counts them. A path that is not
//! a known method is logged as method `other`, with at most
//! [`LOGGED_PATH_CHARS`] printable ASCII characters of it.
//!
//! With traces on (OTEL_EXPORTER_OTLP_ENDPOINT, see [`crate::trace`]) each
//! call is also a server span, child of the caller's `traceparent` when it
//! sent a valid one, with the OpenTelemetry RPC attributes (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`); the handler runs
//! inside it, so the store's Redis spans are its children, and the call's
//! log line carries its `trace_id`. Only a sampled call has a span: the
//! sample is decided first ([`crate::trace::sample`]), so an unsampled call,
//! or any call with traces off, has a disabled one, which costs nothing.
//!
//! It runs on every call, so it is kept cheap: the method is looked up once
//! in the method table ([`crate::methods`]), whose label is a static string
//! (no copy of the path), and the metric handles of each (method, code)
//! pair are looked up in the recorder once and then kept, instead of building
//! a labelled key and searching the registry twice per call.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use metrics::{Counter, Histogram};
// tokio's clock is the system's monotonic clock, except that tests can pause
// it to make deadlines exact.
use tokio::time::Instant;

use tonic::{
    Code,
    codegen::http::{Request, Response},
};
use tower::{Layer, Service};

use crate::{
    log_gate::LogGate,
    methods::{Method, Methods},
    trace,
};

/// Most RPC log lines written per second for one gRPC code at INFO level or
/// above; the rest are counted, not written. Twenty a second is enough to see
/// what is happening and who is calling, and bounds a refusal flood to a few
/// hundred lines a second over all codes, whatever the call rate.
pub const LOG_LINES_PER_SECOND: u32 = 20;

/// How much of an unknown path a log line shows: enough to recognise a
/// misconfigured client, too little to fill the logs with an attacker's text.
pub const LOGGED_PATH_CHARS: usize = 64;

/// A call dropped this close to its deadline (or later), or within 2 % of
/// it for longer deadlines, counts as DEADLINE_EXCEEDED, not CANCELLED: the
/// caller's clock starts before the request reaches the server, so a caller
/// giving up at its deadline can reset the stream before the server's own
/// timer fires, by more than 5 ms on a loaded machine (a break-it review saw
/// a 12 s stream dropped 8 ms early counted as CANCELLED).
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// Adds per-RPC logging to a service stack.
#[derive(Clone, Copy, Debug)]
pub struct RpcLogLayer {
    /// Each method's label, and whether it streams: a stream is recorded
    /// when its response body ends rather than when its headers are sent.
    methods: &'static Methods,
}

impl RpcLogLayer {
    /// Labels calls by `methods`, a known path by itself and any other as
    /// "other".
    pub fn new(methods: &'static Methods) -> Self {
        Self { methods }
    }
}

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // The server applies the layer once, after `main` installed the
        // recorder, so the handles kept here record into that recorder.
        RpcLog {
            inner,
            handles: Arc::new(Handles::new(self.methods)),
            methods: self.methods,
        }
    }
}

/// The service made by [`RpcLogLayer`].
#[derive(Clone, Debug)]
pub struct RpcLog<S> {
    inner: S,
    handles: Arc<Handles>,
    methods: &'static Methods,
}

/// How many gRPC codes there are (0 OK to 16 UNAUTHENTICATED).
const CODES: usize = 17;

/// The RPC counter and latency histogram of each (method, code) pair, made on
/// first use, and the log rate limit of each code. Slots are indexed by
/// [`Method::index`] (the last for "other") and code.
struct Handles {
    slots: Box<[OnceLock<(Counter, Histogram)>]>,
    /// The log rate limit of each code: at most [`LOG_LINES_PER_SECOND`]
    /// lines a second.
    gates: [LogGate; CODES],
    /// RPC_LOG_LINES_SUPPRESSED of each code, made on first use.
    suppressed: [OnceLock<Counter>; CODES],
}

impl Handles {
    /// Slots for each method of `methods` and "other".
    fn new(methods: &Methods) -> Self {
        Self {
            slots: (0..(methods.len() + 1) * CODES)
                .map(|_| OnceLock::new())
                .collect(),
            gates: std::array::from_fn(|_| {
                LogGate::new(LOG_LINES_PER_SECOND, Duration::from_secs(1))
            }),
            suppressed: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl fmt::Debug for Handles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handles").finish_non_exhaustive()
    }
}

impl Handles {
    fn record(&self, method: &'static Method, code: Code, elapsed_secs: f64) {
        // `Code` values are 0..=16, and the method's index at most the
        // table's length, so the index is in bounds.
        let index = method.index() * CODES + code as usize;
        let (requests, duration) = self.slots[index].get_or_init(|| {
            let labels = [("method", method.label()), ("code", code_name(code))];
            (
                metrics::counter!(crate::metrics::RPC_REQUESTS, &labels),
                metrics::histogram!(crate::metrics::RPC_DURATION, &labels),
            )
        });
        requests.increment(1);
        duration.record(elapsed_secs);
    }

    /// Writes the call's log line, unless its code is over its rate limit;
    /// `elapsed` is the call's latency, up to `now`.
    fn log(&self, call: &CallRecord, code: Code, now: Instant, elapsed: Duration) {
        let latency_ms = elapsed.as_secs_f64() * 1e3;
        let loudness = loudness(call.method, code);
        if loudness == Loudness::Debug {
            // Not rate-limited: successes and probes log at DEBUG, which is
            // off unless someone is looking.
            log_rpc(loudness, call, code, latency_ms, 0);
            return;
        }
        match self.gates[code as usize].admit(now.into_std()) {
            Some(suppressed) => log_rpc(loudness, call, code, latency_ms, suppressed),
            None => self.suppressed[code as usize]
                .get_or_init(|| {
                    metrics::counter!(
                        crate::metrics::RPC_LOG_LINES_SUPPRESSED,
                        "code" => code_name(code)
                    )
                })
                .increment(1),
        }
    }
}

/// One call in flight. It records the call when dropped, whether the call
/// ended (then `code` is set) or was dropped before, so each call is counted
/// and logged exactly once.
#[derive(Debug)]
struct CallRecord {
    handles: Arc<Handles>,
    method: &'static Method,
    /// The requested path, shortened and made printable, when it is not a
    /// known method.
    unknown_path: Option<String>,
    start: Instant,
    /// The caller's `grpc-timeout`, which tonic enforces outside this layer by
    /// dropping the call.
    deadline: Option<Duration>,
    /// The answer's code, once the call has ended: its response future
    /// completed (unary) or its response body ended (streams).
    code: Option<Code>,
    /// The call's span; disabled (and free) when traces are off. It ends
    /// when the record is dropped, after the call's log line.
    span: tracing::Span,
}

impl CallRecord {
    /// The code of a call dropped before it ended (its response future, or a
    /// stream's response body): DEADLINE_EXCEEDED when its deadline had come, else
    /// CANCELLED (the caller went away, or the connection did).
    fn dropped_code(&self, now: Instant) -> Code {
        let elapsed = now.duration_since(self.start);
        match self.deadline {
            Some(deadline) if elapsed + DEADLINE_SLACK.max(deadline / 50) >= deadline => {
                Code::DeadlineExceeded
            }
            _ => Code::Cancelled,
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let now = Instant::now();
        let code = self.code.unwrap_or_else(|| self.dropped_code(now));
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", code as i64);
            if trace::is_server_error(code) {
                self.span.record("otel.status_code", "ERROR");
            }
        }
        // Taken once for the log line and the histogram: each clock
        // subtraction costs about fifty instructions.
        let elapsed = now.duration_since(self.start);
        self.handles.log(self, code, now, elapsed);
        self.handles
            .record(self.method, code, elapsed.as_secs_f64());
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body + Unpin + Send + 'static,
    ResBody::Error: 'static,
{
    type Response = Response<Observed<ResBody>>;
    type Error = S::Error;
    type Future = RpcLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = self.methods.resolve(path);
        let streaming = method.is_streaming();
        // Only an unknown path is copied (and then only its start), so the
        // log can say what was asked.
        let unknown_path = method.is_other().then(|| printable_prefix(path));
        let span = rpc_span(method, request.headers());
        // Made before the inner call and moved into the future, so even a
        // future dropped before its first poll is recorded.
        let record = CallRecord {
            handles: self.handles.clone(),
            method,
            unknown_path,
            start: Instant::now(),
            deadline: crate::limits::caller_timeout(request.headers()),
            code: None,
            span,
        };
        RpcLogFuture {
            inner: self.inner.call(request),
            record: Some(record),
            streaming,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcLog`]: the inner future and the call's
    /// record, which records the call when the answer comes or when the
    /// future is dropped first. Not boxed: it is polled inside the future of
    /// the layer around it.
    #[derive(Debug)]
    pub struct RpcLogFuture<F> {
        #[pin]
        inner: F,
        // `None` once the answer has come.
        record: Option<CallRecord>,
        streaming: bool,
    }
}

impl<F, B, E> Future for RpcLogFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Observed<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            // The handler runs in the call's span, so the store's spans are
            // its children. Entering a disabled span does nothing.
            let _entered = this.record.as_ref().map(|record| record.span.enter());
            std::task::ready!(this.inner.poll(cx))
        };
        // `None` only if polled again after completing, which futures may
        // not be; nothing is recorded twice.
        let Some(mut record) = this.record.take() else {
            return Poll::Ready(result.map(|response| {
                response.map(|inner| Observed {
                    inner,
                    record: None,
                })
            }));
        };
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                record.code = Some(Code::Unknown);
                drop(record);
                return Poll::Ready(Err(err));
            }
        };
        // An error is sent "trailers-only", with grpc-status in the
        // headers: the call is over, streaming or not.
        let status = tonic::Status::from_header_map(response.headers());
        if *this.streaming && status.is_none() {
            // Recorded when the body ends, or is dropped before.
            return Poll::Ready(Ok(response.map(|inner| Observed {
                inner,
                record: Some(record),
            })));
        }
        // A unary success carries its status in the trailers.
        record.code = Some(status.map_or(Code::Ok, |status| status.code()));
        drop(record);
        Poll::Ready(Ok(response.map(|inner| Observed {
            inner,
            record: None,
        })))
    }
}

/// A response body as [`RpcLog`] passes it on: a unary call's untouched, a
/// stream's carrying the stream's record until the body ends (its
/// trailers, an error, its end) or is dropped, which records the call.
#[derive(Debug)]
pub struct Observed<B> {
    inner: B,
    /// The open stream's record; `None` once recorded, and for unary calls.
    record: Option<CallRecord>,
}

impl<B> Observed<B> {
    /// Records the stream as ended with `code`, once.
    fn end(&mut self, code: Code) {
        if let Some(mut record) = self.record.take() {
            record.code = Some(code);
            drop(record);
        }
    }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body + Unpin,
    B::Error: 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        // `Observed` is `Unpin`: its fields are.
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if this.record.is_some() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        // Trailers without grpc-status break the protocol;
                        // the caller reads that as UNKNOWN.
                        let code = tonic::Status::from_header_map(trailers)
                            .map_or(Code::Unknown, |status| status.code());
                        this.end(code);
                    }
                }
                // hyper resets the stream with INTERNAL_ERROR, which the
                // caller reads as INTERNAL, unless the error says better.
                Some(Err(err)) => {
                    let code = (err as &dyn std::any::Any)
                        .downcast_ref::<tonic::Status>()
                        .map_or(Code::Internal, tonic::Status::code);
                    this.end(code);
                }
                // Ended without trailers, hence without a status.
                None => this.end(Code::Unknown),
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

/// The call's span (see [`crate::trace`]): a disabled one, at the cost of a
/// cached check, unless traces are on and [`trace::sample`] keeps the call;
/// an unsampled call makes no span at all (nor do its Redis operations,
/// which find no RPC span to be children of). Its parent is the caller's
/// `traceparent` when valid; without one, or with a malformed one, the
/// call starts a new trace.
fn rpc_span(method: &Method, headers: &tonic::codegen::http::HeaderMap) -> tracing::Span {
    use tracing::field::Empty;
    if !tracing::enabled!(target: trace::TARGET, tracing::Level::INFO) {
        return tracing::Span::none();
    }
    let Some(sampled) = trace::sample(headers) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        target: trace::TARGET,
        "rpc",
        otel.name = method.label().trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = rpc_service(method),
        rpc.method = rpc_method(method),
        rpc.grpc.status_code = Empty,
    );
    if let Some(parent) = sampled.parent {
        // Fails only when the span has no OpenTelemetry data, which an
        // enabled span of this target has.
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
    }
    span
}

/// `rpc.service` of a served method ("sessionstore.v1.SessionStore"); none
/// for an unknown path, whose text is the caller's.
fn rpc_service(method: &Method) -> Option<&str> {
    let (service, _) = method.label().strip_prefix('/')?.split_once('/')?;
    Some(service)
}

/// `rpc.method` of a served method ("GetSession"); `_OTHER`, as the
/// semantic conventions name it, for an unknown path.
fn rpc_method(method: &Method) -> &str {
    method
        .label()
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .map_or("_OTHER", |(_, name)| name)
}

/// At most [`LOGGED_PATH_CHARS`] characters of `path`, each printable ASCII
/// or `?`, so a log line cannot carry control or look-alike characters.
fn printable_prefix(path: &str) -> String {
    let mut shown: String = path
        .chars()
        .take(LOGGED_PATH_CHARS)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if path.chars().nth(LOGGED_PATH_CHARS).is_some() {
        shown.push_str("...");
    }
    shown
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

fn loudness(method: &Method, code: Code) -> Loudness {
    // Served health methods only: a probe of an unknown path under health
    // is labelled "other" and logged like any other unknown path.
    if method.is_health() && !method.is_other() {
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

/// Writes one RPC line. `path` appears only for an unknown method, and
/// `suppressed` only when lines of this code were left out before it.
fn log_rpc(loudness: Loudness, call: &CallRecord, code: Code, latency_ms: f64, suppressed: u64) {
    let method = call.method.label();
    let path = call.unknown_path.as_deref();
    let code = code_name(code);
    let suppressed = (suppressed > 0).then_some(suppressed);
    // Only a sampled trace's id (an unsampled one names no trace to find),
    // and only for a line that will be written: reading it costs.
    let written = !call.span.is_disabled()
        && match loudness {
            Loudness::Debug => tracing::enabled!(tracing::Level::DEBUG),
            Loudness::Info => tracing::enabled!(tracing::Level::INFO),
            Loudness::Warn => tracing::enabled!(tracing::Level::WARN),
            Loudness::Error => tracing::enabled!(tracing::Level::ERROR),
        };
    let trace_id = written
        .then(|| trace::sampled_trace_id(&call.span))
        .flatten()
        .map(tracing::field::display);
    match loudness {
        Loudness::Debug => {
            tracing::debug!(method, path, code, latency_ms, suppressed, trace_id, "rpc");
        }
        Loudness::Info => {
            tracing::info!(method, path, code, latency_ms, suppressed, trace_id, "rpc");
        }
        Loudness::Warn => {
            tracing::warn!(method, path, code, latency_ms, suppressed, trace_id, "rpc");
        }
        Loudness::Error => {
            tracing::error!(method, path, code, latency_ms, suppressed, trace_id, "rpc");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use tonic::body::Body;

    use super::*;

    fn methods() -> &'static Methods {
        Methods::served().unwrap()
    }

    #[test]
    fn every_method_and_code_has_a_slot() {
        let handles = Handles::new(methods());
        for method in methods().iter() {
            for code in 0..CODES {
                let code = Code::from_i32(i32::try_from(code).unwrap());
                handles.record(method, code, 0.001);
            }
        }
        assert!(handles.slots.iter().all(|slot| slot.get().is_some()));
    }

    #[test]
    fn levels_follow_the_status() {
        let m = methods().resolve("/sessionstore.v1.SessionStore/GetSession");
        assert_eq!(loudness(m, Code::Ok), Loudness::Debug);
        assert_eq!(loudness(m, Code::InvalidArgument), Loudness::Info);
        assert_eq!(loudness(m, Code::Unavailable), Loudness::Warn);
        assert_eq!(loudness(m, Code::Internal), Loudness::Error);
        let check = methods().resolve("/grpc.health.v1.Health/Check");
        assert_eq!(loudness(check, Code::Unavailable), Loudness::Debug);
        // An unknown path under health is logged as any unknown path.
        let probe = methods().resolve("/grpc.health.v1.Health/Nope");
        assert_eq!(loudness(probe, Code::Unimplemented), Loudness::Info);
    }

    #[test]
    fn unknown_paths_are_shortened_and_printable() {
        assert_eq!(printable_prefix("/a.B/C"), "/a.B/C");
        assert_eq!(printable_prefix("/x y\u{202e}z"), "/x?y?z");
        let long = format!("/{}", "a".repeat(500));
        let shown = printable_prefix(&long);
        assert_eq!(shown.len(), LOGGED_PATH_CHARS + 3);
        assert!(shown.ends_with("..."));
    }

    /// Log lines written through a `tracing` subscriber, for counting.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Runs `body` on a current-thread runtime with paused time, a private
    /// metrics recorder and a subscriber writing INFO and above to `lines`;
    /// returns the rendered metrics.
    fn observed<F>(lines: &Lines, body: impl FnOnce() -> F) -> String
    where
        F: Future<Output = ()>,
    {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle: PrometheusHandle = recorder.handle();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer({
                let lines = lines.clone();
                move || lines.clone()
            })
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            metrics::with_local_recorder(&recorder, || runtime.block_on(body()))
        });
        handle.render()
    }

    /// The value of the sample whose line starts with `series`.
    fn sample(text: &str, series: &str) -> u64 {
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .map_or(0, |v| v.parse().unwrap())
    }

    fn request(path: &str, timeout: Option<&str>) -> Request<Body> {
        let mut request = Request::new(Body::empty());
        *request.uri_mut() = path.parse().unwrap();
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
        }
        request
    }

    /// A service that answers after `delay` with `code` (trailers-only).
    fn answering(
        code: Code,
        delay: Duration,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
    > + Clone {
        tower::service_fn(move |_request: Request<Body>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(tonic::Status::new(code, "x").into_http())
        })
    }

    const GET: &str = "/sessionstore.v1.SessionStore/GetSession";

    /// A flood of refusals is counted call by call, while the log gets at
    /// most the per-second budget of lines, the later ones saying how many
    /// were left out, and written + left out = calls.
    #[test]
    fn a_refusal_flood_is_counted_exactly_and_logged_sparingly() {
        let lines = Lines::default();
        let calls = 1000;
        let metrics = observed(&lines, || async {
            let mut service =
                RpcLogLayer::new(methods()).layer(answering(Code::Unauthenticated, Duration::ZERO));
            for i in 0..calls {
                if i == calls / 2 {
                    // A second window opens half way.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                service.call(request(GET, None)).await.unwrap();
            }
        });
        let counted = sample(
            &metrics,
            &format!(r#"sessionstore_rpc_requests_total{{method="{GET}",code="UNAUTHENTICATED"}}"#),
        );
        assert_eq!(counted, calls);
        let text = lines.text();
        let written = text
            .lines()
            .filter(|l| l.contains("UNAUTHENTICATED"))
            .count();
        assert_eq!(written, 2 * LOG_LINES_PER_SECOND as usize, "{text}");
        let left_out = sample(
            &metrics,
            r#"sessionstore_rpc_log_lines_suppressed_total{code="UNAUTHENTICATED"}"#,
        );
        assert_eq!(left_out + written as u64, calls);
        let reported = calls / 2 - u64::from(LOG_LINES_PER_SECOND);
        assert!(
            text.contains(&format!("suppressed={reported}")),
            "the first line of the second window reports the first's: {text}"
        );
    }

    /// A probe of an unknown, long path is labelled "other" and its log line
    /// shows only a short printable prefix of the path.
    #[test]
    fn unknown_paths_are_logged_short() {
        let lines = Lines::default();
        let path = format!("/probe/{}", "A".repeat(4000));
        let metrics = observed(&lines, || async {
            let mut service =
                RpcLogLayer::new(methods()).layer(answering(Code::Unimplemented, Duration::ZERO));
            service.call(request(&path, None)).await.unwrap();
        });
        assert_eq!(
            sample(
                &metrics,
                r#"sessionstore_rpc_requests_total{method="other",code="UNIMPLEMENTED"}"#
            ),
            1
        );
        let text = lines.text();
        assert!(text.contains("method=\"other\""), "{text}");
        assert!(!text.contains(&"A".repeat(LOGGED_PATH_CHARS)), "{text}");
        assert!(text.len() < 600, "{text}");
    }

    /// A response future dropped before it completes is still counted and
    /// logged once: CANCELLED before its deadline, DEADLINE_EXCEEDED at it,
    /// and dropping a future never polled counts too.
    #[test]
    fn dropped_calls_are_recorded_with_their_code() {
        let lines = Lines::default();
        let metrics = observed(&lines, || async {
            let mut service =
                RpcLogLayer::new(methods()).layer(answering(Code::Ok, Duration::from_secs(10)));
            // The caller goes away after 100 ms of a 1 s deadline.
            let call = service.call(request(GET, Some("1S")));
            assert!(
                tokio::time::timeout(Duration::from_millis(100), call)
                    .await
                    .is_err()
            );
            // tonic's grpc-timeout timer drops the call at its deadline.
            let call = service.call(request(GET, Some("200m")));
            assert!(
                tokio::time::timeout(Duration::from_millis(200), call)
                    .await
                    .is_err()
            );
            // Never polled.
            drop(service.call(request(GET, None)));
        });
        let count = |code: &str| {
            sample(
                &metrics,
                &format!(r#"sessionstore_rpc_requests_total{{method="{GET}",code="{code}"}}"#),
            )
        };
        assert_eq!(count("CANCELLED"), 2, "{metrics}");
        assert_eq!(count("DEADLINE_EXCEEDED"), 1, "{metrics}");
        assert_eq!(count("OK"), 0, "{metrics}");
        let text = lines.text();
        assert_eq!(text.matches("CANCELLED").count(), 2, "{text}");
        assert_eq!(text.matches("DEADLINE_EXCEEDED").count(), 1, "{text}");
    }

    /// A call that completes is recorded once, with its answer's code.
    #[test]
    fn completed_calls_are_recorded_once() {
        let lines = Lines::default();
        let metrics = observed(&lines, || async {
            let mut service = RpcLogLayer::new(methods())
                .layer(answering(Code::InvalidArgument, Duration::from_millis(5)));
            service.call(request(GET, Some("1S"))).await.unwrap();
        });
        let series =
            format!(r#"sessionstore_rpc_requests_total{{method="{GET}",code="INVALID_ARGUMENT"}}"#);
        assert_eq!(sample(&metrics, &series), 1, "{metrics}");
        assert_eq!(lines.text().lines().count(), 1);
    }

    /// A response body that yields `frames`, then waits forever when `open`
    /// (a stream that has not ended) or ends.
    struct Scripted {
        frames: std::collections::VecDeque<http_body::Frame<tonic::codegen::Bytes>>,
        open: bool,
    }

    impl http_body::Body for Scripted {
        type Data = tonic::codegen::Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            match self.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None if self.open => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// Trailers carrying `code`.
    fn trailers(code: Code) -> http_body::Frame<tonic::codegen::Bytes> {
        let (parts, ()) = tonic::Status::new(code, "x").into_http::<()>().into_parts();
        http_body::Frame::trailers(parts.headers)
    }

    /// A streaming service answering headers at once, then a message, then
    /// `end` as trailers, or nothing more (the stream stays open) when
    /// `end` is `None`.
    fn streaming(
        end: Option<Code>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
    > + Clone {
        tower::service_fn(move |_request: Request<Body>| async move {
            let mut frames = std::collections::VecDeque::new();
            frames.push_back(http_body::Frame::data(tonic::codegen::Bytes::from_static(
                b"message",
            )));
            frames.extend(end.map(trailers));
            let body = Scripted {
                frames,
                open: end.is_none(),
            };
            Ok::<_, std::convert::Infallible>(Response::new(Body::new(body)))
        })
    }

    const WATCH: &str = "/grpc.health.v1.Health/Watch";

    /// Reads frames until the body ends, or until `limit` passes.
    async fn drain<B: http_body::Body + Unpin>(body: &mut B, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
                .await
                .is_some()
            {}
        })
        .await;
    }

    /// A stream is recorded when it ends, not when its headers are sent: a
    /// stream the caller resets after 3 s is CANCELLED with a latency of
    /// 3 s, one that ends with UNAVAILABLE trailers (shutdown) is
    /// UNAVAILABLE, one that ends with OK trailers is OK; each exactly once.
    #[test]
    fn streams_are_recorded_when_they_end() {
        let lines = Lines::default();
        let metrics = observed(&lines, || async {
            let layer = RpcLogLayer::new(methods());
            // Reset by the caller after 3 s.
            let response = layer
                .layer(streaming(None))
                .call(request(WATCH, None))
                .await
                .unwrap();
            let mut body = response.into_body();
            drain(&mut body, Duration::from_secs(3)).await;
            drop(body);
            for end in [Code::Unavailable, Code::Ok] {
                let response = layer
                    .layer(streaming(Some(end)))
                    .call(request(WATCH, None))
                    .await
                    .unwrap();
                let mut body = response.into_body();
                drain(&mut body, Duration::from_secs(60)).await;
                drop(body);
            }
        });
        let count = |code: &str| {
            sample(
                &metrics,
                &format!(r#"sessionstore_rpc_requests_total{{method="{WATCH}",code="{code}"}}"#),
            )
        };
        assert_eq!(count("CANCELLED"), 1, "{metrics}");
        assert_eq!(count("UNAVAILABLE"), 1, "{metrics}");
        assert_eq!(count("OK"), 1, "{metrics}");
        let cancelled_secs: f64 = metrics
            .lines()
            .find(|line| {
                line.starts_with(&format!(
                    r#"sessionstore_rpc_duration_seconds_sum{{method="{WATCH}",code="CANCELLED"}}"#
                ))
            })
            .and_then(|line| line.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
            .expect("no CANCELLED latency");
        assert!((cancelled_secs - 3.0).abs() < 0.01, "{metrics}");
    }

    /// Nothing is recorded while a stream is open; a stream refused outright
    /// (trailers-only) is recorded at once; unary calls are untouched by the
    /// list of streaming methods.
    #[test]
    fn an_open_stream_is_not_yet_recorded() {
        let lines = Lines::default();
        let metrics = observed(&lines, || async {
            let layer = RpcLogLayer::new(methods());
            let open = layer
                .layer(streaming(None))
                .call(request(WATCH, None))
                .await
                .unwrap();
            layer
                .layer(answering(Code::ResourceExhausted, Duration::ZERO))
                .call(request(WATCH, None))
                .await
                .unwrap();
            layer
                .layer(answering(Code::Ok, Duration::ZERO))
                .call(request(GET, None))
                .await
                .unwrap();
            // Leaked, so it is never dropped while the metrics are rendered.
            std::mem::forget(open);
        });
        let count = |method: &str, code: &str| {
            sample(
                &metrics,
                &format!(r#"sessionstore_rpc_requests_total{{method="{method}",code="{code}"}}"#),
            )
        };
        assert_eq!(count(WATCH, "RESOURCE_EXHAUSTED"), 1, "{metrics}");
        assert_eq!(count(WATCH, "OK"), 0, "{metrics}");
        assert_eq!(count(WATCH, "CANCELLED"), 0, "{metrics}");
        assert_eq!(count(GET, "OK"), 1, "{metrics}");
    }
}
