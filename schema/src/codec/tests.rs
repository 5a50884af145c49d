//! Codec tests: valid frames of every kind round-trip, no input makes the decoder panic, the
//! zero-copy path agrees with the copying one, and each refusal has its own named test.

use bytes::Bytes;
use capnp::message;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------------------------
// Strategies for valid values
// ---------------------------------------------------------------------------------------------

fn stream_id() -> impl Strategy<Value = StreamId> {
    (1..=u64::MAX).prop_map(StreamId)
}

fn dns_label() -> impl Strategy<Value = AgentName> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?".prop_map(|s| AgentName::new(&s).unwrap())
}

fn short_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn service_name() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), short_id()]
}

/// Free text within the default `max_text_bytes` (at most 200 chars of at most 4 bytes each).
fn free_text() -> impl Strategy<Value = String> {
    "(?s).{0,200}"
}

fn method() -> impl Strategy<Value = String> {
    "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}"
}

fn uri() -> impl Strategy<Value = String> {
    prop_oneof![Just("*".to_owned()), "/[!-~]{0,300}"]
}

fn header() -> impl Strategy<Value = Header> {
    let value_byte = prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff];
    ("[!#$%&'*+.^_`|~0-9a-z-]{1,40}", vec(value_byte, 0..120)).prop_map(|(name, value)| Header {
        name,
        value: Bytes::from(value),
    })
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    vec(header(), 0..24)
}

fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 1..3000).prop_map(Bytes::from)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn refuse_code() -> impl Strategy<Value = RefuseCode> {
    proptest::sample::select(RefuseCode::ALL.to_vec())
}

fn service_kind() -> impl Strategy<Value = ServiceKind> {
    prop_oneof![Just(ServiceKind::Http), Just(ServiceKind::Tcp)]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        dns_label(),
        short_id(),
        short_id(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        any::<u16>(),
        vec(short_id(), 0..=MAX_CAPABILITIES),
        btree_map(service_name(), service_kind(), 0..=MAX_SERVICES),
    )
        .prop_map(
            |(agent, instance_id, key_id, timestamp_ms, nonce, signature, version, capabilities, services)| Hello {
                agent,
                instance_id,
                key_id,
                timestamp_ms,
                nonce,
                signature,
                version,
                capabilities,
                services: services
                    .into_iter()
                    .map(|(name, kind)| ServiceDecl { name, kind })
                    .collect(),
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    let limits = (1..=u32::MAX).prop_flat_map(|max_frame_bytes| {
        (1..=max_frame_bytes, 1..=u32::MAX, 1..=u32::MAX).prop_map(
            move |(max_data_bytes, stream_window, max_streams)| WireLimits {
                max_frame_bytes,
                max_data_bytes,
                stream_window,
                max_streams,
            },
        )
    });
    (short_id(), 1..=u32::MAX, limits, vec(short_id(), 0..=MAX_CAPABILITIES)).prop_map(
        |(node_id, heartbeat_ms, limits, capabilities)| Welcome {
            node_id,
            heartbeat_ms,
            limits,
            capabilities,
        },
    )
}

/// Any valid frame, every kind equally likely.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        welcome().prop_map(Frame::Welcome),
        (refuse_code(), free_text()).prop_map(|(code, message)| Frame::Refused(Refused { code, message })),
        any::<u64>().prop_map(|timestamp_ms| Frame::Ping(Ping { timestamp_ms })),
        any::<u64>().prop_map(|timestamp_ms| Frame::Pong(Pong { timestamp_ms })),
        (stream_id(), service_name(), method(), uri(), headers(), any::<bool>()).prop_map(
            |(stream, service, method, uri, headers, end)| {
                Frame::RequestHead(RequestHead {
                    stream,
                    service,
                    method,
                    uri,
                    headers,
                    end,
                })
            }
        ),
        // `end` with or without a body; a body only ever comes with `end`.
        (
            stream_id(),
            100u16..=599,
            headers(),
            any::<bool>(),
            prop_oneof![Just(Bytes::new()), payload()]
        )
            .prop_map(|(stream, status, headers, end, body)| {
                Frame::ResponseHead(ResponseHead {
                    stream,
                    status,
                    headers,
                    end: end || !body.is_empty(),
                    body,
                })
            }),
        (stream_id(), short_id()).prop_map(|(stream, service)| Frame::StreamOpen(StreamOpen {
            stream,
            service,
            http: false
        })),
        (stream_id(), prop_oneof![Just(String::new()), short_id()]).prop_map(|(stream, service)| {
            Frame::StreamOpen(StreamOpen {
                stream,
                service,
                http: true,
            })
        }),
        (stream_id(), payload()).prop_map(|(stream, bytes)| Frame::Data(Data { stream, bytes })),
        (stream_id(), 1..=u32::MAX).prop_map(|(stream, bytes)| Frame::Credit(Credit { stream, bytes })),
        stream_id().prop_map(|stream| Frame::Fin(Fin { stream })),
        stream_id().prop_map(|stream| Frame::Drain(Drain { stream })),
        (stream_id(), error_code(), free_text()).prop_map(|(stream, code, reason)| Frame::Reset(Reset {
            stream,
            code,
            reason
        })),
        free_text().prop_map(|reason| Frame::GoAway(GoAway { reason })),
    ]
}

