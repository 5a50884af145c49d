//! Node configuration, parsed once into types. Flags have `STRAIT_*` environment twins; tests
//! build [`NodeConfig`] in code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use strait_schema::WireLimits;

use crate::error::Error;

/// Per-stream credit window unless configured. A stream moves at most one window per round trip,
/// and across nodes that trip runs through the bus (~3-7 ms under load here): 1 MiB keeps one
/// cross-node byte stream above 100 MB/s where 512 KiB gave ~90 once the bus batched bulk data,
/// and on one node it moved as much as 512 KiB or more (docs/benchmarks.md, eighth round). It is
/// also the most a stalled reader can hold per stream, unless its window grew first (below).
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;

/// Bytes a node lends to windows that grow (`strait_schema::window`): 64 MiB lets 21 streams at a time
/// run at four times the default window, while everything a node's streams can hold stays one
/// window each plus this.
pub const DEFAULT_WINDOW_POOL: u64 = 64 << 20;

/// Below this a window moves a few packets per credit round trip: a stream that crawls.
pub const MIN_STREAM_WINDOW: u32 = 16 << 10;

/// Where durable state lives; shared by `serve` and the admin subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Embedded store directory (single node). Created if missing.
    #[arg(long, env = "STRAIT_DATA_DIR", default_value = "./strait-data")]
    pub data_dir: PathBuf,
    /// Postgres URL (cluster mode).
    #[arg(long, env = "STRAIT_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `strait-gateway serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where agents dial in. Loopback by default, so a fresh node exposes nothing.
    #[arg(long, env = "STRAIT_AGENT_LISTEN", default_value = "127.0.0.1:7070")]
    pub agent_listen: SocketAddr,
    /// Public HTTP ingress.
    #[arg(long, env = "STRAIT_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Operator API (/api/v1); served once operator sessions land.
    #[arg(long, env = "STRAIT_API_LISTEN", default_value = "127.0.0.1:7071")]
    pub api_listen: SocketAddr,
    /// /healthz, /readyz, /metrics.
    #[arg(long, env = "STRAIT_OPS_LISTEN", default_value = "127.0.0.1:9090")]
    pub ops_listen: SocketAddr,
    /// Ingress host suffix: `<agent>.<domain>` reaches agent `<agent>`.
    #[arg(long, env = "STRAIT_DOMAIN", default_value = "localhost")]
    pub domain: String,
    /// This node's id (default: random).
    #[arg(long, env = "STRAIT_NODE_ID")]
    pub node_id: Option<String>,
    /// Redis URL (cluster mode).
    #[arg(long, env = "STRAIT_REDIS_URL")]
    pub redis_url: Option<String>,
    /// RabbitMQ URL (cluster mode).
    #[arg(long, env = "STRAIT_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// Cluster name: prefixes every Redis key and bus stream, so clusters (and test runs) can
    /// share one Redis and one RabbitMQ.
    #[arg(long, env = "STRAIT_CLUSTER", default_value = "strait")]
    pub cluster: String,
    /// Store location.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Ping interval towards agents, ms; an agent silent for 3 intervals is dropped.
    #[arg(long, env = "STRAIT_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u32,
    /// Seconds to wait for an agent's response head before answering 504 TIMEOUT.
    #[arg(long, env = "STRAIT_HEAD_TIMEOUT", default_value_t = 30)]
    pub head_timeout_secs: u64,
    /// Seconds a caller's connection may take to send a request head, or sit idle between
    /// requests, before it is closed (slow or abandoned callers hold no socket for long).
    #[arg(long, env = "STRAIT_CALLER_TIMEOUT", default_value_t = 5)]
    pub caller_timeout_secs: u64,
    /// Accepted handshake clock skew, seconds (both directions).
    #[arg(long, env = "STRAIT_CLOCK_SKEW", default_value_t = 60)]
    pub clock_skew_secs: u64,
    /// Per-stream flow-control window, bytes.
    #[arg(long, env = "STRAIT_STREAM_WINDOW", default_value_t = DEFAULT_STREAM_WINDOW)]
    pub stream_window: u32,
    /// Bytes the node may lend to stream windows that grow because their caller keeps up (up to
    /// four times `--stream-window` each); 0 keeps every window at `--stream-window`.
    #[arg(long, env = "STRAIT_WINDOW_POOL", default_value_t = DEFAULT_WINDOW_POOL)]
    pub window_pool: u64,
    /// Most streams open at once per agent.
    #[arg(long, env = "STRAIT_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: u32,
    /// Seconds without a byte either way before a TCP or upgraded stream is closed (0 = never).
    #[arg(long, env = "STRAIT_IDLE_TIMEOUT", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Most bytes (both directions) one TCP or upgraded stream may carry (0 = unlimited).
    #[arg(long, env = "STRAIT_STREAM_QUOTA", default_value_t = 0)]
    pub stream_quota_bytes: u64,
    /// After SIGTERM, ms to keep serving ingress once /readyz fails, so a load balancer's health
    /// check takes the node out before it stops accepting (default: 1000 in cluster mode, else 0).
    #[arg(long, env = "STRAIT_DRAIN_DELAY_MS")]
    pub drain_delay_ms: Option<u64>,
    /// Worker threads of the agent and ingress server (default: one per core). On a small
    /// machine shared with other busy processes, 1 serves more requests per CPU second.
    #[arg(long, env = "STRAIT_WORKERS")]
    pub workers: Option<usize>,
    /// How public HTTP reaches an agent: `connection` carries each caller's connection as bytes
    /// to one connection of the agent's to its service, reading only heads (an agent too old for
    /// that is served as with `request`); `request` re-encodes each request as frames the agent
    /// replays with its own HTTP client.
    #[arg(long, env = "STRAIT_HTTP_RELAY", value_enum, default_value_t = HttpRelay::Connection)]
    pub http_relay: HttpRelay,
}

