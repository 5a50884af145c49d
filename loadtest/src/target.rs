//! What load is sent to. A target is either one this tool starts (`--spawn`: the direct backend,
//! a Strait stack, a rathole pair) or one the user already runs, described by the addresses each
//! scenario needs, so the same scenarios measure a direct backend, a single node or a cluster
//! behind a load balancer.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use crate::load::HttpTarget;
use crate::Error;

/// A target this tool starts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawned {
    /// The backend, straight: the baseline every ratio is taken against.
    Direct,
    /// Backend behind a Strait gateway and agent.
    Strait,
    /// Backend behind a rathole server and client (the reference open tunnel).
    Rathole,
    /// A two-node cluster, load sent to the node holding the agent: the bus is skipped.
    StraitSame,
    /// The same cluster, load sent to the other node: every frame crosses the bus.
    StraitCross,
}

impl Spawned {
    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Spawned::Direct => "direct",
            Spawned::Strait => "strait",
            Spawned::Rathole => "rathole",
            Spawned::StraitSame => "strait-same",
            Spawned::StraitCross => "strait-cross",
        }
    }

    /// Every spawned target.
    pub const ALL: [Spawned; 5] = [
        Spawned::Direct,
        Spawned::Strait,
        Spawned::Rathole,
        Spawned::StraitSame,
        Spawned::StraitCross,
    ];

    /// Parses a name from [`Spawned::ALL`].
    pub fn parse(s: &str) -> Result<Self, Error> {
        Spawned::ALL.into_iter().find(|t| t.name() == s.trim()).ok_or_else(|| {
            Error::Config(format!(
                "unknown target {s:?}: use {} (or --target NAME:key=value,.. for your own)",
                Spawned::ALL.map(Spawned::name).join(", ")
            ))
        })
    }

    /// Whether it is a cluster target (needs Redis, RabbitMQ and Postgres).
    pub fn is_cluster(self) -> bool {
        matches!(self, Spawned::StraitSame | Spawned::StraitCross)
    }
}

/// A target the user runs, as `NAME:key=value,key=value`. Keys: `http` (address or
/// `http://host:port`), `host` (Host header; default the address), `tcp` (a TCP address whose
/// far end is a `strait-loadtest backend` TCP port), `pid` (process whose RSS the memory
/// scenarios read), `ws` (agent endpoint URL), `data-dir` (the gateway's embedded store, where
/// agents for the agent scenarios are created), `ops` (ops address serving `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct External {
    /// Report name.
    pub name: String,
    /// HTTP scenarios.
    pub http: Option<HttpTarget>,
    /// TCP scenarios.
    pub tcp: Option<SocketAddr>,
    /// Gateway process, for RSS.
    pub pid: Option<u32>,
    /// Agent endpoint.
    pub ws: Option<String>,
    /// Gateway data dir.
    pub data_dir: Option<PathBuf>,
    /// Ops address.
    pub ops: Option<SocketAddr>,
}

impl External {
    /// Parses the `--target` form described on the type.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Config(format!("--target {spec:?}: {why}"));
        let (name, rest) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected NAME:key=value,...".into()))?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(bad("name must be letters, digits, - _ .".into()));
        }
        // A spawned tunnel's name stands for processes the tool started and reads (their CPU per
        // request, checked by `--check`); `direct` stays free for a user-run baseline.
        if Spawned::ALL.iter().any(|s| *s != Spawned::Direct && s.name() == name) {
            return Err(bad(format!("{name} names a spawned target; pick another name")));
        }
        let mut t = External {
            name: name.to_owned(),
            ..External::default()
        };
        let mut host = None;
        for kv in rest.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            let v = v.trim();
            match k.trim() {
                "http" => {
                    let hostport = v.strip_prefix("http://").unwrap_or(v).trim_end_matches('/');
                    let addr = resolve(hostport).map_err(|e| bad(e.to_string()))?;
                    t.http = Some(HttpTarget {
                        addr,
                        host: hostport.to_owned(),
                    });
                }
                "host" => host = Some(v.to_owned()),
                "tcp" => t.tcp = Some(resolve(v).map_err(|e| bad(e.to_string()))?),
                "pid" => t.pid = Some(v.parse().map_err(|_| bad(format!("pid {v:?} is not a number")))?),
                "ws" => t.ws = Some(v.to_owned()),
                "data-dir" => t.data_dir = Some(PathBuf::from(v)),
                "ops" => t.ops = Some(resolve(v.strip_prefix("http://").unwrap_or(v)).map_err(|e| bad(e.to_string()))?),
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        if let (Some(h), Some(http)) = (host, t.http.as_mut()) {
            http.host = h;
        }
        Ok(t)
    }
}

fn resolve(hostport: &str) -> Result<SocketAddr, Error> {
    hostport
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("{hostport}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("{hostport} resolves to nothing")))
}

/// Something measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Started by this tool.
    Spawned(Spawned),
    /// Run by the user.
    External(External),
}

impl Target {
    /// Its name in reports.
    pub fn name(&self) -> &str {
        match self {
            Target::Spawned(s) => s.name(),
            Target::External(e) => &e.name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_target_parses_every_key() {
        let t = External::parse(
            "edge:http=http://127.0.0.1:8080/,host=demo.localhost,tcp=127.0.0.1:2222,pid=42,ws=ws://127.0.0.1:7070,data-dir=/tmp/d,ops=127.0.0.1:9090",
        )
        .unwrap();
        assert_eq!(t.name, "edge");
        let http = t.http.unwrap();
        assert_eq!(http.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(http.host, "demo.localhost");
        assert_eq!(t.tcp, Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!(t.pid, Some(42));
        assert_eq!(t.ws.as_deref(), Some("ws://127.0.0.1:7070"));
        assert_eq!(t.data_dir, Some(PathBuf::from("/tmp/d")));
        assert_eq!(t.ops, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn external_target_host_defaults_to_the_address() {
        let t = External::parse("direct:http=127.0.0.1:3000").unwrap();
        assert_eq!(t.http.unwrap().host, "127.0.0.1:3000");
    }

    #[test]
    fn external_target_refuses_bad_specs() {
        assert!(External::parse("nocolon").is_err());
        assert!(External::parse(":http=127.0.0.1:1").is_err());
        assert!(External::parse("x:bogus=1").is_err());
        assert!(External::parse("x:pid=abc").is_err());
        assert!(External::parse("x:http").is_err());
        assert!(External::parse("strait:http=127.0.0.1:1").is_err());
        assert!(External::parse("rathole:http=127.0.0.1:1").is_err());
    }

    #[test]
    fn spawned_names_round_trip() {
        for s in Spawned::ALL {
            assert_eq!(Spawned::parse(s.name()).unwrap(), s);
        }
        assert!(Spawned::parse("nginx").is_err());
    }
}
