//! Cross-node paths. A caller on node A reaching an agent held by node B: A registers the stream
//! in its [`RemoteStreams`] and sends the agent's frames to B over the bus; B's [`bridge`] hands
//! them to the agent's session, which relays the agent's answers back to A the same way. When
//! the agent is on the same node none of this runs: the fast path is a direct actor message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use strait_bus::Bus;
use strait_schema::{AgentName, BusEnvelope, ErrorCode, Frame, Reset, StreamId};
use tokio::sync::mpsc;

use crate::directory::Directory;
use crate::node::{NodeState, SessionRef};
use crate::session::{
    to_local_caller, AgentLink, BodyEvent, FromCaller, OpenStream, StreamCloser, StreamEvent, StreamGrant, StreamOwner,
};
use crate::telemetry;

/// A caller's HTTP connection carried as bytes: `StreamOpen { http: true }` and what follows it.
pub const FEATURE_HTTP: &str = "http";
/// An agent's `Drain`, relayed to the caller's node.
pub const FEATURE_DRAIN: &str = "drain";
/// What this build reads from its peers beyond the frames every build reads. Each node lists
/// them next to its liveness key, and a sender uses one only with a peer that lists it, so a
/// rolling upgrade can run old and new builds side by side.
pub const FEATURES: &[&str] = &[FEATURE_HTTP, FEATURE_DRAIN];

/// The features other nodes listed, as this node last read them: on first contact, then every
/// heartbeat. Read without waiting, so actors can ask.
#[derive(Default)]
pub struct Peers {
    listed: parking_lot::RwLock<HashMap<String, Vec<String>>>,
    /// Peers whose first read runs in the background ([`learn_soon`]).
    asked: Mutex<HashSet<String>>,
}

impl Peers {
    /// Whether `peer` listed `feature` when last read. A peer not read yet lists nothing, so it
    /// gets the older form until its list is in.
    pub fn lists(&self, peer: &str, feature: &str) -> bool {
        self.listed
            .read()
            .get(peer)
            .is_some_and(|l| l.iter().any(|f| f == feature))
    }

    fn known(&self, peer: &str) -> bool {
        self.listed.read().contains_key(peer)
    }

    /// Reads `peer`'s list unless it is known. Callers that meet a new peer together each read
    /// it (once per peer), rather than the later ones taking the older form meanwhile.
    pub async fn learn(&self, directory: &dyn Directory, peer: &str) {
        if !self.known(peer) {
            self.read(directory, peer).await;
        }
    }

    /// Reads every known peer's list again: a peer restarted with another build lists anew, and
    /// one that stopped is forgotten.
    pub async fn refresh(&self, directory: &dyn Directory) {
        let peers: Vec<String> = self.listed.read().keys().cloned().collect();
        for peer in peers {
            self.read(directory, &peer).await;
        }
    }

    async fn read(&self, directory: &dyn Directory, peer: &str) {
        match directory.node_features(peer).await {
            Ok(Some(list)) => {
                // Once per peer and per change: during a rolling upgrade this says which nodes
                // get the older forms, and why.
                if self.listed.read().get(peer) != Some(&list) {
                    let lacks: Vec<&str> = FEATURES
                        .iter()
                        .copied()
                        .filter(|f| !list.iter().any(|l| l == f))
                        .collect();
                    tracing::info!(%peer, reads = ?list, ?lacks, "a peer's bus features");
                }
                self.listed.write().insert(peer.to_owned(), list);
            }
            Ok(None) => {
                self.listed.write().remove(peer);
            }
            // What was read before stands; a peer never read is read on its next contact.
            Err(e) => tracing::debug!(%peer, error = %e, "cannot read a peer's features"),
        }
    }
}

/// Starts reading `peer`'s list in the background unless it is known or being read: for paths
/// that must not wait on the directory (the bridge).
fn learn_soon(node: &Arc<NodeState>, peer: &str) {
    if node.peers.known(peer) || !node.peers.asked.lock().insert(peer.to_owned()) {
        return;
    }
    let (node, peer) = (node.clone(), peer.to_owned());
    actix_rt::spawn(async move {
        node.peers.learn(&*node.directory, &peer).await;
        node.peers.asked.lock().remove(&peer);
    });
}

