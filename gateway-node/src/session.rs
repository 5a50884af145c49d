//! Per-agent connection actor: owns one agent WebSocket and everything that dies with it — the
//! handshake, heartbeats, the agent's open streams and their receive-side credit accounting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason};
use bytes::Bytes;
use parking_lot::Mutex;
use strait_schema::window::WindowPool;
use strait_schema::ws::Message as WsMessage;
use strait_schema::{
    credentials, decode_bytes, encode, AgentName, DecodeError, ErrorCode, Frame, Hello, Limits, Pong, RefuseCode,
    Refused, RequestHead, Reset, ResponseHead, StreamId, StreamOpen, Welcome, WireLimits, CAP_DRAIN, CAP_INLINE_END,
    CAP_RAW_HTTP, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::cluster::{BusOut, FEATURE_DRAIN};
use crate::directory::Presence;
use crate::inflight::RequestCtl;
use crate::node::{NodeState, Phase, SessionRef};
use crate::store::now_ms;
use crate::ws::{agent_socket, read_upgrade, Outgoing, UpgradeRefused};

/// Path of the agent WebSocket endpoint.
pub const AGENT_PATH: &str = "/v1/connect";

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// A handle that sends frames to one agent connection, in order, without going through the
/// session actor's mailbox. Memory behind it is bounded by flow control: data frames are only sent
/// within the agent's credit; everything else is small and rare.
///
/// For an agent held by another node the link publishes the frames to that node over the bus.
#[derive(Clone)]
pub enum AgentLink {
    /// The agent's socket on this node.
    Local(mpsc::UnboundedSender<Outgoing>),
    /// The agent is on node `to`, at fencing `epoch`.
    Remote {
        /// Bus sender.
        out: BusOut,
        /// Node holding the agent.
        to: Arc<str>,
        /// Agent name.
        agent: AgentName,
        /// Presence epoch the stream was opened at.
        epoch: u64,
    },
}

impl AgentLink {
    /// A link through the bus to an agent held by node `to`.
    pub fn remote(out: BusOut, to: &str, agent: &AgentName, epoch: u64) -> Self {
        AgentLink::Remote {
            out,
            to: to.into(),
            agent: agent.clone(),
            epoch,
        }
    }

    /// Encodes and queues a frame. Returns false when the connection is gone.
    pub fn send(&self, frame: &Frame) -> bool {
        match self {
            AgentLink::Local(tx) => {
                let out = match frame {
                    Frame::Data(d) => Outgoing::Data(d.clone()),
                    _ => Outgoing::Frame(Bytes::from(encode(frame))),
                };
                tx.send(out).is_ok()
            }
            AgentLink::Remote { out, to, agent, epoch } => out.send(to, agent, *epoch, frame.clone()),
        }
    }

    fn close(&self, reason: CloseReason) {
        if let AgentLink::Local(tx) = self {
            let _ = tx.send(Outgoing::Close(reason));
        }
    }

    fn pong(&self, p: Bytes) {
        if let AgentLink::Local(tx) = self {
            let _ = tx.send(Outgoing::Pong(p));
        }
    }
}

/// How a stream's owner lets go of it: a local session forgets it; a remote stream leaves this
/// node's table of remote streams.
#[derive(Clone)]
pub enum StreamCloser {
    /// The agent's session is on this node.
    Local(Arc<StreamTable>),
    /// The agent is on another node.
    Remote(Arc<NodeState>),
}

impl StreamCloser {
    /// The owner is done with `id` (it already told the agent, if it had to).
    pub fn close(&self, id: StreamId) {
        match self {
            StreamCloser::Local(t) => t.close(id),
            StreamCloser::Remote(n) => n.remote.remove(id),
        }
    }
}

/// Where a stream's control events go on the caller's node.
#[derive(Clone)]
pub enum StreamOwner {
    /// An actor (a TCP route's `RawStream`).
    Actor(Recipient<StreamEvent>),
    /// An ingress request, answered without an actor.
    Request(Arc<RequestCtl>),
}

impl StreamOwner {
    /// False when the owner is gone or cannot take the event (the stream should be reset).
    pub fn deliver(&self, ev: StreamEvent) -> bool {
        match self {
            StreamOwner::Actor(r) => r.try_send(ev).is_ok(),
            StreamOwner::Request(c) => c.deliver(ev),
        }
    }
}

/// Events for a stream's owner, in arrival order.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum StreamEvent {
    /// The agent's response head.
    Head(ResponseHead),
    /// The agent granted more credit for the request body.
    Credit(u32),
    /// The stream ended badly (agent reset, protocol error, agent gone).
    Reset(ErrorCode, String),
}

/// Events for a stream's response body, in arrival order.
#[derive(Debug)]
pub enum BodyEvent {
    /// Payload bytes.
    Data(Bytes),
    /// End of body.
    Fin,
    /// Aborted.
    Reset(ErrorCode, String),
    /// The agent is draining: a carried connection takes no further request on this stream.
    Drain,
}

