//! One gateway connection: the handshake, then the frame loop that owns the connection's
//! streams, its heartbeat and its drain. Everything that dies with the connection lives here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderValue, USER_AGENT};
use strait_schema::ws::Message;
use strait_schema::{
    credentials, decode, decode_bytes, encode, DecodeError, Drain, ErrorCode, Frame, Hello, Limits, Ping, Pong,
    RequestHead, ServiceKind, StreamId, StreamOpen, Welcome, CAP_DRAIN, CAP_INLINE_END, CAP_RAW_HTTP, PROTOCOL_VERSION,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream};

use crate::config::{AgentConfig, GatewayUrl, TcpTarget};
use crate::flow::{Inbound, Outbound, RecvCredit, SendCredit, StreamCtx, StreamSender};
use crate::http_fwd::{error_chain, HttpUpstream};
use crate::ws::{Outgoing, WsReader, WsWriter};
use crate::{http_fwd, tcp_fwd, Error};

/// Dial plus `Hello` plus `Welcome` must fit in this, or the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Stream frames queued for the writer before stream tasks wait (each at most one `Data`).
const DATA_QUEUE: usize = 64;

/// Messages written before one flush, so bursts of small frames share a syscall.
const WRITE_BATCH: usize = 64;

/// Buffered bytes at which a batch is written out before it is complete, so the write buffer
/// stays near one `Data` frame however many are queued.
const WRITE_AT: usize = 128 * 1024;

/// Heartbeats of silence after which the link counts as dead.
const SILENT_HEARTBEATS: u32 = 3;

/// After its replacement is connected, a connection told to go away keeps taking new streams for
/// this long: callers that located the agent just before the move still reach it here.
const HANDOVER_LINGER: Duration = Duration::from_secs(1);

/// How long the closing handshake may take once streams are done.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Room left in a frame for everything but the `Data` payload (Cap'n Proto framing, stream id).
const DATA_FRAME_OVERHEAD: usize = 128;

/// The gateway connection once upgraded, plain or TLS.
type Io = MaybeTlsStream<TcpStream>;

/// What the agent carries across connections: config, local upstreams (and their pools), TLS.
pub(crate) struct Shared {
    pub(crate) cfg: AgentConfig,
    pub(crate) services: HashMap<String, Upstream>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// A local service, ready to forward to.
#[derive(Clone)]
pub(crate) enum Upstream {
    Http(Arc<HttpUpstream>),
    Tcp(TcpTarget),
}

impl Upstream {
    fn kind(&self) -> ServiceKind {
        match self {
            Upstream::Http(_) => ServiceKind::Http,
            Upstream::Tcp(_) => ServiceKind::Tcp,
        }
    }
}

/// A connection that got its `Welcome`.
pub(crate) struct Established {
    reader: WsReader<ReadHalf<Io>>,
    writer: WsWriter<WriteHalf<Io>>,
    pub(crate) welcome: Welcome,
}

/// Why a connection's frame loop ended.
#[derive(Debug)]
pub(crate) enum Exit {
    /// Draining (shutdown or `GoAway`) and every stream finished; closed cleanly.
    Drained,
    /// Draining took longer than the drain timeout; remaining streams were cut.
    DrainTimeout,
    /// The link failed or the gateway closed it.
    Lost(String),
}

/// Dials `url`, sends a signed `Hello` and waits for `Welcome` (or `Refused`, returned as
/// [`Error::Refused`]). tokio-tungstenite only upgrades; frames are ours from then on (ws.rs).
pub(crate) async fn handshake(shared: &Shared, url: &GatewayUrl) -> Result<Established, Error> {
    let attempt = async {
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Connection(format!("bad gateway URL {url}: {e}")))?;
        req.headers_mut().insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("strait-agent/", env!("CARGO_PKG_VERSION"))),
        );
        let connector = Connector::Rustls(shared.tls.clone());
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector))
            .await
            .map_err(|e| Error::Connection(format!("connect to {url} failed: {}", error_chain(&e))))?;
        // The gateway speaks only after our Hello, so the upgrade left nothing read ahead.
        let (r, w) = tokio::io::split(ws.into_inner());
        let mut reader = WsReader::new(r, Limits::default().max_frame_bytes);
        let mut writer = WsWriter::new(w);
        writer.push(&Outgoing::Frame(encode(&Frame::Hello(hello(&shared.cfg))).into()));
        writer
            .flush()
            .await
            .map_err(|e| Error::Connection(format!("sending Hello to {url} failed: {e}")))?;
        loop {
            match reader.next().await? {
                None | Some(Message::Close(_)) => {
                    return Err(Error::Connection(format!("{url} closed the connection before Welcome")))
                }
                Some(Message::Text) => return Err(Error::Protocol("text message from gateway".into())),
                Some(Message::Pong) => {}
                Some(Message::Ping(p)) => {
                    writer.push(&Outgoing::Pong(p));
                    writer
                        .flush()
                        .await
                        .map_err(|e| Error::Connection(format!("writing to {url} failed: {e}")))?;
                }
                Some(Message::Binary(bytes)) => {
                    return match decode(&bytes, &Limits::default())? {
                        Frame::Welcome(welcome) => Ok(Established {
                            reader,
                            writer,
                            welcome,
                        }),
                        Frame::Refused(r) => Err(Error::Refused {
                            code: r.code,
                            message: r.message,
                        }),
                        other => Err(Error::Protocol(format!("expected Welcome, got {}", other.kind()))),
                    };
                }
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| Error::Connection(format!("no Welcome from {url} within {}s", HANDSHAKE_TIMEOUT.as_secs())))?
}

