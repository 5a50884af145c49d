//! A cluster of real `strait-gateway` processes on the machine's Redis, RabbitMQ and Postgres,
//! isolated per run: a unique cluster name (Redis key prefix, stream names) and a fresh database,
//! all removed afterwards even when the test fails.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::FutureExt;
use strait_gateway::store::postgres::testing::TempDatabase;
use strait_gateway::store::{PgStore, Store};
use strait_schema::{AgentName, AgentToken};

use crate::harness::free_addr;

pub const REDIS: &str = "redis://127.0.0.1:6379/";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// One gateway process and its addresses (kept across restarts).
pub struct ProcNode {
    pub id: String,
    pub agent: SocketAddr,
    pub http: SocketAddr,
    pub ops: SocketAddr,
    api: SocketAddr,
    redis: String,
    amqp: String,
    /// Extra environment for the process (applies from its next start).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ProcNode {
    pub fn agent_url(&self) -> String {
        format!("ws://{}", self.agent)
    }
}

/// Several gateway processes forming one cluster.
pub struct ProcCluster {
    pub name: String,
    pub db_url: String,
    pub nodes: Vec<ProcNode>,
    logs: tempfile::TempDir,
    heartbeat_ms: u32,
}

impl ProcCluster {
    /// Runs `test` on an `n`-node cluster, then stops every process and deletes the cluster's
    /// Redis keys, streams and database, whether `test` passed or panicked.
    pub async fn run<F, Fut>(n: usize, test: F)
    where
        F: FnOnce(ProcCluster) -> Fut,
        Fut: std::future::Future<Output = ProcCluster>,
    {
        Self::run_with(n, |_| (REDIS.to_owned(), AMQP.to_owned()), test).await
    }

    /// Like [`ProcCluster::run`], with each node's Redis and AMQP URLs chosen by `urls(i)` (to put
    /// a proxy or a private server in between).
    pub async fn run_with<F, Fut>(n: usize, urls: impl Fn(usize) -> (String, String), test: F)
    where
        F: FnOnce(ProcCluster) -> Fut,
        Fut: std::future::Future<Output = ProcCluster>,
    {
        let name = format!("strait-test-{:08x}", rand::random::<u32>());
        TempDatabase::with(PG_ADMIN, |db_url| async move {
            let mut c = ProcCluster {
                name: name.clone(),
                db_url,
                nodes: Vec::new(),
                logs: tempfile::tempdir().unwrap(),
                heartbeat_ms: 200,
            };
            for i in 0..n {
                let (redis, amqp) = urls(i);
                c.nodes.push(ProcNode {
                    id: format!("node-{}", (b'a' + i as u8) as char),
                    agent: free_addr(),
                    http: free_addr(),
                    ops: free_addr(),
                    api: free_addr(),
                    redis,
                    amqp,
                    env: Vec::new(),
                    child: None,
                });
            }
            for i in 0..n {
                c.start(i).await;
            }
            let node_ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
            let outcome = AssertUnwindSafe(test(c)).catch_unwind().await;
            let c = match outcome {
                Ok(c) => Some(c),
                Err(p) => {
                    cleanup_shared(&name, &node_ids).await;
                    std::panic::resume_unwind(p)
                }
            };
            if let Some(mut c) = c {
                for i in 0..c.nodes.len() {
                    c.kill(i);
                }
            }
            cleanup_shared(&name, &node_ids).await;
        })
        .await
    }

    /// Starts (or restarts) node `i` and waits until it is ready.
    pub async fn start(&mut self, i: usize) {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.path().join(format!("{}.log", n.id)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strait-gateway"))
            .args(["serve", "--node-id", &n.id, "--cluster", &self.name])
            .args([
                "--redis-url",
                &n.redis,
                "--amqp-url",
                &n.amqp,
                "--database-url",
                &self.db_url,
            ])
            .args(["--heartbeat-ms", &self.heartbeat_ms.to_string()])
            .args([
                "--agent-listen",
                &n.agent.to_string(),
                "--http-listen",
                &n.http.to_string(),
            ])
            .args(["--ops-listen", &n.ops.to_string(), "--api-listen", &n.api.to_string()])
            .env("RUST_LOG", "info")
            .envs(n.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let ready = format!("http://{}/readyz", n.ops);
        self.nodes[i].child = Some(child);
        for _ in 0..400 {
            if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                panic!("{} exited with {status}:\n{}", self.nodes[i].id, self.log(i));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} not ready:\n{}", self.nodes[i].id, self.log(i));
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (drain).
    #[allow(dead_code)] // used by the rolling-restart test
    pub async fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let status = tokio::task::spawn_blocking(move || c.wait()).await.unwrap().unwrap();
            assert!(
                status.success(),
                "{} exited with {status}:\n{}",
                self.nodes[i].id,
                self.log(i)
            );
        }
    }

    /// The node's log so far (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.logs.path().join(format!("{}.log", self.nodes[i].id))).unwrap_or_default()
    }

    /// Creates an agent identity in the cluster's store.
    pub async fn add_agent(&self, name: &str) -> AgentToken {
        crate::harness::create_agent(&PgStore::connect(&self.db_url).await.unwrap(), name).await
    }

    /// Stores a TCP route served by node `i` only.
    pub async fn route(&self, i: usize, agent: &str, service: &str) -> SocketAddr {
        let listen = free_addr();
        let store = PgStore::connect(&self.db_url).await.unwrap();
        store
            .add_route(strait_gateway::store::Route {
                listen,
                agent: AgentName::new(agent).unwrap(),
                service: service.into(),
                node: Some(self.nodes[i].id.clone()),
            })
            .await
            .unwrap();
        crate::harness::eventually(Duration::from_secs(10), "route listening", || async move {
            std::net::TcpListener::bind(listen).is_err()
        })
        .await;
        listen
    }

    /// A client whose `<agent>.localhost` names resolve to node `i`'s ingress.
    pub fn client(&self, i: usize, agents: &[&str]) -> reqwest::Client {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(120));
        for a in agents {
            b = b.resolve(&format!("{a}.localhost"), self.nodes[i].http);
        }
        b.build().unwrap()
    }

    pub fn url(&self, i: usize, agent: &str, path: &str) -> String {
        format!("http://{agent}.localhost:{}{path}", self.nodes[i].http.port())
    }

    pub async fn metrics(&self, i: usize) -> String {
        reqwest::get(format!("http://{}/metrics", self.nodes[i].ops))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `agent`'s presence is on node `i` (its session is registered cluster-wide).
    pub async fn wait_presence(&self, agent: &str, i: usize) {
        let dir = strait_gateway::directory::RedisDirectory::connect(REDIS, &format!("{}:", self.name))
            .await
            .unwrap();
        let (a, want) = (AgentName::new(agent).unwrap(), self.nodes[i].id.clone());
        let dir = std::sync::Arc::new(dir);
        crate::harness::eventually(Duration::from_secs(15), "agent presence on the node", || {
            let (dir, a, want) = (dir.clone(), a.clone(), want.clone());
            async move {
                use strait_gateway::directory::Directory;
                dir.presence(&a).await.ok().flatten().is_some_and(|p| p.node_id == want)
            }
        })
        .await;
    }
}

async fn cleanup_shared(name: &str, nodes: &[String]) {
    if let Ok(dir) = strait_gateway::directory::RedisDirectory::connect(REDIS, &format!("{name}:")).await {
        let _ = dir.delete_all_keys().await;
    }
    for n in nodes {
        let _ = strait_bus::delete_stream(AMQP, &format!("{name}.dispatch.{n}")).await;
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
