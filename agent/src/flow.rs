//! Per-stream plumbing shared by the HTTP and TCP forwarders: the path to the socket writer and
//! the two credit windows.
//!
//! Invariants: a stream never has more `Data` in flight towards the gateway than the gateway
//! granted ([`SendCredit`]), and never buffers more from the gateway than it granted
//! ([`RecvCredit`]; the session loop resets a stream whose peer overruns it). So memory per
//! stream is bounded by its windows, and a slow stream only ever waits on its own credit.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use strait_schema::{encode, Credit, ErrorCode, Frame, Reset, ResponseHead, StreamId};
use tokio::sync::{mpsc, Semaphore};

use crate::ws::Outgoing;

/// Longest `Reset` reason we send; the gateway's decoder bounds text fields too.
const MAX_REASON_BYTES: usize = 512;

/// Why a frame could not be queued for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The connection's writer is gone; the stream cannot continue.
    Gone,
    /// The encoded frame exceeds the connection's `max_frame_bytes`.
    TooLarge,
}

/// Queues frames for the one task that owns the WebSocket sink.
///
/// Two queues: stream frames (heads, `Data`, `Fin`, stream-originated `Reset`, and the closing
/// handshake) go through a bounded queue and wait when it is full, which keeps their order and
/// gives back-pressure; control frames (`Pong`, `Ping`, `Credit`, resets decided by the
/// session loop) go through an unbounded priority queue, because the session loop must never
/// block on the writer (that could deadlock against a gateway that is itself blocked writing),
/// and credit must not wait behind bulk data. The control queue only grows with what the gateway
/// sends, which credit bounds.
#[derive(Clone)]
pub(crate) struct Outbound {
    data: mpsc::Sender<Outgoing>,
    control: mpsc::UnboundedSender<Outgoing>,
    max_frame_bytes: usize,
}

impl Outbound {
    pub(crate) fn new(
        data: mpsc::Sender<Outgoing>,
        control: mpsc::UnboundedSender<Outgoing>,
        max_frame_bytes: usize,
    ) -> Self {
        Outbound {
            data,
            control,
            max_frame_bytes,
        }
    }

    /// Queues a stream frame in order, waiting while the writer is behind.
    pub(crate) async fn send(&self, frame: &Frame) -> Result<(), SendError> {
        let msg = match frame {
            // Encoded by the writer as it masks the payload into its buffer.
            Frame::Data(d) => Outgoing::Data(d.clone()),
            other => Outgoing::Frame(Bytes::from(encode(other))),
        };
        if msg.len() > self.max_frame_bytes {
            return Err(SendError::TooLarge);
        }
        self.data.send(msg).await.map_err(|_| SendError::Gone)
    }

    /// Queues a control frame ahead of stream data. Never waits.
    pub(crate) fn control(&self, frame: &Frame) -> Result<(), SendError> {
        self.control
            .send(Outgoing::Frame(Bytes::from(encode(frame))))
            .map_err(|_| SendError::Gone)
    }

    /// Answers a WebSocket-level ping ahead of stream data. Never waits.
    pub(crate) fn pong(&self, payload: Bytes) {
        let _ = self.control.send(Outgoing::Pong(payload));
    }

    /// Queues the WebSocket close frame behind everything already queued.
    pub(crate) async fn close(&self) -> Result<(), SendError> {
        self.data.send(Outgoing::Close).await.map_err(|_| SendError::Gone)
    }

    /// Sends `Reset` for a stream as a control frame.
    pub(crate) fn reset_now(&self, stream: StreamId, code: ErrorCode, reason: &str) {
        let _ = self.control(&reset_frame(stream, code, reason));
    }

    /// Sends `Reset` for a stream behind the stream's own frames.
    pub(crate) async fn reset(&self, stream: StreamId, code: ErrorCode, reason: &str) {
        let _ = self.send(&reset_frame(stream, code, reason)).await;
    }
}

fn reset_frame(stream: StreamId, code: ErrorCode, reason: &str) -> Frame {
    Frame::Reset(Reset {
        stream,
        code,
        reason: truncate(reason, MAX_REASON_BYTES),
    })
}

