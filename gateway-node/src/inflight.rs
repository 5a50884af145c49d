//! One actor per external request: owns the caller side of a stream — the head timer, the
//! request-body pump and its send credit, and the cleanup that tells the agent when the caller
//! is gone.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use strait_schema::window::Window;
use strait_schema::{Credit, Data, ErrorCode, Fin, Frame, Reset, ResponseHead, StreamId};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::NodeState;
use crate::session::{AgentLink, BodyEvent, StreamCloser, StreamEvent, StreamGrant};

/// How a request ended before or instead of a response head.
pub type HeadResult = Result<ResponseHead, (ErrorCode, String)>;

/// The response body finished (`complete`) or was dropped by the caller.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BodyDone {
    /// True when the agent's `Fin` was reached.
    pub complete: bool,
}

/// The caller's handler went away before a head arrived (client disconnected).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CallerGone;

/// Caller side of one stream.
pub struct InFlight {
    id: StreamId,
    node: Arc<NodeState>,
    closer: StreamCloser,
    link: AgentLink,
    head_tx: Option<oneshot::Sender<HeadResult>>,
    send_credit: Arc<Semaphore>,
    pump: Option<actix_rt::task::JoinHandle<()>>,
    started: Instant,
    outcome: Option<&'static str>,
    finished: bool,
}

impl InFlight {
    /// Builds the actor for an opened stream.
    pub fn new(id: StreamId, node: Arc<NodeState>, grant: &StreamGrant, head_tx: oneshot::Sender<HeadResult>) -> Self {
        InFlight {
            id,
            node,
            closer: grant.closer.clone(),
            link: grant.link.clone(),
            head_tx: Some(head_tx),
            send_credit: Arc::new(Semaphore::new(grant.limits.stream_window as usize)),
            pump: None,
            started: Instant::now(),
            outcome: None,
            finished: false,
        }
    }

    /// Starts pumping the request body towards the agent, within its credit. (A request without
    /// a body has none to pump: its head carried `end`.) The payload is `!Send`, so the pump runs
    /// on this worker's thread.
    pub fn pump_body(&mut self, mut body: actix_web::web::Payload, max_data: usize) {
        let (link, id, credit, node) = (self.link.clone(), self.id, self.send_credit.clone(), self.node.clone());
        self.pump = Some(actix_rt::spawn(async move {
            while let Some(chunk) = body.next().await {
                let Ok(mut chunk) = chunk else {
                    link.send(&Frame::Reset(Reset {
                        stream: id,
                        code: ErrorCode::Reset,
                        reason: "caller aborted the request body".into(),
                    }));
                    return;
                };
                node.metrics.bytes.with_label_values(&["in"]).inc_by(chunk.len() as u64);
                while !chunk.is_empty() {
                    let n = chunk.len().min(max_data);
                    let Ok(permit) = credit.acquire_many(n as u32).await else {
                        return;
                    };
                    permit.forget();
                    if !link.send(&Frame::Data(Data {
                        stream: id,
                        bytes: chunk.split_to(n),
                    })) {
                        return;
                    }
                }
            }
            link.send(&Frame::Fin(Fin { stream: id }));
        }));
    }

    /// Answers the caller's handler once; later answers (after a head went out) are no-ops.
    fn answer(&mut self, res: HeadResult) {
        let Some(tx) = self.head_tx.take() else { return };
        if let Err((code, _)) = &res {
            self.outcome.get_or_insert(code.as_str());
        }
        let _ = tx.send(res);
    }

    fn reset_agent(&self, code: ErrorCode, why: &str) {
        self.link.send(&Frame::Reset(Reset {
            stream: self.id,
            code,
            reason: why.to_owned(),
        }));
    }
}

