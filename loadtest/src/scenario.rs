//! The scenarios and the runner that takes each against each target, baseline first, in one run.
//! Every target of a scenario gets a fresh stack (gateway, agent, rathole pair) so memory and
//! state left by one measurement never show up in the next; the backend is shared.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use strait_agent::AgentConfig;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::{ClusterStack, Cost, CostProbe, CrossNode, Services};
use crate::cpu::{CpuProbe, CpuUse};
use crate::load::{self, Direction, HttpRun, HttpTarget, Window};
use crate::report::{Row, Status};
use crate::spawn::{self, Backing, Bins, Gateway, Proc, Rathole, StraitStack};
use crate::stats::{latency_histogram, record_us, LatencySummary};
use crate::target::{Spawned, Target};
use crate::Error;

/// What can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Small responses over keep-alive connections at fixed concurrency: req/s and latency.
    HttpSmall,
    /// One connection per request: req/s (connection set-up cost).
    HttpNewConn,
    /// Large responses and uploads: MiB/s.
    HttpLarge,
    /// Raw TCP through a route, one and several streams, each way: MiB/s.
    TcpBulk,
    /// Many idle agents on one gateway: its RSS per agent, time for all to connect.
    AgentsIdle,
    /// Many idle streams held open through one agent: the gateway's RSS per stream.
    StreamsHeld,
    /// Agents connecting as fast as the gateway takes them: handshakes/s.
    ConnectStorm,
}

impl Scenario {
    /// Every scenario, in the order a run takes them.
    pub const ALL: [Scenario; 7] = [
        Scenario::HttpSmall,
        Scenario::HttpNewConn,
        Scenario::HttpLarge,
        Scenario::TcpBulk,
        Scenario::AgentsIdle,
        Scenario::StreamsHeld,
        Scenario::ConnectStorm,
    ];

    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::HttpSmall => "http-small",
            Scenario::HttpNewConn => "http-new-conn",
            Scenario::HttpLarge => "http-large",
            Scenario::TcpBulk => "tcp-bulk",
            Scenario::AgentsIdle => "agents-idle",
            Scenario::StreamsHeld => "streams-held",
            Scenario::ConnectStorm => "connect-storm",
        }
    }

    /// Parses a scenario name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Scenario::ALL.into_iter().find(|x| x.name() == s.trim()).ok_or_else(|| {
            Error::Config(format!(
                "unknown scenario {s:?}; known: {}",
                Scenario::ALL.map(Scenario::name).join(", ")
            ))
        })
    }
}

/// Sizes, counts and durations of a run. [`Plan::full`] is what `docs/benchmarks.md` reports;
/// [`Plan::quick`] runs every scenario in about a minute, for CI.
#[derive(Debug, Clone)]
pub struct Plan {
    /// A quick run (small N, short windows).
    pub quick: bool,
    /// `http-small` connections.
    pub connections: usize,
    /// Requests per second of `http-small`'s paced case (on the same connections, on a
    /// schedule): latencies compared at equal load. 0 skips it.
    pub paced_rate: f64,
    /// `http-new-conn` concurrent requesters.
    pub new_conn_concurrency: usize,
    /// Unrecorded time before each latency window.
    pub warmup: Duration,
    /// `http-small` / `http-new-conn` measured window.
    pub duration: Duration,
    /// `http-large` body sizes.
    pub large_sizes: Vec<u64>,
    /// `http-large` connections for bodies up to 1 MiB (larger ones use one).
    pub large_connections: usize,
    /// Length of each `http-large` and `tcp-bulk` case.
    pub bulk_duration: Duration,
    /// `tcp-bulk` parallel stream counts.
    pub bulk_streams: Vec<usize>,
    /// `agents-idle` agents.
    pub agents: usize,
    /// `streams-held` streams.
    pub streams: usize,
    /// `connect-storm` handshakes.
    pub storm: usize,
    /// `connect-storm` handshakes in flight at once.
    pub storm_concurrency: usize,
    /// Upper bound on requests of one measurement (runs are bounded in count as well as time).
    pub max_requests: u64,
    /// Rounds per scenario; each figure is the median round.
    pub repeat: usize,
    /// Scenarios the cluster targets run (traffic only: memory and agents are per node).
    pub cluster_scenarios: Vec<Scenario>,
}

impl Plan {
    /// The full run.
    pub fn full() -> Self {
        Plan {
            quick: false,
            connections: 64,
            paced_rate: 10_000.0,
            new_conn_concurrency: 32,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            large_sizes: vec![1 << 20, 100 << 20],
            large_connections: 4,
            bulk_duration: Duration::from_secs(8),
            bulk_streams: vec![1, 8],
            agents: 1_000,
            streams: 1_000,
            storm: 1_000,
            storm_concurrency: 256,
            max_requests: 50_000_000,
            repeat: 1,
            cluster_scenarios: vec![
                Scenario::HttpSmall,
                Scenario::HttpNewConn,
                Scenario::HttpLarge,
                Scenario::TcpBulk,
            ],
        }
    }

