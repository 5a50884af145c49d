//! Cluster targets (`strait-same`, `strait-cross`): two gateway nodes of a fresh cluster on the
//! machine's Redis, RabbitMQ and Postgres, one agent on node B. Load sent to B's ingress reaches
//! the agent directly; load sent to A's ingress crosses the bus for every frame. Comparing the two
//! in one run gives what crossing nodes costs, and [`CostProbe`] reads what it costs per frame.
//!
//! Each stack gets its own cluster name (the Redis key prefix and the stream names) and database,
//! all removed when its [`ClusterRun`] is dropped, so a failed or interrupted run leaves the shared
//! services as it found them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use strait_gateway::directory::RedisDirectory;
use strait_gateway::store::postgres::testing::TempDatabase;
use strait_schema::AgentName;
use tokio::time::Instant;

use crate::cpu::{cpu_ticks, TICKS_PER_SEC};
use crate::load::{HttpTarget, Window};
use crate::spawn::{self, Backing, Bins, Gateway, Proc, StoreAt};
use crate::Error;

/// The shared services a cluster runs on. Defaults: this machine's, on their standard ports.
#[derive(Debug, Clone)]
pub struct Services {
    /// Redis URL (directory: presence, pins, bus offsets).
    pub redis: String,
    /// AMQP URL of RabbitMQ (the bus, one stream per node).
    pub amqp: String,
    /// Postgres URL of a user allowed to `CREATE DATABASE` (each stack gets a fresh database).
    pub pg_admin: String,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            redis: "redis://127.0.0.1:6379/".into(),
            amqp: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            pg_admin: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        }
    }
}

impl Services {
    /// Why the cluster targets cannot run here (a service not listening), so such a machine
    /// reports "unavailable" instead of failing half-way through start-up.
    pub async fn missing(&self) -> Option<String> {
        for (what, url, port) in [
            ("Redis", &self.redis, 6379),
            ("RabbitMQ", &self.amqp, 5672),
            ("Postgres", &self.pg_admin, 5432),
        ] {
            let Some(addr) = host_port(url, port) else {
                return Some(format!("cannot read host:port of the {what} URL"));
            };
            let reachable = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .is_ok_and(|c| c.is_ok());
            if !reachable {
                return Some(format!(
                    "cluster targets need {what} at {addr} (see --redis-url, --amqp-url, --pg-admin-url)"
                ));
            }
        }
        None
    }
}

/// `host:port` of a service URL (credentials, path and query dropped), resolved.
fn host_port(url: &str, default_port: u16) -> Option<SocketAddr> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// One stack's share of the services: a cluster name (Redis key prefix, stream names) and a fresh
/// database. Dropping it deletes the keys, the nodes' streams and the database.
#[derive(Debug)]
pub struct ClusterRun {
    /// Cluster name, `strait-lt-<hex>`.
    pub name: String,
    /// Where the services are.
    pub services: Services,
    /// The fresh database.
    pub db_url: String,
    /// Nodes whose dispatch streams are removed at the end.
    pub node_ids: Vec<String>,
    db: Option<TempDatabase>,
}

impl ClusterRun {
    /// Creates the database; keys and streams appear as the nodes start.
    pub async fn create(services: &Services, node_ids: &[&str]) -> Result<ClusterRun, Error> {
        if let Some(why) = services.missing().await {
            return Err(Error::Spawn(why));
        }
        let db = TempDatabase::create(&services.pg_admin).await;
        Ok(ClusterRun {
            name: format!("strait-lt-{:08x}", rand::random::<u32>()),
            services: services.clone(),
            db_url: db.url.clone(),
            node_ids: node_ids.iter().map(|n| (*n).to_owned()).collect(),
            db: Some(db),
        })
    }
}

