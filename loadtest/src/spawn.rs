//! Starting what is measured (`--spawn`): the backend, Strait gateways and agents, and a rathole
//! server/client pair, each on free loopback ports, each logging to a file in the run's work
//! directory, each killed when its [`Proc`] is dropped, so an aborted run leaves nothing behind.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strait_gateway::store::{now_ms, AgentRecord, SqliteStore, Store};
use strait_schema::{AgentName, AgentToken, Secret};
use tokio::time::Instant;

use crate::cluster::ClusterRun;
use crate::load::{connect_http, HttpTarget};
use crate::Error;

/// The binaries a spawned run drives.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `strait-gateway`.
    pub gateway: PathBuf,
    /// `strait-agent`.
    pub agent: PathBuf,
    /// This tool (it runs the backend as a child, so the backend has its own process and its
    /// own threads, as a real service would).
    pub loadtest: PathBuf,
    /// `rathole`, when on PATH.
    pub rathole: Option<PathBuf>,
    /// `release` or `debug`, from the directory the Strait binaries were found in.
    pub profile: String,
}

impl Bins {
    /// Finds the Strait binaries in `dir`, else next to this executable, else in
    /// `$CARGO_TARGET_DIR/release` (or `target/release`). The error names the build command.
    pub fn find(dir: Option<&Path>) -> Result<Bins, Error> {
        let me = std::env::current_exe().map_err(Error::io("locating this executable"))?;
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(d) = dir {
            candidates.push(d.to_path_buf());
        } else {
            if let Some(d) = me.parent() {
                candidates.push(d.to_path_buf());
                // Integration tests and `cargo run` live one level down (deps/).
                if let Some(up) = d.parent() {
                    candidates.push(up.to_path_buf());
                }
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target"));
            candidates.push(target.join("release"));
        }
        let found =
            candidates
                .iter()
                .find(|d| d.join("strait-gateway").is_file() && d.join("strait-agent").is_file())
                .ok_or_else(|| {
                    Error::Config(format!(
                    "strait-gateway and strait-agent not found in {}; build them with `cargo build --release --bins` \
                     (or point --bin-dir at them)",
                    candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
                ))
                })?;
        let profile = if found.components().any(|c| c.as_os_str() == "debug") {
            "debug"
        } else {
            "release"
        };
        let loadtest = if found.join("strait-loadtest").is_file() {
            found.join("strait-loadtest")
        } else {
            me
        };
        Ok(Bins {
            gateway: found.join("strait-gateway"),
            agent: found.join("strait-agent"),
            loadtest,
            rathole: which("rathole"),
            profile: profile.to_owned(),
        })
    }
}

/// The first executable `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A free loopback address for a child to listen on (see `strait_gateway::ports`: below the
/// ephemeral range, so no outgoing connection takes it before the child binds it).
pub fn free_addr() -> Result<SocketAddr, Error> {
    strait_gateway::ports::free_loopback_addr().map_err(Error::io("finding a free loopback port"))
}

/// Raises this process's open-file limit to its hard limit, before any child is spawned, so the
/// children inherit it (10,000 agents are 10,000 sockets on each side).
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// A child process, killed (SIGKILL) and reaped on drop. Its stdout and stderr go to a log
/// file; lines containing `needle` are counted (rathole reports each control channel so).
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    matches: Arc<AtomicUsize>,
}

