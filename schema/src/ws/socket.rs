//! [`SocketReader`]: [`Reader`] over a socket of one's own, for both ends of the agent
//! connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncRead;

use super::{Message, Reader, Role};

/// A buffer emptied by a message larger than this is let go, so a peer that moved a bulk
/// transfer and went quiet leaves no frame-sized allocation behind (the idle-agent memory
/// target, docs/benchmarks.md).
const KEEP_EMPTY_BUFFER: usize = 64 * 1024;

/// Reads whole messages straight from the socket into the buffer they are handed on in: one
/// copy (the kernel's) per payload byte, unmasked in place while still in the cache, and reads
/// as large as the frame in progress. Cancel-safe: everything read is kept in `self`.
///
/// Errors are `io::Error`s: `InvalidData` wraps the [`crate::DecodeError`] of a frame that
/// breaks RFC 6455 or the size limit, `UnexpectedEof` is a peer that hung up mid-frame.
#[derive(Debug)]
pub struct SocketReader<R> {
    io: R,
    buf: BytesMut,
    frames: Reader,
    /// The least a read asks the socket for.
    read_size: usize,
}

impl<R: AsyncRead + Unpin> SocketReader<R> {
    /// Reads as `role`, refusing messages over `max_message` bytes. `read_ahead` holds bytes
    /// already taken off the socket (after an HTTP upgrade); `read_size` is the least each read
    /// asks for (and, once the first read is done, what an idle reader holds).
    pub fn new(io: R, role: Role, max_message: usize, read_ahead: BytesMut, read_size: usize) -> Self {
        SocketReader {
            io,
            buf: read_ahead,
            frames: Reader::new(role, max_message),
            read_size,
        }
    }

    /// Changes the message limit (the agent learns the gateway's from `Welcome`).
    pub fn set_max_message(&mut self, max_message: usize) {
        self.frames.set_max_message(max_message);
    }

    /// The next message; `None` when the peer closed the connection between messages.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Message>>> {
        loop {
            match self.frames.next(&mut self.buf) {
                Ok(Some(m)) => {
                    let large = matches!(&m, Message::Binary(b) if b.len() > KEEP_EMPTY_BUFFER);
                    if large && self.buf.is_empty() {
                        // Its allocation is the message's: share it no longer.
                        self.buf = BytesMut::new();
                    }
                    return Poll::Ready(Ok(Some(m)));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
            }
            if self.buf.capacity() - self.buf.len() < self.read_size / 8 {
                self.buf.reserve(self.read_size);
            }
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))?;
            if n == 0 {
                return Poll::Ready(if self.buf.is_empty() && !self.frames.mid_message() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection mid-frame",
                    ))
                });
            }
        }
    }

    /// [`SocketReader::poll_message`] as a future.
    pub async fn next_message(&mut self) -> io::Result<Option<Message>> {
        poll_fn(|cx| self.poll_message(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{put_frame, Kind};
    use crate::DecodeError;
    use bytes::Bytes;
    use tokio::io::{duplex, AsyncWriteExt};

    /// Messages come back whole however the socket cuts their bytes, including bytes read ahead
    /// of the reader, and a peer that hangs up mid-frame is an `UnexpectedEof`, not a clean end.
    #[tokio::test]
    async fn reads_what_the_socket_delivers_and_refuses_a_cut_frame() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Binary, b"early", Some([9, 8, 7, 6]));
        put_frame(&mut wire, Kind::Binary, &[7u8; 70_000], Some([1, 2, 3, 4]));
        put_frame(&mut wire, Kind::Ping, b"hi", Some([5, 6, 7, 8]));
        let ahead = wire.split_to(4);
        let whole = wire.to_vec();
        let (mut tx, rx) = duplex(1024);
        let writer = tokio::spawn(async move {
            for piece in whole.chunks(333) {
                tx.write_all(piece).await.unwrap();
            }
            tx.write_all(&[0x82, 0x8a, 1, 2, 3, 4, 5]).await.unwrap(); // a frame cut short
        });
        let mut r = SocketReader::new(rx, Role::Server, 1 << 20, ahead, 4096);
        assert_eq!(
            r.next_message().await.unwrap(),
            Some(Message::Binary(Bytes::from_static(b"early")))
        );
        assert_eq!(
            r.next_message().await.unwrap(),
            Some(Message::Binary(Bytes::from(vec![7u8; 70_000])))
        );
        assert_eq!(
            r.next_message().await.unwrap(),
            Some(Message::Ping(Bytes::from_static(b"hi")))
        );
        writer.await.unwrap();
        let e = r.next_message().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    /// A peer that closes between messages ends them cleanly.
    #[tokio::test]
    async fn a_close_between_messages_is_the_end() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Binary, b"last", None);
        let mut r = SocketReader::new(&wire[..], Role::Client, 1 << 20, BytesMut::new(), 4096);
        assert_eq!(
            r.next_message().await.unwrap(),
            Some(Message::Binary(Bytes::from_static(b"last")))
        );
        assert_eq!(r.next_message().await.unwrap(), None);
    }

    /// A frame masked the wrong way is `InvalidData` carrying the decoder's reason.
    #[tokio::test]
    async fn a_frame_masked_the_wrong_way_is_invalid_data() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Binary, b"abc", Some([1, 2, 3, 4]));
        let mut r = SocketReader::new(&wire[..], Role::Client, 1 << 20, BytesMut::new(), 4096);
        let e = r.next_message().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<DecodeError>());
        assert!(
            inner.is_some_and(|d| d.to_string().contains("masked frame from a server")),
            "{e}"
        );
    }

    /// The allocation a large message was read into is not kept once the buffer is empty.
    #[tokio::test]
    async fn an_emptied_large_buffer_is_let_go() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Binary, &[1u8; 200_000], Some([1, 2, 3, 4]));
        let mut r = SocketReader::new(&wire[..], Role::Server, 1 << 20, BytesMut::new(), 4096);
        let Some(Message::Binary(b)) = r.next_message().await.unwrap() else {
            panic!("no message")
        };
        assert_eq!(b.len(), 200_000);
        assert!(b.is_unique(), "the reader still shares the message's allocation");
    }
}
