//! `strait-loadtest`: tells how fast Strait is on the machine it runs on, in figures that hold on
//! a noisy one. Every figure is taken in the same run as its baseline (the same load sent
//! straight to the backend) and reported as a ratio as well, so a busy neighbour moves both.
//!
//! The pieces: [`backend`] (a fast HTTP and TCP server that is never the bottleneck), [`load`]
//! (the load generators), [`spawn`] (starting the backend, gateway, agents and rathole on free
//! loopback ports), [`cluster`] (two-node cluster targets and what the bus costs), [`cpu`] (each
//! process's CPU per unit of work, and the machine's idle share), [`scenario`] (what is measured,
//! against which target), [`report`] (Markdown and JSON) and [`stats`] (percentiles).

pub mod backend;
pub mod body;
pub mod cluster;
pub mod cpu;
pub mod handshake;
pub mod load;
pub mod machine;
pub mod report;
pub mod scenario;
pub mod spawn;
pub mod stats;
pub mod target;

/// Why a measurement could not be taken. Each variant ends up as a `failed` row in the report
/// (with its message), never as a figure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed (connect, bind, read, write).
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An HTTP exchange failed or answered something unexpected.
    #[error("http: {0}")]
    Http(String),
    /// A process we start did not come up, or died.
    #[error("{0}")]
    Spawn(String),
    /// Something did not happen within its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The gateway's store refused what we asked (creating agents or routes).
    #[error("gateway store: {0}")]
    Store(#[from] strait_gateway::Error),
    /// The agent library refused its configuration.
    #[error("agent: {0}")]
    Agent(#[from] strait_agent::Error),
    /// The handshake of a raw agent connection failed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// A command-line value or target description that cannot work.
    #[error("{0}")]
    Config(String),
    /// Writing the report failed.
    #[error("report: {0}")]
    Report(String),
}

impl Error {
    /// Wraps an I/O error with what we were doing, so the report says which step failed.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
