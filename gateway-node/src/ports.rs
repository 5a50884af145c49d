//! Loopback ports for harnesses that start gateways, agents and backends as child processes (the
//! end-to-end tests and `strait-loadtest --spawn`).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// A free loopback address for a child process to listen on, never handed out twice by this
/// process.
///
/// Chosen below the kernel's ephemeral range: a port from `bind(0)` is free only until the child
/// binds it, and in that gap any outgoing connection (of this process or a parallel one) may take
/// it as its local port (seen in CI: "Address already in use" from a node). Outgoing connections
/// never use ports below that range, so only another listener could collide there, and the bind
/// check here would have seen it. Falls back to `bind(0)` when the range leaves no room below.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut given = GIVEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if ephemeral_start > 11_000 {
        for _ in 0..1000 {
            let port = rand::random_range(10_000..ephemeral_start);
            if given.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                given.insert(port);
                return l.local_addr();
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}
