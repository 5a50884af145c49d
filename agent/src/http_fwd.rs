//! HTTP forwarding: one `RequestHead` stream becomes one request to a local HTTP service, and
//! its response goes back as `ResponseHead`, `Data`, `Fin`.
//!
//! A faithful proxy: no redirects followed, no decompression, headers passed through in order
//! (only `Host` is rewritten to the local authority; the original is in `x-forwarded-host`).
//!
//! Upgrade requests (WebSocket) pass through too: after `101 Switching Protocols` the stream
//! carries raw bytes both ways, like a TCP stream (see [`upgrade`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::{Body, Frame as BodyFrame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use strait_schema::{ErrorCode, Frame, Header, RequestHead, ResponseHead, PATH_PREFIX_HEADER};
use tokio::sync::mpsc;

use crate::config::HttpTarget;
use crate::flow::{Inbound, RecvCredit, SendError, StreamCtx, StreamSender};
use crate::pool::{Failure, Lent, Pool};
use crate::tcp_fwd;

/// Bound on dialling a local service; it is local, so anything slower is as good as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest body that travels inside its response head: small enough that waiting for all of it
/// before sending the head costs nothing a caller would notice.
const INLINE_BODY_MAX: usize = 16 << 10;

/// How long an idle keep-alive connection to a local service is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Dials a local service over TCP, with TLS for `https`.
pub(crate) type Connector = HttpsConnector<HttpConnector>;

/// What the local service receives as a request body: the gateway's `Data` for ordinary
/// requests, nothing for upgrade requests (their `Data` are post-upgrade bytes, kept for later).
type RequestBody = Either<InboundBody, Empty<Bytes>>;

/// One local HTTP service with its own keep-alive pool, shared by every connection of the agent.
pub(crate) struct HttpUpstream {
    pool: Pool<RequestBody>,
    target: HttpTarget,
}

