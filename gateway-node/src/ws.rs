//! The agent's WebSocket on the node, on a socket of its own: [`read_upgrade`] answers the
//! HTTP upgrade, [`AgentFrames`] reads the agent's messages and [`AgentWriter`] writes the
//! frames for it, over [`strait_schema::ws`] in the server role.
//!
//! Why not actix: served by actix-http, every byte the agent sent went through its read buffer
//! in 8 KiB reads (one syscall, one dispatcher pass and one payload hand-off each) and was then
//! copied out, and every byte for the agent was copied into its write buffer. Here a frame is
//! read straight into the buffer its payload is handed on in, with reads as large as the frame,
//! and a `Data` payload goes from the caller's buffer to the socket with one `writev`
//! (docs/benchmarks.md, twentieth round). Before that, actix-ws copied each incoming payload three
//! times and unmasked it in a pass of its own (sixteenth round).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_http::ws::{hash_key, CloseReason, HandshakeError};
use actix_http::{Method, RequestHead};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use strait_schema::ws::{self, Kind, Message, Role, SocketReader};
use strait_schema::{Data, DecodeError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// What the session sends on the agent's socket, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// One encoded frame.
    Frame(Bytes),
    /// A `Data` frame, encoded on the way out so its payload is never copied into a frame.
    Data(Data),
    /// Answer a WebSocket-level ping.
    Pong(Bytes),
    /// Close the WebSocket with this reason.
    Close(CloseReason),
}

/// The largest upgrade request head accepted: an agent sends a few short headers.
pub const MAX_UPGRADE_HEAD: usize = 8 * 1024;

/// The most headers an upgrade request may carry.
const MAX_HEADERS: usize = 32;

/// The least each read of the agent's socket asks for: room for about a hundred small frames.
/// Also what an idle agent's reader holds (the idle-agent memory target).
const READ_SIZE: usize = 8 * 1024;

/// Payloads up to this size are copied next to their frame header (one `writev` slice instead
/// of two); larger ones are written from where they are.
const COPY_BELOW: usize = 4096;

/// What one `writev` is handed at most.
const WRITE_SLICES: usize = 64;

/// Bytes queued before the writer stops taking more from the session and writes them.
const WRITE_BATCH: usize = 256 * 1024;

/// A write buffer grown past this is let go once written (the idle-agent memory target).
const KEEP_WRITE_BUFFER: usize = 64 * 1024;

/// How long the writer keeps trying to hand over its last frames (the close) once the session
/// is gone.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// An upgrade request the node does not take, and the HTTP status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRefused {
    /// The HTTP status.
    pub status: u16,
    /// What the agent (and the log) is told.
    pub why: String,
}

impl UpgradeRefused {
    /// A refusal with `status` and the reason the agent is told.
    pub fn new(status: u16, why: impl Into<String>) -> Self {
        UpgradeRefused {
            status,
            why: why.into(),
        }
    }

    /// The whole HTTP response, which closes the connection.
    pub fn response(&self) -> Vec<u8> {
        let reason = match self.status {
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Bad Request",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            self.status,
            self.why.len(),
            self.why
        )
        .into_bytes()
    }
}

