//! One gateway node: its shared state, its listeners, and the servers on them.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_service::fn_service;
use actix_web::{web, App, HttpServer};
use futures_util::FutureExt;
use parking_lot::RwLock;
use strait_bus::{AmqpBus, Bus, BusConfig, InProcessBus, OffsetStore};
use strait_schema::window::WindowPool;
use strait_schema::AgentName;
use tokio::sync::watch;

use crate::cluster::{BusOut, RemoteStreams};
use crate::config::{Backends, HttpRelay, NodeConfig};
use crate::directory::{Directory, MemoryDirectory, RedisDirectory};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::session::{AgentLink, AgentSession, Drain, Kick, StreamTable};
use crate::store::{PgStore, SqliteStore, Store};
use crate::{carried, cluster, ingress, ops, session};

/// Lifecycle of a node, as `/readyz` and tests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listeners bound, backends opening.
    Starting,
    /// Serving.
    Ready,
    /// Shutdown asked: finishing in-flight work, taking nothing new.
    Draining,
    /// Done.
    Stopped,
}

/// A live agent session on this node.
#[derive(Clone)]
pub struct SessionRef {
    /// Distinguishes successive sessions of the same agent.
    pub session_id: u64,
    /// The session actor.
    pub addr: Addr<AgentSession>,
    /// Presence epoch of this session (frames relayed for an older one are dropped).
    pub epoch: u64,
    /// Its streams: callers on this node open and close theirs here, without a message.
    pub streams: Arc<StreamTable>,
    /// Its socket's writer: callers on this node send their frames straight to it.
    pub link: AgentLink,
    /// The thread it runs on (byte streams to it run there too).
    pub arbiter: actix_rt::ArbiterHandle,
}

/// Agents with a session on this node. The directory says which node holds an agent; this says
/// which actor on this node does.
///
/// A draining session whose agent already reconnected elsewhere is *retired*: new streams go to
/// the new connection, but frames for its in-flight relayed streams still reach it by epoch.
#[derive(Default)]
pub struct LocalSessions {
    map: RwLock<HashMap<AgentName, SessionRef>>,
    retired: RwLock<HashMap<(AgentName, u64), SessionRef>>,
}

impl LocalSessions {
    /// The session for `agent`, if it is connected here.
    pub fn get(&self, agent: &AgentName) -> Option<SessionRef> {
        self.map.read().get(agent).cloned()
    }
    /// Installs a session, returning the one it replaces (which the caller must close).
    pub fn insert(&self, agent: AgentName, s: SessionRef) -> Option<SessionRef> {
        self.map.write().insert(agent, s)
    }
    /// Removes `agent`'s entry only if it is still `session_id` (a newer session stays).
    pub fn remove(&self, agent: &AgentName, session_id: u64) {
        let mut m = self.map.write();
        if m.get(agent).is_some_and(|s| s.session_id == session_id) {
            m.remove(agent);
        }
        drop(m);
        self.retired
            .write()
            .retain(|(a, _), s| !(a == agent && s.session_id == session_id));
    }

    /// Moves a draining session out of the way of new streams, keeping it reachable by epoch.
    pub fn retire(&self, agent: &AgentName, session_id: u64) {
        let mut m = self.map.write();
        if let Some(s) = m.get(agent).filter(|s| s.session_id == session_id).cloned() {
            m.remove(agent);
            self.retired.write().insert((agent.clone(), s.epoch), s);
        }
    }

    /// The session holding `agent` at exactly `epoch`, active or retired.
    pub fn at_epoch(&self, agent: &AgentName, epoch: u64) -> Option<SessionRef> {
        if let Some(s) = self.map.read().get(agent).filter(|s| s.epoch == epoch) {
            return Some(s.clone());
        }
        self.retired.read().get(&(agent.clone(), epoch)).cloned()
    }
    /// How many agents are connected here.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }
    /// True when no agent is connected here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every session, active and retired (for drain and shutdown).
    pub fn all(&self) -> Vec<SessionRef> {
        let mut v: Vec<SessionRef> = self.map.read().values().cloned().collect();
        v.extend(self.retired.read().values().cloned());
        v
    }
}