impl HttpUpstream {
    pub(crate) fn new(target: HttpTarget, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let dial = Uri::builder()
            .scheme(target.scheme.clone())
            .authority(target.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority were validated with the config");
        HttpUpstream {
            pool: Pool::new(connector, dial, POOL_IDLE_TIMEOUT),
            target,
        }
    }
}

/// Runs one HTTP exchange to completion. Every exit path leaves the gateway with either a
/// complete response (`Fin`) or a `Reset`.
pub(crate) async fn exchange(ctx: StreamCtx, head: RequestHead, upstream: Arc<HttpUpstream>) {
    let framing = match Framing::of(&head.headers) {
        Ok(f) => f,
        Err(why) => return ctx.tx.reset(ErrorCode::BadRequest, why).await,
    };
    if is_upgrade(&head.headers) {
        // The stream's `Data` are post-upgrade bytes, so a request body would be ambiguous.
        if framing != Framing::Empty {
            return ctx
                .tx
                .reset(ErrorCode::BadRequest, "an upgrade request must not carry a body")
                .await;
        }
        return upgrade(ctx, head, upstream).await;
    }
    let StreamCtx {
        tx,
        recv_credit,
        inbound,
    } = ctx;
    let body = InboundBody {
        rx: inbound,
        credit: recv_credit,
        framing,
        done: false,
    };
    if let Some((resp, conn)) = send_request(&tx, &upstream, &head, Either::Left(body)).await {
        if respond(&tx, &head.method, resp, &upstream.target).await {
            upstream.pool.put(conn);
        }
    }
}

/// An upgrade request (WebSocket and the like). The gateway's `Data` frames are the client's
/// post-upgrade bytes; they may arrive before the service answered, and wait in `inbound`
/// uncredited, so the receive window bounds them.
///
/// On `101 Switching Protocols` the connection to the service leaves hyper and becomes a byte
/// stream, [`tcp_fwd::relay`]ed exactly like a TCP service. Hyper-util's pool never gets it back:
/// the upgraded connection's sender reports closed, and a closed connection is not re-pooled.
/// Any other answer is an ordinary response, and whatever the client sent is discarded (with
/// its credit returned, so the gateway is never stalled by bytes nobody will read).
async fn upgrade(ctx: StreamCtx, head: RequestHead, upstream: Arc<HttpUpstream>) {
    let StreamCtx {
        tx,
        mut recv_credit,
        mut inbound,
    } = ctx;
    let Some((mut resp, conn)) = send_request(&tx, &upstream, &head, Either::Right(Empty::new())).await else {
        return;
    };
    let authority = upstream.target.authority.as_str();
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let discard = async {
            while let Some(Inbound::Data(bytes)) = inbound.recv().await {
                recv_credit.consumed(bytes.len());
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            done = respond(&tx, &head.method, resp, &upstream.target) => {
                if done {
                    upstream.pool.put(conn);
                }
            }
            () = discard => {}
        }
        return;
    }
    let upgraded = hyper::upgrade::on(&mut resp);
    if !send_head(&tx, resp.status(), switching_headers(resp.headers())).await {
        return;
    }
    drop(resp);
    // After a 101 the connection is the upgraded byte stream's, never the pool's again.
    drop(conn);
    let io = match upgraded.await {
        Ok(io) => TokioIo::new(io),
        Err(e) => {
            let reason = format!("local service failed to switch protocols ({authority}): {e}");
            return tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
        }
    };
    let (rd, wr) = tokio::io::split(io);
    let ctx = StreamCtx {
        tx,
        recv_credit,
        inbound,
    };
    tcp_fwd::relay(ctx, rd, wr, authority).await;
}

/// Carries one caller's HTTP/1.1 connection as bytes (`StreamOpen` with `http`, see
/// [`strait_schema::CAP_RAW_HTTP`]): dials the service, tells the gateway where it is (a
/// `ResponseHead` whose `host` is the local authority, with `x-strait-path-prefix` when the
/// service has one) and [`tcp_fwd::relay`]s until both sides are done. The gateway writes every
/// request head for that host, so nothing here parses HTTP, and the connection serves this caller
/// only, never the pool.
pub(crate) async fn connection(ctx: StreamCtx, upstream: Arc<HttpUpstream>) {
    let authority = upstream.target.authority.as_str();
    let io = match upstream.pool.connect().await {
        Ok(io) => TokioIo::new(io),
        Err(e) => {
            let reason = describe_failure(&e, authority);
            tracing::debug!(stream = %ctx.tx.id, %reason, "local HTTP connection failed");
            return ctx.tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
        }
    };
    let mut headers = vec![Header {
        name: HOST.as_str().to_owned(),
        value: Bytes::copy_from_slice(authority.as_bytes()),
    }];
    if !upstream.target.path_prefix.is_empty() {
        headers.push(Header {
            name: PATH_PREFIX_HEADER.to_owned(),
            value: Bytes::copy_from_slice(upstream.target.path_prefix.as_bytes()),
        });
    }
    if !send_head(&ctx.tx, StatusCode::OK, headers).await {
        return;
    }
    let (rd, wr) = tokio::io::split(io);
    tcp_fwd::relay(ctx, rd, wr, authority).await;
}

/// Sends the request to the local service. On failure the stream is reset and `None` returned.
async fn send_request(
    tx: &StreamSender,
    upstream: &HttpUpstream,
    head: &RequestHead,
    body: RequestBody,
) -> Option<(Response<Incoming>, Lent<RequestBody>)> {
    let req = match build_request(&upstream.target, head, body) {
        Ok(r) => r,
        Err(why) => {
            tx.reset(ErrorCode::BadRequest, &why).await;
            return None;
        }
    };
    match upstream.pool.send(req).await {
        Ok(r) => Some(r),
        Err(e) => {
            let reason = describe_failure(&e, upstream.target.authority.as_str());
            tracing::debug!(stream = %tx.id, %reason, "local HTTP request failed");
            tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
            None
        }
    }
}

/// Forwards an ordinary response: head without hop-by-hop headers, body, `Fin`. A response with
/// no body or a small one of known length goes as one frame when the node takes that
/// ([`StreamSender::whole_response`]): a third of the frames, and of the bus envelopes across
/// nodes, for a typical small response.
///
/// True when the response was read to its end, so its connection can serve another request.
async fn respond(tx: &StreamSender, method: &str, resp: Response<Incoming>, target: &HttpTarget) -> bool {
    let (parts, mut body) = resp.into_parts();
    let has_body = has_body(method, parts.status);
    let inline_max = INLINE_BODY_MAX.min(tx.max_data_bytes) as u64;
    if tx.inline_end && (!has_body || body.size_hint().exact().is_some_and(|n| n <= inline_max)) {
        let bytes = if has_body {
            match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let reason = format!("local service failed mid-body ({}): {e}", target.authority);
                    tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
                    return false;
                }
            }
        } else {
            Bytes::new()
        };
        let head = ResponseHead {
            stream: tx.id,
            status: parts.status.as_u16(),
            headers: response_headers(&parts.headers),
            end: true,
            body: Bytes::new(),
        };
        if let Err(SendError::TooLarge) = tx.whole_response(head, bytes).await {
            tx.reset(ErrorCode::Internal, "response head from local service is too large")
                .await;
        }
        // The body was read whole either way.
        return true;
    }
    if !send_head(tx, parts.status, response_headers(&parts.headers)).await {
        return false;
    }
    if has_body {
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if tx.data(data).await.is_err() {
                            return false;
                        }
                    }
                }
                Some(Err(e)) => {
                    let reason = format!("local service failed mid-body ({}): {e}", target.authority);
                    tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
                    return false;
                }
            }
        }
    }
    let _ = tx.fin().await;
    true
}

