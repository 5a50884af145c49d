//! The agent's WebSocket on the node, both halves, over [`strait_schema::ws`] in the server
//! role: [`AgentFrames`] reads the agent's messages out of the upgraded connection's bytes, and
//! [`AgentBody`], the upgrade response's body, writes the frames for the agent.
//!
//! Why not actix-ws: its reading half copied each payload three times (out of actix's shared
//! read buffer, into its own, out of that into the message) and unmasked it in a pass of its own
//! (12% of a gateway's CPU on downloads, docs/benchmarks.md, sixteenth round); here the bytes
//! are copied once into a buffer with room for the whole frame and unmasked as they land. Its
//! writing half drained every queued message into one fresh buffer per poll: under bulk load
//! several MiB, grown by reallocation and page-faulted in anew each time (twelfth round). This
//! body hands actix each frame as it comes instead, and a `Data` frame's payload as the very
//! `Bytes` the caller's socket filled, so the payload is copied once, into actix's write buffer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_http::ws::CloseReason;
use actix_web::dev::Payload;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use strait_schema::ws::{self, Kind, Message, Reader, Role};
use strait_schema::{Data, DecodeError};
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

/// Payloads up to this size are copied next to their frame header (one chunk is cheaper than two
/// for actix's write loop); larger ones are handed over as they are.
const COPY_BELOW: usize = 4096;

/// A read buffer emptied by a message larger than this is let go, so an agent that moved a bulk
/// transfer and went quiet holds no frame-sized allocation (the idle-agent memory target).
const KEEP_EMPTY_BUFFER: usize = 64 * 1024;

/// Both halves of one agent's WebSocket: the messages it sends, and the body that carries
/// everything queued on `rx` to it. When the body is dropped (the connection is gone) the
/// messages end too.
pub fn agent_socket(
    payload: Payload,
    rx: mpsc::UnboundedReceiver<Outgoing>,
    max_message: usize,
) -> (AgentFrames, AgentBody) {
    let (gone_tx, gone_rx) = oneshot::channel();
    let frames = AgentFrames {
        payload,
        buf: BytesMut::new(),
        reader: Reader::new(Role::Server, max_message),
        gone: gone_rx,
        done: false,
    };
    let body = AgentBody {
        rx,
        pending: VecDeque::with_capacity(3),
        done: false,
        _gone: gone_tx,
    };
    (frames, body)
}

/// The agent's messages, in order: ends when the connection does, and after the first
/// refusal (a frame that breaks RFC 6455 or the size limit).
pub struct AgentFrames {
    payload: Payload,
    buf: BytesMut,
    reader: Reader,
    /// Completes when the body is dropped: actix does not always end the payload of an upgraded
    /// connection that went away.
    gone: oneshot::Receiver<()>,
    done: bool,
}