fn trace_parent() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        ("[0-9a-f]{32}", "[0-9a-f]{16}", "[0-9a-f]{2}")
            .prop_filter("W3C forbids all-zero ids", |(t, p, _)| t.contains(|c| c != '0')
                && p.contains(|c| c != '0'))
            .prop_map(|(t, p, f)| format!("00-{t}-{p}-{f}")),
    ]
}

fn envelope() -> impl Strategy<Value = BusEnvelope> {
    (
        short_id(),
        short_id(),
        any::<u64>(),
        trace_parent(),
        dns_label(),
        any::<u64>(),
        frame(),
    )
        .prop_map(
            |(from_node, to_node, seq, trace_parent, agent, epoch, frame)| BusEnvelope {
                from_node,
                to_node,
                seq,
                trace_parent,
                agent,
                epoch,
                frame,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn limits() -> Limits {
    Limits::default()
}

/// Encodes through the generic builder, bypassing the `Data` fast path.
fn encode_generic(frame: &Frame) -> Vec<u8> {
    build(1 + frame_words(frame), |msg| write_frame(msg.init_root(), frame))
}

/// A message built field by field, for values the typed frames cannot even express.
fn raw(fill: impl FnOnce(wire::frame::Builder<'_>)) -> Vec<u8> {
    let mut msg = message::Builder::new_default();
    fill(msg.init_root());
    serialize::write_message_to_words(&msg)
}

/// A message whose root is a `BusEnvelope`, built field by field.
fn raw_envelope(fill: impl FnOnce(wire::bus_envelope::Builder<'_>)) -> Vec<u8> {
    let mut msg = message::Builder::new_default();
    fill(msg.init_root());
    serialize::write_message_to_words(&msg)
}

/// Number of segments and total words a serialized message declares.
fn segment_table(bytes: &[u8]) -> (usize, usize) {
    let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
    let count = word(0) + 1;
    (count, (1..=count).map(word).sum())
}

fn stream() -> StreamId {
    StreamId(42)
}

fn good_hello() -> Hello {
    Hello {
        agent: AgentName::new("alpha").unwrap(),
        instance_id: "i-1".into(),
        key_id: "k1".into(),
        timestamp_ms: 1_700_000_000_000,
        nonce: [7; 16],
        signature: [9; 32],
        version: 1,
        capabilities: vec!["terminal".into()],
        services: vec![
            ServiceDecl {
                name: String::new(),
                kind: ServiceKind::Http,
            },
            ServiceDecl {
                name: "ssh".into(),
                kind: ServiceKind::Tcp,
            },
        ],
    }
}

fn good_welcome() -> Welcome {
    Welcome {
        node_id: "node-1".into(),
        heartbeat_ms: 15_000,
        limits: WireLimits {
            max_frame_bytes: 1 << 20,
            max_data_bytes: 256 << 10,
            stream_window: 1 << 20,
            max_streams: 256,
        },
        capabilities: vec!["terminal".into()],
    }
}

fn good_request() -> RequestHead {
    RequestHead {
        stream: stream(),
        service: String::new(),
        method: "GET".into(),
        uri: "/a/b?c=d".into(),
        headers: vec![Header {
            name: "accept".into(),
            value: Bytes::from_static(b"text/html"),
        }],
        end: true,
    }
}

fn good_response() -> ResponseHead {
    ResponseHead {
        stream: stream(),
        status: 200,
        headers: vec![Header {
            name: "content-type".into(),
            value: Bytes::from_static(b"text/plain"),
        }],
        end: false,
        body: Bytes::new(),
    }
}

fn good_envelope() -> BusEnvelope {
    BusEnvelope {
        from_node: "node-a".into(),
        to_node: "node-b".into(),
        seq: 7,
        trace_parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        agent: AgentName::new("alpha").unwrap(),
        epoch: 3,
        frame: Frame::Fin(Fin { stream: stream() }),
    }
}

fn refusal(frame: Frame) -> DecodeError {
    decode(&encode(&frame), &limits()).expect_err("frame should be refused")
}

fn assert_invalid(err: DecodeError, field: &str) {
    match err {
        DecodeError::Invalid { field: f, .. } if f == field => {}
        other => panic!("expected Invalid {{ field: {field:?} }}, got {other:?}"),
    }
}

fn assert_refused(frame: Frame, field: &str) {
    assert_invalid(refusal(frame), field);
}

fn request_with_header(name: &str, value: &[u8]) -> Frame {
    let mut r = good_request();
    r.headers = vec![Header {
        name: name.into(),
        value: Bytes::copy_from_slice(value),
    }];
    Frame::RequestHead(r)
}

fn envelope_refusal(env: BusEnvelope) -> DecodeError {
    decode_envelope(&encode_envelope(&env), &limits()).expect_err("envelope should be refused")
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_round_trip(f in frame()) {
        prop_assert_eq!(decode(&encode(&f), &limits()), Ok(f));
    }

    #[test]
    fn valid_envelopes_round_trip(env in envelope()) {
        prop_assert_eq!(decode_envelope(&encode_envelope(&env), &limits()), Ok(env));
    }

    /// The encoder's up-front size is exact: one segment, no slack and no second allocation.
    #[test]
    fn encode_writes_one_segment_of_the_computed_size(f in frame()) {
        let bytes = encode(&f);
        let (segments, words) = segment_table(&bytes);
        prop_assert_eq!(segments, 1);
        prop_assert_eq!(words, 1 + frame_words(&f));
        prop_assert_eq!(bytes.len(), 8 + 8 * words);
    }

    #[test]
    fn encode_envelope_writes_one_segment(env in envelope()) {
        let (segments, _) = segment_table(&encode_envelope(&env));
        prop_assert_eq!(segments, 1);
    }

    /// The hand-written `Data` encoding is exactly what the generic builder makes, including
    /// the empty payload the decoder refuses.
    #[test]
    fn data_fast_path_matches_builder(stream in any::<u64>(), bytes in vec(any::<u8>(), 0..2100)) {
        let f = Frame::Data(Data { stream: StreamId(stream), bytes: Bytes::from(bytes) });
        prop_assert_eq!(encode(&f), encode_generic(&f));
    }

    /// Same result as `decode`, at every alignment, and a `Data` payload lies inside the input.
    #[test]
    fn decode_bytes_matches_decode_and_shares_payload(f in frame(), pad in 0usize..8) {
        let mut buf = vec![0xAA; pad];
        buf.extend_from_slice(&encode(&f));
        let input = Bytes::from(buf).slice(pad..);
        let copied = decode(&input, &limits());
        let shared = decode_bytes(input.clone(), &limits());
        prop_assert_eq!(&shared, &copied);
        prop_assert_eq!(shared.as_ref(), Ok(&f));
        if let Ok(Frame::Data(d)) = shared {
            let range = input.as_ptr_range();
            prop_assert!(range.start <= d.bytes.as_ptr() && d.bytes.as_ptr_range().end <= range.end);
        }
    }

    #[test]
    fn decode_envelope_bytes_matches_decode_envelope(env in envelope(), pad in 0usize..8) {
        let mut buf = vec![0x55; pad];
        buf.extend_from_slice(&encode_envelope(&env));
        let input = Bytes::from(buf).slice(pad..);
        prop_assert_eq!(decode_envelope_bytes(input.clone(), &limits()), decode_envelope(&input, &limits()));
        prop_assert_eq!(decode_envelope(&input, &limits()), Ok(env));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..1024)) {
        let _ = decode(&bytes, &limits());
        let _ = decode_bytes(Bytes::from(bytes.clone()), &limits());
        let _ = decode_envelope(&bytes, &limits());
    }

    /// Random words behind a plausible one-segment table, so the reader gets past the header and
    /// has to chase garbage pointers.
    #[test]
    fn decode_never_panics_on_garbage_behind_a_valid_segment_table(words in vec(any::<u64>(), 1..128)) {
        let mut bytes = 0u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(words.len() as u32).to_le_bytes());
        for w in &words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let _ = decode(&bytes, &limits());
        let _ = decode_envelope(&bytes, &limits());
    }

    #[test]
    fn truncated_encodings_are_refused(f in frame(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&f);
        let len = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..len], &limits()).is_err());
        prop_assert!(decode_bytes(Bytes::copy_from_slice(&bytes[..len]), &limits()).is_err());
    }

    #[test]
    fn mutated_encodings_never_panic(f in frame(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = encode(&f);
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        if let Ok(g) = decode(&bytes, &limits()) {
            // Whatever was accepted is valid, so it must survive its own round trip.
            prop_assert_eq!(decode(&encode(&g), &limits()), Ok(g));
        }
    }

    #[test]
    fn mutated_envelopes_never_panic(env in envelope(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = encode_envelope(&env);
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        let _ = decode_envelope(&bytes, &limits());
    }
}

/// Every truncation of every frame kind, exhaustively (the property test samples one cut each).
#[test]
fn decode_refuses_truncated_message() {
    let frames = [
        Frame::Hello(good_hello()),
        Frame::Welcome(good_welcome()),
        Frame::RequestHead(good_request()),
        Frame::Data(Data {
            stream: stream(),
            bytes: Bytes::from_static(b"hello"),
        }),
    ];
    for f in frames {
        let bytes = encode(&f);
        for len in 0..bytes.len() {
            assert!(
                matches!(decode(&bytes[..len], &limits()), Err(DecodeError::Malformed(_))),
                "{} cut at {len} was not refused as malformed",
                f.kind()
            );
        }
    }
}

#[test]
fn largest_data_frame_round_trips_under_default_limits() {
    let f = Frame::Data(Data {
        stream: stream(),
        bytes: Bytes::from(vec![0xAB; limits().max_data_bytes]),
    });
    let bytes = encode(&f);
    assert_eq!(bytes.len(), 8 + 8 * 5 + limits().max_data_bytes);
    assert_eq!(decode_bytes(Bytes::from(bytes), &limits()), Ok(f));
}

#[test]
fn deepest_valid_message_fits_the_nesting_limit() {
    let env = BusEnvelope {
        frame: Frame::Hello(good_hello()),
        ..good_envelope()
    };
    assert_eq!(decode_envelope(&encode_envelope(&env), &limits()), Ok(env));
}

#[test]
fn decode_accepts_asterisk_uri() {
    let f = Frame::RequestHead(RequestHead {
        method: "OPTIONS".into(),
        uri: "*".into(),
        ..good_request()
    });
    assert_eq!(decode(&encode(&f), &limits()), Ok(f));
}

#[test]
fn decode_accepts_header_value_with_tab_and_high_bytes() {
    let f = request_with_header("x-note", b"a\tb \x80\xff~");
    assert_eq!(decode(&encode(&f), &limits()), Ok(f));
}

/// A null `Frame.ping` pointer is the default `Ping`, as Cap'n Proto defines; it is accepted and
/// re-encodes to the same value.
#[test]
fn decode_reads_null_member_as_default() {
    let mut bytes = encode(&Frame::Ping(Ping { timestamp_ms: 5 }));
    // Segment table (8), root pointer (8), Frame data (8), then the Frame.ping pointer.
    bytes[24..32].fill(0);
    assert_eq!(decode(&bytes, &limits()), Ok(Frame::Ping(Ping { timestamp_ms: 0 })));
}

// ---------------------------------------------------------------------------------------------
// Refusals: message level
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_refuses_oversized_frame() {
    let f = Frame::Data(Data {
        stream: stream(),
        bytes: Bytes::from(vec![1; 2000]),
    });
    let bytes = encode(&f);
    let small = Limits {
        max_frame_bytes: 1000,
        ..limits()
    };
    assert_eq!(
        decode(&bytes, &small),
        Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: 1000
        })
    );
    assert_eq!(
        decode_bytes(Bytes::from(bytes.clone()), &small),
        Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: 1000
        })
    );
    assert!(matches!(
        decode_envelope(&bytes, &small),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn decode_refuses_empty_input() {
    assert!(matches!(decode(&[], &limits()), Err(DecodeError::Malformed(_))));
}

#[test]
fn decode_refuses_trailing_bytes() {
    let mut bytes = encode(&Frame::Ping(Ping { timestamp_ms: 1 }));
    bytes.extend_from_slice(&[0; 8]);
    assert!(matches!(decode(&bytes, &limits()), Err(DecodeError::Malformed(_))));
}

#[test]
fn decode_refuses_unknown_frame_kind() {
    let mut bytes = encode(&Frame::Ping(Ping { timestamp_ms: 1 }));
    // Segment table (8), root pointer (8), then the Frame data word whose first u16 is the
    // discriminant: 14 is one past `drain`.
    bytes[16..18].copy_from_slice(&14u16.to_le_bytes());
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "frame");
}

/// A zero-sized struct list may claim a million elements in two words; the traversal limit
/// (derived from `max_frame_bytes`) refuses it before anything iterates over it.
#[test]
fn decode_refuses_amplified_empty_struct_list() {
    let words: [u64; 7] = [
        struct_pointer(0, 1, 1), // root -> Frame
        6,                       // discriminant: responseHead
        struct_pointer(0, 2, 1), // Frame.responseHead -> ResponseHead
        1,                       // stream
        200,                     // status
        1 | (7 << 32),           // headers: inline-composite list of 0 words
        (1 << 20) << 2,          // tag: 2^20 elements of 0 data words, 0 pointers
    ];
    let mut bytes = 0u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&(words.len() as u32).to_le_bytes());
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    assert!(
        matches!(decode(&bytes, &limits()), Err(DecodeError::Malformed(_))),
        "{:?}",
        decode(&bytes, &limits())
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: stream frames
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_refuses_zero_stream_id() {
    let zero = StreamId(0);
    assert_refused(
        Frame::RequestHead(RequestHead {
            stream: zero,
            ..good_request()
        }),
        "request_head.stream",
    );
    assert_refused(
        Frame::ResponseHead(ResponseHead {
            stream: zero,
            ..good_response()
        }),
        "response_head.stream",
    );
    assert_refused(
        Frame::StreamOpen(StreamOpen {
            stream: zero,
            service: "ssh".into(),
            http: false,
        }),
        "stream_open.stream",
    );
    assert_refused(
        Frame::Data(Data {
            stream: zero,
            bytes: Bytes::from_static(b"x"),
        }),
        "data.stream",
    );
    assert_refused(Frame::Credit(Credit { stream: zero, bytes: 1 }), "credit.stream");
    assert_refused(Frame::Fin(Fin { stream: zero }), "fin.stream");
    assert_refused(Frame::Drain(Drain { stream: zero }), "drain.stream");
    assert_refused(
        Frame::Reset(Reset {
            stream: zero,
            code: ErrorCode::Reset,
            reason: String::new(),
        }),
        "reset.stream",
    );
}

#[test]
fn decode_refuses_unknown_error_code() {
    let bytes = raw(|f| {
        let mut r = f.init_reset();
        r.set_stream(1);
        r.set_code(ErrorCode::ALL.len() as u16);
    });
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "reset.code");
}

#[test]
fn decode_refuses_overlong_reset_reason() {
    let reason = "r".repeat(limits().max_text_bytes + 1);
    assert_refused(
        Frame::Reset(Reset {
            stream: stream(),
            code: ErrorCode::Timeout,
            reason,
        }),
        "reset.reason",
    );
}

#[test]
fn decode_refuses_invalid_utf8_text() {
    let bytes = raw(|f| {
        let mut r = f.init_reset();
        r.set_stream(1);
        r.set_reason(capnp::text::Reader::from(&b"bad \xff\xfe"[..]));
    });
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "reset.reason");
}

