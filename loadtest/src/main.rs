//! `strait-loadtest`: measure Strait against a direct baseline (and rathole) on this machine,
//! or serve as the benchmark backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use strait_loadtest::backend::Backend;
use strait_loadtest::cluster::Services;
use strait_loadtest::machine::{command_line_output, Machine, Versions};
use strait_loadtest::report::{rfc3339, Report};
use strait_loadtest::scenario::{Plan, Progress, Runner, Scenario};
use strait_loadtest::spawn::{raise_fd_limit, BackendProc, Bins};
use strait_loadtest::target::{External, Spawned, Target};

/// Load generator and benchmark report for Strait: every figure next to the same load sent
/// straight to the backend, in the same run.
#[derive(Parser)]
#[command(name = "strait-loadtest", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios and print the report (Markdown on stdout).
    Run(Box<RunArgs>),
    /// Serve the benchmark backend: HTTP (/small, /bytes/N, /upload) and TCP (sink, source, echo).
    Backend {
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// TCP listen address.
        #[arg(long, default_value = "127.0.0.1:8001")]
        tcp_listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Start the backend, gateways, agents and rathole on free loopback ports (release binaries
    /// from the cargo target dir), and stop them when done.
    #[arg(long)]
    spawn: bool,
    /// About a minute for everything, small N: proves the tool works (for CI), not figures.
    #[arg(long)]
    quick: bool,
    /// Scenarios, comma-separated [default: all]: http-small, http-new-conn, http-large,
    /// tcp-bulk, agents-idle, streams-held, connect-storm.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Spawned targets, comma-separated (with --spawn): direct, strait, rathole, strait-same,
    /// strait-cross (the last two: a two-node cluster on Redis, RabbitMQ and Postgres, load to
    /// the agent's node or to the other one).
    #[arg(long, value_delimiter = ',', default_value = "direct,strait,rathole")]
    targets: Vec<String>,
    /// A target you run: NAME:http=ADDR,host=HOST,tcp=ADDR,pid=PID,ws=URL,data-dir=DIR,ops=ADDR
    /// (keys as needed by the scenarios). Repeatable. Name one `direct` to get ratios.
    #[arg(long = "target")]
    external: Vec<String>,
    /// Target whose figures the ratios divide by.
    #[arg(long, default_value = "direct")]
    baseline: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown report here (it is printed on stdout as well).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Directory of strait-gateway and strait-agent [default: next to this binary, else
    /// $CARGO_TARGET_DIR/release].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// http-small connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Requests per second of http-small's second case, sent on a schedule over the same
    /// connections, for latencies at equal load [default: 10000; --quick 500; 0 skips it].
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds of http-small and http-new-conn.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of each http-large and tcp-bulk case.
    #[arg(long)]
    bulk_duration: Option<f64>,
    /// agents-idle agents (1,000 by default; 10,000 on request).
    #[arg(long)]
    agents: Option<usize>,
    /// streams-held streams.
    #[arg(long)]
    streams: Option<usize>,
    /// connect-storm handshakes.
    #[arg(long)]
    storm: Option<usize>,
    /// Rounds per scenario (targets interleaved); each figure is the median round.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Redis for the cluster targets (each stack uses its own key prefix and removes it).
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// RabbitMQ for the cluster targets (each stack's streams are deleted after).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Postgres admin URL for the cluster targets (each stack gets a fresh database, dropped after).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Exit non-zero unless every scenario produced figures and no row failed (for CI).
    #[arg(long)]
    check: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> anyhow::Result<()> {
    // lapin logs an orderly close of the cluster clean-up's AMQP connection as an error.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error,lapin=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Before any child starts, so gateways and backends inherit it.
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.cmd {
        Cmd::Backend { listen, tcp_listen } => rt.block_on(async move {
            let b = Backend::bind(listen, tcp_listen).await?;
            eprintln!("backend: http {} tcp {}", b.http_addr()?, b.tcp_addr()?);
            b.serve().await;
            Ok(())
        }),
        Cmd::Run(args) => {
            let code = rt.block_on(run(*args))?;
            std::process::exit(code);
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let command = std::env::args().map(|s| shell_quote(&s)).collect::<Vec<_>>().join(" ");
    let scenarios: Vec<Scenario> = if a.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        a.scenarios
            .iter()
            .map(|s| Scenario::parse(s))
            .collect::<Result<_, _>>()?
    };
    let mut plan = if a.quick { Plan::quick() } else { Plan::full() };
    if let Some(c) = a.connections {
        plan.connections = c.max(1);
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r >= 0.0) {
            return Err(anyhow::anyhow!(
                "--rate must be a number of requests per second, 0 or more"
            ));
        }
        plan.paced_rate = r;
    }
    if let Some(d) = a.duration {
        plan.duration = secs(d)?;
    }
    if let Some(d) = a.bulk_duration {
        plan.bulk_duration = secs(d)?;
    }
    if let Some(n) = a.agents {
        plan.agents = n.max(1);
    }
    if let Some(n) = a.streams {
        plan.streams = n.max(1);
    }
    if let Some(n) = a.storm {
        plan.storm = n.max(1);
    }
    plan.repeat = a.repeat.clamp(1, 99);

    let mut targets: Vec<Target> = Vec::new();
    if a.spawn {
        for t in &a.targets {
            targets.push(Target::Spawned(Spawned::parse(t)?));
        }
    }
    for spec in &a.external {
        targets.push(Target::External(External::parse(spec)?));
    }
    if targets.is_empty() {
        anyhow::bail!("nothing to measure: use --spawn, or describe your targets with --target NAME:http=ADDR,...");
    }
    // Baseline first, so each scenario's ratio comes from load sent moments before.
    targets.sort_by_key(|t| t.name() != a.baseline);

    let workdir = tempfile::Builder::new()
        .prefix("strait-loadtest-")
        .tempdir()
        .context("creating a work directory")?;
    let bins = if a.spawn {
        Some(Bins::find(a.bin_dir.as_deref())?)
    } else {
        None
    };
    let backend = match &bins {
        Some(b) => Some(BackendProc::start(b, workdir.path()).await?),
        None => None,
    };
    let versions = versions(bins.as_ref(), &targets);
    if versions.profile == "debug" || versions.loadtest_profile == "debug" {
        eprintln!("note: debug binaries in the loop; the figures only prove the tool works");
    }

    let steps = (scenarios.len() * targets.len() * plan.repeat) as u64;
    let visible = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let runner = Runner {
        plan: plan.clone(),
        bins,
        backend: backend.as_ref().map(|b| (b.http, b.tcp)),
        backend_pid: backend.as_ref().map(|b| b.proc.pid()),
        workdir: workdir.path().to_path_buf(),
        progress: Progress::new(steps, visible),
        baseline: a.baseline.clone(),
        services: Services {
            redis: a.redis_url.clone(),
            amqp: a.amqp_url.clone(),
            pg_admin: a.pg_admin_url.clone(),
        },
    };
    let rows = tokio::select! {
        rows = runner.run(&scenarios, &targets) => rows,
        _ = tokio::signal::ctrl_c() => {
            runner.progress.finish();
            anyhow::bail!("interrupted; spawned processes stopped");
        }
    };
    drop(backend);

    let mut report = Report {
        command,
        started_at: rfc3339(started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        duration_secs: started.elapsed().unwrap_or(Duration::ZERO).as_secs_f64(),
        quick: plan.quick,
        baseline: a.baseline.clone(),
        machine: Machine::detect(),
        versions,
        rows,
    };
    report.compute_ratios();
    let md = report.to_markdown();
    println!("{md}");
    if let Some(p) = &a.json {
        write(p, &report.to_json())?;
    }
    if let Some(p) = &a.markdown {
        write(p, &md)?;
    }
    if a.check {
        let names: Vec<String> = scenarios.iter().map(|s| s.name().to_owned()).collect();
        let problems = report.problems(&names);
        if !problems.is_empty() {
            eprintln!("check failed:");
            for p in &problems {
                eprintln!("  {p}");
            }
            return Ok(1);
        }
        eprintln!("check passed: every scenario produced figures");
    }
    Ok(0)
}

fn versions(bins: Option<&Bins>, targets: &[Target]) -> Versions {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf);
    let wants_rathole = targets.contains(&Target::Spawned(Spawned::Rathole));
    Versions {
        loadtest: env!("CARGO_PKG_VERSION").to_owned(),
        git: workspace
            .as_deref()
            .and_then(|w| command_line_output(Path::new("git"), &["describe", "--always", "--dirty"], Some(w))),
        rustc: command_line_output(Path::new("rustc"), &["--version"], None),
        gateway: bins.and_then(|b| command_line_output(&b.gateway, &["--version"], None)),
        rathole: bins
            .and_then(|b| b.rathole.as_ref())
            .filter(|_| wants_rathole)
            .and_then(|r| {
                let out = std::process::Command::new(r).arg("--version").output().ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.lines()
                    .find_map(|l| l.trim().strip_prefix("Build Version:").map(|v| v.trim().to_owned()))
                    .or_else(|| text.lines().next().map(|l| l.trim().to_owned()))
            }),
        profile: bins.map_or_else(|| "external".to_owned(), |b| b.profile.clone()),
        loadtest_profile: if cfg!(debug_assertions) { "debug" } else { "release" }.to_owned(),
    }
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
        anyhow::bail!("durations are seconds in (0, 3600]");
    }
    Ok(Duration::from_secs_f64(s))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
