//! Test harness: a gateway node on ephemeral loopback ports with a temp data dir, a real HTTP
//! backend, agents, and helpers to wait on conditions without sleeping blindly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::{Request, Response};
use strait_agent::{AgentConfig, AgentHandle};
use strait_gateway::store::{now_ms, AgentRecord};
use strait_gateway::{Listeners, NodeConfig, NodeState, Phase};
use strait_schema::{AgentName, AgentToken, Secret};
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// A free loopback address for a child listener (see `strait_gateway::ports`).
pub fn free_addr() -> SocketAddr {
    strait_gateway::ports::free_loopback_addr().expect("a free loopback port")
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {within:?} waiting for: {what}");
}

/// Deterministic bytes: byte `i` of stream `seed`.
pub fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (x >> 56) as u8
}

/// A streaming body of `len` pattern bytes in 64 KiB chunks, generated lazily.
pub fn pattern_stream(
    len: u64,
    seed: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let chunk = 64 * 1024u64;
    futures_util::stream::iter((0..len.div_ceil(chunk)).map(move |c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        Ok(Bytes::from((start..end).map(|i| pattern(seed, i)).collect::<Vec<u8>>()))
    }))
}

/// Reads a response body, checking it against the pattern as it arrives; returns its length.
pub async fn check_pattern(resp: reqwest::Response, seed: u64) -> u64 {
    assert_eq!(resp.status(), 200, "expected a tunnelled body, got an error answer");
    let mut pos = 0u64;
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.expect("body chunk");
        for b in chunk.iter() {
            assert_eq!(*b, pattern(seed, pos), "byte {pos} differs");
            pos += 1;
        }
    }
    pos
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The backend the agents expose: a real HTTP/1.1 server on 127.0.0.1:0.
///
/// - `/echo`: streams the request body back; `x-method` and `x-uri` echo the request line.
/// - `/inspect`: JSON of method, uri and headers (in order, repeated ones repeated).
/// - `/status/<code>`: that status, with two `set-cookie` headers and a small body.
/// - `/bytes/<n>?seed=S[&chunked=1]`: n pattern bytes (with or without content-length).
/// - `/slow/<ms>`: answers after `ms`.
/// - `/drip`: a head, then 1 KiB every 50 ms, forever.
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(sock);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, hyper::service::service_fn(serve))
                        .await;
                });
            }
        });
        Backend { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (first, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let resp = match first {
        "echo" => {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let mut b = Response::builder().header("x-method", method).header("x-uri", uri);
            if let Some(len) = req.headers().get("content-length") {
                b = b.header("content-length", len.clone());
            }
            b.body(req.into_body().map_err(std::io::Error::other).boxed()).unwrap()
        }
        "inspect" => {
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let j = serde_json::json!({ "method": req.method().as_str(), "uri": req.uri().to_string(), "headers": headers });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(j.to_string()))
                .unwrap()
        }
        "status" => {
            let code: u16 = rest.parse().unwrap_or(500);
            let body = if code == 204 || code == 304 {
                Empty::new().map_err(|never| match never {}).boxed()
            } else {
                full(format!("status {code}"))
            };
            Response::builder()
                .status(code)
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .header("x-custom", "yes")
                .body(body)
                .unwrap()
        }
        "bytes" => {
            let n: u64 = rest.parse().unwrap_or(0);
            let seed: u64 = param("seed").and_then(|s| s.parse().ok()).unwrap_or(1);
            let s = pattern_stream(n, seed).map(|r| r.map(BodyFrame::data));
            let mut b = Response::builder();
            if param("chunked").is_none() {
                b = b.header("content-length", n);
            }
            b.body(BodyExt::boxed(StreamBody::new(s))).unwrap()
        }
        "fill" => {
            // n bytes of one shared chunk: cheap to produce, for volume tests.
            let n: u64 = rest.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![0xA5u8; 256 * 1024]);
            let s = futures_util::stream::iter((0..n.div_ceil(chunk.len() as u64)).map(move |i| {
                let left = n - i * chunk.len() as u64;
                Ok::<_, std::io::Error>(BodyFrame::data(chunk.slice(..(left.min(chunk.len() as u64) as usize))))
            }));
            Response::builder()
                .header("content-length", n)
                .body(BodyExt::boxed(StreamBody::new(s)))
                .unwrap()
        }
        "count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.map(|f| f.into_data()) {
                    n += d.map(|d| d.len() as u64).unwrap_or(0);
                } else {
                    break;
                }
            }
            Response::builder().body(full(n.to_string())).unwrap()
        }
        "slow" => {
            let ms: u64 = rest.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::builder().body(full("slow")).unwrap()
        }
        "drip" => {
            let s = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((
                    Ok::<_, std::io::Error>(BodyFrame::data(Bytes::from(vec![b'x'; 1024]))),
                    (),
                ))
            });
            Response::builder().body(BodyExt::boxed(StreamBody::new(s))).unwrap()
        }
        _ => Response::builder().status(404).body(full("no such route")).unwrap(),
    };
    Ok(resp)
}

