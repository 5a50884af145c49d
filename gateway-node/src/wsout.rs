//! The sending half of an agent's WebSocket, written as the upgrade response's body.
//!
//! actix-ws's own body drains every queued message into one fresh buffer per poll: under bulk
//! load that is several MiB, grown by reallocation and page-faulted in anew each time (45% of a
//! gateway's time in eight parallel uploads, docs/benchmarks.md). This body hands actix each
//! frame as it comes instead, and a `Data` frame's payload as the very `Bytes` the caller's
//! socket filled, so the payload is copied once, into actix's write buffer, and nowhere else.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_http::ws::{CloseReason, OpCode, Parser};
use actix_web::body::BoxBody;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use strait_schema::{data_head, data_padding, Data, DATA_HEAD_LEN};
use tokio::sync::mpsc;

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

/// Zero bytes a `Data` frame may end with (a payload is padded to a whole word).
static PADDING: [u8; 8] = [0; 8];

/// The agent socket's response body: WebSocket frames (server side, unmasked) for each
/// [`Outgoing`], ending after a close frame or when every sender is gone.
pub struct AgentBody {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    /// Chunks of the current frame still to hand to actix.
    pending: VecDeque<Bytes>,
    done: bool,
    /// actix-ws's own body, never polled: dropping it, with this body when the connection ends, is
    /// what tells actix-ws's reading half (`MessageStream`) that the connection is gone.
    _closed_signal: BoxBody,
}

impl AgentBody {
    /// A body for the frames queued on `rx`, taking over from actix-ws's `replaced` body.
    pub fn new(rx: mpsc::UnboundedReceiver<Outgoing>, replaced: BoxBody) -> Self {
        AgentBody {
            rx,
            pending: VecDeque::with_capacity(3),
            done: false,
            _closed_signal: replaced,
        }
    }

    fn queue(&mut self, out: Option<Outgoing>) {
        let mut head = BytesMut::with_capacity(64);
        match out {
            Some(Outgoing::Frame(b)) => self.frame(head, OpCode::Binary, b),
            Some(Outgoing::Data(d)) => {
                let len = d.bytes.len();
                let pad = data_padding(len);
                put_header(&mut head, OpCode::Binary, DATA_HEAD_LEN + len + pad);
                head.extend_from_slice(&data_head(d.stream, len));
                if len < COPY_BELOW {
                    head.extend_from_slice(&d.bytes);
                    head.extend_from_slice(&PADDING[..pad]);
                    self.pending.push_back(head.freeze());
                } else {
                    self.pending.push_back(head.freeze());
                    self.pending.push_back(d.bytes);
                    if pad > 0 {
                        self.pending.push_back(Bytes::from_static(&PADDING[..pad]));
                    }
                }
            }
            Some(Outgoing::Pong(mut p)) => {
                // A control frame carries at most 125 bytes.
                p.truncate(125);
                self.frame(head, OpCode::Pong, p);
            }
            Some(Outgoing::Close(mut reason)) => {
                if let Some(d) = reason.description.as_mut() {
                    // Two bytes of code plus the reason fit a control frame.
                    let mut end = d.len().min(123);
                    while !d.is_char_boundary(end) {
                        end -= 1;
                    }
                    d.truncate(end);
                }
                Parser::write_close(&mut head, Some(reason), false);
                self.pending.push_back(head.freeze());
                self.done = true;
            }
            None => {
                Parser::write_close(&mut head, None, false);
                self.pending.push_back(head.freeze());
                self.done = true;
            }
        }
    }

    fn frame(&mut self, mut head: BytesMut, op: OpCode, payload: Bytes) {
        if payload.len() < COPY_BELOW {
            Parser::write_message(&mut head, &payload, op, true, false);
            self.pending.push_back(head.freeze());
        } else {
            put_header(&mut head, op, payload.len());
            self.pending.push_back(head.freeze());
            self.pending.push_back(payload);
        }
    }
}

/// A final, unmasked frame header for a `len`-byte payload (RFC 6455 section 5.2).
fn put_header(dst: &mut BytesMut, op: OpCode, len: usize) {
    dst.extend_from_slice(&[0x80 | u8::from(op)]);
    match len {
        0..=125 => dst.extend_from_slice(&[len as u8]),
        126..=0xFFFF => {
            dst.extend_from_slice(&[126]);
            dst.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            dst.extend_from_slice(&[127]);
            dst.extend_from_slice(&(len as u64).to_be_bytes());
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
    use actix_http::ws::CloseCode;
    use futures_util::StreamExt;
    use strait_schema::{decode, encode, Frame, Limits, StreamId};

    /// Everything the body yields for `items`, then the WebSocket frames a client parses out of it.
    async fn client_sees(items: Vec<Outgoing>) -> Vec<(OpCode, Bytes)> {
        let (tx, rx) = mpsc::unbounded_channel();
        for i in items {
            tx.send(i).unwrap();
        }
        drop(tx);
        let mut body = AgentBody::new(rx, BoxBody::new(()));
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
}
