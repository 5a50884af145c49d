//! Feeds arbitrary bytes to every decoder. Nothing may panic, and whatever is accepted must
//! survive its own round trip (encode, then decode again to an equal value), with the zero-copy
//! decoders agreeing with the copying ones.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strait_schema::{
    decode, decode_bytes, decode_envelope, decode_envelope_bytes, encode, encode_envelope, Limits,
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    // Re-encoding may take a few words more than a hand-made input (an empty text is one word,
    // a null pointer none), so the second decode must not trip over the size limit.
    let relaxed = Limits {
        max_frame_bytes: usize::MAX,
        ..limits
    };

    let frame = decode(data, &limits);
    assert_eq!(decode_bytes(Bytes::copy_from_slice(data), &limits), frame);
    if let Ok(frame) = frame {
        assert_eq!(decode(&encode(&frame), &relaxed), Ok(frame));
    }

    let env = decode_envelope(data, &limits);
    assert_eq!(
        decode_envelope_bytes(Bytes::copy_from_slice(data), &limits),
        env
    );
    if let Ok(env) = env {
        assert_eq!(decode_envelope(&encode_envelope(&env), &relaxed), Ok(env));
    }
});
