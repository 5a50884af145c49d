//! The caller side of one ingress request: how the agent's answer reaches the waiting handler
//! (its head through a one-shot, credit straight into the body pump's semaphore), the head
//! timer, the request-body pump, and the cleanup that tells the agent when the caller is gone.
//!
//! No actor sits between the agent's session and the handler: a small request used to cost an
//! actor spawn, a mailbox and one more task wake-up each way (docs/benchmarks.md, eighteenth
//! round). `Request` is owned by the handler, then by the response body, and whichever drops it
//! ends the stream.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use strait_schema::window::Window;
use strait_schema::{Credit, Data, ErrorCode, Fin, Frame, Reset, ResponseHead, StreamId};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::NodeState;
use crate::session::{AgentLink, BodyEvent, StreamCloser, StreamEvent, StreamGrant};

/// How a request ended before or instead of a response head.
pub type HeadResult = Result<ResponseHead, (ErrorCode, String)>;

/// What the agent's session (or the bus bridge) hands an ingress request: the head to the
/// handler waiting for it, credit to the body pump, a reset to both.
pub struct RequestCtl {
    head: Mutex<Option<oneshot::Sender<HeadResult>>>,
    credit: Arc<Semaphore>,
}

impl RequestCtl {
    /// For a stream whose agent granted `window` bytes of request body; the receiver is where
    /// the handler waits for the head.
    pub fn new(window: u32) -> (Arc<Self>, oneshot::Receiver<HeadResult>) {
        let (tx, rx) = oneshot::channel();
        let ctl = RequestCtl {
            head: Mutex::new(Some(tx)),
            credit: Arc::new(Semaphore::new(window as usize)),
        };
        (Arc::new(ctl), rx)
    }

    /// The credit the agent grants for bytes towards it, for a pump other than [`Request`]'s.
    pub fn credit(&self) -> Arc<Semaphore> {
        self.credit.clone()
    }

    /// False when the event cannot be delivered: a head nobody waits for any more (the stream
    /// should be reset).
    pub fn deliver(&self, ev: StreamEvent) -> bool {
        match ev {
            StreamEvent::Head(h) => match self.head.lock().take() {
                Some(tx) => tx.send(Ok(h)).is_ok(),
                None => false,
            },
            StreamEvent::Credit(n) => {
                // Bound the permits so a misbehaving agent cannot overflow the semaphore.
                if self.credit.available_permits() < Semaphore::MAX_PERMITS / 2 {
                    self.credit.add_permits(n as usize);
                }
                true
            }
            StreamEvent::Reset(code, why) => {
                // The pump stops at its next wait for credit; the body sees the reset itself.
                self.credit.close();
                if let Some(tx) = self.head.lock().take() {
                    let _ = tx.send(Err((code, why)));
                }
                true
            }
        }
    }
}

/// The caller side of one opened stream. Dropping it ends the stream: the agent is told when the
/// caller went away before the stream was complete, and the outcome is recorded.
pub struct Request {
    id: StreamId,
    node: Arc<NodeState>,
    closer: StreamCloser,
    link: AgentLink,
    pump: Option<actix_rt::task::JoinHandle<()>>,
    started: Instant,
    outcome: Option<&'static str>,
    head_seen: bool,
    /// The agent knows the stream is over: its `Fin`, its `Reset` or a head with `end` came, or
    /// we reset it.
    finished: bool,
}

impl Request {
    /// The caller side of the stream `grant` opened.
    pub fn new(id: StreamId, node: Arc<NodeState>, grant: &StreamGrant) -> Self {
        Request {
            id,
            node,
            closer: grant.closer.clone(),
            link: grant.link.clone(),
            pump: None,
            started: Instant::now(),
            outcome: None,
            head_seen: false,
            finished: false,
        }
    }

