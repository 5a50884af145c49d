//! A node's copy of presence entries it has read, so a request to an agent on another node does
//! not wait for a Redis round trip each time.
//!
//! Trust comes from announcements, not from the TTL: every claim or release of presence is
//! published, and a node drops its copy of that agent when the message arrives. While the
//! subscription is down (Redis restarted, link lost) nothing is served from the cache, because
//! a move in that gap would go unheard. The TTL only bounds how long a copy can outlive a lost
//! message on a link that died without a reset.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Presence;

/// Entries beyond which expired ones are swept on insert, so a node that once saw many agents
/// does not keep them all.
const SWEEP_ABOVE: usize = 4096;

/// Presence entries by agent, valid only while announcements are being heard.
pub(crate) struct PresenceCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// True while the announcement subscription is up.
    live: bool,
    /// Bumped by every forget and by every change of `live`: a read that started before one of
    /// those must not store what it read, which may be the entry just announced stale.
    generation: u64,
    map: HashMap<String, (Presence, Instant)>,
    sweep_at: usize,
}

impl Inner {
    fn forget_all(&mut self) {
        self.generation += 1;
        self.map.clear();
    }
}

impl PresenceCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Inner {
                sweep_at: SWEEP_ABOVE,
                ..Inner::default()
            }),
        }
    }

    /// The cached entry for `agent`, if announcements are heard and it is young enough.
    pub(crate) fn get(&self, agent: &str) -> Option<Presence> {
        let inner = self.inner.lock();
        if !inner.live {
            return None;
        }
        let (p, at) = inner.map.get(agent)?;
        (at.elapsed() < self.ttl).then(|| p.clone())
    }

    /// Taken before reading Redis and handed to [`Self::put`]; `None` while nothing may be cached.
    pub(crate) fn generation(&self) -> Option<u64> {
        let inner = self.inner.lock();
        inner.live.then_some(inner.generation)
    }

    /// Stores what a read returned, unless an announcement (or a lost subscription) came in
    /// since the read began.
    pub(crate) fn put(&self, agent: &str, presence: Presence, generation: u64) {
        let mut inner = self.inner.lock();
        if !inner.live || inner.generation != generation {
            return;
        }
        if inner.map.len() >= inner.sweep_at {
            let ttl = self.ttl;
            inner.map.retain(|_, (_, at)| at.elapsed() < ttl);
            inner.sweep_at = (inner.map.len() * 2).max(SWEEP_ABOVE);
        }
        inner.map.insert(agent.to_owned(), (presence, Instant::now()));
    }

    /// Drops `agent`'s entry: its presence was claimed or released somewhere.
    pub(crate) fn forget(&self, agent: &str) {
        let mut inner = self.inner.lock();
        inner.generation += 1;
        inner.map.remove(agent);
    }

    /// Drops every entry: an announcement could not be read, so any of them may be stale.
    pub(crate) fn forget_all(&self) {
        self.inner.lock().forget_all();
    }

    /// Records whether announcements are heard. Either way the cache starts empty: entries kept
    /// across a gap could have missed a move.
    pub(crate) fn set_live(&self, live: bool) {
        let mut inner = self.inner.lock();
        inner.live = live;
        inner.forget_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(node: &str, epoch: u64) -> Presence {
        Presence {
            node_id: node.into(),
            instance_id: "i".into(),
            epoch,
        }
    }

    #[test]
    fn nothing_is_cached_while_announcements_are_not_heard() {
        let c = PresenceCache::new(Duration::from_secs(60));
        assert_eq!(c.generation(), None);
        c.set_live(true);
        let g = c.generation().unwrap();
        c.put("a", at("n1", 1), g);
        assert_eq!(c.get("a"), Some(at("n1", 1)));
        c.set_live(false);
        assert_eq!(c.get("a"), None);
        c.set_live(true);
        assert_eq!(c.get("a"), None, "entries from before the gap were kept");
    }

    #[test]
    fn a_read_that_overlapped_an_announcement_is_not_stored() {
        let c = PresenceCache::new(Duration::from_secs(60));
        c.set_live(true);
        let before = c.generation().unwrap();
        c.forget("a");
        c.put("a", at("n1", 1), before);
        assert_eq!(c.get("a"), None);
        let after = c.generation().unwrap();
        c.put("a", at("n2", 2), after);
        assert_eq!(c.get("a"), Some(at("n2", 2)));
        c.forget("a");
        assert_eq!(c.get("a"), None);
    }

    #[test]
    fn entries_expire_and_are_swept() {
        let c = PresenceCache::new(Duration::from_millis(20));
        c.set_live(true);
        let g = c.generation().unwrap();
        c.put("a", at("n1", 1), g);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.get("a"), None);
        c.forget("a");
        let g = c.generation().unwrap();
        for i in 0..SWEEP_ABOVE {
            c.put(&format!("x{i}"), at("n1", 1), g);
        }
        std::thread::sleep(Duration::from_millis(30));
        c.put("b", at("n1", 1), g);
        assert_eq!(c.inner.lock().map.len(), 1, "expired entries were not swept");
    }
}