#[test]
fn decode_refuses_empty_data() {
    assert_refused(
        Frame::Data(Data {
            stream: stream(),
            bytes: Bytes::new(),
        }),
        "data.bytes",
    );
}

#[test]
fn decode_refuses_oversized_data() {
    let bytes = Bytes::from(vec![0; limits().max_data_bytes + 1]);
    assert_refused(
        Frame::Data(Data {
            stream: stream(),
            bytes,
        }),
        "data.bytes",
    );
}

#[test]
fn decode_refuses_a_response_body_without_end() {
    assert_refused(
        Frame::ResponseHead(ResponseHead {
            end: false,
            body: Bytes::from_static(b"partial"),
            ..good_response()
        }),
        "response_head.body",
    );
}

#[test]
fn decode_refuses_an_oversized_response_body() {
    assert_refused(
        Frame::ResponseHead(ResponseHead {
            end: true,
            body: Bytes::from(vec![0; limits().max_data_bytes + 1]),
            ..good_response()
        }),
        "response_head.body",
    );
}

#[test]
fn whole_response_and_bodiless_request_round_trip() {
    let whole = Frame::ResponseHead(ResponseHead {
        end: true,
        body: Bytes::from_static(b"hello"),
        ..good_response()
    });
    assert_eq!(decode(&encode(&whole), &limits()).unwrap(), whole);
    let req = Frame::RequestHead(good_request());
    assert!(matches!(decode(&encode(&req), &limits()).unwrap(), Frame::RequestHead(r) if r.end));
}