    /// About a minute for every scenario against direct and strait.
    pub fn quick() -> Self {
        Plan {
            quick: true,
            warmup: Duration::from_millis(300),
            duration: Duration::from_secs(2),
            paced_rate: 500.0,
            bulk_duration: Duration::from_millis(1500),
            agents: 200,
            streams: 200,
            storm: 200,
            // The two the cluster report needs; each cluster stack takes seconds to start.
            cluster_scenarios: vec![Scenario::HttpSmall, Scenario::TcpBulk],
            ..Plan::full()
        }
    }
}

/// The progress bar (hidden when stderr is not a terminal; results are then printed as lines).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `steps` measurements; `visible: false` prints lines only.
    pub fn new(steps: u64, visible: bool) -> Self {
        let bar = if visible {
            ProgressBar::new(steps)
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// Names what runs now.
    pub fn step(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// One measurement done.
    pub fn done(&self) {
        self.bar.inc(1);
    }

    /// Prints a line above the bar (or plainly when it is hidden).
    pub fn line(&self, s: String) {
        if self.bar.is_hidden() {
            eprintln!("{s}");
        } else {
            self.bar.println(s);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Why a scenario produced no figure for a target.
enum Skip {
    NotApplicable(String),
    Unavailable(String),
    Failed(Error),
}

impl From<Error> for Skip {
    fn from(e: Error) -> Self {
        Skip::Failed(e)
    }
}

/// What a run needs besides its plan: binaries and backend (when spawning) and a work directory.
pub struct Runner {
    /// Sizes and durations.
    pub plan: Plan,
    /// Binaries, when targets are spawned.
    pub bins: Option<Bins>,
    /// The spawned backend's HTTP and TCP addresses.
    pub backend: Option<(SocketAddr, SocketAddr)>,
    /// The spawned backend's process, whose CPU each traffic row reports.
    pub backend_pid: Option<u32>,
    /// Where stacks keep data and logs.
    pub workdir: PathBuf,
    /// Progress display.
    pub progress: Progress,
    /// Target the ratios divide by (each round's figure by the same round's baseline).
    pub baseline: String,
    /// Redis, RabbitMQ and Postgres for the cluster targets.
    pub services: Services,
}

/// Live processes and the addresses HTTP and TCP load goes to.
struct Endpoints {
    http: Option<HttpTarget>,
    /// The TCP address, or why there is none.
    tcp: Result<SocketAddr, String>,
    /// Process whose RSS memory scenarios read, and a second one reported alongside (the
    /// agent or rathole client).
    pids: (Option<u32>, Option<u32>),
    /// Reads a cluster target's CPU and bus counters around each measurement.
    cost: Option<CostProbe>,
    /// Reads every process's CPU around each measurement.
    cpu: CpuProbe,
    _stack: Stack,
}

/// Held only so that dropping [`Endpoints`] stops the processes.
#[allow(dead_code)]
enum Stack {
    None,
    Strait(Box<StraitStack>),
    Rathole(Box<Rathole>),
    Cluster(Box<ClusterStack>),
}

impl Runner {
    /// Runs every scenario against every target (in the order given: put the baseline first)
    /// and returns the rows, without ratios (see [`crate::report::Report::compute_ratios`]).
    pub async fn run(&self, scenarios: &[Scenario], targets: &[Target]) -> Vec<Row> {
        let rounds = self.plan.repeat.max(1);
        let mut rows = Vec::new();
        for &s in scenarios {
            let mut scenario_rows: Vec<Row> = Vec::new();
            // Rounds interleave targets (direct, strait, rathole, direct, ...), so a slow spell
            // of the machine lands on every target alike.
            for round in 0..rounds {
                let mut round_rows: Vec<Row> = Vec::new();
                for t in targets {
                    // Not-applicable and unavailable rows do not change between rounds.
                    if round > 0 && got_only_skips(&scenario_rows, t.name()) {
                        self.progress.done();
                        continue;
                    }
                    let label = if rounds > 1 {
                        format!(" (round {}/{rounds})", round + 1)
                    } else {
                        String::new()
                    };
                    self.progress.step(format!("{} -> {}{label}", s.name(), t.name()));
                    let dir = self.workdir.join(format!("{}-{}-{round}", s.name(), t.name()));
                    let got = match std::fs::create_dir_all(&dir) {
                        Ok(()) => self.measure(s, t, &dir).await,
                        Err(e) => Err(Skip::Failed(Error::io(format!("creating {}", dir.display()))(e))),
                    };
                    let got = got.unwrap_or_else(|skip| {
                        let (status, why) = match skip {
                            Skip::NotApplicable(w) => (Status::NotApplicable, w),
                            Skip::Unavailable(w) => (Status::Unavailable, w),
                            Skip::Failed(e) => (Status::Failed, e.to_string()),
                        };
                        vec![Row::without(s.name(), &self.case_label(s), t.name(), status, why)]
                    });
                    for r in &got {
                        self.progress.line(summary_line(r));
                    }
                    round_rows.extend(got);
                    self.progress.done();
                }
                crate::report::fill_ratios(&mut round_rows, &self.baseline);
                crate::report::fill_cross_node(&mut round_rows);
                scenario_rows.extend(round_rows);
            }
            let mut merged = merge_rounds(scenario_rows);
            // Rows of one case together (baseline first), cases in the order they were run.
            let mut cases: Vec<String> = Vec::new();
            for r in &merged {
                if !cases.contains(&r.case) {
                    cases.push(r.case.clone());
                }
            }
            merged.sort_by_key(|r| cases.iter().position(|c| *c == r.case));
            rows.extend(merged);
        }
        self.progress.finish();
        rows
    }

    fn case_label(&self, s: Scenario) -> String {
        let p = &self.plan;
        match s {
            Scenario::HttpSmall => format!("{} conns", p.connections),
            Scenario::HttpNewConn => format!("{} concurrent", p.new_conn_concurrency),
            Scenario::HttpLarge | Scenario::TcpBulk => "all".into(),
            Scenario::AgentsIdle => format!("{} agents", p.agents),
            Scenario::StreamsHeld => format!("{} streams", p.streams),
            Scenario::ConnectStorm => format!("{} agents", p.storm),
        }
    }

    async fn measure(&self, s: Scenario, t: &Target, dir: &Path) -> Result<Vec<Row>, Skip> {
        if matches!(t, Target::Spawned(x) if x.is_cluster()) && !self.plan.cluster_scenarios.contains(&s) {
            let why = if matches!(s, Scenario::AgentsIdle | Scenario::StreamsHeld | Scenario::ConnectStorm) {
                "cluster targets measure traffic across nodes; memory and agents are measured on `strait`"
            } else {
                "not in this plan's cluster scenarios (--quick: http-small and tcp-bulk)"
            };
            return Err(Skip::NotApplicable(why.into()));
        }
        match s {
            Scenario::HttpSmall | Scenario::HttpNewConn | Scenario::HttpLarge | Scenario::TcpBulk => {
                let ep = self.endpoints(t, dir, 1024).await?;
                self.traffic(s, t, &ep).await
            }
            Scenario::StreamsHeld => self.streams_held(t, dir).await,
            Scenario::AgentsIdle => self.agents(s, t, dir).await,
            Scenario::ConnectStorm => self.agents(s, t, dir).await,
        }
    }

    fn bins(&self) -> Result<&Bins, Skip> {
        self.bins
            .as_ref()
            .ok_or_else(|| Skip::Failed(Error::Config("spawned targets need the Strait binaries".into())))
    }

    fn backend(&self) -> Result<(SocketAddr, SocketAddr), Skip> {
        self.backend
            .ok_or_else(|| Skip::Failed(Error::Config("spawned targets need the spawned backend".into())))
    }

    fn rathole(&self) -> Result<PathBuf, Skip> {
        self.bins()?.rathole.clone().ok_or_else(|| {
            Skip::Unavailable(
                "rathole not installed (cargo install rathole --no-default-features --features server,client)".into(),
            )
        })
    }

    async fn endpoints(&self, t: &Target, dir: &Path, max_streams: u32) -> Result<Endpoints, Skip> {
        Ok(match t {
            Target::Spawned(Spawned::Direct) => {
                let (http, tcp) = self.backend()?;
                Endpoints {
                    http: Some(HttpTarget {
                        addr: http,
                        host: "backend".into(),
                    }),
                    tcp: Ok(tcp),
                    pids: (None, None),
                    cost: None,
                    cpu: CpuProbe::new(Vec::new(), None, self.backend_pid),
                    _stack: Stack::None,
                }
            }
            Target::Spawned(Spawned::Strait) => {
                let (http, tcp) = self.backend()?;
                let stack = StraitStack::start(self.bins()?, dir, http, tcp, max_streams).await?;
                Endpoints {
                    http: Some(stack.http.clone()),
                    tcp: stack.tcp.clone(),
                    pids: (Some(stack.gateway.proc.pid()), Some(stack.agent.pid())),
                    cost: None,
                    cpu: CpuProbe::new(
                        vec![stack.gateway.proc.pid()],
                        Some(stack.agent.pid()),
                        self.backend_pid,
                    ),
                    _stack: Stack::Strait(Box::new(stack)),
                }
            }
            Target::Spawned(x @ (Spawned::StraitSame | Spawned::StraitCross)) => {
                if let Some(why) = self.services.missing().await {
                    return Err(Skip::Unavailable(why));
                }
                let (http, tcp) = self.backend()?;
                let stack = ClusterStack::start(self.bins()?, &self.services, dir, http, tcp, max_streams).await?;
                // The agent is on B (1): same-node load goes to B, cross-node load to A (0).
                let node = if *x == Spawned::StraitSame { 1 } else { 0 };
                Endpoints {
                    http: Some(stack.ingress(node)),
                    tcp: stack.routes[node].clone(),
                    pids: (Some(stack.nodes[node].proc.pid()), Some(stack.agent.pid())),
                    cost: Some(stack.probe()),
                    cpu: CpuProbe::new(
                        stack.nodes.iter().map(|n| n.proc.pid()).collect(),
                        Some(stack.agent.pid()),
                        self.backend_pid,
                    ),
                    _stack: Stack::Cluster(Box::new(stack)),
                }
            }
            Target::Spawned(Spawned::Rathole) => {
                let bin = self.rathole()?;
                let (http, tcp) = self.backend()?;
                let (r, target, tcp) = Rathole::stack(&bin, dir, http, tcp).await?;
                Endpoints {
                    http: Some(target),
                    tcp: Ok(tcp),
                    pids: (Some(r.server.pid()), r.client.as_ref().map(Proc::pid)),
                    cost: None,
                    cpu: CpuProbe::new(vec![r.server.pid()], r.client.as_ref().map(Proc::pid), self.backend_pid),
                    _stack: Stack::Rathole(Box::new(r)),
                }
            }
            Target::External(e) => Endpoints {
                http: e.http.clone(),
                tcp: e.tcp.ok_or_else(|| "target has no tcp= address".to_owned()),
                pids: (e.pid, None),
                cost: None,
                cpu: CpuProbe::new(e.pid.into_iter().collect(), None, self.backend_pid),
                _stack: Stack::None,
            },
        })
    }

    async fn traffic(&self, s: Scenario, t: &Target, ep: &Endpoints) -> Result<Vec<Row>, Skip> {
        let p = &self.plan;
        let name = s.name();
        let need_http = || {
            ep.http
                .clone()
                .ok_or_else(|| Skip::Unavailable("target has no http= address".into()))
        };
        let mut rows = Vec::new();
        match s {
            Scenario::HttpSmall | Scenario::HttpNewConn => {
                let http = need_http()?;
                // `http-small` also runs paced: the same load for every target, so its latencies
                // say what a tunnel adds at that load, where the closed loop's say as much about
                // its throughput.
                let mut cases = vec![(self.case_label(s), load::Pace::BackToBack)];
                if s == Scenario::HttpSmall && p.paced_rate > 0.0 {
                    let case = format!(
                        "{} conns at {} req/s",
                        p.connections,
                        crate::report::human(p.paced_rate)
                    );
                    cases.push((case, load::Pace::Rate(p.paced_rate)));
                }
                for (case, pace) in cases {
                    let window = Window::new(p.warmup, p.duration);
                    let load = async {
                        if s == Scenario::HttpSmall {
                            load::http_keepalive(&http, "/small", p.connections, pace, window, p.max_requests).await
                        } else {
                            load::http_new_conn(&http, "/small", p.new_conn_concurrency, window, p.max_requests).await
                        }
                    };
                    let (run, cost, cpu) = windowed(ep, window, load).await;
                    let mut row = http_row(name, &case, t.name(), &run, "req/s", run.requests_per_sec());
                    attach_costs(&mut row, cost, cpu, run.requests as f64, "request");
                    rows.push(row);
                }
            }
            Scenario::HttpLarge => {
                let http = need_http()?;
                for &size in &p.large_sizes {
                    for dir in [Direction::Down, Direction::Up] {
                        let conns = if size <= 1 << 20 { p.large_connections } else { 1 };
                        self.progress.step(format!(
                            "{name} -> {}: {} {}",
                            t.name(),
                            size_label(size),
                            dir_label(dir)
                        ));
                        let load = load::http_bulk(&http, dir, size, conns, p.bulk_duration, p.max_requests);
                        let ((run, cost), cpu) = ep.cpu.around(costed(ep.cost.as_ref(), load)).await;
                        let case = format!("{} {} x{conns}", size_label(size), dir_label(dir));
                        let mut row = http_row(name, &case, t.name(), &run, "MiB/s", run.mib_per_sec());
                        attach_costs(&mut row, cost, cpu, run.bytes as f64 / MIB, "MiB");
                        rows.push(row);
                    }
                }
            }
            Scenario::TcpBulk => {
                let tcp = ep.tcp.clone().map_err(Skip::Unavailable)?;
                for &n in &p.bulk_streams {
                    for dir in [Direction::Down, Direction::Up] {
                        let case = format!("{n} stream{} {}", if n == 1 { "" } else { "s" }, dir_label(dir));
                        self.progress.step(format!("{name} -> {}: {case}", t.name()));
                        let bulk = costed(ep.cost.as_ref(), load::tcp_bulk(tcp, dir, n, p.bulk_duration));
                        let ((run, cost), cpu) = ep.cpu.around(bulk).await;
                        let mut row = if run.bytes == 0 {
                            Row::without(
                                name,
                                &case,
                                t.name(),
                                Status::Failed,
                                run.first_error.clone().unwrap_or_else(|| "no bytes moved".into()),
                            )
                        } else {
                            Row::ok(name, &case, t.name(), "MiB/s", run.mib_per_sec(), true)
                        };
                        row.errors = run.errors;
                        if let (Some(e), true) = (&run.first_error, run.bytes > 0) {
                            row.notes.push(format!("first error: {e}"));
                        }
                        row.extra.insert("bytes".into(), run.bytes as f64);
                        row.extra.insert("secs".into(), run.elapsed.as_secs_f64());
                        attach_costs(&mut row, cost, cpu, run.bytes as f64 / MIB, "MiB");
                        rows.push(row);
                    }
                }
            }
            _ => {}
        }
        Ok(rows)
    }

    async fn streams_held(&self, t: &Target, dir: &Path) -> Result<Vec<Row>, Skip> {
        if matches!(t, Target::Spawned(Spawned::Direct)) {
            return Err(Skip::NotApplicable("no tunnel process to measure".into()));
        }
        let n = self.plan.streams;
        let ep = self.endpoints(t, dir, (n as u32).saturating_add(64).max(1024)).await?;
        let tcp = ep.tcp.clone().map_err(Skip::Unavailable)?;
        let pid = ep
            .pids
            .0
            .ok_or_else(|| Skip::Unavailable("target has no pid= to read memory from".into()))?;
        let rss =
            |pid: u32| spawn::rss_kib(pid).ok_or_else(|| Skip::Failed(Error::Spawn(format!("process {pid} is gone"))));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss(pid)?;
        let other_before = ep.pids.1.and_then(spawn::rss_kib);
        let start = Instant::now();
        let (held, errors) = load::open_echo_streams(tcp, n, 64).await;
        let open_secs = start.elapsed().as_secs_f64();
        if held.is_empty() {
            let why = errors
                .first()
                .map_or_else(|| "no stream opened".to_owned(), Error::to_string);
            return Err(Skip::Failed(Error::Spawn(why)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss(pid)?;
        let other_after = ep.pids.1.and_then(spawn::rss_kib);
        let per = after.saturating_sub(before) as f64 / held.len() as f64;
        let mut row = Row::ok(
            "streams-held",
            &self.case_label(Scenario::StreamsHeld),
            t.name(),
            "KiB/stream",
            per,
            false,
        );
        row.errors = errors.len() as u64;
        if let Some(e) = errors.first() {
            row.notes.push(format!("first error: {e}"));
        }
        row.extra.insert("streams".into(), held.len() as f64);
        row.extra.insert("rss_before_kib".into(), before as f64);
        row.extra.insert("rss_after_kib".into(), after as f64);
        row.extra.insert("open_secs".into(), open_secs);
        if let (Some(b), Some(a)) = (other_before, other_after) {
            let per_other = a.saturating_sub(b) as f64 / held.len() as f64;
            row.extra.insert("client_kib_per_stream".into(), per_other);
            row.notes.push(format!("agent/client side: {per_other:.1} KiB/stream"));
        }
        drop(held);
        Ok(vec![row])
    }

    /// `agents-idle` and `connect-storm`.
    async fn agents(&self, s: Scenario, t: &Target, dir: &Path) -> Result<Vec<Row>, Skip> {
        let n = if s == Scenario::AgentsIdle {
            self.plan.agents
        } else {
            self.plan.storm
        };
        match t {
            Target::Spawned(Spawned::Direct) => Err(Skip::NotApplicable("no tunnel: no agents".into())),
            Target::Spawned(Spawned::StraitSame | Spawned::StraitCross) => {
                Err(Skip::NotApplicable("measured on `strait`".into()))
            }
            Target::Spawned(Spawned::Rathole) => self.rathole_agents(s, n, dir).await,
            Target::Spawned(Spawned::Strait) => {
                let data_dir = dir.join("data");
                let gw = Gateway::start(self.bins()?, Backing::Embedded(&data_dir), dir, "gateway", 1024).await?;
                let env = AgentEnv {
                    gateway_bin: Some(self.bins()?.gateway.clone()),
                    ws: gw.ws_url.clone(),
                    data_dir,
                    pid: Some(gw.proc.pid()),
                    ops: Some(gw.ops),
                };
                let r = self.strait_agents(s, t, n, &env).await;
                drop(gw);
                r
            }
            Target::External(e) => {
                let (Some(ws), Some(data_dir)) = (e.ws.clone(), e.data_dir.clone()) else {
                    return Err(Skip::Unavailable(
                        "needs ws= and data-dir= to create and connect agents".into(),
                    ));
                };
                let env = AgentEnv {
                    gateway_bin: None,
                    ws,
                    data_dir,
                    pid: e.pid,
                    ops: e.ops,
                };
                self.strait_agents(s, t, n, &env).await
            }
        }
    }

    async fn strait_agents(&self, s: Scenario, t: &Target, n: usize, env: &AgentEnv) -> Result<Vec<Row>, Skip> {
        let run_id = rand::random::<u16>();
        let prefix = if s == Scenario::AgentsIdle { "idle" } else { "storm" };
        let names: Vec<String> = (0..n).map(|i| format!("lt{run_id:04x}-{prefix}-{i}")).collect();
        self.progress
            .step(format!("{} -> {}: creating {n} agents", s.name(), t.name()));
        let tokens = spawn::create_agents(env.gateway_bin.as_deref(), &env.data_dir, &names).await?;
        let case = self.case_label(s);
        if s == Scenario::ConnectStorm {
            self.progress
                .step(format!("{} -> {}: {n} handshakes", s.name(), t.name()));
            return storm(&env.ws, tokens, self.plan.storm_concurrency, &case, t.name()).await;
        }
        let (Some(pid), Some(ops)) = (env.pid, env.ops) else {
            return Err(Skip::Unavailable(
                "needs pid= and ops= to read memory and count agents".into(),
            ));
        };
        let connected = || async move { spawn::metric(ops, "strait_agents_connected").await.unwrap_or(-1.0) };
        let base_agents = connected().await.max(0.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = spawn::rss_kib(pid).ok_or_else(|| Skip::Failed(Error::Spawn("gateway is gone".into())))?;
        self.progress
            .step(format!("{} -> {}: connecting {n} agents", s.name(), t.name()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = JoinSet::new();
        let start = Instant::now();
        for token in tokens {
            let mut cfg = AgentConfig::new(&env.ws, token).map_err(Error::from)?;
            cfg = cfg.expose("http://127.0.0.1:9").map_err(Error::from)?;
            cfg.max_backoff = Duration::from_secs(2);
            cfg.drain_timeout = Duration::from_secs(1);
            let mut stop = stop_rx.clone();
            agents.spawn(strait_agent::run(cfg, async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
        }
        let want = base_agents + n as f64;
        let deadline = Duration::from_secs(30) + Duration::from_millis(15 * n as u64);
        let waited = spawn::eventually(deadline, &format!("{n} agents connected"), || async {
            connected().await >= want
        })
        .await;
        let connect_secs = start.elapsed().as_secs_f64();
        let result = match waited {
            Ok(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match spawn::rss_kib(pid) {
                    Some(after) => {
                        let per = after.saturating_sub(before) as f64 / n as f64;
                        let mut row = Row::ok(s.name(), &case, t.name(), "KiB/agent", per, false);
                        row.extra.insert("agents".into(), n as f64);
                        row.extra.insert("rss_before_kib".into(), before as f64);
                        row.extra.insert("rss_after_kib".into(), after as f64);
                        row.extra.insert("connect_secs".into(), connect_secs);
                        row.notes.push(format!(
                            "all connected in {connect_secs:.2} s ({:.0}/s)",
                            n as f64 / connect_secs.max(1e-9)
                        ));
                        Ok(vec![row])
                    }
                    None => Err(Skip::Failed(Error::Spawn("gateway is gone".into()))),
                }
            }
            Err(e) => {
                let now = connected().await;
                Err(Skip::Failed(Error::Timeout(format!("{e}: {now} of {want} connected"))))
            }
        };
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            while agents.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            agents.shutdown().await;
        }
        result
    }

    /// rathole has no agents; its unit is the control channel, one per service of a client. So
    /// its `agents-idle` / `connect-storm` row is one client with N services, counted from the
    /// server's "Control channel established" lines. Each service also holds a listening socket.
    async fn rathole_agents(&self, s: Scenario, n: usize, dir: &Path) -> Result<Vec<Row>, Skip> {
        let bin = self.rathole()?;
        let (backend_http, _) = self.backend()?;
        let server_services: Vec<(String, SocketAddr)> = (0..n)
            .map(|i| {
                Ok((
                    format!("s{i}"),
                    "127.0.0.1:0".parse().map_err(|_| Error::Config("addr".into()))?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        let client_services: Vec<(String, SocketAddr)> = (0..n).map(|i| (format!("s{i}"), backend_http)).collect();
        let mut r = Rathole::start_server(&bin, dir, &server_services, "info").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = r.server.rss_kib()?;
        let start = Instant::now();
        r.start_client(&bin, &client_services, "warn")?;
        let deadline = Duration::from_secs(30) + Duration::from_millis(15 * n as u64);
        // An atomic read per poll: poll finely, so short storms are timed well.
        while r.server.matches() < n && start.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        if r.server.matches() < n {
            let got = r.server.matches();
            let e = Error::Timeout(format!("{got} of {n} rathole control channels after {secs:.1} s"));
            return Err(Skip::Failed(r.server.explain(e)));
        }
        let case = self.case_label(s);
        let row = if s == Scenario::AgentsIdle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = r.server.rss_kib()?;
            let mut row = Row::ok(
                s.name(),
                &case,
                "rathole",
                "KiB/agent",
                after.saturating_sub(before) as f64 / n as f64,
                false,
            );
            row.extra.insert("rss_before_kib".into(), before as f64);
            row.extra.insert("rss_after_kib".into(), after as f64);
            row.extra.insert("connect_secs".into(), secs);
            row.notes.push(format!(
                "one client, {n} services = {n} control channels (+{n} listeners); all in {secs:.2} s"
            ));
            row
        } else {
            let mut row = Row::ok(
                s.name(),
                &case,
                "rathole",
                "handshakes/s",
                n as f64 / secs.max(1e-9),
                true,
            );
            row.extra.insert("secs".into(), secs);
            row.notes.push(format!(
                "{n} control channels of one client, incl. client start-up; {secs:.2} s"
            ));
            row
        };
        Ok(vec![row])
    }
}

fn got_only_skips(rows: &[Row], target: &str) -> bool {
    rows.iter()
        .filter(|r| r.target == target)
        .all(|r| matches!(r.status, Status::NotApplicable | Status::Unavailable))
}

/// Folds the rounds of one scenario into one row per case and target: the round with the
/// median figure (its latencies come along), the spread noted. A target whose every round
/// failed keeps its first failure; one that failed only sometimes says how often.
pub fn merge_rounds(rows: Vec<Row>) -> Vec<Row> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in &rows {
        let k = (r.case.clone(), r.target.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for (case, target) in keys {
        let group: Vec<&Row> = rows.iter().filter(|r| r.case == case && r.target == target).collect();
        let mut ok: Vec<&Row> = group
            .iter()
            .copied()
            .filter(|r| r.status == Status::Ok && r.value.is_some())
            .collect();
        if ok.is_empty() {
            if let Some(first) = group.first() {
                out.push((*first).clone());
            }
            continue;
        }
        if group.len() == 1 {
            out.push(ok[0].clone());
            continue;
        }
        ok.sort_by(|a, b| a.value.unwrap_or(0.0).total_cmp(&b.value.unwrap_or(0.0)));
        let values: Vec<f64> = ok.iter().filter_map(|r| r.value).collect();
        let mut row = ok[(ok.len() - 1) / 2].clone();
        row.value = crate::stats::median(&values);
        // The median of per-round ratios: each round's figure over the baseline measured
        // moments before it, so a slow spell shared by both cancels out.
        let ratios: Vec<f64> = ok.iter().filter_map(|r| r.ratio).collect();
        row.ratio = crate::stats::median(&ratios);
        let p99s: Vec<f64> = ok.iter().filter_map(|r| r.p99_ratio).collect();
        row.p99_ratio = crate::stats::median(&p99s);
        let crossings: Vec<CrossNode> = ok.iter().filter_map(|r| r.cross_node).collect();
        if !crossings.is_empty() {
            row.cross_node = Some(CrossNode::median(&crossings));
        }
        let (lo, hi) = (values[0], values[values.len() - 1]);
        row.notes.insert(
            0,
            format!(
                "median of {} rounds ({}..{})",
                values.len(),
                crate::report::human(lo),
                crate::report::human(hi)
            ),
        );
        row.extra.insert("rounds".into(), values.len() as f64);
        row.extra.insert("min".into(), lo);
        row.extra.insert("max".into(), hi);
        let failed = group.len() - ok.len();
        if failed > 0 {
            row.notes.push(format!("{failed} of {} rounds failed", group.len()));
        }
        out.push(row);
    }
    out
}

/// Where agents for the agent scenarios connect and are created.
struct AgentEnv {
    /// The binary serving the store, when we started it (it writes the schema).
    gateway_bin: Option<PathBuf>,
    ws: String,
    data_dir: PathBuf,
    pid: Option<u32>,
    ops: Option<SocketAddr>,
}

/// `connect-storm` for a Strait gateway: bare handshakes, `concurrency` in flight, every
/// connection held until all are done (as after a gateway restart, when agents stay).
async fn storm(
    ws: &str,
    tokens: Vec<strait_schema::AgentToken>,
    concurrency: usize,
    case: &str,
    target: &str,
) -> Result<Vec<Row>, Skip> {
    use futures_util::stream::{self, StreamExt};
    let n = tokens.len();
    let start = Instant::now();
    let results: Vec<(Result<crate::handshake::Connected, Error>, Duration)> = stream::iter(tokens)
        .map(|tok| async move {
            let t0 = Instant::now();
            let r = crate::handshake::connect(ws, &tok, Duration::from_secs(30)).await;
            (r, t0.elapsed())
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    let mut hist = latency_histogram();
    let mut ok = 0u64;
    let mut first_error = None;
    let mut held = Vec::with_capacity(n);
    for (r, took) in results {
        match r {
            Ok(c) => {
                ok += 1;
                record_us(&mut hist, took.as_micros() as u64);
                held.push(c);
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    drop(held);
    if ok == 0 {
        return Err(Skip::Failed(Error::Handshake(
            first_error.unwrap_or_else(|| "no handshake".into()),
        )));
    }
    let mut row = Row::ok(
        "connect-storm",
        case,
        target,
        "handshakes/s",
        ok as f64 / secs.max(1e-9),
        true,
    );
    row.latency = LatencySummary::of(&hist);
    row.errors = n as u64 - ok;
    if let Some(e) = first_error {
        row.notes.push(format!("first error: {e}"));
    }
    row.extra.insert("secs".into(), secs);
    row.notes
        .push(format!("{concurrency} in flight; latency = one handshake"));
    Ok(vec![row])
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs `load` over `window`, reading a cluster target's costs and every process's CPU over the
/// window's measured part while it runs.
async fn windowed<F: std::future::Future<Output = HttpRun>>(
    ep: &Endpoints,
    window: Window,
    load: F,
) -> (HttpRun, Option<Result<Cost, Error>>, CpuUse) {
    let cost = async {
        match &ep.cost {
            Some(probe) => Some(probe.during(window).await),
            None => None,
        }
    };
    tokio::join!(load, cost, ep.cpu.during(window))
}

/// Runs `load`, reading a cluster target's costs around it when there is a probe.
async fn costed<F: std::future::Future>(
    probe: Option<&CostProbe>,
    load: F,
) -> (F::Output, Option<Result<Cost, Error>>) {
    match probe {
        Some(p) => {
            let (out, cost) = p.around(load).await;
            (out, Some(cost))
        }
        None => (load.await, None),
    }
}

/// Puts a measurement's costs on its row, with the work done (requests, MiB) to divide them by:
/// every process's CPU, and for a cluster target the bus's counters with the nodes' share of it.
fn attach_costs(row: &mut Row, cost: Option<Result<Cost, Error>>, cpu: CpuUse, work: f64, unit: &'static str) {
    row.cpu = cpu.per(work, unit);
    match (cost, cpu.server_ms) {
        (Some(Ok(c)), Some(nodes)) => row.cost = Some(c.with_work(work, unit, nodes)),
        (Some(Ok(_)), None) => row.notes.push("cost not read: the nodes' CPU could not be read".into()),
        (Some(Err(e)), _) => row.notes.push(format!("cost not read: {e}")),
        (None, _) => {}
    }
}

fn http_row(scenario: &str, case: &str, target: &str, run: &HttpRun, unit: &str, value: f64) -> Row {
    if run.requests == 0 {
        return Row::without(
            scenario,
            case,
            target,
            Status::Failed,
            run.first_error
                .clone()
                .unwrap_or_else(|| "no successful request".into()),
        );
    }
    let mut row = Row::ok(scenario, case, target, unit, value, true);
    row.latency = LatencySummary::of(&run.latency);
    row.errors = run.errors;
    if let Some(e) = &run.first_error {
        row.notes.push(format!("first error: {e}"));
    }
    row.extra.insert("requests".into(), run.requests as f64);
    row.extra.insert("secs".into(), run.elapsed.as_secs_f64());
    row
}

fn size_label(size: u64) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1 << 10 && size.is_multiple_of(1 << 10) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

fn dir_label(d: Direction) -> &'static str {
    match d {
        Direction::Down => "down",
        Direction::Up => "up",
    }
}

fn summary_line(r: &Row) -> String {
    match (&r.status, r.value) {
        (Status::Ok, Some(v)) => {
            let lat = r
                .latency
                .map(|l| {
                    format!(
                        " p50 {} p99 {}",
                        crate::report::micros(l.p50_us),
                        crate::report::micros(l.p99_us)
                    )
                })
                .unwrap_or_default();
            format!(
                "{:<14} {:<20} {:<12} {} {}{lat}",
                r.scenario,
                r.case,
                r.target,
                crate::report::human(v),
                r.unit
            )
        }
        (status, _) => format!(
            "{:<14} {:<20} {:<12} {:?}: {}",
            r.scenario,
            r.case,
            r.target,
            status,
            r.reason.as_deref().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()).unwrap(), s);
        }
        assert!(Scenario::parse("http-huge").is_err());
    }

    #[test]
    fn rounds_merge_to_the_median_round() {
        let mut rows = Vec::new();
        for v in [10.0, 30.0, 20.0] {
            rows.push(Row::ok("http-small", "64 conns", "strait", "req/s", v, true));
        }
        rows.push(Row::without(
            "http-small",
            "64 conns",
            "rathole",
            Status::Unavailable,
            "not installed",
        ));
        rows.push(Row::ok("http-small", "64 conns", "direct", "req/s", 50.0, true));
        for (r, ratio) in rows.iter_mut().zip([0.1, 0.9, 0.5]) {
            r.ratio = Some(ratio);
        }
        rows.push(Row::without("http-small", "64 conns", "direct", Status::Failed, "boom"));
        let merged = merge_rounds(rows);
        assert_eq!(merged.len(), 3);
        let strait = merged.iter().find(|r| r.target == "strait").unwrap();
        assert_eq!(strait.value, Some(20.0));
        assert_eq!(strait.ratio, Some(0.5), "median of the per-round ratios");
        assert_eq!(strait.extra["min"], 10.0);
        assert_eq!(strait.extra["max"], 30.0);
        assert!(strait.notes[0].starts_with("median of 3 rounds"));
        let rathole = merged.iter().find(|r| r.target == "rathole").unwrap();
        assert_eq!(rathole.status, Status::Unavailable);
        let direct = merged.iter().find(|r| r.target == "direct").unwrap();
        assert_eq!(direct.value, Some(50.0));
        assert!(direct.notes.iter().any(|n| n == "1 of 2 rounds failed"));
    }

    /// The nodes' CPU comes from the probe that reads every process; a cluster cost without it
    /// is not put on the row, and the row says why.
    #[test]
    fn a_cluster_cost_takes_the_nodes_cpu_from_the_process_probe() {
        let cpu = |server_ms| CpuUse {
            secs: 1.0,
            server_ms,
            client_ms: Some(100.0),
            backend_ms: Some(50.0),
            generator_ms: Some(50.0),
            machine_idle: Some(0.2),
        };
        let cost = || Some(Ok(crate::cluster::test_cost(0.0, 2_000.0, 0.0)));
        let mut row = Row::ok("http-small", "64 conns", "strait-cross", "req/s", 1_000.0, true);
        attach_costs(&mut row, cost(), cpu(Some(400.0)), 1_000.0, "request");
        let c = row.cost.unwrap();
        assert_eq!((c.node_cpu_ms, c.work, c.work_unit), (400.0, 1_000.0, "request"));
        assert_eq!(row.cpu.unwrap().server_us, Some(400.0));

        let mut row = Row::ok("http-small", "64 conns", "strait-cross", "req/s", 1_000.0, true);
        attach_costs(&mut row, cost(), cpu(None), 1_000.0, "request");
        assert!(row.cost.is_none());
        assert!(
            row.notes.iter().any(|n| n.contains("nodes' CPU could not be read")),
            "{:?}",
            row.notes
        );

        let mut row = Row::ok("http-small", "64 conns", "strait-cross", "req/s", 1_000.0, true);
        let failed = Some(Err(Error::Http("/metrics answered 503".into())));
        attach_costs(&mut row, failed, cpu(Some(400.0)), 1_000.0, "request");
        assert!(row.cost.is_none() && row.cpu.is_some());
        assert!(row.notes.iter().any(|n| n.contains("503")), "{:?}", row.notes);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(100 << 20), "100 MiB");
        assert_eq!(size_label(64 << 10), "64 KiB");
        assert_eq!(size_label(100), "100 B");
    }
}
