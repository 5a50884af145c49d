//! How much a relay reads from a socket at a time, shared by both ends' byte pumps.
//!
//! A read sized for a whole `Data` frame (256 KiB) took a fresh allocation for every small
//! message: the buffer's previous chunk was still queued for the WebSocket writer, so the rest of
//! its allocation could not be reused. Reads start small and several share one [`READ_SLAB`];
//! while reads come back full the size doubles, so bulk transfers still reach a whole frame
//! within a few reads (docs/benchmarks.md, twenty-fourth round).

use std::io;
use std::pin::Pin;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncRead;

/// The first read, and the smallest.
pub const SMALL_READ: usize = 16 << 10;

/// What a read buffer allocates at least, for several small reads in turn.
pub const READ_SLAB: usize = 64 << 10;

/// The size of the next read from one socket.
#[derive(Debug, Clone)]
pub struct ReadSize {
    next: usize,
    max: usize,
}

impl ReadSize {
    /// Reads of at most `max` bytes (a `Data` frame's payload).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        ReadSize {
            next: SMALL_READ.min(max),
            max,
        }
    }

    /// How much to read next.
    pub fn next(&self) -> usize {
        self.next
    }

    /// One read from `rd`, appended to `buf`: at most the next read size and at most `limit`
    /// (the stream's credit, where the caller holds it), then sizes the read after it. Returns
    /// the bytes read, 0 at end of stream (or for a zero `limit`).
    pub async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        limit: usize,
    ) -> io::Result<usize> {
        let asked = self.reserve(buf).min(limit);
        let mut room = (&mut *buf).limit(asked);
        let got = std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *rd), cx, &mut room)).await?;
        self.read(asked, got);
        Ok(got)
    }

    /// Makes room in `buf` for the next read, in a new [`READ_SLAB`] when the current one is
    /// used up; returns how much to read.
    fn reserve(&self, buf: &mut BytesMut) -> usize {
        if buf.capacity() - buf.len() < self.next {
            buf.reserve(self.next.max(READ_SLAB));
        }
        self.next
    }

    /// A read of at most `asked` bytes returned `got`: a full one doubles the next, a nearly
    /// empty one halves it.
    fn read(&mut self, asked: usize, got: usize) {
        if got >= asked {
            self.next = (self.next * 2).min(self.max);
        } else if got <= self.next / 4 {
            self.next = (self.next / 2).max(SMALL_READ.min(self.max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_to_a_frame_for_bulk_and_falls_back_for_small_messages() {
        let mut s = ReadSize::new(256 << 10);
        assert_eq!(s.next(), SMALL_READ);
        let mut reads = 0;
        while s.next() < 256 << 10 {
            let n = s.next();
            s.read(n, n);
            reads += 1;
        }
        assert_eq!(reads, 4, "16 -> 32 -> 64 -> 128 -> 256 KiB");
        s.read(256 << 10, 256 << 10);
        assert_eq!(s.next(), 256 << 10, "never past a frame");
        // Half full keeps the size; nearly empty reads bring it down to the smallest.
        s.read(256 << 10, 128 << 10);
        assert_eq!(s.next(), 256 << 10);
        for _ in 0..10 {
            s.read(s.next(), 300);
        }
        assert_eq!(s.next(), SMALL_READ);
        // Less credit than the size: a full read still counts as full.
        s.read(1000, 1000);
        assert_eq!(s.next(), 2 * SMALL_READ);
        // A frame limit below the first read.
        let mut tiny = ReadSize::new(4096);
        assert_eq!(tiny.next(), 4096);
        tiny.read(4096, 10);
        tiny.read(4096, 4096);
        assert_eq!(tiny.next(), 4096);
    }

    /// A read takes no more than the size or the limit, appends to what the buffer holds, and
    /// grows the next one only when it came back full.
    #[tokio::test]
    async fn read_from_keeps_to_the_size_and_the_limit() {
        let data = vec![5u8; 100 << 10];
        let mut rd = &data[..];
        let mut buf = BytesMut::from(&b"kept"[..]);
        let mut s = ReadSize::new(256 << 10);
        assert_eq!(s.read_from(&mut rd, &mut buf, usize::MAX).await.unwrap(), SMALL_READ);
        assert_eq!(&buf[..4], b"kept");
        assert_eq!(s.next(), 2 * SMALL_READ, "a full read doubles the next");
        assert_eq!(
            s.read_from(&mut rd, &mut buf, 1000).await.unwrap(),
            1000,
            "the credit caps it"
        );
        assert_eq!(s.next(), 4 * SMALL_READ);
        assert_eq!(
            s.read_from(&mut rd, &mut buf, usize::MAX).await.unwrap(),
            4 * SMALL_READ
        );
        let rest = (100 << 10) - 5 * SMALL_READ - 1000;
        assert_eq!(s.read_from(&mut rd, &mut buf, usize::MAX).await.unwrap(), rest);
        assert_eq!(s.next(), 4 * SMALL_READ, "a read under a quarter full halves the next");
        assert_eq!(buf.len(), 4 + (100 << 10));
        assert_eq!(
            s.read_from(&mut rd, &mut buf, usize::MAX).await.unwrap(),
            0,
            "end of stream"
        );
    }

    #[test]
    fn small_reads_share_one_allocation() {
        let s = ReadSize::new(256 << 10);
        let mut buf = BytesMut::new();
        let mut chunks = Vec::new();
        let mut first = None;
        for _ in 0..3 {
            let n = s.reserve(&mut buf);
            assert!(buf.capacity() - buf.len() >= n);
            buf.extend_from_slice(&[7u8; 300]);
            let chunk = buf.split().freeze();
            // Every chunk stays alive (queued for the writer), yet they sit in one allocation.
            let at = chunk.as_ptr() as usize;
            let start = *first.get_or_insert(at);
            assert!(at >= start && at < start + READ_SLAB, "a new allocation per read");
            chunks.push(chunk);
        }
    }
}