/// A gateway node on ephemeral loopback ports, serving inside the test's actix system.
pub struct TestNode {
    pub state: Arc<NodeState>,
    pub agent_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<actix_rt::task::JoinHandle<()>>,
    _dir: Arc<tempfile::TempDir>,
}

impl TestNode {
    pub async fn embedded() -> Self {
        Self::with(|_| {}).await
    }

    /// A node with test-friendly timings, adjusted by `f`.
    pub async fn with(f: impl FnOnce(&mut NodeConfig)) -> Self {
        Self::in_dir(Arc::new(tempfile::tempdir().unwrap()), f).await
    }

    /// A node on shared backends: several of these form an in-process cluster.
    pub async fn on_backends(backends: &SharedBackends, node_id: &str, f: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = backends.dir.clone();
        let (store, directory, bus) = (backends.store.clone(), backends.directory.clone(), backends.bus.clone());
        Self::build(
            dir,
            move |cfg| {
                cfg.node_id = node_id.to_owned();
                f(cfg)
            },
            move |cfg| async move { NodeState::with_backends(cfg, store, directory, bus) },
        )
        .await
    }

    pub async fn in_dir(dir: Arc<tempfile::TempDir>, f: impl FnOnce(&mut NodeConfig)) -> Self {
        Self::build(dir, f, |cfg| async move { NodeState::open(cfg).await.unwrap() }).await
    }

