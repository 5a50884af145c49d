//! Logs and traces. Logs always go to stderr; spans are exported over OTLP (gRPC) only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, so a node without a collector pays nothing for them.
//!
//! One request's spans join one trace across nodes: the caller's node puts the W3C `traceparent`
//! of its span in the `Open` frame's bus envelope ([`current_traceparent`]), and the agent's node
//! makes its span a child of it ([`set_remote_parent`]).

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::error::Error;

/// The variable that turns span export on (the OTLP exporter reads it too).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How long shutdown may spend flushing spans still queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps span export alive; [`Telemetry::shutdown`] (or drop) flushes what is still queued, so
/// spans that ended just before SIGTERM are not lost.
#[must_use = "dropping the guard flushes and stops span export"]
pub struct Telemetry {
    export: Option<Export>,
}

/// The OTLP side: the provider, and the runtime its gRPC client lives on. A runtime of its own
/// keeps export off actix's single-threaded runtimes, where a flush would block the very thread
/// that must drive the gRPC client (a 5 s stall, then dropped spans).
struct Export {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
}

/// Installs the global subscriber: fmt logs to stderr filtered by `RUST_LOG` (default `info`), and,
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and `node_id` is given, an OpenTelemetry layer with a
/// batching OTLP gRPC exporter (resource `service.name=strait-gateway`,
/// `service.instance.id=<node id>`) and the W3C TraceContext propagator. The batch delay and
/// sizes follow the standard `OTEL_BSP_*` variables.
pub fn init(node_id: Option<&str>) -> Result<Telemetry, Error> {
    // Logs see events only: spans exist for export, and formatting their fields for the log would
    // cost an allocation per request even with export off.
    // The level hint lets every call site above `RUST_LOG`'s level be skipped where it stands,
    // `log` records of dependencies included, instead of asking the subscriber at each call.
    let filter = env_filter();
    let level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter.and(filter_fn(|meta| meta.is_event()).with_max_level_hint(level)));
    let export = match (node_id, std::env::var_os(OTLP_ENDPOINT_ENV)) {
        (Some(node), Some(endpoint)) if !endpoint.is_empty() => Some(Export::start(node)?),
        _ => None,
    };
    // Without export the stack holds only the event-filtered log layer, so no span is ever
    // created (an empty `Option` layer would still make the registry allocate every span).
    let installed = match &export {
        Some(e) => tracing_subscriber::registry()
            .with(fmt)
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(e.provider.tracer("strait-gateway"))
                    .with_filter(env_filter()),
            )
            .try_init(),
        None => tracing_subscriber::registry().with(fmt).try_init(),
    };
    installed.map_err(|e| Error::Config(format!("cannot install the log subscriber: {e}")))?;
    if export.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!(node = node_id.unwrap_or_default(), "exporting spans over OTLP");
    }
    Ok(Telemetry { export })
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

impl Export {
    fn start(node_id: &str) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        // The gRPC channel spawns its worker on the runtime it is built in.
        let exporter = {
            let _rt = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| Error::Config(format!("OTLP exporter: {e}")))?
        };
        let resource = Resource::builder()
            .with_service_name("strait-gateway")
            .with_attribute(KeyValue::new("service.instance.id", node_id.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        Ok(Export { provider, runtime })
    }

    /// Flushes and stops export from a plain thread: never from a runtime thread, which may be
    /// the one the export needs.
    fn stop(self) {
        let Export { provider, runtime } = self;
        let flushed = std::thread::spawn(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT)).join();
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("flushing spans failed: {e}"),
            Err(_) => eprintln!("flushing spans panicked"),
        }
        // Nothing is left to export; don't wait for the idle gRPC worker.
        runtime.shutdown_background();
    }
}

impl Telemetry {
    /// Flushes queued spans and stops export. Call after the node's runtime has finished.
    pub fn shutdown(mut self) {
        if let Some(e) = self.export.take() {
            e.stop();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(e) = self.export.take() {
            e.stop();
        }
    }
}

/// The current span's W3C `traceparent`, for the `Open` frame's bus envelope. Empty when no
/// OpenTelemetry layer records the span (export off), so then nothing is formatted.
pub fn current_traceparent() -> String {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut out = TraceParent(String::new());
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// Makes `span` a child of the remote span named by `traceparent` (from a bus envelope). An empty
/// or invalid value leaves the span as it was. Call before the span is first entered.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&TraceParent(traceparent));
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: then there is no trace to join.
        let _ = span.set_parent(cx);
    }
}

/// A carrier holding only `traceparent`: that is all the bus envelope has room for.
struct TraceParent<S>(S);

impl Injector for TraceParent<String> {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = value;
        }
    }
}

impl Extractor for TraceParent<&str> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_traceparent_without_an_otel_layer() {
        let span = tracing::info_span!("ingress");
        let _g = span.enter();
        assert_eq!(current_traceparent(), "");
    }

    #[test]
    fn traceparent_round_trips_through_the_carrier() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContextPropagator::new().extract(&TraceParent(tp));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = TraceParent(String::new());
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        assert_eq!(out.0, tp);
    }

    #[test]
    fn invalid_traceparent_is_ignored() {
        for tp in ["", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"] {
            let cx = TraceContextPropagator::new().extract(&TraceParent(tp));
            assert!(!cx.span().span_context().is_valid(), "{tp}");
            set_remote_parent(&tracing::info_span!("bus.open"), tp);
        }
    }
}
