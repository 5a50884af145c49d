//! Strait gateway node: agent sessions, HTTP ingress, ops endpoints, and the directory, store and
//! bus they run on. A single node runs on embedded backends; a cluster swaps in Redis, RabbitMQ
//! and Postgres behind the same traits.

pub mod carried;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod error;
pub mod head_timer;
pub mod http1;
pub mod inflight;
pub mod ingress;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod ports;
pub mod session;
pub mod store;
pub mod tcp;
pub mod telemetry;
pub mod ws;

pub use config::{Backends, NodeConfig, ServeArgs, StoreArgs};
pub use error::Error;
pub use node::{run, Listeners, NodeState, Phase};
