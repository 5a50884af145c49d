//! `strait-gateway`: run a node, or manage its agents.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use strait_gateway::config::{Backends, NodeConfig, ServeArgs, StoreArgs};
use strait_gateway::store::{now_ms, AgentRecord, PgStore, Route, SqliteStore, Store};
use strait_gateway::{telemetry, Listeners, NodeState};
use strait_schema::{AgentName, AgentToken, Secret};

/// jemalloc, not glibc malloc: 7-10% less CPU per small request (each one allocates frames,
/// buffers and tasks), with the same memory per idle agent and per held stream, where mimalloc
/// tripled it (docs/benchmarks.md, "Sixth round").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "strait-gateway",
    version,
    about = "Strait tunnel gateway node",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (the default).
    Serve(Box<ServeArgs>),
    /// Manage agent identities.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage TCP routes (a gateway port mapped to an agent's TCP service).
    #[command(subcommand)]
    Route(RouteCmd),
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Listen on ADDR and carry each connection to SERVICE on AGENT. Running nodes pick it up
    /// within a second.
    Add {
        /// Gateway address to listen on, e.g. 127.0.0.1:2222.
        #[arg(long)]
        tcp: std::net::SocketAddr,
        /// Agent name.
        #[arg(long)]
        agent: String,
        /// The agent's TCP service (as in `strait-agent --expose NAME=tcp://...`).
        #[arg(long)]
        service: String,
        /// Only this node listens (default: every node).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List TCP routes.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Stop routing ADDR (open connections finish).
    Remove {
        /// The route's listen address.
        tcp: std::net::SocketAddr,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Create an agent and print its token, once.
    Add {
        /// Agent name: one DNS label; the agent is reached at <name>.<domain>.
        name: String,
        /// Print JSON ({"agent","key_id","token"}) for scripts.
        #[arg(long, conflicts_with = "token_only")]
        json: bool,
        /// Print only the token.
        #[arg(long)]
        token_only: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List agents.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke an agent: its next handshake is refused and a connected session is dropped.
    Revoke {
        /// Agent name.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        None => serve(cli.serve),
        Some(Cmd::Serve(a)) => serve(*a),
        Some(Cmd::Agent(cmd)) => {
            let _logs = telemetry::init(None)?;
            actix_rt::System::new().block_on(agent_cmd(cmd))
        }
        Some(Cmd::Route(cmd)) => {
            let _logs = telemetry::init(None)?;
            actix_rt::System::new().block_on(route_cmd(cmd))
        }
    }
}

async fn open_store(a: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(url) = &a.database_url {
        return Ok(Arc::new(
            PgStore::connect(url).await.context("opening the Postgres store")?,
        ));
    }
    Ok(Arc::new(SqliteStore::open(&a.data_dir).with_context(|| {
        format!("opening store in {}", a.data_dir.display())
    })?))
}

async fn agent_cmd(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Add {
            name,
            json,
            token_only,
            store,
        } => {
            let agent = AgentName::new(&name).ok_or(strait_gateway::Error::InvalidAgentName(name))?;
            let token = AgentToken {
                agent: agent.clone(),
                key_id: format!("k{:08x}", rand::random::<u32>()),
                secret: Secret::generate(),
            };
            open_store(&store)
                .await?
                .create_agent(AgentRecord {
                    name: agent.clone(),
                    key_id: token.key_id.clone(),
                    secret: token.secret.clone(),
                    created_at_ms: now_ms(),
                    revoked_at_ms: None,
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "agent": agent.as_str(), "key_id": token.key_id, "token": token.reveal() })
                );
            } else if token_only {
                println!("{}", token.reveal());
            } else {
                println!(
                    "Agent {agent} created. Its token is shown once; keep it secret:\n\n  {}\n",
                    token.reveal()
                );
                println!("Start it with:\n\n  strait-agent --gateway ws://127.0.0.1:7070 --token <token> --expose http://127.0.0.1:3000\n");
            }
        }
        AgentCmd::List { store } => {
            let agents = open_store(&store).await?.list_agents().await?;
            println!("{:<32} {:<12} {:<8}", "AGENT", "KEY", "STATUS");
            for a in agents {
                let status = if a.revoked_at_ms.is_some() { "revoked" } else { "active" };
                println!("{:<32} {:<12} {:<8}", a.name, a.key_id, status);
            }
        }
        AgentCmd::Revoke { name, store } => {
            let agent = AgentName::new(&name).ok_or(strait_gateway::Error::InvalidAgentName(name))?;
            open_store(&store).await?.revoke_agent(&agent, now_ms()).await?;
            println!("Agent {agent} revoked; connected sessions are dropped within seconds.");
        }
    }
    Ok(())
}

async fn route_cmd(cmd: RouteCmd) -> anyhow::Result<()> {
    match cmd {
        RouteCmd::Add {
            tcp,
            agent,
            service,
            node,
            store,
        } => {
            let agent = AgentName::new(&agent).ok_or(strait_gateway::Error::InvalidAgentName(agent))?;
            if !strait_schema::frame::is_short_id(&service) {
                anyhow::bail!("invalid service name {service:?}: use 1-64 of A-Z a-z 0-9 . _ -");
            }
            open_store(&store)
                .await?
                .add_route(Route {
                    listen: tcp,
                    agent: agent.clone(),
                    service: service.clone(),
                    node,
                })
                .await?;
            println!("Route {tcp} -> {agent}/{service} added.");
        }
        RouteCmd::List { store } => {
            println!("{:<24} {:<32} {:<16}", "LISTEN", "AGENT", "SERVICE");
            for r in open_store(&store).await?.list_routes().await? {
                println!("{:<24} {:<32} {:<16}", r.listen.to_string(), r.agent, r.service);
            }
        }
        RouteCmd::Remove { tcp, store } => {
            open_store(&store).await?.remove_route(tcp).await?;
            println!("Route {tcp} removed.");
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = NodeConfig::from_args(&args)?;
    let telemetry = telemetry::init(Some(&cfg.node_id))?;
    let listeners = Listeners::bind(args.agent_listen, args.http_listen, args.ops_listen)?;
    tracing::info!(
        node = %cfg.node_id,
        agents = %args.agent_listen,
        http = %args.http_listen,
        ops = %args.ops_listen,
        domain = %cfg.domain,
        mode = if matches!(cfg.backends, Backends::Cluster { .. }) { "cluster" } else { "single node" },
        "starting gateway node"
    );
    let served = actix_rt::System::new().block_on(async move {
        let state = NodeState::open(cfg).await?;
        strait_gateway::run(listeners, state, shutdown_signal()).await?;
        Ok(())
    });
    // After the node's runtime is done, on this plain thread: spans that ended just before
    // SIGTERM are still exported.
    telemetry.shutdown();
    served
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
