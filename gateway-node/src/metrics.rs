//! Prometheus metrics of one node. Each node owns its registry (several nodes can share a test
//! process). Labels never carry secrets, tokens or request contents.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use strait_bus::Bus;
use strait_schema::window::WindowPool;

/// The node's metrics, registered once at start.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Agents with an active session on this node.
    pub agents_connected: IntGauge,
    /// Handshakes by result (`ok` or a refusal code).
    pub handshakes: IntCounterVec,
    /// Ingress requests by outcome (`ok` or an error code).
    pub requests: IntCounterVec,
    /// Payload bytes through tunnels from callers towards agents
    /// (`strait_tunnel_bytes_total{direction="in"}`). Resolved once, as both directions count
    /// every frame.
    pub bytes_in: IntCounter,
    /// Payload bytes through tunnels towards callers (`direction="out"`).
    pub bytes_out: IntCounter,
    /// Time from request arrival to the end of the response body.
    pub request_seconds: Histogram,
    /// Frames from agents refused, by reason.
    pub frames_refused: IntCounterVec,
    /// Streams reset, by code.
    pub resets: IntCounterVec,
    /// Byte streams (TCP routes) ended, by outcome (`ok` or a code).
    pub streams: IntCounterVec,
    /// Bus envelopes by event (`published`, `received`, `dropped_stale`, ...).
    pub bus: IntCounterVec,
    /// Lookups of agents held elsewhere answered by this node's presence cache, and those that
    /// went to the directory (`strait_presence_lookups_total{source}`): shows whether the
    /// per-request round trip to Redis is being saved. Resolved once: they count every request.
    pub presence_from_cache: IntCounter,
    /// See `presence_from_cache`.
    pub presence_from_directory: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let agents_connected = IntGauge::new("strait_agents_connected", "Agents with an active session on this node")
            .unwrap_or_else(|_| unreachable_metric());
        let handshakes = counter_vec("strait_handshakes_total", "Agent handshakes by result", "result");
        let requests = counter_vec("strait_requests_total", "Ingress requests by outcome", "outcome");
        let bytes = counter_vec(
            "strait_tunnel_bytes_total",
            "Payload bytes carried through tunnels",
            "direction",
        );
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "strait_request_duration_seconds",
                "Ingress request latency, arrival to end of body",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .unwrap_or_else(|_| unreachable_metric());
        let frames_refused = counter_vec("strait_frames_refused_total", "Frames from agents refused", "reason");
        let resets = counter_vec("strait_stream_resets_total", "Streams reset", "code");
        let streams = counter_vec("strait_byte_streams_total", "Byte streams ended, by outcome", "outcome");
        let bus = counter_vec("strait_bus_envelopes_total", "Bus envelopes by event", "event");
        let presence_lookups = counter_vec(
            "strait_presence_lookups_total",
            "Presence lookups of agents not on this node, by source",
            "source",
        );
        for c in [
            Box::new(agents_connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(handshakes.clone()),
            Box::new(requests.clone()),
            Box::new(bytes.clone()),
            Box::new(request_seconds.clone()),
            Box::new(frames_refused.clone()),
            Box::new(resets.clone()),
            Box::new(streams.clone()),
            Box::new(bus.clone()),
            Box::new(presence_lookups.clone()),
        ] {
            // Names are distinct constants, so registration cannot collide.
            let _ = registry.register(c);
        }
        Metrics {
            registry,
            agents_connected,
            handshakes,
            requests,
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
            request_seconds,
            frames_refused,
            resets,
            streams,
            bus,
            presence_from_cache: presence_lookups.with_label_values(&["cache"]),
            presence_from_directory: presence_lookups.with_label_values(&["directory"]),
        }
    }

    /// Adds the bus transport's own counters (`strait_bus_transport_total`), read at scrape time.
    /// Envelopes ÷ batches there is how well the publisher batches under the current load, which
    /// is what the broker's CPU follows (docs/benchmarks.md).
    pub fn watch_bus(&self, bus: Arc<dyn Bus>) {
        let _ = self.registry.register(Box::new(BusTransport {
            bus,
            template: bus_transport_vec(),
        }));
    }

    /// Adds the window pool's figures, read at scrape time: how often windows grew
    /// (`strait_stream_windows_grown_total`) and the bytes lent now
    /// (`strait_stream_window_lent_bytes`), which show whether the pool is what caps growth.
    pub fn watch_windows(&self, pool: Arc<WindowPool>) {
        let _ = self.registry.register(Box::new(Windows::new(pool)));
    }

    /// Text exposition for `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The bus's counters as a Prometheus collector: a snapshot becomes one counter family per scrape.
struct BusTransport {
    bus: Arc<dyn Bus>,
    template: IntCounterVec,
}

fn bus_transport_vec() -> IntCounterVec {
    counter_vec(
        "strait_bus_transport_total",
        "Bus transport counters (AMQP batches, confirms, re-sends, replays dropped)",
        "event",
    )
}

impl Collector for BusTransport {
    fn desc(&self) -> Vec<&Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(stats) = self.bus.transport_stats() else {
            return Vec::new();
        };
        let v = bus_transport_vec();
        for (event, n) in stats.named() {
            v.with_label_values(&[event]).inc_by(n);
        }
        v.collect()
    }
}

/// The window pool as a Prometheus collector: a snapshot per scrape, so concurrent scrapes
/// share no mutable metric.
struct Windows {
    pool: Arc<WindowPool>,
    template: (IntCounter, IntGauge),
}

impl Windows {
    fn new(pool: Arc<WindowPool>) -> Self {
        Windows {
            pool,
            template: window_metrics(),
        }
    }
}

fn window_metrics() -> (IntCounter, IntGauge) {
    let grown = IntCounter::new(
        "strait_stream_windows_grown_total",
        "Stream receive windows doubled because their reader kept up",
    )
    .unwrap_or_else(|_| unreachable_metric());
    let lent = IntGauge::new(
        "strait_stream_window_lent_bytes",
        "Bytes of the window pool lent to grown stream windows",
    )
    .unwrap_or_else(|_| unreachable_metric());
    (grown, lent)
}

impl Collector for Windows {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.template.0.desc();
        d.extend(self.template.1.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (grown, lent) = window_metrics();
        grown.inc_by(self.pool.grown());
        lent.set(i64::try_from(self.pool.lent()).unwrap_or(i64::MAX));
        let mut out = grown.collect();
        out.extend(lent.collect());
        out
    }
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).unwrap_or_else(|_| unreachable_metric())
}

/// Metric constructors only fail on invalid names, and ours are constants.
fn unreachable_metric() -> ! {
    unreachable!("metric definitions are constant and valid")
}