impl Drop for ClusterRun {
    /// Runs on every exit path (a measurement done, failed, or dropped by ctrl-c), on a thread of
    /// its own: the removal is async and `drop` may run inside the tool's runtime.
    fn drop(&mut self) {
        let (name, services, nodes, db) = (
            self.name.clone(),
            self.services.clone(),
            std::mem::take(&mut self.node_ids),
            self.db.take(),
        );
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting a runtime: {e}"))?;
            rt.block_on(remove_shared(&name, &services, &nodes, db))
        });
        let outcome = cleanup
            .join()
            .unwrap_or_else(|_| Err("dropping the database panicked".into()));
        if let Err(e) = outcome {
            eprintln!(
                "warning: cluster {} not fully removed ({e}); remove its Redis keys `{}:*`, \
                 queues `{}.dispatch.*` and database by hand",
                self.name, self.name, self.name
            );
        }
    }
}

/// Deletes a cluster's Redis keys, dispatch streams and database; the nodes must be gone.
async fn remove_shared(name: &str, s: &Services, nodes: &[String], db: Option<TempDatabase>) -> Result<(), String> {
    let mut problems = Vec::new();
    match RedisDirectory::connect(&s.redis, &format!("{name}:")).await {
        Ok(dir) => {
            if let Err(e) = dir.delete_all_keys().await {
                problems.push(format!("Redis: {e}"));
            }
        }
        Err(e) => problems.push(format!("Redis: {e}")),
    }
    for n in nodes {
        let stream = strait_bus::BusConfig::new(name, n.as_str()).stream_name(n);
        if let Err(e) = strait_bus::delete_stream(&s.amqp, &stream).await {
            problems.push(format!("stream {stream}: {e}"));
        }
    }
    if let Some(db) = db {
        db.drop_now().await;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Node A (index 0) and node B (index 1, which holds the agent).
pub const NODES: [&str; 2] = ["node-a", "node-b"];

/// Two nodes of a fresh cluster, one agent (`bench`) on node B exposing the backend's HTTP server
/// and its TCP server as `bulk`, and a TCP route pinned to each node.
///
/// Fields drop in declaration order: the processes die before [`ClusterRun`] removes their state.
pub struct ClusterStack {
    /// `[A, B]`.
    pub nodes: Vec<Gateway>,
    /// The agent process, connected to B only.
    pub agent: Proc,
    /// TCP route served by each node (A's crosses the bus), or why there is none.
    pub routes: Vec<Result<SocketAddr, String>>,
    agent_name: AgentName,
    /// Held for its `Drop`, last, so it removes the cluster's state after the processes died.
    _run: ClusterRun,
}

impl ClusterStack {
    /// Starts it in `dir` and waits until HTTP and a TCP echo make it through both nodes.
    pub async fn start(
        bins: &Bins,
        services: &Services,
        dir: &Path,
        backend_http: SocketAddr,
        backend_tcp: SocketAddr,
        max_streams: u32,
    ) -> Result<ClusterStack, Error> {
        let run = ClusterRun::create(services, &NODES).await?;
        let store = StoreAt::Database(run.db_url.clone());
        // The binary runs the store's migrations here, before any node opens it.
        let token = spawn::add_agent(&bins.gateway, &store, "bench").await?;
        let mut routes = Vec::new();
        for node in NODES {
            let listen = spawn::free_addr()?;
            let added = spawn::add_route(&bins.gateway, &store, listen, &token.agent, "bulk", Some(node)).await?;
            routes.push(added.map(|()| listen));
        }
        let mut nodes = Vec::new();
        for node_id in NODES {
            let backing = Backing::Cluster { node_id, run: &run };
            nodes.push(Gateway::start(bins, backing, dir, node_id, max_streams).await?);
        }
        let agent = spawn::start_agent(
            bins,
            &nodes[1],
            &token,
            &[format!("http://{backend_http}"), format!("bulk=tcp://{backend_tcp}")],
            dir,
            "agent",
        )?;
        let mut stack = ClusterStack {
            nodes,
            agent,
            routes,
            agent_name: token.agent.clone(),
            _run: run,
        };
        for i in 0..NODES.len() {
            if let Err(e) = crate::load::wait_http(&stack.ingress(i), Duration::from_secs(30)).await {
                let e = stack.agent.explain(e);
                return Err(stack.nodes[i].proc.explain(e));
            }
            if let Ok(route) = stack.routes[i] {
                if let Err(e) = crate::load::wait_tcp(route, Duration::from_secs(30)).await {
                    let e = stack.agent.explain(e);
                    return Err(stack.nodes[i].proc.explain(e));
                }
            }
        }
        Ok(stack)
    }

    /// HTTP ingress of node `i` for the agent.
    pub fn ingress(&self, i: usize) -> HttpTarget {
        HttpTarget {
            addr: self.nodes[i].http,
            host: format!("{}.localhost", self.agent_name),
        }
    }

    /// Reads the costs of both nodes, and of the services when they run on this machine.
    pub fn probe(&self) -> CostProbe {
        CostProbe {
            nodes: self.nodes.iter().map(|n| n.ops).collect(),
            services: ["beam.smp", "redis-server"].into_iter().filter_map(pid_of).collect(),
        }
    }
}

/// Reads what a measurement cost a cluster: the CPU time of its nodes (and of RabbitMQ's and
/// Redis's processes, when they run here) and the envelopes that crossed the bus.
#[derive(Debug, Clone)]
pub struct CostProbe {
    /// Each node's ops address. (The nodes' CPU is read with every other process's:
    /// [`crate::cpu::CpuProbe`].)
    nodes: Vec<SocketAddr>,
    /// Pids of the local RabbitMQ and Redis servers (CPU only; they serve others too).
    services: Vec<u32>,
}

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    service_ticks: Option<u64>,
    published: f64,
    received: f64,
    batches: f64,
}

impl CostProbe {
    async fn read(&self) -> Result<Reading, Error> {
        let mut r = Reading {
            at: Instant::now(),
            service_ticks: None,
            published: 0.0,
            received: 0.0,
            batches: 0.0,
        };
        for &ops in &self.nodes {
            let (status, text) = spawn::http_get(ops, "/metrics").await?;
            if status != 200 {
                return Err(Error::Http(format!("/metrics answered {status}")));
            }
            // A counter never incremented has no series yet: zero.
            r.published +=
                spawn::parse_metric(&text, r#"strait_bus_envelopes_total{event="published"}"#).unwrap_or(0.0);
            r.received += spawn::parse_metric(&text, r#"strait_bus_envelopes_total{event="received"}"#).unwrap_or(0.0);
            r.batches +=
                spawn::parse_metric(&text, r#"strait_bus_transport_total{event="batches_published"}"#).unwrap_or(0.0);
        }
        if !self.services.is_empty() {
            r.service_ticks = self.services.iter().map(|&p| cpu_ticks(p)).sum();
        }
        Ok(r)
    }

    /// The cost of `work` (a measurement without warm-up), whatever it returns.
    pub async fn around<F: std::future::Future>(&self, work: F) -> (F::Output, Result<Cost, Error>) {
        let before = self.read().await;
        let out = work.await;
        let cost = match before {
            Ok(b) => self.read().await.map(|a| Cost::between(&b, &a)),
            Err(e) => Err(e),
        };
        (out, cost)
    }

    /// The cost of a measurement's `window` (warm-up excluded), read while the load runs.
    pub async fn during(&self, window: Window) -> Result<Cost, Error> {
        tokio::time::sleep_until(window.measure_from).await;
        let before = self.read().await?;
        tokio::time::sleep_until(window.end).await;
        let after = self.read().await?;
        Ok(Cost::between(&before, &after))
    }
}

/// What one measurement cost a cluster target, over the measurement's window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// Length of the window the counters were read over, s.
    pub secs: f64,
    /// CPU time of both nodes (user + system), ms.
    pub node_cpu_ms: f64,
    /// CPU time of the local RabbitMQ and Redis servers, ms (`None` when they do not run here).
    pub services_cpu_ms: Option<f64>,
    /// Envelopes published to the bus, both nodes.
    pub bus_published: f64,
    /// Envelopes received from the bus, both nodes.
    pub bus_received: f64,
    /// AMQP messages (batches of envelopes) published, both nodes: what the broker's CPU follows.
    pub bus_batches: f64,
    /// Work done in the window: requests, or MiB moved (see `work_unit`).
    pub work: f64,
    /// `request` or `MiB`.
    pub work_unit: &'static str,
}

impl Cost {
    fn between(b: &Reading, a: &Reading) -> Cost {
        let ms = |ticks: u64| ticks as f64 * 1000.0 / TICKS_PER_SEC;
        Cost {
            secs: a.at.duration_since(b.at).as_secs_f64(),
            node_cpu_ms: 0.0,
            services_cpu_ms: match (b.service_ticks, a.service_ticks) {
                (Some(b), Some(a)) => Some(ms(a.saturating_sub(b))),
                _ => None,
            },
            bus_published: (a.published - b.published).max(0.0),
            bus_received: (a.received - b.received).max(0.0),
            bus_batches: (a.batches - b.batches).max(0.0),
            work: 0.0,
            work_unit: "",
        }
    }

    /// Sets the work the window did, so costs compare per request or per MiB, and what the nodes
    /// spent over it (read with every other process's CPU, [`crate::cpu::CpuUse::server_ms`]).
    pub fn with_work(self, work: f64, unit: &'static str, node_cpu_ms: f64) -> Cost {
        Cost {
            work,
            work_unit: unit,
            node_cpu_ms,
            ..self
        }
    }
}

/// What crossing nodes adds: a `strait-cross` row against the `strait-same` row of the same
/// scenario, case and round (medians over rounds after merging).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CrossNode {
    /// Cross-node figure over same-node figure.
    pub vs_same: Option<f64>,
    /// Same-node p50, µs (to show next to the added figure).
    pub same_p50_us: Option<f64>,
    /// p50 cross − p50 same, µs.
    pub added_p50_us: Option<f64>,
    /// p99 cross − p99 same, µs.
    pub added_p99_us: Option<f64>,
    /// Envelopes published to the bus during the cross-node window.
    pub bus_frames: Option<f64>,
    /// Envelopes per unit of work (per request, per MiB).
    pub frames_per_unit: Option<f64>,
    /// Envelopes per AMQP message: how well the publisher batched under this load.
    pub frames_per_batch: Option<f64>,
    /// Extra node CPU per bus envelope, µs: (CPU per unit across − CPU per unit same) / envelopes
    /// per unit. Per unit, because the two runs do different amounts of work in their windows.
    pub node_cpu_us_per_frame: Option<f64>,
    /// The same for the local RabbitMQ and Redis servers.
    pub services_cpu_us_per_frame: Option<f64>,
}

impl CrossNode {
    /// Compares a cross-node row's figure, latency and cost with the same-node row's.
    pub fn compare(
        cross: (f64, Option<(u64, u64)>, Option<&Cost>),
        same: (f64, Option<(u64, u64)>, Option<&Cost>),
    ) -> CrossNode {
        let (cv, cl, cc) = cross;
        let (sv, sl, sc) = same;
        let mut x = CrossNode {
            vs_same: crate::stats::ratio(cv, sv),
            ..CrossNode::default()
        };
        if let (Some((c50, c99)), Some((s50, s99))) = (cl, sl) {
            x.same_p50_us = Some(s50 as f64);
            x.added_p50_us = Some(c50 as f64 - s50 as f64);
            x.added_p99_us = Some(c99 as f64 - s99 as f64);
        }
        if let Some(c) = cc {
            x.bus_frames = Some(c.bus_published);
            if c.work > 0.0 {
                x.frames_per_unit = Some(c.bus_published / c.work);
            }
            if c.bus_batches > 0.0 {
                x.frames_per_batch = Some(c.bus_published / c.bus_batches);
            }
        }
        if let (Some(c), Some(s)) = (cc, sc) {
            let per_frame = |cross_ms: f64, same_ms: f64| {
                if c.work <= 0.0 || s.work <= 0.0 || c.bus_published <= 0.0 {
                    return None;
                }
                let extra_us_per_unit = (cross_ms / c.work - same_ms / s.work) * 1000.0;
                Some(extra_us_per_unit / (c.bus_published / c.work))
            };
            x.node_cpu_us_per_frame = per_frame(c.node_cpu_ms, s.node_cpu_ms);
            if let (Some(cs), Some(ss)) = (c.services_cpu_ms, s.services_cpu_ms) {
                x.services_cpu_us_per_frame = per_frame(cs, ss);
            }
        }
        x
    }

    /// Field-wise median over rounds.
    pub fn median(rounds: &[CrossNode]) -> CrossNode {
        let m = |f: fn(&CrossNode) -> Option<f64>| {
            let v: Vec<f64> = rounds.iter().filter_map(f).collect();
            crate::stats::median(&v)
        };
        CrossNode {
            vs_same: m(|x| x.vs_same),
            same_p50_us: m(|x| x.same_p50_us),
            added_p50_us: m(|x| x.added_p50_us),
            added_p99_us: m(|x| x.added_p99_us),
            bus_frames: m(|x| x.bus_frames),
            frames_per_unit: m(|x| x.frames_per_unit),
            frames_per_batch: m(|x| x.frames_per_batch),
            node_cpu_us_per_frame: m(|x| x.node_cpu_us_per_frame),
            services_cpu_us_per_frame: m(|x| x.services_cpu_us_per_frame),
        }
    }
}

/// The pid of the first process whose command name is `comm`.
fn pid_of(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (name.trim() == comm).then_some(pid)
    })
}