#[test]
fn decode_refuses_zero_credit() {
    assert_refused(
        Frame::Credit(Credit {
            stream: stream(),
            bytes: 0,
        }),
        "credit.bytes",
    );
}

#[test]
fn decode_refuses_stream_open_without_service() {
    assert_refused(
        Frame::StreamOpen(StreamOpen {
            stream: stream(),
            service: String::new(),
            http: false,
        }),
        "stream_open.service",
    );
    for http in [false, true] {
        assert_refused(
            Frame::StreamOpen(StreamOpen {
                stream: stream(),
                service: "a b".into(),
                http,
            }),
            "stream_open.service",
        );
    }
}

/// The default HTTP service has no name, so an HTTP connection to it is opened with `""`.
#[test]
fn an_http_stream_open_may_name_the_default_service() {
    let open = Frame::StreamOpen(StreamOpen {
        stream: stream(),
        service: String::new(),
        http: true,
    });
    assert_eq!(decode(&encode(&open), &limits()), Ok(open));
}

#[test]
fn decode_refuses_overlong_go_away_reason() {
    let reason = "g".repeat(limits().max_text_bytes + 1);
    assert_refused(Frame::GoAway(GoAway { reason }), "go_away.reason");
}

// ---------------------------------------------------------------------------------------------
// Refusals: HTTP heads
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_refuses_header_value_with_newline() {
    assert_refused(request_with_header("x-a", b"a\nb"), "header.value");
}