/// Whether the node holding `target` reads `feature` (this node reads all of its own). A
/// remote peer not read yet is read now.
pub async fn target_reads(node: &NodeState, target: &Target, feature: &str) -> bool {
    match target {
        Target::Local(_) => true,
        Target::Remote { node: peer, .. } => {
            node.peers.learn(&*node.directory, peer).await;
            node.peers.lists(peer, feature)
        }
    }
}

/// Hands envelopes to the bus in order, without making senders wait: one pump task per node.
#[derive(Clone)]
pub struct BusOut {
    node_id: Arc<str>,
    tx: mpsc::UnboundedSender<BusEnvelope>,
}

impl BusOut {
    /// A sender and the receiver its pump drains (see [`BusOut::pump`]).
    pub fn new(node_id: &str) -> (Self, mpsc::UnboundedReceiver<BusEnvelope>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            BusOut {
                node_id: node_id.into(),
                tx,
            },
            rx,
        )
    }

    /// Publishes every queued envelope, in order. Memory behind it is bounded by flow control, like
    /// an agent link's.
    pub async fn pump(bus: Arc<dyn Bus>, mut rx: mpsc::UnboundedReceiver<BusEnvelope>, node: Arc<NodeState>) {
        while let Some(env) = rx.recv().await {
            let to = env.to_node.clone();
            match bus.publish(env).await {
                Ok(()) => node.metrics.bus.with_label_values(&["published"]).inc(),
                Err(e) => {
                    tracing::warn!(to = %to, error = %e, "bus publish failed");
                    node.metrics.bus.with_label_values(&["publish_failed"]).inc();
                }
            }
        }
    }

    /// Queues `frame` for `agent` (at fencing `epoch`) on node `to`. False if the pump is gone.
    ///
    /// A frame that opens a stream carries the current span's `traceparent`, so the agent's node
    /// joins the caller's trace; `Data`/`Credit` and the rest never format one.
    pub fn send(&self, to: &str, agent: &AgentName, epoch: u64, frame: Frame) -> bool {
        let trace_parent = if frame.opens_stream() {
            telemetry::current_traceparent()
        } else {
            String::new()
        };
        self.tx
            .send(BusEnvelope {
                from_node: self.node_id.to_string(),
                to_node: to.to_owned(),
                seq: 0, // assigned by the bus, per (sender, destination)
                trace_parent,
                agent: agent.clone(),
                epoch,
                frame,
            })
            .is_ok()
    }
}

/// A stream this node opened for a caller, on an agent held by another node.
struct RemoteEntry {
    ctl: StreamOwner,
    body: mpsc::UnboundedSender<BodyEvent>,
    node: String,
}

/// Caller-side table of streams whose agent is on another node.
#[derive(Default)]
pub struct RemoteStreams {
    map: Mutex<HashMap<StreamId, RemoteEntry>>,
}

impl RemoteStreams {
    /// Forgets a stream (its owner is done with it).
    pub fn remove(&self, id: StreamId) {
        self.map.lock().remove(&id);
    }

    /// Nodes that carry at least one of our streams (for liveness checks).
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.lock().values().map(|e| e.node.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Resets every stream carried by `node` (it died): callers are answered at once.
    pub fn fail_node(&self, node: &str, why: &str) -> usize {
        let gone: Vec<RemoteEntry> = {
            let mut m = self.map.lock();
            let ids: Vec<StreamId> = m.iter().filter(|(_, e)| e.node == node).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| m.remove(&id)).collect()
        };
        for e in &gone {
            let _ = e.body.send(BodyEvent::Reset(ErrorCode::AgentUnavailable, why.into()));
            let _ = e
                .ctl
                .deliver(StreamEvent::Reset(ErrorCode::AgentUnavailable, why.into()));
        }
        gone.len()
    }