/// A one-second window's cost for unit tests (here and in the report's): the servers used half
/// the nodes' CPU and the publisher put four envelopes in each batch.
#[cfg(test)]
pub(crate) fn test_cost(node_cpu_ms: f64, published: f64, work: f64) -> Cost {
    Cost {
        secs: 1.0,
        node_cpu_ms,
        services_cpu_ms: Some(node_cpu_ms / 2.0),
        bus_published: published,
        bus_received: published,
        bus_batches: published / 4.0,
        work,
        work_unit: "request",
    }
}

#[cfg(test)]
mod tests {
    use super::test_cost as cost;
    use super::*;

    #[test]
    fn host_port_drops_credentials_and_fills_the_port() {
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f", 1),
            Some("127.0.0.1:5672".parse().unwrap())
        );
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1/postgres", 5432),
            Some("127.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(host_port("no-scheme", 1), None);
    }

    #[test]
    fn cost_per_frame_compares_per_unit_of_work() {
        // Same node: 1,000 ms for 10,000 requests (100 µs each), no bus.
        // Across: 900 ms for 6,000 requests (150 µs each), 4 envelopes per request.
        let same = cost(1_000.0, 0.0, 10_000.0);
        let cross = cost(900.0, 24_000.0, 6_000.0);
        let x = CrossNode::compare(
            (6_000.0, Some((3_000, 9_000)), Some(&cross)),
            (10_000.0, Some((2_000, 5_000)), Some(&same)),
        );
        assert_eq!(x.vs_same, Some(0.6));
        assert_eq!(x.added_p50_us, Some(1_000.0));
        assert_eq!(x.added_p99_us, Some(4_000.0));
        assert_eq!(x.frames_per_unit, Some(4.0));
        assert_eq!(x.frames_per_batch, Some(4.0));
        let per = x.node_cpu_us_per_frame.unwrap();
        assert!((per - 12.5).abs() < 1e-9, "{per}");
        let services = x.services_cpu_us_per_frame.unwrap();
        assert!((services - 6.25).abs() < 1e-9, "{services}");
    }

    #[test]
    fn no_bus_frames_no_cost_per_frame() {
        let same = cost(1_000.0, 0.0, 10.0);
        let x = CrossNode::compare((1.0, None, Some(&same)), (1.0, None, Some(&same)));
        assert_eq!(x.node_cpu_us_per_frame, None);
        assert_eq!(x.added_p50_us, None);
    }
}
