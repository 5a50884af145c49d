//! Public HTTP with `--http-relay connection`: each caller's HTTP/1.1 connection is carried to the
//! agent as one byte stream (`StreamOpen` with `http`), and the agent copies it to and from one
//! connection to its service without parsing HTTP.
//!
//! The gateway still reads every request head, to route it by `Host` and to write it anew for
//! the service (its `Host`, path prefix, `X-Forwarded-*`, no hop-by-hop headers), and follows
//! bodies and answer heads ([`http1`]) only far enough to know where each exchange ends. Bodies
//! and answers pass as they came. Re-encoding every request as frames and replaying it with an
//! HTTP client on the agent was most of a small request's cost in the tunnel (docs/benchmarks.md).
//!
//! Requests on one connection are served one at a time, as hyper's server does: a caller's
//! pipelined requests wait in the buffer until the answer before them is complete.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use strait_schema::read_size::ReadSize;
use strait_schema::{AgentName, Data, ErrorCode, Fin, Frame, Reset, StreamId, StreamOpen, PATH_PREFIX_HEADER};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::cluster::{self, Target};
use crate::head_timer::LazySleep;
use crate::http1::{self, BodyCursor, BodyLength, Rewrite};
use crate::inflight::{CreditReturner, RequestCtl};
use crate::ingress::{self, route_host};
use crate::node::NodeState;
use crate::session::{AgentLink, BodyEvent, OpenStream, StreamCloser, StreamOwner, NO_RAW_HTTP};

/// Why an exchange ended without a complete answer: the code it is answered and counted with,
/// and the reason.
type Failure = (ErrorCode, String);

/// Why an exchange failed when the caller hung up or its connection failed.
const CALLER_GONE: &str = "caller went away";

/// Why an exchange failed when the service closed its connection before answering at all.
const UNANSWERED: &str = "local service closed the connection without answering";

/// How long a caller's connection that ended cleanly waits for the agent to confirm the end of
/// the stream it carried, before it simply lets go.
const FIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one caller's connection until it closes, fails, or the node stops taking callers (the
/// exchange in flight is finished first).
pub async fn serve(io: tokio::net::TcpStream, node: Arc<NodeState>, closing: actix_server::GracefulShutdownSignal) {
    let peer = io.peer_addr().ok();
    // Frames are small and latency-bound; Nagle plus delayed ACKs cost 40 ms stalls.
    if let Err(e) = io.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a caller's connection");
    }
    let (rd, wr) = io.into_split();
    let mut caller = Caller {
        rd,
        wr,
        buf: BytesMut::with_capacity(4096),
        peer,
        node,
        carried: None,
        version: 1,
        // One timer for both of the connection's head deadlines (`--caller-timeout` for a
        // request head, `--head-timeout` for an answer's): a tokio timeout per wait cost a
        // timer-wheel registration and removal per request.
        timer: LazySleep::new(tokio::time::Instant::now()),
    };
    let hand_over = closing.clone();
    let ok = caller.node.metrics.requests.with_label_values(&["ok"]);
    let shutdown = closing.notified();
    tokio::pin!(shutdown);
    while let Some(req) = caller.read_head(shutdown.as_mut()).await {
        let started = Instant::now();
        let span = tracing::info_span!("ingress", otel.kind = "server", http.request.method = %req.method, agent = tracing::field::Empty, http.response.status_code = tracing::field::Empty);
        let (outcome, next) = caller.exchange(req).instrument(span).await;
        if next == Next::HandOver {
            // The request relay serves this connection, from the head we read on (and counts
            // the request itself).
            let Caller {
                rd,
                wr,
                buf,
                peer,
                node,
                ..
            } = caller;
            if let Ok(io) = rd.reunite(wr) {
                let io = Rewind { read: buf.freeze(), io };
                ingress::serve_io(io, peer, node, hand_over).await;
            }
            return;
        }
        match outcome {
            "ok" => ok.inc(),
            other => caller.node.metrics.requests.with_label_values(&[other]).inc(),
        }
        caller
            .node
            .metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        if next == Next::Close {
            break;
        }
        // A body's large reads leave a large buffer behind; an idle connection keeps a small one.
        if caller.buf.is_empty() && caller.buf.capacity() > 16 << 10 {
            caller.buf = BytesMut::with_capacity(4096);
        }
    }
    let _ = caller.wr.shutdown().await;
    if let Some(c) = caller.carried.take() {
        c.finish();
    }
}

