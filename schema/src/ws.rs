//! WebSocket framing (RFC 6455) of the agent connection, without I/O: each end fills a
//! `BytesMut` from its own socket and takes whole messages out of it with [`Reader`], and writes
//! frames into one buffer it reuses with [`put_frame`] and [`put_data`]. tungstenite's
//! [`FrameHeader`] parses and formats each header.
//!
//! Why not a WebSocket library's stream: the ones at hand copy each payload two to four times on
//! its way through (into their read buffer, out of it into the message, into their write
//! buffer, once more to mask it). Here a payload is unmasked in place as its bytes arrive, handed
//! on as a slice of the buffer it was read into, and masked on its one way into the write
//! buffer (docs/benchmarks.md, fifteenth and sixteenth rounds).

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data as DataOp, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codec::{data_head, data_padding, DecodeError, DATA_HEAD_LEN};
use crate::frame::Data;

/// A control frame's payload limit (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bytes masked per pass when copying: copied, then masked while still in the L1 cache.
const MASK_CHUNK: usize = 16 * 1024;

/// Zero bytes a `Data` frame may end with (a payload is padded to a whole word).
static PADDING: [u8; 8] = [0; 8];

/// A whole message from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A binary message (fragments joined): one encoded [`crate::Frame`].
    Binary(Bytes),
    /// A text message. The protocol has none, so the reader's owner treats it as an error.
    Text,
    /// A ping; answer with a pong of the same payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The peer's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// Which end reads. Clients mask every frame and servers none (RFC 6455 §5.1), so a reader
/// refuses a frame masked the wrong way: that is a peer that does not speak the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent: reads the gateway's unmasked frames.
    Client,
    /// The gateway: reads the agent's masked frames and unmasks them.
    Server,
}

/// The frame whose header was read and whose payload is still arriving.
#[derive(Debug)]
struct InProgress {
    fin: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
    /// Payload bytes at the front of the buffer already unmasked.
    unmasked: usize,
}

impl InProgress {
    /// Unmasks the payload bytes that arrived since the last call; returns how many of the
    /// frame's bytes the buffer holds.
    fn unmask(&mut self, buf: &mut BytesMut) -> usize {
        let have = buf.len().min(self.len);
        if let Some(key) = self.mask {
            apply_mask(&mut buf[self.unmasked..have], key, self.unmasked);
        }
        self.unmasked = have;
        have
    }
}

/// Takes whole messages out of a buffer the owner fills from its socket. Keeps everything it has
/// parsed in `self`, so it can be called again with more bytes at any point.
#[derive(Debug)]
pub struct Reader {
    role: Role,
    max_message: usize,
    frame: Option<InProgress>,
    /// A fragmented message so far: whether it is binary, and its bytes.
    partial: Option<(bool, BytesMut)>,
}

fn refuse(why: &'static str) -> DecodeError {
    DecodeError::Invalid {
        field: "websocket frame",
        why,
    }
}

impl Reader {
    /// A reader for `role` that refuses messages over `max_message` bytes.
    pub fn new(role: Role, max_message: usize) -> Self {
        Reader {
            role,
            max_message,
            frame: None,
            partial: None,
        }
    }

