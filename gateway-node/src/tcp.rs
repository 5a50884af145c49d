//! TCP routes: a gateway port mapped to an agent's TCP service. Each accepted connection becomes
//! one byte stream (`StreamOpen`, then `Data`/`Credit`/`Fin`/`Reset`), owned by a [`RawStream`]
//! actor with its idle timeout, byte quota and flow-control credit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_rt::task::JoinHandle;
use bytes::BytesMut;
use strait_schema::read_size::ReadSize;
use strait_schema::{Data, ErrorCode, Fin, Frame, Reset, StreamId, StreamOpen};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::cluster;
use crate::inflight::CreditReturner;
use crate::node::NodeState;
use crate::session::{AgentLink, BodyEvent, OpenStream, StreamCloser, StreamEvent, StreamOwner};
use crate::store::{now_ms, Route};

/// Keeps one listener per stored route, reloading the route table every `cfg.route_poll`, so
/// routes added or removed while the node runs take effect within that time. Connections are
/// spread over `arbiters` so byte streams use every core.
pub async fn run_routes(state: Arc<NodeState>, arbiters: Vec<ArbiterHandle>) {
    let arbiters = Arc::new(arbiters);
    let mut live: HashMap<SocketAddr, (Route, JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(state.cfg.route_poll.max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        let routes = match state.store.list_routes().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not load TCP routes");
                continue;
            }
        };
        live.retain(|addr, (route, task)| {
            let keep = routes.iter().any(|r| r == route && r.served_by(&state.cfg.node_id));
            if !keep {
                tracing::info!(listen = %addr, "TCP route removed; no longer listening");
                task.abort();
            }
            keep
        });
        for route in routes.into_iter().filter(|r| r.served_by(&state.cfg.node_id)) {
            if live.contains_key(&route.listen) {
                continue;
            }
            match tokio::net::TcpListener::bind(route.listen).await {
                Ok(listener) => {
                    tracing::info!(listen = %route.listen, agent = %route.agent, service = %route.service, "TCP route listening");
                    let task = actix_rt::spawn(accept_loop(state.clone(), route.clone(), listener, arbiters.clone()));
                    live.insert(route.listen, (route, task));
                }
                Err(e) => tracing::warn!(listen = %route.listen, error = %e, "cannot listen for TCP route; will retry"),
            }
        }
    }
}

static NEXT_ARBITER: AtomicUsize = AtomicUsize::new(0);

async fn accept_loop(
    state: Arc<NodeState>,
    route: Route,
    listener: tokio::net::TcpListener,
    arbiters: Arc<Vec<ArbiterHandle>>,
) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listen = %route.listen, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let Ok(std_sock) = sock.into_std() else { continue };
        let (state, route) = (state.clone(), route.clone());
        let span =
            tracing::info_span!("tcp.accept", otel.kind = "server", agent = %route.agent, service = %route.service);
        // An agent connected here: run the stream on its session's thread, so the relay and the
        // agent's writer never wake each other across threads. Otherwise spread the streams.
        let home = state.sessions.get(&route.agent).map(|s| s.arbiter);
        let i = NEXT_ARBITER.fetch_add(1, Ordering::Relaxed) % arbiters.len().max(1);
        // The stream's actor context is not `Send`, so the future is built on the arbiter itself.
        let run = move || {
            actix_rt::spawn(async move {
                match tokio::net::TcpStream::from_std(std_sock) {
                    Ok(sock) => open(state, route, sock, peer).instrument(span).await,
                    Err(e) => tracing::warn!(error = %e, "could not adopt accepted socket"),
                }
            });
        };
        match home.as_ref().or_else(|| arbiters.get(i)) {
            Some(a) => {
                a.spawn_fn(run);
            }
            None => run(),
        }
    }
}