impl Stream for AgentFrames {
    type Item = Result<Message, DecodeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.reader.next(&mut this.buf) {
                Ok(Some(m)) => {
                    let large = matches!(&m, Message::Binary(b) if b.len() > KEEP_EMPTY_BUFFER);
                    if large && this.buf.is_empty() {
                        // Its allocation is the message's: share it no longer.
                        this.buf = BytesMut::new();
                    }
                    return Poll::Ready(Some(Ok(m)));
                }
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if Pin::new(&mut this.gone).poll(cx).is_ready() {
                this.done = true;
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    // The only copy of what the agent sent, unmasked on the way: the reader
                    // reserved room for the rest of the frame in progress, so this lands where
                    // it is handed on from.
                    this.reader.fill(&mut this.buf, &chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "agent connection failed");
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The agent socket's response body: WebSocket frames (server side, unmasked) for each
/// [`Outgoing`], ending after a close frame or when every sender is gone.
pub struct AgentBody {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    /// Chunks of the current frame still to hand to actix.
    pending: VecDeque<Bytes>,
    done: bool,
    /// Dropped with this body when the connection ends, which ends [`AgentFrames`].
    _gone: oneshot::Sender<()>,
}

impl AgentBody {
    fn queue(&mut self, out: Option<Outgoing>) {
        let mut head = BytesMut::with_capacity(64);
        match out {
            Some(Outgoing::Frame(b)) if b.len() < COPY_BELOW => {
                ws::put_frame(&mut head, Kind::Binary, &b, None);
                self.pending.push_back(head.freeze());
            }
            Some(Outgoing::Frame(b)) => {
                ws::put_head(&mut head, Kind::Binary, b.len());
                self.pending.push_back(head.freeze());
                self.pending.push_back(b);
            }
            Some(Outgoing::Data(d)) => {
                ws::put_data_head(&mut head, &d);
                let len = d.bytes.len();
                if len < COPY_BELOW {
                    head.extend_from_slice(&d.bytes);
                    head.extend_from_slice(ws::data_tail(len));
                    self.pending.push_back(head.freeze());
                } else {
                    self.pending.push_back(head.freeze());
                    self.pending.push_back(d.bytes);
                    let tail = ws::data_tail(len);
                    if !tail.is_empty() {
                        self.pending.push_back(Bytes::from_static(tail));
                    }
                }
            }
            Some(Outgoing::Pong(p)) => {
                ws::put_frame(&mut head, Kind::Pong, &p, None);
                self.pending.push_back(head.freeze());
            }
            Some(Outgoing::Close(reason)) => {
                let payload = ws::close_payload(reason.code.into(), reason.description.as_deref().unwrap_or(""));
                ws::put_frame(&mut head, Kind::Close, &payload, None);
                self.pending.push_back(head.freeze());
                self.done = true;
            }
            None => {
                ws::put_frame(&mut head, Kind::Close, &[], None);
                self.pending.push_back(head.freeze());
                self.done = true;
            }
        }
    }
}

impl Stream for AgentBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let out = std::task::ready!(this.rx.poll_recv(cx));
            this.queue(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::{CloseCode, OpCode, Parser};
    use futures_util::StreamExt;
    use strait_schema::{decode, encode, Frame, Limits, StreamId};

    /// Both halves over a connection whose bytes come in `chunks` and then end (or, for
    /// `None`, never come and never end).
    fn socket(chunks: Option<Vec<Bytes>>, max_message: usize) -> (AgentFrames, AgentBody) {
        let payload: Payload = match chunks {
            Some(c) => Payload::from(
                Box::pin(futures_util::stream::iter(c.into_iter().map(Ok))) as actix_http::BoxedPayloadStream
            ),
            None => Payload::from(Box::pin(futures_util::stream::pending()) as actix_http::BoxedPayloadStream),
        };
        let (_tx, rx) = mpsc::unbounded_channel();
        agent_socket(payload, rx, max_message)
    }

    /// Everything the body yields for `items`, then the WebSocket frames a client parses out of it.
    async fn client_sees(items: Vec<Outgoing>) -> Vec<(OpCode, Bytes)> {
        let (tx, rx) = mpsc::unbounded_channel();
        for i in items {
            tx.send(i).unwrap();
        }
        drop(tx);
        let (_frames, mut body) = socket(None, 1024);
        body.rx = rx;
        let mut wire = BytesMut::new();
        while let Some(chunk) = body.next().await {
            wire.extend_from_slice(&chunk.unwrap());
        }
        let mut frames = Vec::new();
        while let Some((fin, op, payload)) = Parser::parse(&mut wire, false, 1 << 24).unwrap() {
            assert!(fin, "every frame is final");
            frames.push((op, payload.map(BytesMut::freeze).unwrap_or_default()));
        }
        assert!(wire.is_empty(), "no bytes after the last frame");
        frames
    }

    #[actix_rt::test]
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
        assert_eq!(frames.len(), sent.len() + 1, "a close frame ends the body");
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

    #[actix_rt::test]
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

    /// Masked frames read back whole however the agent's bytes were cut into chunks, and the
    /// messages end when the connection's bytes do.
    #[actix_rt::test]
    async fn the_agents_masked_frames_read_back_across_chunks() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, &[3u8; 100_000], Some([1, 2, 3, 4]));
        ws::put_frame(&mut wire, Kind::Ping, b"hi", Some([5, 6, 7, 8]));
        let chunks = wire.chunks(4000).map(Bytes::copy_from_slice).collect();
        let (mut frames, _body) = socket(Some(chunks), 1 << 20);
        assert_eq!(
            frames.next().await,
            Some(Ok(Message::Binary(Bytes::from(vec![3u8; 100_000]))))
        );
        assert_eq!(frames.next().await, Some(Ok(Message::Ping(Bytes::from_static(b"hi")))));
        assert_eq!(frames.next().await, None);
    }

    /// A frame that breaks the protocol is refused once, and nothing is read after it.
    #[actix_rt::test]
    async fn an_unmasked_frame_is_refused_and_ends_the_messages() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, b"not masked", None);
        ws::put_frame(&mut wire, Kind::Binary, b"masked", Some([1, 1, 1, 1]));
        let (mut frames, _body) = socket(Some(vec![wire.freeze()]), 1 << 20);
        match frames.next().await {
            Some(Err(e)) => assert!(e.to_string().contains("unmasked"), "{e}"),
            other => panic!("got {other:?}"),
        }
        assert_eq!(frames.next().await, None);
    }

    /// The allocation a large frame was read into is not kept by the reader once it is empty.
    #[actix_rt::test]
    async fn an_emptied_large_buffer_is_let_go() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, &[1u8; 200_000], Some([1, 2, 3, 4]));
        let (mut frames, _body) = socket(Some(vec![wire.freeze()]), 1 << 20);
        let Some(Ok(Message::Binary(b))) = frames.next().await else {
            panic!("no message")
        };
        assert_eq!(b.len(), 200_000);
        assert!(b.is_unique(), "the reader still shares the message's allocation");
    }

    /// A connection that fails mid-frame ends the messages; what came whole before it is kept.
    #[actix_rt::test]
    async fn a_failed_connection_ends_the_messages() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, b"whole", Some([1, 2, 3, 4]));
        ws::put_frame(&mut wire, Kind::Binary, &[0u8; 500], Some([1, 2, 3, 4]));
        let cut = wire.len() - 100;
        let chunks = vec![
            Ok(wire.split_to(cut).freeze()),
            Err(actix_http::error::PayloadError::Incomplete(None)),
        ];
        let payload = Payload::from(Box::pin(futures_util::stream::iter(chunks)) as actix_http::BoxedPayloadStream);
        let (_tx, rx) = mpsc::unbounded_channel();
        let (mut frames, _body) = agent_socket(payload, rx, 1 << 20);
        assert_eq!(
            frames.next().await,
            Some(Ok(Message::Binary(Bytes::from_static(b"whole"))))
        );
        assert_eq!(frames.next().await, None);
    }

    /// When the connection goes (actix drops the body) the messages end, even if actix never
    /// ends the payload.
    #[actix_rt::test]
    async fn dropping_the_body_ends_the_messages() {
        let (mut frames, body) = socket(None, 1024);
        drop(body);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), frames.next()).await;
        assert_eq!(next.expect("the messages ended"), None);
    }
}