#[test]
fn decode_refuses_header_value_with_carriage_return() {
    assert_refused(request_with_header("x-a", b"a\rb"), "header.value");
}

#[test]
fn decode_refuses_header_value_with_nul() {
    assert_refused(request_with_header("x-a", b"a\0b"), "header.value");
}

#[test]
fn decode_refuses_header_value_with_control_character() {
    assert_refused(request_with_header("x-a", b"a\x1bb"), "header.value");
    assert_refused(request_with_header("x-a", b"a\x7fb"), "header.value");
}

#[test]
fn decode_refuses_uppercase_header_name() {
    assert_refused(request_with_header("Content-Type", b"x"), "header.name");
}

#[test]
fn decode_refuses_empty_header_name() {
    assert_refused(request_with_header("", b"x"), "header.name");
}

#[test]
fn decode_refuses_header_name_with_separator() {
    assert_refused(request_with_header("x:y", b"x"), "header.name");
    assert_refused(request_with_header("x y", b"x"), "header.name");
}

#[test]
fn decode_refuses_too_many_headers() {
    let mut r = good_request();
    r.headers = vec![
        Header {
            name: "x".into(),
            value: Bytes::from_static(b"y")
        };
        limits().max_headers + 1
    ];
    assert_refused(Frame::RequestHead(r), "headers");
}