/// Cuts text to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Credit the gateway granted us for sending on one stream. Only the stream's own task takes
/// from it; the session loop adds to it on `Credit` frames.
#[derive(Clone)]
pub(crate) struct SendCredit {
    permits: Arc<Semaphore>,
    cap: usize,
}

impl SendCredit {
    /// Starts with `window` bytes; grants beyond `cap` available bytes are clamped, so a buggy
    /// peer cannot make us buffer without bound.
    pub(crate) fn new(window: u32, cap: usize) -> Self {
        let window = window as usize;
        SendCredit {
            permits: Arc::new(Semaphore::new(window.min(Semaphore::MAX_PERMITS))),
            cap: cap.max(window),
        }
    }

    /// Adds credit from a `Credit` frame.
    pub(crate) fn grant(&self, bytes: u32) {
        let room = self.cap.saturating_sub(self.permits.available_permits());
        let add = (bytes as usize).min(room);
        if add > 0 {
            self.permits.add_permits(add);
        }
    }

    /// Waits for at least one byte of credit and takes up to `max`. Returns 0 only if the
    /// credit was closed (never, today).
    pub(crate) async fn take(&self, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let Ok(first) = self.permits.acquire().await else {
            return 0;
        };
        first.forget();
        let extra = self.permits.available_permits().min(max - 1);
        if extra > 0 {
            let Ok(n) = u32::try_from(extra) else {
                return 1;
            };
            match self.permits.try_acquire_many(n) {
                Ok(p) => p.forget(),
                Err(_) => return 1,
            }
        }
        1 + extra
    }

    /// Returns credit taken by [`SendCredit::take`] but not used.
    pub(crate) fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.permits.add_permits(bytes);
        }
    }

    /// Bytes that could be sent right now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// What the session loop hands a stream from the gateway.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Payload, already counted against the receive window.
    Data(Bytes),
    /// The gateway finished sending.
    Fin,
}

/// Our side of the receive window: bytes the gateway may still send (`budget`, decremented by
/// the session loop as `Data` arrives) and bytes consumed but not yet credited back.
pub(crate) struct RecvCredit {
    stream: StreamId,
    budget: Arc<AtomicI64>,
    pending: u64,
    threshold: u64,
    out: Outbound,
}

impl RecvCredit {
    /// Credit goes back in batches of half the window: one `Credit` frame per half window, so a
    /// MiB of upload costs two across nodes, where each frame is a bus message (a quarter window
    /// cost four; docs/benchmarks.md, nineteenth round). On loopback half a window is still
    /// returned long before the sender runs dry.
    pub(crate) fn new(stream: StreamId, budget: Arc<AtomicI64>, window: u32, out: Outbound) -> Self {
        RecvCredit {
            stream,
            budget,
            pending: 0,
            threshold: u64::from((window / 2).max(1)),
            out,
        }
    }

    /// Records bytes handed to the local service; grants them back once a batch is complete.
    pub(crate) fn consumed(&mut self, bytes: usize) {
        self.pending += bytes as u64;
        if self.pending >= self.threshold {
            self.flush();
        }
    }

    /// Grants everything consumed so far.
    pub(crate) fn flush(&mut self) {
        while self.pending > 0 {
            let grant = u32::try_from(self.pending).unwrap_or(u32::MAX);
            // Widen the budget before the gateway can learn of the credit, so its next `Data`
            // never looks like an overrun.
            self.budget.fetch_add(i64::from(grant), Ordering::AcqRel);
            let _ = self.out.control(&Frame::Credit(Credit {
                stream: self.stream,
                bytes: grant,
            }));
            self.pending -= u64::from(grant);
        }
    }
}

/// The sending half of a stream: its id, the writer queue, and the gateway's credit.
#[derive(Clone)]
pub(crate) struct StreamSender {
    pub(crate) id: StreamId,
    pub(crate) out: Outbound,
    pub(crate) credit: SendCredit,
    pub(crate) max_data_bytes: usize,
    /// The node accepts a whole small response in its head frame.
    pub(crate) inline_end: bool,
}