impl Proc {
    /// Starts `cmd`, logging to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path, needle: Option<&'static str>) -> Result<Proc, Error> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(Error::io(format!("creating {}", log.display())))?;
        let file: Arc<LogFile> = Arc::new(std::sync::Mutex::new(file));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            Error::Spawn(format!(
                "starting {name} ({}): {e}",
                cmd.get_program().to_string_lossy()
            ))
        })?;
        let matches = Arc::new(AtomicUsize::new(0));
        if let Some(out) = child.stdout.take() {
            pump(out, file.clone(), needle, matches.clone());
        }
        if let Some(err) = child.stderr.take() {
            pump(err, file, needle, matches.clone());
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            matches,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory, KiB.
    pub fn rss_kib(&self) -> Result<u64, Error> {
        rss_kib(self.pid()).ok_or_else(|| Error::Spawn(format!("{} has no VmRSS (exited?)", self.name)))
    }

    /// How many output lines contained the needle so far.
    pub fn matches(&self) -> usize {
        self.matches.load(Ordering::Relaxed)
    }

    /// Errors (with the end of its log) if it has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Spawn(format!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            ))),
            Err(e) => Err(Error::io(format!("waiting for {}", self.name))(e)),
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Wraps `e` with the end of this process's log, so a failure says why.
    pub fn explain(&mut self, e: Error) -> Error {
        if let Err(dead) = self.check_alive() {
            return dead;
        }
        let tail = self.log_tail();
        if tail.is_empty() {
            e
        } else {
            Error::Spawn(format!("{e}; end of {} log:\n{tail}", self.name))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A log file shared by a child's two output pumps.
type LogFile = std::sync::Mutex<std::fs::File>;

fn pump(out: impl Read + Send + 'static, file: Arc<LogFile>, needle: Option<&'static str>, matches: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if needle.is_some_and(|n| line.contains(n)) {
                matches.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut f) = file.lock() {
                let _ = writeln!(f, "{line}");
            }
        }
    });
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::machine::proc_field(&status, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `GET path` on `addr`; returns the status and body as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    use http_body_util::BodyExt;
    let fut = async {
        let mut send = connect_http(addr).await?;
        let req = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(crate::body::BenchBody::Empty)
            .map_err(|e| Error::Http(e.to_string()))?;
        let res = send.send_request(req).await.map_err(|e| Error::Http(e.to_string()))?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Http(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| Error::Timeout(format!("GET {path} on {addr}")))?
}

/// The value of an unlabelled Prometheus gauge or counter on a node's `/metrics`.
pub async fn metric(ops: SocketAddr, name: &str) -> Result<f64, Error> {
    let (status, text) = http_get(ops, "/metrics").await?;
    if status != 200 {
        return Err(Error::Http(format!("/metrics answered {status}")));
    }
    parse_metric(&text, name).ok_or_else(|| Error::Http(format!("/metrics has no {name}")))
}

/// Finds `name value` (no labels) in Prometheus text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Polls `probe` every 50 ms until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut probe: F) -> Result<Duration, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < deadline {
        if probe().await {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::Timeout(format!("{what} (after {}s)", deadline.as_secs_f64())))
}

/// Where a gateway's durable state lives, as its admin subcommands (`agent add`, `route add`) are
/// told: the embedded store of a single node, or the Postgres database of a cluster.
#[derive(Debug, Clone)]
pub enum StoreAt {
    /// The embedded store in this directory.
    Dir(PathBuf),
    /// A cluster's Postgres database (URL).
    Database(String),
}

impl StoreAt {
    /// The `StoreArgs` flags that select it.
    fn args(&self) -> [std::ffi::OsString; 2] {
        match self {
            StoreAt::Dir(d) => ["--data-dir".into(), d.into()],
            StoreAt::Database(url) => ["--database-url".into(), url.into()],
        }
    }
}

/// Creates agents `names` in the embedded store in `data_dir` (before or while a gateway runs on
/// it) and returns their tokens.
///
/// With `gateway` (the binary that will serve the store), the first agent is created by
/// `strait-gateway agent add`, so the store's schema is the binary's own; the rest go straight
/// into the store through this crate's copy of the store code, much faster than one process per
/// agent. If that copy's migrations differ from the binary's (a tool built from other sources
/// than the binary), it falls back to the command for every agent: slower, never wrong.
pub async fn create_agents(
    gateway: Option<&Path>,
    data_dir: &Path,
    names: &[String],
) -> Result<Vec<AgentToken>, Error> {
    let mut tokens = Vec::with_capacity(names.len());
    let mut rest = names;
    let store_at = StoreAt::Dir(data_dir.to_path_buf());
    if let Some(bin) = gateway {
        let Some((first, others)) = names.split_first() else {
            return Ok(tokens);
        };
        tokens.push(add_agent(bin, &store_at, first).await?);
        rest = others;
    }
    if rest.is_empty() {
        return Ok(tokens);
    }
    let store = match SqliteStore::open(data_dir) {
        Ok(s) => s,
        Err(e) => {
            let Some(bin) = gateway else {
                return Err(e.into());
            };
            tracing::warn!(error = %e, "store schema differs from this tool's; creating agents one command at a time");
            for name in rest {
                tokens.push(add_agent(bin, &store_at, name).await?);
            }
            return Ok(tokens);
        }
    };
    for name in rest {
        let agent = AgentName::new(name).ok_or_else(|| Error::Config(format!("{name:?} is not a valid agent name")))?;
        let token = AgentToken {
            agent: agent.clone(),
            key_id: format!("k{:08x}", rand::random::<u32>()),
            secret: Secret::generate(),
        };
        store
            .create_agent(AgentRecord {
                name: agent,
                key_id: token.key_id.clone(),
                secret: token.secret.clone(),
                created_at_ms: now_ms(),
                revoked_at_ms: None,
            })
            .await?;
        tokens.push(token);
    }
    Ok(tokens)
}

/// `strait-gateway agent add NAME --token-only` on `store`, parsed: the binary that serves the
/// store writes its schema (and, on a fresh cluster database, runs its migrations).
pub async fn add_agent(bin: &Path, store: &StoreAt, name: &str) -> Result<AgentToken, Error> {
    let out = tokio::process::Command::new(bin)
        .args(["agent", "add", name, "--token-only"])
        .args(store.args())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .map_err(Error::io(format!("running {} agent add", bin.display())))?;
    if !out.status.success() {
        return Err(Error::Spawn(format!(
            "strait-gateway agent add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    AgentToken::parse(text.trim()).map_err(|e| Error::Spawn(format!("agent add printed no token: {e}")))
}

/// Adds a TCP route `listen -> agent/service` with `strait-gateway route add`, so the route is
/// written by the binary that serves it; `node` pins it to one cluster node (else every node
/// listens). `Ok(Err(why))` when this gateway has no TCP routes.
pub async fn add_route(
    bin: &Path,
    store: &StoreAt,
    listen: SocketAddr,
    agent: &AgentName,
    service: &str,
    node: Option<&str>,
) -> Result<Result<(), String>, Error> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "route",
        "add",
        "--tcp",
        &listen.to_string(),
        "--agent",
        agent.as_str(),
        "--service",
        service,
    ])
    .args(store.args());
    if let Some(node) = node {
        cmd.args(["--node", node]);
    }
    let out = cmd
        .env("RUST_LOG", "warn")
        .output()
        .await
        .map_err(Error::io(format!("running {} route add", bin.display())))?;
    if out.status.success() {
        Ok(Ok(()))
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Ok(Err(format!(
            "`strait-gateway route add` failed: {}",
            err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim()
        )))
    }
}

/// What a spawned gateway runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// A single node on the embedded store in this directory (agents and routes already there).
    Embedded(&'a Path),
    /// Node `node_id` of the cluster `run` (its Redis prefix, streams and database).
    Cluster {
        /// The node's id (its dispatch stream, the `--node` of pinned routes).
        node_id: &'a str,
        /// The run's cluster.
        run: &'a ClusterRun,
    },
}

/// A running `strait-gateway serve` on free loopback ports.
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// Agent WebSocket URL.
    pub ws_url: String,
    /// HTTP ingress.
    pub http: SocketAddr,
    /// Ops (`/metrics`).
    pub ops: SocketAddr,
}

impl Gateway {
    /// Starts a gateway on `backing` and waits until `/readyz` answers 200.
    pub async fn start(
        bins: &Bins,
        backing: Backing<'_>,
        log_dir: &Path,
        name: &str,
        max_streams: u32,
    ) -> Result<Gateway, Error> {
        let (agent, http, ops, api) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
        let mut cmd = Command::new(&bins.gateway);
        cmd.arg("serve")
            .arg("--agent-listen")
            .arg(agent.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--ops-listen")
            .arg(ops.to_string())
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--max-streams")
            .arg(max_streams.to_string())
            .env("RUST_LOG", "warn");
        match backing {
            Backing::Embedded(data_dir) => {
                cmd.arg("--data-dir").arg(data_dir);
            }
            Backing::Cluster { node_id, run } => {
                cmd.args(["--node-id", node_id, "--cluster", &run.name])
                    .args(["--redis-url", &run.services.redis, "--amqp-url", &run.services.amqp])
                    .args(["--database-url", &run.db_url]);
            }
        }
        let mut proc = Proc::spawn(name, cmd, log_dir, None)?;
        let ready = eventually(Duration::from_secs(30), "gateway /readyz", || async {
            matches!(http_get(ops, "/readyz").await, Ok((200, _)))
        })
        .await;
        if let Err(e) = ready {
            return Err(proc.explain(e));
        }
        Ok(Gateway {
            proc,
            ws_url: format!("ws://{agent}/v1/connect"),
            http,
            ops,
        })
    }

    /// Agents connected, from `/metrics`.
    pub async fn agents_connected(&self) -> Result<f64, Error> {
        metric(self.ops, "strait_agents_connected").await
    }
}

/// Starts one `strait-agent` process for `token` exposing `expose` specs (the token goes through
/// the environment, not the command line).
pub fn start_agent(
    bins: &Bins,
    gw: &Gateway,
    token: &AgentToken,
    expose: &[String],
    log_dir: &Path,
    name: &str,
) -> Result<Proc, Error> {
    let mut cmd = Command::new(&bins.agent);
    cmd.arg("--gateway")
        .arg(&gw.ws_url)
        .env("STRAIT_TOKEN", token.reveal())
        .env("RUST_LOG", "warn");
    for e in expose {
        cmd.arg("--expose").arg(e);
    }
    Proc::spawn(name, cmd, log_dir, None)
}

/// A gateway with one agent (`bench`) exposing the backend's HTTP server as its default service
/// and its TCP server as `bulk`, behind a TCP route: the stack the HTTP and TCP scenarios use.
pub struct StraitStack {
    /// The gateway.
    pub gateway: Gateway,
    /// The agent process.
    pub agent: Proc,
    /// Where HTTP load goes.
    pub http: HttpTarget,
    /// The TCP route, or why there is none (a gateway without TCP routes).
    pub tcp: Result<SocketAddr, String>,
}

impl StraitStack {
    /// Starts it in `dir` against the backend at `backend_http` / `backend_tcp`, and waits until
    /// both an HTTP request and a TCP echo make it through.
    pub async fn start(
        bins: &Bins,
        dir: &Path,
        backend_http: SocketAddr,
        backend_tcp: SocketAddr,
        max_streams: u32,
    ) -> Result<StraitStack, Error> {
        let data_dir = dir.join("data");
        let tokens = create_agents(Some(&bins.gateway), &data_dir, &["bench".to_owned()]).await?;
        let token = tokens
            .into_iter()
            .next()
            .ok_or_else(|| Error::Spawn("no token".into()))?;
        let route = free_addr()?;
        let tcp = add_route(
            &bins.gateway,
            &StoreAt::Dir(data_dir.clone()),
            route,
            &token.agent,
            "bulk",
            None,
        )
        .await?
        .map(|()| route);
        let mut gateway = Gateway::start(bins, Backing::Embedded(&data_dir), dir, "gateway", max_streams).await?;
        let mut agent = start_agent(
            bins,
            &gateway,
            &token,
            &[format!("http://{backend_http}"), format!("bulk=tcp://{backend_tcp}")],
            dir,
            "agent",
        )?;
        let http = HttpTarget {
            addr: gateway.http,
            host: format!("{}.localhost", token.agent),
        };
        // A stack that does not come up says why from both ends: the agent's log and the
        // gateway's (its warnings: a route it could not listen on, say).
        if let Err(e) = crate::load::wait_http(&http, Duration::from_secs(30)).await {
            return Err(gateway.proc.explain(agent.explain(e)));
        }
        if let Ok(route) = tcp {
            if let Err(e) = crate::load::wait_tcp(route, Duration::from_secs(30)).await {
                return Err(gateway.proc.explain(agent.explain(e)));
            }
        }
        Ok(StraitStack {
            gateway,
            agent,
            http,
            tcp,
        })
    }
}

/// The token every rathole service in a run shares (loopback only, thrown away after).
const RATHOLE_TOKEN: &str = "strait-loadtest";

/// What rathole's server prints once per control channel (one per service a client connects).
pub const RATHOLE_ESTABLISHED: &str = "Control channel established";

/// A rathole server (and, once started, client) with generated configs.
pub struct Rathole {
    /// The server process.
    pub server: Proc,
    /// The client process.
    pub client: Option<Proc>,
    /// Where the server listens for clients.
    pub control: SocketAddr,
    dir: PathBuf,
}

impl Rathole {
    /// Starts a rathole server for `services` (name, server-side bind address; port 0 is fine
    /// when nothing will connect to it) and waits until it accepts connections.
    pub async fn start_server(
        rathole: &Path,
        dir: &Path,
        services: &[(String, SocketAddr)],
        log_level: &str,
    ) -> Result<Rathole, Error> {
        let control = free_addr()?;
        let mut cfg = format!("[server]\nbind_addr = \"{control}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n");
        for (name, bind) in services {
            let _ = write!(cfg, "\n[server.services.{name}]\nbind_addr = \"{bind}\"\n");
        }
        let path = dir.join("rathole-server.toml");
        std::fs::write(&path, cfg).map_err(Error::io(format!("writing {}", path.display())))?;
        let mut cmd = Command::new(rathole);
        cmd.arg("--server").arg(&path).env("RUST_LOG", log_level);
        let mut server = Proc::spawn("rathole-server", cmd, dir, Some(RATHOLE_ESTABLISHED))?;
        let up = eventually(Duration::from_secs(10), "rathole server listening", || async {
            tokio::net::TcpStream::connect(control).await.is_ok()
        })
        .await;
        if let Err(e) = up {
            return Err(server.explain(e));
        }
        Ok(Rathole {
            server,
            client: None,
            control,
            dir: dir.to_path_buf(),
        })
    }

    /// Starts the client for `services` (name, local address it forwards to).
    pub fn start_client(
        &mut self,
        rathole: &Path,
        services: &[(String, SocketAddr)],
        log_level: &str,
    ) -> Result<(), Error> {
        let mut cfg = format!(
            "[client]\nremote_addr = \"{}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n",
            self.control
        );
        for (name, local) in services {
            let _ = write!(cfg, "\n[client.services.{name}]\nlocal_addr = \"{local}\"\n");
        }
        let path = self.dir.join("rathole-client.toml");
        std::fs::write(&path, cfg).map_err(Error::io(format!("writing {}", path.display())))?;
        let mut cmd = Command::new(rathole);
        cmd.arg("--client").arg(&path).env("RUST_LOG", log_level);
        self.client = Some(Proc::spawn("rathole-client", cmd, &self.dir, None)?);
        Ok(())
    }

    /// The stack the HTTP and TCP scenarios use: services `http` and `bulk` in front of the
    /// backend, waited for until traffic makes it through both.
    pub async fn stack(
        rathole: &Path,
        dir: &Path,
        backend_http: SocketAddr,
        backend_tcp: SocketAddr,
    ) -> Result<(Rathole, HttpTarget, SocketAddr), Error> {
        let (http, tcp) = (free_addr()?, free_addr()?);
        let mut r = Rathole::start_server(rathole, dir, &[("http".into(), http), ("bulk".into(), tcp)], "warn").await?;
        r.start_client(
            rathole,
            &[("http".into(), backend_http), ("bulk".into(), backend_tcp)],
            "warn",
        )?;
        let target = HttpTarget {
            addr: http,
            host: "rathole".into(),
        };
        if let Err(e) = crate::load::wait_http(&target, Duration::from_secs(30)).await {
            return Err(r.server.explain(e));
        }
        if let Err(e) = crate::load::wait_tcp(tcp, Duration::from_secs(30)).await {
            return Err(r.server.explain(e));
        }
        Ok((r, target, tcp))
    }
}

/// The backend as its own process (`strait-loadtest backend`), on free ports.
pub struct BackendProc {
    /// The process.
    pub proc: Proc,
    /// Its HTTP server.
    pub http: SocketAddr,
    /// Its TCP server.
    pub tcp: SocketAddr,
}

impl BackendProc {
    /// Starts it and waits until it answers.
    pub async fn start(bins: &Bins, log_dir: &Path) -> Result<BackendProc, Error> {
        let (http, tcp) = (free_addr()?, free_addr()?);
        let mut cmd = Command::new(&bins.loadtest);
        cmd.arg("backend")
            .arg("--listen")
            .arg(http.to_string())
            .arg("--tcp-listen")
            .arg(tcp.to_string());
        let mut proc = Proc::spawn("backend", cmd, log_dir, None)?;
        let t = HttpTarget {
            addr: http,
            host: "backend".into(),
        };
        if let Err(e) = crate::load::wait_http(&t, Duration::from_secs(10)).await {
            return Err(proc.explain(e));
        }
        Ok(BackendProc { proc, http, tcp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_metric_finds_unlabelled_values_only() {
        let text = "# HELP strait_agents_connected x\n# TYPE strait_agents_connected gauge\n\
                    strait_agents_connected 42\nstrait_agents_connected_total 7\n\
                    strait_handshakes_total{result=\"ok\"} 9\n";
        assert_eq!(parse_metric(text, "strait_agents_connected"), Some(42.0));
        assert_eq!(parse_metric(text, "strait_handshakes_total"), None);
        assert_eq!(parse_metric(text, "missing"), None);
    }

    #[test]
    fn rss_of_this_process_is_known() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
