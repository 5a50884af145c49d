//! Stable codes: what a caller or an agent is told when something is refused or cut short.
//! The strings are part of the public contract (callers match on them); never rename one.

/// Why a stream or request ended badly. Rides in `Reset` frames and in error bodies callers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The caller lacks a grant for the service.
    AclDenied,
    /// No response head (or no progress) within the allowed time.
    Timeout,
    /// No node holds a live session for the agent, or it went away mid-request.
    AgentUnavailable,
    /// The agent does not expose that service, or the local service refused / vanished.
    ServiceUnavailable,
    /// The request itself is malformed (bad host, bad header, oversized head).
    BadRequest,
    /// A byte or stream quota was exceeded.
    QuotaExceeded,
    /// The peer reset the stream.
    Reset,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The peer broke the protocol on this stream (unknown stream, credit overrun, bad frame).
    ProtocolError,
    /// Too many open streams on this agent.
    TooManyStreams,
    /// The gateway or agent is shutting down.
    ShuttingDown,
    /// A bug or an unexpected failure on our side.
    Internal,
}

impl ErrorCode {
    /// Every code, in wire order (index = wire value).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::AclDenied,
        ErrorCode::Timeout,
        ErrorCode::AgentUnavailable,
        ErrorCode::ServiceUnavailable,
        ErrorCode::BadRequest,
        ErrorCode::QuotaExceeded,
        ErrorCode::Reset,
        ErrorCode::IdleTimeout,
        ErrorCode::ProtocolError,
        ErrorCode::TooManyStreams,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The stable string callers match on.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AclDenied => "ACL_DENIED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::AgentUnavailable => "AGENT_UNAVAILABLE",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::Reset => "RESET",
            ErrorCode::IdleTimeout => "IDLE_TIMEOUT",
            ErrorCode::ProtocolError => "PROTOCOL_ERROR",
            ErrorCode::TooManyStreams => "TOO_MANY_STREAMS",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// The HTTP status an ingress caller receives for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::AclDenied => 403,
            ErrorCode::Timeout | ErrorCode::IdleTimeout => 504,
            ErrorCode::AgentUnavailable => 502,
            ErrorCode::ServiceUnavailable => 502,
            ErrorCode::BadRequest => 400,
            ErrorCode::QuotaExceeded => 413,
            ErrorCode::TooManyStreams => 429,
            ErrorCode::Reset | ErrorCode::ProtocolError | ErrorCode::Internal => 502,
            ErrorCode::ShuttingDown => 503,
        }
    }

    /// Wire value (index into [`ErrorCode::ALL`]).
    pub fn to_wire(self) -> u16 {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0) as u16
    }

    /// Parses a wire value; `None` for values this version does not know.
    pub fn from_wire(v: u16) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a handshake was refused. The agent prints the code; some codes are final (no retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// No agent of that name exists (or its key id does not match).
    UnknownAgent,
    /// The HMAC did not verify.
    BadSignature,
    /// The timestamp is outside the accepted window.
    ClockSkew,
    /// The nonce was already used within the window.
    Replay,
    /// The agent was revoked.
    Revoked,
    /// The protocol version is not supported by this node.
    UnsupportedVersion,
    /// The first frame was not a well-formed `Hello`.
    Malformed,
    /// The node cannot take agents right now (draining, store unreachable); retry elsewhere.
    Unavailable,
}

impl RefuseCode {
    /// Every code, in wire order (index = wire value).
    pub const ALL: [RefuseCode; 8] = [
        RefuseCode::UnknownAgent,
        RefuseCode::BadSignature,
        RefuseCode::ClockSkew,
        RefuseCode::Replay,
        RefuseCode::Revoked,
        RefuseCode::UnsupportedVersion,
        RefuseCode::Malformed,
        RefuseCode::Unavailable,
    ];

    /// The stable string the agent prints.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::UnknownAgent => "UNKNOWN_AGENT",
            RefuseCode::BadSignature => "BAD_SIGNATURE",
            RefuseCode::ClockSkew => "CLOCK_SKEW",
            RefuseCode::Replay => "REPLAY",
            RefuseCode::Revoked => "REVOKED",
            RefuseCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            RefuseCode::Malformed => "MALFORMED",
            RefuseCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// Whether retrying with the same credentials can ever succeed (the agent backs off harder
    /// on final refusals but still retries, since an operator may fix the cause).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RefuseCode::UnknownAgent | RefuseCode::BadSignature | RefuseCode::Revoked | RefuseCode::UnsupportedVersion
        )
    }

    /// Wire value (index into [`RefuseCode::ALL`]).
    pub fn to_wire(self) -> u16 {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0) as u16
    }

    /// Parses a wire value; `None` for values this version does not know.
    pub fn from_wire(v: u16) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

impl std::fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
