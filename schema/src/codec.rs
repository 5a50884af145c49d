//! Validating codec between typed frames and Cap'n Proto bytes (`schema/tunnel.capnp`).
//!
//! Encoding trusts its input: it writes whatever the typed frame holds, so a peer's decoder is the
//! one place that decides what is acceptable. Decoding trusts nothing: every field is checked
//! against [`Limits`] and the protocol's grammar before a [`Frame`] exists, and any input, however
//! broken, yields a [`DecodeError`] rather than a panic.
//!
//! Messages use the standard (unpacked) Cap'n Proto serialization. Encoders always write a single
//! segment; decoders accept any segment layout the format allows, at any byte alignment.

use std::collections::HashSet;

use bytes::Bytes;
use capnp::message::{self, HeapAllocator, ReaderOptions};
use capnp::private::layout::StructSize;
use capnp::traits::HasStructSize;
use capnp::{serialize, struct_list, text, text_list};

use crate::code::{ErrorCode, RefuseCode};
use crate::frame::{
    is_short_id, AgentName, BusEnvelope, Credit, Data, Drain, Fin, Frame, GoAway, Header, Hello, Ping, Pong, Refused,
    RequestHead, Reset, ResponseHead, ServiceDecl, ServiceKind, StreamId, StreamOpen, Welcome, WireLimits,
};
use crate::tunnel_capnp as wire;

/// Bounds the decoder enforces on everything that comes off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message accepted.
    pub max_frame_bytes: usize,
    /// Largest `Data` payload accepted.
    pub max_data_bytes: usize,
    /// Most headers in one head.
    pub max_headers: usize,
    /// Most bytes of header names plus values in one head.
    pub max_header_bytes: usize,
    /// Longest request target.
    pub max_uri_bytes: usize,
    /// Longest reason / message / node id text.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 1 << 20,
            max_data_bytes: 256 << 10,
            max_headers: 128,
            max_header_bytes: 64 << 10,
            max_uri_bytes: 16 << 10,
            max_text_bytes: 1024,
        }
    }
}

/// Why bytes off the wire were not accepted as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than `max_frame_bytes`.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Not a readable Cap'n Proto message (truncated, bad pointers, ...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A field failed validation.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What was wrong.
        why: &'static str,
    },
}

/// Most capabilities one `Hello` or `Welcome` may list.
pub const MAX_CAPABILITIES: usize = 32;
/// Most services one `Hello` may declare.
pub const MAX_SERVICES: usize = 64;
/// Longest HTTP method token.
pub const MAX_METHOD_BYTES: usize = 32;

/// Deepest pointer nesting any valid message needs (envelope → frame → hello → services → decl →
/// name is 5), with a little room; anything deeper is an attack on the reader's stack.
const NESTING_LIMIT: i32 = 8;

/// Wire values of [`ServiceKind`] (`serviceKind*` constants in `tunnel.capnp`).
fn service_kind_to_wire(kind: ServiceKind) -> u16 {
    match kind {
        ServiceKind::Http => wire::SERVICE_KIND_HTTP,
        ServiceKind::Tcp => wire::SERVICE_KIND_TCP,
    }
}

