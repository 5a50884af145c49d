//! The gateway's one error enum, and its mapping to what a caller sees.

use strait_schema::ErrorCode;

/// Why the gateway could not do something. `code()` says what a caller receives; the `source()`
/// chain goes to the log only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store (SQLite file or Postgres) failed.
    #[error("store: {0}")]
    Store(String),
    /// An agent name that is not a DNS label.
    #[error("invalid agent name {0:?}: use 1-63 of a-z, 0-9 and '-'")]
    InvalidAgentName(String),
    /// `agent add` for a name that exists.
    #[error("agent {0} already exists")]
    AgentExists(String),
    /// `agent revoke` for a name that does not exist.
    #[error("no agent named {0}")]
    NoSuchAgent(String),
    /// `route add` for an address that is already routed.
    #[error("a route on {0} already exists")]
    RouteExists(String),
    /// `route remove` for an address with no route.
    #[error("no route on {0}")]
    NoSuchRoute(String),
    /// Redis (or the directory) failed.
    #[error("directory: {0}")]
    Directory(String),
    /// No live session for the agent on this node or anywhere.
    #[error("agent {0} is not connected")]
    AgentUnavailable(String),
    /// Configuration refused at start.
    #[error("config: {0}")]
    Config(String),
    /// A listener could not be bound or served.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The bus refused an envelope.
    #[error("bus: {0}")]
    Bus(#[from] strait_bus::Error),
    /// An HTTP/1.1 message on a carried connection that cannot be relayed safely: the caller's
    /// (`status` 400 or 431) or the local service's (502).
    #[error("{why}")]
    BadMessage {
        /// What the caller is answered.
        status: u16,
        /// Why, for the caller and the log.
        why: &'static str,
    },
}

impl Error {
    /// The stable code a caller sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::AgentUnavailable(_) | Error::Bus(_) => ErrorCode::AgentUnavailable,
            Error::InvalidAgentName(_) => ErrorCode::BadRequest,
            Error::BadMessage { status: 502, .. } => ErrorCode::ServiceUnavailable,
            Error::BadMessage { .. } => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}
