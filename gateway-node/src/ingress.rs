//! Public HTTP ingress: `Host: <agent>.<domain>` (or `<service>.<agent>.<domain>`) is carried
//! through the agent's tunnel as one stream and the response streamed back.
//!
//! Callers are served by hyper's HTTP/1 server: it writes a response body's chunks with
//! `writev`, as the agent's frames brought them, where actix-http copied every byte into its
//! write buffer first (docs/benchmarks.md, twenty-first round).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap, Method, StatusCode};
use hyper::body::{Body, Frame as BodyFrame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use strait_schema::{AgentName, ErrorCode, Frame, Header, RequestHead, StreamId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cluster::{self, Target};
use crate::head_timer::HeadTimer;
use crate::inflight::{Request, RequestCtl, TunnelBody};
use crate::node::NodeState;
use crate::session::{OpenStream, StreamCloser, StreamOwner};

/// Most bytes of one request head a caller may send (actix-web's limit, which this listener had
/// before; nginx allows 4 x 8 KiB by default): more is answered 431.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// One caller's request, as hyper hands it over.
pub type IngressRequest = http::Request<Incoming>;

/// Serves one caller's connection (HTTP/1.1, keep-alive, upgrades) until it closes, or until the
/// node stops taking callers: then the request in flight is finished and the connection closed.
pub async fn serve(io: tokio::net::TcpStream, node: Arc<NodeState>, closing: actix_server::GracefulShutdownSignal) {
    let peer = io.peer_addr().ok();
    // Frames are small and latency-bound; Nagle plus delayed ACKs cost 40 ms stalls.
    if let Err(e) = io.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a caller's connection");
    }
    serve_io(io, peer, node, closing).await
}

/// [`serve`] on any connection: also a caller's connection that `carried` began reading and
/// hands over, with what it read, when the agent cannot take it as bytes.
pub async fn serve_io<I>(
    io: I,
    peer: Option<SocketAddr>,
    node: Arc<NodeState>,
    closing: actix_server::GracefulShutdownSignal,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let caller_timeout = node.cfg.caller_timeout;
    let requests = node.metrics.requests.clone();
    let svc = hyper::service::service_fn(move |req| {
        let node = node.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, node).await) }
    });
    let conn = http1::Builder::new()
        .timer(HeadTimer::new())
        .header_read_timeout(caller_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        // A caller that hangs up before its answer drops its handler at once, which resets the
        // stream on the agent (as a proxy's "client aborted"); allowing half-closed connections
        // kept the agent working for nobody until it answered or the head timeout fired.
        .half_close(false)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        () = closing.notified() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // hyper answers a head it cannot take (431, 400) itself, then closes; such a caller is a
    // refused request like any other.
    let refused = || requests.with_label_values(&[ErrorCode::BadRequest.as_str()]).inc();
    match res {
        Ok(()) => {}
        Err(e) if e.is_parse_too_large() => {
            refused();
            tracing::info!(
                ?peer,
                limit = MAX_HEAD_BYTES,
                "caller's request head too large: answered 431 and closed"
            )
        }
        Err(e) if e.is_parse() => {
            refused();
            tracing::info!(?peer, error = %e, "malformed request from a caller: answered 400 and closed")
        }
        // A slow head and an idle keep-alive connection look the same; the latter is routine.
        Err(e) if e.is_timeout() => {
            tracing::debug!(?peer, "caller sent no request head within {caller_timeout:?}: closed")
        }
        // Callers hanging up mid-answer are routine.
        Err(e) => tracing::debug!(?peer, error = %e, "caller connection ended with an error"),
    }
}

/// True when a header must not cross a proxy hop, given the message's `Connection` tokens.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    crate::http1::HOP_BY_HOP.contains(&name)
        || name == "transfer-encoding"
        || connection_tokens.iter().any(|t| t == name)
}

fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// An error answer with the stable code in the body and in `x-strait-error`.
pub fn error_response(code: ErrorCode, message: &str) -> http::Response<ResponseBody> {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = serde_json::json!({ "code": code.as_str(), "message": message }).to_string();
    let mut res = http::Response::new(ResponseBody::Full(Some(Bytes::from(body))));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert("x-strait-error", header::HeaderValue::from_static(code.as_str()));
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res
}

