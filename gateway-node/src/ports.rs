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
    let ephemeral_start = ephemeral_start();
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

/// The first port the kernel hands to outgoing connections (Linux's default when unreadable).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ephemeral_start = ephemeral_start();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let addr = free_loopback_addr().unwrap();
            assert!(addr.ip().is_loopback());
            assert!(seen.insert(addr.port()), "port {} handed out twice", addr.port());
            if ephemeral_start > 11_000 {
                assert!(
                    (10_000..ephemeral_start).contains(&addr.port()),
                    "{addr} not below {ephemeral_start}"
                );
            }
            // Free when handed out: a child can bind it.
            drop(TcpListener::bind(addr).unwrap());
        }
    }
}