/// How public HTTP requests travel to an agent (`--http-relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpRelay {
    /// Each request as frames: head, body, the agent's answer (`ingress`).
    Request,
    /// Each caller connection as one byte stream (`carried`).
    Connection,
}

/// Which implementations sit behind `Store`, `Directory` and `Bus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backends {
    /// Single node: SQLite file, in-memory directory, in-process bus.
    Embedded {
        /// Directory of the SQLite file.
        data_dir: PathBuf,
    },
    /// Cluster: Redis, RabbitMQ streams, Postgres. All three or none.
    Cluster {
        /// Redis URL.
        redis: String,
        /// AMQP URL.
        amqp: String,
        /// Postgres URL.
        db: String,
    },
}

impl Backends {
    /// A half-configured cluster is a start-up error, not a silent fallback to a single node.
    pub fn from_urls(
        data_dir: PathBuf,
        redis: Option<String>,
        amqp: Option<String>,
        db: Option<String>,
    ) -> Result<Self, Error> {
        match (redis, amqp, db) {
            (None, None, None) => Ok(Backends::Embedded { data_dir }),
            (Some(redis), Some(amqp), Some(db)) => Ok(Backends::Cluster { redis, amqp, db }),
            _ => Err(Error::Config(
                "cluster mode needs all of --redis-url, --amqp-url and --database-url (or none, for a single node)"
                    .into(),
            )),
        }
    }
}