/// What becomes of a caller's connection after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// It may carry another request.
    Again,
    /// It ends.
    Close,
    /// [`ingress`] serves it: the agent cannot take it as bytes, or it is a one-request
    /// connection.
    HandOver,
}

/// A caller's connection, with bytes already read from it put back in front.
struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A caller's connection and the agent connection carrying its requests.
struct Caller {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    /// Bytes from the caller not yet passed on: the next head, or more.
    buf: BytesMut,
    peer: Option<SocketAddr>,
    node: Arc<NodeState>,
    carried: Option<Carried>,
    /// The minor HTTP version of the request being served, for answers of our own.
    version: u8,
    timer: LazySleep,
}

impl Caller {
    /// The next request head; `None` once the connection is over (closed, idle past
    /// `--caller-timeout`, the node stopping while it is idle, or a head refused with an answer).
    async fn read_head<F: std::future::Future<Output = ()>>(
        &mut self,
        mut shutdown: Pin<&mut F>,
    ) -> Option<http1::Request> {
        let timeout = self.node.cfg.caller_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match http1::parse_request(&self.buf) {
                Ok(Some(r)) => return Some(r),
                Ok(None) => {}
                Err(e) => {
                    let status = match &e {
                        crate::Error::BadMessage { status, .. } => *status,
                        _ => 400,
                    };
                    self.node
                        .metrics
                        .requests
                        .with_label_values(&[ErrorCode::BadRequest.as_str()])
                        .inc();
                    tracing::info!(peer = ?self.peer, error = %e, "refused a caller's request head: answered {status} and closed");
                    self.answer(status, ErrorCode::BadRequest, &e.to_string()).await;
                    return None;
                }
            }
            let idle = self.buf.is_empty();
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let res = tokio::select! {
                biased;
                () = shutdown.as_mut(), if idle => return None,
                r = self.rd.read_buf(&mut self.buf) => r,
                // Between exchanges the agent may drain, or the service close its side: the
                // stream ends now, not at the next request (an agent's drain waits for it).
                ev = between_exchanges(&mut self.carried) => {
                    if let Some(c) = self.carried.as_mut() {
                        c.note(ev);
                    }
                    if let Some(c) = self.carried.take_if(|c| c.spent()) {
                        c.finish();
                    }
                    continue;
                }
                // A slow head and an idle keep-alive connection look the same; the latter is routine.
                () = self.timer.wait(deadline) => {
                    tracing::debug!(peer = ?self.peer, "caller sent no request head within {timeout:?}: closed");
                    return None;
                }
            };
            match res {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(peer = ?self.peer, error = %e, "caller connection ended with an error");
                    return None;
                }
            }
        }
    }

    /// Writes a whole answer of our own, then the connection closes.
    async fn answer(&mut self, status: u16, code: ErrorCode, message: &str) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let body = serde_json::json!({ "code": code.as_str(), "message": message }).to_string();
        let head = format!(
            "HTTP/1.{} {} {}\r\ncontent-type: application/json\r\nx-strait-error: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.version,
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            code.as_str(),
            body.len()
        );
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let _ = self.wr.write_all(format!("{head}{body}").as_bytes()).await;
    }

    /// Refuses the request with `code`; returns its outcome, and that the connection ends.
    async fn refuse(&mut self, code: ErrorCode, why: &str) -> (&'static str, Next) {
        self.answer(code.status(), code, why).await;
        (code.as_str(), Next::Close)
    }

    /// Carries one request and its answer. Returns the outcome to count, and what becomes of
    /// the connection.
    async fn exchange(&mut self, req: http1::Request) -> (&'static str, Next) {
        self.version = req.version;
        let Some(host) = req.host.as_deref() else {
            return self.refuse(ErrorCode::BadRequest, "the request names no host").await;
        };
        let Some((agent, service)) = route_host(host, &self.node.cfg.domain) else {
            let why = format!(
                "host {host:?} is not served here (expected <agent>.{})",
                self.node.cfg.domain
            );
            return self.refuse(ErrorCode::BadRequest, &why).await;
        };
        tracing::Span::current().record("agent", agent.as_str());
        // Every request is routed anew, as the request relay does: a connection follows its agent
        // when it moves to another node (or the node it was on drains), asks for another agent
        // or service, or finds that its service hung up.
        let target = match cluster::locate(&self.node, &agent).await {
            Ok(t) => t,
            Err((code, why)) => return self.refuse(code, &why).await,
        };
        let route = Route::of(&target);
        if let Some(c) = self.carried.as_mut() {
            c.note_end();
        }
        if self
            .carried
            .as_ref()
            .is_some_and(|c| c.spent() || c.route != route || c.agent != agent || c.service != service)
        {
            if let Some(c) = self.carried.take() {
                c.finish();
            }
        }
        // A connection that will close after this one request gains nothing from its own
        // connection to the service: the request relay's pooled ones serve it without a dial.
        if self.carried.is_none() && !req.keep_alive && !req.upgrade {
            return ("", Next::HandOver);
        }
        if self.carried.is_none() && !cluster::target_reads(&self.node, &target, cluster::FEATURE_HTTP).await {
            // The agent's node is of a build that does not carry connections: requests it reads.
            self.node.metrics.bus.with_label_values(&["peer_lacks_http"]).inc();
            return ("", Next::HandOver);
        }
        let mut reused = self.carried.is_some();
        if self.carried.is_none() {
            match Carried::open(&self.node, &target, agent.clone(), service.clone()).await {
                Ok(c) => self.carried = Some(c),
                Err((_, why)) if why == NO_RAW_HTTP => return ("", Next::HandOver),
                Err((code, why)) => return self.refuse(code, &why).await,
            }
        }
        let Some(c) = self.carried.as_mut() else {
            return self.refuse(ErrorCode::Internal, "no stream").await;
        };
        let mut head = BytesMut::new();
        let to = Rewrite {
            authority: &c.authority,
            path_prefix: &c.path_prefix,
            peer: self.peer.map(|p| p.ip()),
        };
        if let Err(e) = http1::rewrite_request(&self.buf[..req.head_len], &req, &to, &mut head) {
            return self.refuse(ErrorCode::BadRequest, &e.to_string()).await;
        }
        let head = head.freeze();
        let _ = self.buf.split_to(req.head_len);
        let mut wrote = false;
        let (answer, sent) = loop {
            let mut body = BodyCursor::new(req.body);
            let (answer, sent) = self.carry(&req.method, &head, &mut body, &mut wrote).await;
            match answer {
                Err((_, why))
                    if why == UNANSWERED
                        && reused
                        && req.body == BodyLength::Empty
                        && req.method.is_idempotent()
                        && !wrote =>
                {
                    // The service closed this idle connection as the request went out (its
                    // keep-alive ran out): nothing was answered, so the request goes once more,
                    // on a new connection, as a client's pool retries an idempotent request.
                    tracing::debug!("service closed a kept-alive connection unanswered: request sent again");
                    if let Some(c) = self.carried.take() {
                        c.finish();
                    }
                    reused = false;
                    match Carried::open(&self.node, &target, agent.clone(), service.clone()).await {
                        Ok(c) => self.carried = Some(c),
                        Err((code, why)) => return self.refuse(code, &why).await,
                    }
                }
                other => break (other, sent),
            }
        };
        let answer = match answer {
            Ok(a) => a,
            Err((code, why)) => {
                // The stream cannot be trusted to be at a message boundary: let it go.
                self.carried = None;
                if why == CALLER_GONE {
                    tracing::debug!("caller went away before its answer was complete");
                    return (if wrote { "aborted" } else { "caller_gone" }, Next::Close);
                }
                tracing::info!(%code, why, "carried request failed");
                if wrote {
                    return (code.as_str(), Next::Close);
                }
                return self.refuse(code, &why).await;
            }
        };
        tracing::Span::current().record("http.response.status_code", answer.status);
        if answer.switched {
            if !sent || !req.upgrade {
                self.carried = None;
                return (ErrorCode::ProtocolError.as_str(), Next::Close);
            }
            self.relay_upgraded().await;
            return ("ok", Next::Close);
        }
        if !sent {
            // Answered before the request body was all here: the rest of it cannot be told
            // from a next request, so this connection ends, and the stream with it.
            self.carried = None;
            return ("ok", Next::Close);
        }
        // A draining agent gets its stream back now, not when the caller's next request comes.
        if let Some(c) = self.carried.take_if(|c| c.draining) {
            c.finish();
        }
        match req.keep_alive && !answer.close {
            true => ("ok", Next::Again),
            false => ("ok", Next::Close),
        }
    }

    /// Sends one request (`head`, then the body `body` follows) on the carried connection while
    /// passing its answer to the caller. Returns how the answer ended, and whether the request
    /// was all sent.
    async fn carry(
        &mut self,
        method: &Method,
        head: &Bytes,
        body: &mut BodyCursor,
        wrote: &mut bool,
    ) -> (Result<Answer, Failure>, bool) {
        let Some(c) = self.carried.as_mut() else {
            return (Err((ErrorCode::Internal, "no stream".into())), false);
        };
        let (up, down) = c.halves(&self.node);
        let (rd, buf) = (&mut self.rd, &mut self.buf);
        let sent = std::cell::Cell::new(false);
        // Once the request is out, the caller's side is watched: a caller that hangs up before
        // its answer ends the stream at once (the agent stops working for nobody), and what it
        // sends meanwhile (a pipelined request) waits in the buffer.
        let send = async {
            send_request(&up, rd, buf, body, head).await?;
            sent.set(true);
            loop {
                if buf.len() >= http1::MAX_HEAD_BYTES {
                    std::future::pending::<()>().await;
                }
                buf.reserve(4096);
                match rd.read_buf(buf).await {
                    Ok(0) => return Err::<(), Failure>((ErrorCode::Reset, CALLER_GONE.into())),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "caller connection failed");
                        return Err((ErrorCode::Reset, CALLER_GONE.into()));
                    }
                }
            }
        };
        let deadline = tokio::time::Instant::now() + self.node.cfg.head_timeout;
        let recv = down.receive(&mut self.wr, method, (&mut self.timer, deadline), wrote);
        tokio::pin!(send, recv);
        let answer = tokio::select! {
            r = &mut send => r.and(Err((ErrorCode::Internal, "request ended early".into()))),
            r = &mut recv => r,
        };
        let sent = sent.get();
        (answer, sent)
    }

    /// After `101 Switching Protocols`: bytes both ways until each side is done.
    async fn relay_upgraded(&mut self) {
        let Some(c) = self.carried.as_mut() else { return };
        let (up, down) = c.halves(&self.node);
        let Downward {
            rx,
            pending,
            credit_back,
            ended,
            finished,
            ..
        } = down;
        let (rd, buf, wr) = (&mut self.rd, &mut self.buf, &mut self.wr);
        let to_agent = async {
            if !buf.is_empty() {
                up.send(buf.split().freeze()).await?;
            }
            let mut size = ReadSize::new(up.max_data);
            loop {
                match size.read_from(rd, buf, usize::MAX).await {
                    Ok(0) => {
                        up.link.send(&Frame::Fin(Fin { stream: up.id }));
                        return Ok::<(), Failure>(());
                    }
                    Ok(_) => up.send(buf.split().freeze()).await?,
                    Err(e) => return Err((ErrorCode::Reset, format!("caller connection failed: {e}"))),
                }
            }
        };
        let to_caller = async {
            if !pending.is_empty() {
                let n = pending.len();
                wr.write_all(&pending.split()).await.map_err(caller_gone)?;
                credit_back.consumed(n, rx.is_empty());
            }
            loop {
                match rx.recv().await {
                    Some(BodyEvent::Data(b)) => {
                        wr.write_all(&b).await.map_err(caller_gone)?;
                        credit_back.consumed(b.len(), rx.is_empty());
                    }
                    // No longer HTTP: it ends when either side closes, or the agent's drain
                    // timeout does.
                    Some(BodyEvent::Drain) => {}
                    Some(BodyEvent::Fin) => {
                        *ended = true;
                        let _ = wr.shutdown().await;
                        return Ok(());
                    }
                    Some(BodyEvent::Reset(code, why)) => {
                        (*ended, *finished) = (true, true);
                        return Err((code, why));
                    }
                    None => {
                        (*ended, *finished) = (true, true);
                        return Err((ErrorCode::AgentUnavailable, "agent session ended".into()));
                    }
                }
            }
        };
        match tokio::try_join!(to_agent, to_caller) {
            Ok(_) => *finished = true,
            Err((code, why)) => tracing::debug!(%code, why, "upgraded connection ended"),
        }
    }
}