    /// Changes the message limit (the agent learns the gateway's from `Welcome`).
    pub fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message;
    }

    /// True while a frame or a fragmented message is only partly read: the peer closing the
    /// connection now cut it off.
    pub fn mid_message(&self) -> bool {
        self.frame.is_some() || self.partial.is_some()
    }

    /// Takes the next whole message out of the front of `buf`, or `None` when `buf` holds only
    /// part of one; then `buf` has room reserved for the rest of the frame in progress, so the
    /// owner's next read lands where the payload will be handed on from. Payload bytes are
    /// unmasked as they arrive, while still in the cache.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        loop {
            let frame = match self.frame.as_mut() {
                Some(f) => f,
                None => match self.header(buf)? {
                    Some(f) => self.frame.insert(f),
                    None => return Ok(None),
                },
            };
            let have = frame.unmask(buf);
            if have < frame.len {
                buf.reserve(frame.len - buf.len());
                return Ok(None);
            }
            let payload = buf.split_to(frame.len);
            let (fin, opcode) = (frame.fin, frame.opcode);
            self.frame = None;
            if let Some(m) = self.on_frame(fin, opcode, payload) {
                return Ok(Some(m));
            }
        }
    }

    /// Appends `bytes` read from the socket to `buf`, unmasking the payload of the frame in
    /// progress a piece at a time as it is copied, while the piece is still in the cache. The
    /// same as `buf.extend_from_slice(bytes)` before [`Reader::next`], one pass over the payload
    /// fewer: for an owner whose bytes arrive in a buffer of someone else's and must be copied
    /// out anyway.
    pub fn fill(&mut self, buf: &mut BytesMut, bytes: &[u8]) {
        for piece in bytes.chunks(MASK_CHUNK) {
            buf.extend_from_slice(piece);
            if self.frame.is_none() {
                // A header that does not parse stays in the buffer for `next` to refuse.
                self.frame = self.header(buf).ok().flatten();
                if let Some(frame) = &self.frame {
                    buf.reserve(frame.len.saturating_sub(buf.len()));
                }
            }
            if let Some(frame) = self.frame.as_mut() {
                frame.unmask(buf);
            }
        }
    }

    /// Parses and checks the next frame header and takes it off the buffer; `None` if the buffer
    /// does not hold a whole header yet.
    fn header(&self, buf: &mut BytesMut) -> Result<Option<InProgress>, DecodeError> {
        let mut cur = Cursor::new(&buf[..]);
        let (head, len) = match FrameHeader::parse(&mut cur) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(_) => return Err(refuse("unknown opcode")),
        };
        let head_len = cur.position() as usize;
        if head.rsv1 || head.rsv2 || head.rsv3 {
            return Err(refuse("reserved bits set"));
        }
        match (self.role, head.mask.is_some()) {
            (Role::Server, false) => return Err(refuse("unmasked frame from a client")),
            (Role::Client, true) => return Err(refuse("masked frame from a server")),
            _ => {}
        }
        match head.opcode {
            OpCode::Control(_) if !head.is_final || len > MAX_CONTROL_PAYLOAD as u64 => {
                return Err(refuse("fragmented or oversized control frame"));
            }
            OpCode::Data(DataOp::Continue) if self.partial.is_none() => {
                return Err(refuse("continuation frame without a message"));
            }
            OpCode::Data(DataOp::Text | DataOp::Binary) if self.partial.is_some() => {
                return Err(refuse("new message inside a fragmented one"));
            }
            _ => {}
        }
        let so_far = match head.opcode {
            OpCode::Data(_) => self.partial.as_ref().map_or(0, |(_, p)| p.len() as u64),
            OpCode::Control(_) => 0,
        };
        let len = match usize::try_from(len.saturating_add(so_far)) {
            Ok(total) if total <= self.max_message => len as usize,
            _ => {
                return Err(DecodeError::TooLarge {
                    len: usize::try_from(len.saturating_add(so_far)).unwrap_or(usize::MAX),
                    max: self.max_message,
                })
            }
        };
        buf.advance(head_len);
        Ok(Some(InProgress {
            fin: head.is_final,
            opcode: head.opcode,
            len,
            mask: head.mask,
            unmasked: 0,
        }))
    }

    /// A whole frame's payload (checked by [`Reader::header`]); the message, once it is whole.
    fn on_frame(&mut self, fin: bool, opcode: OpCode, payload: BytesMut) -> Option<Message> {
        match opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload.freeze())),
            OpCode::Control(Control::Pong) => Some(Message::Pong),
            OpCode::Control(_) => {
                let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                Some(Message::Close(code))
            }
            OpCode::Data(DataOp::Continue) => {
                let (binary, mut so_far) = self.partial.take()?;
                so_far.extend_from_slice(&payload);
                if fin {
                    return Some(message(binary, so_far));
                }
                self.partial = Some((binary, so_far));
                None
            }
            OpCode::Data(d) => {
                let binary = matches!(d, DataOp::Binary);
                if fin {
                    return Some(message(binary, payload));
                }
                self.partial = Some((binary, payload));
                None
            }
        }
    }
}

fn message(binary: bool, bytes: BytesMut) -> Message {
    if binary {
        Message::Binary(bytes.freeze())
    } else {
        Message::Text
    }
}