/// Everything a node needs besides its listeners.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: String,
    /// Cluster name (prefix of Redis keys and bus streams).
    pub cluster: String,
    /// Ingress host suffix (lowercase, no leading dot).
    pub domain: String,
    /// Backends.
    pub backends: Backends,
    /// Ping interval.
    pub heartbeat: Duration,
    /// Silent heartbeats before an agent is dropped.
    pub missed_heartbeats: u32,
    /// Time allowed for an agent's response head.
    pub head_timeout: Duration,
    /// Time allowed from WebSocket upgrade to a valid `Hello`.
    pub handshake_timeout: Duration,
    /// Time a caller's connection may take to send a request head, or sit idle between requests.
    pub caller_timeout: Duration,
    /// Accepted clock skew for handshakes; nonces are remembered for twice this.
    pub clock_skew: Duration,
    /// Limits announced to agents.
    pub limits: WireLimits,
    /// Bytes lent to grown receive windows, node-wide (`strait_schema::window`).
    pub window_pool: u64,
    /// How often the node checks the store for revoked agents to drop.
    pub revocation_poll: Duration,
    /// Worker threads per server.
    pub workers: usize,
    /// Idle timeout of byte streams (`None` = never).
    pub idle_timeout: Option<Duration>,
    /// Byte quota of one byte stream, both directions (`None` = unlimited).
    pub stream_quota: Option<u64>,
    /// How often the node reloads TCP routes from the store.
    pub route_poll: Duration,
    /// On shutdown, how long to wait for agents told to move (`GoAway`) to reconnect elsewhere
    /// before their sessions here close. Zero on a single node: there is nowhere to move to.
    pub handoff: Duration,
    /// After shutdown is asked, how long ingress keeps accepting while `/readyz` already fails,
    /// so load balancers stop sending before the listener closes.
    pub drain_delay: Duration,
    /// How long in-flight requests may run on after shutdown is asked.
    pub drain_grace: Duration,
    /// How public HTTP requests travel to an agent.
    pub http_relay: HttpRelay,
    /// What this node lists for its peers (`cluster::FEATURES`, all it reads). Listing fewer
    /// keeps the newer frames from it, as from a node of an older build; tests stand in for
    /// such a node this way.
    pub bus_features: Vec<&'static str>,
}

impl NodeConfig {
    /// Defaults for a single node on `data_dir`; tests tweak fields from here.
    pub fn embedded(data_dir: PathBuf) -> Self {
        NodeConfig {
            node_id: random_node_id(),
            cluster: "strait".into(),
            domain: "localhost".into(),
            backends: Backends::Embedded { data_dir },
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 3,
            head_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            caller_timeout: Duration::from_secs(5),
            clock_skew: Duration::from_secs(60),
            limits: WireLimits {
                max_frame_bytes: 1 << 20,
                // 256 KiB: bulk is bound by per-frame costs, not bytes, and four frames in flight
                // keep a stream moving while credit returns.
                max_data_bytes: DEFAULT_STREAM_WINDOW / 4,
                stream_window: DEFAULT_STREAM_WINDOW,
                max_streams: 1024,
            },
            window_pool: DEFAULT_WINDOW_POOL,
            revocation_poll: Duration::from_secs(2),
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            idle_timeout: Some(Duration::from_secs(300)),
            stream_quota: None,
            route_poll: Duration::from_secs(1),
            handoff: Duration::ZERO,
            drain_delay: Duration::ZERO,
            drain_grace: Duration::from_secs(30),
            http_relay: HttpRelay::Connection,
            bus_features: crate::cluster::FEATURES.to_vec(),
        }
    }