/// Hands a frame from the agent to a caller on this node, whichever node the agent is on: the
/// head, credit and resets to its control mailbox, the body to its body channel. False if the
/// control mailbox is gone or full (the stream should be reset).
pub fn to_local_caller(ctl: &StreamOwner, body: &mpsc::UnboundedSender<BodyEvent>, frame: Frame) -> bool {
    match frame {
        Frame::ResponseHead(h) => ctl.deliver(StreamEvent::Head(h)),
        Frame::Data(d) => {
            let _ = body.send(BodyEvent::Data(d.bytes));
            true
        }
        Frame::Fin(_) => {
            let _ = body.send(BodyEvent::Fin);
            true
        }
        Frame::Credit(c) => ctl.deliver(StreamEvent::Credit(c.bytes)),
        Frame::Drain(_) => {
            let _ = body.send(BodyEvent::Drain);
            true
        }
        Frame::Reset(r) => {
            let _ = body.send(BodyEvent::Reset(r.code, r.reason.clone()));
            let _ = ctl.deliver(StreamEvent::Reset(r.code, r.reason));
            true
        }
        _ => true,
    }
}

/// What an opened stream gets: the way to the agent, the limits, and the shared counter of
/// credit granted to the agent (incremented by whoever consumes the body, before it sends the
/// `Credit` frame, so the session never sees data beyond what was granted).
pub struct StreamGrant {
    /// Sends frames to the agent.
    pub link: AgentLink,
    /// Limits of this connection.
    pub limits: WireLimits,
    /// Total bytes the agent may have sent on this stream.
    pub granted: Arc<AtomicU64>,
    /// How the owner lets go of the stream.
    pub closer: StreamCloser,
    /// What the stream's receive window may grow by.
    pub windows: Arc<WindowPool>,
}

/// A new stream for an agent's session to register; the caller then sends the head itself.
pub struct OpenStream {
    /// New stream id.
    pub id: StreamId,
    /// Receives head, credit and reset events.
    pub ctl: StreamOwner,
    /// Receives the body.
    pub body: mpsc::UnboundedSender<BodyEvent>,
    /// HTTP streams start with the agent's `ResponseHead`; byte streams carry data at once.
    pub expects_head: bool,
    /// A caller's HTTP connection carried as bytes (`StreamOpen` with `http`): only agents that
    /// listed `raw-http` in their `Hello` take one.
    pub carries_http: bool,
}

/// Why a carried HTTP connection was refused: the agent predates `raw-http`.
pub const NO_RAW_HTTP: &str =
    "agent does not take HTTP connections as bytes (upgrade it, or run the node with --http-relay request)";

/// The node is shutting down: tell the agent to reconnect elsewhere (`GoAway`), and keep serving
/// this connection's in-flight streams until they finish or the node stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Closes the session (revoked, replaced by a newer connection, node shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick {
    /// Logged and sent as the close reason.
    pub reason: &'static str,
}

/// A frame from another node for a stream on one of this node's agents (the caller is there).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromCaller {
    /// The caller's node.
    pub from_node: String,
    /// The frame (opening, data, credit, fin or reset).
    pub frame: Frame,
}

/// Who is at the other end of a stream.
enum Caller {
    /// A request or a `RawStream` on this node.
    Local {
        ctl: StreamOwner,
        body: mpsc::UnboundedSender<BodyEvent>,
    },
    /// A caller on another node; the agent's frames are relayed there over the bus.
    Remote {
        node: String,
        fin_from_caller: bool,
        fin_from_agent: bool,
    },
}

struct StreamEntry {
    caller: Caller,
    granted: Arc<AtomicU64>,
    received: u64,
    head_seen: bool,
    /// A caller's HTTP connection carried as bytes: the only kind the agent may `Drain`.
    carries_http: bool,
}

impl StreamEntry {
    /// Delivers a frame from the agent to the caller, wherever it is. False if a local caller's
    /// control mailbox is gone or full (the stream should be reset).
    fn forward_to_caller(&mut self, node: &NodeState, agent: &AgentName, epoch: u64, frame: Frame) -> bool {
        match &mut self.caller {
            Caller::Local { ctl, body } => to_local_caller(ctl, body, frame),
            Caller::Remote {
                node: to,
                fin_from_agent,
                ..
            } => {
                if matches!(
                    frame,
                    Frame::Fin(_) | Frame::ResponseHead(ResponseHead { end: true, .. })
                ) {
                    *fin_from_agent = true;
                }
                node.bus_out.send(to, agent, epoch, frame)
            }
        }
    }

    /// Tells the caller the stream is over.
    fn reset_caller(
        &mut self,
        node: &NodeState,
        agent: &AgentName,
        epoch: u64,
        id: StreamId,
        code: ErrorCode,
        why: &str,
    ) {
        self.forward_to_caller(
            node,
            agent,
            epoch,
            Frame::Reset(Reset {
                stream: id,
                code,
                reason: why.to_owned(),
            }),
        );
    }

    /// A relayed stream is over once both sides sent `Fin` (nobody on this node will close it).
    fn relay_done(&self) -> bool {
        matches!(
            self.caller,
            Caller::Remote {
                fin_from_caller: true,
                fin_from_agent: true,
                ..
            }
        )
    }
}

/// The open streams of one agent connection, shared by the session actor (frames from the agent)
/// and the callers on this node (open, close): opening or closing a stream takes an uncontended
/// lock on the caller's thread instead of a message to the session's thread and back.
#[derive(Default)]
pub struct StreamTable {
    inner: Mutex<Streams>,
}