fn service_kind_from_wire(v: u16) -> Option<ServiceKind> {
    match v {
        wire::SERVICE_KIND_HTTP => Some(ServiceKind::Http),
        wire::SERVICE_KIND_TCP => Some(ServiceKind::Tcp),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Encodes one frame as a single-segment Cap'n Proto message. The segment is allocated once, at
/// its exact final size, so no frame is ever split or reallocated while it is built. `Data`
/// frames (the tunnel's hot path) skip the generic builder: their layout is fixed, so the payload
/// is copied exactly once, straight into the output.
///
/// Does not validate: an invalid frame encodes to bytes the peer's [`decode`] refuses. Panics only
/// if a single text or payload exceeds Cap'n Proto's own 512 MiB blob limit, far beyond any
/// [`Limits`].
pub fn encode(frame: &Frame) -> Vec<u8> {
    if let Frame::Data(d) = frame {
        return encode_data(d);
    }
    build(1 + frame_words(frame), |msg| write_frame(msg.init_root(), frame))
}

/// Encodes a bus envelope (single segment, sized up front like [`encode`]).
pub fn encode_envelope(env: &BusEnvelope) -> Vec<u8> {
    let words = 1
        + struct_words(<wire::bus_envelope::Builder<'_> as HasStructSize>::STRUCT_SIZE)
        + text_words(&env.from_node)
        + text_words(&env.to_node)
        + text_words(&env.trace_parent)
        + text_words(env.agent.as_str())
        + frame_words(&env.frame);
    build(words, |msg| {
        let mut b = msg.init_root::<wire::bus_envelope::Builder<'_>>();
        b.set_from_node(env.from_node.as_str());
        b.set_to_node(env.to_node.as_str());
        b.set_seq(env.seq);
        b.set_trace_parent(env.trace_parent.as_str());
        b.set_agent(env.agent.as_str());
        b.set_epoch(env.epoch);
        write_frame(b.init_frame(), &env.frame);
    })
}

/// Builds a message in one heap segment of `words` words and serializes it.
fn build(words: usize, fill: impl FnOnce(&mut message::Builder<HeapAllocator>)) -> Vec<u8> {
    // Anything beyond `u32::MAX` words cannot be one segment anyway; capnp then grows the message.
    let first = u32::try_from(words).unwrap_or(u32::MAX).min(MAX_SEGMENT_WORDS);
    let mut msg = message::Builder::new(HeapAllocator::new().first_segment_words(first));
    fill(&mut msg);
    serialize::write_message_to_words(&msg)
}

/// `HeapAllocator`'s default (and largest allowed) segment size; `first_segment_words` asserts it.
const MAX_SEGMENT_WORDS: u32 = 1 << 29;

/// Words of a struct's data and pointer sections.
fn struct_words(size: StructSize) -> usize {
    usize::from(size.data) + usize::from(size.pointers)
}

/// Words a `Text` takes: its bytes plus the NUL terminator, padded to a word.
fn text_words(s: &str) -> usize {
    (s.len() + 1).div_ceil(8)
}

/// Words a `Data` takes: its bytes padded to a word.
fn data_words(b: &[u8]) -> usize {
    b.len().div_ceil(8)
}

/// Words a `List(Text)` takes: one pointer per element plus the texts.
fn text_list_words(items: &[String]) -> usize {
    items.len() + items.iter().map(|s| text_words(s)).sum::<usize>()
}

/// Words a `List(Header)` takes: the tag word, the structs, and their texts and values.
fn headers_words(headers: &[Header]) -> usize {
    let each = struct_words(<wire::header::Builder<'_> as HasStructSize>::STRUCT_SIZE);
    1 + headers
        .iter()
        .map(|h| each + text_words(&h.name) + data_words(&h.value))
        .sum::<usize>()
}

/// Exact words `write_frame` allocates for `frame`: the `Frame` struct, the member struct and
/// everything that hangs off it. A test checks this against real encodings.
fn frame_words(frame: &Frame) -> usize {
    fn size<T: HasStructSize>() -> usize {
        struct_words(T::STRUCT_SIZE)
    }
    let member = match frame {
        Frame::Hello(h) => {
            let decl = size::<wire::service_decl::Builder<'_>>();
            size::<wire::hello::Builder<'_>>()
                + text_words(h.agent.as_str())
                + text_words(&h.instance_id)
                + text_words(&h.key_id)
                + data_words(&h.nonce)
                + data_words(&h.signature)
                + text_list_words(&h.capabilities)
                + 1
                + h.services.iter().map(|s| decl + text_words(&s.name)).sum::<usize>()
        }
        Frame::Welcome(w) => {
            size::<wire::welcome::Builder<'_>>()
                + text_words(&w.node_id)
                + size::<wire::wire_limits::Builder<'_>>()
                + text_list_words(&w.capabilities)
        }
        Frame::Refused(r) => size::<wire::refused::Builder<'_>>() + text_words(&r.message),
        Frame::Ping(_) => size::<wire::ping::Builder<'_>>(),
        Frame::Pong(_) => size::<wire::pong::Builder<'_>>(),
        Frame::RequestHead(r) => {
            size::<wire::request_head::Builder<'_>>()
                + text_words(&r.service)
                + text_words(&r.method)
                + text_words(&r.uri)
                + headers_words(&r.headers)
        }
        Frame::ResponseHead(r) => {
            size::<wire::response_head::Builder<'_>>() + headers_words(&r.headers) + data_words(&r.body)
        }
        Frame::StreamOpen(s) => size::<wire::stream_open::Builder<'_>>() + text_words(&s.service),
        Frame::Data(d) => size::<wire::data_frame::Builder<'_>>() + data_words(&d.bytes),
        Frame::Credit(_) => size::<wire::credit::Builder<'_>>(),
        Frame::Fin(_) => size::<wire::fin::Builder<'_>>(),
        Frame::Reset(r) => size::<wire::reset::Builder<'_>>() + text_words(&r.reason),
        Frame::GoAway(g) => size::<wire::go_away::Builder<'_>>() + text_words(&g.reason),
        Frame::Drain(_) => size::<wire::drain::Builder<'_>>(),
    };
    size::<wire::frame::Builder<'_>>() + member
}

/// Converts a list length for the builder. Lengths past `u32::MAX` are far beyond every limit
/// and beyond what one message can hold, so they saturate (the builder then panics on size).
fn list_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn write_text_list(mut list: text_list::Builder<'_>, items: &[String]) {
    for (i, s) in (0u32..).zip(items) {
        list.set(i, s.as_str());
    }
}

fn write_headers(mut list: struct_list::Builder<'_, wire::header::Owned>, headers: &[Header]) {
    for (i, h) in (0u32..).zip(headers) {
        let mut b = list.reborrow().get(i);
        b.set_name(h.name.as_str());
        b.set_value(&h.value);
    }
}

/// Writes `frame` into a fresh `Frame` struct. Field order here fixes the layout that
/// [`frame_words`] and the `Data` fast path ([`encode_data`]) assume.
fn write_frame(b: wire::frame::Builder<'_>, frame: &Frame) {
    match frame {
        Frame::Hello(h) => {
            let mut w = b.init_hello();
            w.set_agent(h.agent.as_str());
            w.set_instance_id(h.instance_id.as_str());
            w.set_key_id(h.key_id.as_str());
            w.set_timestamp_ms(h.timestamp_ms);
            w.set_nonce(&h.nonce);
            w.set_signature(&h.signature);
            w.set_version(h.version);
            write_text_list(
                w.reborrow().init_capabilities(list_len(h.capabilities.len())),
                &h.capabilities,
            );
            let mut services = w.init_services(list_len(h.services.len()));
            for (i, s) in (0u32..).zip(&h.services) {
                let mut d = services.reborrow().get(i);
                d.set_name(s.name.as_str());
                d.set_kind(service_kind_to_wire(s.kind));
            }
        }
        Frame::Welcome(wl) => {
            let mut w = b.init_welcome();
            w.set_node_id(wl.node_id.as_str());
            w.set_heartbeat_ms(wl.heartbeat_ms);
            let mut l = w.reborrow().init_limits();
            l.set_max_frame_bytes(wl.limits.max_frame_bytes);
            l.set_max_data_bytes(wl.limits.max_data_bytes);
            l.set_stream_window(wl.limits.stream_window);
            l.set_max_streams(wl.limits.max_streams);
            write_text_list(w.init_capabilities(list_len(wl.capabilities.len())), &wl.capabilities);
        }
        Frame::Refused(r) => {
            let mut w = b.init_refused();
            w.set_code(r.code.to_wire());
            w.set_message(r.message.as_str());
        }
        Frame::Ping(p) => b.init_ping().set_timestamp_ms(p.timestamp_ms),
        Frame::Pong(p) => b.init_pong().set_timestamp_ms(p.timestamp_ms),
        Frame::RequestHead(r) => {
            let mut w = b.init_request_head();
            w.set_stream(r.stream.0);
            w.set_service(r.service.as_str());
            w.set_method(r.method.as_str());
            w.set_uri(r.uri.as_str());
            w.set_end(r.end);
            write_headers(w.init_headers(list_len(r.headers.len())), &r.headers);
        }
        Frame::ResponseHead(r) => {
            let mut w = b.init_response_head();
            w.set_stream(r.stream.0);
            w.set_status(r.status);
            w.set_end(r.end);
            if !r.body.is_empty() {
                w.set_body(&r.body);
            }
            write_headers(w.init_headers(list_len(r.headers.len())), &r.headers);
        }
        Frame::StreamOpen(s) => {
            let mut w = b.init_stream_open();
            w.set_stream(s.stream.0);
            w.set_service(s.service.as_str());
            w.set_http(s.http);
        }
        Frame::Data(d) => {
            let mut w = b.init_data();
            w.set_stream(d.stream.0);
            w.set_bytes(&d.bytes);
        }
        Frame::Credit(c) => {
            let mut w = b.init_credit();
            w.set_stream(c.stream.0);
            w.set_bytes(c.bytes);
        }
        Frame::Fin(f) => b.init_fin().set_stream(f.stream.0),
        Frame::Reset(r) => {
            let mut w = b.init_reset();
            w.set_stream(r.stream.0);
            w.set_code(r.code.to_wire());
            w.set_reason(r.reason.as_str());
        }
        Frame::GoAway(g) => b.init_go_away().set_reason(g.reason.as_str()),
        Frame::Drain(d) => b.init_drain().set_stream(d.stream.0),
    }
}

/// Discriminant of `Frame.data` (its index among the union members of `tunnel.capnp`).
const DATA_DISCRIMINANT: u16 = 8;

/// Encodes a `Data` frame by hand, byte for byte what [`write_frame`] would make (a test holds
/// the two equal), but writing the payload once instead of into a segment and then again into
/// the output. Layout, in words after the 8-byte segment table:
///
/// ```text
/// 0  root pointer      -> Frame at 1 (struct: 1 data word, 1 pointer)
/// 1  Frame data        discriminant = data
/// 2  Frame.data ptr    -> DataFrame at 3 (struct: 1 data word, 1 pointer)
/// 3  DataFrame.stream
/// 4  DataFrame.bytes   -> byte list at 5, len elements
/// 5… payload, zero-padded to a word
/// ```
fn encode_data(d: &Data) -> Vec<u8> {
    let head = data_head(d.stream, d.bytes.len());
    let mut out = Vec::with_capacity(head.len() + d.bytes.len() + data_padding(d.bytes.len()));
    out.extend_from_slice(&head);
    out.extend_from_slice(&d.bytes);
    out.resize(out.len() + data_padding(d.bytes.len()), 0);
    out
}

/// Bytes of an encoded `Data` frame before its payload: [`encode`] of a `Data` frame is this
/// head, the payload, then [`data_padding`] zero bytes. A writer that can send the three parts
/// in turn (the gateway's agent sockets) sends a payload without ever copying it into a frame.
pub const DATA_HEAD_LEN: usize = 48;

/// The head of a `Data` frame for `stream` carrying `len` payload bytes (see [`DATA_HEAD_LEN`]).
pub fn data_head(stream: StreamId, len: usize) -> [u8; DATA_HEAD_LEN] {
    let words = 5 + len.div_ceil(8);
    let mut head = [0u8; DATA_HEAD_LEN];
    // One segment; its size saturates only for payloads beyond any limit (the peer then sees a
    // truncated message).
    head[4..8].copy_from_slice(&u32::try_from(words).unwrap_or(u32::MAX).to_le_bytes());
    head[8..16].copy_from_slice(&struct_pointer(0, 1, 1).to_le_bytes());
    head[16..24].copy_from_slice(&u64::from(DATA_DISCRIMINANT).to_le_bytes());
    head[24..32].copy_from_slice(&struct_pointer(0, 1, 1).to_le_bytes());
    head[32..40].copy_from_slice(&stream.0.to_le_bytes());
    // Byte-list pointer: kind 1, offset 0, element size 2 (one byte), 29-bit element count.
    let count = u64::try_from(len).unwrap_or(u64::MAX) & ((1 << 29) - 1);
    head[40..48].copy_from_slice(&(1u64 | (2 << 32) | (count << 35)).to_le_bytes());
    head
}

/// Zero bytes after a `len`-byte `Data` payload that end its frame on a word boundary.
pub fn data_padding(len: usize) -> usize {
    len.div_ceil(8) * 8 - len
}

/// A struct pointer (kind 0) to a struct `offset` words after the pointer's own word.
fn struct_pointer(offset: u32, data_words: u16, pointers: u16) -> u64 {
    (u64::from(offset) << 2) | (u64::from(data_words) << 32) | (u64::from(pointers) << 48)
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes and validates one message. `Data` payloads are copied out of `bytes`; on the hot path
/// prefer [`decode_bytes`], which shares them.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    let msg = read_message(bytes, limits)?;
    let root = msg.get_root::<wire::frame::Reader<'_>>().map_err(malformed("frame"))?;
    read_frame(root, limits, &Bytes::copy_from_slice)
}

/// Like [`decode`], but a `Data` payload is a zero-copy slice of `bytes` (`Bytes::slice_ref`),
/// so a 256 KiB chunk is never copied between the socket buffer and the stream it feeds. Only
/// `Data` payloads share the buffer: header values are copied, because a small header kept alive
/// for the life of a request must not pin a whole frame's buffer.
pub fn decode_bytes(bytes: Bytes, limits: &Limits) -> Result<Frame, DecodeError> {
    let msg = read_message(&bytes, limits)?;
    let root = msg.get_root::<wire::frame::Reader<'_>>().map_err(malformed("frame"))?;
    read_frame(root, limits, &|part| share(&bytes, part))
}

/// Decodes and validates a bus envelope and the frame inside it. `limits.max_frame_bytes` bounds
/// the whole envelope.
pub fn decode_envelope(bytes: &[u8], limits: &Limits) -> Result<BusEnvelope, DecodeError> {
    decode_envelope_with(bytes, limits, &Bytes::copy_from_slice)
}

/// Like [`decode_envelope`], but a `Data` payload shares `bytes` (see [`decode_bytes`]).
pub fn decode_envelope_bytes(bytes: Bytes, limits: &Limits) -> Result<BusEnvelope, DecodeError> {
    decode_envelope_with(&bytes, limits, &|part| share(&bytes, part))
}

/// Turns a payload slice into `Bytes`: shared when it lies inside `buf` (always, for messages
/// read in place), copied otherwise, because `Bytes::slice_ref` panics on a foreign slice.
fn share(buf: &Bytes, part: &[u8]) -> Bytes {
    let start = buf.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    if p >= start && p.saturating_add(part.len()) <= start.saturating_add(buf.len()) {
        buf.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// How `Data` payloads leave the message: copied or shared with the input buffer.
type Payload<'p> = &'p dyn Fn(&[u8]) -> Bytes;

fn decode_envelope_with(bytes: &[u8], limits: &Limits, payload: Payload<'_>) -> Result<BusEnvelope, DecodeError> {
    let msg = read_message(bytes, limits)?;
    let r = msg
        .get_root::<wire::bus_envelope::Reader<'_>>()
        .map_err(malformed("envelope"))?;
    let from_node = read_text(r.get_from_node(), "envelope.from_node", limits.max_text_bytes)?;
    if !is_short_id(from_node) {
        return Err(invalid("envelope.from_node", "not a short id"));
    }
    let to_node = read_text(r.get_to_node(), "envelope.to_node", limits.max_text_bytes)?;
    if !is_short_id(to_node) {
        return Err(invalid("envelope.to_node", "not a short id"));
    }
    let trace_parent = read_text(r.get_trace_parent(), "envelope.trace_parent", limits.max_text_bytes)?;
    if !trace_parent.is_empty() && !is_trace_parent(trace_parent) {
        return Err(invalid("envelope.trace_parent", "not a W3C traceparent"));
    }
    let agent = read_agent(r.get_agent(), "envelope.agent")?;
    if !r.has_frame() {
        return Err(invalid("envelope.frame", "missing"));
    }
    let frame = read_frame(r.get_frame().map_err(malformed("envelope.frame"))?, limits, payload)?;
    Ok(BusEnvelope {
        from_node: from_node.to_owned(),
        to_node: to_node.to_owned(),
        seq: r.get_seq(),
        trace_parent: trace_parent.to_owned(),
        agent,
        epoch: r.get_epoch(),
        frame,
    })
}

/// Checks the size first (before any parsing work), then reads the segment table in place. The
/// whole input must be one message: trailing bytes mean the sender and we disagree on framing.
fn read_message<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<message::Reader<serialize::NoAllocSliceSegments<'a>>, DecodeError> {
    if bytes.len() > limits.max_frame_bytes {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: limits.max_frame_bytes,
        });
    }
    let mut options = ReaderOptions::new();
    // The decoder reads each word once, so twice the largest message bounds honest traversal
    // while still stopping a small message whose pointers alias one another from amplifying.
    options
        .traversal_limit_in_words(Some((limits.max_frame_bytes / 8).saturating_mul(2).saturating_add(64)))
        .nesting_limit(NESTING_LIMIT);
    let mut rest = bytes;
    let segments = serialize::NoAllocSliceSegments::from_slice(&mut rest, options).map_err(malformed("message"))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(message::Reader::new(segments, options))
}

fn malformed(field: &'static str) -> impl Fn(capnp::Error) -> DecodeError {
    move |e| DecodeError::Malformed(format!("{field}: {e}"))
}

fn invalid(field: &'static str, why: &'static str) -> DecodeError {
    DecodeError::Invalid { field, why }
}

/// Reads a `Text` of at most `max` bytes that is valid UTF-8.
fn read_text<'a>(r: capnp::Result<text::Reader<'a>>, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
    let t = r.map_err(malformed(field))?;
    if t.len() > max {
        return Err(invalid(field, "too long"));
    }
    t.to_str().map_err(|_| invalid(field, "not valid UTF-8"))
}

/// Short ids are at most 64 bytes; reading with that bound refuses long junk before UTF-8 checks.
fn read_short_id<'a>(r: capnp::Result<text::Reader<'a>>, field: &'static str) -> Result<&'a str, DecodeError> {
    let s = read_text(r, field, 64)?;
    if !is_short_id(s) {
        return Err(invalid(field, "not a short id ([A-Za-z0-9._-]{1,64})"));
    }
    Ok(s)
}

/// A service name: empty (the default HTTP service) or a short id.
fn read_service_name<'a>(r: capnp::Result<text::Reader<'a>>, field: &'static str) -> Result<&'a str, DecodeError> {
    let s = read_text(r, field, 64)?;
    if !s.is_empty() && !is_short_id(s) {
        return Err(invalid(field, "neither empty nor a short id"));
    }
    Ok(s)
}

fn read_agent(r: capnp::Result<text::Reader<'_>>, field: &'static str) -> Result<AgentName, DecodeError> {
    let s = read_text(r, field, 63)?;
    AgentName::new(s).ok_or(invalid(field, "not a DNS label"))
}

fn read_stream(v: u64, field: &'static str) -> Result<StreamId, DecodeError> {
    if v == 0 {
        return Err(invalid(field, "stream id is zero"));
    }
    Ok(StreamId(v))
}

fn read_capabilities(r: capnp::Result<text_list::Reader<'_>>, field: &'static str) -> Result<Vec<String>, DecodeError> {
    let list = r.map_err(malformed(field))?;
    if list.len() as usize > MAX_CAPABILITIES {
        return Err(invalid(field, "more than 32 capabilities"));
    }
    list.iter()
        .map(|c| read_short_id(c, field).map(str::to_owned))
        .collect()
}

/// RFC 9110 `tchar`: the characters of a token (methods, header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `00-<32 hex>-<16 hex>-<2 hex>` in lowercase, with neither id all zeros (W3C Trace Context:
/// such ids are invalid and a propagator would drop them anyway).
fn is_trace_parent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: &[u8]| r.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |r: &[u8]| r.iter().any(|c| *c != b'0');
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && hex(&b[36..52])
        && hex(&b[53..55])
        && nonzero(&b[3..35])
        && nonzero(&b[36..52])
}

fn read_headers(
    r: capnp::Result<struct_list::Reader<'_, wire::header::Owned>>,
    limits: &Limits,
) -> Result<Vec<Header>, DecodeError> {
    let list = r.map_err(malformed("headers"))?;
    if list.len() as usize > limits.max_headers {
        return Err(invalid("headers", "too many headers"));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(list.len() as usize);
    for h in list.iter() {
        let name = h.get_name().map_err(malformed("header.name"))?;
        let value = h.get_value().map_err(malformed("header.value"))?;
        total = total.saturating_add(name.len()).saturating_add(value.len());
        if total > limits.max_header_bytes {
            return Err(invalid("headers", "names and values exceed max_header_bytes"));
        }
        let name = name.as_bytes();
        if name.is_empty() {
            return Err(invalid("header.name", "empty"));
        }
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err(invalid("header.name", "not lowercase"));
        }
        if !name.iter().copied().all(is_tchar) {
            return Err(invalid("header.name", "not a token"));
        }
        if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(invalid("header.value", "contains CR, LF or NUL"));
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(invalid("header.value", "contains a control character"));
        }
        // A token is ASCII, so this cannot fail; the error arm keeps the decoder panic-free.
        let name = std::str::from_utf8(name).map_err(|_| invalid("header.name", "not a token"))?;
        out.push(Header {
            name: name.to_owned(),
            value: Bytes::copy_from_slice(value),
        });
    }
    Ok(out)
}

