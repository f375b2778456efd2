//! Distributed traces (OpenTelemetry), off unless OTEL_EXPORTER_OTLP_ENDPOINT
//! is set: a span per RPC (`observe`), child of the caller's W3C
//! `traceparent` when it sent a valid one, and a child span per Redis
//! operation (`store/op.rs`), exported over OTLP/gRPC in bounded batches.
//!
//! Both kinds of span are `tracing` spans of target [`TARGET`] at INFO.
//! `main` gives the log's filter a directive that leaves that target out
//! ([`log_directive`]) and installs the OpenTelemetry layer
//! ([`Tracing::layer`]) only when traces are on. With traces off the
//! subscriber is the one it was before traces existed (one global filter:
//! no per-layer filters, whose bookkeeping costs on every call site), and
//! no subscriber is interested in those spans: `tracing` caches that per
//! call site, and making such a span costs a load and a branch
//! (BENCHMARKS.md, "#27 traces").
//!
//! Sampling is decided before any span is made ([`sample`], the SDK's
//! samplers' rules applied to the caller's `traceparent`): an unsampled call
//! makes no span, neither its own nor its Redis operations', so at ratio
//! 0.01 the other 99 % cost a header lookup and a random draw. The SDK then
//! records every span it is given (`AlwaysOn`), and draws the ids of traces
//! that start here among those the ratio keeps (`RootIds`).
//!
//! What a span holds: the method (`rpc.service`, `rpc.method`) and its gRPC
//! code; the store operation's name, `db.system`, its round trips and, on a
//! cluster, its key's slot (`db.redis.slot`; see `store/op.rs` for why not
//! the slot's master). Never a
//! request's fields, a key (keys hold user ids and token ids) or an error's
//! message: only its kind (SECURITY.md).
//!
//! Export never makes a call wait: ended spans go into a queue of
//! OTEL_BSP_MAX_QUEUE_SIZE spans that a thread of the SDK's drains in
//! batches; a span that finds the queue full is dropped and counted
//! (TRACE_SPANS_DROPPED, `reason="queue_full"`), as are the spans of a batch
//! the collector did not take (`reason="export_failed"`).

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
    },
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler,
        SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
    },
};
use tonic::codegen::http::HeaderMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    Layer,
    filter::{Directive, FilterFn},
    registry::LookupSpan,
};

/// The `tracing` target of the spans that become OpenTelemetry spans, and
/// of nothing else.
pub const TARGET: &str = "sessionstore::trace";

/// OTEL_TRACES_SAMPLER: which traces are recorded, as the OpenTelemetry SDKs
/// read the variable. The `parentbased_*` samplers follow the caller's
/// decision when it sent one (a `traceparent` with its sampled flag), so a
/// trace is whole or absent; the others decide alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceSampler {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A fraction of the traces (OTEL_TRACES_SAMPLER_ARG), by trace id.
    TraceIdRatio,
    /// The caller's decision; every trace that starts here.
    ParentBasedAlwaysOn,
    /// The caller's decision; no trace that starts here.
    ParentBasedAlwaysOff,
    /// The caller's decision; a fraction (OTEL_TRACES_SAMPLER_ARG) of the
    /// traces that start here.
    ParentBasedTraceIdRatio,
}

/// What traces are exported, where, and how much may wait for export.
#[derive(Clone, Debug)]
pub struct TraceSettings {
    /// OTEL_EXPORTER_OTLP_ENDPOINT: the collector's OTLP/gRPC address.
    pub endpoint: String,
    /// OTEL_SERVICE_NAME: the `service.name` of every span.
    pub service_name: String,
    /// OTEL_TRACES_SAMPLER.
    pub sampler: TraceSampler,
    /// OTEL_TRACES_SAMPLER_ARG: the fraction the ratio samplers keep.
    pub ratio: f64,
    /// OTEL_BSP_MAX_QUEUE_SIZE: the most ended spans waiting for export;
    /// past it spans are dropped and counted.
    pub max_queue: usize,
}

impl TraceSettings {
    /// How the calls are sampled, decided by [`sample`] before any span is
    /// made.
    fn sampling(&self) -> Sampling {
        let ratio = || {
            // As the SDK's TraceIdRatioBased sampler reads a trace id: kept
            // when its low 64 bits, shifted right by one, are below this.
            (self.ratio < 1.0).then(|| (self.ratio.max(0.0) * (1u64 << 63) as f64) as u64)
        };
        let (parent_based, root) = match self.sampler {
            TraceSampler::AlwaysOn => (false, Root::Always),
            TraceSampler::AlwaysOff => (false, Root::Never),
            TraceSampler::TraceIdRatio => (false, ratio().map_or(Root::Always, Root::Below)),
            TraceSampler::ParentBasedAlwaysOn => (true, Root::Always),
            TraceSampler::ParentBasedAlwaysOff => (true, Root::Never),
            TraceSampler::ParentBasedTraceIdRatio => {
                (true, ratio().map_or(Root::Always, Root::Below))
            }
        };
        Sampling { parent_based, root }
    }
}