#[test]
fn decode_refuses_oversized_headers() {
    let mut r = good_response();
    let value = Bytes::from(vec![b'v'; limits().max_header_bytes / 2]);
    r.headers = vec![
        Header {
            name: "a".into(),
            value: value.clone(),
        },
        Header {
            name: "b".into(),
            value,
        },
    ];
    assert_refused(Frame::ResponseHead(r), "headers");
}

#[test]
fn decode_refuses_empty_method() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            method: String::new(),
            ..good_request()
        }),
        "request_head.method",
    );
}

#[test]
fn decode_refuses_overlong_method() {
    let method = "M".repeat(MAX_METHOD_BYTES + 1);
    assert_refused(
        Frame::RequestHead(RequestHead {
            method,
            ..good_request()
        }),
        "request_head.method",
    );
}

#[test]
fn decode_refuses_method_with_space() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            method: "GE T".into(),
            ..good_request()
        }),
        "request_head.method",
    );
}

#[test]
fn decode_refuses_empty_uri() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            uri: String::new(),
            ..good_request()
        }),
        "request_head.uri",
    );
}

#[test]
fn decode_refuses_absolute_form_uri() {
    let uri = "http://example.com/".to_owned();
    assert_refused(
        Frame::RequestHead(RequestHead { uri, ..good_request() }),
        "request_head.uri",
    );
}

#[test]
fn decode_refuses_uri_with_space() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            uri: "/a b".into(),
            ..good_request()
        }),
        "request_head.uri",
    );
}

#[test]
fn decode_refuses_uri_with_non_ascii() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            uri: "/caf\u{e9}".into(),
            ..good_request()
        }),
        "request_head.uri",
    );
}

#[test]
fn decode_refuses_overlong_uri() {
    let uri = format!("/{}", "a".repeat(limits().max_uri_bytes));
    assert_refused(
        Frame::RequestHead(RequestHead { uri, ..good_request() }),
        "request_head.uri",
    );
}

#[test]
fn decode_refuses_bad_request_service_name() {
    assert_refused(
        Frame::RequestHead(RequestHead {
            service: "a/b".into(),
            ..good_request()
        }),
        "request_head.service",
    );
}

#[test]
fn decode_refuses_status_out_of_range() {
    assert_refused(
        Frame::ResponseHead(ResponseHead {
            status: 99,
            ..good_response()
        }),
        "response_head.status",
    );
    assert_refused(
        Frame::ResponseHead(ResponseHead {
            status: 600,
            ..good_response()
        }),
        "response_head.status",
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: handshake
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_refuses_bad_agent_name() {
    let bytes = raw(|f| f.init_hello().set_agent("Alpha"));
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "hello.agent");
}

#[test]
fn decode_refuses_bad_instance_id() {
    assert_refused(
        Frame::Hello(Hello {
            instance_id: "i 1".into(),
            ..good_hello()
        }),
        "hello.instance_id",
    );
    assert_refused(
        Frame::Hello(Hello {
            instance_id: String::new(),
            ..good_hello()
        }),
        "hello.instance_id",
    );
}

#[test]
fn decode_refuses_bad_key_id() {
    assert_refused(
        Frame::Hello(Hello {
            key_id: "k".repeat(65),
            ..good_hello()
        }),
        "hello.key_id",
    );
}

#[test]
fn decode_refuses_short_nonce() {
    let bytes = raw(|f| {
        let mut h = f.init_hello();
        h.set_agent("alpha");
        h.set_instance_id("i");
        h.set_key_id("k");
        h.set_nonce(&[1; 15]);
        h.set_signature(&[1; 32]);
    });
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "hello.nonce");
}