fn read_frame(r: wire::frame::Reader<'_>, limits: &Limits, payload: Payload<'_>) -> Result<Frame, DecodeError> {
    use wire::frame::Which;
    Ok(match r.which().map_err(|_| invalid("frame", "unknown frame kind"))? {
        Which::Hello(h) => Frame::Hello(read_hello(h.map_err(malformed("hello"))?)?),
        Which::Welcome(w) => Frame::Welcome(read_welcome(w.map_err(malformed("welcome"))?, limits)?),
        Which::Refused(x) => {
            let x = x.map_err(malformed("refused"))?;
            Frame::Refused(Refused {
                code: RefuseCode::from_wire(x.get_code()).ok_or(invalid("refused.code", "unknown refuse code"))?,
                message: read_text(x.get_message(), "refused.message", limits.max_text_bytes)?.to_owned(),
            })
        }
        Which::Ping(p) => Frame::Ping(Ping {
            timestamp_ms: p.map_err(malformed("ping"))?.get_timestamp_ms(),
        }),
        Which::Pong(p) => Frame::Pong(Pong {
            timestamp_ms: p.map_err(malformed("pong"))?.get_timestamp_ms(),
        }),
        Which::RequestHead(x) => Frame::RequestHead(read_request_head(x.map_err(malformed("request_head"))?, limits)?),
        Which::ResponseHead(x) => {
            let x = x.map_err(malformed("response_head"))?;
            let stream = read_stream(x.get_stream(), "response_head.stream")?;
            let status = x.get_status();
            if !(100..=599).contains(&status) {
                return Err(invalid("response_head.status", "not in 100..=599"));
            }
            let end = x.get_end();
            let body = if x.has_body() {
                x.get_body().map_err(malformed("response_head.body"))?
            } else {
                &[]
            };
            if !body.is_empty() && !end {
                return Err(invalid("response_head.body", "a body without end"));
            }
            if body.len() > limits.max_data_bytes {
                return Err(invalid("response_head.body", "exceeds max_data_bytes"));
            }
            Frame::ResponseHead(ResponseHead {
                stream,
                status,
                headers: read_headers(x.get_headers(), limits)?,
                end,
                body: if body.is_empty() { Bytes::new() } else { payload(body) },
            })
        }
        Which::StreamOpen(x) => {
            let x = x.map_err(malformed("stream_open"))?;
            let http = x.get_http();
            let service = if http {
                read_service_name(x.get_service(), "stream_open.service")?
            } else {
                read_short_id(x.get_service(), "stream_open.service")?
            };
            Frame::StreamOpen(StreamOpen {
                stream: read_stream(x.get_stream(), "stream_open.stream")?,
                service: service.to_owned(),
                http,
            })
        }
        Which::Data(x) => {
            let x = x.map_err(malformed("data"))?;
            let stream = read_stream(x.get_stream(), "data.stream")?;
            let bytes = x.get_bytes().map_err(malformed("data.bytes"))?;
            if bytes.is_empty() {
                return Err(invalid("data.bytes", "empty"));
            }
            if bytes.len() > limits.max_data_bytes {
                return Err(invalid("data.bytes", "exceeds max_data_bytes"));
            }
            Frame::Data(Data {
                stream,
                bytes: payload(bytes),
            })
        }
        Which::Credit(x) => {
            let x = x.map_err(malformed("credit"))?;
            let stream = read_stream(x.get_stream(), "credit.stream")?;
            if x.get_bytes() == 0 {
                return Err(invalid("credit.bytes", "zero"));
            }
            Frame::Credit(Credit {
                stream,
                bytes: x.get_bytes(),
            })
        }
        Which::Fin(x) => Frame::Fin(Fin {
            stream: read_stream(x.map_err(malformed("fin"))?.get_stream(), "fin.stream")?,
        }),
        Which::Drain(x) => Frame::Drain(Drain {
            stream: read_stream(x.map_err(malformed("drain"))?.get_stream(), "drain.stream")?,
        }),
        Which::Reset(x) => {
            let x = x.map_err(malformed("reset"))?;
            Frame::Reset(Reset {
                stream: read_stream(x.get_stream(), "reset.stream")?,
                code: ErrorCode::from_wire(x.get_code()).ok_or(invalid("reset.code", "unknown error code"))?,
                reason: read_text(x.get_reason(), "reset.reason", limits.max_text_bytes)?.to_owned(),
            })
        }
        Which::GoAway(x) => Frame::GoAway(GoAway {
            reason: read_text(
                x.map_err(malformed("go_away"))?.get_reason(),
                "go_away.reason",
                limits.max_text_bytes,
            )?
            .to_owned(),
        }),
    })
}