/// The protocol a request asks to upgrade to (`Upgrade` plus the `upgrade` Connection token).
fn upgrade_of<'a>(headers: &'a HeaderMap, connection_tokens: &[String]) -> Option<&'a str> {
    if !connection_tokens.iter().any(|t| t == "upgrade") {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// Which agent (and service) a Host header names, if it is under our domain.
pub fn route_host(host: &str, domain: &str) -> Option<(AgentName, String)> {
    let host = host
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let prefix = host.strip_suffix(domain)?.strip_suffix('.')?;
    match prefix.split_once('.') {
        None => Some((AgentName::new(prefix)?, String::new())),
        Some((service, agent)) if strait_schema::frame::is_short_id(service) && !agent.contains('.') => {
            Some((AgentName::new(agent)?, service.to_owned()))
        }
        Some(_) => None,
    }
}

/// Unregisters a stream whose handler was dropped (caller gone) before its [`Request`] took
/// over.
struct OpenGuard(Option<(StreamCloser, StreamId)>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some((closer, id)) = self.0.take() {
            closer.close(id);
        }
    }
}

/// The ingress handler for every path, in one `ingress` span per request: method, agent and
/// status only (a path or query may carry a caller's credentials).
pub async fn handle(
    req: IngressRequest,
    peer: Option<SocketAddr>,
    node: Arc<NodeState>,
) -> http::Response<ResponseBody> {
    let span = tracing::info_span!("ingress", otel.kind = "server", http.request.method = %req.method(), agent = tracing::field::Empty, http.response.status_code = tracing::field::Empty);
    let res = carry(req, peer, node).instrument(span.clone()).await;
    span.record("http.response.status_code", res.status().as_u16());
    res
}

async fn carry(
    mut req: IngressRequest,
    peer: Option<SocketAddr>,
    node: Arc<NodeState>,
) -> http::Response<ResponseBody> {
    let Some(host) = request_host(&req) else {
        node.metrics.requests.with_label_values(&["BAD_REQUEST"]).inc();
        return error_response(ErrorCode::BadRequest, "the request names no host");
    };
    let Some((agent, service)) = route_host(host, &node.cfg.domain) else {
        node.metrics.requests.with_label_values(&["BAD_REQUEST"]).inc();
        return error_response(
            ErrorCode::BadRequest,
            &format!(
                "host {host:?} is not served here (expected <agent>.{})",
                node.cfg.domain
            ),
        );
    };
    tracing::Span::current().record("agent", agent.as_str());
    let target = match cluster::locate(&node, &agent).await {
        Ok(t) => t,
        Err((code, why)) => {
            node.metrics.requests.with_label_values(&[code.as_str()]).inc();
            return error_response(code, &why);
        }
    };
    let head = match request_head(&req, host, peer) {
        Ok(h) => h,
        Err(why) => {
            node.metrics.requests.with_label_values(&["BAD_REQUEST"]).inc();
            return error_response(ErrorCode::BadRequest, why);
        }
    };
    // After an upgrade the stream carries the client's side of the upgraded connection.
    let upgrade = head.headers.iter().any(|h| h.name == "upgrade");
    let has_body = upgrade
        || head
            .headers
            .iter()
            .any(|h| h.name == "content-length" || h.name == "transfer-encoding");
    let id = StreamId::random();
    // A request without a body is one frame: the head says no `Fin` follows.
    let head = RequestHead {
        stream: id,
        service,
        end: !has_body,
        ..head
    };

    let (body_tx, body_rx) = mpsc::unbounded_channel();
    let (ctl, head_rx) = RequestCtl::new(node.cfg.limits.stream_window);
    let closer = match &target {
        Target::Local(s) => StreamCloser::Local(s.streams.clone()),
        Target::Remote { .. } => StreamCloser::Remote(node.clone()),
    };
    let mut open_guard = OpenGuard(Some((closer, id)));
    let open = OpenStream {
        id,
        ctl: StreamOwner::Request(ctl.clone()),
        body: body_tx,
        expects_head: true,
        carries_http: false,
    };
    let grant = match cluster::open_stream(&node, &target, &agent, open).await {
        Ok(g) => g,
        Err((code, why)) => {
            node.metrics.requests.with_label_values(&[code.as_str()]).inc();
            return error_response(code, &why);
        }
    };
    if !grant.link.send(&Frame::RequestHead(head)) {
        return error_response(ErrorCode::AgentUnavailable, &format!("agent {agent} disconnected"));
    }
    // From here the request ends the stream however this handler ends, also by being dropped.
    open_guard.0 = None;
    let mut request = Request::new(id, node.clone(), &grant);
    let max_data = grant.limits.max_data_bytes as usize;
    let method = req.method().clone();
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    if has_body && !upgrade {
        let body = http_body_util::BodyDataStream::new(req.into_body());
        request.pump_body(body, &ctl, max_data);
    }
    let head = match request.head(head_rx).await {
        Ok(h) => h,
        Err((code, why)) => return error_response(code, &why),
    };
    let body = (!head.end).then(|| TunnelBody::new(body_rx, &grant, id, request));
    match on_upgrade {
        Some(on_upgrade) if head.status == 101 => {
            if let Some(mut body) = body {
                // The upgraded connection's bytes, raw, both ways: the caller's become the
                // stream's `Data` (within the agent's credit), the agent's are written back.
                actix_rt::spawn(async move {
                    let upgraded = match on_upgrade.await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::debug!(error = %e, "caller's upgrade did not complete");
                            return;
                        }
                    };
                    let (rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                    body.request_mut()
                        .pump_body(tokio_util::io::ReaderStream::new(rd), &ctl, max_data);
                    while let Some(chunk) = body.next().await {
                        let Ok(chunk) = chunk else { break };
                        if wr.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = wr.shutdown().await;
                });
            }
            response(&method, head, None)
        }
        _ => response(&method, head, body),
    }
}