/// The next event from the agent on a carried connection that can still take a request; never
/// ready without one.
async fn between_exchanges(carried: &mut Option<Carried>) -> Option<BodyEvent> {
    match carried {
        Some(c) if !c.spent() => c.rx.recv().await,
        _ => std::future::pending().await,
    }
}

fn caller_gone(e: std::io::Error) -> Failure {
    tracing::debug!(error = %e, "caller connection failed");
    (ErrorCode::Reset, CALLER_GONE.into())
}

/// The agent connection a caller's requests travel on.
struct Carried {
    agent: AgentName,
    /// Where the agent was when the stream opened.
    route: Route,
    service: String,
    id: StreamId,
    link: AgentLink,
    closer: StreamCloser,
    /// Bytes the agent lets us send.
    credit: Arc<Semaphore>,
    rx: mpsc::UnboundedReceiver<BodyEvent>,
    credit_back: CreditReturner,
    /// The service's `Host`, and the path it lives under.
    authority: String,
    path_prefix: String,
    max_data: usize,
    /// Bytes from the service not passed on yet (a head still arriving).
    pending: BytesMut,
    /// The service's side is over (its close, or a reset): no further request can use it.
    ended: bool,
    /// The agent is draining ([`BodyEvent::Drain`]): no further request goes on this stream.
    draining: bool,
    /// The agent knows the stream is over.
    finished: bool,
}