fn hello(cfg: &AgentConfig) -> Hello {
    let mut hello = Hello {
        agent: cfg.token.agent.clone(),
        instance_id: cfg.instance_id.clone(),
        key_id: cfg.token.key_id.clone(),
        timestamp_ms: now_ms(),
        nonce: rand::random(),
        signature: [0; 32],
        version: PROTOCOL_VERSION,
        capabilities: vec![CAP_INLINE_END.to_owned(), CAP_RAW_HTTP.to_owned()],
        services: cfg.services.iter().map(|s| s.decl()).collect(),
    };
    hello.signature = credentials::sign(&cfg.token.secret, &hello);
    hello
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Limits in force on one connection, from `Welcome`, made safe to use (no zero windows, no
/// `Data` that cannot fit in a frame).
#[derive(Debug, Clone)]
struct ConnLimits {
    decode: Limits,
    max_frame_bytes: usize,
    max_data_bytes: usize,
    window: u32,
    send_credit_cap: usize,
    max_streams: usize,
    heartbeat: Duration,
    /// The node takes a small response as one frame (`Welcome` lists [`CAP_INLINE_END`]).
    inline_end: bool,
    /// The node ends carried connections between requests when asked (`Welcome` lists
    /// [`CAP_DRAIN`]).
    drain: bool,
}

impl ConnLimits {
    fn from_welcome(w: &Welcome) -> Self {
        let max_frame_bytes = (w.limits.max_frame_bytes as usize).max(4 * DATA_FRAME_OVERHEAD);
        let max_data_bytes = (w.limits.max_data_bytes as usize).clamp(1, max_frame_bytes - DATA_FRAME_OVERHEAD);
        let window = w.limits.stream_window.max(1);
        ConnLimits {
            decode: Limits {
                max_frame_bytes: w.limits.max_frame_bytes as usize,
                max_data_bytes: w.limits.max_data_bytes as usize,
                ..Limits::default()
            },
            max_frame_bytes,
            max_data_bytes,
            window,
            send_credit_cap: (window as usize).saturating_mul(4).max(1 << 20),
            max_streams: if w.limits.max_streams == 0 {
                usize::MAX
            } else {
                w.limits.max_streams as usize
            },
            heartbeat: Duration::from_millis(u64::from(w.heartbeat_ms).clamp(100, 600_000)),
            inline_end: w.capabilities.iter().any(|c| c == CAP_INLINE_END),
            drain: w.capabilities.iter().any(|c| c == CAP_DRAIN),
        }
    }
}

struct StreamEntry {
    /// `None` once the gateway sent `Fin`.
    inbound: Option<mpsc::UnboundedSender<Inbound>>,
    /// Bytes the gateway may still send before it overruns our window.
    budget: Arc<AtomicI64>,
    credit: SendCredit,
    task: AbortHandle,
    /// A caller's HTTP connection carried as bytes: drained between requests on shutdown.
    carried: bool,
}

enum Step {
    Continue,
    GoAway(String),
    Fatal(String),
}

struct Session {
    shared: Arc<Shared>,
    limits: ConnLimits,
    out: Outbound,
    streams: HashMap<StreamId, StreamEntry>,
    tasks: JoinSet<()>,
    task_streams: HashMap<tokio::task::Id, StreamId>,
    stopping: bool,
    /// Frames for unknown or finished streams, and unexpected frame kinds; dropped, counted.
    ignored: u64,
}

/// Runs a connection until it is lost or, once draining (shutdown via `stop`, or the gateway's
/// `GoAway`, reported through `go_away`), until its streams are done. The caller dials a
/// replacement as soon as `go_away` fires; this connection keeps serving what it has.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    est: Established,
    mut stop: watch::Receiver<bool>,
    go_away: oneshot::Sender<String>,
    mut welcomed: watch::Receiver<u64>,
) -> Exit {
    let Established {
        mut reader,
        writer,
        welcome,
    } = est;
    let limits = ConnLimits::from_welcome(&welcome);
    reader.set_max_message(limits.decode.max_frame_bytes);
    let heartbeat = limits.heartbeat;
    let drain_timeout = shared.cfg.drain_timeout;
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    let out = Outbound::new(data_tx, ctrl_tx, limits.max_frame_bytes);
    let mut writer = tokio::spawn(write_loop(writer, ctrl_rx, data_rx));
    let mut sess = Session {
        shared,
        limits,
        out,
        streams: HashMap::new(),
        tasks: JoinSet::new(),
        task_streams: HashMap::new(),
        stopping: false,
        ignored: 0,
    };
    let mut go_away = Some(go_away);
    let mut deadline: Option<Instant> = None;
    // After a GoAway: how many connections had been welcomed then, and when a newer one was.
    let mut away_since: Option<u64> = None;
    let mut replaced_at: Option<Instant> = None;
    let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();

    let exit = loop {
        // Told to go away, the connection stays until its replacement is up (and has lingered),
        // so the agent is never unreachable in between; shutting down, it only drains.
        let handed_over = away_since.is_none() || replaced_at.is_some_and(|t| t.elapsed() >= HANDOVER_LINGER);
        if deadline.is_some() && sess.tasks.is_empty() && (sess.stopping || handed_over) {
            break Exit::Drained;
        }
        tokio::select! {
            msg = reader.next() => {
                let msg = match msg {
                    Ok(None) => break Exit::Lost("gateway closed the connection".into()),
                    Err(e) => break Exit::Lost(format!("connection error: {e}")),
                    Ok(Some(m)) => m,
                };
                last_rx = Instant::now();
                match msg {
                    Message::Binary(bytes) => {
                        let frame = match decode_bytes(bytes, &sess.limits.decode) {
                            Ok(f) => f,
                            Err(e) if opens_nothing(&e) => {
                                tracing::warn!("ignored an invalid stream-opening frame from gateway: {e}");
                                sess.ignored += 1;
                                continue;
                            }
                            Err(e) => break Exit::Lost(format!("protocol error: undecodable frame from gateway: {e}")),
                        };
                        match sess.on_frame(frame) {
                            Step::Continue => {}
                            Step::GoAway(reason) => {
                                tracing::info!("gateway asked this connection to go away: {reason}");
                                if let Some(tx) = go_away.take() {
                                    away_since = Some(*welcomed.borrow_and_update());
                                    let _ = tx.send(reason);
                                }
                                deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
                            }
                            Step::Fatal(why) => break Exit::Lost(why),
                        }
                    }
                    Message::Ping(p) => sess.out.pong(p),
                    Message::Pong => {}
                    Message::Text => break Exit::Lost("protocol error: text message from gateway".into()),
                    Message::Close(_) => break Exit::Lost("gateway closed the connection".into()),
                }
            }
            _ = tick.tick() => {
                let silent = last_rx.elapsed();
                if silent >= heartbeat * SILENT_HEARTBEATS {
                    break Exit::Lost(format!("nothing from gateway for {:.1}s", silent.as_secs_f64()));
                }
                let _ = sess.out.control(&Frame::Ping(Ping { timestamp_ms: now_ms() }));
            }
            Some(done) = sess.tasks.join_next_with_id(), if !sess.tasks.is_empty() => sess.task_done(done),
            _ = wait_for_stop(&mut stop), if !sess.stopping => {
                sess.stopping = true;
                sess.drain_carried();
                deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
            }
            Ok(()) = welcomed.changed(), if away_since.is_some() && replaced_at.is_none() => {
                replaced_at = Some(Instant::now());
                // Callers' carried connections still on this one move to the replacement at their
                // next request; those sitting idle would hold the retiring node's drain till then.
                sess.drain_carried();
            }
            _ = sleep_until(replaced_at.map(|t| t + HANDOVER_LINGER)), if replaced_at.is_some() && !handed_over => {}
            _ = sleep_until(deadline), if deadline.is_some() => break Exit::DrainTimeout,
            res = &mut writer => {
                break Exit::Lost(match res {
                    Ok(Err(e)) => format!("write failed: {e}"),
                    _ => "writer stopped".to_owned(),
                });
            }
        }
    };

    if sess.ignored > 0 {
        tracing::debug!(
            ignored = sess.ignored,
            "frames for unknown streams or of unexpected kinds were ignored"
        );
    }
    sess.tasks.abort_all();
    match exit {
        Exit::Drained | Exit::DrainTimeout => {
            if let Exit::DrainTimeout = exit {
                tracing::warn!(streams = sess.streams.len(), "drain timeout: cutting remaining streams");
                for (&id, _) in sess.streams.iter() {
                    sess.out.reset_now(id, ErrorCode::ShuttingDown, "agent drain timeout");
                }
            }
            let out = sess.out.clone();
            drop(sess);
            let closed = async {
                let _ = out.close().await;
                drop(out);
                let _ = (&mut writer).await;
                // Wait for the gateway's half of the closing handshake.
                while let Ok(Some(m)) = reader.next().await {
                    if let Message::Close(_) = m {
                        break;
                    }
                }
            };
            if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
                writer.abort();
            }
        }
        Exit::Lost(_) => writer.abort(),
    }
    exit
}