/// What a frame written with [`put_frame`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A binary message of one frame.
    Binary,
    /// A ping.
    Ping,
    /// A pong (its payload is cut to [`MAX_CONTROL_PAYLOAD`]).
    Pong,
    /// A close frame (its payload is cut to [`MAX_CONTROL_PAYLOAD`]).
    Close,
}

/// Appends one final frame carrying `payload`, masked with `mask` (a client's frames) or not (a
/// server's). Control frames are cut to the 125 bytes RFC 6455 allows.
pub fn put_frame(dst: &mut BytesMut, kind: Kind, payload: &[u8], mask: Option<[u8; 4]>) {
    let payload = match kind {
        Kind::Binary => payload,
        Kind::Ping | Kind::Pong | Kind::Close => &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    };
    put_header(dst, kind.opcode(), payload.len(), mask);
    match mask {
        Some(key) => put_masked(dst, payload, key, &mut 0),
        None => dst.extend_from_slice(payload),
    }
}

/// Appends the header of one final, unmasked frame of `len` payload bytes: a server's, whose
/// payload follows as it is (appended, or handed to its writer without a copy).
pub fn put_head(dst: &mut BytesMut, kind: Kind, len: usize) {
    put_header(dst, kind.opcode(), len, None);
}

impl Kind {
    fn opcode(self) -> OpCode {
        match self {
            Kind::Binary => OpCode::Data(DataOp::Binary),
            Kind::Ping => OpCode::Control(Control::Ping),
            Kind::Pong => OpCode::Control(Control::Pong),
            Kind::Close => OpCode::Control(Control::Close),
        }
    }
}

/// The payload of a close frame: `code`, then as much of `reason` as fits a control frame, cut
/// on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// Appends the (unmasked) WebSocket header of a binary frame carrying `data`, and the `Data`
/// frame's own head ([`data_head`]): what precedes the payload. A server then appends the payload
/// and [`data_tail`], or hands them to its writer as they are; [`put_data`] is a client's whole
/// frame.
pub fn put_data_head(dst: &mut BytesMut, data: &Data) {
    let n = data.bytes.len();
    put_head(dst, Kind::Binary, DATA_HEAD_LEN + n + data_padding(n));
    dst.extend_from_slice(&data_head(data.stream, n));
}

/// Appends a whole `Data` frame as one masked binary WebSocket frame: exactly the bytes of the
/// codec's encoding, masked on their one way into `dst`.
pub fn put_data(dst: &mut BytesMut, data: &Data, key: [u8; 4]) {
    let n = data.bytes.len();
    let pad = data_padding(n);
    put_header(dst, OpCode::Data(DataOp::Binary), DATA_HEAD_LEN + n + pad, Some(key));
    let mut at = 0;
    put_masked(dst, &data_head(data.stream, n), key, &mut at);
    put_masked(dst, &data.bytes, key, &mut at);
    put_masked(dst, &PADDING[..pad], key, &mut at);
}

/// The zero bytes that end a `Data` frame of `len` payload bytes.
pub fn data_tail(len: usize) -> &'static [u8] {
    &PADDING[..data_padding(len)]
}

fn put_header(dst: &mut BytesMut, opcode: OpCode, len: usize, mask: Option<[u8; 4]>) {
    let head = FrameHeader {
        opcode,
        mask,
        ..FrameHeader::default()
    };
    // Writing into a `BytesMut` cannot fail.
    let _ = head.format(len as u64, &mut dst.writer());
}

/// Appends `src` masked with `key`, as the payload bytes `at..` of a frame, and advances `at`.
fn put_masked(dst: &mut BytesMut, src: &[u8], key: [u8; 4], at: &mut usize) {
    for piece in src.chunks(MASK_CHUNK) {
        let start = dst.len();
        dst.extend_from_slice(piece);
        apply_mask(&mut dst[start..], key, *at);
        *at += piece.len();
    }
}

/// XORs `bytes` with the mask, as the payload bytes `offset..` of a frame. Masking is its own
/// inverse, so this also unmasks.
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

mod socket;
pub use socket::SocketReader;

#[cfg(test)]
mod tests;