/// Opens a stream to the route's agent for one accepted connection. Refusals close the socket at
/// once (a raw TCP caller cannot be told a code), and are logged and counted with their code.
async fn open(state: Arc<NodeState>, route: Route, sock: tokio::net::TcpStream, peer: SocketAddr) {
    let refuse = |code: ErrorCode, why: String| {
        tracing::info!(listen = %route.listen, %peer, agent = %route.agent, %code, why, "TCP connection refused");
        state.metrics.streams.with_label_values(&[code.as_str()]).inc();
    };
    let target = match cluster::locate(&state, &route.agent).await {
        Ok(t) => t,
        Err((code, why)) => return refuse(code, why),
    };
    let id = StreamId::random();
    let (body_tx, body_rx) = mpsc::unbounded_channel();
    let ctx = Context::<RawStream>::new();
    let addr = ctx.address();
    let open = OpenStream {
        id,
        ctl: StreamOwner::Actor(addr.recipient()),
        body: body_tx,
        expects_head: false,
        carries_http: false,
    };
    let grant = match cluster::open_stream(&state, &target, &route.agent, open).await {
        Ok(g) => g,
        Err((code, why)) => return refuse(code, why),
    };
    if !grant.link.send(&Frame::StreamOpen(StreamOpen {
        stream: id,
        service: route.service.clone(),
        http: false,
    })) {
        return refuse(ErrorCode::AgentUnavailable, "agent disconnected".into());
    }
    tracing::debug!(stream = %id, %peer, agent = %route.agent, service = %route.service, "TCP stream opened");
    let (rd, wr) = sock.into_split();
    let stream = RawStream {
        id,
        node: state.clone(),
        closer: grant.closer.clone(),
        link: grant.link.clone(),
        credit: Arc::new(Semaphore::new(grant.limits.stream_window as usize)),
        last_activity_ms: Arc::new(AtomicU64::new(now_ms())),
        bytes: Arc::new(AtomicU64::new(0)),
        tasks: Vec::new(),
        open_halves: 2,
        outcome: None,
    };
    let max_data = grant.limits.max_data_bytes as usize;
    let credit_back = CreditReturner::new(&grant, id);
    ctx.run(stream).do_send(Pump {
        rd,
        wr,
        body_rx,
        max_data,
        credit_back,
    });
}

/// Hands the socket halves to the actor once it runs.
#[derive(Message)]
#[rtype(result = "()")]
struct Pump {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    body_rx: mpsc::UnboundedReceiver<BodyEvent>,
    max_data: usize,
    credit_back: CreditReturner,
}

/// One direction finished cleanly (`Ok`) or the stream must end with a code.
#[derive(Message)]
#[rtype(result = "()")]
enum HalfDone {
    Clean,
    Failed(ErrorCode, String),
}

/// Caller side of one byte stream (TCP route connection).
pub struct RawStream {
    id: StreamId,
    node: Arc<NodeState>,
    closer: StreamCloser,
    link: AgentLink,
    credit: Arc<Semaphore>,
    last_activity_ms: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
    open_halves: u8,
    /// Set when the stream ended with a code (ours or the agent's); `None` while healthy.
    outcome: Option<(ErrorCode, bool)>,
}

impl RawStream {
    /// Ends the stream with `code`; `tell_agent` is false when the agent already knows (its reset).
    fn fail(&mut self, ctx: &mut Context<Self>, code: ErrorCode, why: &str, tell_agent: bool) {
        if self.outcome.is_none() {
            tracing::info!(stream = %self.id, %code, why, "byte stream closed");
            self.outcome = Some((code, tell_agent));
            if tell_agent {
                self.node.metrics.resets.with_label_values(&[code.as_str()]).inc();
                self.link.send(&Frame::Reset(Reset {
                    stream: self.id,
                    code,
                    reason: why.to_owned(),
                }));
            }
        }
        ctx.stop();
    }

    /// Counts bytes against the quota; false once it is exceeded.
    fn within_quota(bytes: &AtomicU64, quota: Option<u64>, n: usize) -> bool {
        let total = bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        quota.is_none_or(|q| total <= q)
    }
}

impl Actor for RawStream {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        if let Some(idle) = self.node.cfg.idle_timeout {
            let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            ctx.run_interval(every, move |this, ctx| {
                let quiet = now_ms().saturating_sub(this.last_activity_ms.load(Ordering::Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    this.fail(
                        ctx,
                        ErrorCode::IdleTimeout,
                        &format!("no bytes either way for {} s", idle.as_secs_f32()),
                        true,
                    );
                }
            });
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if self.outcome.is_none() && self.open_halves > 0 {
            self.link.send(&Frame::Reset(Reset {
                stream: self.id,
                code: ErrorCode::Reset,
                reason: "caller went away".into(),
            }));
        }
        self.closer.close(self.id);
        let outcome = self.outcome.map_or("ok", |(c, _)| c.as_str());
        self.node.metrics.streams.with_label_values(&[outcome]).inc();
    }
}

impl Handler<Pump> for RawStream {
    type Result = ();