#[test]
fn decode_refuses_long_signature() {
    let bytes = raw(|f| {
        let mut h = f.init_hello();
        h.set_agent("alpha");
        h.set_instance_id("i");
        h.set_key_id("k");
        h.set_nonce(&[1; 16]);
        h.set_signature(&[1; 33]);
    });
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "hello.signature");
}

#[test]
fn decode_refuses_too_many_capabilities() {
    let capabilities = (0..=MAX_CAPABILITIES).map(|i| format!("c{i}")).collect();
    assert_refused(
        Frame::Hello(Hello {
            capabilities,
            ..good_hello()
        }),
        "hello.capabilities",
    );
}

#[test]
fn decode_refuses_bad_capability() {
    let capabilities = vec!["ok".into(), "not ok".into()];
    assert_refused(
        Frame::Hello(Hello {
            capabilities,
            ..good_hello()
        }),
        "hello.capabilities",
    );
}

#[test]
fn decode_refuses_too_many_services() {
    let services = (0..=MAX_SERVICES)
        .map(|i| ServiceDecl {
            name: format!("s{i}"),
            kind: ServiceKind::Tcp,
        })
        .collect();
    assert_refused(
        Frame::Hello(Hello {
            services,
            ..good_hello()
        }),
        "hello.services",
    );
}

#[test]
fn decode_refuses_duplicate_service_names() {
    let services = vec![
        ServiceDecl {
            name: "web".into(),
            kind: ServiceKind::Http,
        },
        ServiceDecl {
            name: "web".into(),
            kind: ServiceKind::Tcp,
        },
    ];
    assert_refused(
        Frame::Hello(Hello {
            services,
            ..good_hello()
        }),
        "hello.services",
    );
}

#[test]
fn decode_refuses_bad_service_name() {
    let services = vec![ServiceDecl {
        name: "we b".into(),
        kind: ServiceKind::Http,
    }];
    assert_refused(
        Frame::Hello(Hello {
            services,
            ..good_hello()
        }),
        "hello.services.name",
    );
}

#[test]
fn decode_refuses_unknown_service_kind() {
    let bytes = raw(|f| {
        let mut h = f.init_hello();
        h.set_agent("alpha");
        h.set_instance_id("i");
        h.set_key_id("k");
        h.set_nonce(&[1; 16]);
        h.set_signature(&[1; 32]);
        let mut s = h.init_services(1).get(0);
        s.set_name("x");
        s.set_kind(7);
    });
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "hello.services.kind");
}

#[test]
fn decode_refuses_empty_node_id() {
    assert_refused(
        Frame::Welcome(Welcome {
            node_id: String::new(),
            ..good_welcome()
        }),
        "welcome.node_id",
    );
}

#[test]
fn decode_refuses_zero_heartbeat() {
    assert_refused(
        Frame::Welcome(Welcome {
            heartbeat_ms: 0,
            ..good_welcome()
        }),
        "welcome.heartbeat_ms",
    );
}

#[test]
fn decode_refuses_zero_limit() {
    let base = good_welcome().limits;
    let cases = [
        (
            WireLimits {
                max_frame_bytes: 0,
                ..base
            },
            "welcome.limits.max_frame_bytes",
        ),
        (
            WireLimits {
                max_data_bytes: 0,
                ..base
            },
            "welcome.limits.max_data_bytes",
        ),
        (
            WireLimits {
                stream_window: 0,
                ..base
            },
            "welcome.limits.stream_window",
        ),
        (WireLimits { max_streams: 0, ..base }, "welcome.limits.max_streams"),
    ];
    for (limits, field) in cases {
        assert_refused(
            Frame::Welcome(Welcome {
                limits,
                ..good_welcome()
            }),
            field,
        );
    }
}

#[test]
fn decode_refuses_data_limit_above_frame_limit() {
    let limits = WireLimits {
        max_frame_bytes: 1000,
        max_data_bytes: 1001,
        ..good_welcome().limits
    };
    assert_refused(
        Frame::Welcome(Welcome {
            limits,
            ..good_welcome()
        }),
        "welcome.limits.max_data_bytes",
    );
}

#[test]
fn decode_refuses_unknown_refuse_code() {
    let bytes = raw(|f| f.init_refused().set_code(RefuseCode::ALL.len() as u16));
    assert_invalid(decode(&bytes, &limits()).unwrap_err(), "refused.code");
}