/// An invalid `RequestHead` / `StreamOpen` never opened a stream, so skipping it harms no other
/// stream (the gateway times that one out). Any other undecodable frame could be a lost `Data`
/// chunk of a live stream; carrying on would corrupt it silently, so the connection is dropped.
fn opens_nothing(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Invalid { field, .. }
        if field.starts_with("request_head.") || field.starts_with("stream_open.") || field.starts_with("header"))
}

async fn wait_for_stop(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop: nobody is left to run us.
    let _ = stop.wait_for(|s| *s).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The only owner of the socket's writing half. Control frames first; writes batched, then
/// flushed.
async fn write_loop(
    mut sink: WsWriter<WriteHalf<Io>>,
    mut control: mpsc::UnboundedReceiver<Outgoing>,
    mut data: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let (mut control_open, mut data_open) = (true, true);
    loop {
        let msg = tokio::select! {
            biased;
            m = control.recv(), if control_open => match m {
                Some(m) => m,
                None => { control_open = false; continue; }
            },
            m = data.recv(), if data_open => match m {
                Some(m) => m,
                None => { data_open = false; continue; }
            },
            else => return Ok(()),
        };
        let mut closing = matches!(msg, Outgoing::Close);
        sink.push(&msg);
        let mut batch = 1;
        while !closing && batch < WRITE_BATCH {
            let next = match control.try_recv() {
                Ok(m) => m,
                Err(_) => match data.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            closing = matches!(next, Outgoing::Close);
            sink.push(&next);
            batch += 1;
            if sink.buffered() >= WRITE_AT {
                sink.write_out().await?;
            }
        }
        sink.flush().await?;
        if closing {
            return Ok(());
        }
    }
}

impl Session {
    fn on_frame(&mut self, frame: Frame) -> Step {
        match frame {
            Frame::Ping(p) => {
                let _ = self.out.control(&Frame::Pong(Pong {
                    timestamp_ms: p.timestamp_ms,
                }));
            }
            Frame::Pong(_) => {}
            Frame::RequestHead(head) => {
                let (id, end) = (head.stream, head.end);
                self.open_http(head);
                if end {
                    // The head was also the gateway's `Fin`.
                    if let Some(tx) = self.streams.get_mut(&id).and_then(|e| e.inbound.take()) {
                        let _ = tx.send(Inbound::Fin);
                    }
                }
            }
            Frame::StreamOpen(open) if open.http => self.open_http_connection(open),
            Frame::StreamOpen(open) => self.open_tcp(open),
            Frame::Data(d) => {
                let Some(entry) = self.streams.get(&d.stream) else {
                    self.ignored += 1;
                    return Step::Continue;
                };
                let len = i64::try_from(d.bytes.len()).unwrap_or(i64::MAX);
                if entry.budget.fetch_sub(len, Ordering::AcqRel) < len {
                    self.cut(d.stream, ErrorCode::ProtocolError, "data beyond granted credit");
                    return Step::Continue;
                }
                match &entry.inbound {
                    Some(tx) => {
                        let _ = tx.send(Inbound::Data(d.bytes));
                    }
                    None => self.ignored += 1,
                }
            }
            Frame::Credit(c) => match self.streams.get(&c.stream) {
                Some(entry) => entry.credit.grant(c.bytes),
                None => self.ignored += 1,
            },
            Frame::Fin(f) => match self.streams.get_mut(&f.stream).and_then(|e| e.inbound.take()) {
                Some(tx) => {
                    let _ = tx.send(Inbound::Fin);
                }
                None => self.ignored += 1,
            },
            Frame::Reset(r) => match self.streams.remove(&r.stream) {
                Some(entry) => {
                    tracing::debug!(stream = %r.stream, code = %r.code, reason = %r.reason, "gateway reset stream");
                    entry.task.abort();
                }
                None => self.ignored += 1,
            },
            Frame::GoAway(g) => return Step::GoAway(g.reason),
            Frame::Refused(r) => return Step::Fatal(format!("refused by gateway: {} {}", r.code, r.message)),
            other @ (Frame::Hello(_) | Frame::Welcome(_) | Frame::ResponseHead(_) | Frame::Drain(_)) => {
                tracing::warn!(kind = other.kind(), "unexpected frame from gateway ignored");
                self.ignored += 1;
            }
        }
        Step::Continue
    }

    /// Shutting down, or replaced after a `GoAway`: asks the node to end each carried HTTP
    /// connection once its exchange in flight is answered. Its caller's next request would
    /// otherwise keep the stream, and this drain, going until the drain timeout cut whatever was
    /// in flight.
    fn drain_carried(&mut self) {
        if !self.limits.drain {
            return;
        }
        for (&stream, _) in self.streams.iter().filter(|(_, e)| e.carried && e.inbound.is_some()) {
            let _ = self.out.control(&Frame::Drain(Drain { stream }));
        }
    }

    /// Aborts a stream's work and tells the gateway why.
    fn cut(&mut self, id: StreamId, code: ErrorCode, reason: &str) {
        if let Some(entry) = self.streams.remove(&id) {
            entry.task.abort();
        }
        self.out.reset_now(id, code, reason);
    }

    /// Decides whether a new stream may open; answers `Reset` when not.
    fn admit(&mut self, id: StreamId, service: &str, kind: ServiceKind) -> Option<Upstream> {
        if self.streams.contains_key(&id) {
            self.cut(id, ErrorCode::ProtocolError, "duplicate stream id");
            return None;
        }
        if self.stopping {
            self.out
                .reset_now(id, ErrorCode::ShuttingDown, "agent is shutting down");
            return None;
        }
        if self.streams.len() >= self.limits.max_streams {
            self.out
                .reset_now(id, ErrorCode::TooManyStreams, "too many open streams on this agent");
            return None;
        }
        let label = if service.is_empty() {
            "a default service".to_owned()
        } else {
            format!("service {service:?}")
        };
        match self.shared.services.get(service) {
            None => {
                self.out.reset_now(
                    id,
                    ErrorCode::ServiceUnavailable,
                    &format!("agent does not expose {label}"),
                );
                None
            }
            Some(up) if up.kind() != kind => {
                let what = match up.kind() {
                    ServiceKind::Http => "an HTTP",
                    ServiceKind::Tcp => "a TCP",
                };
                self.out
                    .reset_now(id, ErrorCode::ServiceUnavailable, &format!("{label} is {what} service"));
                None
            }
            Some(up) => Some(up.clone()),
        }
    }

    fn open_http(&mut self, head: RequestHead) {
        let id = head.stream;
        if let Some(Upstream::Http(up)) = self.admit(id, &head.service, ServiceKind::Http) {
            self.start(id, false, move |ctx| http_fwd::exchange(ctx, head, up));
        }
    }

    fn open_http_connection(&mut self, open: StreamOpen) {
        let id = open.stream;
        if let Some(Upstream::Http(up)) = self.admit(id, &open.service, ServiceKind::Http) {
            self.start(id, true, move |ctx| http_fwd::connection(ctx, up));
        }
    }

    fn open_tcp(&mut self, open: StreamOpen) {
        let id = open.stream;
        if let Some(Upstream::Tcp(target)) = self.admit(id, &open.service, ServiceKind::Tcp) {
            self.start(id, false, move |ctx| tcp_fwd::pump(ctx, target));
        }
    }

    fn start<F, Fut>(&mut self, id: StreamId, carried: bool, run: F)
    where
        F: FnOnce(StreamCtx) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let window = self.limits.window;
        let budget = Arc::new(AtomicI64::new(i64::from(window)));
        let credit = SendCredit::new(window, self.limits.send_credit_cap);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let ctx = StreamCtx {
            tx: StreamSender {
                id,
                out: self.out.clone(),
                credit: credit.clone(),
                max_data_bytes: self.limits.max_data_bytes,
                inline_end: self.limits.inline_end,
            },
            recv_credit: RecvCredit::new(id, budget.clone(), window, self.out.clone()),
            inbound: in_rx,
        };
        // Boxed: tokio writes a task's whole stage, as large as its future, when the task ends,
        // and an exchange's future is ~3.7 KiB; that copy was ~5% of the agent's CPU on small
        // requests (docs/benchmarks.md, seventeenth round). A box is one pointer.
        let task = self.tasks.spawn(Box::pin(run(ctx)));
        self.task_streams.insert(task.id(), id);
        self.streams.insert(
            id,
            StreamEntry {
                inbound: Some(in_tx),
                budget,
                credit,
                task,
                carried,
            },
        );
    }

    fn task_done(&mut self, done: Result<(tokio::task::Id, ()), JoinError>) {
        let (task_id, panicked) = match done {
            Ok((task_id, ())) => (task_id, false),
            Err(e) => (e.id(), e.is_panic()),
        };
        let Some(stream) = self.task_streams.remove(&task_id) else {
            return;
        };
        if self.streams.get(&stream).is_some_and(|e| e.task.id() == task_id) {
            self.streams.remove(&stream);
            if panicked {
                tracing::error!(%stream, "stream task panicked");
                self.out.reset_now(stream, ErrorCode::Internal, "agent error");
            }
        }
    }
}
