//! Cluster state that is shared but short-lived: which node holds which agent (presence) and
//! which handshake nonces were already used. A single node keeps it in memory; a cluster in Redis.

mod memory;

use std::time::Duration;

use async_trait::async_trait;
use strait_schema::AgentName;

pub use memory::MemoryDirectory;

use crate::error::Error;

/// Where an agent instance is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Node holding the connection.
    pub node_id: String,
    /// The agent's instance id.
    pub instance_id: String,
    /// Fencing epoch: a newer connection of the same agent has a higher one.
    pub epoch: u64,
}

/// Presence and nonces, with expiry.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Records `key` (agent + nonce) as used for `ttl`. Returns false if it was already used:
    /// the handshake is a replay.
    async fn remember_nonce(&self, key: &str, ttl: Duration) -> Result<bool, Error>;
    /// Claims presence for an agent with a fresh epoch (higher than any before), for `ttl`.
    async fn claim_presence(
        &self,
        agent: &AgentName,
        node_id: &str,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<u64, Error>;
    /// Extends presence if this node still holds `epoch`. Returns false if it was taken over.
    async fn refresh_presence(&self, agent: &AgentName, epoch: u64, ttl: Duration) -> Result<bool, Error>;
    /// Removes presence if it is still at `epoch` (a newer connection's entry is left alone).
    async fn release_presence(&self, agent: &AgentName, epoch: u64) -> Result<(), Error>;
    /// Where the agent is, if anywhere.
    async fn presence(&self, agent: &AgentName) -> Result<Option<Presence>, Error>;
}
