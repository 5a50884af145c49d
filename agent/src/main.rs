//! `strait-agent`: the command-line front of the agent library. Flags win over their
//! `STRAIT_*` environment twins (clap), which win over the TOML file given with `--config`
//! (format in `strait_agent::config`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use strait_agent::Settings;
use tracing_subscriber::EnvFilter;

/// jemalloc, not glibc malloc: 7-10% less CPU per small request (each one allocates frames,
/// buffers and tasks), with the same memory per idle agent and per held stream, where mimalloc
/// tripled it (docs/benchmarks.md, "Sixth round").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Dial out to a Strait gateway and expose local services through it.
#[derive(Debug, Parser)]
#[command(name = "strait-agent", version)]
struct Cli {
    /// Gateway URL (ws://, wss://, http://, https://); repeat to rotate through several.
    #[arg(long = "gateway", env = "STRAIT_GATEWAY", value_delimiter = ',', value_name = "URL")]
    gateway: Vec<String>,
    /// Agent token (st1.<agent>.<key-id>.<secret>), as printed by `strait-gateway agent add`.
    #[arg(long, env = "STRAIT_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Service to expose: `URL` (the default HTTP service) or `NAME=URL`; http://, https://,
    /// tcp://host:port. Repeatable; comma-separated in STRAIT_EXPOSE.
    #[arg(
        long = "expose",
        env = "STRAIT_EXPOSE",
        value_delimiter = ',',
        value_name = "[NAME=]URL"
    )]
    expose: Vec<String>,
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "STRAIT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Instance id, stable across reconnects (default: random per process).
    #[arg(long, env = "STRAIT_INSTANCE_ID", value_name = "ID")]
    instance_id: Option<String>,
    /// Ceiling of the reconnect backoff, seconds [default: 30].
    #[arg(long, env = "STRAIT_MAX_BACKOFF", value_name = "SECS")]
    max_backoff: Option<f64>,
    /// How long shutdown waits for in-flight streams, seconds [default: 30].
    #[arg(long, env = "STRAIT_DRAIN_TIMEOUT", value_name = "SECS")]
    drain_timeout: Option<f64>,
    /// Runtime threads [default: 1]; more only helps an agent carrying many busy streams.
    #[arg(long, env = "STRAIT_THREADS", value_name = "N")]
    threads: Option<usize>,
}

impl Cli {
    fn settings(&self) -> Settings {
        Settings {
            gateway: self.gateway.clone(),
            token: self.token.clone(),
            instance_id: self.instance_id.clone(),
            expose: self.expose.clone(),
            max_backoff: self.max_backoff,
            drain_timeout: self.drain_timeout,
            threads: self.threads,
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Settings::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Settings::default(),
    };
    let cfg = cli.settings().over(file).into_config()?;
    tracing::info!(
        instance = %cfg.instance_id,
        agent = %cfg.token.agent,
        services = cfg.services.len(),
        "starting strait-agent {}",
        env!("CARGO_PKG_VERSION")
    );
    let runtime = strait_agent::runtime(cfg.threads).context("building the runtime")?;
    runtime.block_on(async move {
        // A task of its own, so a panic in it ends here as an error rather than unwinding
        // through `block_on` (one thread: this one runs it; more: a worker does).
        tokio::spawn(strait_agent::run(cfg, shutdown_signal()))
            .await
            .context("agent task")
    })??;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. If a handler cannot be installed, that signal is simply not
/// awaited (the other still works; the default disposition still kills the process).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_repeated_and_comma_separated_values() {
        let cli = Cli::try_parse_from([
            "strait-agent",
            "--gateway",
            "wss://a",
            "--gateway",
            "wss://b,wss://c",
            "--token",
            "st1.alpha.k1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "--expose",
            "http://127.0.0.1:3000",
            "--expose",
            "ssh=tcp://127.0.0.1:22",
            "--max-backoff",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.gateway, vec!["wss://a", "wss://b", "wss://c"]);
        let cfg = cli.settings().over(Settings::default()).into_config().unwrap();
        assert_eq!(cfg.gateways.len(), 3);
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(cfg.max_backoff, std::time::Duration::from_secs(5));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
