//! Cluster state that is shared but short-lived: which node holds which agent (presence) and
//! which handshake nonces were already used. A single node keeps it in memory; a cluster in Redis.

mod cache;
#[cfg(test)]
pub(crate) mod contract;
mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use strait_schema::AgentName;

pub use self::redis::RedisDirectory;
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
    ///
    /// A missing entry (expired, or lost with a Redis restart) is re-created from `holder` unless a
    /// newer epoch was issued since: presence comes back from heartbeats, and fencing holds.
    async fn refresh_presence(&self, agent: &AgentName, holder: &Presence, ttl: Duration) -> Result<bool, Error>;
    /// Removes presence if it is still at `epoch` (a newer connection's entry is left alone).
    async fn release_presence(&self, agent: &AgentName, epoch: u64) -> Result<(), Error>;
    /// Where the agent is, if anywhere.
    async fn presence(&self, agent: &AgentName) -> Result<Option<Presence>, Error>;
    /// Like [`Directory::presence`], but may answer from this node's copy, which is dropped as
    /// soon as a claim or release of that agent's presence is announced: the per-request lookup
    /// then costs no round trip. The flag says whether the copy answered.
    async fn presence_cached(&self, agent: &AgentName) -> Result<(Option<Presence>, bool), Error> {
        Ok((self.presence(agent).await?, false))
    }

    /// Marks this node alive for `ttl` (called every heartbeat), listing the bus features it
    /// understands. A node whose key expired is dead: callers of streams it carried are reset,
    /// and its agents reconnect elsewhere.
    async fn node_heartbeat(&self, node_id: &str, features: &[&str], ttl: Duration) -> Result<(), Error>;
    /// Whether `node_id` heartbeated within its ttl.
    async fn node_alive(&self, node_id: &str) -> Result<bool, Error>;
    /// The bus features `node_id` listed with its last heartbeat, or `None` if it is not alive.
    /// A node built before features were listed lists none: its peers send it only the frames
    /// every build reads (a rolling upgrade runs old and new builds side by side).
    async fn node_features(&self, node_id: &str) -> Result<Option<Vec<String>>, Error>;
    /// Removes this node's liveness key at once (clean shutdown).
    async fn node_gone(&self, node_id: &str) -> Result<(), Error>;

    /// Pins `key` (a tunnel or affinity key) to `value` for `ttl` if nobody holds it (SET NX).
    /// Returns `None` when the pin was taken, or `Some(current holder)` when someone else has it.
    async fn pin(&self, key: &str, value: &str, ttl: Duration) -> Result<Option<String>, Error>;
    /// Extends a pin only if it still holds `value` (compare-then-expire). False if lost.
    async fn renew_pin(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, Error>;
    /// Releases a pin only if it still holds `value` (compare-then-delete).
    async fn release_pin(&self, key: &str, value: &str) -> Result<(), Error>;
    /// Current holder of a pin.
    async fn pinned(&self, key: &str) -> Result<Option<String>, Error>;

    /// The last bus offset this node fully processed on `stream`, so a restarted consumer
    /// resumes at stored + 1 (the broker does not keep consumer offsets for streams).
    async fn load_offset(&self, stream: &str) -> Result<Option<u64>, Error>;
    /// Records the last processed offset on `stream`.
    async fn store_offset(&self, stream: &str, offset: u64) -> Result<(), Error>;
}
