//! In-memory directory for a single node: the same contract as the Redis one, with expiry
//! checked on read and a sweep on write so the maps stay bounded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use strait_schema::AgentName;

use super::{Directory, Presence};
use crate::error::Error;

#[derive(Default)]
struct State {
    /// Last epoch issued per agent (outlives presence), so a stale holder cannot restore itself.
    issued: HashMap<AgentName, u64>,
    nonces: HashMap<String, Instant>,
    presence: HashMap<AgentName, (Presence, Instant)>,
    /// One counter for all agents: per-agent epochs then only grow, also across expiry.
    epoch: u64,
    /// Liveness deadline and listed bus features per node.
    nodes: HashMap<String, (Instant, Vec<String>)>,
    pins: HashMap<String, (String, Instant)>,
    offsets: HashMap<String, u64>,
    last_sweep: Option<Instant>,
}

impl State {
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        self.nonces.retain(|_, exp| *exp > now);
        self.presence.retain(|_, (_, exp)| *exp > now);
        self.nodes.retain(|_, (exp, _)| *exp > now);
        self.pins.retain(|_, (_, exp)| *exp > now);
    }
}

/// Single-node [`Directory`]. Real, not a test double: a node with no `--redis-url` runs on it.
#[derive(Default)]
pub struct MemoryDirectory {
    state: Mutex<State>,
}

impl MemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn remember_nonce(&self, key: &str, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.sweep(now);
        match s.nonces.get(key) {
            Some(exp) if *exp > now => Ok(false),
            _ => {
                s.nonces.insert(key.to_owned(), now + ttl);
                Ok(true)
            }
        }
    }

    async fn claim_presence(
        &self,
        agent: &AgentName,
        node_id: &str,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.sweep(now);
        s.epoch += 1;
        let epoch = s.epoch;
        let p = Presence {
            node_id: node_id.to_owned(),
            instance_id: instance_id.to_owned(),
            epoch,
        };
        s.presence.insert(agent.clone(), (p, now + ttl));
        s.issued.insert(agent.clone(), epoch);
        Ok(epoch)
    }

    async fn refresh_presence(&self, agent: &AgentName, holder: &Presence, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        match s.presence.get_mut(agent) {
            Some((p, exp)) if *exp > now => {
                if p.epoch != holder.epoch {
                    return Ok(false);
                }
                *exp = now + ttl;
                Ok(true)
            }
            _ => {
                if s.issued.get(agent).is_some_and(|e| *e > holder.epoch) {
                    return Ok(false);
                }
                s.issued.insert(agent.clone(), holder.epoch);
                s.presence.insert(agent.clone(), (holder.clone(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_presence(&self, agent: &AgentName, epoch: u64) -> Result<(), Error> {
        let mut s = self.state.lock();
        if s.presence.get(agent).is_some_and(|(p, _)| p.epoch == epoch) {
            s.presence.remove(agent);
        }
        Ok(())
    }

    async fn presence(&self, agent: &AgentName) -> Result<Option<Presence>, Error> {
        let now = Instant::now();
        let s = self.state.lock();
        Ok(s.presence
            .get(agent)
            .filter(|(_, exp)| *exp > now)
            .map(|(p, _)| p.clone()))
    }

    async fn node_heartbeat(&self, node_id: &str, features: &[&str], ttl: Duration) -> Result<(), Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.sweep(now);
        let features = features.iter().map(|f| (*f).to_owned()).collect();
        s.nodes.insert(node_id.to_owned(), (now + ttl, features));
        Ok(())
    }

    async fn node_alive(&self, node_id: &str) -> Result<bool, Error> {
        Ok(self.node_features(node_id).await?.is_some())
    }

    async fn node_features(&self, node_id: &str) -> Result<Option<Vec<String>>, Error> {
        let now = Instant::now();
        let s = self.state.lock();
        Ok(s.nodes
            .get(node_id)
            .filter(|(exp, _)| *exp > now)
            .map(|(_, f)| f.clone()))
    }

    async fn node_gone(&self, node_id: &str) -> Result<(), Error> {
        self.state.lock().nodes.remove(node_id);
        Ok(())
    }

    async fn pin(&self, key: &str, value: &str, ttl: Duration) -> Result<Option<String>, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.sweep(now);
        match s.pins.get(key) {
            Some((holder, exp)) if *exp > now => Ok(Some(holder.clone())),
            _ => {
                s.pins.insert(key.to_owned(), (value.to_owned(), now + ttl));
                Ok(None)
            }
        }
    }

    async fn renew_pin(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        match s.pins.get_mut(key) {
            Some((holder, exp)) if holder == value && *exp > now => {
                *exp = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_pin(&self, key: &str, value: &str) -> Result<(), Error> {
        let mut s = self.state.lock();
        if s.pins.get(key).is_some_and(|(holder, _)| holder == value) {
            s.pins.remove(key);
        }
        Ok(())
    }

    async fn pinned(&self, key: &str) -> Result<Option<String>, Error> {
        let now = Instant::now();
        let s = self.state.lock();
        Ok(s.pins
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(holder, _)| holder.clone()))
    }

    async fn load_offset(&self, stream: &str) -> Result<Option<u64>, Error> {
        Ok(self.state.lock().offsets.get(stream).copied())
    }

    async fn store_offset(&self, stream: &str, offset: u64) -> Result<(), Error> {
        // Deliveries can finish out of order: an older offset must not move the resume point back.
        let mut s = self.state.lock();
        let stored = s.offsets.entry(stream.to_owned()).or_insert(offset);
        *stored = (*stored).max(offset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::contract::{self, Case};

    async fn with_memory(case: Case) {
        case(&MemoryDirectory::new()).await;
    }

    contract::directory_contract_tests!(with_memory);
}