/// The host a request is for: the authority of an absolute-form target, else `Host` (RFC 9112
/// §3.2.2). Never `Forwarded` or `X-Forwarded-Host`: those are the caller's to write, and routing
/// by them would let a caller reach an agent other than the one a proxy in front let through.
fn request_host(req: &IngressRequest) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .filter(|h| !h.is_empty())
}

/// Builds the head sent to the agent: hop-by-hop headers removed, `X-Forwarded-*` added. Body
/// framing survives as `content-length` or `transfer-encoding: chunked`, which is how the agent
/// knows whether a body follows.
fn request_head(req: &IngressRequest, host: &str, peer: Option<SocketAddr>) -> Result<RequestHead, &'static str> {
    let tokens = connection_tokens(req.headers());
    let chunked = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("chunked")));
    let mut headers = Vec::with_capacity(req.headers().len() + 3);
    let mut xff: Option<String> = None;
    for (name, value) in req.headers() {
        let n = name.as_str();
        if is_hop_by_hop(n, &tokens) || n == "expect" {
            continue;
        }
        if n == "x-forwarded-for" {
            let v = value.to_str().map_err(|_| "x-forwarded-for is not text")?;
            xff = Some(match xff {
                Some(prev) => format!("{prev}, {v}"),
                None => v.to_owned(),
            });
            continue;
        }
        if n == "x-forwarded-proto" || n == "x-forwarded-host" {
            continue;
        }
        headers.push(Header {
            name: n.to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        });
    }
    if let Some(proto) = upgrade_of(req.headers(), &tokens) {
        // An upgrade keeps its hop-by-hop pair: the agent replays it to the local service, and
        // after a 101 the stream carries the upgraded connection's bytes both ways.
        headers.push(Header {
            name: "connection".into(),
            value: Bytes::from_static(b"upgrade"),
        });
        headers.push(Header {
            name: "upgrade".into(),
            value: Bytes::copy_from_slice(proto.as_bytes()),
        });
    }
    if chunked {
        headers.push(Header {
            name: "transfer-encoding".into(),
            value: Bytes::from_static(b"chunked"),
        });
    }
    let peer = peer.map(|a| a.ip().to_string()).unwrap_or_default();
    let xff = match xff {
        Some(prev) if !peer.is_empty() => format!("{prev}, {peer}"),
        Some(prev) => prev,
        None => peer,
    };
    if !xff.is_empty() {
        headers.push(Header {
            name: "x-forwarded-for".into(),
            value: Bytes::from(xff),
        });
    }
    headers.push(Header {
        name: "x-forwarded-proto".into(),
        value: Bytes::from_static(b"http"),
    });
    headers.push(Header {
        name: "x-forwarded-host".into(),
        value: Bytes::copy_from_slice(host.as_bytes()),
    });
    // The agent's decoder refuses heads past these limits and would drop the whole connection,
    // so an oversized head is refused here, for this caller only.
    let limits = strait_schema::Limits::default();
    let header_bytes: usize = headers.iter().map(|h| h.name.len() + h.value.len()).sum();
    if headers.len() > limits.max_headers || header_bytes > limits.max_header_bytes {
        return Err("request headers too large");
    }
    let uri = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if uri.len() > limits.max_uri_bytes {
        return Err("request target too long");
    }
    Ok(RequestHead {
        stream: StreamId(1),
        service: String::new(),
        method: req.method().as_str().to_owned(),
        uri: uri.to_owned(),
        headers,
        end: false,
    })
}

