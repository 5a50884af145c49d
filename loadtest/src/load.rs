//! The load generators: one tokio task per connection, hyper's HTTP/1.1 client connection
//! directly (no pool, no per-request allocation beyond the request itself), latencies into
//! per-task HDR histograms merged at the end. Every loop is bounded by a deadline and a request
//! count, and every exchange by [`EXCHANGE_TIMEOUT`], so a stuck target ends a measurement
//! instead of hanging the run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use http::header::{CONNECTION, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::{TCP_ECHO, TCP_SINK, TCP_SOURCE};
use crate::body::{BenchBody, CHUNK_BYTES};
use crate::stats::{latency_histogram, record_us};
use crate::Error;

/// Longest one exchange (or one TCP step) may take before it counts as an error.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where HTTP load goes: an address and the `Host` header that routes it (for Strait,
/// `<agent>.<domain>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// `Host` header to send.
    pub host: String,
}

/// What one HTTP measurement saw.
#[derive(Debug)]
pub struct HttpRun {
    /// Successful (2xx) exchanges inside the measured window.
    pub requests: u64,
    /// Failed exchanges (connection errors, timeouts, non-2xx), whole run.
    pub errors: u64,
    /// Body bytes of the successful exchanges (received, or for uploads sent and confirmed).
    pub bytes: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Latency of each successful exchange in the window, µs.
    pub latency: Histogram<u64>,
    /// First error seen, for the report.
    pub first_error: Option<String>,
}

impl HttpRun {
    /// Successful requests per second over the window.
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Body throughput in MiB/s over the window.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(workers: Vec<Worker>, elapsed: Duration) -> Self {
        let mut run = HttpRun {
            requests: 0,
            errors: 0,
            bytes: 0,
            elapsed,
            latency: latency_histogram(),
            first_error: None,
        };
        for w in workers {
            run.requests += w.requests;
            run.errors += w.errors;
            run.bytes += w.bytes;
            let _ = run.latency.add(&w.latency);
            if run.first_error.is_none() {
                run.first_error = w.first_error;
            }
        }
        run
    }
}

/// When a measurement starts counting and when it stops sending.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Samples before this are warm-up and not recorded.
    pub measure_from: Instant,
    /// No new exchange starts at or after this.
    pub end: Instant,
}

impl Window {
    /// A window starting now: `warmup`, then `measure`.
    pub fn new(warmup: Duration, measure: Duration) -> Self {
        let measure_from = Instant::now() + warmup;
        Window {
            measure_from,
            end: measure_from + measure,
        }
    }
}

struct Worker {
    requests: u64,
    errors: u64,
    bytes: u64,
    latency: Histogram<u64>,
    first_error: Option<String>,
}

impl Worker {
    fn new() -> Self {
        Worker {
            requests: 0,
            errors: 0,
            bytes: 0,
            latency: latency_histogram(),
            first_error: None,
        }
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// Shared budget of exchanges, so a run is bounded in count as well as time.
#[derive(Clone)]
struct Budget(Arc<AtomicU64>);

impl Budget {
    fn new(max: u64) -> Self {
        Budget(Arc::new(AtomicU64::new(max)))
    }
    /// Takes one exchange from the budget; false when it is spent.
    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Opens one HTTP/1.1 client connection (TCP_NODELAY, its driver on its own task).
pub async fn connect_http(addr: SocketAddr) -> Result<SendRequest<BenchBody>, Error> {
    let sock = TcpStream::connect(addr)
        .await
        .map_err(Error::io(format!("connect {addr}")))?;
    let _ = sock.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn request(
    t: &HttpTarget,
    method: Method,
    path: &str,
    body: BenchBody,
    close: bool,
) -> Result<Request<BenchBody>, Error> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, t.host.as_str());
    if close {
        b = b.header(CONNECTION, "close");
    }
    b.body(body).map_err(|e| Error::Http(e.to_string()))
}

/// Sends one request and reads the whole response body; returns the status, the body length
/// and (when `keep` is set) the body itself.
async fn exchange(
    send: &mut SendRequest<BenchBody>,
    req: Request<BenchBody>,
    keep: bool,
) -> Result<(StatusCode, u64, Option<Bytes>), Error> {
    let fut = async {
        send.ready().await.map_err(|e| Error::Http(e.to_string()))?;
        let res = send.send_request(req).await.map_err(|e| Error::Http(e.to_string()))?;
        let status = res.status();
        let mut body = res.into_body();
        let mut n = 0u64;
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::Http(format!("response body: {e}")))?;
            if let Some(d) = frame.data_ref() {
                n += d.len() as u64;
                if keep {
                    kept.extend_from_slice(d);
                }
            }
        }
        Ok((status, n, keep.then(|| Bytes::from(kept))))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Timeout(format!("no complete response within {}s", EXCHANGE_TIMEOUT.as_secs())))?
}