fn read_hello(r: wire::hello::Reader<'_>) -> Result<Hello, DecodeError> {
    let agent = read_agent(r.get_agent(), "hello.agent")?;
    let instance_id = read_short_id(r.get_instance_id(), "hello.instance_id")?.to_owned();
    let key_id = read_short_id(r.get_key_id(), "hello.key_id")?.to_owned();
    let nonce = r.get_nonce().map_err(malformed("hello.nonce"))?;
    let nonce: [u8; 16] = nonce.try_into().map_err(|_| invalid("hello.nonce", "not 16 bytes"))?;
    let signature = r.get_signature().map_err(malformed("hello.signature"))?;
    let signature: [u8; 32] = signature
        .try_into()
        .map_err(|_| invalid("hello.signature", "not 32 bytes"))?;
    let capabilities = read_capabilities(r.get_capabilities(), "hello.capabilities")?;
    let list = r.get_services().map_err(malformed("hello.services"))?;
    if list.len() as usize > MAX_SERVICES {
        return Err(invalid("hello.services", "more than 64 services"));
    }
    let mut services = Vec::with_capacity(list.len() as usize);
    let mut seen = HashSet::with_capacity(list.len() as usize);
    for s in list.iter() {
        let name = read_service_name(s.get_name(), "hello.services.name")?;
        let kind =
            service_kind_from_wire(s.get_kind()).ok_or(invalid("hello.services.kind", "unknown service kind"))?;
        if !seen.insert(name) {
            return Err(invalid("hello.services", "duplicate service name"));
        }
        services.push(ServiceDecl {
            name: name.to_owned(),
            kind,
        });
    }
    Ok(Hello {
        agent,
        instance_id,
        key_id,
        timestamp_ms: r.get_timestamp_ms(),
        nonce,
        signature,
        version: r.get_version(),
        capabilities,
        services,
    })
}

