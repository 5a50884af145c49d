//! Cluster directory in Redis: every node sees the same presence, pins, nonces and bus offsets.
//!
//! Every compare-then-act step (fencing by epoch, pin ownership, forward-only offsets) is one Lua
//! script, so no other node can act between the compare and the write. Expiry is Redis' own TTL.
//!
//! Key layout, all under the prefix given to [`RedisDirectory::connect`] (`strait:` below):
//!
//! | key | value | expiry |
//! |---|---|---|
//! | `strait:nonce:<key>` | `1` | the nonce window |
//! | `strait:epoch:<agent>` | fencing counter (INCR) | none, so epochs grow across presence expiry |
//! | `strait:presence:<agent>` | `<epoch>\|<node>\|<instance>` | presence TTL, refreshed by heartbeats |
//! | `strait:node:<node>` | last heartbeat, Unix ms | node TTL |
//! | `strait:pin:<key>` | holder | pin TTL |
//! | `strait:offset:<stream>` | last processed offset | none |
//!
//! Every claim and release of presence also publishes the agent's name on the channel
//! `strait:presence-moves`, which each node follows to keep its [`PresenceCache`] true.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult, Script};
use strait_schema::AgentName;
use tokio_util::task::AbortOnDropHandle;

use super::cache::PresenceCache;
use super::{Directory, Presence};
use crate::error::Error;

/// `KEYS[1]` epoch counter, `KEYS[2]` presence; `ARGV` node, instance, ttl ms, announcement
/// channel, agent. Returns the epoch. `%d`, not `tostring`: Lua 5.1 would print a large number
/// in exponent form.
const CLAIM_PRESENCE: &str = r"
local epoch = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], string.format('%d', epoch) .. '|' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return epoch
";

/// `KEYS[1]` presence, `KEYS[2]` epoch counter; `ARGV` epoch, ttl ms, full value. 1 if extended
/// or restored: a missing entry (expired, or Redis restarted empty) is re-created unless a newer
/// epoch was issued since, and the counter is lifted so later claims stay above it.
const REFRESH_PRESENCE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  if string.match(v, '^(%d+)|') == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return 0
end
local issued = tonumber(redis.call('GET', KEYS[2]) or '0')
if issued > tonumber(ARGV[1]) then
  return 0
end
if issued < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
return 1
";

/// `KEYS[1]` presence; `ARGV` epoch, announcement channel, agent. 1 if deleted.
const RELEASE_PRESENCE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)|') == ARGV[1] then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// How long a cached presence entry is trusted without hearing about it. Announcements make it
/// exact; this bounds a copy that outlived a message lost with a link that died silently.
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(1);

/// Bounds for re-subscribing to announcements after the link to Redis broke.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// `KEYS[1]` pin; `ARGV` value, ttl ms. Nil if taken, else the current holder. One script rather
/// than SET NX then GET, so a pin expiring in between cannot be reported as held by nobody.
const PIN: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// `KEYS[1]` pin; `ARGV` value, ttl ms. 1 if extended.
const RENEW_PIN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// `KEYS[1]` pin; `ARGV` value. 1 if deleted.
const RELEASE_PIN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// `KEYS[1]` offset; `ARGV` offset in decimal. Compared as canonical decimal strings (longer is
/// larger, then byte order) because Lua numbers are doubles and would round offsets above 2^53.
const STORE_OFFSET: &str = r"
local cur = redis.call('GET', KEYS[1])
local new = ARGV[1]
if not cur or #new > #cur or (#new == #cur and new > cur) then
  redis.call('SET', KEYS[1], new)
  return 1
end
return 0
";

/// Scripts are hashed once here; `invoke_async` sends EVALSHA and loads the body only when the
/// server does not know it yet (after a restart or SCRIPT FLUSH).
struct Scripts {
    claim_presence: Script,
    refresh_presence: Script,
    release_presence: Script,
    pin: Script,
    renew_pin: Script,
    release_pin: Script,
    store_offset: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            claim_presence: Script::new(CLAIM_PRESENCE),
            refresh_presence: Script::new(REFRESH_PRESENCE),
            release_presence: Script::new(RELEASE_PRESENCE),
            pin: Script::new(PIN),
            renew_pin: Script::new(RENEW_PIN),
            release_pin: Script::new(RELEASE_PIN),
            store_offset: Script::new(STORE_OFFSET),
        }
    }
}