/// Turns the agent's head and the body stream into the caller's response; `body` is `None` when
/// the head carried the whole response (`end`), or when an upgraded connection carries it.
fn response(
    method: &Method,
    mut head: strait_schema::ResponseHead,
    body: Option<TunnelBody>,
) -> http::Response<ResponseBody> {
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = http::Response::new(ResponseBody::Full(None));
    *res.status_mut() = status;
    let mut length: Option<u64> = None;
    let tokens: Vec<String> = head
        .headers
        .iter()
        .filter(|h| h.name == "connection")
        .filter_map(|h| std::str::from_utf8(&h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let out = res.headers_mut();
    for h in &head.headers {
        if status == StatusCode::SWITCHING_PROTOCOLS && h.name == "upgrade" {
            if let Ok(v) = header::HeaderValue::from_bytes(&h.value) {
                out.insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
                out.insert(header::UPGRADE, v);
            }
            continue;
        }
        if is_hop_by_hop(&h.name, &tokens) {
            continue;
        }
        if h.name == "content-length" {
            length = std::str::from_utf8(&h.value).ok().and_then(|v| v.trim().parse().ok());
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(h.name.as_bytes()),
            header::HeaderValue::from_bytes(&h.value),
        ) {
            out.append(n, v);
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return res;
    }
    let bodyless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodyless {
        // Without `end` the agent follows the head with Fin at once; wait for it so the stream
        // ends as complete (not as a caller that went away).
        if let Some(mut body) = body {
            actix_rt::spawn(async move { while body.next().await.is_some() {} });
        }
        if let (Some(len), true) = (length, *method == Method::HEAD) {
            // A HEAD answer keeps the length a GET would have had.
            out.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        }
        return res;
    }
    *res.body_mut() = match body {
        // The whole body came with the head.
        None => ResponseBody::Full(Some(std::mem::take(&mut head.body))),
        Some(body) => ResponseBody::Tunnel {
            body: Box::new(body),
            length,
        },
    };
    res
}

/// A caller's response body: whole, or streamed from the tunnel (with the origin's length when
/// it sent one, so the caller sees the same framing).
pub enum ResponseBody {
    /// Known in full (`None`: no body at all).
    Full(Option<Bytes>),
    /// The stream's body events.
    Tunnel {
        /// Where the chunks come from (boxed: a body known in full stays small).
        body: Box<TunnelBody>,
        /// The origin's `content-length`.
        length: Option<u64>,
    },
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(BodyFrame::data(b)))),
            ResponseBody::Tunnel { body, .. } => Pin::new(&mut **body)
                .poll_next(cx)
                .map(|c| c.map(|c| c.map(BodyFrame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(b) if b.as_ref().is_none_or(|b| b.is_empty()))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Tunnel { length: Some(n), .. } => SizeHint::with_exact(*n),
            ResponseBody::Tunnel { length: None, .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_agent_and_service_hosts_under_the_domain() {
        let a = |s: &str| AgentName::new(s).unwrap();
        assert_eq!(
            route_host("alpha.localhost:8080", "localhost"),
            Some((a("alpha"), String::new()))
        );
        assert_eq!(
            route_host("Alpha.LocalHost.", "localhost"),
            Some((a("alpha"), String::new()))
        );
        assert_eq!(
            route_host("web.alpha.example.com", "example.com"),
            Some((a("alpha"), "web".into()))
        );
        assert_eq!(route_host("localhost", "localhost"), None);
        assert_eq!(route_host("alpha.evil.com", "localhost"), None);
        assert_eq!(route_host("xalpha.localhostx", "localhost"), None);
        assert_eq!(route_host("a.b.c.localhost", "localhost"), None);
        assert_eq!(route_host("bad_name.localhost", "localhost"), None);
    }

    #[test]
    fn hop_by_hop_includes_connection_tokens() {
        let t = vec!["x-private".to_string()];
        assert!(is_hop_by_hop("keep-alive", &t));
        assert!(is_hop_by_hop("x-private", &t));
        assert!(!is_hop_by_hop("content-type", &t));
    }
}