#[derive(Default)]
struct Streams {
    /// True from the handshake until the session starts closing.
    accepting: bool,
    /// The agent listed `raw-http`: it takes HTTP connections carried as bytes.
    raw_http: bool,
    map: HashMap<StreamId, StreamEntry>,
}

impl Streams {
    /// Whether a new stream may open: the session is active, under its stream cap, and the id is
    /// new. Shared by local and relayed opens so both refuse with the same codes.
    fn admit(&self, id: StreamId, max: usize, carries_http: bool) -> Result<(), (ErrorCode, String)> {
        if !self.accepting {
            return Err((ErrorCode::AgentUnavailable, "agent is disconnecting".into()));
        }
        if carries_http && !self.raw_http {
            return Err((ErrorCode::ServiceUnavailable, NO_RAW_HTTP.into()));
        }
        if self.map.len() >= max {
            return Err((
                ErrorCode::TooManyStreams,
                format!("agent has {} streams open", self.map.len()),
            ));
        }
        if self.map.contains_key(&id) {
            return Err((ErrorCode::Internal, "stream id collision".into()));
        }
        Ok(())
    }
}

impl StreamTable {
    /// Streams open now, local and relayed: a draining node waits for none before it drops the
    /// agent.
    pub fn open_count(&self) -> usize {
        self.inner.lock().map.len()
    }

    /// Registers a stream whose caller is on this node. The returned grant sends through `link`.
    pub fn open(
        self: &Arc<Self>,
        open: OpenStream,
        link: &AgentLink,
        limits: WireLimits,
        windows: &Arc<WindowPool>,
    ) -> Result<StreamGrant, (ErrorCode, String)> {
        let granted = Arc::new(AtomicU64::new(u64::from(limits.stream_window)));
        let mut t = self.inner.lock();
        t.admit(open.id, limits.max_streams as usize, open.carries_http)?;
        t.map.insert(
            open.id,
            StreamEntry {
                caller: Caller::Local {
                    ctl: open.ctl,
                    body: open.body,
                },
                granted: granted.clone(),
                received: 0,
                head_seen: !open.expects_head,
                carries_http: open.carries_http,
            },
        );
        Ok(StreamGrant {
            link: link.clone(),
            limits,
            granted,
            closer: StreamCloser::Local(self.clone()),
            windows: windows.clone(),
        })
    }

    /// The stream's owner is done with it (it already told the agent, if it had to).
    pub fn close(&self, id: StreamId) {
        self.inner.lock().map.remove(&id);
    }
}

enum State {
    AwaitingHello,
    Verifying,
    Active { agent: AgentName, epoch: u64 },
    Closing,
}

/// One agent connection.
pub struct AgentSession {
    node: Arc<NodeState>,
    link: AgentLink,
    peer: Option<SocketAddr>,
    session_id: u64,
    state: State,
    streams: Arc<StreamTable>,
    last_seen: Instant,
    decode_limits: Limits,
    /// `GoAway` was sent: losing presence retires this session instead of closing it.
    draining: bool,
    /// The agent's instance id (re-creates presence after the directory lost it).
    instance_id: String,
}

/// Serves one connection to the agent listener: answers the WebSocket upgrade (within the
/// handshake timeout), starts the session actor on the socket and writes for it until the
/// connection ends. A request the node does not take gets its HTTP status and reason, and is
/// logged.
pub async fn accept(mut io: TcpStream, node: Arc<NodeState>) {
    let peer = io.peer_addr().ok();
    // Frames are small and latency-bound; Nagle plus delayed ACKs cost 40 ms stalls.
    let _ = io.set_nodelay(true);
    let timeout = node.cfg.handshake_timeout;
    let upgrade = match tokio::time::timeout(timeout, read_upgrade(&mut io, AGENT_PATH)).await {
        Ok(Ok(_)) if node.phase() != Phase::Ready => Err(UpgradeRefused::new(503, "node is not accepting agents")),
        Ok(u) => u,
        Err(_) => Err(UpgradeRefused::new(
            408,
            format!("no upgrade request within {} ms", timeout.as_millis()),
        )),
    };
    let (response, read_ahead) = match upgrade {
        Ok(u) => u,
        Err(refused) => {
            tracing::info!(?peer, status = refused.status, why = %refused.why, "agent upgrade refused");
            refuse_upgrade(io, &refused, timeout).await;
            return;
        }
    };
    match tokio::time::timeout(timeout, io.write_all(&response)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(?peer, error = %e, "sending the upgrade response failed");
            return;
        }
        Err(_) => {
            tracing::info!(?peer, "agent did not take the upgrade response in time");
            return;
        }
    }
    let limits = node.cfg.limits;
    let (tx, rx) = mpsc::unbounded_channel();
    let (read, write) = io.into_split();
    let (stream, writer) = agent_socket(read, read_ahead, write, rx, limits.max_frame_bytes as usize);
    let decode_limits = Limits {
        max_frame_bytes: limits.max_frame_bytes as usize,
        max_data_bytes: limits.max_data_bytes as usize,
        ..Limits::default()
    };
    AgentSession::create(move |ctx| {
        ctx.add_stream(stream);
        AgentSession {
            node,
            link: AgentLink::Local(tx),
            peer,
            session_id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            state: State::AwaitingHello,
            streams: Arc::default(),
            last_seen: Instant::now(),
            decode_limits,
            draining: false,
            instance_id: String::new(),
        }
    });
    // The writer lasts as long as the connection: the server counts it as in flight until then.
    writer.await;
}