/// When the requests of [`http_keepalive`] go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Each connection sends its next request as soon as the last answer is in: a closed loop,
    /// whose latency is tied to its throughput (mean latency = connections / req/s).
    BackToBack,
    /// This many requests per second between the connections, each on its own schedule (one
    /// every `conns / rate` s, the schedules spread over one interval), whatever the answers
    /// take: latencies compared at the same load.
    Rate(f64),
}

/// `conns` keep-alive connections sending `GET path` inside `window`, paced by `pace`.
/// Reconnects after a connection error.
///
/// A paced request held back by a slow answer before it counts from when its schedule said to
/// send it, so it is charged for the wait (no coordinated omission); one sent on time counts from
/// when it went, so the timer's lateness (tokio's runs in whole milliseconds) is not.
pub async fn http_keepalive(
    t: &HttpTarget,
    path: &str,
    conns: usize,
    pace: Pace,
    window: Window,
    max_requests: u64,
) -> HttpRun {
    let budget = Budget::new(max_requests);
    let conns = conns.max(1);
    let start = Instant::now();
    let interval = match pace {
        Pace::BackToBack => None,
        Pace::Rate(rate) => Some(Duration::from_secs_f64(conns as f64 / rate.max(1e-3))),
    };
    let tasks = (0..conns).map(|i| {
        let (t, path, budget) = (t.clone(), path.to_owned(), budget.clone());
        // When this connection's next request is due, and how far apart its requests are.
        let mut schedule = interval.map(|every| (start + every.mul_f64(i as f64 / conns as f64), every));
        tokio::spawn(async move {
            let mut w = Worker::new();
            let next = |schedule: Option<(Instant, Duration)>| schedule.map_or_else(Instant::now, |(due, _)| due);
            'conn: while next(schedule) < window.end {
                let mut send = match connect_http(t.addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        w.error(e);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                while next(schedule) < window.end && budget.take() {
                    let scheduled = next(schedule);
                    let mut t0 = scheduled;
                    if let Some((due, every)) = schedule.as_mut() {
                        *due += *every;
                        // Late because of an answer: counted from the schedule.
                        if Instant::now() < scheduled {
                            tokio::time::sleep_until(scheduled).await;
                            t0 = Instant::now();
                        }
                    }
                    let req = match request(&t, Method::GET, &path, BenchBody::Empty, false) {
                        Ok(r) => r,
                        Err(e) => {
                            w.error(e);
                            break 'conn;
                        }
                    };
                    match exchange(&mut send, req, false).await {
                        Ok((s, n, _)) if s.is_success() => {
                            if scheduled >= window.measure_from {
                                w.requests += 1;
                                w.bytes += n;
                                record_us(&mut w.latency, t0.elapsed().as_micros() as u64);
                            }
                        }
                        Ok((s, _, _)) => w.error(format!("status {s}")),
                        Err(e) => {
                            w.error(e);
                            continue 'conn;
                        }
                    }
                }
                break;
            }
            w
        })
    });
    let workers = join_workers(tasks.collect()).await;
    HttpRun::merge(workers, window.end.saturating_duration_since(window.measure_from))
}

