//! Strait's edge agent. It dials out to a gateway over one WebSocket, authenticates with its
//! token, and forwards the streams the gateway opens to the local services it exposes (and to
//! nothing else). Connection loss, refusals and `GoAway` all lead to a reconnect with
//! full-jitter backoff; shutdown drains in-flight streams first.
//!
//! Embed it with [`run`] (inside your runtime) or [`AgentHandle::spawn`] (on its own runtime,
//! usable from any async context, e.g. the gateway's integration tests).

mod backoff;
pub mod config;
mod error;
mod flow;
mod handle;
mod http_fwd;
mod pool;
mod session;
mod tcp_fwd;
mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::ConfigBuilderExt;
use strait_schema::RefuseCode;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

pub use config::{AgentConfig, GatewayUrl, Service, ServiceTarget, Settings};
pub use error::Error;
pub use handle::AgentHandle;

use crate::backoff::{Backoff, BASE};
use crate::config::ServiceTarget as Target;
use crate::session::{Exit, Shared, Upstream};

/// Where the agent is in its connect cycle, as seen through [`AgentHandle::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// Dialling a gateway and waiting for `Welcome`.
    Connecting,
    /// A gateway accepted us.
    Connected {
        /// The gateway node we are connected to.
        node_id: String,
    },
    /// The last handshake was refused. Stays the status through the backoff that follows, so a
    /// waiter cannot miss it; the next attempt moves on to `Connecting`.
    Refused {
        /// Stable refusal code.
        code: RefuseCode,
        /// Gateway's detail text.
        message: String,
    },
    /// Waiting before the next attempt after a failed or lost connection.
    Backoff {
        /// How long.
        delay: Duration,
        /// Why the last connection or attempt ended (what the log says too), so an operator or
        /// a test watching the status can tell a lost link from a drain or a refusal.
        reason: String,
    },
    /// Shut down (or failed to start); nothing runs any more.
    Stopped,
}

/// Runs the agent until `shutdown` resolves, then stops taking streams, drains in-flight ones
/// for at most [`AgentConfig::drain_timeout`], closes the WebSocket and returns. Errors only
/// for a configuration that cannot run; connection problems are retried, never returned.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let (status, _) = watch::channel(AgentStatus::Connecting);
    supervise(cfg, shutdown, status).await
}

/// The runtime the agent binary runs on, for [`AgentConfig::threads`] threads; drive it with
/// `block_on`. One thread (the default) is a current-thread runtime: the thread that calls
/// `block_on` runs every task, and a wake-up between them is a plain queue push, not the
/// multi-thread scheduler's atomics and parking (about a tenth of the agent's CPU per small
/// request, docs/benchmarks.md, twenty-second round). More threads are a multi-thread runtime.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    background_runtime(threads)
}

/// A runtime whose worker threads run spawned tasks without anyone calling `block_on`, as
/// [`AgentHandle::spawn`] needs beside someone else's runtime.
fn background_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("strait-agent")
        .enable_all()
        .build()
}

/// TLS for both the gateway (wss://) and https:// services: ring, Mozilla's roots, chosen
/// explicitly so no process-wide default provider is needed.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_webpki_roots()
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Builds what outlives single connections (upstream pools, TLS).
fn prepare(cfg: AgentConfig) -> Result<Arc<Shared>, Error> {
    cfg.validate()?;
    let tls = tls_config()?;
    let services: HashMap<String, Upstream> = cfg
        .services
        .iter()
        .map(|s| {
            let up = match &s.target {
                Target::Http(t) => Upstream::Http(Arc::new(http_fwd::HttpUpstream::new(t.clone(), tls.clone()))),
                Target::Tcp(t) => Upstream::Tcp(t.clone()),
            };
            (s.name.clone(), up)
        })
        .collect();
    Ok(Arc::new(Shared { cfg, services, tls }))
}

/// The reconnect loop: one live connection at a time, plus connections retiring after a
/// `GoAway` that finish their streams in the background.
pub(crate) async fn supervise(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()>,
    status: watch::Sender<AgentStatus>,
) -> Result<(), Error> {
    let shared = match prepare(cfg) {
        Ok(s) => s,
        Err(e) => {
            status.send_replace(AgentStatus::Stopped);
            return Err(e);
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // Counts welcomed connections, so one retiring after a GoAway knows its replacement is up.
    let (welcomed_tx, welcomed_rx) = watch::channel(0u64);
    let mut retiring = JoinSet::new();
    let mut backoff = Backoff::new(shared.cfg.max_backoff);
    let gateways = &shared.cfg.gateways;
    let mut next = 0usize;
    // The last connection ended with a GoAway, so the next one is its replacement.
    let mut after_go_away = false;
    tokio::pin!(shutdown);

    'run: loop {
        while retiring.try_join_next().is_some() {}
        let url = &gateways[next % gateways.len()];
        next = next.wrapping_add(1);
        status.send_replace(AgentStatus::Connecting);
        let attempt = tokio::select! {
            _ = &mut shutdown => break 'run,
            r = session::handshake(&shared, url) => r,
        };
        let (delay, why) = match attempt {
            Ok(est) => {
                backoff.reset();
                let node_id = est.welcome.node_id.clone();
                tracing::info!("connected to gateway node={node_id} url={url}");
                status.send_replace(AgentStatus::Connected { node_id });
                welcomed_tx.send_modify(|n| *n += 1);
                let since = tokio::time::Instant::now();
                let replaces = std::mem::take(&mut after_go_away);
                let (go_tx, mut go_rx) = oneshot::channel();
                let mut conn = tokio::spawn(session::serve(
                    shared.clone(),
                    est,
                    stop_rx.clone(),
                    go_tx,
                    welcomed_rx.clone(),
                ));
                tokio::select! {
                    _ = &mut shutdown => {
                        let _ = stop_tx.send(true);
                        let _ = conn.await;
                        break 'run;
                    }
                    Ok(reason) = &mut go_rx => {
                        retiring.spawn(async move {
                            let exit = conn.await;
                            tracing::debug!(?exit, "retired connection finished");
                        });
                        after_go_away = true;
                        (Duration::ZERO, format!("gateway sent GoAway: {reason}"))
                    }
                    exit = &mut conn => {
                        let why = match exit {
                            Ok(Exit::Lost(why)) => why,
                            Ok(other) => format!("connection ended: {other:?}"),
                            Err(e) => format!("connection task failed: {e}"),
                        };
                        (backoff.after_loss(since.elapsed(), replaces), why)
                    }
                }
            }
            Err(Error::Refused { code, message }) => {
                tracing::info!("refused by gateway: {code} {message}");
                status.send_replace(AgentStatus::Refused { code, message });
                let delay = if code.is_final() {
                    backoff.cap()
                } else {
                    backoff.next_delay().max(BASE.min(backoff.cap()))
                };
                (delay, format!("refused: {code}"))
            }
            Err(e) => (backoff.next_delay(), e.to_string()),
        };
        tracing::info!("reconnecting in {:.1}s ({why})", delay.as_secs_f64());
        if !matches!(*status.borrow(), AgentStatus::Refused { .. }) {
            status.send_replace(AgentStatus::Backoff { delay, reason: why });
        }
        tokio::select! {
            _ = &mut shutdown => break 'run,
            _ = tokio::time::sleep(delay) => {}
        }
    }

    let _ = stop_tx.send(true);
    while retiring.join_next().await.is_some() {}
    status.send_replace(AgentStatus::Stopped);
    Ok(())
}