impl StreamSender {
    /// Sends a complete response, body included, as one `ResponseHead` with `end` (the node
    /// listed [`strait_schema::CAP_INLINE_END`]); the body still counts against the window.
    pub(crate) async fn whole_response(&self, mut head: ResponseHead, body: Bytes) -> Result<(), SendError> {
        // One frame: a body past `max_data_bytes` would be refused by the node's decoder.
        if body.len() > self.max_data_bytes {
            return Err(SendError::TooLarge);
        }
        let mut taken = 0;
        while taken < body.len() {
            let n = self.credit.take(body.len() - taken).await;
            if n == 0 {
                return Err(SendError::Gone);
            }
            taken += n;
        }
        head.end = true;
        head.body = body;
        let sent = self.out.send(&Frame::ResponseHead(head)).await;
        if sent.is_err() {
            self.credit.give_back(taken);
        }
        sent
    }

    /// Sends `bytes` as `Data` frames no larger than `max_data_bytes`, each waiting for credit.
    pub(crate) async fn data(&self, mut bytes: Bytes) -> Result<(), SendError> {
        while !bytes.is_empty() {
            let n = self.credit.take(bytes.len().min(self.max_data_bytes)).await;
            if n == 0 {
                return Err(SendError::Gone);
            }
            let chunk = bytes.split_to(n);
            self.out
                .send(&Frame::Data(strait_schema::Data {
                    stream: self.id,
                    bytes: chunk,
                }))
                .await?;
        }
        Ok(())
    }

    /// Sends a stream frame (head, `Fin`) in order.
    pub(crate) async fn frame(&self, frame: &Frame) -> Result<(), SendError> {
        self.out.send(frame).await
    }

    /// Sends `Fin`: nothing more from us on this stream.
    pub(crate) async fn fin(&self) -> Result<(), SendError> {
        self.out.send(&Frame::Fin(strait_schema::Fin { stream: self.id })).await
    }

    /// Aborts the stream with a reason, behind whatever it already sent.
    pub(crate) async fn reset(&self, code: ErrorCode, reason: &str) {
        self.out.reset(self.id, code, reason).await;
    }
}

/// Everything a stream task owns.
pub(crate) struct StreamCtx {
    pub(crate) tx: StreamSender,
    pub(crate) recv_credit: RecvCredit,
    pub(crate) inbound: mpsc::UnboundedReceiver<Inbound>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn send_credit_takes_what_is_available_and_clamps_grants() {
        let c = SendCredit::new(10, 40);
        assert_eq!(c.take(4).await, 4);
        assert_eq!(c.take(100).await, 6);
        assert_eq!(c.available(), 0);
        c.grant(1_000);
        assert_eq!(c.available(), 40, "clamped to the cap");
        c.give_back(5);
        assert_eq!(c.available(), 45, "unused credit comes back unclamped");
    }

    #[tokio::test]
    async fn send_credit_waits_for_a_grant() {
        let c = SendCredit::new(0, 16);
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.take(8).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.grant(3);
        assert_eq!(waiter.await.unwrap(), 3);
    }

    /// Credit goes back in half-window batches (one `Credit` per half window, not per chunk), and
    /// the budget is widened before the gateway can hear of it.
    #[tokio::test]
    async fn receive_credit_is_granted_in_half_window_batches() {
        let (data_tx, _data_rx) = mpsc::channel(8);
        let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel();
        let out = Outbound::new(data_tx, ctrl_tx, 1 << 20);
        let budget = Arc::new(AtomicI64::new(1000));
        let mut credit = RecvCredit::new(StreamId(9), budget.clone(), 1000, out);
        credit.consumed(300);
        credit.consumed(199);
        assert!(ctrl_rx.try_recv().is_err(), "no grant below half a window");
        credit.consumed(1);
        assert_eq!(budget.load(Ordering::Acquire), 1500);
        let Ok(Outgoing::Frame(bytes)) = ctrl_rx.try_recv() else {
            panic!("a grant at half a window")
        };
        let frame = strait_schema::decode(&bytes, &strait_schema::Limits::default()).unwrap();
        assert_eq!(
            frame,
            Frame::Credit(Credit {
                stream: StreamId(9),
                bytes: 500
            })
        );
        credit.consumed(7);
        credit.flush();
        assert!(ctrl_rx.try_recv().is_ok(), "flush grants the rest");
        assert_eq!(budget.load(Ordering::Acquire), 1507);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
