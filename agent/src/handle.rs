//! Running the agent beside someone else's runtime: its own multi-thread tokio runtime, driven
//! through a handle whose methods never block the caller's executor.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::{supervise, AgentConfig, AgentStatus, Error};

/// An agent running on its own tokio runtime ([`AgentConfig::threads`] workers). Its methods are
/// safe to call from any async context, including a single-threaded actix runtime: waiting
/// happens on the agent's runtime and is only awaited from the caller's.
///
/// Dropping the handle without [`AgentHandle::shutdown`] kills the agent like
/// [`AgentHandle::kill`].
pub struct AgentHandle {
    status: watch::Receiver<AgentStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
    runtime: Option<Runtime>,
    not_started: Option<Error>,
}

impl AgentHandle {
    /// Starts the agent. Never fails here: an invalid config or a runtime that cannot be built
    /// shows as [`AgentStatus::Stopped`], and [`AgentHandle::connected`] returns the reason.
    pub fn spawn(cfg: AgentConfig) -> AgentHandle {
        let (status_tx, status) = watch::channel(AgentStatus::Connecting);
        let failed = |status_tx: watch::Sender<AgentStatus>, status, e: Error| {
            status_tx.send_replace(AgentStatus::Stopped);
            AgentHandle {
                status,
                stop: None,
                task: None,
                runtime: None,
                not_started: Some(e),
            }
        };
        if let Err(e) = cfg.validate() {
            return failed(status_tx, status, Error::NotStarted(e.to_string()));
        }
        let runtime = match crate::background_runtime(cfg.threads) {
            Ok(rt) => rt,
            Err(e) => return failed(status_tx, status, Error::Runtime(Arc::new(e))),
        };
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = runtime.spawn(supervise(
            cfg,
            async move {
                let _ = stop_rx.await;
            },
            status_tx,
        ));
        AgentHandle {
            status,
            stop: Some(stop),
            task: Some(task),
            runtime: Some(runtime),
            not_started: None,
        }
    }

    /// A receiver of the agent's status; every change is published.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Waits until a gateway accepted the agent and returns its node id. Returns
    /// [`Error::Refused`] as soon as a handshake is refused (also when the last attempt's
    /// refusal is still the current status), [`Error::Timeout`] when `timeout` passes first.
    pub async fn connected(&self, timeout: Duration) -> Result<String, Error> {
        if let Some(e) = &self.not_started {
            return Err(e.clone());
        }
        let Some(rt) = &self.runtime else {
            return Err(Error::Stopped);
        };
        let mut status = self.status.clone();
        let waiter = rt.spawn(async move {
            tokio::time::timeout(timeout, async move {
                loop {
                    match &*status.borrow_and_update() {
                        AgentStatus::Connected { node_id } => return Ok(node_id.clone()),
                        AgentStatus::Refused { code, message } => {
                            return Err(Error::Refused {
                                code: *code,
                                message: message.clone(),
                            })
                        }
                        AgentStatus::Stopped => return Err(Error::Stopped),
                        AgentStatus::Connecting | AgentStatus::Backoff { .. } => {}
                    }
                    if status.changed().await.is_err() {
                        return Err(Error::Stopped);
                    }
                }
            })
            .await
            .unwrap_or(Err(Error::Timeout(timeout)))
        });
        waiter.await.unwrap_or(Err(Error::Stopped))
    }

    /// Graceful stop: no new streams, in-flight ones drain (up to the drain timeout), the
    /// WebSocket closes with a close frame, then the runtime goes away.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Ok(Err(e)) = task.await {
                tracing::warn!("agent stopped with an error: {e}");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Abrupt stop, as if the process died: every socket is dropped without a close frame.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        // `shutdown_background` never blocks, so dropping inside an async context is fine
        // (dropping a `Runtime` there would panic).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}
