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
    nonces: HashMap<String, Instant>,
    presence: HashMap<AgentName, (Presence, Instant)>,
    epoch: u64,
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
        Ok(epoch)
    }

    async fn refresh_presence(&self, agent: &AgentName, epoch: u64, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut s = self.state.lock();
        match s.presence.get_mut(agent) {
            Some((p, exp)) if p.epoch == epoch => {
                *exp = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nonce_is_refused_within_its_window_and_accepted_after() {
        let d = MemoryDirectory::new();
        assert!(d.remember_nonce("a:1", Duration::from_millis(50)).await.unwrap());
        assert!(!d.remember_nonce("a:1", Duration::from_millis(50)).await.unwrap());
        assert!(d.remember_nonce("a:2", Duration::from_millis(50)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(d.remember_nonce("a:1", Duration::from_millis(50)).await.unwrap());
    }

    #[tokio::test]
    async fn newer_epoch_fences_the_older_connection() {
        let d = MemoryDirectory::new();
        let a = AgentName::new("alpha").unwrap();
        let ttl = Duration::from_secs(5);
        let e1 = d.claim_presence(&a, "n1", "i1", ttl).await.unwrap();
        let e2 = d.claim_presence(&a, "n2", "i1", ttl).await.unwrap();
        assert!(e2 > e1);
        assert!(!d.refresh_presence(&a, e1, ttl).await.unwrap());
        d.release_presence(&a, e1).await.unwrap();
        assert_eq!(d.presence(&a).await.unwrap().unwrap().node_id, "n2");
        d.release_presence(&a, e2).await.unwrap();
        assert!(d.presence(&a).await.unwrap().is_none());
    }
}
