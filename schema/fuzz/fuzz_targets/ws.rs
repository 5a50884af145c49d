//! Feeds arbitrary bytes, cut into reads of arbitrary sizes, to the WebSocket reader in both
//! roles. Nothing may panic, the reader must hold no more than one message's bytes past its
//! limit, and a binary message it accepts must read back the same once written again.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strait_schema::ws::{put_frame, Kind, Message, Reader, Role};

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    for role in [Role::Client, Role::Server] {
        let mut reader = Reader::new(role, MAX_MESSAGE);
        let mut buf = BytesMut::new();
        'feed: for chunk in wire.chunks(piece) {
            buf.extend_from_slice(chunk);
            loop {
                match reader.next(&mut buf) {
                    Ok(Some(Message::Binary(b))) => {
                        assert!(b.len() <= MAX_MESSAGE);
                        let mask = (role == Role::Server).then_some([7, 1, 2, 9]);
                        let mut again = BytesMut::new();
                        put_frame(&mut again, Kind::Binary, &b, mask);
                        let mut back = Reader::new(role, MAX_MESSAGE);
                        assert_eq!(back.next(&mut again), Ok(Some(Message::Binary(b))));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