/// Which connection of an agent a stream goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// A session on this node.
    Local(u64),
    /// A session on another node, at a presence epoch.
    Remote(String, u64),
}

impl Route {
    fn of(target: &Target) -> Self {
        match target {
            Target::Local(s) => Route::Local(s.session_id),
            Target::Remote { node, epoch } => Route::Remote(node.clone(), *epoch),
        }
    }
}

impl Carried {
    /// Opens a carried connection to `service` on `agent` and waits for the agent to say it
    /// reached the service.
    async fn open(node: &Arc<NodeState>, target: &Target, agent: AgentName, service: String) -> Result<Self, Failure> {
        let id = StreamId::random();
        let (body_tx, rx) = mpsc::unbounded_channel();
        let (ctl, head_rx) = RequestCtl::new(node.cfg.limits.stream_window);
        let open = OpenStream {
            id,
            ctl: StreamOwner::Request(ctl.clone()),
            body: body_tx,
            expects_head: true,
            carries_http: true,
        };
        let grant = cluster::open_stream(node, target, &agent, open).await?;
        let mut carried = Carried {
            agent,
            route: Route::of(target),
            id,
            link: grant.link.clone(),
            closer: grant.closer.clone(),
            credit: ctl.credit(),
            rx,
            credit_back: CreditReturner::new(&grant, id),
            authority: String::new(),
            path_prefix: String::new(),
            max_data: grant.limits.max_data_bytes as usize,
            pending: BytesMut::new(),
            ended: false,
            draining: false,
            finished: false,
            service,
        };
        let open = Frame::StreamOpen(StreamOpen {
            stream: id,
            service: carried.service.clone(),
            http: true,
        });
        if !carried.link.send(&open) {
            carried.finished = true;
            return Err((
                ErrorCode::AgentUnavailable,
                format!("agent {} disconnected", carried.agent),
            ));
        }
        let head = match tokio::time::timeout(node.cfg.head_timeout, head_rx).await {
            Ok(Ok(Ok(head))) => head,
            Ok(Ok(Err(failure))) => {
                carried.finished = true;
                return Err(failure);
            }
            Ok(Err(_)) => {
                carried.finished = true;
                return Err((ErrorCode::Internal, "stream ended without an answer".into()));
            }
            Err(_) => return Err((ErrorCode::Timeout, "the agent did not reach its service in time".into())),
        };
        let header = |name: &str| {
            head.headers
                .iter()
                .find(|h| h.name == name)
                .and_then(|h| std::str::from_utf8(&h.value).ok())
        };
        match (head.status, header("host")) {
            (200, Some(host)) if !host.is_empty() => carried.authority = host.to_owned(),
            _ => {
                return Err((
                    ErrorCode::ProtocolError,
                    "the agent opened the connection without naming its service's host".into(),
                ))
            }
        }
        let prefix = header(PATH_PREFIX_HEADER).unwrap_or("");
        if !(prefix.is_empty() || prefix.starts_with('/')) || prefix.contains([' ', '?', '#']) {
            return Err((
                ErrorCode::ProtocolError,
                "the agent named an invalid path prefix".into(),
            ));
        }
        carried.path_prefix = prefix.to_owned();
        Ok(carried)
    }

