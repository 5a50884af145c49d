//! One gateway node: its shared state, its listeners, and the servers on them.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, App, HttpServer};
use parking_lot::RwLock;
use strait_bus::{Bus, InProcessBus};
use strait_schema::AgentName;
use tokio::sync::watch;

use crate::config::{Backends, NodeConfig};
use crate::directory::{Directory, MemoryDirectory};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::session::{AgentSession, Kick};
use crate::store::{SqliteStore, Store};
use crate::{ingress, ops, session};

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
}

/// Agents with a session on this node. The directory says which node holds an agent; this says
/// which actor on this node does.
#[derive(Default)]
pub struct LocalSessions {
    map: RwLock<HashMap<AgentName, SessionRef>>,
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
    }
    /// How many agents are connected here.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }
    /// True when no agent is connected here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every session (for drain and shutdown).
    pub fn all(&self) -> Vec<SessionRef> {
        self.map.read().values().cloned().collect()
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
}

impl NodeState {
    /// Opens the backends the config names.
    pub fn open(cfg: NodeConfig) -> Result<Arc<Self>, Error> {
        let (store, directory, bus): (Arc<dyn Store>, Arc<dyn Directory>, Arc<dyn Bus>) = match &cfg.backends {
            Backends::Embedded { data_dir } => (
                Arc::new(SqliteStore::open(data_dir)?),
                Arc::new(MemoryDirectory::new()),
                Arc::new(InProcessBus::new()),
            ),
            Backends::Cluster { .. } => {
                return Err(Error::Config(
                    "cluster backends (Redis, RabbitMQ, Postgres) are not available in this build yet".into(),
                ))
            }
        };
        let (phase, _) = watch::channel(Phase::Starting);
        Ok(Arc::new(NodeState {
            cfg,
            store,
            directory,
            bus,
            sessions: LocalSessions::default(),
            metrics: Metrics::new(),
            phase,
        }))
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
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

    let d = data.clone();
    let agent_srv = HttpServer::new(move || {
        App::new()
            .app_data(d.clone())
            .route(session::AGENT_PATH, web::get().to(session::accept))
    })
    .workers(cfg.workers)
    .disable_signals()
    .shutdown_timeout(grace)
    .listen(listeners.agent)?
    .run();
    let d = data.clone();
    let http_srv = HttpServer::new(move || App::new().app_data(d.clone()).default_service(web::to(ingress::handle)))
        .workers(cfg.workers)
        .backlog(4096)
        .disable_signals()
        .shutdown_timeout(grace)
        .listen(listeners.http)?
        .run();
    let d = data.clone();
    let ops_srv = HttpServer::new(move || App::new().app_data(d.clone()).configure(ops::routes))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listeners.ops)?
        .run();

    let (agent_h, http_h, ops_h) = (agent_srv.handle(), http_srv.handle(), ops_srv.handle());
    let servers = actix_rt::spawn(async move {
        let _ = futures_util::future::join3(agent_srv, http_srv, ops_srv).await;
    });
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
    poller.abort();
    routes.abort();
    // Stop taking requests, let in-flight ones finish (bounded by the grace), then drop agents.
    http_h.stop(true).await;
    for s in state.sessions.all() {
        s.addr.do_send(Kick {
            reason: "gateway shutting down",
        });
    }
    agent_h.stop(true).await;
    ops_h.stop(false).await;
    let _ = servers.await;
    for a in arbiters {
        a.stop();
        let _ = a.join();
    }
    state.phase.send_replace(Phase::Stopped);
    tracing::info!(node = %cfg.node_id, "stopped");
    Ok(())
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
