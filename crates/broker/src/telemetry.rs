//! OpenTelemetry traces over OTLP (HTTP, protobuf), for both components: off unless
//! `[telemetry] otlp_endpoint` names a collector. The spans are the `tracing` spans the
//! components open anyway (a request, a delivery, its decision and run, a storage transaction),
//! exported by `tracing-opentelemetry`; their fields are ids, kinds, clients and states, never a
//! payload, result or error text. A job's spans join the client's trace: the gatekeeper's
//! request span continues the client's `traceparent`, and the worker's delivery span continues
//! the gatekeeper's span, whose id travels in the vouched job.

use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// `[telemetry]`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// An OTLP/HTTP collector's traces URL (`http://127.0.0.1:4318/v1/traces`); no export
    /// without it.
    pub otlp_endpoint: Option<String>,
}

/// The layer that sends spans, over subscriber `S`.
pub type SpanLayer<S> = Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;

/// The target of the spans that exist only to be exported (a job's decision, run, settling,
/// storage transactions; a request's validation, publish, wait): off unless export is on, so
/// that they cost nothing then.
pub const SPANS: &str = "gatehouse::spans";

/// How soon finished spans are sent (the SDK's default is 5 s).
const SEND_EVERY: Duration = Duration::from_secs(1);

/// The exporting pipeline; sends what it holds when dropped (at the end of the process).
pub struct Exporting(SdkTracerProvider);

impl Drop for Exporting {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// The layer that exports spans of `service` to the configured collector, and its pipeline
/// (keep it alive); `None` when export is off. Build it outside an async context (the
/// exporter's HTTP client is a blocking one, on the SDK's own thread).
///
/// # Errors
/// An endpoint that is not a URL.
pub fn layer<S>(
    service: &str,
    settings: &TelemetrySettings,
) -> Result<Option<(SpanLayer<S>, Exporting)>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer as _;
    let Some(endpoint) = settings.otlp_endpoint.as_deref() else { return Ok(None) };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("[telemetry] otlp_endpoint {endpoint:?}: {e}"))?;
    let batches = BatchConfigBuilder::default().with_scheduled_delay(SEND_EVERY).build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batches).build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let provider =
        SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    let tracer = provider.tracer(service.to_owned());
    // Spans only: a log line inside a span would become a span event with its text (an
    // error's, say); log lines stay in the logs.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| meta.is_span()))
        .boxed();
    Ok(Some((spans, Exporting(provider))))
}

/// Makes `span` a child of the remote span `span_id` of trace `trace_id` (both hex): it joins
/// that trace. Ids that are not valid leave it alone.
pub fn continue_trace(span: &tracing::Span, trace_id: &str, span_id: &str) {
    let (Ok(trace), Ok(parent)) = (TraceId::from_hex(trace_id), SpanId::from_hex(span_id)) else { return };
    let remote = SpanContext::new(trace, parent, TraceFlags::SAMPLED, true, TraceState::default());
    if remote.is_valid() {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// The trace and span ids the exporter gave `span` (hex), when spans are exported.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| (own.trace_id().to_string(), own.span_id().to_string()))
}
