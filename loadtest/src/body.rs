//! One body type for both sides of every HTTP scenario: empty, a small fixed payload, or N bytes
//! streamed from one shared buffer. Nothing is allocated per request beyond a refcount, so the
//! load generator and backend spend their (shared) cores on the exchange, not on making bytes.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Size of the chunks a [`BenchBody::Repeat`] yields: one tunnel `Data` frame's worth.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The shared chunk every streamed body slices from.
fn chunk() -> &'static Bytes {
    static CHUNK: OnceLock<Bytes> = OnceLock::new();
    CHUNK.get_or_init(|| Bytes::from((0..CHUNK_BYTES).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
}

/// A request or response body with an exact length known up front (so it is sent with
/// `content-length`, the common case for the traffic a tunnel carries).
#[derive(Debug)]
pub enum BenchBody {
    /// No body.
    Empty,
    /// One chunk, sent whole.
    Full(Option<Bytes>),
    /// `remaining` bytes, in [`CHUNK_BYTES`] chunks.
    Repeat {
        /// Bytes still to yield.
        remaining: u64,
    },
}

impl BenchBody {
    /// A body of `len` bytes.
    pub fn repeat(len: u64) -> Self {
        BenchBody::Repeat { remaining: len }
    }

    /// A body of exactly these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        BenchBody::Full(Some(bytes.into()))
    }
}

impl Body for BenchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this {
            BenchBody::Empty => Poll::Ready(None),
            BenchBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BenchBody::Repeat { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (*remaining).min(CHUNK_BYTES as u64);
                *remaining -= n;
                Poll::Ready(Some(Ok(Frame::data(chunk().slice(..n as usize)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BenchBody::Empty => true,
            BenchBody::Full(b) => b.is_none(),
            BenchBody::Repeat { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BenchBody::Empty => SizeHint::with_exact(0),
            BenchBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BenchBody::Repeat { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn repeat_body_yields_exactly_its_length_in_chunks() {
        let body = BenchBody::repeat(3 * CHUNK_BYTES as u64 + 5);
        assert_eq!(body.size_hint().exact(), Some(3 * CHUNK_BYTES as u64 + 5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 3 * CHUNK_BYTES + 5);
    }
}