/// Most a refused peer may still send before its connection is closed anyway.
const LINGER_BYTES: usize = 64 * 1024;

/// How long a refused peer is given to take its answer.
const LINGER: Duration = Duration::from_secs(1);

/// Answers a refused upgrade and closes the connection so that the answer arrives: closing a
/// socket with unread bytes in it (the rest of an oversized head) resets the connection, and
/// the peer may lose the answer. So the node sends its end's FIN first and reads what still
/// comes, up to [`LINGER_BYTES`] for at most [`LINGER`].
async fn refuse_upgrade(mut io: TcpStream, refused: &UpgradeRefused, timeout: Duration) {
    if tokio::time::timeout(timeout, io.write_all(&refused.response()))
        .await
        .is_err()
        || io.shutdown().await.is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

impl Actor for AgentSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // A session carries many streams; its mailbox only sees control messages.
        ctx.set_mailbox_capacity(4096);
        ctx.run_later(self.node.cfg.handshake_timeout, |this, ctx| {
            if matches!(this.state, State::AwaitingHello | State::Verifying) {
                tracing::info!(peer = ?this.peer, "handshake timed out");
                this.refuse(
                    ctx,
                    RefuseCode::Malformed,
                    "no valid Hello within the handshake timeout",
                );
            }
        });
        ctx.run_interval(self.node.cfg.heartbeat, |this, ctx| this.heartbeat(ctx));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Every exit path ends here, so no caller is left waiting on a dead agent.
        if let State::Active { agent, epoch } = std::mem::replace(&mut self.state, State::Closing) {
            self.drain_streams(&agent, epoch, ErrorCode::AgentUnavailable, "agent disconnected");
            self.release(agent, epoch);
        }
        self.link.close(CloseReason {
            code: CloseCode::Normal,
            description: None,
        });
    }
}