/// Sends `ResponseHead`; `false` if the stream cannot go on (it was reset if there is a reason
/// to give).
async fn send_head(tx: &StreamSender, status: StatusCode, headers: Vec<Header>) -> bool {
    let head = Frame::ResponseHead(ResponseHead {
        stream: tx.id,
        status: status.as_u16(),
        headers,
        end: false,
        body: Bytes::new(),
    });
    match tx.frame(&head).await {
        Ok(()) => true,
        Err(SendError::Gone) => false,
        Err(SendError::TooLarge) => {
            tx.reset(ErrorCode::Internal, "response head from local service is too large")
                .await;
            false
        }
    }
}

/// True when the request asks to switch protocols: an `upgrade` header and the `upgrade` token
/// in `connection` (RFC 9110 §7.8 requires both; either alone is not an upgrade).
pub(crate) fn is_upgrade(headers: &[Header]) -> bool {
    let has_upgrade = headers.iter().any(|h| h.name == "upgrade");
    let connection_names_it = headers.iter().filter(|h| h.name == "connection").any(|h| {
        std::str::from_utf8(&h.value)
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
            .unwrap_or(false)
    });
    has_upgrade && connection_names_it
}

/// Headers of a `101 Switching Protocols`, for the gateway to replay to its client: unlike
/// [`response_headers`], `connection`, `upgrade` and what they name (`sec-websocket-*`) stay,
/// because the client needs them to complete its side of the switch. Only headers that make no
/// sense on a bodiless response that ends HTTP on this hop are dropped.
pub(crate) fn switching_headers(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !(n == CONTENT_LENGTH.as_str()
                || n == TRANSFER_ENCODING.as_str()
                || matches!(n, "keep-alive" | "te" | "trailer")
                || n.starts_with("proxy-"))
        })
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