/// State every actor and handler of a node shares.
pub struct NodeState {
    /// Configuration.
    pub cfg: NodeConfig,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Presence and nonces.
    pub directory: Arc<dyn Directory>,
    /// Cross-node dispatch.
    pub bus: Arc<dyn Bus>,
    /// Sessions on this node.
    pub sessions: LocalSessions,
    /// Metrics.
    pub metrics: Metrics,
    /// Lifecycle.
    pub phase: watch::Sender<Phase>,
    /// Streams opened here on agents held by other nodes.
    pub remote: RemoteStreams,
    /// What the other nodes read on the bus.
    pub peers: crate::cluster::Peers,
    /// Sends envelopes to other nodes.
    pub bus_out: BusOut,
    /// What receive windows of streams opened here may grow by.
    pub windows: Arc<WindowPool>,
    bus_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<strait_schema::BusEnvelope>>>,
}

impl NodeState {
    /// Opens the backends the config names. Cluster connections are made here, once, on the
    /// caller's runtime (the node's main arbiter), so they live as long as the node.
    pub async fn open(cfg: NodeConfig) -> Result<Arc<Self>, Error> {
        let (store, directory, bus): (Arc<dyn Store>, Arc<dyn Directory>, Arc<dyn Bus>) = match &cfg.backends {
            Backends::Embedded { data_dir } => (
                Arc::new(SqliteStore::open(data_dir)?),
                Arc::new(MemoryDirectory::new()),
                Arc::new(InProcessBus::new()),
            ),
            Backends::Cluster { redis, amqp, db } => {
                let directory: Arc<dyn Directory> =
                    Arc::new(RedisDirectory::connect(redis, &format!("{}:", cfg.cluster)).await?);
                let store = Arc::new(PgStore::connect(db).await?);
                let offsets = Arc::new(DirectoryOffsets(directory.clone()));
                let bus_cfg = BusConfig::new(cfg.cluster.clone(), cfg.node_id.clone());
                let bus = Arc::new(AmqpBus::connect(amqp, bus_cfg, offsets).await?);
                (store, directory, bus)
            }
        };
        Ok(Self::with_backends(cfg, store, directory, bus))
    }