/// OTEL_TRACES_SAMPLER and its argument as [`sample`] applies them: the
/// same decisions as the SDK's samplers of those names, made before the
/// call's span exists, so an unsampled call makes no span at all.
#[derive(Clone, Copy, Debug)]
struct Sampling {
    /// Whether a caller's `traceparent` decides (its sampled flag).
    parent_based: bool,
    /// The decision for a trace id: the one a caller sent when the sampler
    /// is not parent-based, else a new one's.
    root: Root,
}

/// Which trace ids are sampled.
#[derive(Clone, Copy, Debug)]
enum Root {
    Always,
    Never,
    /// Those whose low 64 bits, shifted right by one, are below this
    /// bound (OTEL_TRACES_SAMPLER_ARG of 2^63).
    Below(u64),
}

impl Root {
    fn keeps(self, trace_id: TraceId) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Below(bound) => (low_bits(trace_id) >> 1) < bound,
        }
    }
}

/// The low 64 bits of a trace id, which the ratio samplers read.
fn low_bits(trace_id: TraceId) -> u64 {
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    u64::from_be_bytes(low)
}

/// The sampling in force, set once by [`Tracing::start`]: like the
/// `tracing` subscriber whose spans it decides, one per process.
static SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// The trace ids of the traces that start here: random, as the SDK's, except
/// that with a ratio sampler they are drawn among the ids that sampler keeps.
/// Only sampled calls make spans ([`sample`] decided first, with a random
/// draw of the same odds), so every root span the SDK makes is a sampled
/// one, and its id says so to a trace-id ratio sampler further on, as an id
/// the SDK had sampled would.
#[derive(Debug)]
struct RootIds {
    random: RandomIdGenerator,
    root: Root,
}

impl IdGenerator for RootIds {
    fn new_trace_id(&self) -> TraceId {
        let id = self.random.new_trace_id();
        let Root::Below(bound) = self.root else {
            return id;
        };
        // `bound` is below 2^63, so twice it fits; a zero bound samples no
        // root, and this is then never asked.
        let Some(limit) = bound.checked_mul(2).filter(|limit| *limit > 0) else {
            return id;
        };
        let high = id.to_bytes();
        let low = low_bits(id) % limit;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&high[..8]);
        bytes[8..].copy_from_slice(&low.to_be_bytes());
        TraceId::from_bytes(bytes)
    }

    fn new_span_id(&self) -> SpanId {
        self.random.new_span_id()
    }
}

/// Traces being exported: the tracer provider, to make the `tracing` layer
/// and to flush at shutdown.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts exporting to `settings.endpoint`. Call it inside the Tokio
    /// runtime: the exporter's gRPC channel runs on it. Connects lazily, so
    /// a collector that is down does not stop the server from starting.
    ///
    /// # Errors
    ///
    /// A message naming OTEL_EXPORTER_OTLP_ENDPOINT when the exporter cannot
    /// be built from it (not a URI).
    pub fn start(settings: &TraceSettings) -> Result<Self, String> {
        // Headers, compression and the export timeout come from the
        // standard OTEL_EXPORTER_OTLP_* variables, read by the exporter as
        // every OpenTelemetry SDK reads them.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .build()
            .map_err(|err| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {err}"))?;
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = Counted {
            inner: exporter,
            queued: queued.clone(),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queue)
            .build();
        let processor = Bounded {
            inner: BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
            queued,
            max_queue: settings.max_queue,
        };
        let resource = Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .build();
        let sampling = settings.sampling();
        // A second start in one process (tests) keeps the first sampling.
        let _ = SAMPLING.set(sampling);
        // The decision is [`sample`]'s, made before the span exists: the
        // SDK records every span it is given.
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::AlwaysOn)
            .with_id_generator(RootIds {
                random: RandomIdGenerator::default(),
                root: sampling.root,
            })
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that makes OpenTelemetry spans of the spans of
    /// [`TARGET`], and sees nothing else: no log line becomes a span event.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("session-server"))
            // Only the attributes the spans declare: no source location,
            // thread, target or busy/idle times.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Nothing here reads OpenTelemetry's own current context.
            .with_context_activation(false)
            .with_filter(FilterFn::new(|meta| meta.target() == TARGET))
    }

    /// Exports what is queued and stops, waiting at most `budget` (the
    /// exporter's thread is left behind if the collector does not answer in
    /// time). Blocks: run it off the runtime's workers, on a blocking thread.
    ///
    /// # Errors
    ///
    /// A message when the queue could not be exported within `budget`.
    pub fn shutdown(&self, budget: Duration) -> Result<(), String> {
        self.provider
            .shutdown_with_timeout(budget)
            .map_err(|err| err.to_string())
    }
}