fn read_welcome(r: wire::welcome::Reader<'_>, limits: &Limits) -> Result<Welcome, DecodeError> {
    let node_id = read_text(r.get_node_id(), "welcome.node_id", limits.max_text_bytes)?;
    if !is_short_id(node_id) {
        return Err(invalid("welcome.node_id", "not a short id"));
    }
    let heartbeat_ms = r.get_heartbeat_ms();
    if heartbeat_ms == 0 {
        return Err(invalid("welcome.heartbeat_ms", "zero"));
    }
    let l = r.get_limits().map_err(malformed("welcome.limits"))?;
    let wl = WireLimits {
        max_frame_bytes: l.get_max_frame_bytes(),
        max_data_bytes: l.get_max_data_bytes(),
        stream_window: l.get_stream_window(),
        max_streams: l.get_max_streams(),
    };
    for (v, field) in [
        (wl.max_frame_bytes, "welcome.limits.max_frame_bytes"),
        (wl.max_data_bytes, "welcome.limits.max_data_bytes"),
        (wl.stream_window, "welcome.limits.stream_window"),
        (wl.max_streams, "welcome.limits.max_streams"),
    ] {
        if v == 0 {
            return Err(invalid(field, "zero"));
        }
    }
    if wl.max_data_bytes > wl.max_frame_bytes {
        return Err(invalid("welcome.limits.max_data_bytes", "exceeds max_frame_bytes"));
    }
    Ok(Welcome {
        node_id: node_id.to_owned(),
        heartbeat_ms,
        limits: wl,
        capabilities: read_capabilities(r.get_capabilities(), "welcome.capabilities")?,
    })
}