    fn handle(&mut self, p: Pump, ctx: &mut Self::Context) {
        let me = ctx.address();
        let quota = self.node.cfg.stream_quota;
        let metrics = self.node.metrics.clone();

        // Caller -> agent, within the agent's credit.
        let (link, id, credit, activity, bytes, done) = (
            self.link.clone(),
            self.id,
            self.credit.clone(),
            self.last_activity_ms.clone(),
            self.bytes.clone(),
            me.clone(),
        );
        let mut rd = p.rd;
        let max_data = p.max_data;
        self.tasks.push(actix_rt::spawn(async move {
            let mut buf = BytesMut::new();
            let mut size = ReadSize::new(max_data);
            loop {
                let n = match size.read_from(&mut rd, &mut buf, usize::MAX).await {
                    Ok(0) => {
                        link.send(&Frame::Fin(Fin { stream: id }));
                        done.do_send(HalfDone::Clean);
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        done.do_send(HalfDone::Failed(
                            ErrorCode::Reset,
                            format!("caller connection failed: {e}"),
                        ));
                        return;
                    }
                };
                activity.store(now_ms(), Ordering::Relaxed);
                if !RawStream::within_quota(&bytes, quota, n) {
                    done.do_send(HalfDone::Failed(
                        ErrorCode::QuotaExceeded,
                        "stream byte quota exceeded".into(),
                    ));
                    return;
                }
                let Ok(permit) = credit.acquire_many(n as u32).await else {
                    return;
                };
                permit.forget();
                metrics.bytes_in.inc_by(n as u64);
                if !link.send(&Frame::Data(Data {
                    stream: id,
                    bytes: buf.split_to(n).freeze(),
                })) {
                    return;
                }
            }
        }));

        // Agent -> caller; credit goes back as the caller's socket takes the bytes.
        let (activity, bytes, done) = (self.last_activity_ms.clone(), self.bytes.clone(), me);
        let (mut wr, mut rx, mut credit_back) = (p.wr, p.body_rx, p.credit_back);
        self.tasks.push(actix_rt::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    BodyEvent::Data(b) => {
                        activity.store(now_ms(), Ordering::Relaxed);
                        if !RawStream::within_quota(&bytes, quota, b.len()) {
                            done.do_send(HalfDone::Failed(
                                ErrorCode::QuotaExceeded,
                                "stream byte quota exceeded".into(),
                            ));
                            return;
                        }
                        if let Err(e) = wr.write_all(&b).await {
                            done.do_send(HalfDone::Failed(
                                ErrorCode::Reset,
                                format!("caller connection failed: {e}"),
                            ));
                            return;
                        }
                        activity.store(now_ms(), Ordering::Relaxed);
                        credit_back.consumed(b.len(), rx.is_empty());
                    }
                    // Only carried HTTP connections are drained between requests.
                    BodyEvent::Drain => {}
                    BodyEvent::Fin => {
                        // Half-close towards the caller; this direction is done.
                        let _ = wr.shutdown().await;
                        done.do_send(HalfDone::Clean);
                        return;
                    }
                    BodyEvent::Reset(..) => return,
                }
            }
        }));
    }
}

impl Handler<HalfDone> for RawStream {
    type Result = ();
    fn handle(&mut self, msg: HalfDone, ctx: &mut Self::Context) {
        match msg {
            HalfDone::Clean => {
                self.open_halves = self.open_halves.saturating_sub(1);
                if self.open_halves == 0 {
                    ctx.stop();
                }
            }
            HalfDone::Failed(code, why) => self.fail(ctx, code, &why, true),
        }
    }
}

impl Handler<StreamEvent> for RawStream {
    type Result = ();
    fn handle(&mut self, ev: StreamEvent, ctx: &mut Self::Context) {
        match ev {
            StreamEvent::Credit(n) => {
                if self.credit.available_permits() < Semaphore::MAX_PERMITS / 2 {
                    self.credit.add_permits(n as usize);
                }
            }
            StreamEvent::Reset(code, why) => self.fail(ctx, code, &why, false),
            StreamEvent::Head(_) => self.fail(ctx, ErrorCode::ProtocolError, "response head on a byte stream", true),
        }
    }
}