/// The directive the log's filter gets beside RUST_LOG's: [`TARGET`] off,
/// leaving those spans to the OpenTelemetry layer, so log lines look the
/// same with traces on or off, and with traces off no subscriber wants
/// those spans (their call sites are then never enabled, a cached check).
pub fn log_directive() -> Directive {
    // The target's text is a constant that parses.
    Directive::from_str(&format!("{TARGET}=off")).unwrap_or_default()
}

/// Whether a call is traced, and under which parent: decided before its
/// span is made, from the caller's `traceparent` and the sampler
/// (OTEL_TRACES_SAMPLER), as the SDK's sampler would decide. `None` when
/// traces are off or the call is not sampled: then no span is made for it
/// nor for its Redis operations.
///
/// A malformed `traceparent` is no parent: the call starts a new trace (or
/// not, as the sampler decides), it is never an error.
pub fn sample(headers: &HeaderMap) -> Option<Sampled> {
    let sampling = SAMPLING.get()?;
    let Some(parent) = remote_parent(headers) else {
        let keep = match sampling.root {
            Root::Always => true,
            Root::Never => false,
            // The odds of a new random trace id: the id itself is drawn
            // later, among those the ratio keeps (`RootIds`).
            Root::Below(bound) => {
                let draw = RandomIdGenerator::default().new_span_id().to_bytes();
                (u64::from_be_bytes(draw) >> 1) < bound
            }
        };
        return keep.then_some(Sampled { parent: None });
    };
    let keep = if sampling.parent_based {
        parent.is_sampled()
    } else {
        sampling.root.keeps(parent.trace_id())
    };
    keep.then(|| Sampled {
        parent: Some(Context::new().with_remote_span_context(parent)),
    })
}

/// A call [`sample`] decided to trace.
#[derive(Debug)]
pub struct Sampled {
    /// The caller's context when it sent a valid `traceparent`; `None` for
    /// a trace that starts here.
    pub parent: Option<Context>,
}

/// The caller's span from a request's `traceparent` and `tracestate`, or
/// `None` without a valid one.
fn remote_parent(headers: &HeaderMap) -> Option<SpanContext> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let (trace_id, span_id, flags) = parse_traceparent(traceparent)?;
    // A bad `tracestate` is dropped, not the parent (W3C Trace Context).
    let state = headers
        .get("tracestate")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// The trace id, parent id and flags of a `traceparent` as W3C Trace