/// `conns` tasks, each opening a new connection per request (`Connection: close`): measures
/// connection set-up as much as the exchange. Latency includes the TCP connect.
pub async fn http_new_conn(t: &HttpTarget, path: &str, conns: usize, window: Window, max_requests: u64) -> HttpRun {
    let budget = Budget::new(max_requests);
    let tasks = (0..conns.max(1)).map(|_| {
        let (t, path, budget) = (t.clone(), path.to_owned(), budget.clone());
        tokio::spawn(async move {
            let mut w = Worker::new();
            while Instant::now() < window.end && budget.take() {
                let t0 = Instant::now();
                let one = async {
                    let mut send = connect_http(t.addr).await?;
                    let req = request(&t, Method::GET, &path, BenchBody::Empty, true)?;
                    exchange(&mut send, req, false).await
                };
                match one.await {
                    Ok((s, n, _)) if s.is_success() => {
                        if t0 >= window.measure_from {
                            w.requests += 1;
                            w.bytes += n;
                            record_us(&mut w.latency, t0.elapsed().as_micros() as u64);
                        }
                    }
                    Ok((s, _, _)) => w.error(format!("status {s}")),
                    Err(e) => {
                        w.error(e);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            w
        })
    });
    let workers = join_workers(tasks.collect()).await;
    HttpRun::merge(workers, window.end.saturating_duration_since(window.measure_from))
}

/// Which way a bulk transfer goes, seen from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The target sends (HTTP response bodies, TCP source).
    Down,
    /// The caller sends (HTTP request bodies, TCP sink).
    Up,
}

/// `conns` keep-alive connections each moving `size`-byte bodies (down: `GET /bytes/size`, up:
/// `POST /upload`) back to back until `duration` has passed (at least one each). Only whole
/// transfers count, and the window ends when the last one completes, so the rate is exact.
pub async fn http_bulk(
    t: &HttpTarget,
    dir: Direction,
    size: u64,
    conns: usize,
    duration: Duration,
    max_requests: u64,
) -> HttpRun {
    let start = Instant::now();
    let end = start + duration;
    let budget = Budget::new(max_requests.max(conns as u64));
    let tasks = (0..conns.max(1)).map(|_| {
        let (t, budget) = (t.clone(), budget.clone());
        tokio::spawn(async move {
            let mut w = Worker::new();
            let mut send = match connect_http(t.addr).await {
                Ok(s) => s,
                Err(e) => {
                    w.error(e);
                    return w;
                }
            };
            let mut first = true;
            while (first || Instant::now() < end) && budget.take() {
                first = false;
                let t0 = Instant::now();
                let req = match dir {
                    Direction::Down => request(&t, Method::GET, &format!("/bytes/{size}"), BenchBody::Empty, false),
                    Direction::Up => request(&t, Method::POST, "/upload", BenchBody::repeat(size), false),
                };
                let req = match req {
                    Ok(r) => r,
                    Err(e) => {
                        w.error(e);
                        break;
                    }
                };
                match exchange(&mut send, req, dir == Direction::Up).await {
                    Ok((s, n, body)) if s.is_success() => {
                        let moved = match dir {
                            Direction::Down => n,
                            Direction::Up => body
                                .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.trim().parse().ok()))
                                .unwrap_or(0),
                        };
                        if moved != size {
                            w.error(format!("moved {moved} of {size} bytes"));
                            continue;
                        }
                        w.requests += 1;
                        w.bytes += moved;
                        record_us(&mut w.latency, t0.elapsed().as_micros() as u64);
                    }
                    Ok((s, _, _)) => w.error(format!("status {s}")),
                    Err(e) => {
                        w.error(e);
                        match connect_http(t.addr).await {
                            Ok(s) => send = s,
                            Err(_) => break,
                        }
                    }
                }
            }
            w
        })
    });
    let workers = join_workers(tasks.collect()).await;
    HttpRun::merge(workers, start.elapsed())
}

async fn join_workers(tasks: Vec<tokio::task::JoinHandle<Worker>>) -> Vec<Worker> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(w) => out.push(w),
            Err(e) => {
                let mut w = Worker::new();
                w.error(format!("worker task failed: {e}"));
                out.push(w);
            }
        }
    }
    out
}

/// What one TCP bulk measurement saw.
#[derive(Debug)]
pub struct TcpRun {
    /// Bytes that crossed end to end (read by us, or confirmed by the sink).
    pub bytes: u64,
    /// From the first connect to the last byte.
    pub elapsed: Duration,
    /// Streams that failed.
    pub errors: u64,
    /// First error seen, for the report.
    pub first_error: Option<String>,
}

