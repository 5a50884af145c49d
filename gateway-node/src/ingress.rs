//! Public HTTP ingress: `Host: <agent>.<domain>` (or `<service>.<agent>.<domain>`) is carried
//! through the agent's tunnel as one stream and the response streamed back.

use std::sync::Arc;

use actix_web::body::{BodyStream, SizedStream};
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use strait_schema::{AgentName, ErrorCode, Frame, Header, RequestHead, StreamId};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cluster::{self, Target};
use crate::inflight::{Request, RequestCtl, TunnelBody};
use crate::node::NodeState;
use crate::session::{OpenStream, StreamCloser, StreamOwner};

/// Headers that describe one connection, not the message; a proxy never forwards them
/// (RFC 9110 §7.6.1), nor any header the `Connection` header names.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True when a header must not cross a proxy hop, given the message's `Connection` tokens.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    HOP_BY_HOP.contains(&name) || connection_tokens.iter().any(|t| t == name)
}

fn connection_tokens(headers: &header::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// An error answer with the stable code in the body and in `x-strait-error`.
pub fn error_response(code: ErrorCode, message: &str) -> HttpResponse {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    HttpResponse::build(status)
        .insert_header(("x-strait-error", code.as_str()))
        .content_type("application/json")
        .body(serde_json::json!({ "code": code.as_str(), "message": message }).to_string())
}

/// The protocol a request asks to upgrade to (`Upgrade` plus the `upgrade` Connection token).
fn upgrade_of<'a>(headers: &'a header::HeaderMap, connection_tokens: &[String]) -> Option<&'a str> {
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
pub async fn handle(req: HttpRequest, payload: web::Payload, node: web::Data<NodeState>) -> HttpResponse {
    let span = tracing::info_span!("ingress", otel.kind = "server", http.request.method = %req.method(), agent = tracing::field::Empty, http.response.status_code = tracing::field::Empty);
    let res = carry(req, payload, node).instrument(span.clone()).await;
    span.record("http.response.status_code", res.status().as_u16());
    res
}

async fn carry(req: HttpRequest, payload: web::Payload, node: web::Data<NodeState>) -> HttpResponse {
    let node: Arc<NodeState> = node.into_inner();
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
    let head = match request_head(&req, host) {
        Ok(h) => h,
        Err(why) => {
            node.metrics.requests.with_label_values(&["BAD_REQUEST"]).inc();
            return error_response(ErrorCode::BadRequest, why);
        }
    };
    // After an upgrade the request "body" is the client's side of the upgraded connection.
    let has_body = head
        .headers
        .iter()
        .any(|h| h.name == "content-length" || h.name == "transfer-encoding" || h.name == "upgrade");
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
    if has_body {
        request.pump_body(payload, &ctl, grant.limits.max_data_bytes as usize);
    }
    let head = match request.head(head_rx).await {
        Ok(h) => h,
        Err((code, why)) => return error_response(code, &why),
    };
    let body = (!head.end).then(|| TunnelBody::new(body_rx, &grant, id, request));
    response(&req, head, body)
}

/// The host a request is for: the authority of an absolute-form target, else `Host` (RFC 9112
/// §3.2.2). Never `Forwarded` or `X-Forwarded-Host`: those are the caller's to write, and routing
/// by them would let a caller reach an agent other than the one a proxy in front let through.
fn request_host(req: &HttpRequest) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .filter(|h| !h.is_empty())
}

/// Builds the head sent to the agent: hop-by-hop headers removed, `X-Forwarded-*` added. Body
/// framing survives as `content-length` or `transfer-encoding: chunked`, which is how the agent
/// knows whether a body follows.
fn request_head(req: &HttpRequest, host: &str) -> Result<RequestHead, &'static str> {
    let tokens = connection_tokens(req.headers());
    let chunked = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
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
    let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
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
/// the head carried the whole response (`end`).
fn response(req: &HttpRequest, mut head: strait_schema::ResponseHead, body: Option<TunnelBody>) -> HttpResponse {
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = HttpResponse::build(status);
    let mut length: Option<u64> = None;
    let tokens: Vec<String> = head
        .headers
        .iter()
        .filter(|h| h.name == "connection")
        .filter_map(|h| std::str::from_utf8(&h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for h in &head.headers {
        if status == StatusCode::SWITCHING_PROTOCOLS && h.name == "upgrade" {
            // Sets the header and marks the connection as upgraded (`connection: upgrade`).
            if let Ok(proto) = std::str::from_utf8(&h.value) {
                res.upgrade(proto);
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
            res.append_header((n, v));
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The upgraded connection's bytes, raw: actix writes a 101's body unframed. (With `end`
        // the agent closed the upgraded stream at once.)
        return match body {
            Some(body) => res.body(BodyStream::new(body)),
            None => res.body(()),
        };
    }
    let bodyless = req.method() == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodyless {
        // Without `end` the agent follows the head with Fin at once; wait for it so the stream
        // ends as complete (not as a caller that went away).
        if let Some(mut body) = body {
            actix_rt::spawn(async move { while futures_util::StreamExt::next(&mut body).await.is_some() {} });
        }
        return match length {
            // An (empty) body stream with `no_chunking` is how actix keeps a HEAD answer's length.
            Some(len) if req.method() == Method::HEAD => {
                res.no_chunking(len).body(BodyStream::new(futures_util::stream::empty::<
                    Result<Bytes, std::io::Error>,
                >()))
            }
            _ => res.body(()),
        };
    }
    let Some(body) = body else {
        // The whole body came with the head; actix frames it with its length.
        return res.body(std::mem::take(&mut head.body));
    };
    match length {
        Some(len) => res.body(SizedStream::new(len, body)),
        // Not `streaming()`: it would invent a content-type the origin did not send.
        None => res.body(BodyStream::new(body)),
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