    /// A node on the given backends (tests build cluster nodes this way, sharing real ones).
    pub fn with_backends(
        cfg: NodeConfig,
        store: Arc<dyn Store>,
        directory: Arc<dyn Directory>,
        bus: Arc<dyn Bus>,
    ) -> Arc<Self> {
        let (phase, _) = watch::channel(Phase::Starting);
        let (bus_out, bus_rx) = BusOut::new(&cfg.node_id);
        let metrics = Metrics::new();
        metrics.watch_bus(bus.clone());
        let windows = Arc::new(WindowPool::new(cfg.window_pool));
        metrics.watch_windows(windows.clone());
        Arc::new(NodeState {
            cfg,
            store,
            directory,
            bus,
            sessions: LocalSessions::default(),
            metrics,
            phase,
            remote: RemoteStreams::default(),
            peers: crate::cluster::Peers::default(),
            bus_out,
            windows,
            bus_rx: parking_lot::Mutex::new(Some(bus_rx)),
        })
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Bus consumer offsets kept in the directory (Redis): RabbitMQ does not store them for streams.
struct DirectoryOffsets(Arc<dyn Directory>);

#[async_trait::async_trait]
impl OffsetStore for DirectoryOffsets {
    async fn load(&self, stream: &str) -> Result<Option<u64>, strait_bus::Error> {
        self.0
            .load_offset(stream)
            .await
            .map_err(|e| strait_bus::Error::OffsetStore(Box::new(e)))
    }
    async fn store(&self, stream: &str, offset: u64) -> Result<(), strait_bus::Error> {
        self.0
            .store_offset(stream, offset)
            .await
            .map_err(|e| strait_bus::Error::OffsetStore(Box::new(e)))
    }
}

/// A node's bound listeners. The caller binds (`127.0.0.1:0` in tests) so ports are known before
/// anything serves.
pub struct Listeners {
    /// Agent WebSocket endpoint.
    pub agent: TcpListener,
    /// Public HTTP ingress.
    pub http: TcpListener,
    /// Ops endpoints.
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds all three.
    pub fn bind(
        agent: std::net::SocketAddr,
        http: std::net::SocketAddr,
        ops: std::net::SocketAddr,
    ) -> Result<Self, Error> {
        let bind = |a| TcpListener::bind(a).map_err(|e| Error::Config(format!("cannot listen on {a}: {e}")));
        Ok(Listeners {
            agent: bind(agent)?,
            http: bind(http)?,
            ops: bind(ops)?,
        })
    }
}

/// Serves all of one node's listeners until `shutdown` fires, then drains for at most
/// `cfg.drain_grace`. Must run inside an actix `System`.
pub async fn run(listeners: Listeners, state: Arc<NodeState>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let cfg = state.cfg.clone();
    let grace = cfg.drain_grace.as_secs().max(1);
    let data = web::Data::from(state.clone());

    // The agent endpoint and the ingress share one server, so one set of workers: a request
    // whose caller and agent connections landed on the same worker never leaves its thread, and
    // a thread hand-off costs more CPU than the relay itself (docs/benchmarks.md). Agents are
    // served on the raw socket (ws.rs), callers by hyper (ingress.rs).
    let builder = actix_server::Server::build();
    let closing = builder.graceful_shutdown_signal();
    let node = state.clone();
    let ingress_node = state.clone();
    let srv = builder
        .workers(cfg.workers)
        .backlog(4096)
        .disable_signals()
        .shutdown_timeout(grace)
        // The service runs as long as the agent's connection, so a graceful stop waits for it.
        .listen("agents", listeners.agent, move || {
            let node = node.clone();
            fn_service(move |io: actix_rt::net::TcpStream| {
                session::accept(io, node.clone()).map(Ok::<_, std::convert::Infallible>)
            })
        })?
        .listen("ingress", listeners.http, move || {
            let (node, closing) = (ingress_node.clone(), closing.clone());
            fn_service(move |io: actix_rt::net::TcpStream| {
                let (node, closing) = (node.clone(), closing.clone());
                async move {
                    match node.cfg.http_relay {
                        HttpRelay::Request => ingress::serve(io, node, closing).await,
                        HttpRelay::Connection => carried::serve(io, node, closing).await,
                    }
                    Ok::<_, std::convert::Infallible>(())
                }
            })
        })?
        .run();
    let d = data.clone();
    let ops_srv = HttpServer::new(move || App::new().app_data(d.clone()).configure(ops::routes))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listeners.ops)?
        .run();

    let (srv_h, ops_h) = (srv.handle(), ops_srv.handle());
    let servers = actix_rt::spawn(async move {
        let _ = futures_util::future::join(srv, ops_srv).await;
    });
    let inbox = state.bus.subscribe(&cfg.node_id).await?;
    let bridge = actix_rt::spawn(cluster::bridge(state.clone(), inbox));
    let pump = match state.bus_rx.lock().take() {
        Some(rx) => actix_rt::spawn(BusOut::pump(state.bus.clone(), rx, state.clone())),
        None => return Err(Error::Config("a node's state can run only once".into())),
    };
    let liveness = actix_rt::spawn(node_liveness(state.clone()));
    let poller = actix_rt::spawn(poll_revocations(state.clone()));
    let arbiters: Vec<actix_rt::Arbiter> = (0..cfg.workers).map(|_| actix_rt::Arbiter::new()).collect();
    let routes = actix_rt::spawn(crate::tcp::run_routes(
        state.clone(),
        arbiters.iter().map(|a| a.handle()).collect(),
    ));
    state.phase.send_replace(Phase::Ready);
    tracing::info!(node = %cfg.node_id, "node ready");

    shutdown.await;
    tracing::info!(node = %cfg.node_id, "draining");
    state.phase.send_replace(Phase::Draining);
    let keep_serving_until = tokio::time::Instant::now() + cfg.drain_delay;
    // Ask every agent to move; wait (bounded) until they have reconnected elsewhere, while this
    // node keeps serving: its ingress reaches them wherever they land.
    if !cfg.handoff.is_zero() {
        for s in state.sessions.all() {
            s.addr.do_send(Drain);
        }
        let deadline = tokio::time::Instant::now() + cfg.handoff;
        while !state.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    poller.abort();
    routes.abort();
    // Stop taking connections (both listeners close now: agents were already asked to move and
    // a draining node refuses new ones), let in-flight requests finish (bounded by the grace),
    // then drop agents. Ingress stays open until load balancers have seen /readyz fail.
    tokio::time::sleep_until(keep_serving_until).await;
    let stopped = srv_h.stop(true);
    // Every session finishes its in-flight streams (this node's callers' and those relayed for
    // callers on other nodes) before its agent is dropped; one that handed its agent over closes
    // itself once they are done. The drain grace bounds the wait.
    let deadline = tokio::time::Instant::now() + cfg.drain_grace;
    while state.sessions.all().iter().any(|s| s.streams.open_count() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in state.sessions.all() {
        s.addr.do_send(Kick {
            reason: "gateway shutting down",
        });
    }
    stopped.await;
    ops_h.stop(false).await;
    let _ = servers.await;
    for a in arbiters {
        a.stop();
        let _ = a.join();
    }
    // Only now is this node gone for the others: until here it still relayed streams for them.
    liveness.abort();
    let _ = state.directory.node_gone(&cfg.node_id).await;
    bridge.abort();
    pump.abort();
    state.phase.send_replace(Phase::Stopped);
    tracing::info!(node = %cfg.node_id, "stopped");
    Ok(())
}

/// Keeps this node's liveness key fresh, and resets streams whose agent sat on a node that
/// stopped heartbeating (SIGKILL, partition): their callers get an answer, not a hang.
async fn node_liveness(state: Arc<NodeState>) {
    let hb = state.cfg.heartbeat;
    let ttl = hb * state.cfg.missed_heartbeats;
    let mut tick = tokio::time::interval(hb);
    loop {
        tick.tick().await;
        if let Err(e) = state
            .directory
            .node_heartbeat(&state.cfg.node_id, &state.cfg.bus_features, ttl)
            .await
        {
            tracing::warn!(error = %e, "node heartbeat failed");
        }
        state.peers.refresh(&*state.directory).await;
        for node in state.remote.nodes() {
            if let Ok(false) = state.directory.node_alive(&node).await {
                let n = state.remote.fail_node(&node, &format!("node {node} is gone"));
                tracing::warn!(%node, streams = n, "node stopped heartbeating; reset its streams");
            }
        }
    }
}

/// Drops connected agents once they are revoked, whichever process revoked them (the CLI writes
/// the store directly).
async fn poll_revocations(state: Arc<NodeState>) {
    let mut since = crate::store::now_ms();
    let mut tick = tokio::time::interval(state.cfg.revocation_poll.max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        match state.store.revoked_since(since).await {
            Ok(revoked) => {
                for (agent, at) in revoked {
                    since = since.max(at + 1);
                    if let Some(s) = state.sessions.get(&agent) {
                        tracing::info!(%agent, "agent revoked; dropping its session");
                        s.addr.do_send(Kick {
                            reason: "agent revoked",
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "revocation poll failed"),
        }
    }
}
