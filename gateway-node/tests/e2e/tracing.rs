//! Tracing across nodes: two gateway processes export spans over OTLP to a collector run by the
//! test, and one request's spans on both nodes share one trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;
use crate::procs::ProcCluster;
use crate::real_cluster::alpha_on_b;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attrs: HashMap<String, String>,
}

/// An OTLP gRPC trace collector on an ephemeral loopback port.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let resource = text(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            let node = resource.get("service.instance.id").cloned().unwrap_or_default();
            assert_eq!(resource.get("service.name").map(String::as_str), Some("strait-gateway"));
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        node: node.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        attrs: text(&s.attributes),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (Self, String, tokio::task::JoinHandle<()>) {
        let c = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = TraceServiceServer::new(c.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (c, url, task)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    fn find(&self, node: &str, name: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|s| s.node == node && s.name == name)
            .collect()
    }

    async fn wait_for(&self, node: &str, name: &str, n: usize) -> Vec<Got> {
        eventually(
            Duration::from_secs(20),
            &format!("{n} `{name}` spans from {node}"),
            || {
                let found = self.find(node, name).len();
                async move { found >= n }
            },
        )
        .await;
        self.find(node, name)
    }
}

/// Node A (caller side) exports every 100 ms; node B (the agent's) practically never on its own,
/// so B's spans arriving at all proves a SIGTERM flushes them.
#[actix_rt::test]
async fn one_request_is_one_trace_across_nodes() {
    let backend = Backend::start().await;
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let (collector, endpoint, server) = Collector::start().await;
    ProcCluster::run(2, |mut c| async move {
        for (i, delay_ms) in [(0, "100"), (1, "600000")] {
            c.nodes[i].env = vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), delay_ms.into()),
            ];
            c.kill(i);
            c.start(i).await;
        }
        let agent = alpha_on_b(&c, &[backend.url(), format!("echo={}", echo.url())]).await;

        // Across the bus: HTTP into A, then a TCP route on A.
        let res = c
            .client(0, &["alpha"])
            .get(c.url(0, "alpha", "/inspect?token=not-for-spans"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let listen = c.route(0, "alpha", "echo").await;
        let mut sock = tokio::net::TcpStream::connect(listen).await.unwrap();
        sock.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        sock.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(sock);
        // On the agent's own node: no bus, still a span.
        let res = c
            .client(1, &["alpha"])
            .get(c.url(1, "alpha", "/inspect"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);

        let a_http = collector.wait_for("node-a", "ingress", 1).await;
        assert_eq!(a_http.len(), 1, "{a_http:?}");
        let a_http = &a_http[0];
        assert_eq!(a_http.attrs.get("agent").map(String::as_str), Some("alpha"));
        assert_eq!(a_http.attrs.get("http.request.method").map(String::as_str), Some("GET"));
        assert_eq!(
            a_http.attrs.get("http.response.status_code").map(String::as_str),
            Some("200")
        );
        assert!(
            !format!("{a_http:?}").contains("not-for-spans"),
            "the query string leaked into a span: {a_http:?}"
        );
        let a_tcp = collector.wait_for("node-a", "tcp.accept", 1).await;
        assert_eq!(a_tcp.len(), 1, "{a_tcp:?}");
        // B batches for minutes: nothing of it has been exported yet.
        assert!(
            collector.spans().iter().all(|s| s.node != "node-b"),
            "node-b exported before its shutdown; the test would not show the flush"
        );

        // SIGTERM: B drains (the agent moves to A), exits 0, and flushes its spans on the way out.
        c.stop(1).await;
        let opens = collector.wait_for("node-b", "bus.open", 2).await;
        for a in [a_http, &a_tcp[0]] {
            let child = opens
                .iter()
                .find(|b| b.parent_span_id == a.span_id)
                .unwrap_or_else(|| panic!("no node-b span is a child of {a:?}; node-b has {opens:?}"));
            assert_eq!(child.trace_id, a.trace_id, "one request, one trace");
            assert_eq!(child.attrs.get("from_node").map(String::as_str), Some("node-a"));
        }
        let b_http = collector.find("node-b", "ingress");
        assert_eq!(b_http.len(), 1, "{b_http:?}");
        assert!(
            b_http[0].parent_span_id.is_empty(),
            "a same-node request starts its own trace"
        );
        assert_eq!(
            b_http[0].attrs.get("http.response.status_code").map(String::as_str),
            Some("200")
        );
        assert!(
            collector
                .spans()
                .iter()
                .all(|s| s.trace_id != b_http[0].trace_id || s.node == "node-b"),
            "the same-node request's trace reached another node"
        );
        agent.kill();
        c
    })
    .await;
    server.abort();
}
