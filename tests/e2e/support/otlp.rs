//! OpenTelemetry collectors for the traces tests: a real OTLP/gRPC receiver
//! (the collector's TraceService, served with tonic from the generated types
//! of the OpenTelemetry protobufs) that keeps every export request, and one
//! that accepts connections and never answers; plus the caller's side: a
//! `tracing` subscriber whose spans become OpenTelemetry spans kept in
//! memory.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::Span,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing_subscriber::layer::SubscriberExt;

use super::wait_until;

/// A running OTLP receiver: what it was sent, and its address.
#[derive(Clone)]
pub(crate) struct Collector {
    /// Every export request received, whole.
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// The OTLP/gRPC endpoint (`http://127.0.0.1:port`).
    pub(crate) endpoint: String,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves the TraceService on a free port, until the runtime ends.
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Self {
            received: Arc::default(),
            endpoint: format!("http://{addr}"),
        };
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        collector
    }

    /// Every export request received so far.
    pub(crate) fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.received.lock().unwrap().clone()
    }

    /// Every span received so far, with its resource's `service.name`.
    pub(crate) fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for request in self.requests() {
            for resource_spans in request.resource_spans {
                let service = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|resource| string_attribute(&resource.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in resource_spans.scope_spans {
                    for span in scope.spans {
                        spans.push((service.clone(), span));
                    }
                }
            }
        }
        spans
    }

    /// Waits up to `limit` for a received span that `matches`, and returns
    /// it with its `service.name`.
    pub(crate) async fn span(
        &self,
        limit: Duration,
        matches: impl Fn(&Span) -> bool,
    ) -> Option<(String, Span)> {
        let found = wait_until(limit, || {
            let any = self.spans().iter().any(|(_, span)| matches(span));
            async move { any }
        })
        .await;
        found
            .then(|| self.spans().into_iter().find(|(_, span)| matches(span)))
            .flatten()
    }
}

/// A collector that accepts connections and never answers: every export
/// to it hangs until the exporter's timeout. Returns its endpoint; it lives
/// until the runtime ends.
pub(crate) async fn hanging_collector() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}")
}

/// The value of attribute `key` when it is a string.
pub(crate) fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        any_value::Value::StringValue(value) => Some(value.clone()),
        _ => None,
    }
}

/// The value of attribute `key`.
pub(crate) fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value: &AnyValue| value.value.as_ref())
}

/// The caller's side: spans ended in this test's `tracing` subscriber, as
/// the OpenTelemetry SDK exports them.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallerSpans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for CallerSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl CallerSpans {
    /// The spans ended so far.
    pub(crate) fn ended(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
}

/// A `tracing` subscriber whose spans become OpenTelemetry spans, each
/// exported to the returned [`CallerSpans`] as it ends. Installed for the
/// current thread by the caller (`tracing::subscriber::set_default`), so
/// the test's runtime must be current-thread.
pub(crate) fn caller_tracing() -> (impl tracing::Subscriber + Send + Sync, CallerSpans) {
    let spans = CallerSpans::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("traces-test"));
    (tracing_subscriber::registry().with(layer), spans)
}
