//! The agent's one error type. Nothing in it carries the token or the secret.

use std::sync::Arc;
use std::time::Duration;

use strait_schema::{CredentialError, DecodeError, RefuseCode};

/// Why the agent could not start, connect or keep going. Configuration variants are reported
/// at start-up; connection variants only reach the log, because the agent retries them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A `--gateway` value is not a usable WebSocket URL.
    #[error("invalid gateway URL {url:?}: {why}")]
    GatewayUrl {
        /// The value as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An `--expose` value is not `[NAME=]URL` with a supported scheme.
    #[error("invalid service {spec:?}: {why}")]
    Expose {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The token does not parse (the message never contains the token).
    #[error("invalid token")]
    Token(#[from] CredentialError),
    /// Some other configuration value is missing or invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// TLS could not be set up (no usable protocol versions with the crypto provider).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The gateway answered the handshake with `Refused`.
    #[error("refused by gateway: {code} {message}")]
    Refused {
        /// Stable refusal code.
        code: RefuseCode,
        /// Gateway's detail text.
        message: String,
    },
    /// Dialling or talking to the gateway failed at the WebSocket or TCP level.
    #[error("{0}")]
    Connection(String),
    /// The gateway broke the protocol (text message, undecodable frame, unexpected first frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame from the gateway failed validation.
    #[error("undecodable frame from gateway: {0}")]
    Decode(#[from] DecodeError),
    /// Waiting for something (handshake, first connection) took longer than allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The agent was stopped (or its runtime is gone) before the awaited event happened.
    #[error("agent stopped")]
    Stopped,
    /// An [`crate::AgentHandle`] could not start: invalid configuration or no runtime.
    #[error("agent could not start: {0}")]
    NotStarted(String),
    /// The agent's own runtime could not be built.
    #[error("could not start the agent runtime")]
    Runtime(#[source] Arc<std::io::Error>),
}
