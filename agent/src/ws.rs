//! The agent's end of the WebSocket once the HTTP upgrade is done: RFC 6455 framing in the client
//! role. tokio-tungstenite still dials and upgrades; after that its stream is taken apart
//! (the gateway says nothing before our `Hello`, so nothing it read ahead is lost) and frames
//! are read and written here, with tungstenite's own [`FrameHeader`] parsing and formatting
//! each header.
//!
//! Why not tungstenite's stream: it copied every outgoing payload three times (our encode, its
//! copy into the write buffer, its masking pass) and every incoming one once more out of its read
//! buffer. Here a `Data` payload is masked on its one way into the write buffer, and an incoming
//! frame is read straight into the buffer it is handed on in (docs/benchmarks.md, fifteenth
//! round).

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use strait_schema::{data_head, data_padding, Data, DATA_HEAD_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data as DataOp, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

use crate::Error;

/// What a read asks the socket for at least, when no larger frame is pending.
const READ_CHUNK: usize = 32 * 1024;

/// A control frame's payload limit (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bytes masked per pass: copied, then masked while still in the L1 cache.
const MASK_CHUNK: usize = 16 * 1024;

/// Zero bytes a `Data` frame may end with (a payload is padded to a whole word).
static PADDING: [u8; 8] = [0; 8];

/// A message from the gateway.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A whole binary message (fragments joined).
    Binary(Bytes),
    /// A text message: the protocol has none, so the caller treats it as an error.
    Text,
    /// A WebSocket ping; answer with [`Outgoing::Pong`] of the same payload.
    Ping(Bytes),
    /// The gateway's close frame.
    Close,
}

/// Reads frames from the gateway. Cancel-safe: everything read is kept in `self`, so a `next`
/// dropped by a `select!` loses nothing.
pub(crate) struct WsReader<R> {
    io: R,
    buf: BytesMut,
    max_message: usize,
    /// A fragmented message so far: whether it is binary, and its bytes.
    partial: Option<(bool, BytesMut)>,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// Refuses messages over `max_message` bytes.
    pub(crate) fn new(io: R, max_message: usize) -> Self {
        WsReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_message,
            partial: None,
        }
    }

    /// The limit once the gateway has announced its own.
    pub(crate) fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message;
    }

    /// The next message, `None` when the gateway closed the TCP connection between frames.
    /// WebSocket pongs are skipped.
    pub(crate) async fn next(&mut self) -> Result<Option<Incoming>, Error> {
        loop {
            if let Some(m) = self.parse()? {
                return Ok(Some(m));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 8 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| Error::Connection(format!("reading from the gateway failed: {e}")))?;
            if n == 0 {
                return if self.buf.is_empty() && self.partial.is_none() {
                    Ok(None)
                } else {
                    Err(Error::Connection("the gateway closed the connection mid-frame".into()))
                };
            }
        }
    }

    /// Takes one whole message out of the buffer if it holds one. When it holds only part of a
    /// frame, makes room for the whole frame so the rest is read straight in after it.
    fn parse(&mut self) -> Result<Option<Incoming>, Error> {
        loop {
            let mut cur = Cursor::new(&self.buf[..]);
            let (head, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(e) => return Err(protocol(format!("bad WebSocket frame header: {e}"))),
            };
            let head_len = cur.position() as usize;
            if head.rsv1 || head.rsv2 || head.rsv3 {
                return Err(protocol("WebSocket frame with reserved bits set".into()));
            }
            if head.mask.is_some() {
                return Err(protocol("masked WebSocket frame from the gateway".into()));
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len());
            let len = match usize::try_from(len) {
                Ok(n) if n.saturating_add(so_far) <= self.max_message => n,
                _ => {
                    return Err(protocol(format!(
                        "WebSocket message of {} bytes exceeds the {}-byte limit",
                        len.saturating_add(so_far as u64),
                        self.max_message
                    )))
                }
            };
            let whole = head_len + len;
            if self.buf.len() < whole {
                self.buf.reserve(whole - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(head_len);
            let payload = self.buf.split_to(len);
            if let Some(m) = self.on_frame(head, payload)? {
                return Ok(Some(m));
            }
        }
    }

    fn on_frame(&mut self, head: FrameHeader, payload: BytesMut) -> Result<Option<Incoming>, Error> {
        match head.opcode {
            OpCode::Control(c) => {
                if !head.is_final || payload.len() > MAX_CONTROL_PAYLOAD {
                    return Err(protocol("fragmented or oversized WebSocket control frame".into()));
                }
                Ok(match c {
                    Control::Ping => Some(Incoming::Ping(payload.freeze())),
                    Control::Close => Some(Incoming::Close),
                    // Pongs answer pings we never send; reserved opcodes fail header parsing.
                    _ => None,
                })
            }
            OpCode::Data(DataOp::Continue) => {
                let Some((binary, mut so_far)) = self.partial.take() else {
                    return Err(protocol("WebSocket continuation frame without a message".into()));
                };
                so_far.extend_from_slice(&payload);
                if head.is_final {
                    return Ok(Some(message(binary, so_far)));
                }
                self.partial = Some((binary, so_far));
                Ok(None)
            }
            OpCode::Data(d) => {
                if self.partial.is_some() {
                    return Err(protocol("new WebSocket message inside a fragmented one".into()));
                }
                let binary = matches!(d, DataOp::Binary);
                if head.is_final {
                    return Ok(Some(message(binary, payload)));
                }
                self.partial = Some((binary, payload));
                Ok(None)
            }
        }
    }
}

fn message(binary: bool, bytes: BytesMut) -> Incoming {
    if binary {
        Incoming::Binary(bytes.freeze())
    } else {
        Incoming::Text
    }
}

fn protocol(why: String) -> Error {
    Error::Protocol(why)
}

/// What the agent sends to the gateway, in order.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// One encoded frame.
    Frame(Bytes),
    /// A `Data` frame, encoded as it is masked into the write buffer.
    Data(Data),
    /// Answers a WebSocket ping.
    Pong(Bytes),
    /// Starts the closing handshake.
    Close,
}