/// Cluster [`Directory`] on one Redis server (not Redis Cluster: scripts touch several keys).
///
/// Cheap to share behind an `Arc`; each call clones the multiplexed [`ConnectionManager`], which
/// reconnects by itself after an outage.
pub struct RedisDirectory {
    conn: ConnectionManager,
    prefix: String,
    scripts: Scripts,
    cache: Arc<PresenceCache>,
    /// Follows presence announcements for `cache`; stopped with the directory.
    _follower: AbortOnDropHandle<()>,
}

impl RedisDirectory {
    /// Connects to `url` (`redis://host:port/db`) and keeps every key under `prefix`, so nodes of
    /// one cluster share a prefix (`strait:`) and each test run gets its own. A `:` is appended
    /// to a prefix that does not end with one. An empty prefix is refused: [`Self::delete_all_keys`]
    /// would then wipe the whole database.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, Error> {
        if prefix.is_empty() {
            return Err(Error::Directory("a key prefix is required".to_owned()));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with(':') {
            prefix.push(':');
        }
        // The URL may carry a password, so it is not repeated in the error.
        let client = redis::Client::open(url).map_err(|e| Error::Directory(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // The default (500 ms) is tight for a loaded box; a hung Redis must still not hang a
            // handshake forever.
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| Error::Directory(format!("cannot connect to Redis: {e}")))?;
        let cache = Arc::new(PresenceCache::new(PRESENCE_CACHE_TTL));
        let channel = moves_channel(&prefix);
        let follower = AbortOnDropHandle::new(tokio::spawn(follow_moves(client, channel, Arc::downgrade(&cache))));
        Ok(Self {
            conn,
            prefix,
            scripts: Scripts::new(),
            cache,
            _follower: follower,
        })
    }

    /// Deletes every key under this directory's prefix and returns how many. For tests and
    /// teardown of a throwaway cluster: it is not atomic with concurrent writers.
    pub async fn delete_all_keys(&self) -> Result<usize, Error> {
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| failed("scan", e))?;
            if !keys.is_empty() {
                let n: usize = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| failed("unlink", e))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    /// Runs `op` on a fresh handle, once more after an IO error: the [`ConnectionManager`] fails
    /// the first command after an outage while it reconnects. A retried write may have reached
    /// Redis the first time; every operation here tolerates that (an epoch skips a number, a
    /// nonce reads as a replay and the agent retries with a new one).
    async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Error>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match op(self.conn.clone()).await {
            Ok(v) => Ok(v),
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                tracing::debug!(error = %e, what, "directory: retrying once after an IO error");
                op(self.conn.clone()).await.map_err(|e| failed(what, e))
            }
            Err(e) => Err(failed(what, e)),
        }
    }
}

/// The channel on which every claim and release of presence under `prefix` is announced.
fn moves_channel(prefix: &str) -> String {
    format!("{prefix}presence-moves")
}

/// Keeps `cache` live while subscribed to `channel`, dropping each announced agent's entry;
/// re-subscribes with backoff after the link breaks. Ends when the directory is dropped.
async fn follow_moves(client: redis::Client, channel: String, cache: Weak<PresenceCache>) {
    let mut delay = RESUBSCRIBE_MIN;
    loop {
        let subscribed = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(mut pubsub)) => {
                let Some(c) = cache.upgrade() else { return };
                c.set_live(true);
                drop(c);
                delay = RESUBSCRIBE_MIN;
                let mut moves = pubsub.on_message();
                while let Some(msg) = moves.next().await {
                    let Some(c) = cache.upgrade() else { return };
                    match msg.get_payload::<String>() {
                        Ok(agent) => c.forget(&agent),
                        // Unknown which agent moved, so none of the copies can be trusted.
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable presence announcement; dropping the whole cache");
                            c.forget_all();
                        }
                    }
                }
                let Some(c) = cache.upgrade() else { return };
                c.set_live(false);
                tracing::warn!("lost presence announcements; reading presence from Redis until re-subscribed");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, retry_in = ?delay, "cannot subscribe to presence announcements"),
            Err(_) => tracing::warn!(retry_in = ?delay, "subscribing to presence announcements timed out"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESUBSCRIBE_MAX);
    }
}