    /// Ends the stream cleanly: our `Fin`, then, in the background and briefly, the agent's
    /// (the stream leaves the session's table when that comes, or when the wait is over).
    fn finish(mut self) {
        if self.finished {
            return;
        }
        self.link.send(&Frame::Fin(Fin { stream: self.id }));
        actix_rt::spawn(async move {
            let wait_for_agent = async {
                while !self.ended {
                    match self.rx.recv().await {
                        Some(BodyEvent::Data(b)) => self.credit_back.consumed(b.len(), true),
                        Some(BodyEvent::Drain) => {}
                        Some(BodyEvent::Fin) | Some(BodyEvent::Reset(..)) | None => self.ended = true,
                    }
                }
            };
            if tokio::time::timeout(FIN_WAIT, wait_for_agent).await.is_ok() {
                self.mark_finished();
            }
        });
    }

    /// Its two directions, to run side by side.
    fn halves<'a>(&'a mut self, node: &'a NodeState) -> (Upward<'a>, Downward<'a>) {
        let up = Upward {
            link: &self.link,
            id: self.id,
            credit: &self.credit,
            max_data: self.max_data,
            node,
        };
        let down = Downward {
            rx: &mut self.rx,
            pending: &mut self.pending,
            credit_back: &mut self.credit_back,
            ended: &mut self.ended,
            finished: &mut self.finished,
            draining: &mut self.draining,
        };
        (up, down)
    }

    /// Takes in what the agent said while the connection sat between exchanges: the service's
    /// close, a reset or the agent's drain ends it, and the next request goes on a new one.
    fn note_end(&mut self) {
        while !self.finished {
            match self.rx.try_recv() {
                Ok(ev) => self.note(Some(ev)),
                Err(mpsc::error::TryRecvError::Disconnected) => self.note(None),
                Err(mpsc::error::TryRecvError::Empty) => return,
            }
        }
    }

    /// Takes in one event from the agent between exchanges (`None`: the session dropped the
    /// stream).
    fn note(&mut self, ev: Option<BodyEvent>) {
        match ev {
            // Bytes nobody asked for: the next answer's head will not parse, and says so.
            Some(BodyEvent::Data(b)) => self.pending.extend_from_slice(&b),
            Some(BodyEvent::Fin) => self.ended = true,
            Some(BodyEvent::Drain) => self.draining = true,
            Some(BodyEvent::Reset(..)) | None => {
                self.ended = true;
                self.mark_finished();
            }
        }
    }

    /// No further request may go on this stream.
    fn spent(&self) -> bool {
        self.ended || self.draining
    }

    /// The agent knows the stream is over: dropping it sends nothing.
    fn mark_finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        if !self.finished {
            self.link.send(&Frame::Reset(Reset {
                stream: self.id,
                code: ErrorCode::Reset,
                reason: "caller went away".into(),
            }));
        }
        self.closer.close(self.id);
    }
}