    /// Starts pumping the request body towards the agent, within the credit `ctl` receives. (A
    /// request without a body has none to pump: its head carried `end`.) The body is the caller's
    /// request body, or the caller's side of an upgraded connection; the pump runs on this
    /// worker's thread.
    pub fn pump_body<S, E>(&mut self, mut body: S, ctl: &RequestCtl, max_data: usize)
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + 'static,
    {
        let (link, id, credit, node) = (self.link.clone(), self.id, ctl.credit.clone(), self.node.clone());
        let closer = self.closer.clone();
        self.pump = Some(actix_rt::spawn(async move {
            while let Some(chunk) = body.next().await {
                let Ok(mut chunk) = chunk else {
                    link.send(&Frame::Reset(Reset {
                        stream: id,
                        code: ErrorCode::Reset,
                        reason: "caller aborted the request body".into(),
                    }));
                    // The agent forgets the stream without a word, so this side lets go too:
                    // the response body ends at once (an upgraded connection's other half waits
                    // on nothing else).
                    closer.close(id);
                    return;
                };
                node.metrics.bytes_in.inc_by(chunk.len() as u64);
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

    /// Waits for the agent's head, up to the head timeout (then the agent is told, and the
    /// caller gets 504 `TIMEOUT`).
    pub async fn head(&mut self, rx: oneshot::Receiver<HeadResult>) -> HeadResult {
        let res = match actix_rt::time::timeout(self.node.cfg.head_timeout, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err((ErrorCode::Internal, "stream ended without an answer".into())),
            Err(_) => {
                tracing::info!(stream = %self.id, "no response head within the head timeout");
                self.reset_agent(ErrorCode::Timeout, "no response head in time");
                Err((ErrorCode::Timeout, "the agent did not answer in time".into()))
            }
        };
        match &res {
            Ok(h) => {
                self.head_seen = true;
                // The head carried the whole response: the stream is complete.
                self.finished = h.end;
            }
            Err((code, _)) => {
                self.finished = true;
                self.outcome = Some(code.as_str());
            }
        }
        res
    }

    fn reset_agent(&self, code: ErrorCode, why: &str) {
        self.link.send(&Frame::Reset(Reset {
            stream: self.id,
            code,
            reason: why.to_owned(),
        }));
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // Every exit path ends here, so the agent never keeps a stream nobody reads.
        if let Some(p) = self.pump.take() {
            p.abort();
        }
        if !self.finished {
            self.reset_agent(ErrorCode::Reset, "caller went away");
            let gone = if self.head_seen { "aborted" } else { "caller_gone" };
            self.outcome.get_or_insert(gone);
        }
        self.closer.close(self.id);
        let m = &self.node.metrics;
        m.requests.with_label_values(&[self.outcome.unwrap_or("ok")]).inc();
        m.request_seconds.observe(self.started.elapsed().as_secs_f64());
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
/// It owns the [`Request`], so the stream ends when the caller's connection lets go of it.
pub struct TunnelBody {
    rx: mpsc::UnboundedReceiver<BodyEvent>,
    credit: CreditReturner,
    request: Request,
    done: bool,
}

impl TunnelBody {
    /// Wraps a stream's body channel.
    pub fn new(rx: mpsc::UnboundedReceiver<BodyEvent>, grant: &StreamGrant, id: StreamId, request: Request) -> Self {
        TunnelBody {
            rx,
            credit: CreditReturner::new(grant, id),
            request,
            done: false,
        }
    }

    /// The request this body ends, for pumping an upgraded connection's other half.
    pub fn request_mut(&mut self) -> &mut Request {
        &mut self.request
    }

    /// The stream is over as far as the agent is concerned (`outcome` if it did not end well).
    fn end(&mut self, outcome: Option<&'static str>) {
        self.done = true;
        self.request.finished = true;
        if let Some(o) = outcome {
            self.request.outcome.get_or_insert(o);
        }
    }
}

impl Stream for TunnelBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            return match self.rx.poll_recv(cx) {
                // Only carried connections are drained between requests; a body reads on.
                Poll::Ready(Some(BodyEvent::Drain)) => continue,
                Poll::Ready(Some(BodyEvent::Data(b))) => {
                    let caught_up = self.rx.is_empty();
                    self.credit.consumed(b.len(), caught_up);
                    Poll::Ready(Some(Ok(b)))
                }
                Poll::Ready(Some(BodyEvent::Fin)) => {
                    self.end(None);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(BodyEvent::Reset(code, why))) => {
                    self.end(Some(code.as_str()));
                    Poll::Ready(Some(Err(std::io::Error::other(format!("{code}: {why}")))))
                }
                Poll::Ready(None) => {
                    // The session dropped the stream: there is no one left to tell.
                    self.end(Some("aborted"));
                    Poll::Ready(Some(Err(std::io::Error::other("agent session ended"))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}