    async fn build<Fut>(
        dir: Arc<tempfile::TempDir>,
        f: impl FnOnce(&mut NodeConfig),
        make: impl FnOnce(NodeConfig) -> Fut,
    ) -> Self
    where
        Fut: std::future::Future<Output = Arc<NodeState>>,
    {
        // RUST_LOG=debug shows the node's and agents' logs for a failing test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()))
            .with_test_writer()
            .try_init();
        let mut cfg = NodeConfig::embedded(dir.path().to_path_buf());
        cfg.heartbeat = Duration::from_millis(500);
        cfg.revocation_poll = Duration::from_millis(100);
        cfg.drain_grace = Duration::from_secs(2);
        cfg.workers = 2;
        // `scripts/test` runs this suite once more with the request relay (gateway processes the
        // tests start read the same variable).
        if std::env::var("STRAIT_HTTP_RELAY").as_deref() == Ok("request") {
            cfg.http_relay = strait_gateway::config::HttpRelay::Request;
        }
        f(&mut cfg);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(any, any, any).unwrap();
        let (agent_addr, http_addr, ops_addr) = (
            listeners.agent.local_addr().unwrap(),
            listeners.http.local_addr().unwrap(),
            listeners.ops.local_addr().unwrap(),
        );
        let state = make(cfg).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = actix_rt::spawn(async move {
            strait_gateway::run(listeners, st, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let mut phase = state.phase.subscribe();
        tokio::time::timeout(Duration::from_secs(10), phase.wait_for(|p| *p == Phase::Ready))
            .await
            .unwrap()
            .unwrap();
        TestNode {
            state,
            agent_addr,
            http_addr,
            ops_addr,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    pub fn agent_url(&self) -> String {
        format!("ws://{}", self.agent_addr)
    }

    /// Creates an agent identity in the node's store.
    pub async fn add_agent(&self, name: &str) -> AgentToken {
        create_agent(self.state.store.as_ref(), name).await
    }

    /// Adds an agent, starts it exposing `upstream` as its default service, and waits for Welcome.
    pub async fn connect_agent(&self, name: &str, upstream: &str) -> AgentHandle {
        let token = self.add_agent(name).await;
        let cfg = AgentConfig::new(&self.agent_url(), token)
            .unwrap()
            .expose(upstream)
            .unwrap();
        let agent = AgentHandle::spawn(cfg);
        agent.connected(Duration::from_secs(10)).await.expect("agent connects");
        self.wait_agent(name).await;
        agent
    }

    /// Waits until this node's directory shows `agent` connected somewhere in the cluster.
    pub async fn sees_presence(&self, agent: &str) {
        let (st, name) = (self.state.clone(), AgentName::new(agent).unwrap());
        eventually(Duration::from_secs(5), "presence visible to this node", || {
            let (st, name) = (st.clone(), name.clone());
            async move { st.directory.presence(&name).await.unwrap().is_some() }
        })
        .await;
    }

    /// Waits until the node has an active session for `name`.
    pub async fn wait_agent(&self, name: &str) {
        let a = AgentName::new(name).unwrap();
        let st = self.state.clone();
        eventually(Duration::from_secs(10), "agent session registered", || {
            let ok = st.sessions.get(&a).is_some();
            async move { ok }
        })
        .await;
    }

    /// An HTTP client that resolves `*.localhost` names to this node's ingress.
    pub fn client(&self, agents: &[&str]) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(120));
        for a in agents {
            b = b.resolve(&format!("{a}.localhost"), self.http_addr);
        }
        b.build().unwrap()
    }

    pub fn url(&self, agent: &str, path: &str) -> String {
        format!("http://{agent}.localhost:{}{path}", self.http_addr.port())
    }

    /// The status of a GET of `path` through `agent`'s tunnel.
    pub async fn get_status(&self, agent: &str, path: &str) -> reqwest::StatusCode {
        let res = self.client(&[agent]).get(self.url(agent, path)).send().await.unwrap();
        res.status()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.ops_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A keep-alive caller's connection to `agent` through this node, served once and left
    /// idle: with the carried relay it holds its stream on the agent's node.
    pub async fn idle_caller(&self, agent: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let host = format!("{agent}.localhost:{}", self.http_addr.port());
        let mut s = tokio::net::TcpStream::connect(self.http_addr).await.unwrap();
        s.write_all(format!("GET /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, _) = read_answer(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        s
    }

    /// Waits for `series` to read `want`: a request is counted once its answer is written, so
    /// the caller may hold the whole answer a moment before the count moves.
    pub async fn metric_reaches(&self, series: &str, want: u64) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let got = crate::http::metric_value(&self.metrics().await, series);
            if got == want {
                return;
            }
            assert!(Instant::now() < end, "{series} stayed at {got}, expected {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// TCP services for byte-stream tests, each on 127.0.0.1:0.
pub struct TcpServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`TcpServer`] does with each connection.
#[derive(Clone, Copy)]
pub enum TcpBehaviour {
    /// Copies bytes back as they come; half-closes after the caller does.
    Echo,
    /// Reads to EOF, then answers `got <n> bytes` and closes.
    CountThenReply,
    /// Writes `n` pattern bytes (seed 77) and reads (and checks) `n` pattern bytes (seed 78), at once.
    Both(u64),
    /// Writes `n` pattern bytes (seed 55) as fast as the caller takes them, then closes.
    Source(u64),
    /// Holds the connection and never sends anything.
    Silent,
}

impl TcpServer {
    pub async fn start(behaviour: TcpBehaviour) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let (mut rd, mut wr) = sock.into_split();
                    match behaviour {
                        TcpBehaviour::Echo => {
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        }
                        TcpBehaviour::CountThenReply => {
                            let mut n = 0usize;
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(k) = rd.read(&mut buf).await {
                                if k == 0 {
                                    break;
                                }
                                n += k;
                            }
                            let _ = wr.write_all(format!("got {n} bytes").as_bytes()).await;
                            let _ = wr.shutdown().await;
                        }
                        TcpBehaviour::Both(n) => {
                            let w = tokio::spawn(async move {
                                write_pattern(&mut wr, n, 77).await;
                                let _ = wr.shutdown().await;
                                wr
                            });
                            assert_eq!(
                                read_pattern(&mut rd, 78).await,
                                n,
                                "server side of the bidirectional test"
                            );
                            let _ = w.await;
                        }
                        TcpBehaviour::Source(n) => {
                            write_pattern(&mut wr, n, 55).await;
                            let _ = wr.shutdown().await;
                        }
                        TcpBehaviour::Silent => {
                            let mut buf = [0u8; 1024];
                            while let Ok(k) = rd.read(&mut buf).await {
                                if k == 0 {
                                    break;
                                }
                            }
                            drop(wr);
                        }
                    }
                });
            }
        });
        TcpServer { addr, task }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `n` pattern bytes in 64 KiB chunks.
pub async fn write_pattern<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, n: u64, seed: u64) {
    use tokio::io::AsyncWriteExt;
    let mut s = std::pin::pin!(pattern_stream(n, seed));
    while let Some(chunk) = s.next().await {
        if w.write_all(&chunk.unwrap()).await.is_err() {
            return;
        }
    }
}

/// Reads to EOF, checking the pattern; returns how many bytes matched.
pub async fn read_pattern<R: tokio::io::AsyncRead + Unpin>(r: &mut R, seed: u64) -> u64 {
    use tokio::io::AsyncReadExt;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return pos,
            Ok(k) => k,
        };
        for b in &buf[..k] {
            assert_eq!(*b, pattern(seed, pos), "byte {pos} differs");
            pos += 1;
        }
    }
}

