//! Backend outages under a real cluster: the bus (RabbitMQ) connection cut and restored while
//! streams cross it, and the directory's Redis restarted empty while an agent is connected.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use strait_agent::{AgentHandle, AgentStatus};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::harness::*;
use crate::http::metric_value;
use crate::procs::{ProcCluster, REDIS};
use crate::real_cluster::agent_cfg;

const RABBITMQ: &str = "127.0.0.1:5672";

/// Runs `test`; if it panics, prints every node's log first (the panic then goes on).
async fn with_logs<T>(c: &ProcCluster, test: impl std::future::Future<Output = T>) -> T {
    match AssertUnwindSafe(test).catch_unwind().await {
        Ok(v) => v,
        Err(p) => {
            for (i, n) in c.nodes.iter().enumerate() {
                eprintln!("===== log of {} =====\n{}", n.id, c.log(i));
            }
            std::panic::resume_unwind(p)
        }
    }
}

/// Awaits a spawned task, re-raising its panic with the original message.
async fn joined<T>(h: JoinHandle<T>) -> T {
    h.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A TCP proxy to RabbitMQ that the test can cut: one per node, so an outage hits one node's bus
/// connections (publisher and consumers) and nothing else.
struct BusProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl BusProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let task = tokio::spawn({
            let (open, conns) = (open.clone(), conns.clone());
            async move {
                loop {
                    let Ok((mut down, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(down); // refused while cut: the client sees the connection closed at once
                        continue;
                    }
                    let h = tokio::spawn(async move {
                        let Ok(mut up) = TcpStream::connect(RABBITMQ).await else {
                            return;
                        };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    });
                    let mut conns = conns.lock().unwrap();
                    conns.retain(|c| !c.is_finished());
                    conns.push(h.abort_handle());
                }
            }
        });
        BusProxy {
            addr,
            open,
            conns,
            task,
        }
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.addr.port())
    }

    /// Closes every proxied connection (both ends) and refuses new ones until [`BusProxy::restore`];
    /// returns how many live connections it closed.
    fn cut(&self) -> usize {
        self.open.store(false, Ordering::SeqCst);
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        let live = conns.iter().filter(|c| !c.is_finished()).count();
        for c in conns {
            c.abort();
        }
        live
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for BusProxy {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Counts the bytes read through it, so the test can time its cuts by progress.
struct Counted<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = (buf.filled().len() - before) as u64;
        self.n.fetch_add(got, Ordering::SeqCst);
        res
    }
}

