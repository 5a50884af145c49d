//! Typed frames. One [`Frame`] per WebSocket binary message between agent and node; the same
//! frames, wrapped in a [`BusEnvelope`], travel between nodes. Values of these types that came
//! from [`crate::decode`] have had every field validated.

use bytes::Bytes;

use crate::code::{ErrorCode, RefuseCode};

/// Protocol version spoken by this build. A node refuses `Hello`s with another major version.
pub const PROTOCOL_VERSION: u16 = 1;

/// Capability a node lists in `Welcome` when it accepts a [`ResponseHead`] that carries `end` and
/// the whole body: a small response is then one frame instead of head, `Data` and `Fin` (and one
/// bus envelope instead of three across nodes). An agent sends that form only to such a node.
pub const CAP_INLINE_END: &str = "inline-end";

/// Capability an agent lists in `Hello` when it takes a [`StreamOpen`] with `http` for an HTTP
/// service: the caller's HTTP/1.1 connection travels as bytes, and the agent copies them to and
/// from one connection to the service without parsing HTTP (docs/benchmarks.md: re-encoding each
/// request is what small requests spend most of their tunnel time on).
pub const CAP_RAW_HTTP: &str = "raw-http";

/// Capability a node lists in `Welcome` when it takes a [`Drain`] from the agent: a draining
/// agent then has the node end its carried connections between requests, instead of serving
/// them until its drain timeout cuts whatever is in flight (a carried connection never runs out
/// of requests while its caller keeps sending). An agent sends `Drain` only to such a node.
pub const CAP_DRAIN: &str = "drain";

/// In the head an agent opens a [`CAP_RAW_HTTP`] stream with: the path the service lives under,
/// which the gateway puts in front of every request target it writes.
pub const PATH_PREFIX_HEADER: &str = "x-strait-path-prefix";

/// Identifies one stream (HTTP exchange or byte stream) on one agent connection. Chosen at random
/// (non-zero) by the node that opens it, so ids stay unique across a cluster without coordination;
/// the agent session refuses a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    /// A fresh random non-zero id.
    pub fn random() -> Self {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return StreamId(v);
            }
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// An agent's name: one DNS label (`[a-z0-9-]`, 1..=63, no leading/trailing `-`), because it is
/// also the first label of the agent's ingress host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(String);

impl AgentName {
    /// Validates and wraps a name.
    pub fn new(s: &str) -> Option<Self> {
        is_dns_label(s).then(|| AgentName(s.to_owned()))
    }
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AgentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// True for a lowercase DNS label: `[a-z0-9-]{1,63}`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// True for a short identifier (instance ids, key ids, capability and service names):
/// `[A-Za-z0-9._-]{1,64}`.
pub fn is_short_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What kind of traffic a service the agent exposes carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// HTTP requests (`RequestHead` streams).
    Http,
    /// Raw byte streams (`StreamOpen` streams).
    Tcp,
}

/// One service an agent announces in its `Hello`. The empty name is the default HTTP service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDecl {
    /// Service name (`""` for the default service, else a short id).
    pub name: String,
    /// Traffic kind.
    pub kind: ServiceKind,
}

/// First frame an agent sends. Signed with the agent's secret over [`crate::credentials::signing_payload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Agent name (from its token).
    pub agent: AgentName,
    /// Identifies this agent process/instance; stable across its reconnects.
    pub instance_id: String,
    /// Which of the agent's keys signed this handshake.
    pub key_id: String,
    /// Agent's wall clock, ms since the Unix epoch; checked against a window.
    pub timestamp_ms: u64,
    /// 16 random bytes, remembered cluster-wide for the window so a captured Hello cannot be replayed.
    pub nonce: [u8; 16],
    /// HMAC-SHA256 over the canonical handshake fields.
    pub signature: [u8; 32],
    /// Protocol version the agent speaks.
    pub version: u16,
    /// Optional features the agent supports (`terminal`, `files`, `broker`, ...).
    pub capabilities: Vec<String>,
    /// Services the agent exposes.
    pub services: Vec<ServiceDecl>,
}

/// Limits a node imposes on one agent connection, announced in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Largest WebSocket message either side may send.
    pub max_frame_bytes: u32,
    /// Largest payload of one `Data` frame.
    pub max_data_bytes: u32,
    /// Initial credit window per stream and direction.
    pub stream_window: u32,
    /// Most streams open at once on this connection.
    pub max_streams: u32,
}

/// The node accepted the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Which node the agent is connected to (for logs).
    pub node_id: String,
    /// Ping interval; a peer silent for several intervals is dropped.
    pub heartbeat_ms: u32,
    /// Limits in force on this connection.
    pub limits: WireLimits,
    /// Capabilities both sides support.
    pub capabilities: Vec<String>,
}

/// The node refused the handshake; the connection closes after this frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Stable reason code.
    pub code: RefuseCode,
    /// Human-readable detail (never contains secrets).
    pub message: String,
}

/// One HTTP header. Names are lowercase tokens; values are bytes without CR, LF or NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Lowercase header name.
    pub name: String,
    /// Raw value bytes.
    pub value: Bytes,
}

/// Opens an HTTP exchange on the agent. The request body follows as `Data` frames, then `Fin`;
/// with `end` nothing follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// New stream id.
    pub stream: StreamId,
    /// Service name; empty for the default HTTP service.
    pub service: String,
    /// Method token (`GET`, `POST`, ...).
    pub method: String,
    /// Origin-form target: path and query (`/a/b?c=d`).
    pub uri: String,
    /// Request headers (hop-by-hop ones already removed).
    pub headers: Vec<Header>,
    /// No body follows: the head is also the caller's `Fin`. An agent that predates the flag
    /// ignores it, which is safe because a node sets it only on requests whose headers declare
    /// no body (and no upgrade), and such an agent never waits for that `Fin`.
    pub end: bool,
}