/// Caller-to-agent half of a carried connection.
struct Upward<'a> {
    link: &'a AgentLink,
    id: StreamId,
    credit: &'a Semaphore,
    max_data: usize,
    node: &'a NodeState,
}

impl Upward<'_> {
    /// Sends `bytes` as `Data`, within the agent's credit.
    async fn send(&self, mut bytes: Bytes) -> Result<(), Failure> {
        self.node.metrics.bytes_in.inc_by(bytes.len() as u64);
        while !bytes.is_empty() {
            let n = bytes.len().min(self.max_data);
            let Ok(permit) = self.credit.acquire_many(n as u32).await else {
                return Err((ErrorCode::Reset, "the agent ended the connection".into()));
            };
            permit.forget();
            let frame = Frame::Data(Data {
                stream: self.id,
                bytes: bytes.split_to(n),
            });
            if !self.link.send(&frame) {
                return Err((ErrorCode::AgentUnavailable, "agent disconnected".into()));
            }
        }
        Ok(())
    }
}

/// Sends a rewritten request head and the request's body (the bytes `body` says are its own).
async fn send_request(
    up: &Upward<'_>,
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    body: &mut BodyCursor,
    head: &Bytes,
) -> Result<(), Failure> {
    let bad = |e: crate::Error| (ErrorCode::BadRequest, e.to_string());
    // Body bytes that came with the head travel in its frame when they fit.
    let n = body.advance(buf).map_err(bad)?;
    if n > 0 && head.len() + n <= up.max_data {
        let mut first = BytesMut::with_capacity(head.len() + n);
        first.extend_from_slice(head);
        first.extend_from_slice(&buf.split_to(n));
        up.send(first.freeze()).await?;
    } else {
        up.send(head.clone()).await?;
        if n > 0 {
            up.send(buf.split_to(n).freeze()).await?;
        }
    }
    while !body.done() {
        // Reads as large as a frame: a body moves in as few frames as it can.
        buf.reserve(up.max_data);
        match rd.read_buf(buf).await {
            Ok(0) => return Err((ErrorCode::Reset, "caller closed the connection mid-request".into())),
            Ok(_) => {}
            Err(e) => return Err((ErrorCode::Reset, format!("caller connection failed: {e}"))),
        }
        let n = body.advance(buf).map_err(bad)?;
        up.send(buf.split_to(n).freeze()).await?;
    }
    Ok(())
}