    /// Builds the config from parsed flags, refusing values that cannot work.
    pub fn from_args(a: &ServeArgs) -> Result<Self, Error> {
        let mut cfg = NodeConfig::embedded(a.store.data_dir.clone());
        cfg.backends = Backends::from_urls(
            a.store.data_dir.clone(),
            a.redis_url.clone(),
            a.amqp_url.clone(),
            a.store.database_url.clone(),
        )?;
        if !strait_schema::frame::is_short_id(&a.cluster) {
            return Err(Error::Config(format!(
                "--cluster {:?}: use 1-64 of A-Z a-z 0-9 . _ -",
                a.cluster
            )));
        }
        cfg.cluster = a.cluster.clone();
        if let Backends::Cluster { .. } = cfg.backends {
            // Cluster nodes hand their agents over on shutdown (GoAway) instead of dropping them.
            cfg.handoff = Duration::from_secs(10);
            cfg.drain_delay = Duration::from_secs(1);
        }
        if let Some(ms) = a.drain_delay_ms {
            cfg.drain_delay = Duration::from_millis(ms);
        }
        if let Some(id) = &a.node_id {
            if !strait_schema::frame::is_short_id(id) {
                return Err(Error::Config(format!(
                    "--node-id {id:?}: use 1-64 of A-Z a-z 0-9 . _ -"
                )));
            }
            cfg.node_id = id.clone();
        }
        let domain = a.domain.trim_matches('.').to_ascii_lowercase();
        if domain.is_empty() || !domain.split('.').all(strait_schema::frame::is_dns_label) {
            return Err(Error::Config(format!("--domain {:?} is not a domain name", a.domain)));
        }
        cfg.domain = domain;
        if a.heartbeat_ms < 10 {
            return Err(Error::Config("--heartbeat-ms must be at least 10".into()));
        }
        cfg.heartbeat = Duration::from_millis(u64::from(a.heartbeat_ms));
        cfg.head_timeout = Duration::from_secs(a.head_timeout_secs.max(1));
        cfg.caller_timeout = Duration::from_secs(a.caller_timeout_secs.max(1));
        cfg.http_relay = a.http_relay;
        cfg.clock_skew = Duration::from_secs(a.clock_skew_secs.max(1));
        if a.stream_window < MIN_STREAM_WINDOW {
            return Err(Error::Config(format!(
                "--stream-window must be at least {MIN_STREAM_WINDOW} bytes"
            )));
        }
        // A frame never exceeds the window it must fit in: a small window means smaller frames.
        cfg.limits.max_data_bytes = cfg.limits.max_data_bytes.min(a.stream_window);
        cfg.limits.stream_window = a.stream_window;
        cfg.limits.max_streams = a.max_streams.max(1);
        cfg.window_pool = a.window_pool;
        cfg.idle_timeout = (a.idle_timeout_secs > 0).then(|| Duration::from_secs(a.idle_timeout_secs));
        cfg.stream_quota = (a.stream_quota_bytes > 0).then_some(a.stream_quota_bytes);
        if let Some(w) = a.workers {
            cfg.workers = w.max(1);
        }
        Ok(cfg)
    }
}

/// `node-` plus 8 random hex digits.
pub fn random_node_id() -> String {
    format!("node-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config(args: &[&str]) -> Result<NodeConfig, Error> {
        let cli = Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).expect("flags parse");
        NodeConfig::from_args(&cli.serve)
    }

    /// A window smaller than the default frame shrinks the frames to it instead of refusing it;
    /// a window too small to move data is refused with the flag's name.
    #[test]
    fn the_stream_window_bounds_data_frames() {
        let dflt = config(&[]).expect("defaults are valid");
        assert_eq!(dflt.limits.stream_window, DEFAULT_STREAM_WINDOW);
        assert_eq!(dflt.limits.max_data_bytes, DEFAULT_STREAM_WINDOW / 4);

        let small = config(&["--stream-window", "65536"]).expect("a 64 KiB window is valid");
        assert_eq!(small.limits.stream_window, 65536);
        assert_eq!(small.limits.max_data_bytes, 65536);

        let Err(Error::Config(why)) = config(&["--stream-window", "4096"]) else {
            panic!("a 4 KiB window must be refused");
        };
        assert!(why.contains("--stream-window"), "{why}");
    }

    #[test]
    fn the_window_pool_defaults_to_64_mib_and_zero_turns_growth_off() {
        assert_eq!(config(&[]).expect("defaults").window_pool, 64 << 20);
        assert_eq!(config(&["--window-pool", "0"]).expect("0 is valid").window_pool, 0);
    }
}