/// Responses that never carry a body, whatever their headers say.
fn has_body(method: &str, status: StatusCode) -> bool {
    !(method.eq_ignore_ascii_case("HEAD")
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// How the request body is delimited, read from the request headers the gateway forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (no `content-length`, no chunked `transfer-encoding`, or a zero length).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Streamed, length unknown (`transfer-encoding: chunked`).
    Streamed,
}

impl Framing {
    pub(crate) fn of(headers: &[Header]) -> Result<Self, &'static str> {
        let mut framing = Framing::Empty;
        for h in headers {
            if h.name == "content-length" {
                let n = std::str::from_utf8(&h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or("invalid content-length")?;
                if let Framing::Length(prev) = framing {
                    if prev != n {
                        return Err("conflicting content-length headers");
                    }
                }
                framing = if n == 0 { Framing::Empty } else { Framing::Length(n) };
            }
        }
        let chunked = headers.iter().filter(|h| h.name == "transfer-encoding").any(|h| {
            std::str::from_utf8(&h.value)
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked")))
                .unwrap_or(false)
        });
        if chunked {
            framing = Framing::Streamed;
        }
        Ok(framing)
    }
}

/// Builds the request for the local service: origin-form target (prefix + target), headers in
/// order with `Host` set to the local authority.
pub(crate) fn build_request<B>(target: &HttpTarget, head: &RequestHead, body: B) -> Result<Request<B>, String> {
    let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| "invalid method".to_owned())?;
    if !head.uri.starts_with('/') {
        return Err("request target must start with '/'".to_owned());
    }
    let uri = Uri::builder()
        .path_and_query(format!("{}{}", target.path_prefix, head.uri))
        .build()
        .map_err(|_| "invalid request target".to_owned())?;
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    for h in &head.headers {
        if h.name == "host" {
            continue;
        }
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| format!("invalid header name {:?}", h.name))?;
        let value = HeaderValue::from_maybe_shared(h.value.clone())
            .map_err(|_| format!("invalid value for header {:?}", h.name))?;
        headers.append(name, value);
    }
    let host = HeaderValue::from_str(target.authority.as_str()).map_err(|_| "invalid service authority".to_owned())?;
    headers.insert(HOST, host);
    Ok(req)
}

/// Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1), plus any the `Connection`
/// header names; `content-length` always survives so the gateway can frame the body.
pub(crate) fn response_headers(map: &HeaderMap) -> Vec<Header> {
    let named: Vec<String> = map
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != CONTENT_LENGTH.as_str())
        .collect();
    map.iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !is_hop_by_hop(n) && !named.iter().any(|c| c == n)
        })
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(name, "connection" | "keep-alive" | "te" | "trailer" | "upgrade")
        || name == TRANSFER_ENCODING.as_str()
        || name.starts_with("proxy-")
}

/// A reason for the caller: says whether the local service refused, was unreachable, or failed.
fn describe_failure(e: &Failure, authority: &str) -> String {
    match e {
        Failure::Connect(e) => {
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            let mut src = Some(e);
            while let Some(s) = src {
                if s.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                {
                    return format!("local service refused connection ({authority})");
                }
                src = s.source();
            }
            format!("local service unreachable ({authority}): {}", error_chain(e))
        }
        Failure::Http(e) => format!("local service failed ({authority}): {}", error_chain(e)),
    }
}

/// `error: cause: cause`, for reasons that should say what actually happened.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = c.source();
    }
    s
}

/// Why the request body ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The stream was torn down before the gateway's `Fin`.
    #[error("request body aborted before its end")]
    Aborted,
}

/// The request body as hyper pulls it: bytes from the gateway's `Data` frames, credited back
/// as hyper takes them (that is when they count as consumed).
pub(crate) struct InboundBody {
    rx: mpsc::UnboundedReceiver<Inbound>,
    credit: RecvCredit,
    framing: Framing,
    done: bool,
}

