//! Distributed traces, with the `otel` feature: a span per call
//! (`sessionstore.call`, internal), a client span per attempt under it (its
//! `attempt` number from 1, so retries are siblings), and each attempt's
//! OpenTelemetry context sent as W3C `traceparent` (and `tracestate`), so
//! the server's span for the attempt is the attempt span's child.
//!
//! The spans are `tracing` spans: the call span's parent is the caller's
//! current span, and they become OpenTelemetry spans through the caller's
//! `tracing-opentelemetry` layer. Without that layer their context is
//! empty and no header is sent. Without the feature none of this is built.

use opentelemetry::trace::{TraceContextExt, TraceFlags};
use tonic::{Code, Request, metadata::MetadataValue};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span of one call of `method` ("GetSession"), child of the caller's
/// current span.
pub(crate) fn call_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "sessionstore.call",
        otel.name = format!("{}/{method} call", sessionstore::SERVICE_NAME),
        otel.kind = "internal",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = sessionstore::SERVICE_NAME,
        rpc.method = method,
    )
}

/// The span of attempt `number` (from 1) of the call spanned by `call`,
/// whose context `request` then carries as `traceparent`.
pub(crate) fn attempt_span<T>(
    call: &tracing::Span,
    method: &'static str,
    number: u32,
    request: &mut Request<T>,
) -> tracing::Span {
    let span = tracing::info_span!(
        parent: call,
        "sessionstore.attempt",
        otel.name = format!("{}/{method}", sessionstore::SERVICE_NAME),
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = sessionstore::SERVICE_NAME,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        attempt = i64::from(number),
    );
    if span.is_disabled() {
        return span;
    }
    let cx = span.context();
    let otel_span = cx.span();
    let context = otel_span.span_context();
    if context.is_valid() {
        let flags = context.trace_flags() & TraceFlags::SAMPLED;
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            flags.to_u8()
        );
        // Hex digits and dashes: always a valid header value.
        if let Ok(value) = MetadataValue::try_from(traceparent) {
            request.metadata_mut().insert("traceparent", value);
        }
        let state = context.trace_state().header();
        if !state.is_empty()
            && let Ok(value) = MetadataValue::try_from(state)
        {
            request.metadata_mut().insert("tracestate", value);
        }
    }
    span
}

/// Records how an attempt ended on its span: its gRPC code, and an error
/// status when the code is not OK.
pub(crate) fn end(span: &tracing::Span, code: Code) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    if code != Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}