impl AgentSession {
    fn release(&self, agent: AgentName, epoch: u64) {
        self.node.sessions.remove(&agent, self.session_id);
        self.node.metrics.agents_connected.dec();
        tracing::info!(%agent, "agent session closed");
        let dir = self.node.directory.clone();
        actix_rt::spawn(async move {
            let _ = dir.release_presence(&agent, epoch).await;
        });
    }

    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode, why: &str) {
        self.link.close(CloseReason {
            code,
            description: Some(why.to_owned()),
        });
        if let State::Active { agent, epoch } = std::mem::replace(&mut self.state, State::Closing) {
            self.drain_streams(&agent, epoch, ErrorCode::AgentUnavailable, why);
            self.release(agent, epoch);
        }
        ctx.stop();
    }

    /// Resets every open stream towards its caller (local or on another node).
    /// Also closes the table to new streams: whoever still holds this session is refused.
    fn drain_streams(&mut self, agent: &AgentName, epoch: u64, code: ErrorCode, why: &str) {
        let gone: Vec<(StreamId, StreamEntry)> = {
            let mut t = self.streams.inner.lock();
            t.accepting = false;
            t.map.drain().collect()
        };
        for (id, mut s) in gone {
            s.reset_caller(&self.node, agent, epoch, id, code, why);
        }
    }

    fn refuse(&mut self, ctx: &mut Context<Self>, code: RefuseCode, message: &str) {
        self.node.metrics.handshakes.with_label_values(&[code.as_str()]).inc();
        tracing::info!(peer = ?self.peer, code = %code, %message, "handshake refused");
        self.link.send(&Frame::Refused(Refused {
            code,
            message: message.to_owned(),
        }));
        self.close(ctx, CloseCode::Policy, code.as_str());
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let State::Active { agent, epoch } = &self.state else {
            return;
        };
        let hb = self.node.cfg.heartbeat;
        let silent = self.last_seen.elapsed();
        if silent > hb * self.node.cfg.missed_heartbeats {
            tracing::info!(%agent, silent_ms = silent.as_millis() as u64, "agent missed its heartbeats; dropping it");
            self.close(ctx, CloseCode::Away, "heartbeat timeout");
            return;
        }
        self.link
            .send(&Frame::Ping(strait_schema::Ping { timestamp_ms: now_ms() }));
        let (dir, agent, ttl) = (
            self.node.directory.clone(),
            agent.clone(),
            hb * (self.node.cfg.missed_heartbeats + 1),
        );
        let holder = Presence {
            node_id: self.node.cfg.node_id.clone(),
            instance_id: self.instance_id.clone(),
            epoch: *epoch,
        };
        ctx.spawn(
            async move { dir.refresh_presence(&agent, &holder, ttl).await }
                .into_actor(self)
                .map(|res, this, ctx| {
                    if let Ok(false) = res {
                        if this.draining {
                            // Moved away on our request: finish what is in flight here, and what
                            // callers routed here just before the move; the agent closes it.
                            if let Some((agent, _)) = this.ident() {
                                this.node.sessions.retire(&agent, this.session_id);
                            }
                        } else {
                            tracing::info!("a newer connection of this agent took over; closing this one");
                            this.close(ctx, CloseCode::Policy, "replaced by a newer connection");
                        }
                    }
                }),
        );
    }

    fn on_hello(&mut self, ctx: &mut Context<Self>, hello: Hello) {
        self.state = State::Verifying;
        let node = self.node.clone();
        let fut = async move { verify_hello(&node, &hello).await.map(|()| hello) };
        ctx.wait(fut.into_actor(self).map(|res, this, ctx| match res {
            Err((code, msg)) => this.refuse(ctx, code, &msg),
            Ok(hello) => this.activate(ctx, hello),
        }));
    }

    fn activate(&mut self, ctx: &mut Context<Self>, hello: Hello) {
        if self.node.phase() != Phase::Ready {
            return self.refuse(ctx, RefuseCode::Unavailable, "node is draining");
        }
        let node = self.node.clone();
        let agent = hello.agent.clone();
        let instance = hello.instance_id.clone();
        let ttl = node.cfg.heartbeat * (node.cfg.missed_heartbeats + 1);
        let fut = async move {
            node.directory
                .claim_presence(&agent, &node.cfg.node_id, &instance, ttl)
                .await
        };
        ctx.wait(fut.into_actor(self).map(move |res, this, ctx| {
            let epoch = match res {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "directory unavailable during handshake");
                    return this.refuse(ctx, RefuseCode::Unavailable, "directory unavailable");
                }
            };
            let agent = hello.agent.clone();
            {
                let mut t = this.streams.inner.lock();
                t.accepting = true;
                t.raw_http = hello.capabilities.iter().any(|c| c == CAP_RAW_HTTP);
            }
            let sref = SessionRef {
                session_id: this.session_id,
                addr: ctx.address(),
                epoch,
                streams: this.streams.clone(),
                link: this.link.clone(),
                arbiter: actix_rt::Arbiter::current(),
            };
            if let Some(old) = this.node.sessions.insert(agent.clone(), sref) {
                old.addr.do_send(Kick {
                    reason: "replaced by a newer connection",
                });
            }
            this.node.metrics.agents_connected.inc();
            this.node.metrics.handshakes.with_label_values(&["ok"]).inc();
            this.state = State::Active {
                agent: agent.clone(),
                epoch,
            };
            this.last_seen = Instant::now();
            let cfg = &this.node.cfg;
            this.link.send(&Frame::Welcome(Welcome {
                node_id: cfg.node_id.clone(),
                heartbeat_ms: cfg.heartbeat.as_millis() as u32,
                limits: cfg.limits,
                capabilities: vec![CAP_INLINE_END.to_owned(), CAP_DRAIN.to_owned()],
            }));
            this.instance_id = hello.instance_id.clone();
            tracing::info!(%agent, instance = %hello.instance_id, peer = ?this.peer, epoch, "agent connected");
        }));
    }

    /// The agent's identity once active (frames relayed to other nodes carry it).
    fn ident(&self) -> Option<(AgentName, u64)> {
        match &self.state {
            State::Active { agent, epoch } => Some((agent.clone(), *epoch)),
            _ => None,
        }
    }

    fn on_frame(&mut self, ctx: &mut Context<Self>, frame: Frame) {
        let State::Active { agent, epoch } = &self.state else {
            return;
        };
        let epoch = *epoch;
        match frame {
            Frame::Ping(p) => {
                self.link.send(&Frame::Pong(Pong {
                    timestamp_ms: p.timestamp_ms,
                }));
            }
            Frame::Pong(_) => {}
            Frame::ResponseHead(h) => {
                let id = h.stream;
                let mut t = self.streams.inner.lock();
                let Some(s) = t.map.get_mut(&id) else {
                    drop(t);
                    return self.unknown_stream(id, "response_head");
                };
                if s.head_seen {
                    drop(t);
                    return self.reset_stream(id, ErrorCode::ProtocolError, "second response head");
                }
                s.head_seen = true;
                s.received += h.body.len() as u64;
                if s.received > s.granted.load(Ordering::Acquire) {
                    drop(t);
                    return self.reset_stream(id, ErrorCode::ProtocolError, "flow-control window exceeded");
                }
                if matches!(s.caller, Caller::Local { .. }) && !h.body.is_empty() {
                    self.node.metrics.bytes_out.inc_by(h.body.len() as u64);
                }
                let delivered = s.forward_to_caller(&self.node, agent, epoch, Frame::ResponseHead(h));
                if s.relay_done() {
                    t.map.remove(&id);
                }
                drop(t);
                if !delivered {
                    // The caller is already gone; tell the agent so it stops sending.
                    self.reset_stream(id, ErrorCode::Reset, "caller went away");
                }
            }
            Frame::Data(d) => {
                let id = d.stream;
                let mut t = self.streams.inner.lock();
                let Some(s) = t.map.get_mut(&id) else {
                    drop(t);
                    return self.unknown_stream(id, "data");
                };
                s.received += d.bytes.len() as u64;
                if !s.head_seen || s.received > s.granted.load(Ordering::Acquire) {
                    let why = if s.head_seen {
                        "flow-control window exceeded"
                    } else {
                        "data before response head"
                    };
                    drop(t);
                    return self.reset_stream(id, ErrorCode::ProtocolError, why);
                }
                if matches!(s.caller, Caller::Local { .. }) {
                    self.node.metrics.bytes_out.inc_by(d.bytes.len() as u64);
                }
                s.forward_to_caller(&self.node, agent, epoch, Frame::Data(d));
            }
            Frame::Fin(f) => {
                let id = f.stream;
                let mut t = self.streams.inner.lock();
                match t.map.get_mut(&id) {
                    Some(s) if s.head_seen => {
                        s.forward_to_caller(&self.node, agent, epoch, Frame::Fin(f));
                        if s.relay_done() {
                            t.map.remove(&id);
                        }
                    }
                    Some(_) => {
                        drop(t);
                        self.reset_stream(id, ErrorCode::ProtocolError, "fin before response head");
                    }
                    None => {
                        drop(t);
                        self.unknown_stream(id, "fin");
                    }
                }
            }
            Frame::Credit(c) => {
                let id = c.stream;
                let mut t = self.streams.inner.lock();
                let delivered = match t.map.get_mut(&id) {
                    Some(s) => s.forward_to_caller(&self.node, agent, epoch, Frame::Credit(c)),
                    None => true,
                };
                drop(t);
                if !delivered {
                    self.reset_stream(id, ErrorCode::ProtocolError, "too many credit frames");
                }
            }
            Frame::Drain(d) => {
                let id = d.stream;
                let mut t = self.streams.inner.lock();
                match t.map.get_mut(&id) {
                    // Before the head too: the agent sends `Drain` ahead of its queued frames.
                    Some(s) if s.carries_http => match &s.caller {
                        // A caller's node of an older build reads no `Drain`: its connection
                        // holds the stream as before, until the agent's drain ends.
                        Caller::Remote { node, .. } if !self.node.peers.lists(node, FEATURE_DRAIN) => {
                            self.node.metrics.bus.with_label_values(&["peer_lacks_drain"]).inc();
                        }
                        _ => {
                            s.forward_to_caller(&self.node, agent, epoch, Frame::Drain(d));
                        }
                    },
                    Some(_) => {
                        drop(t);
                        self.refuse_frame("drain_not_carried");
                        self.reset_stream(
                            id,
                            ErrorCode::ProtocolError,
                            "drain on a stream that is not a carried connection",
                        );
                    }
                    None => {
                        drop(t);
                        self.unknown_stream(id, "drain");
                    }
                }
            }
            Frame::Reset(r) => {
                let entry = self.streams.inner.lock().map.remove(&r.stream);
                if let Some(mut s) = entry {
                    self.node.metrics.resets.with_label_values(&[r.code.as_str()]).inc();
                    s.forward_to_caller(&self.node, agent, epoch, Frame::Reset(r));
                }
            }
            Frame::RequestHead(RequestHead { stream, .. }) | Frame::StreamOpen(StreamOpen { stream, .. }) => {
                self.refuse_frame("agent_opened_stream");
                self.link.send(&Frame::Reset(Reset {
                    stream,
                    code: ErrorCode::ProtocolError,
                    reason: "agents cannot open streams".into(),
                }));
            }
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Refused(_) | Frame::GoAway(_) => {
                self.refuse_frame("unexpected_control_frame");
                self.close(ctx, CloseCode::Protocol, "unexpected control frame after handshake");
            }
        }
    }

    fn refuse_frame(&self, reason: &'static str) {
        self.node.metrics.frames_refused.with_label_values(&[reason]).inc();
    }

    /// A frame for a stream we do not know: usually one that just ended (frames cross in flight),
    /// so answer with a Reset the agent can drop, and never more than that.
    fn unknown_stream(&self, id: StreamId, kind: &'static str) {
        self.refuse_frame("unknown_stream");
        tracing::debug!(stream = %id, kind, "frame for unknown stream");
        self.link.send(&Frame::Reset(Reset {
            stream: id,
            code: ErrorCode::ProtocolError,
            reason: "unknown stream".into(),
        }));
    }

    /// Aborts one stream in both directions with a reason; its neighbours are untouched. Must not
    /// be called with the stream table locked.
    fn reset_stream(&self, id: StreamId, code: ErrorCode, why: &str) {
        tracing::info!(stream = %id, %code, why, "resetting stream");
        self.node.metrics.resets.with_label_values(&[code.as_str()]).inc();
        self.link.send(&Frame::Reset(Reset {
            stream: id,
            code,
            reason: why.to_owned(),
        }));
        let entry = self.streams.inner.lock().map.remove(&id);
        if let (Some(mut s), State::Active { agent, epoch }) = (entry, &self.state) {
            s.reset_caller(&self.node, agent, *epoch, id, code, why);
        }
    }
}