/// Waits until `progress` reaches `at`; fails with `what` if the reader ends or stalls first.
async fn wait_progress(progress: &AtomicU64, at: u64, reader: &mut JoinHandle<u64>, what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::SeqCst) < at {
        if reader.is_finished() {
            let got = joined(std::mem::replace(reader, tokio::spawn(async { 0 }))).await;
            panic!("{what}: the transfer ended at byte {got}, before byte {at}");
        }
        assert!(
            Instant::now() < end,
            "{what}: stalled at byte {} (waiting for byte {at})",
            progress.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Cuts `proxies` for `outage`, then restores them; asserts each cut closed some bus connection.
async fn outage(proxies: &[(&str, &BusProxy)], outage: Duration) {
    for (name, p) in proxies {
        let closed = p.cut();
        assert!(closed > 0, "{name}'s proxy had no bus connection to cut");
    }
    tokio::time::sleep(outage).await;
    for (_, p) in proxies {
        p.restore();
    }
}

#[actix_rt::test]
async fn bus_outage_loses_and_duplicates_nothing() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let backend = Backend::start().await;
    let proxies = [BusProxy::start().await, BusProxy::start().await];
    let urls: Vec<String> = proxies.iter().map(BusProxy::amqp_url).collect();
    let proxies = &proxies;
    ProcCluster::run_with(
        2,
        move |i| (REDIS.to_owned(), urls[i].clone()),
        |c| async move {
            let token = c.add_agent("alpha").await;
            let agent = AgentHandle::spawn(agent_cfg(
                &c,
                token,
                1,
                &[backend.url(), format!("echo={}", echo.url())],
            ));
            with_logs(&c, async {
                let (a, b) = (("node A", &proxies[0]), ("node B", &proxies[1]));
                assert_eq!(agent.connected(Duration::from_secs(20)).await.unwrap(), "node-b");
                c.wait_presence("alpha", 1).await;
                let listen = c.route(0, "alpha", "echo").await;

                // A long echo A -> bus -> B -> agent -> B -> bus -> A, with each node's bus cut once.
                const LEN: u64 = 64 << 20;
                let progress = Arc::new(AtomicU64::new(0));
                let (rd, mut wr) = TcpStream::connect(listen).await.unwrap().into_split();
                let writer = tokio::spawn(async move {
                    write_pattern(&mut wr, LEN, 61).await;
                    let _ = wr.shutdown().await;
                });
                let mut reader = tokio::spawn({
                    let n = progress.clone();
                    async move { read_pattern(&mut Counted { inner: rd, n }, 61).await }
                });
                wait_progress(&progress, 4 << 20, &mut reader, "echo before any outage").await;
                outage(&[a], Duration::from_millis(1500)).await;
                let resumed = progress.load(Ordering::SeqCst) + (4 << 20);
                wait_progress(&progress, resumed, &mut reader, "echo after node A's bus outage").await;
                outage(&[b], Duration::from_millis(1500)).await;
                let got = tokio::time::timeout(Duration::from_secs(120), joined(reader))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "echo hung at byte {} after node B's bus outage",
                            progress.load(Ordering::SeqCst)
                        )
                    });
                assert_eq!(got, LEN, "the echo came back short (or long)");
                joined(writer).await;

                // An HTTP download B -> bus -> A, across both nodes' buses cut at once.
                const DL: u64 = 32 << 20;
                let res = c
                    .client(0, &["alpha"])
                    .get(c.url(0, "alpha", &format!("/bytes/{DL}?seed=62")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                let progress = Arc::new(AtomicU64::new(0));
                let mut reader = tokio::spawn({
                    let n = progress.clone();
                    async move {
                        let mut body = res.bytes_stream();
                        while let Some(chunk) = body.next().await {
                            let Ok(chunk) = chunk else { break };
                            let pos = n.load(Ordering::SeqCst);
                            for (k, byte) in chunk.iter().enumerate() {
                                let at = pos + k as u64;
                                assert_eq!(*byte, pattern(62, at), "download byte {at} differs");
                            }
                            n.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        }
                        n.load(Ordering::SeqCst)
                    }
                });
                wait_progress(&progress, 4 << 20, &mut reader, "download before the outage").await;
                outage(&[a, b], Duration::from_millis(1500)).await;
                let got = tokio::time::timeout(Duration::from_secs(120), joined(reader))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "download hung at byte {} after the outage",
                            progress.load(Ordering::SeqCst)
                        )
                    });
                assert_eq!(got, DL, "the download came back short (or long)");

                // It all crossed the bus, and the agent never left node B.
                let published = metric_value(&c.metrics(1).await, "strait_bus_envelopes_total{event=\"published\"}");
                assert!(published > 0, "nothing crossed the bus");
                assert_eq!(
                    *agent.status().borrow(),
                    AgentStatus::Connected {
                        node_id: "node-b".into()
                    }
                );
            })
            .await;
            agent.kill();
            c
        },
    )
    .await;
}

/// A redis-server of this test's own, killed when dropped (also when the test fails).
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    async fn start() -> Self {
        let port = free_addr().port();
        let mut r = PrivateRedis { port, child: None };
        r.spawn();
        wait_pong(port).await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL: whatever it held is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it, empty, on its port (see [`wait_pong`] for when it serves).
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
    }
}