/// Context defines it: `version-traceid-parentid-flags` in lower-case hex,
/// of 2, 32, 16 and 2 digits, neither id all zeros, version `ff` invalid,
/// and nothing more in version 00 (later versions may append fields).
/// Stricter than the SDK's propagator, which takes a short trace id.
fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let hex = |field: &str, digits: usize| {
        field.len() == digits
            && field
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let span_id = fields.next()?;
    let flags = fields.next()?;
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(span_id, 16)
        && hex(flags, 2)
        && (version != "00" || fields.next().is_none());
    if !valid {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some((
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

/// The trace id of `span` when it is recorded (sampled), for the RPC's log
/// line; `None` when traces are off or the trace is not sampled.
pub fn sampled_trace_id(span: &tracing::Span) -> Option<TraceId> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context.is_sampled().then(|| span_context.trace_id())
}

/// Whether a server span with `code` is an error, by the RPC semantic
/// conventions: the codes that say the server failed, not the caller.
pub fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Why spans were dropped, as the `reason` label of TRACE_SPANS_DROPPED.
fn count_dropped(reason: &'static str, spans: usize) {
    metrics::counter!(crate::metrics::TRACE_SPANS_DROPPED, "reason" => reason)
        .increment(u64::try_from(spans).unwrap_or(u64::MAX));
}

/// The SDK's batch span processor, with a count of the spans waiting in it
/// so that a span finding it full is counted when dropped: the SDK drops
/// such spans too, but only logs their number at shutdown.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet taken by an export.
    queued: Arc<AtomicUsize>,
    /// `inner`'s queue size.
    max_queue: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // Reserve a place first, so concurrent ends never exceed the queue.
        // A batch is counted out when its export starts, a little after it
        // leaves the queue: in between this drops a span that might have
        // fit, never keeps one that would not.
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.max_queue).then_some(queued + 1)
            });
        match reserved {
            Ok(_) => self.inner.on_end(span),
            Err(_) => count_dropped("queue_full", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting each batch out of [`Bounded`]'s queue when
/// its export starts, and its spans as dropped when the export fails.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.queued.fetch_sub(spans, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        if result.is_err() {
            count_dropped("export_failed", spans);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().unwrap());
        headers
    }

    /// A valid `traceparent` is the parent; a malformed one, or none, is no
    /// parent at all (the span starts a new trace).
    #[test]
    fn only_a_valid_traceparent_is_a_parent() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span_context = remote_parent(&headers(valid)).expect("a valid traceparent");
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span_context.is_remote() && span_context.is_sampled());
        for malformed in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(
                remote_parent(&headers(malformed)).is_none(),
                "{malformed:?}"
            );
        }
        assert!(remote_parent(&HeaderMap::new()).is_none());
    }

    /// The SDK's sampler of OTEL_TRACES_SAMPLER's name, to compare with.
    fn sdk_sampler(settings: &TraceSettings) -> Sampler {
        let ratio = || Sampler::TraceIdRatioBased(settings.ratio);
        match settings.sampler {
            TraceSampler::AlwaysOn => Sampler::AlwaysOn,
            TraceSampler::AlwaysOff => Sampler::AlwaysOff,
            TraceSampler::TraceIdRatio => ratio(),
            TraceSampler::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            TraceSampler::ParentBasedAlwaysOff => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
            }
            TraceSampler::ParentBasedTraceIdRatio => Sampler::ParentBased(Box::new(ratio())),
        }
    }

    fn settings(sampler: TraceSampler, ratio: f64) -> TraceSettings {
        TraceSettings {
            endpoint: String::new(),
            service_name: String::new(),
            sampler,
            ratio,
            max_queue: 1,
        }
    }

    /// The decisions made before a span exists are the SDK samplers': the
    /// same answer for every trace id, parent or none.
    #[test]
    fn sampling_decides_as_the_sdk_samplers() {
        use opentelemetry::trace::SpanKind;
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
        let ids = RandomIdGenerator::default();
        for (sampler, ratio) in [
            (TraceSampler::AlwaysOn, 1.0),
            (TraceSampler::AlwaysOff, 1.0),
            (TraceSampler::TraceIdRatio, 0.3),
            (TraceSampler::TraceIdRatio, 0.0),
            (TraceSampler::TraceIdRatio, 1.0),
            (TraceSampler::ParentBasedAlwaysOn, 1.0),
            (TraceSampler::ParentBasedAlwaysOff, 1.0),
            (TraceSampler::ParentBasedTraceIdRatio, 0.3),
        ] {
            let settings = settings(sampler, ratio);
            let sdk = sdk_sampler(&settings);
            let ours = settings.sampling();
            for flags in [TraceFlags::SAMPLED, TraceFlags::default()] {
                for _ in 0..200 {
                    let trace_id = ids.new_trace_id();
                    let parent = SpanContext::new(
                        trace_id,
                        ids.new_span_id(),
                        flags,
                        true,
                        TraceState::default(),
                    );
                    let cx = Context::new().with_remote_span_context(parent.clone());
                    let sdk_keeps = sdk
                        .should_sample(Some(&cx), trace_id, "rpc", &SpanKind::Server, &[], &[])
                        .decision
                        == SamplingDecision::RecordAndSample;
                    let ours_keeps = if ours.parent_based {
                        parent.is_sampled()
                    } else {
                        ours.root.keeps(trace_id)
                    };
                    assert_eq!(ours_keeps, sdk_keeps, "{sampler:?} {ratio} {flags:?}");
                    // And as a root: the same trace id, no parent.
                    let sdk_root = sdk
                        .should_sample(None, trace_id, "rpc", &SpanKind::Server, &[], &[])
                        .decision
                        == SamplingDecision::RecordAndSample;
                    assert_eq!(ours.root.keeps(trace_id), sdk_root, "{sampler:?} {ratio}");
                }
            }
        }
    }

    /// The trace ids of traces that start here are ones the ratio sampler
    /// keeps, so a trace-id ratio sampler further on keeps them too.
    #[test]
    fn root_trace_ids_are_ones_the_ratio_keeps() {
        for ratio in [0.01, 0.5, 0.9] {
            let root = settings(TraceSampler::ParentBasedTraceIdRatio, ratio)
                .sampling()
                .root;
            let ids = RootIds {
                random: RandomIdGenerator::default(),
                root,
            };
            let drawn: Vec<TraceId> = (0..1000).map(|_| ids.new_trace_id()).collect();
            assert!(drawn.iter().all(|id| root.keeps(*id)), "{ratio}");
            // Still random: no two alike.
            let distinct: std::collections::HashSet<_> = drawn.iter().collect();
            assert_eq!(distinct.len(), drawn.len());
        }
    }
}