    fn contains(&self, id: StreamId) -> bool {
        self.map.lock().contains_key(&id)
    }

    /// Delivers a frame the agent sent (relayed by its node) to the stream's owner here.
    fn deliver(&self, node: &NodeState, frame: Frame) {
        let Some(id) = frame.stream() else { return };
        let mut m = self.map.lock();
        if matches!(frame, Frame::Reset(_)) {
            if let Some(e) = m.remove(&id) {
                to_local_caller(&e.ctl, &e.body, frame);
            }
            return;
        }
        let Some(e) = m.get(&id) else { return };
        let body_bytes = match &frame {
            Frame::Data(d) => d.bytes.len(),
            Frame::ResponseHead(h) => h.body.len(),
            _ => 0,
        };
        if body_bytes > 0 {
            node.metrics.bytes_out.inc_by(body_bytes as u64);
        }
        to_local_caller(&e.ctl, &e.body, frame);
    }
}

/// Where an agent can be reached from here.
pub enum Target {
    /// Connected to this node.
    Local(SessionRef),
    /// Connected to another node, at this fencing epoch.
    Remote {
        /// The node holding it.
        node: String,
        /// Its presence epoch.
        epoch: u64,
    },
}

/// Finds the agent: this node first, then the directory, whose cached answer is as fresh as a
/// read (it is dropped when the agent's presence is claimed or released anywhere).
pub async fn locate(node: &NodeState, agent: &AgentName) -> Result<Target, (ErrorCode, String)> {
    if let Some(s) = node.sessions.get(agent) {
        return Ok(Target::Local(s));
    }
    match node.directory.presence_cached(agent).await {
        Ok((Some(p), cached)) if p.node_id != node.cfg.node_id => {
            if cached {
                node.metrics.presence_from_cache.inc();
            } else {
                node.metrics.presence_from_directory.inc();
            }
            Ok(Target::Remote {
                node: p.node_id,
                epoch: p.epoch,
            })
        }
        Ok(_) => Err((ErrorCode::AgentUnavailable, format!("agent {agent} is not connected"))),
        Err(e) => {
            tracing::warn!(error = %e, "directory lookup failed");
            Err((ErrorCode::AgentUnavailable, "cannot locate the agent right now".into()))
        }
    }
}

/// Registers a new stream with wherever the agent is and returns the way to send it frames.
pub async fn open_stream(
    node: &Arc<NodeState>,
    target: &Target,
    agent: &AgentName,
    open: OpenStream,
) -> Result<StreamGrant, (ErrorCode, String)> {
    match target {
        Target::Local(s) => s.streams.open(open, &s.link, node.cfg.limits, &node.windows),
        Target::Remote { node: to, epoch } => {
            node.remote.map.lock().insert(
                open.id,
                RemoteEntry {
                    ctl: open.ctl,
                    body: open.body,
                    node: to.clone(),
                },
            );
            Ok(StreamGrant {
                link: AgentLink::remote(node.bus_out.clone(), to, agent, *epoch),
                limits: node.cfg.limits,
                granted: Arc::new(std::sync::atomic::AtomicU64::new(u64::from(
                    node.cfg.limits.stream_window,
                ))),
                closer: StreamCloser::Remote(node.clone()),
                windows: node.windows.clone(),
            })
        }
    }
}

