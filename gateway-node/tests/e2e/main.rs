//! End-to-end tests of one gateway node: real listeners on ephemeral loopback ports, a real HTTP
//! backend, real agents (in-process, on their own runtime), real WebSocket peers.

#![allow(unreachable_pub, clippy::unwrap_used)]

mod carried;
mod cluster;
mod harness;
mod http;
mod lifecycle;
mod outages;
mod procs;
mod protocol;
mod real_cluster;
mod rolling;
mod tcp;
// Not `mod tracing`: that would shadow the `tracing` crate in this binary's root.
#[path = "tracing.rs"]
mod tracing_otel;
