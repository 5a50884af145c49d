use proptest::prelude::*;

use super::*;
use crate::{decode_bytes, encode, Frame, Limits, StreamId};

/// An unmasked (server) frame as a peer would send it.
fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, payload, None)
}

/// A frame with the given first byte, masked with `mask` if any.
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Feeds `wire` to a reader in `piece`-byte reads; every message, then the first error if any.
fn read_all(role: Role, wire: &[u8], piece: usize, max: usize) -> (Vec<Message>, Option<DecodeError>) {
    let mut reader = Reader::new(role, max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for (i, chunk) in wire.chunks(piece.max(1)).enumerate() {
        // Both ways of adding bytes: the reader unmasks what `fill` adds as it copies, and what
        // is appended behind its back when it next looks.
        if i % 2 == 0 {
            reader.fill(&mut buf, chunk);
        } else {
            buf.extend_from_slice(chunk);
        }
        loop {
            match reader.next(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    assert!(buf.is_empty() && !reader.mid_message(), "bytes left over");
    (out, None)
}

/// Unmasks a client frame the way a server does: the opcode byte and the payload.
fn unmask(wire: &[u8]) -> (u8, Vec<u8>) {
    let mut cur = Cursor::new(wire);
    let (head, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
    let start = cur.position() as usize;
    assert_eq!(start + len as usize, wire.len(), "one frame, nothing after it");
    let mut payload = wire[start..].to_vec();
    apply_mask(&mut payload, head.mask.expect("client frames are masked"), 0);
    (wire[0], payload)
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
fn a_masked_data_frame_is_the_codecs_encoding_and_reads_back() {
    // Sizes around the header, the padding and the mask chunk (an empty `Data` is invalid).
    for n in [1usize, 7, 8, 9, MASK_CHUNK - 1, MASK_CHUNK + 5, 200_003] {
        let data = Data {
            stream: StreamId(42),
            bytes: Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        };
        let mut wire = BytesMut::new();
        put_data(&mut wire, &data, [9, 8, 7, 6]);
        let (op, payload) = unmask(&wire);
        assert_eq!(op, 0x82, "final binary frame");
        assert_eq!(payload, encode(&Frame::Data(data.clone())), "{n} bytes");
        // Read back in odd pieces, as a server whose socket delivers them so, and in pieces
        // larger than what `fill` unmasks at a time.
        for piece in [1000, 70_000] {
            let (got, err) = read_all(Role::Server, &wire, piece, 1 << 20);
            assert_eq!(err, None);
            let [Message::Binary(bytes)] = &got[..] else {
                panic!("{n} bytes read as {got:?}")
            };
            assert_eq!(
                decode_bytes(bytes.clone(), &Limits::default()),
                Ok(Frame::Data(data.clone())),
                "{n} bytes in pieces of {piece}"
            );
        }
    }
}

#[test]
fn an_unmasked_data_head_then_payload_then_tail_is_the_codecs_encoding() {
    let data = Data {
        stream: StreamId(7),
        bytes: Bytes::from(vec![3u8; 5000]),
    };
    let mut wire = BytesMut::new();
    put_data_head(&mut wire, &data);
    wire.extend_from_slice(&data.bytes);
    wire.extend_from_slice(data_tail(data.bytes.len()));
    let (got, err) = read_all(Role::Client, &wire, 777, 1 << 20);
    assert_eq!(err, None);
    assert_eq!(got, vec![Message::Binary(Bytes::from(encode(&Frame::Data(data))))]);
}

#[test]
fn control_frames_are_cut_to_125_bytes_and_close_reasons_on_a_char_boundary() {
    let mut wire = BytesMut::new();
    put_frame(&mut wire, Kind::Pong, &[5u8; 200], Some([1, 2, 3, 4]));
    let (op, payload) = unmask(&wire);
    assert_eq!((op, payload.len()), (0x8A, MAX_CONTROL_PAYLOAD));

    let reason = "é".repeat(100);
    let payload = close_payload(1001, &reason);
    assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    let text = std::str::from_utf8(&payload[2..]).expect("cut on a char boundary");
    assert!(!text.is_empty() && text.chars().all(|c| c == 'é'));
    let mut wire = BytesMut::new();
    put_frame(&mut wire, Kind::Close, &payload, None);
    let (got, err) = read_all(Role::Client, &wire, 3, 1024);
    assert_eq!((got, err), (vec![Message::Close(Some(1001))], None));
}

#[test]
fn reads_messages_split_anywhere_and_joins_fragments() {
    let big = vec![9u8; 200_000];
    let mut wire = server_frame(0x82, b"one");
    wire.extend(server_frame(0x89, b"ping"));
    wire.extend(server_frame(0x8A, b"pong"));
    wire.extend(server_frame(0x82, &big));
    wire.extend(server_frame(0x02, b"fra"));
    wire.extend(server_frame(0x89, b"between fragments"));
    wire.extend(server_frame(0x80, b"gments"));
    wire.extend(server_frame(0x81, b"text"));
    wire.extend(server_frame(0x88, &[0x03, 0xE8]));
    wire.extend(server_frame(0x88, &[]));
    for piece in [1, 2, 333, 1 << 20] {
        let (got, err) = read_all(Role::Client, &wire, piece, 1 << 20);
        assert_eq!(err, None, "pieces of {piece}");
        assert_eq!(
            got,
            vec![
                Message::Binary(Bytes::from_static(b"one")),
                Message::Ping(Bytes::from_static(b"ping")),
                Message::Pong,
                Message::Binary(Bytes::from(big.clone())),
                Message::Ping(Bytes::from_static(b"between fragments")),
                Message::Binary(Bytes::from_static(b"fragments")),
                Message::Text,
                Message::Close(Some(1000)),
                Message::Close(None),
            ],
            "pieces of {piece}"
        );
    }
}

#[test]
fn a_partly_read_frame_has_room_reserved_for_the_rest() {
    let wire = frame(0x82, &[1u8; 100_000], Some([1, 2, 3, 4]));
    let mut buf = BytesMut::from(&wire[..5000]);
    let mut reader = Reader::new(Role::Server, 1 << 20);
    assert_eq!(reader.next(&mut buf), Ok(None));
    assert!(reader.mid_message());
    assert!(
        buf.capacity() >= 100_000,
        "room for the whole payload: {}",
        buf.capacity()
    );
    buf.extend_from_slice(&wire[5000..]);
    assert_eq!(
        reader.next(&mut buf),
        Ok(Some(Message::Binary(Bytes::from(vec![1u8; 100_000]))))
    );
}

/// The first error reading `wire` as `role` with a 1,024-byte message limit.
fn refusal(role: Role, wire: &[u8]) -> String {
    match read_all(role, wire, 100, 1024) {
        (_, Some(e)) => e.to_string(),
        (got, None) => panic!("accepted: {got:?}"),
    }
}

#[test]
fn a_client_refuses_a_masked_frame() {
    assert!(refusal(Role::Client, &frame(0x82, b"abcd", Some([1, 2, 3, 4]))).contains("masked frame from a server"));
}

#[test]
fn a_server_refuses_an_unmasked_frame() {
    assert!(refusal(Role::Server, &server_frame(0x82, b"abcd")).contains("unmasked frame from a client"));
}

#[test]
fn reserved_bits_are_refused() {
    assert!(refusal(Role::Client, &server_frame(0xC2, b"x")).contains("reserved bits"));
}

#[test]
fn reserved_opcodes_are_refused() {
    for first in [0x83, 0x87, 0x8B, 0x8F] {
        assert!(refusal(Role::Client, &server_frame(first, b"x")).contains("unknown opcode"));
    }
}

#[test]
fn a_message_over_the_limit_is_refused_before_its_payload_arrives() {
    // Only the header: the reader must not wait for (or buffer) 2,000 bytes first.
    let head = &server_frame(0x82, &[0; 2000])[..4];
    let mut reader = Reader::new(Role::Client, 1024);
    assert_eq!(
        reader.next(&mut BytesMut::from(head)),
        Err(DecodeError::TooLarge { len: 2000, max: 1024 })
    );
    // A 64-bit length far past any limit.
    let mut huge = vec![0x82, 127];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(refusal(Role::Client, &huge).contains("exceeds"));
}

#[test]
fn fragments_over_the_limit_together_are_refused() {
    let wire = [server_frame(0x02, &[0; 700]), server_frame(0x80, &[0; 700])].concat();
    assert!(refusal(Role::Client, &wire).contains("1400 bytes exceeds the limit of 1024"));
}

#[test]
fn fragmented_or_oversized_control_frames_are_refused() {
    assert!(refusal(Role::Client, &server_frame(0x09, b"unfinished ping")).contains("control frame"));
    assert!(refusal(Role::Client, &server_frame(0x89, &[0; 126])).contains("control frame"));
}

#[test]
fn a_continuation_without_a_message_is_refused() {
    assert!(refusal(Role::Client, &server_frame(0x80, b"x")).contains("continuation frame without"));
}

#[test]
fn a_new_message_inside_a_fragmented_one_is_refused() {
    let wire = [server_frame(0x02, b"a"), server_frame(0x82, b"b")].concat();
    assert!(refusal(Role::Client, &wire).contains("inside a fragmented"));
}

proptest! {
    /// Whatever the messages, masks and read sizes, a server reads back exactly what a client
    /// wrote, and never panics.
    #[test]
    fn what_a_client_writes_a_server_reads_back(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 1..12),
        keys in prop::collection::vec(any::<[u8; 4]>(), 12),
        piece in 1usize..5000,
    ) {
        let mut wire = BytesMut::new();
        for (p, key) in payloads.iter().zip(&keys) {
            put_frame(&mut wire, Kind::Binary, p, Some(*key));
        }
        let (got, err) = read_all(Role::Server, &wire, piece, 1 << 20);
        prop_assert_eq!(err, None);
        let want: Vec<Message> = payloads.iter().map(|p| Message::Binary(Bytes::from(p.clone()))).collect();
        prop_assert_eq!(got, want);
    }

    /// Arbitrary bytes give messages or a refusal, never a panic, whichever end reads them.
    #[test]
    fn arbitrary_bytes_never_panic(wire in prop::collection::vec(any::<u8>(), 0..600), piece in 1usize..64) {
        for role in [Role::Client, Role::Server] {
            let mut reader = Reader::new(role, 256);
            let mut buf = BytesMut::new();
            'feed: for chunk in wire.chunks(piece) {
                buf.extend_from_slice(chunk);
                loop {
                    match reader.next(&mut buf) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }
}