#[test]
fn decode_refuses_overlong_refused_message() {
    let message = "m".repeat(limits().max_text_bytes + 1);
    assert_refused(
        Frame::Refused(Refused {
            code: RefuseCode::Replay,
            message,
        }),
        "refused.message",
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: bus envelopes
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_envelope_refuses_bad_node_ids() {
    assert_invalid(
        envelope_refusal(BusEnvelope {
            from_node: String::new(),
            ..good_envelope()
        }),
        "envelope.from_node",
    );
    assert_invalid(
        envelope_refusal(BusEnvelope {
            to_node: "b/c".into(),
            ..good_envelope()
        }),
        "envelope.to_node",
    );
}

#[test]
fn decode_envelope_refuses_bad_trace_parent() {
    let good = good_envelope().trace_parent;
    let bad = [
        good.to_uppercase(),
        good.replacen("00-", "01-", 1),
        good[..54].to_owned(),
        format!("{good}0"),
        good.replace('-', "_"),
        format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
        format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", "0".repeat(16)),
    ];
    for trace_parent in bad {
        let err = envelope_refusal(BusEnvelope {
            trace_parent: trace_parent.clone(),
            ..good_envelope()
        });
        assert_invalid(err, "envelope.trace_parent");
    }
}

#[test]
fn decode_envelope_refuses_bad_agent() {
    let bytes = raw_envelope(|mut e| {
        e.set_from_node("a");
        e.set_to_node("b");
        e.set_agent("-alpha");
        e.init_frame().init_fin().set_stream(1);
    });
    assert_invalid(decode_envelope(&bytes, &limits()).unwrap_err(), "envelope.agent");
}

#[test]
fn decode_envelope_refuses_missing_frame() {
    let bytes = raw_envelope(|mut e| {
        e.set_from_node("a");
        e.set_to_node("b");
        e.set_agent("alpha");
    });
    assert_invalid(decode_envelope(&bytes, &limits()).unwrap_err(), "envelope.frame");
}

#[test]
fn decode_envelope_refuses_invalid_inner_frame() {
    let env = BusEnvelope {
        frame: Frame::Fin(Fin { stream: StreamId(0) }),
        ..good_envelope()
    };
    assert_invalid(envelope_refusal(env), "fin.stream");
}

#[test]
fn decode_envelope_refuses_oversized_envelope() {
    let bytes = encode_envelope(&good_envelope());
    let small = Limits {
        max_frame_bytes: bytes.len() - 1,
        ..limits()
    };
    assert_eq!(
        decode_envelope(&bytes, &small),
        Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: bytes.len() - 1
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds
// ---------------------------------------------------------------------------------------------

/// One valid frame of every kind, and envelopes around a few: the starting corpus for
/// `schema/fuzz`, which mutates valid pointers and texts far sooner than it would invent them.
fn seed_messages() -> Vec<(String, Vec<u8>)> {
    let frames = [
        Frame::Hello(good_hello()),
        Frame::Welcome(good_welcome()),
        Frame::Refused(Refused {
            code: RefuseCode::ClockSkew,
            message: "clock is 40 s ahead".into(),
        }),
        Frame::Ping(Ping {
            timestamp_ms: 1_700_000_000_000,
        }),
        Frame::Pong(Pong {
            timestamp_ms: 1_700_000_000_000,
        }),
        Frame::RequestHead(good_request()),
        Frame::ResponseHead(good_response()),
        Frame::StreamOpen(StreamOpen {
            stream: stream(),
            service: "ssh".into(),
            http: false,
        }),
        Frame::Data(Data {
            stream: stream(),
            bytes: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
        }),
        Frame::Credit(Credit {
            stream: stream(),
            bytes: 65536,
        }),
        Frame::Fin(Fin { stream: stream() }),
        Frame::Drain(Drain { stream: stream() }),
        Frame::Reset(Reset {
            stream: stream(),
            code: ErrorCode::Timeout,
            reason: "no head in 30 s".into(),
        }),
        Frame::GoAway(GoAway {
            reason: "draining".into(),
        }),
    ];
    let mut out: Vec<_> = frames
        .iter()
        .map(|f| (format!("frame-{}", f.kind()), encode(f)))
        .collect();
    for f in [&frames[0], &frames[5], &frames[8]] {
        let env = BusEnvelope {
            frame: f.clone(),
            ..good_envelope()
        };
        out.push((format!("envelope-{}", f.kind()), encode_envelope(&env)));
    }
    out
}

/// The committed seeds in `schema/fuzz/seeds` must still be valid messages, or the fuzzer starts
/// from junk after a schema change. `STRAIT_BLESS_FUZZ_SEEDS=1` rewrites them.
#[test]
fn fuzz_seeds_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("seeds");
    let bless = std::env::var_os("STRAIT_BLESS_FUZZ_SEEDS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seed_messages() {
        assert!(
            decode(&bytes, &limits()).is_ok() || decode_envelope(&bytes, &limits()).is_ok(),
            "{name}"
        );
        let path = dir.join(&name);
        if bless {
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == bytes,
                "{name} is stale; rerun with STRAIT_BLESS_FUZZ_SEEDS=1"
            );
        }
    }
}