/// Checks a `Hello` against the store and the directory. Signature first, so an unauthenticated
/// peer cannot burn nonces or learn anything from timing of later checks.
async fn verify_hello(node: &NodeState, h: &Hello) -> Result<(), (RefuseCode, String)> {
    if h.version != PROTOCOL_VERSION {
        return Err((
            RefuseCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this node speaks {PROTOCOL_VERSION})",
                h.version
            ),
        ));
    }
    let rec = match node.store.agent(&h.agent).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err((RefuseCode::UnknownAgent, format!("no agent named {}", h.agent))),
        Err(e) => {
            tracing::warn!(error = %e, "store unavailable during handshake");
            return Err((RefuseCode::Unavailable, "store unavailable".into()));
        }
    };
    if rec.key_id != h.key_id {
        return Err((
            RefuseCode::UnknownAgent,
            format!("agent {} has no key {}", h.agent, h.key_id),
        ));
    }
    if rec.revoked_at_ms.is_some() {
        return Err((RefuseCode::Revoked, format!("agent {} was revoked", h.agent)));
    }
    if !credentials::verify(&rec.secret, h) {
        return Err((RefuseCode::BadSignature, "handshake signature does not verify".into()));
    }
    let skew = node.cfg.clock_skew;
    let now = now_ms();
    let diff = now.abs_diff(h.timestamp_ms);
    if diff > skew.as_millis() as u64 {
        return Err((
            RefuseCode::ClockSkew,
            format!("agent clock is {} ms off (allowed {} ms)", diff, skew.as_millis()),
        ));
    }
    let key = format!("{}:{}", h.agent, hex::encode(h.nonce));
    match node
        .directory
        .remember_nonce(&key, skew * 2 + Duration::from_secs(1))
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err((RefuseCode::Replay, "handshake nonce was already used".into())),
        Err(e) => {
            tracing::warn!(error = %e, "directory unavailable during handshake");
            Err((RefuseCode::Unavailable, "directory unavailable".into()))
        }
    }
}

