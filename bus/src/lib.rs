//! Cross-node dispatch. Each gateway node consumes one dispatch channel named after its node id;
//! any node publishes [`BusEnvelope`]s to another node's channel. A single node runs on
//! [`InProcessBus`]; a cluster on RabbitMQ streams ([`AmqpBus`]). The gateway only sees
//! `dyn Bus`, so both modes run the same actors.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use strait_schema::BusEnvelope;
use tokio::sync::mpsc;

mod amqp;
mod batch;
mod consumer;
mod offsets;
mod publisher;
mod stats;

pub use amqp::{delete_stream, AmqpBus, BusConfig};
pub use offsets::{MemoryOffsets, OffsetStore};
pub use stats::{BusStats, BusStatsSnapshot};

/// Why an envelope could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No node of that id consumes from the bus (it died or never existed).
    #[error("no node {0} on the bus")]
    NoSuchNode(String),
    /// The node already has a consumer; one consumer per node keeps ordering simple.
    #[error("node {0} is already subscribed")]
    AlreadySubscribed(String),
    /// The broker could not be reached or refused the connection (address, credentials,
    /// network). The URL is not part of the message: it may carry a password.
    #[error("cannot connect to the AMQP broker")]
    Connect(#[source] lapin::Error),
    /// An AMQP operation on an open connection failed (the broker closed the channel, or the
    /// connection dropped under it).
    #[error("AMQP {op} failed")]
    Amqp {
        /// Which operation (`queue.declare`, `basic.consume`, ...).
        op: &'static str,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// A broker or offset-store operation did not answer in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The bus configuration cannot work (bad prefix or node id, zero sizes, ...).
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// The publish queue is full: the broker has been unreachable for a while, so the envelope
    /// was refused rather than buffered without bound.
    #[error("bus publish queue is full")]
    Backlog,
    /// The bus was shut down; it carries nothing any more.
    #[error("the bus is shut down")]
    Closed,
    /// The [`OffsetStore`] failed (its own error is the source).
    #[error("offset store failed")]
    OffsetStore(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Carries envelopes to the node named in `to_node`, in order per (sender, receiver) pair.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Hands an envelope to the bus. Returns once the bus has taken responsibility for it.
    async fn publish(&self, envelope: BusEnvelope) -> Result<(), Error>;
    /// Starts consuming this node's dispatch channel.
    async fn subscribe(&self, node_id: &str) -> Result<mpsc::UnboundedReceiver<BusEnvelope>, Error>;
    /// The transport's own counters (batches, confirms, re-sends, replays dropped), for a node's
    /// `/metrics`: what the broker sees, where envelopes are only what the node asked for. `None`
    /// for a bus without a transport (the in-process one).
    fn transport_stats(&self) -> Option<BusStatsSnapshot> {
        None
    }
}

/// The single-node bus: one in-memory channel per subscribed node. Real, not a test double:
/// it is what a node without `--amqp-url` runs on.
#[derive(Debug, Clone, Default)]
pub struct InProcessBus {
    nodes: Arc<RwLock<HashMap<String, mpsc::UnboundedSender<BusEnvelope>>>>,
}

impl InProcessBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, envelope: BusEnvelope) -> Result<(), Error> {
        let nodes = self.nodes.read();
        let tx = nodes
            .get(&envelope.to_node)
            .ok_or_else(|| Error::NoSuchNode(envelope.to_node.clone()))?;
        let to = envelope.to_node.clone();
        tx.send(envelope).map_err(|_| Error::NoSuchNode(to))
    }

    async fn subscribe(&self, node_id: &str) -> Result<mpsc::UnboundedReceiver<BusEnvelope>, Error> {
        let mut nodes = self.nodes.write();
        if nodes.get(node_id).is_some_and(|tx| !tx.is_closed()) {
            return Err(Error::AlreadySubscribed(node_id.to_owned()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        nodes.insert(node_id.to_owned(), tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_schema::{AgentName, Frame, Ping};

    fn env(to: &str, seq: u64) -> BusEnvelope {
        BusEnvelope {
            from_node: "a".into(),
            to_node: to.into(),
            seq,
            trace_parent: String::new(),
            agent: AgentName::new("alpha").unwrap(),
            epoch: 1,
            frame: Frame::Ping(Ping { timestamp_ms: seq }),
        }
    }

    #[test]
    fn error_and_bus_can_cross_threads() {
        // The gateway keeps `Error` in its own error type and `Arc<dyn Bus>` in actix app data.
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Error>();
        send_sync::<AmqpBus>();
        send_sync::<Arc<dyn Bus>>();
    }

    #[tokio::test]
    async fn delivers_in_order_to_the_named_node_only() {
        let bus = InProcessBus::new();
        let mut b = bus.subscribe("b").await.unwrap();
        let mut c = bus.subscribe("c").await.unwrap();
        for seq in 0..100 {
            bus.publish(env("b", seq)).await.unwrap();
        }
        bus.publish(env("c", 7)).await.unwrap();
        for seq in 0..100 {
            assert_eq!(b.recv().await.unwrap().seq, seq);
        }
        assert_eq!(c.recv().await.unwrap().seq, 7);
        assert!(b.try_recv().is_err());
    }

    #[tokio::test]
    async fn refuses_unknown_node_and_double_subscription() {
        let bus = InProcessBus::new();
        assert!(matches!(bus.publish(env("nobody", 1)).await, Err(Error::NoSuchNode(n)) if n == "nobody"));
        let rx = bus.subscribe("b").await.unwrap();
        assert!(matches!(bus.subscribe("b").await, Err(Error::AlreadySubscribed(_))));
        drop(rx);
        // A node that restarts its consumer may subscribe again.
        assert!(bus.subscribe("b").await.is_ok());
        assert!(matches!(bus.publish(env("gone", 1)).await, Err(Error::NoSuchNode(_))));
    }
}