impl Actor for InFlight {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        ctx.run_later(self.node.cfg.head_timeout, |this, ctx| {
            if this.head_tx.is_some() {
                tracing::info!(stream = %this.id, "no response head within the head timeout");
                this.reset_agent(ErrorCode::Timeout, "no response head in time");
                this.finished = true;
                this.answer(Err((ErrorCode::Timeout, "the agent did not answer in time".into())));
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(p) = self.pump.take() {
            p.abort();
        }
        if !self.finished {
            self.reset_agent(ErrorCode::Reset, "caller went away");
        }
        self.answer(Err((ErrorCode::Reset, "stream ended".into())));
        self.closer.close(self.id);
        let m = &self.node.metrics;
        m.requests.with_label_values(&[self.outcome.unwrap_or("ok")]).inc();
        m.request_seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Handler<StreamEvent> for InFlight {
    type Result = ();
    fn handle(&mut self, ev: StreamEvent, ctx: &mut Self::Context) {
        match ev {
            StreamEvent::Head(h) => {
                if self.head_tx.is_none() {
                    ctx.stop();
                    return;
                }
                let whole = h.end;
                self.answer(Ok(h));
                if whole {
                    // The head carried the whole response: the stream is complete.
                    self.finished = true;
                    ctx.stop();
                }
            }
            StreamEvent::Credit(n) => {
                // Bound the permits so a misbehaving agent cannot overflow the semaphore.
                if self.send_credit.available_permits() < Semaphore::MAX_PERMITS / 2 {
                    self.send_credit.add_permits(n as usize);
                }
            }
            StreamEvent::Reset(code, why) => {
                self.finished = true;
                if self.head_tx.is_some() {
                    self.answer(Err((code, why)));
                    ctx.stop();
                } else {
                    // The body sees the reset too and aborts the response; the pump stops now.
                    self.outcome = Some(code.as_str());
                    if let Some(p) = self.pump.take() {
                        p.abort();
                    }
                }
            }
        }
    }
}

impl Handler<BodyDone> for InFlight {
    type Result = ();
    fn handle(&mut self, msg: BodyDone, ctx: &mut Self::Context) {
        if msg.complete {
            self.finished = true;
        } else if self.outcome.is_none() {
            self.outcome = Some("aborted");
        }
        ctx.stop();
    }
}

impl Handler<CallerGone> for InFlight {
    type Result = ();
    fn handle(&mut self, _: CallerGone, ctx: &mut Self::Context) {
        if self.head_tx.is_some() {
            self.outcome = Some("caller_gone");
            ctx.stop();
        }
    }
}

/// Returns credit to the agent as bytes it sent are consumed by the caller, in batches of a
/// quarter window so credit frames stay few, and grows the window while the caller keeps up
/// ([`Window`]).
pub struct CreditReturner {
    link: AgentLink,
    id: StreamId,
    granted: Arc<AtomicU64>,
    pending: u32,
    window: Window,
}

impl CreditReturner {
    /// For one opened stream.
    pub fn new(grant: &StreamGrant, id: StreamId) -> Self {
        CreditReturner {
            link: grant.link.clone(),
            id,
            granted: grant.granted.clone(),
            pending: 0,
            window: Window::new(grant.windows.clone(), grant.limits.stream_window),
        }
    }

    /// Records `n` bytes consumed; sends a `Credit` once a batch is due. `caught_up`: nothing
    /// more from the agent is waiting for the caller.
    pub fn consumed(&mut self, n: usize, caught_up: bool) {
        self.pending = self.pending.saturating_add(n as u32);
        if self.pending >= (self.window.size() / 4).max(1) {
            let n = std::mem::take(&mut self.pending).saturating_add(self.window.grow_if(caught_up));
            // Count the grant before sending it, so the session never sees data beyond it.
            self.granted.fetch_add(u64::from(n), Ordering::AcqRel);
            self.link.send(&Frame::Credit(Credit {
                stream: self.id,
                bytes: n,
            }));
        }
    }
}

/// The response body: reads the stream's body events and returns credit to the agent as the
/// caller's connection takes bytes, so a slow caller holds at most one window of this stream.
pub struct TunnelBody {
    rx: mpsc::UnboundedReceiver<BodyEvent>,
    credit: CreditReturner,
    inflight: Addr<InFlight>,
    done: bool,
}

impl TunnelBody {
    /// Wraps a stream's body channel.
    pub fn new(
        rx: mpsc::UnboundedReceiver<BodyEvent>,
        grant: &StreamGrant,
        id: StreamId,
        inflight: Addr<InFlight>,
    ) -> Self {
        TunnelBody {
            rx,
            credit: CreditReturner::new(grant, id),
            inflight,
            done: false,
        }
    }
}

impl Stream for TunnelBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(BodyEvent::Data(b))) => {
                let caught_up = self.rx.is_empty();
                self.credit.consumed(b.len(), caught_up);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(BodyEvent::Fin)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(BodyEvent::Reset(code, why))) => {
                self.done = true;
                Poll::Ready(Some(Err(std::io::Error::other(format!("{code}: {why}")))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(std::io::Error::other("agent session ended"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for TunnelBody {
    fn drop(&mut self) {
        // `done` without error means the Fin was reached; the flag for errors is set too, but then
        // InFlight already recorded the reset outcome.
        self.inflight.do_send(BodyDone { complete: self.done });
    }
}