impl Body for InboundBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<BodyFrame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done || this.framing == Framing::Empty {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Inbound::Data(bytes))) => {
                this.credit.consumed(bytes.len());
                Poll::Ready(Some(Ok(BodyFrame::data(bytes))))
            }
            Poll::Ready(Some(Inbound::Fin)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Err(BodyError::Aborted)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.framing == Framing::Empty
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Streamed => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;
    use strait_schema::StreamId;

    fn h(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    fn target(prefix: &str) -> HttpTarget {
        HttpTarget {
            scheme: Scheme::HTTP,
            authority: "127.0.0.1:3000".parse().unwrap(),
            path_prefix: prefix.into(),
        }
    }

    fn head(uri: &str, headers: Vec<Header>) -> RequestHead {
        RequestHead {
            stream: StreamId(1),
            service: String::new(),
            method: "POST".into(),
            uri: uri.into(),
            headers,
            end: false,
        }
    }

    #[test]
    fn framing_follows_length_then_chunked_else_empty() {
        assert_eq!(Framing::of(&[]), Ok(Framing::Empty));
        assert_eq!(Framing::of(&[h("content-length", "12")]), Ok(Framing::Length(12)));
        assert_eq!(Framing::of(&[h("content-length", "0")]), Ok(Framing::Empty));
        assert_eq!(
            Framing::of(&[h("transfer-encoding", "gzip, Chunked")]),
            Ok(Framing::Streamed)
        );
        assert!(Framing::of(&[h("content-length", "x")]).is_err());
        assert!(Framing::of(&[h("content-length", "1"), h("content-length", "2")]).is_err());
    }

    #[test]
    fn request_gets_prefix_local_host_and_keeps_header_order() {
        let req = build_request(
            &target("/base"),
            &head(
                "/a/b?c=d",
                vec![
                    h("host", "alpha.example.com"),
                    h("x-m", "1"),
                    h("accept", "*/*"),
                    h("x-m", "2"),
                ],
            ),
            (),
        )
        .unwrap();
        assert_eq!(req.uri(), "/base/a/b?c=d");
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.headers()[HOST], "127.0.0.1:3000");
        let xm: Vec<_> = req.headers().get_all("x-m").iter().collect();
        assert_eq!(xm, vec!["1", "2"]);
    }

    #[test]
    fn request_refuses_non_origin_targets() {
        assert!(build_request(&target(""), &head("http://evil/", vec![]), ()).is_err());
        assert!(build_request(&target(""), &head("*", vec![]), ()).is_err());
    }

    #[test]
    fn response_drops_hop_by_hop_but_keeps_content_length() {
        let mut map = HeaderMap::new();
        map.append("content-type", "text/plain".parse().unwrap());
        map.append("connection", "keep-alive, x-private".parse().unwrap());
        map.append("keep-alive", "timeout=5".parse().unwrap());
        map.append("x-private", "1".parse().unwrap());
        map.append("transfer-encoding", "chunked".parse().unwrap());
        map.append("proxy-authenticate", "Basic".parse().unwrap());
        map.append("content-length", "5".parse().unwrap());
        map.append("set-cookie", "a=1".parse().unwrap());
        map.append("set-cookie", "b=2".parse().unwrap());
        let names: Vec<_> = response_headers(&map).into_iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(
            names,
            vec![
                ("content-type".into(), Bytes::from_static(b"text/plain")),
                ("content-length".into(), Bytes::from_static(b"5")),
                ("set-cookie".into(), Bytes::from_static(b"a=1")),
                ("set-cookie".into(), Bytes::from_static(b"b=2")),
            ]
        );
    }

    #[test]
    fn upgrade_needs_the_header_and_the_connection_token() {
        assert!(is_upgrade(&[h("upgrade", "websocket"), h("connection", "Upgrade")]));
        assert!(is_upgrade(&[
            h("connection", "keep-alive"),
            h("connection", "x, UPGRADE "),
            h("upgrade", "websocket"),
        ]));
        assert!(!is_upgrade(&[h("upgrade", "websocket")]));
        assert!(!is_upgrade(&[h("connection", "upgrade")]));
        assert!(!is_upgrade(&[
            h("upgrade", "websocket"),
            h("connection", "upgraded, keep-alive")
        ]));
    }

    #[test]
    fn switching_protocols_keeps_upgrade_headers() {
        let mut map = HeaderMap::new();
        map.append("upgrade", "websocket".parse().unwrap());
        map.append("connection", "Upgrade".parse().unwrap());
        map.append("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap());
        map.append("keep-alive", "timeout=5".parse().unwrap());
        map.append("content-length", "0".parse().unwrap());
        let names: Vec<_> = switching_headers(&map).into_iter().map(|h| h.name).collect();
        assert_eq!(names, vec!["upgrade", "connection", "sec-websocket-accept"]);
    }

    #[test]
    fn bodiless_responses() {
        assert!(!has_body("HEAD", StatusCode::OK));
        assert!(!has_body("GET", StatusCode::NO_CONTENT));
        assert!(!has_body("GET", StatusCode::NOT_MODIFIED));
        assert!(has_body("GET", StatusCode::OK));
    }
}