impl TestNode {
    /// Stores a TCP route, pinned to this node, on a free loopback port to `agent`/`service`, and
    /// waits until it listens.
    pub async fn route(&self, agent: &str, service: &str) -> SocketAddr {
        let listen = free_addr();
        self.state
            .store
            .add_route(strait_gateway::store::Route {
                listen,
                agent: AgentName::new(agent).unwrap(),
                service: service.into(),
                node: Some(self.state.cfg.node_id.clone()),
            })
            .await
            .unwrap();
        // Probe without connecting (a connection would open a stream): once the node listens,
        // the address is taken.
        eventually(Duration::from_secs(10), "route listening", || async move {
            std::net::TcpListener::bind(listen).is_err()
        })
        .await;
        listen
    }

    /// Adds an agent exposing the given `[NAME=]URL` services and waits for it.
    pub async fn connect_agent_with(&self, name: &str, exposes: &[String]) -> AgentHandle {
        let token = self.add_agent(name).await;
        let mut cfg = AgentConfig::new(&self.agent_url(), token).unwrap();
        for e in exposes {
            cfg = cfg.expose(e).unwrap();
        }
        let agent = AgentHandle::spawn(cfg);
        agent.connected(Duration::from_secs(10)).await.expect("agent connects");
        self.wait_agent(name).await;
        agent
    }
}

/// Backends several in-process nodes share: the real single-node implementations, shared.
pub struct SharedBackends {
    pub dir: Arc<tempfile::TempDir>,
    pub store: Arc<dyn strait_gateway::store::Store>,
    pub directory: Arc<dyn strait_gateway::directory::Directory>,
    pub bus: Arc<dyn strait_bus::Bus>,
}

impl SharedBackends {
    pub fn in_process() -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        SharedBackends {
            store: Arc::new(strait_gateway::store::SqliteStore::open(dir.path()).unwrap()),
            directory: Arc::new(strait_gateway::directory::MemoryDirectory::new()),
            bus: Arc::new(strait_bus::InProcessBus::new()),
            dir,
        }
    }
}

/// A `Hello` for hand-driven agents (no capabilities, no services), signed with the token's secret.
pub fn signed_hello(token: &AgentToken, instance: &str, timestamp_ms: u64) -> strait_schema::Hello {
    let mut h = strait_schema::Hello {
        agent: token.agent.clone(),
        instance_id: instance.into(),
        key_id: token.key_id.clone(),
        timestamp_ms,
        nonce: rand::random(),
        signature: [0; 32],
        version: strait_schema::PROTOCOL_VERSION,
        capabilities: vec![],
        services: vec![],
    };
    h.signature = strait_schema::credentials::sign(&token.secret, &h);
    h
}

/// A hand-driven agent connection that completed its handshake and then only answers pings: it
/// looks alive to the node but never reconnects. Resolves `closed` when the node closes it.
pub async fn stale_looking_alive_agent(
    agent_url: &str,
    token: &AgentToken,
    instance: &str,
) -> tokio::sync::oneshot::Receiver<()> {
    use futures_util::SinkExt;
    use strait_schema::{decode, encode, Frame, Limits, Pong};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{agent_url}/v1/connect"))
        .await
        .unwrap();
    let h = signed_hello(token, instance, now_ms());
    ws.send(Message::Binary(encode(&Frame::Hello(h)).into())).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if let Message::Binary(b) = msg {
                if let Ok(Frame::Ping(p)) = decode(&b, &Limits::default()) {
                    let pong = encode(&Frame::Pong(Pong {
                        timestamp_ms: p.timestamp_ms,
                    }));
                    if ws.send(Message::Binary(pong.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// Creates agent `name` with a fresh key in `store` and returns its token.
pub async fn create_agent(store: &dyn strait_gateway::store::Store, name: &str) -> AgentToken {
    let token = AgentToken {
        agent: AgentName::new(name).unwrap(),
        key_id: "k1".into(),
        secret: Secret::generate(),
    };
    store
        .create_agent(AgentRecord {
            name: token.agent.clone(),
            key_id: token.key_id.clone(),
            secret: token.secret.clone(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        })
        .await
        .unwrap();
    token
}

/// Sends `bytes` on a fresh connection to `addr` and returns everything the node answers until
/// it closes the connection (at most 5 s), and how long that took.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the node closes the connection")
        .unwrap();
    (String::from_utf8_lossy(&answer).into_owned(), start.elapsed())
}

/// Reads one answer with a `content-length` from `s`: its head (lowercased) and its body.
pub async fn read_answer(s: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "connection closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, body)
}