/// The agent's answer head. The response body follows as `Data` frames, then `Fin`; with `end`
/// the head carries the whole body and nothing follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Stream being answered.
    pub stream: StreamId,
    /// HTTP status, 100..=599.
    pub status: u16,
    /// Response headers (hop-by-hop ones already removed).
    pub headers: Vec<Header>,
    /// The response is complete (see [`CAP_INLINE_END`]).
    pub end: bool,
    /// With `end` only: the whole body, at most `max_data_bytes`, counted against the window.
    pub body: Bytes,
}

/// Opens a raw byte stream to a named TCP service of the agent, or (`http`) to an HTTP service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOpen {
    /// New stream id.
    pub stream: StreamId,
    /// Service name: a short id, or with `http` also `""` (the default HTTP service).
    pub service: String,
    /// The stream carries one HTTP/1.1 connection to an HTTP service ([`CAP_RAW_HTTP`]): the
    /// agent answers with a [`ResponseHead`] naming the service's `host` before any `Data`.
    pub http: bool,
}

/// Payload bytes of a stream; counts against the receiver's credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Stream the bytes belong to.
    pub stream: StreamId,
    /// Payload, at most `max_data_bytes`, never empty.
    pub bytes: Bytes,
}

/// Grants the peer `bytes` more send credit on a stream (the receiver consumed that much).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// Stream the credit is for.
    pub stream: StreamId,
    /// Additional bytes the peer may send; never zero.
    pub bytes: u32,
}

/// The sender will send no more `Data` on this stream (half-close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fin {
    /// Stream being half-closed.
    pub stream: StreamId,
}

/// Aborts a stream in both directions, with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// Stream being aborted.
    pub stream: StreamId,
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail (bounded, never secret).
    pub reason: String,
}

/// Liveness probe; the peer answers `Pong` with the same timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Sender's clock, ms; echoed back for RTT.
    pub timestamp_ms: u64,
}

/// Answer to `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// The timestamp from the `Ping`.
    pub timestamp_ms: u64,
}

/// The node asks the agent to reconnect elsewhere (drain); the agent dials again, then lets this
/// connection finish its streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Why (for logs).
    pub reason: String,
}

/// The agent is shutting down: the node ends this carried HTTP connection (its `Fin`) once the
/// exchange in flight is answered, and sends the caller's next request elsewhere ([`CAP_DRAIN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// The carried connection's stream.
    pub stream: StreamId,
}

/// Everything that travels on an agent connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent's handshake.
    Hello(Hello),
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake refused.
    Refused(Refused),
    /// Liveness probe.
    Ping(Ping),
    /// Liveness answer.
    Pong(Pong),
    /// HTTP request head.
    RequestHead(RequestHead),
    /// HTTP response head.
    ResponseHead(ResponseHead),
    /// Byte stream open.
    StreamOpen(StreamOpen),
    /// Stream payload.
    Data(Data),
    /// Flow-control window update.
    Credit(Credit),
    /// Half-close.
    Fin(Fin),
    /// Abort.
    Reset(Reset),
    /// Please reconnect elsewhere.
    GoAway(GoAway),
    /// End this carried connection between requests.
    Drain(Drain),
}

impl Frame {
    /// The stream this frame belongs to, if it is a stream frame.
    pub fn stream(&self) -> Option<StreamId> {
        match self {
            Frame::RequestHead(f) => Some(f.stream),
            Frame::ResponseHead(f) => Some(f.stream),
            Frame::StreamOpen(f) => Some(f.stream),
            Frame::Data(f) => Some(f.stream),
            Frame::Credit(f) => Some(f.stream),
            Frame::Fin(f) => Some(f.stream),
            Frame::Reset(f) => Some(f.stream),
            Frame::Drain(f) => Some(f.stream),
            _ => None,
        }
    }

    /// True for the frames that open a stream (`RequestHead`, `StreamOpen`): the ones a node
    /// admits against its limits and the only ones that carry a trace context across nodes.
    pub fn opens_stream(&self) -> bool {
        matches!(self, Frame::RequestHead(_) | Frame::StreamOpen(_))
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Refused(_) => "refused",
            Frame::Ping(_) => "ping",
            Frame::Pong(_) => "pong",
            Frame::RequestHead(_) => "request_head",
            Frame::ResponseHead(_) => "response_head",
            Frame::StreamOpen(_) => "stream_open",
            Frame::Data(_) => "data",
            Frame::Credit(_) => "credit",
            Frame::Fin(_) => "fin",
            Frame::Reset(_) => "reset",
            Frame::GoAway(_) => "go_away",
            Frame::Drain(_) => "drain",
        }
    }
}

/// A frame travelling between gateway nodes over the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEnvelope {
    /// Sending node id.
    pub from_node: String,
    /// Destination node id.
    pub to_node: String,
    /// Per-sender sequence number (duplicates after a replay are dropped by it).
    pub seq: u64,
    /// W3C `traceparent` of the span that sent it (empty when none).
    pub trace_parent: String,
    /// Agent the frame concerns.
    pub agent: AgentName,
    /// Fencing epoch of the agent connection the frame is for (stale epochs are dropped).
    pub epoch: u64,
    /// The frame itself.
    pub frame: Frame,
}