fn failed(what: &str, e: RedisError) -> Error {
    Error::Directory(format!("{what}: {e}"))
}

/// The features in a liveness value (`now_ms|a,b`); none in a bare `now_ms` from an older build.
fn parse_features(value: &str) -> Vec<String> {
    value
        .split_once('|')
        .map(|(_, list)| list.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Redis takes whole milliseconds and refuses `PX 0`.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Escapes the glob characters of SCAN MATCH, so a prefix matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parses `<epoch>|<node>|<instance>`. The instance id is last, so it may contain `|`.
fn parse_presence(value: &str) -> Option<Presence> {
    let mut parts = value.splitn(3, '|');
    let epoch = parts.next()?.parse().ok()?;
    let node_id = parts.next()?.to_owned();
    let instance_id = parts.next()?.to_owned();
    Some(Presence {
        node_id,
        instance_id,
        epoch,
    })
}

#[async_trait]
impl Directory for RedisDirectory {
    async fn remember_nonce(&self, key: &str, ttl: Duration) -> Result<bool, Error> {
        let key = &self.key("nonce", key);
        let ms = ttl_ms(ttl);
        let set: Option<String> = self
            .run("remember nonce", |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    async fn claim_presence(
        &self,
        agent: &AgentName,
        node_id: &str,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<u64, Error> {
        if node_id.contains('|') {
            // The stored value is `|`-separated and only its last field may contain one.
            return Err(Error::Directory(format!("node id {node_id:?} contains '|'")));
        }
        let epoch_key = &self.key("epoch", agent.as_str());
        let presence_key = &self.key("presence", agent.as_str());
        let script = &self.scripts.claim_presence;
        let ms = ttl_ms(ttl);
        let channel = &moves_channel(&self.prefix);
        self.run("claim presence", |mut c| async move {
            script
                .key(epoch_key)
                .key(presence_key)
                .arg(node_id)
                .arg(instance_id)
                .arg(ms)
                .arg(channel)
                .arg(agent.as_str())
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    async fn refresh_presence(&self, agent: &AgentName, holder: &Presence, ttl: Duration) -> Result<bool, Error> {
        let key = &self.key("presence", agent.as_str());
        let counter = &self.key("epoch", agent.as_str());
        let script = &self.scripts.refresh_presence;
        let ms = ttl_ms(ttl);
        let epoch = holder.epoch;
        let value = &format!("{}|{}|{}", holder.epoch, holder.node_id, holder.instance_id);
        self.run("refresh presence", |mut c| async move {
            script
                .key(key)
                .key(counter)
                .arg(epoch)
                .arg(ms)
                .arg(value)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    async fn release_presence(&self, agent: &AgentName, epoch: u64) -> Result<(), Error> {
        let key = &self.key("presence", agent.as_str());
        let script = &self.scripts.release_presence;
        let channel = &moves_channel(&self.prefix);
        let _: i64 = self
            .run("release presence", |mut c| async move {
                script
                    .key(key)
                    .arg(epoch)
                    .arg(channel)
                    .arg(agent.as_str())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn presence(&self, agent: &AgentName) -> Result<Option<Presence>, Error> {
        let key = &self.key("presence", agent.as_str());
        let value: Option<String> = self
            .run("read presence", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        value
            .map(|v| {
                parse_presence(&v).ok_or_else(|| Error::Directory(format!("malformed presence for {agent}: {v:?}")))
            })
            .transpose()
    }

    async fn presence_cached(&self, agent: &AgentName) -> Result<(Option<Presence>, bool), Error> {
        if let Some(p) = self.cache.get(agent.as_str()) {
            return Ok((Some(p), true));
        }
        let generation = self.cache.generation();
        let found = self.presence(agent).await?;
        if let (Some(p), Some(g)) = (&found, generation) {
            self.cache.put(agent.as_str(), p.clone(), g);
        }
        Ok((found, false))
    }

    async fn node_heartbeat(&self, node_id: &str, features: &[&str], ttl: Duration) -> Result<(), Error> {
        let key = &self.key("node", node_id);
        let ms = ttl_ms(ttl);
        // Liveness is the key's existence; the value is when it last beat (informational) and
        // the features it lists, as `now_ms|a,b`. Builds before the list wrote `now_ms` alone.
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let value = &format!("{now_ms}|{}", features.join(","));
        self.run("node heartbeat", |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn node_alive(&self, node_id: &str) -> Result<bool, Error> {
        let key = &self.key("node", node_id);
        self.run("node alive", |mut c| async move {
            redis::cmd("EXISTS").arg(key).query_async(&mut c).await
        })
        .await
    }

    async fn node_features(&self, node_id: &str) -> Result<Option<Vec<String>>, Error> {
        let key = &self.key("node", node_id);
        let value: Option<String> = self
            .run("node features", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(value.map(|v| parse_features(&v)))
    }

    async fn node_gone(&self, node_id: &str) -> Result<(), Error> {
        let key = &self.key("node", node_id);
        self.run("node gone", |mut c| async move {
            redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
        })
        .await
    }

    async fn pin(&self, key: &str, value: &str, ttl: Duration) -> Result<Option<String>, Error> {
        let key = &self.key("pin", key);
        let script = &self.scripts.pin;
        let ms = ttl_ms(ttl);
        self.run("pin", |mut c| async move {
            script.key(key).arg(value).arg(ms).invoke_async(&mut c).await
        })
        .await
    }

    async fn renew_pin(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, Error> {
        let key = &self.key("pin", key);
        let script = &self.scripts.renew_pin;
        let ms = ttl_ms(ttl);
        self.run("renew pin", |mut c| async move {
            script.key(key).arg(value).arg(ms).invoke_async(&mut c).await
        })
        .await
    }

    async fn release_pin(&self, key: &str, value: &str) -> Result<(), Error> {
        let key = &self.key("pin", key);
        let script = &self.scripts.release_pin;
        let _: i64 = self
            .run("release pin", |mut c| async move {
                script.key(key).arg(value).invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    async fn pinned(&self, key: &str) -> Result<Option<String>, Error> {
        let key = &self.key("pin", key);
        self.run("read pin", |mut c| async move {
            redis::cmd("GET").arg(key).query_async(&mut c).await
        })
        .await
    }

    async fn load_offset(&self, stream: &str) -> Result<Option<u64>, Error> {
        let key = &self.key("offset", stream);
        let value: Option<String> = self
            .run("load offset", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        value
            .map(|v| {
                v.parse()
                    .map_err(|_| Error::Directory(format!("malformed offset for {stream}: {v:?}")))
            })
            .transpose()
    }

    async fn store_offset(&self, stream: &str, offset: u64) -> Result<(), Error> {
        let key = &self.key("offset", stream);
        let script = &self.scripts.store_offset;
        // `u64`'s decimal form is canonical (no sign, no leading zeros), as the script assumes.
        let value = &offset.to_string();
        let _: i64 = self
            .run("store offset", |mut c| async move {
                script.key(key).arg(value).invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use std::time::Instant;

    use futures_util::FutureExt;

    use super::*;
    use crate::directory::contract::{self, Case};

    const REDIS_URL: &str = "redis://127.0.0.1:6379/";

    async fn connect() -> RedisDirectory {
        let prefix = format!("strait-test-{:016x}:", rand::random::<u64>());
        match RedisDirectory::connect(REDIS_URL, &prefix).await {
            Ok(d) => d,
            Err(e) => panic!("Redis at {REDIS_URL} is needed for these tests (start it with scripts/deps): {e}"),
        }
    }

    /// Runs a case on a directory with its own prefix, and deletes its keys even if it panicked.
    async fn with_redis(case: Case) {
        let d = connect().await;
        let outcome = AssertUnwindSafe(case(&d)).catch_unwind().await;
        let cleaned = d.delete_all_keys().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        cleaned.unwrap();
    }

    contract::directory_contract_tests!(with_redis);

    #[tokio::test]
    async fn delete_all_keys_removes_only_its_own_prefix() {
        let mine = connect().await;
        let other = connect().await;
        let ttl = Duration::from_secs(30);
        mine.node_heartbeat("n1", &[], ttl).await.unwrap();
        mine.store_offset("s", 1).await.unwrap();
        other.node_heartbeat("n1", &[], ttl).await.unwrap();
        assert_eq!(mine.delete_all_keys().await.unwrap(), 2);
        assert!(!mine.node_alive("n1").await.unwrap());
        assert!(other.node_alive("n1").await.unwrap());
        assert_eq!(other.delete_all_keys().await.unwrap(), 1);
    }

    /// Two nodes of one cluster: the one caching an agent's presence drops its copy when the
    /// other claims or releases that agent, well before the copy's TTL would.
    #[tokio::test]
    async fn announced_claims_and_releases_drop_cached_presence() {
        let prefix = format!("strait-test-{:016x}:", rand::random::<u64>());
        let caller = RedisDirectory::connect(REDIS_URL, &prefix).await.unwrap();
        let holder = RedisDirectory::connect(REDIS_URL, &prefix).await.unwrap();
        let outcome = AssertUnwindSafe(async {
            let (alpha, beta) = (AgentName::new("alpha").unwrap(), AgentName::new("beta").unwrap());
            let ttl = Duration::from_secs(30);
            let subscribed = Instant::now();
            while caller.cache.generation().is_none() {
                assert!(subscribed.elapsed() < Duration::from_secs(5), "never subscribed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let before = caller.cache.generation().unwrap();
            let e1 = holder.claim_presence(&alpha, "n1", "i1", ttl).await.unwrap();
            holder.claim_presence(&beta, "n1", "i2", ttl).await.unwrap();
            // A read that overlaps an announcement is not stored, so let both claims be heard
            // before the reads that should fill the cache.
            while caller.cache.generation().unwrap() < before + 2 {
                assert!(
                    subscribed.elapsed() < Duration::from_secs(5),
                    "the claims were not heard"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for agent in [&alpha, &beta] {
                assert!(!caller.presence_cached(agent).await.unwrap().1);
            }
            let (p, hit) = caller.presence_cached(&alpha).await.unwrap();
            assert!(hit, "the second lookup went to Redis");
            assert_eq!(p.map(|p| (p.node_id, p.epoch)), Some(("n1".into(), e1)));
            let cached_at = Instant::now();

            // The agent reconnects on another node: only its own entry goes, at once.
            let e2 = holder.claim_presence(&alpha, "n2", "i1", ttl).await.unwrap();
            while caller.cache.get("alpha").is_some() {
                assert!(
                    cached_at.elapsed() < PRESENCE_CACHE_TTL / 2,
                    "the claim was not heard; the copy would live until its TTL"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert!(
                caller.presence_cached(&beta).await.unwrap().1,
                "another agent's entry was dropped"
            );
            let (p, hit) = caller.presence_cached(&alpha).await.unwrap();
            assert_eq!((p.map(|p| (p.node_id, p.epoch)), hit), (Some(("n2".into(), e2)), false));

            // It disconnects: its entry goes too.
            assert!(caller.presence_cached(&alpha).await.unwrap().1);
            let cached_at = Instant::now();
            holder.release_presence(&alpha, e2).await.unwrap();
            while caller.cache.get("alpha").is_some() {
                assert!(
                    cached_at.elapsed() < PRESENCE_CACHE_TTL / 2,
                    "the release was not heard"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert_eq!(caller.presence_cached(&alpha).await.unwrap(), (None, false));

            // An announcement that names no readable agent: no copy can be trusted any more.
            assert!(caller.presence_cached(&beta).await.unwrap().1);
            let cached_at = Instant::now();
            let mut c = caller.conn.clone();
            redis::cmd("PUBLISH")
                .arg(moves_channel(&caller.prefix))
                .arg(&[0xffu8, 0xfe][..])
                .query_async::<()>(&mut c)
                .await
                .unwrap();
            while caller.cache.get("beta").is_some() {
                assert!(
                    cached_at.elapsed() < PRESENCE_CACHE_TTL / 2,
                    "a garbled announcement left the cache"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert!(caller.cache.generation().is_some(), "the subscription should stay up");
        })
        .catch_unwind()
        .await;
        caller.delete_all_keys().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[tokio::test]
    async fn malformed_presence_is_an_error_not_a_panic() {
        let d = connect().await;
        let a = AgentName::new("alpha").unwrap();
        let mut c = d.conn.clone();
        let outcome = AssertUnwindSafe(async {
            for bad in ["", "x|n|i", "7|n", "-1|n|i"] {
                redis::cmd("SET")
                    .arg(d.key("presence", "alpha"))
                    .arg(bad)
                    .query_async::<()>(&mut c)
                    .await
                    .unwrap();
                assert!(matches!(d.presence(&a).await, Err(Error::Directory(_))), "{bad:?}");
            }
            redis::cmd("SET")
                .arg(d.key("offset", "s"))
                .arg("nope")
                .query_async::<()>(&mut c)
                .await
                .unwrap();
            assert!(matches!(d.load_offset("s").await, Err(Error::Directory(_))));
        })
        .catch_unwind()
        .await;
        d.delete_all_keys().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// A node built before features were listed heartbeats with a bare timestamp: it is alive
    /// and lists none, so its peers send it nothing newer.
    #[tokio::test]
    async fn a_liveness_value_from_an_older_build_lists_no_features() {
        let d = connect().await;
        let outcome = AssertUnwindSafe(async {
            let mut c = d.conn.clone();
            let _: () = redis::cmd("SET")
                .arg(d.key("node", "old"))
                .arg(1_796_000_000_000u64)
                .arg("PX")
                .arg(5_000)
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(d.node_alive("old").await.unwrap());
            assert_eq!(d.node_features("old").await.unwrap(), Some(vec![]));
        })
        .catch_unwind()
        .await;
        d.delete_all_keys().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[tokio::test]
    async fn a_dropped_connection_is_retried_once() {
        let d = connect().await;
        let mut c = d.conn.clone();
        let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut c).await.unwrap();
        let killer = redis::Client::open(REDIS_URL).unwrap();
        let mut killer = killer.get_multiplexed_async_connection().await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut killer)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        let outcome = AssertUnwindSafe(async {
            d.node_heartbeat("n1", &[], Duration::from_secs(5)).await.unwrap();
            assert!(d.node_alive("n1").await.unwrap());
        })
        .catch_unwind()
        .await;
        d.delete_all_keys().await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn liveness_values_name_their_features_and_older_ones_none() {
        let listed = |v: &str| parse_features(v);
        assert_eq!(listed("1796000000000|http,drain"), ["http", "drain"]);
        assert_eq!(
            listed("1796000000000|"),
            Vec::<String>::new(),
            "a node that reads nothing newer"
        );
        assert_eq!(
            listed("1796000000000"),
            Vec::<String>::new(),
            "a build from before the list"
        );
        assert_eq!(listed("1|http,,drain,"), ["http", "drain"], "empty names are skipped");
    }

    #[test]
    fn presence_value_round_trips_with_a_bar_in_the_instance_id() {
        let p = parse_presence("42|node-1|inst|a").unwrap();
        assert_eq!(
            (p.epoch, p.node_id.as_str(), p.instance_id.as_str()),
            (42, "node-1", "inst|a")
        );
    }

    #[test]
    fn prefix_globs_are_escaped() {
        assert_eq!(glob_escape(r"a*b?[c]\:"), r"a\*b\?\[c\]\\:");
    }
}