fn read_request_head(r: wire::request_head::Reader<'_>, limits: &Limits) -> Result<RequestHead, DecodeError> {
    let stream = read_stream(r.get_stream(), "request_head.stream")?;
    let service = read_service_name(r.get_service(), "request_head.service")?.to_owned();
    let method = read_text(r.get_method(), "request_head.method", MAX_METHOD_BYTES)?;
    if method.is_empty() {
        return Err(invalid("request_head.method", "empty"));
    }
    if !method.bytes().all(is_tchar) {
        return Err(invalid("request_head.method", "not a token"));
    }
    let uri = r.get_uri().map_err(malformed("request_head.uri"))?.as_bytes();
    if uri.is_empty() {
        return Err(invalid("request_head.uri", "empty"));
    }
    if uri.len() > limits.max_uri_bytes {
        return Err(invalid("request_head.uri", "too long"));
    }
    if !uri.starts_with(b"/") && uri != b"*" {
        return Err(invalid("request_head.uri", "neither origin-form (/...) nor *"));
    }
    if !uri.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(invalid("request_head.uri", "contains a byte outside 0x21..=0x7E"));
    }
    // Visible ASCII only (checked above), so always UTF-8; the error arm keeps this panic-free.
    let uri = std::str::from_utf8(uri).map_err(|_| invalid("request_head.uri", "not valid UTF-8"))?;
    Ok(RequestHead {
        stream,
        service,
        method: method.to_owned(),
        uri: uri.to_owned(),
        headers: read_headers(r.get_headers(), limits)?,
        end: r.get_end(),
    })
}

#[cfg(test)]
mod tests;