/// Consumes this node's dispatch channel: frames for agents held here go to their session, frames
/// for streams opened here go to their owner. Anything else (a stale epoch, an agent that left)
/// is answered with a `Reset` so the other side never waits.
pub async fn bridge(node: Arc<NodeState>, mut rx: mpsc::UnboundedReceiver<BusEnvelope>) {
    while let Some(env) = rx.recv().await {
        node.metrics.bus.with_label_values(&["received"]).inc();
        let Some(id) = env.frame.stream() else {
            node.metrics
                .bus
                .with_label_values(&["dropped_not_a_stream_frame"])
                .inc();
            continue;
        };
        if node.remote.contains(id) {
            node.remote.deliver(&node, env.frame);
            continue;
        }
        if env.frame.opens_stream() {
            // What the caller's node reads decides what is relayed back to it (a `Drain`), so
            // its list is read before the stream needs it.
            learn_soon(&node, &env.from_node);
        }
        match node
            .sessions
            .at_epoch(&env.agent, env.epoch)
            .or_else(|| node.sessions.get(&env.agent))
        {
            Some(s) if s.epoch == env.epoch => {
                // An open joins the caller node's trace; later frames of the stream stay span-free.
                let span = if env.frame.opens_stream() {
                    let span = tracing::info_span!("bus.open", otel.kind = "consumer", agent = %env.agent, stream = %id, from_node = %env.from_node);
                    telemetry::set_remote_parent(&span, &env.trace_parent);
                    span
                } else {
                    tracing::Span::none()
                };
                let _entered = span.enter();
                s.addr.do_send(FromCaller {
                    from_node: env.from_node,
                    frame: env.frame,
                });
            }
            other => {
                let why = if other.is_some() {
                    "stale agent epoch"
                } else {
                    "agent is not on this node"
                };
                node.metrics.bus.with_label_values(&["dropped_stale"]).inc();
                if !matches!(env.frame, Frame::Reset(_)) {
                    let reset = Frame::Reset(Reset {
                        stream: id,
                        code: ErrorCode::AgentUnavailable,
                        reason: why.into(),
                    });
                    node.bus_out.send(&env.from_node, &env.agent, env.epoch, reset);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::directory::MemoryDirectory;

    /// A peer is taken to read nothing until its list is in; a peer that stops heartbeating is
    /// forgotten by the next refresh, and one restarted with another build is read anew.
    #[tokio::test]
    async fn peers_are_read_on_first_contact_and_again_each_refresh() {
        let dir = MemoryDirectory::new();
        let ttl = Duration::from_secs(5);
        dir.node_heartbeat("b", &[FEATURE_HTTP, FEATURE_DRAIN], ttl)
            .await
            .unwrap();
        dir.node_heartbeat("old", &[], ttl).await.unwrap();
        let peers = Peers::default();
        assert!(!peers.lists("b", FEATURE_HTTP), "not read yet");
        peers.learn(&dir, "b").await;
        assert!(peers.lists("b", FEATURE_HTTP) && peers.lists("b", FEATURE_DRAIN));
        peers.learn(&dir, "old").await;
        assert!(
            !peers.lists("old", FEATURE_HTTP),
            "a build from before the list reads none"
        );

        dir.node_heartbeat("b", &[FEATURE_HTTP], ttl).await.unwrap();
        dir.node_gone("old").await.unwrap();
        peers.refresh(&dir).await;
        assert!(peers.lists("b", FEATURE_HTTP) && !peers.lists("b", FEATURE_DRAIN));
        assert!(!peers.known("old"), "a stopped peer is forgotten");
    }

    /// Callers that meet a new peer together (a burst of connections to an agent on another
    /// node) all get its list, none the older form because another one's read is still out.
    /// On Redis, where a read really waits.
    #[tokio::test]
    async fn callers_meeting_a_new_peer_together_all_get_its_list() {
        let prefix = format!("strait-test-{:016x}:", rand::random::<u64>());
        let dir = crate::directory::RedisDirectory::connect("redis://127.0.0.1:6379/", &prefix)
            .await
            .expect("Redis on 127.0.0.1:6379 (scripts/deps starts it)");
        dir.node_heartbeat("b", FEATURES, Duration::from_secs(30))
            .await
            .unwrap();
        let peers = Peers::default();
        let caller = || async {
            peers.learn(&dir, "b").await;
            peers.lists("b", FEATURE_HTTP)
        };
        let answers = futures_util::future::join_all((0..8).map(|_| caller())).await;
        dir.delete_all_keys().await.unwrap();
        assert_eq!(answers, vec![true; 8]);
    }
}