/// How an answer ended.
struct Answer {
    status: u16,
    /// The service will close its connection after it.
    close: bool,
    /// `101 Switching Protocols`: the connection is now the upgraded protocol's.
    switched: bool,
}

/// Agent-to-caller half of a carried connection.
struct Downward<'a> {
    rx: &'a mut mpsc::UnboundedReceiver<BodyEvent>,
    pending: &'a mut BytesMut,
    credit_back: &'a mut CreditReturner,
    ended: &'a mut bool,
    finished: &'a mut bool,
    draining: &'a mut bool,
}

impl Downward<'_> {
    /// The next bytes from the service; a failure once its side is over.
    async fn next(&mut self, mid_answer: bool) -> Result<Option<Bytes>, Failure> {
        loop {
            return match self.rx.recv().await {
                Some(BodyEvent::Drain) => {
                    // The exchange in flight is answered in full; the stream ends after it.
                    *self.draining = true;
                    continue;
                }
                Some(BodyEvent::Data(b)) => Ok(Some(b)),
                Some(BodyEvent::Fin) => {
                    *self.ended = true;
                    if mid_answer {
                        Ok(None)
                    } else {
                        Err((ErrorCode::ServiceUnavailable, UNANSWERED.into()))
                    }
                }
                Some(BodyEvent::Reset(code, why)) => {
                    (*self.ended, *self.finished) = (true, true);
                    Err((code, why))
                }
                None => {
                    (*self.ended, *self.finished) = (true, true);
                    Err((ErrorCode::AgentUnavailable, "agent session ended".into()))
                }
            };
        }
    }

    /// Passes the answer to `method` on to the caller: interim (1xx) heads, the head and the
    /// body, up to where it ends. `wrote` says whether the caller got any of it.
    async fn receive(
        mut self,
        wr: &mut OwnedWriteHalf,
        method: &Method,
        (timer, deadline): (&mut LazySleep, tokio::time::Instant),
        wrote: &mut bool,
    ) -> Result<Answer, Failure> {
        let bad = |e: crate::Error| (ErrorCode::ServiceUnavailable, e.to_string());
        loop {
            let res = loop {
                if let Some(r) = http1::parse_response(self.pending, method).map_err(bad)? {
                    break r;
                }
                let next = tokio::select! {
                    n = self.next(false) => n?,
                    () = timer.wait(deadline) => {
                        return Err((ErrorCode::Timeout, "the agent did not answer in time".into()))
                    }
                };
                match next {
                    Some(b) => self.pending.extend_from_slice(&b),
                    // (`next(false)` reports the service's end as a failure itself.)
                    None => return Err((ErrorCode::ServiceUnavailable, UNANSWERED.into())),
                }
            };
            let mut body = BodyCursor::new(res.body);
            let n = body.advance(&self.pending[res.head_len..]).map_err(bad)?;
            let first = self.pending.split_to(res.head_len + n);
            *wrote = true;
            wr.write_all(&first).await.map_err(caller_gone)?;
            self.credit_back.consumed(first.len(), self.rx.is_empty());
            if res.status == 101 {
                return Ok(Answer {
                    status: 101,
                    close: false,
                    switched: true,
                });
            }
            if res.status < 200 {
                continue;
            }
            while !body.done() {
                let Some(b) = self.next(true).await? else {
                    return match body.until_close() {
                        true => Ok(Answer {
                            status: res.status,
                            close: true,
                            switched: false,
                        }),
                        false => Err((
                            ErrorCode::ServiceUnavailable,
                            "local service closed the connection mid-answer".into(),
                        )),
                    };
                };
                let n = body.advance(&b).map_err(bad)?;
                wr.write_all(&b[..n]).await.map_err(caller_gone)?;
                self.credit_back.consumed(n, self.rx.is_empty());
                if n < b.len() {
                    self.pending.extend_from_slice(&b[n..]);
                }
            }
            return Ok(Answer {
                status: res.status,
                close: res.close,
                switched: false,
            });
        }
    }
}