/// Waits until the Redis on `port` answers `PING`.
async fn wait_pong(port: u16) {
    use tokio::io::AsyncReadExt;
    for _ in 0..500 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
                    Ok(Ok(_)) if &buf == b"+PONG\r\n"
                )
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("private redis-server on port {port} did not answer");
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[actix_rt::test]
async fn redis_restart_keeps_agents_reachable() {
    let backend = Backend::start().await;
    let redis = Arc::new(Mutex::new(PrivateRedis::start().await));
    let (url, port) = {
        let r = redis.lock().unwrap();
        (r.url(), r.port)
    };
    let (redis_in_test, url2) = (redis.clone(), url.clone());
    ProcCluster::run_with(
        3,
        move |_| (url.clone(), crate::procs::AMQP.to_owned()),
        |c| async move {
            let token = c.add_agent("alpha").await;
            let agent = AgentHandle::spawn(agent_cfg(&c, token, 1, &[backend.url()]));
            with_logs(&c, async {
                assert_eq!(agent.connected(Duration::from_secs(20)).await.unwrap(), "node-b");
                let http = c.client(0, &["alpha"]);
                let get = |seed: u64| {
                    let req = http
                        .get(c.url(0, "alpha", &format!("/bytes/3000?seed={seed}")))
                        .timeout(Duration::from_secs(2));
                    async move {
                        match req.send().await {
                            Ok(r) if r.status() == 200 => check_pattern(r, seed).await == 3000,
                            _ => false,
                        }
                    }
                };
                eventually(Duration::from_secs(15), "requests from A reach the agent on B", || {
                    get(1)
                })
                .await;

                // Every status change from here on is a reconnect, which must not happen.
                let mut status = agent.status();
                status.borrow_and_update();
                let changes = Arc::new(Mutex::new(Vec::<AgentStatus>::new()));
                let watcher = tokio::spawn({
                    let changes = changes.clone();
                    async move {
                        while status.changed().await.is_ok() {
                            let s = status.borrow_and_update().clone();
                            changes.lock().unwrap().push(s);
                        }
                    }
                });

                redis_in_test.lock().unwrap().kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                redis_in_test.lock().unwrap().spawn();
                let restarted = Instant::now();
                wait_pong(port).await;

                // Presence comes back from B's heartbeat, and requests through A with it.
                let dir = strait_gateway::directory::RedisDirectory::connect(&url2, &format!("{}:", c.name))
                    .await
                    .unwrap();
                let alpha = strait_schema::AgentName::new("alpha").unwrap();
                let (mut presence_back, mut served_after) = (None, None);
                let mut seed = 100;
                while presence_back.is_none() || served_after.is_none() {
                    use strait_gateway::directory::Directory;
                    if presence_back.is_none()
                        && dir
                            .presence(&alpha)
                            .await
                            .ok()
                            .flatten()
                            .is_some_and(|p| p.node_id == "node-b")
                    {
                        presence_back = Some(restarted.elapsed());
                    }
                    seed += 1;
                    if served_after.is_none() && get(seed).await {
                        served_after = Some(restarted.elapsed());
                    }
                    assert!(
                        restarted.elapsed() < Duration::from_secs(10),
                        "no recovery within 10 s of the Redis restart: presence back after {presence_back:?}, \
                         requests from A after {served_after:?}; agent status {:?}",
                        *agent.status().borrow()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (presence_back, served_after) = (presence_back.unwrap(), served_after.unwrap());
                eprintln!(
                    "redis restart: presence back after {presence_back:?}, requests from A after {served_after:?}"
                );
                assert!(
                    presence_back < Duration::from_secs(3),
                    "presence was missing for {presence_back:?} after the Redis restart"
                );
                assert!(
                    served_after < Duration::from_secs(3),
                    "requests from A failed for {served_after:?} after the Redis restart"
                );

                // And it stays that way: a few more heartbeats of steady requests.
                let steady = Instant::now();
                while steady.elapsed() < Duration::from_secs(2) {
                    seed += 1;
                    assert!(
                        get(seed).await,
                        "a request failed {:?} after recovery",
                        steady.elapsed()
                    );
                }
                // A's presence cache lost its announcements with the link; it answers again once
                // A has re-subscribed (until then every lookup went to Redis).
                let cached =
                    || async { metric_value(&c.metrics(0).await, "strait_presence_lookups_total{source=\"cache\"}") };
                let before = cached().await;
                let next = std::sync::atomic::AtomicU64::new(seed + 1);
                eventually(
                    Duration::from_secs(10),
                    "A answers from its presence cache again",
                    || async {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        assert!(get(seed).await, "a request failed after recovery");
                        cached().await > before
                    },
                )
                .await;
                assert!(
                    c.log(0).contains("lost presence announcements"),
                    "A did not notice that its announcements stopped"
                );
                watcher.abort();
                let changes = changes.lock().unwrap().clone();
                assert!(
                    changes.is_empty(),
                    "the agent was disconnected by the Redis restart; its status went {changes:?}"
                );
            })
            .await;
            agent.kill();
            c
        },
    )
    .await;
    drop(redis);
}

/// What a node has read of its peers' bus features stands through a Redis outage, so a blip
/// does not send the cluster back to the older forms; a peer it could not read yet gets the
/// older form, and is read on its next contact once Redis is back.
#[tokio::test]
async fn peers_keep_what_they_read_through_a_redis_outage() {
    use strait_gateway::cluster::{Peers, FEATURES, FEATURE_HTTP};
    use strait_gateway::directory::{Directory, RedisDirectory};
    let mut redis = PrivateRedis::start().await;
    let dir = RedisDirectory::connect(&redis.url(), "strait-peers:").await.unwrap();
    let ttl = Duration::from_secs(30);
    dir.node_heartbeat("b", FEATURES, ttl).await.unwrap();
    dir.node_heartbeat("c", FEATURES, ttl).await.unwrap();
    let peers = Peers::default();
    peers.learn(&dir, "b").await;
    assert!(peers.lists("b", FEATURE_HTTP));

    redis.kill();
    let started = Instant::now();
    peers.refresh(&dir).await;
    assert!(peers.lists("b", FEATURE_HTTP), "a failed re-read keeps what was read");
    peers.learn(&dir, "c").await;
    assert!(!peers.lists("c", FEATURE_HTTP), "a peer not read gets the older form");
    println!("two reads against a dead Redis took {:?}", started.elapsed());

    redis.spawn();
    wait_pong(redis.port).await;
    // Restarted empty: c heartbeats again, as a live node would.
    eventually(Duration::from_secs(10), "a heartbeat after the restart", || async {
        dir.node_heartbeat("c", FEATURES, ttl).await.is_ok()
    })
    .await;
    peers.learn(&dir, "c").await;
    assert!(peers.lists("c", FEATURE_HTTP), "read on its next contact");
}