/// Reads the agent's upgrade request off `io` and checks it as actix-http's own handshake does
/// (`GET` of `path`, `Upgrade: websocket`, `Connection: upgrade`, version 13, a 16-byte key).
/// Returns the `101` response to send and the bytes read past the request's head.
pub async fn read_upgrade<R: AsyncRead + Unpin>(io: &mut R, path: &str) -> Result<(Vec<u8>, BytesMut), UpgradeRefused> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let response = check_upgrade(&req, path)?;
                buf.advance(len);
                return Ok((response, buf));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(UpgradeRefused::new(431, format!("more than {MAX_HEADERS} headers")))
            }
            Err(e) => return Err(UpgradeRefused::new(400, format!("malformed request: {e}"))),
        }
        if buf.len() >= MAX_UPGRADE_HEAD {
            return Err(UpgradeRefused::new(
                431,
                format!("request head over {MAX_UPGRADE_HEAD} bytes"),
            ));
        }
        let mut limited = (&mut *io).take((MAX_UPGRADE_HEAD - buf.len()) as u64);
        match limited.read_buf(&mut buf).await {
            Ok(0) => {
                return Err(UpgradeRefused::new(
                    400,
                    "connection closed before the request head ended",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(UpgradeRefused::new(400, format!("reading the request failed: {e}"))),
        }
    }
}

fn check_upgrade(req: &httparse::Request<'_, '_>, path: &str) -> Result<Vec<u8>, UpgradeRefused> {
    let target = req.path.unwrap_or_default();
    if target.split('?').next() != Some(path) {
        return Err(UpgradeRefused::new(404, format!("agents connect on {path}")));
    }
    let mut head = RequestHead::default();
    head.method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| UpgradeRefused::new(400, "malformed method"))?;
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| UpgradeRefused::new(400, format!("malformed header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| UpgradeRefused::new(400, format!("malformed value of header {name}")))?;
        map.append(name, value);
    }
    head.headers = map;
    actix_http::ws::verify_handshake(&head).map_err(|e| match e {
        HandshakeError::GetMethodRequired => UpgradeRefused::new(405, "the upgrade must be a GET"),
        e => UpgradeRefused::new(400, e.to_string()),
    })?;
    let key = head
        .headers
        .get(actix_http::header::SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes);
    let accept = hash_key(key.unwrap_or_default());
    let mut response =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: "
            .to_vec();
    response.extend_from_slice(&accept);
    response.extend_from_slice(b"\r\n\r\n");
    Ok(response)
}

/// Both halves of one agent's WebSocket once upgraded: the messages it sends, and the writer
/// of everything queued on `rx`. When the writer ends (the connection failed or was closed) the
/// messages end too; when the messages are dropped (the session is gone) the writer has
/// [`CLOSE_GRACE`] to hand over what is left.
pub fn agent_socket<R, W>(
    read: R,
    read_ahead: BytesMut,
    write: W,
    rx: mpsc::UnboundedReceiver<Outgoing>,
    max_message: usize,
) -> (AgentFrames<R>, impl Future<Output = ()>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (writer_gone, gone_rx) = oneshot::channel();
    let (reader_gone, reader_gone_rx) = oneshot::channel::<()>();
    let frames = AgentFrames {
        reader: SocketReader::new(read, Role::Server, max_message, read_ahead, READ_SIZE),
        writer_gone: gone_rx,
        _reader_gone: reader_gone,
        done: false,
    };
    let writer = AgentWriter {
        rx,
        pending: VecDeque::new(),
        small: BytesMut::new(),
        queued: 0,
        done: false,
    };
    let run = async move {
        let mut write = write;
        tokio::select! {
            r = writer.run(&mut write) => if let Err(e) = r {
                tracing::debug!(error = %e, "writing to the agent failed");
            },
            _ = async { let _ = reader_gone_rx.await; tokio::time::sleep(CLOSE_GRACE).await } => {
                tracing::debug!("the agent did not take its last frames in time");
            }
        }
        drop(writer_gone);
    };
    (frames, run)
}

/// The agent's messages, in order: ends when the connection does, and after the first
/// refusal (a frame that breaks RFC 6455 or the size limit).
pub struct AgentFrames<R> {
    reader: SocketReader<R>,
    /// Completes when the writer ends: the connection is closed or failed.
    writer_gone: oneshot::Receiver<()>,
    /// Dropped with the messages, which starts the writer's grace period.
    _reader_gone: oneshot::Sender<()>,
    done: bool,
}

impl<R: AsyncRead + Unpin> Stream for AgentFrames<R> {
    type Item = Result<Message, DecodeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done || Pin::new(&mut this.writer_gone).poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        let next = std::task::ready!(this.reader.poll_message(cx));
        match next {
            Ok(Some(m)) => Poll::Ready(Some(Ok(m))),
            Ok(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Err(e) => {
                this.done = true;
                if e.kind() == io::ErrorKind::InvalidData {
                    if let Some(d) = e.into_inner().and_then(|e| e.downcast::<DecodeError>().ok()) {
                        return Poll::Ready(Some(Err(*d)));
                    }
                } else {
                    tracing::debug!(error = %e, "agent connection failed");
                }
                Poll::Ready(None)
            }
        }
    }
}

/// Writes the frames (server side, unmasked) for each [`Outgoing`] as it is queued, ending
/// after a close frame or when every sender is gone.
struct AgentWriter {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    /// Chunks of frames still to write, in order.
    pending: VecDeque<Bytes>,
    /// Headers and small frames, copied together; split off into `pending` as they are queued.
    small: BytesMut,
    /// Bytes in `pending` and `small`.
    queued: usize,
    done: bool,
}

impl AgentWriter {
    async fn run<W: AsyncWrite + Unpin>(mut self, io: &mut W) -> io::Result<()> {
        while !self.done {
            let out = self.rx.recv().await;
            self.queue(out);
            // Everything the session queued meanwhile goes out with it, in one `writev`.
            while !self.done && self.queued < WRITE_BATCH {
                match self.rx.try_recv() {
                    Ok(out) => self.queue(Some(out)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => self.queue(None),
                }
            }
            self.seal();
            self.write_out(io).await?;
        }
        io.shutdown().await
    }

    fn queue(&mut self, out: Option<Outgoing>) {
        let small = &mut self.small;
        let before = small.len();
        let mut big = None;
        match out {
            Some(Outgoing::Frame(b)) if b.len() < COPY_BELOW => ws::put_frame(small, Kind::Binary, &b, None),
            Some(Outgoing::Frame(b)) => {
                ws::put_head(small, Kind::Binary, b.len());
                big = Some((b, &[][..]));
            }
            Some(Outgoing::Data(d)) => {
                ws::put_data_head(small, &d);
                let len = d.bytes.len();
                if len < COPY_BELOW {
                    small.extend_from_slice(&d.bytes);
                    small.extend_from_slice(ws::data_tail(len));
                } else {
                    big = Some((d.bytes, ws::data_tail(len)));
                }
            }
            Some(Outgoing::Pong(p)) => ws::put_frame(small, Kind::Pong, &p, None),
            Some(Outgoing::Close(reason)) => {
                let payload = ws::close_payload(reason.code.into(), reason.description.as_deref().unwrap_or(""));
                ws::put_frame(small, Kind::Close, &payload, None);
                self.done = true;
            }
            None => {
                ws::put_frame(small, Kind::Close, &[], None);
                self.done = true;
            }
        }
        self.queued += small.len() - before;
        if let Some((payload, tail)) = big {
            self.seal();
            self.queued += payload.len() + tail.len();
            self.pending.push_back(payload);
            self.small.extend_from_slice(tail);
        }
    }

    /// Moves the small bytes queued so far into `pending`, after everything before them.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.pending.push_back(self.small.split().freeze());
        }
    }

    async fn write_out<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let n = slices.len().min(self.pending.len());
            for (slice, chunk) in slices.iter_mut().zip(&self.pending) {
                *slice = IoSlice::new(chunk);
            }
            let mut written = io.write_vectored(&slices[..n]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let Some(front) = self.pending.front_mut() else { break };
                if front.len() <= written {
                    written -= front.len();
                    self.pending.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        self.queued = 0;
        if self.small.capacity() > KEEP_WRITE_BUFFER {
            self.small = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::{CloseCode, OpCode, Parser};
    use futures_util::StreamExt;
    use strait_schema::{decode, encode, Frame, Limits, StreamId};
    use tokio::io::duplex;

    const PATH: &str = "/v1/connect";

    /// The bytes the writer puts on the wire for `items` (then the end of its queue), and the
    /// WebSocket frames a client parses out of them.
    async fn client_sees(items: Vec<Outgoing>) -> Vec<(OpCode, Bytes)> {
        let (tx, rx) = mpsc::unbounded_channel();
        for i in items {
            tx.send(i).unwrap();
        }
        drop(tx);
        let mut wire = Vec::new();
        let (_frames, run) = agent_socket(tokio::io::empty(), BytesMut::new(), &mut wire, rx, 1024);
        run.await;
        let mut wire = BytesMut::from(&wire[..]);
        let mut frames = Vec::new();
        while let Some((fin, op, payload)) = Parser::parse(&mut wire, false, 1 << 24).unwrap() {
            assert!(fin, "every frame is final");
            frames.push((op, payload.map(BytesMut::freeze).unwrap_or_default()));
        }
        assert!(wire.is_empty(), "no bytes after the last frame");
        frames
    }

    #[tokio::test]
    async fn data_frames_of_every_header_size_decode_to_what_was_sent() {
        // Every WebSocket length form (7-bit, 16-bit, 64-bit), both sides of the copy threshold,
        // and payloads that do and do not end on a word.
        let lens = [1, 7, 8, 77, 126, 4095, 4096, 65_535, 65_536, 262_144, 300_001];
        let sent: Vec<Data> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Data {
                stream: StreamId(i as u64 + 1),
                bytes: Bytes::from((0..n).map(|b| (b % 251) as u8).collect::<Vec<u8>>()),
            })
            .collect();
        let frames = client_sees(sent.iter().cloned().map(Outgoing::Data).collect()).await;
        assert_eq!(frames.len(), sent.len() + 1, "a close frame ends the writer");
        for (d, (op, payload)) in sent.iter().zip(&frames) {
            assert_eq!(*op, OpCode::Binary);
            // Byte for byte what the codec encodes, so the agent's decoder cannot tell.
            assert_eq!(
                payload[..],
                encode(&Frame::Data(d.clone()))[..],
                "len {}",
                d.bytes.len()
            );
            let limits = Limits {
                max_frame_bytes: 1 << 24,
                max_data_bytes: 1 << 24,
                ..Limits::default()
            };
            let back = decode(payload, &limits).unwrap_or_else(|e| panic!("len {}: {e}", d.bytes.len()));
            assert_eq!(back, Frame::Data(d.clone()));
        }
        assert_eq!(frames.last().unwrap().0, OpCode::Close);
    }

    #[tokio::test]
    async fn frames_pongs_and_close_keep_their_order_and_nothing_follows_close() {
        let big = Bytes::from(vec![9u8; 70_000]);
        let frames = client_sees(vec![
            Outgoing::Frame(Bytes::from_static(b"small")),
            Outgoing::Pong(Bytes::from(vec![1u8; 300])),
            Outgoing::Frame(big.clone()),
            Outgoing::Close(CloseReason {
                code: CloseCode::Away,
                description: Some("é".repeat(100)),
            }),
            Outgoing::Frame(Bytes::from_static(b"after close")),
        ])
        .await;
        let ops: Vec<OpCode> = frames.iter().map(|f| f.0).collect();
        assert_eq!(ops, [OpCode::Binary, OpCode::Pong, OpCode::Binary, OpCode::Close]);
        assert_eq!(frames[0].1, Bytes::from_static(b"small"));
        assert_eq!(frames[1].1.len(), 125, "a pong is cut to a control frame's size");
        assert_eq!(frames[2].1, big);
        let reason = Parser::try_parse_close_payload(&frames[3].1).unwrap().unwrap();
        assert_eq!(reason.code, CloseCode::Away);
        assert!(frames[3].1.len() <= 125, "the reason is cut on a char boundary to fit");
        let text = reason.description.unwrap();
        assert!(!text.is_empty() && text.chars().all(|c| c == 'é'));
    }

    /// A socket that takes a few bytes per write: every chunk still goes out whole and in order.
    #[tokio::test]
    async fn short_writes_lose_nothing() {
        let (mut client, server) = duplex(100);
        let (tx, rx) = mpsc::unbounded_channel();
        let payloads: Vec<Bytes> = (0..20u8).map(|i| Bytes::from(vec![i; 5000 + i as usize])).collect();
        for (i, p) in payloads.iter().enumerate() {
            tx.send(Outgoing::Frame(Bytes::from(vec![i as u8; 3]))).unwrap();
            tx.send(Outgoing::Frame(p.clone())).unwrap();
        }
        drop(tx);
        let (_frames, run) = agent_socket(tokio::io::empty(), BytesMut::new(), server, rx, 1024);
        let writer = tokio::spawn(run);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        writer.await.unwrap();
        let mut wire = BytesMut::from(&wire[..]);
        for (i, p) in payloads.iter().enumerate() {
            let (_, _, small) = Parser::parse(&mut wire, false, 1 << 20).unwrap().unwrap();
            assert_eq!(small.unwrap()[..], [i as u8; 3]);
            let (_, _, big) = Parser::parse(&mut wire, false, 1 << 20).unwrap().unwrap();
            assert_eq!(big.unwrap().freeze(), *p);
        }
        let (_, op, _) = Parser::parse(&mut wire, false, 1 << 20).unwrap().unwrap();
        assert_eq!(op, OpCode::Close);
    }

    /// Masked frames read back whole however the agent's bytes arrive, starting with the bytes
    /// read past the upgrade request; the messages end when the connection does.
    #[tokio::test]
    async fn the_agents_masked_frames_read_back_across_reads() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, &[3u8; 100_000], Some([1, 2, 3, 4]));
        ws::put_frame(&mut wire, Kind::Ping, b"hi", Some([5, 6, 7, 8]));
        let ahead = wire.split_to(10);
        let (mut agent, read) = duplex(4000);
        let sender = tokio::spawn(async move {
            agent.write_all(&wire).await.unwrap();
        });
        let (_tx, rx) = mpsc::unbounded_channel();
        let (mut frames, _run) = agent_socket(read, ahead, tokio::io::sink(), rx, 1 << 20);
        assert_eq!(
            frames.next().await,
            Some(Ok(Message::Binary(Bytes::from(vec![3u8; 100_000]))))
        );
        assert_eq!(frames.next().await, Some(Ok(Message::Ping(Bytes::from_static(b"hi")))));
        sender.await.unwrap();
        assert_eq!(frames.next().await, None);
    }

    /// A frame that breaks the protocol is refused once, and nothing is read after it.
    #[tokio::test]
    async fn an_unmasked_frame_is_refused_and_ends_the_messages() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, b"not masked", None);
        ws::put_frame(&mut wire, Kind::Binary, b"masked", Some([1, 1, 1, 1]));
        let (_tx, rx) = mpsc::unbounded_channel();
        let (mut frames, _run) = agent_socket(&wire[..], BytesMut::new(), tokio::io::sink(), rx, 1 << 20);
        match frames.next().await {
            Some(Err(e)) => assert!(e.to_string().contains("unmasked"), "{e}"),
            other => panic!("got {other:?}"),
        }
        assert_eq!(frames.next().await, None);
    }

    /// An agent that hangs up mid-frame ends the messages; what came whole before it is kept.
    #[tokio::test]
    async fn a_connection_cut_mid_frame_ends_the_messages() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, b"whole", Some([1, 2, 3, 4]));
        ws::put_frame(&mut wire, Kind::Binary, &[0u8; 500], Some([1, 2, 3, 4]));
        let cut = &wire[..wire.len() - 100];
        let (_tx, rx) = mpsc::unbounded_channel();
        let (mut frames, _run) = agent_socket(cut, BytesMut::new(), tokio::io::sink(), rx, 1 << 20);
        assert_eq!(
            frames.next().await,
            Some(Ok(Message::Binary(Bytes::from_static(b"whole"))))
        );
        assert_eq!(frames.next().await, None);
    }

    /// When the writer ends (here: the session closed the socket) the messages end, even if
    /// the agent never sends another byte.
    #[tokio::test]
    async fn the_writer_ending_ends_the_messages() {
        let (_agent, read) = duplex(64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (mut frames, run) = agent_socket(read, BytesMut::new(), tokio::io::sink(), rx, 1024);
        tx.send(Outgoing::Close(CloseReason {
            code: CloseCode::Normal,
            description: None,
        }))
        .unwrap();
        tokio::spawn(run);
        let next = tokio::time::timeout(Duration::from_secs(5), frames.next()).await;
        assert_eq!(next.expect("the messages ended"), None);
    }

    /// An agent that vanished (its socket fails on write) ends the writer, and with it the
    /// messages, though no close frame was ever queued.
    #[tokio::test]
    async fn a_failed_write_ends_the_messages() {
        let (_agent, read) = duplex(64);
        let (gone, write) = duplex(64);
        drop(gone);
        let (tx, rx) = mpsc::unbounded_channel();
        let (mut frames, run) = agent_socket(read, BytesMut::new(), write, rx, 1024);
        tx.send(Outgoing::Frame(Bytes::from_static(b"to nobody"))).unwrap();
        tokio::spawn(run);
        let next = tokio::time::timeout(Duration::from_secs(5), frames.next()).await;
        assert_eq!(next.expect("the messages ended"), None);
        drop(tx);
    }

    /// A session that is gone leaves its writer a grace period, not forever, to hand its last
    /// frames to an agent that reads nothing.
    #[tokio::test(start_paused = true)]
    async fn a_writer_stuck_on_a_silent_agent_stops_after_the_grace() {
        let (_agent, socket) = duplex(64);
        let (read, write) = tokio::io::split(socket);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Outgoing::Frame(Bytes::from(vec![1u8; 10_000]))).unwrap();
        let (frames, run) = agent_socket(read, BytesMut::new(), write, rx, 1024);
        let writer = tokio::spawn(run);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!writer.is_finished(), "the writer waits while the session lives");
        drop(frames);
        let started = tokio::time::Instant::now();
        writer.await.unwrap();
        assert!(started.elapsed() >= CLOSE_GRACE, "stopped before the grace ran out");
        drop(tx);
    }

    fn request(lines: &[&str]) -> Vec<u8> {
        let mut r = lines.join("\r\n").into_bytes();
        r.extend_from_slice(b"\r\n\r\n");
        r
    }

    const SAMPLE: &[&str] = &[
        "GET /v1/connect?region=eu HTTP/1.1",
        "Host: gw",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];

    async fn upgrade(bytes: &[u8]) -> Result<(Vec<u8>, BytesMut), UpgradeRefused> {
        let mut io = bytes;
        read_upgrade(&mut io, PATH).await
    }

    /// RFC 6455's sample handshake gets its accept value; bytes past the head are kept.
    #[tokio::test]
    async fn a_valid_upgrade_is_answered_and_keeps_what_follows() {
        let mut bytes = request(SAMPLE);
        bytes.extend_from_slice(b"\x82\x80");
        let (response, ahead) = upgrade(&bytes).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        assert!(
            response.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{response}"
        );
        assert!(response.ends_with("\r\n\r\n"));
        assert_eq!(&ahead[..], b"\x82\x80");
    }

    /// Each way an upgrade request can be wrong has its own status and reason.
    #[tokio::test]
    async fn bad_upgrades_are_refused_with_a_reason() {
        let with = |i: usize, line: &'static str| {
            let mut l = SAMPLE.to_vec();
            l[i] = line;
            request(&l)
        };
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (with(0, "GET /v1/other HTTP/1.1"), 404, "/v1/connect"),
            (with(0, "POST /v1/connect HTTP/1.1"), 405, "GET"),
            (with(2, "Upgrade: h2c"), 400, "upgrade"),
            (with(3, "Connection: close"), 400, "onnection"),
            (with(4, "Sec-WebSocket-Version: 8"), 400, "version"),
            (with(5, "Sec-WebSocket-Key: short"), 400, "key"),
            (b"\x16\x03\x01\x02\x00\r\n\r\n".to_vec(), 400, "malformed"),
            (
                b"GET /v1/connect HTTP/1.1\r\nHost: gw\r\n".to_vec(),
                400,
                "closed before",
            ),
            (
                {
                    let mut r = b"GET /v1/connect HTTP/1.1\r\nX-Pad: ".to_vec();
                    r.resize(MAX_UPGRADE_HEAD + 100, b'x');
                    r
                },
                431,
                "bytes",
            ),
            (
                request(&[&["GET /v1/connect HTTP/1.1"][..], &["A: b"; 40][..]].concat()),
                431,
                "headers",
            ),
        ];
        for (bytes, status, why) in cases {
            let refused = upgrade(&bytes).await.unwrap_err();
            assert_eq!(refused.status, status, "{refused:?}");
            assert!(
                refused.why.to_lowercase().contains(&why.to_lowercase()),
                "{refused:?} lacks {why}"
            );
            let response = String::from_utf8(refused.response()).unwrap();
            assert!(response.starts_with(&format!("HTTP/1.1 {status} ")), "{response}");
            assert!(response.ends_with(&refused.why));
        }
    }
}