impl TcpRun {
    /// Throughput in MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `streams` parallel TCP streams moving bytes one way for `duration`. Down: the backend sources
/// bytes and we count what we read until the deadline. Up: we write until the deadline, shut
/// down our side, and the sink's confirmed count (which arrives once everything in flight has
/// drained) is what counts, timed to its arrival.
pub async fn tcp_bulk(addr: SocketAddr, dir: Direction, streams: usize, duration: Duration) -> TcpRun {
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = (0..streams.max(1))
        .map(|_| tokio::spawn(tcp_one(addr, dir, end)))
        .collect();
    let mut run = TcpRun {
        bytes: 0,
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    let mut last = start;
    for t in tasks {
        let r = t.await.map_err(|e| Error::Spawn(format!("stream task failed: {e}")));
        match r.and_then(|r| r) {
            Ok((n, done)) => {
                run.bytes += n;
                last = last.max(done);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    run.elapsed = last.saturating_duration_since(start);
    run
}

async fn tcp_one(addr: SocketAddr, dir: Direction, end: Instant) -> Result<(u64, Instant), Error> {
    let mut sock = TcpStream::connect(addr)
        .await
        .map_err(Error::io(format!("connect {addr}")))?;
    let _ = sock.set_nodelay(true);
    let mut buf = vec![0u8; CHUNK_BYTES];
    match dir {
        Direction::Down => {
            let mut hello = vec![TCP_SOURCE];
            hello.extend_from_slice(&u64::MAX.to_be_bytes());
            sock.write_all(&hello).await.map_err(Error::io("write"))?;
            let mut total = 0u64;
            loop {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, sock.read(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(0)) => return Err(Error::Spawn(format!("{addr} closed the stream early"))),
                    Ok(Ok(n)) => total += n as u64,
                    Ok(Err(e)) => return Err(Error::io("read")(e)),
                }
            }
            Ok((total, Instant::now()))
        }
        Direction::Up => {
            sock.write_all(&[TCP_SINK]).await.map_err(Error::io("write"))?;
            while Instant::now() < end {
                let left = end.saturating_duration_since(Instant::now()) + EXCHANGE_TIMEOUT;
                tokio::time::timeout(left, sock.write_all(&buf))
                    .await
                    .map_err(|_| Error::Timeout("write stalled".into()))?
                    .map_err(Error::io("write"))?;
            }
            sock.shutdown().await.map_err(Error::io("shutdown"))?;
            let n = tokio::time::timeout(EXCHANGE_TIMEOUT, sock.read_u64())
                .await
                .map_err(|_| Error::Timeout("sink count did not arrive".into()))?
                .map_err(Error::io("read sink count"))?;
            Ok((n, Instant::now()))
        }
    }
}

/// Opens one echo stream and proves it end to end (4 bytes there and back). The stream stays
/// open for as long as the caller holds it.
pub async fn open_echo(addr: SocketAddr) -> Result<TcpStream, Error> {
    let fut = async {
        let mut sock = TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect {addr}")))?;
        let _ = sock.set_nodelay(true);
        sock.write_all(&[TCP_ECHO, b'p', b'i', b'n', b'g'])
            .await
            .map_err(Error::io("write"))?;
        let mut back = [0u8; 4];
        sock.read_exact(&mut back).await.map_err(Error::io("read echo"))?;
        if &back != b"ping" {
            return Err(Error::Spawn("echo answered other bytes".into()));
        }
        Ok(sock)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Timeout(format!("echo stream through {addr}")))?
}

/// Opens `n` echo streams, `concurrency` at a time; returns the ones that opened and the
/// errors of the ones that did not.
pub async fn open_echo_streams(addr: SocketAddr, n: usize, concurrency: usize) -> (Vec<TcpStream>, Vec<Error>) {
    let results: Vec<Result<TcpStream, Error>> = stream::iter(0..n)
        .map(|_| open_echo(addr))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut ok = Vec::with_capacity(n);
    let mut errs = Vec::new();
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errs.push(e),
        }
    }
    (ok, errs)
}

/// Retries `GET /small` until it answers 2xx or `deadline` passes; used to know a target is up.
pub async fn wait_http(t: &HttpTarget, deadline: Duration) -> Result<(), Error> {
    let until = Instant::now() + deadline;
    let mut last = String::from("never tried");
    while Instant::now() < until {
        let attempt = async {
            let mut send = connect_http(t.addr).await?;
            let req = request(t, Method::GET, "/small", BenchBody::Empty, false)?;
            exchange(&mut send, req, false).await
        };
        match attempt.await {
            Ok((s, _, _)) if s.is_success() => return Ok(()),
            Ok((s, _, _)) => last = format!("status {s}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::Timeout(format!(
        "{} (Host {}) not answering: {last}",
        t.addr, t.host
    )))
}

/// Retries an echo round trip until it works or `deadline` passes.
pub async fn wait_tcp(addr: SocketAddr, deadline: Duration) -> Result<(), Error> {
    let until = Instant::now() + deadline;
    let mut last = String::from("never tried");
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(2), open_echo(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "echo timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::Timeout(format!("TCP echo through {addr}: {last}")))
}