impl StreamHandler<Result<WsMessage, DecodeError>> for AgentSession {
    fn handle(&mut self, msg: Result<WsMessage, DecodeError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        let bytes = match msg {
            Ok(WsMessage::Binary(b)) => b,
            Ok(WsMessage::Ping(p)) => {
                self.link.pong(p);
                return;
            }
            Ok(WsMessage::Pong) => return,
            Ok(WsMessage::Close(code)) => {
                tracing::debug!(?code, "agent closed the WebSocket");
                self.close(ctx, CloseCode::Normal, "agent closed");
                return;
            }
            Ok(WsMessage::Text) => {
                self.refuse_frame("text_message");
                tracing::info!(peer = ?self.peer, "text WebSocket message from agent; closing");
                return self.close_or_refuse(
                    ctx,
                    CloseCode::Unsupported,
                    "text messages are not part of the protocol",
                );
            }
            Err(e) => {
                self.refuse_frame("websocket_error");
                tracing::info!(peer = ?self.peer, error = %e, "WebSocket protocol error from agent; closing");
                let code = if matches!(e, DecodeError::TooLarge { .. }) {
                    CloseCode::Size
                } else {
                    CloseCode::Protocol
                };
                return self.close_or_refuse(ctx, code, "websocket protocol error");
            }
        };
        let frame = match decode_bytes(bytes, &self.decode_limits) {
            Ok(f) => f,
            Err(e) => {
                self.refuse_frame("malformed_frame");
                tracing::info!(peer = ?self.peer, error = %e, "malformed frame from agent; closing");
                return self.close_or_refuse(ctx, CloseCode::Protocol, &format!("malformed frame: {e}"));
            }
        };
        match (&self.state, frame) {
            (State::AwaitingHello, Frame::Hello(h)) => self.on_hello(ctx, h),
            (State::AwaitingHello, _) => self.refuse(ctx, RefuseCode::Malformed, "first frame must be Hello"),
            (State::Active { .. }, f) => self.on_frame(ctx, f),
            (State::Verifying | State::Closing, _) => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl AgentSession {
    fn close_or_refuse(&mut self, ctx: &mut Context<Self>, code: CloseCode, why: &str) {
        if matches!(self.state, State::AwaitingHello) {
            self.refuse(ctx, RefuseCode::Malformed, why);
        } else {
            self.close(ctx, code, why);
        }
    }
}

impl Handler<FromCaller> for AgentSession {
    type Result = ();

    /// Frames from a caller on another node: opens are admitted like local ones (refusals go back
    /// over the bus), the rest are passed to the agent, with credit counted for enforcement.
    fn handle(&mut self, msg: FromCaller, _: &mut Self::Context) {
        let State::Active { agent, epoch } = &self.state else {
            return;
        };
        let epoch = *epoch;
        let Some(id) = msg.frame.stream() else { return };
        let limits = self.node.cfg.limits;
        let mut t = self.streams.inner.lock();
        match &msg.frame {
            Frame::RequestHead(_) | Frame::StreamOpen(_) => {
                let carries_http = matches!(&msg.frame, Frame::StreamOpen(o) if o.http);
                if let Err((code, why)) = t.admit(id, limits.max_streams as usize, carries_http) {
                    drop(t);
                    let reset = Frame::Reset(Reset {
                        stream: id,
                        code,
                        reason: why,
                    });
                    self.node.bus_out.send(&msg.from_node, agent, epoch, reset);
                    return;
                }
                // A carried HTTP connection starts with the agent's head, like a request.
                let head_seen = matches!(msg.frame, Frame::StreamOpen(_)) && !carries_http;
                let caller = Caller::Remote {
                    node: msg.from_node,
                    fin_from_caller: matches!(msg.frame, Frame::RequestHead(RequestHead { end: true, .. })),
                    fin_from_agent: false,
                };
                t.map.insert(
                    id,
                    StreamEntry {
                        caller,
                        granted: Arc::new(AtomicU64::new(u64::from(limits.stream_window))),
                        received: 0,
                        head_seen,
                        carries_http,
                    },
                );
                drop(t);
                self.link.send(&msg.frame);
            }
            _ => {
                let Some(s) = t.map.get_mut(&id) else {
                    drop(t);
                    self.refuse_frame("unknown_relayed_stream");
                    return;
                };
                if !matches!(&s.caller, Caller::Remote { node, .. } if *node == msg.from_node) {
                    drop(t);
                    self.refuse_frame("relayed_frame_from_wrong_node");
                    return;
                }
                if matches!(msg.frame, Frame::Drain(_)) {
                    drop(t);
                    self.refuse_frame("relayed_drain");
                    return;
                }
                match &msg.frame {
                    Frame::Credit(c) => {
                        s.granted.fetch_add(u64::from(c.bytes), Ordering::AcqRel);
                    }
                    Frame::Fin(_) => {
                        if let Caller::Remote { fin_from_caller, .. } = &mut s.caller {
                            *fin_from_caller = true;
                        }
                    }
                    _ => {}
                }
                if s.relay_done() || matches!(msg.frame, Frame::Reset(_)) {
                    t.map.remove(&id);
                }
                drop(t);
                self.link.send(&msg.frame);
            }
        }
    }
}

impl Handler<Drain> for AgentSession {
    type Result = ();
    fn handle(&mut self, _: Drain, _: &mut Self::Context) {
        if matches!(self.state, State::Active { .. }) && !self.draining {
            self.draining = true;
            self.link.send(&Frame::GoAway(strait_schema::GoAway {
                reason: "gateway node is draining".into(),
            }));
        }
    }
}

impl Handler<Kick> for AgentSession {
    type Result = ();
    fn handle(&mut self, msg: Kick, ctx: &mut Self::Context) {
        tracing::info!(reason = msg.reason, "closing agent session");
        self.close(ctx, CloseCode::Policy, msg.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives stream events and drops them: the table only needs somewhere to address them.
    struct Owner;
    impl Actor for Owner {
        type Context = Context<Self>;
    }
    impl Handler<StreamEvent> for Owner {
        type Result = ();
        fn handle(&mut self, _: StreamEvent, _: &mut Self::Context) {}
    }

    /// Every way a caller's open can be refused, with the code a caller sees: a session that is
    /// not (or no longer) taking streams — the race of a caller against a closing session — a
    /// full one, and a colliding id; and a closed stream frees its slot.
    #[actix_rt::test]
    async fn the_stream_table_refuses_opens_with_their_codes() {
        let owner = Owner.start();
        let table = Arc::new(StreamTable::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let link = AgentLink::Local(tx);
        let windows = Arc::new(WindowPool::new(0));
        let limits = WireLimits {
            max_frame_bytes: 1 << 20,
            max_data_bytes: 64 << 10,
            stream_window: 256 << 10,
            max_streams: 1,
        };
        let open = |id: u64| OpenStream {
            id: StreamId(id),
            ctl: StreamOwner::Actor(owner.clone().recipient()),
            body: mpsc::unbounded_channel().0,
            expects_head: true,
            carries_http: false,
        };
        let refusal = |r: Result<StreamGrant, (ErrorCode, String)>| r.err().expect("open should be refused");

        let (code, why) = refusal(table.open(open(1), &link, limits, &windows));
        assert_eq!(
            (code, why.as_str()),
            (ErrorCode::AgentUnavailable, "agent is disconnecting")
        );

        table.inner.lock().accepting = true;
        assert!(table.open(open(1), &link, limits, &windows).is_ok());
        let (code, why) = refusal(table.open(open(2), &link, limits, &windows));
        assert_eq!(code, ErrorCode::TooManyStreams);
        assert!(why.contains("1 streams open"), "{why}");
        let wide = WireLimits {
            max_streams: 8,
            ..limits
        };
        assert_eq!(
            refusal(table.open(open(1), &link, wide, &windows)).0,
            ErrorCode::Internal
        );

        table.close(StreamId(1));
        // A carried HTTP connection only to an agent that said it takes one.
        let carried = |id: u64| OpenStream {
            carries_http: true,
            ..open(id)
        };
        let (code, why) = refusal(table.open(carried(2), &link, limits, &windows));
        assert_eq!((code, why.as_str()), (ErrorCode::ServiceUnavailable, NO_RAW_HTTP));
        table.inner.lock().raw_http = true;
        assert!(table.open(carried(2), &link, limits, &windows).is_ok());
        table.close(StreamId(2));
        assert!(table.open(open(2), &link, limits, &windows).is_ok());
        // The session starts closing: a caller that still holds its reference is refused.
        table.inner.lock().accepting = false;
        assert_eq!(
            refusal(table.open(open(3), &link, wide, &windows)).0,
            ErrorCode::AgentUnavailable
        );
    }
}