impl Outgoing {
    /// Bytes of the WebSocket payload (the encoded frame).
    pub(crate) fn len(&self) -> usize {
        match self {
            Outgoing::Frame(b) | Outgoing::Pong(b) => b.len(),
            Outgoing::Data(d) => DATA_HEAD_LEN + d.bytes.len() + data_padding(d.bytes.len()),
            Outgoing::Close => 0,
        }
    }
}

/// Writes masked frames to the gateway through one buffer that is reused.
pub(crate) struct WsWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub(crate) fn new(io: W) -> Self {
        WsWriter {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Bytes buffered and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Frames `msg` into the buffer, masked with a fresh random key.
    pub(crate) fn push(&mut self, msg: &Outgoing) {
        let opcode = match msg {
            Outgoing::Frame(_) | Outgoing::Data(_) => OpCode::Data(DataOp::Binary),
            Outgoing::Pong(_) => OpCode::Control(Control::Pong),
            Outgoing::Close => OpCode::Control(Control::Close),
        };
        let mut len = msg.len();
        if let Outgoing::Pong(_) = msg {
            len = len.min(MAX_CONTROL_PAYLOAD);
        }
        let key: [u8; 4] = rand::random();
        let head = FrameHeader {
            opcode,
            mask: Some(key),
            ..FrameHeader::default()
        };
        // Writing into a `BytesMut` cannot fail.
        let _ = head.format(len as u64, &mut (&mut self.buf).writer());
        let mut at = 0;
        match msg {
            Outgoing::Frame(b) => put_masked(&mut self.buf, b, key, &mut at),
            Outgoing::Pong(b) => put_masked(&mut self.buf, &b[..len], key, &mut at),
            Outgoing::Data(d) => {
                let n = d.bytes.len();
                put_masked(&mut self.buf, &data_head(d.stream, n), key, &mut at);
                put_masked(&mut self.buf, &d.bytes, key, &mut at);
                put_masked(&mut self.buf, &PADDING[..data_padding(n)], key, &mut at);
            }
            Outgoing::Close => {}
        }
    }

    /// Writes out what is buffered, without flushing the stream (TLS keeps its record open).
    pub(crate) async fn write_out(&mut self) -> std::io::Result<()> {
        self.io.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Writes out what is buffered and flushes the stream.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.write_out().await?;
        self.io.flush().await
    }
}

/// Appends `src` masked with `key`, `at` bytes into the frame's payload.
fn put_masked(buf: &mut BytesMut, src: &[u8], key: [u8; 4], at: &mut usize) {
    for piece in src.chunks(MASK_CHUNK) {
        let start = buf.len();
        buf.extend_from_slice(piece);
        apply_mask(&mut buf[start..], key, *at);
        *at += piece.len();
    }
}

/// XORs `bytes` with the mask, as the bytes `offset` onwards of a payload.
fn apply_mask(bytes: &mut [u8], key: [u8; 4], offset: usize) {
    let k: [u8; 4] = std::array::from_fn(|i| key[(offset + i) % 4]);
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let (words, rest) = bytes.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ word).to_ne_bytes();
    }
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_schema::{decode_bytes, encode, Frame, Limits, StreamId};
    use tokio::io::duplex;

    /// Unmasks a client frame the way a server does; returns the opcode byte and the payload.
    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let mut cur = Cursor::new(frame);
        let (head, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        let start = cur.position() as usize;
        let mut payload = frame[start..start + len as usize].to_vec();
        let key = head.mask.expect("client frames are masked");
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
        (frame[0], payload)
    }

    #[test]
    fn masking_matches_bytewise_at_every_offset() {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let key = [0x11, 0x22, 0x44, 0x88];
        for offset in 0..8 {
            let mut fast = src.clone();
            apply_mask(&mut fast, key, offset);
            let slow: Vec<u8> = src.iter().enumerate().map(|(i, b)| b ^ key[(offset + i) % 4]).collect();
            assert_eq!(fast, slow, "offset {offset}");
        }
    }

    #[test]
    fn a_data_frame_unmasks_to_the_encoding_the_gateway_decodes() {
        // Sizes around the header, the padding and the mask chunk (an empty `Data` is invalid).
        for n in [1usize, 7, 8, 9, MASK_CHUNK - 1, MASK_CHUNK + 5, 200_003] {
            let bytes = Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let data = Data {
                stream: StreamId(42),
                bytes: bytes.clone(),
            };
            let mut w = WsWriter::new(Vec::new());
            w.push(&Outgoing::Data(data.clone()));
            let (op, payload) = unmask(&w.buf);
            assert_eq!(op, 0x82, "final binary frame");
            assert_eq!(payload, encode(&Frame::Data(data)), "{n} bytes");
            match decode_bytes(Bytes::from(payload), &Limits::default()) {
                Ok(Frame::Data(d)) if d.bytes == bytes => {}
                other => panic!("{n} bytes decoded to {other:?}"),
            }
        }
    }

    #[test]
    fn pongs_and_closes_are_masked_control_frames() {
        let mut w = WsWriter::new(Vec::new());
        w.push(&Outgoing::Pong(Bytes::from(vec![5u8; 200])));
        let (op, payload) = unmask(&w.buf);
        assert_eq!(
            (op, payload.len()),
            (0x8A, MAX_CONTROL_PAYLOAD),
            "pong cut to 125 bytes"
        );
        let mut w = WsWriter::new(Vec::new());
        w.push(&Outgoing::Close);
        assert_eq!(unmask(&w.buf), (0x88, Vec::new()));
    }

    /// An unmasked server frame.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= u16::MAX as usize => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    async fn read_all(wire: Vec<u8>, max: usize) -> Vec<Result<Option<Incoming>, String>> {
        let (mut tx, rx) = duplex(1024);
        // Written in small pieces, so frames arrive split at every kind of boundary.
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(333) {
                if tx.write_all(piece).await.is_err() {
                    return; // the reader gave up on an error
                }
            }
        });
        let mut r = WsReader::new(rx, max);
        let mut out = Vec::new();
        loop {
            let m = r.next().await.map_err(|e| e.to_string());
            let end = !matches!(m, Ok(Some(_)));
            out.push(m);
            if end {
                break;
            }
        }
        drop(r);
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn reads_messages_split_anywhere_and_joins_fragments() {
        let big = vec![9u8; 200_000];
        let mut wire = server_frame(0x82, b"one");
        wire.extend(server_frame(0x89, b"ping"));
        wire.extend(server_frame(0x8A, b"pong, skipped"));
        wire.extend(server_frame(0x82, &big));
        wire.extend(server_frame(0x02, b"fra"));
        wire.extend(server_frame(0x89, b"between fragments"));
        wire.extend(server_frame(0x80, b"gments"));
        wire.extend(server_frame(0x81, b"text"));
        wire.extend(server_frame(0x88, &[0x03, 0xE8]));
        let got = read_all(wire, 1 << 20).await;
        assert_eq!(
            got,
            vec![
                Ok(Some(Incoming::Binary(Bytes::from_static(b"one")))),
                Ok(Some(Incoming::Ping(Bytes::from_static(b"ping")))),
                Ok(Some(Incoming::Binary(Bytes::from(big)))),
                Ok(Some(Incoming::Ping(Bytes::from_static(b"between fragments")))),
                Ok(Some(Incoming::Binary(Bytes::from_static(b"fragments")))),
                Ok(Some(Incoming::Text)),
                Ok(Some(Incoming::Close)),
                Ok(None),
            ]
        );
    }

    #[tokio::test]
    async fn refuses_what_a_server_must_not_send() {
        let masked = {
            let mut f = server_frame(0x82, b"abcd");
            f[1] |= 0x80;
            f.splice(2..2, [1, 2, 3, 4]);
            f
        };
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("masked", masked, 1024),
            ("reserved bits", server_frame(0xC2, b"x"), 1024),
            ("opcode", server_frame(0x83, b"x"), 1024),
            ("exceeds", server_frame(0x82, &[0; 2000]), 1024),
            (
                "exceeds",
                [server_frame(0x02, &[0; 700]), server_frame(0x80, &[0; 700])].concat(),
                1024,
            ),
            ("control", server_frame(0x09, b"unfinished ping"), 1024),
            ("control", server_frame(0x89, &[0; 126]), 1024),
            ("continuation frame without", server_frame(0x80, b"x"), 1024),
            (
                "inside a fragmented",
                [server_frame(0x02, b"a"), server_frame(0x82, b"b")].concat(),
                1024,
            ),
            ("mid-frame", server_frame(0x82, &[0; 500])[..100].to_vec(), 1024),
        ];
        for (why, wire, max) in cases {
            let got = read_all(wire, max).await;
            match got.last() {
                Some(Err(e)) if e.contains(why) => {}
                other => panic!("{why}: got {other:?}"),
            }
        }
    }
}
