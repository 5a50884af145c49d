//! The publisher task of an [`AmqpBus`](crate::AmqpBus): numbers envelopes, batches them per
//! destination, publishes the batches with pipelined confirms, and re-sends what a lost
//! connection or a nack left unconfirmed.
//!
//! Ordering per destination holds because every batch passes through one FIFO (`ready`, then
//! `inflight`), and on a failure the unconfirmed batches go back to the front of `ready` in
//! their original order. The broker stores one channel's messages to one stream in order, so a
//! lost confirm means a suffix of the in-flight batches may be missing, never a gap in the
//! middle; re-sending from the oldest unconfirmed batch restores order, and the consumer's
//! sequence check removes the copies that did arrive.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, Stream, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event, PublisherConfirm};
use strait_schema::{encode_envelope, BusEnvelope};
use tokio::sync::{mpsc, oneshot, watch};

use crate::amqp::{confirm_channel, open_connection, short_string, BusConfig};
use crate::batch::BatchBuilder;
use crate::stats::{BusStats, Stat};
use crate::Error;

/// Shortest wait worth handing to the tokio timer, which rounds up to whole milliseconds.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// Content type of every batch, so operators can tell dispatch messages apart in the broker.
const CONTENT_TYPE: &str = "application/vnd.strait.batch";

/// What the bus handle asks of its publisher, in one ordered queue, so a flush or close covers
/// exactly the envelopes published before it.
// `Publish` is nearly every command; boxing it to shrink the rare ones would cost an allocation
// per envelope.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// Send this envelope.
    Publish(BusEnvelope),
    /// Answer once everything before it is confirmed.
    Flush(oneshot::Sender<()>),
    /// Like `Flush`, then close the connection and stop.
    Close(oneshot::Sender<()>),
}

/// Sequence numbers for this sender: each is `max(previous + 1, wall clock in µs)`.
///
/// Why the clock: the consumer drops any envelope whose `seq` is not above the highest it has
/// seen from that sender, and it keeps that watermark across the sender's restarts. A counter
/// from zero would make a restarted sender look like a replay and lose everything it sends
/// until it passed its old count. Anchoring on the clock makes a new process start above every
/// number its predecessor used, because the counter only runs ahead of the clock while more
/// than a million envelopes per second are numbered, far above what one publisher can send.
/// What remains is a wall clock stepped back by more than the restart took; then envelopes are
/// dropped as duplicates until the clock catches up, and `duplicates_dropped` shows it.
#[derive(Debug, Default)]
pub(crate) struct SeqClock {
    last: u64,
}

impl SeqClock {
    pub(crate) fn next(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.last = self.last.saturating_add(1).max(now);
        self.last
    }
}

/// One connection with its confirm-mode channel.
pub(crate) struct Link {
    conn: Connection,
    pub(crate) channel: Channel,
    events: Option<Pin<Box<dyn Stream<Item = Event> + Send>>>,
}

impl Link {
    pub(crate) async fn open(url: &str, cfg: &BusConfig) -> Result<Link, Error> {
        let name = format!("strait-bus {} publisher", cfg.node_id);
        let conn = open_connection(url, &name, cfg.op_timeout).await?;
        let channel = confirm_channel(&conn, cfg.op_timeout).await?;
        let events: Pin<Box<dyn Stream<Item = Event> + Send>> = Box::pin(conn.events_listener());
        Ok(Link {
            conn,
            channel,
            events: Some(events),
        })
    }

    /// Closes the connection in the background: a healthy one (after a nack) should not linger
    /// half-used, and a dead one must not hold up reconnecting.
    fn close_in_background(self, limit: Duration) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, self.conn.close(200, "strait-bus publisher reset".into())).await;
        });
    }
}

/// A batch still being filled.
struct Open {
    batch: BatchBuilder,
    opened: Instant,
}

/// A finished batch, kept until confirmed so it can be sent again.
struct Sealed {
    id: u64,
    to_node: String,
    routing_key: ShortString,
    body: Vec<u8>,
    envelopes: usize,
}

struct InFlight {
    batch: Sealed,
    confirm: PublisherConfirm,
}

/// Why the link was given up.
enum Failure {
    Lost(lapin::Error),
    Nacked,
}

pub(crate) struct Publisher {
    url: String,
    cfg: Arc<BusConfig>,
    stats: Arc<BusStats>,
    rx: mpsc::Receiver<Command>,
    stop: watch::Receiver<bool>,
    link: Option<Link>,
    open: HashMap<String, Open>,
    ready: VecDeque<Sealed>,
    inflight: VecDeque<InFlight>,
    /// Batches in `ready` or `inflight`, per destination: a destination with none is idle, and
    /// its next batch goes without lingering.
    pending: HashMap<String, usize>,
    next_batch_id: u64,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// Set once `Close` arrived or every bus handle is gone.
    closing: Option<Option<oneshot::Sender<()>>>,
    seq: SeqClock,
}

impl Publisher {
    pub(crate) fn new(
        url: String,
        cfg: Arc<BusConfig>,
        stats: Arc<BusStats>,
        rx: mpsc::Receiver<Command>,
        stop: watch::Receiver<bool>,
        link: Link,
    ) -> Self {
        Publisher {
            url,
            cfg,
            stats,
            rx,
            stop,
            link: Some(link),
            open: HashMap::new(),
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
            pending: HashMap::new(),
            next_batch_id: 1,
            flushes: Vec::new(),
            closing: None,
            seq: SeqClock::default(),
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            if self.link.is_none() && !self.reconnect().await {
                break;
            }
            self.absorb();
            self.seal_due(Instant::now());
            if let Err(e) = self.publish_ready().await {
                self.lose_link(Failure::Lost(e));
                continue;
            }
            if let Err(f) = self.collect_ready_confirms() {
                self.lose_link(f);
                continue;
            }
            self.answer_flushes();
            if self.closing.is_some() && self.is_idle() {
                if let Some(link) = self.link.take() {
                    let _ = tokio::time::timeout(self.cfg.op_timeout, link.conn.close(200, "shutdown".into())).await;
                }
                if let Some(Some(done)) = self.closing.take() {
                    let _ = done.send(());
                }
                return;
            }
            // An open batch lingers until `linger_due`, or until its destination's last pending
            // batch is confirmed (`seal_due` then finds the destination idle). Every command,
            // confirm and link event runs `seal_due` again, so under load a batch is sealed at
            // the first wake-up past its linger; the timer (whole milliseconds) is only the
            // backstop. Spinning on `yield_now` until a sub-millisecond deadline instead kept this
            // task busy for most of every linger: a core's worth of CPU on a small machine.
            let linger_due = self.open.values().map(|o| o.opened + self.cfg.linger).min();
            let wake = linger_due.map(|due| due.max(Instant::now() + TIMER_RESOLUTION));
            let accept = self.can_accept() && self.closing.is_none();
            let Some(link) = self.link.as_mut() else { continue };
            tokio::select! {
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {}
                cmd = self.rx.recv(), if accept => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => self.closing = Some(None),
                },
                res = front_confirm(&mut self.inflight) => {
                    if let Err(f) = self.on_confirm(res) {
                        self.lose_link(f);
                    }
                }
                ev = next_event(&mut link.events) => {
                    if let Some(Event::Error(e)) = ev {
                        self.lose_link(Failure::Lost(e));
                    }
                }
                _ = self.stop.changed() => break,
            }
        }
        self.abandon();
    }

    /// Reconnects with backoff. False when told to stop first.
    async fn reconnect(&mut self) -> bool {
        let mut delay = self.cfg.reconnect_min;
        loop {
            if *self.stop.borrow() {
                return false;
            }
            match Link::open(&self.url, &self.cfg).await {
                Ok(link) => {
                    self.stats.add(Stat::Reconnects, 1);
                    tracing::info!(node = %self.cfg.node_id, resend = self.ready.len(), "bus publisher reconnected");
                    self.link = Some(link);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(node = %self.cfg.node_id, error = %e, retry_in = ?delay, "bus publisher cannot reconnect");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => return false,
            }
            delay = (delay * 2).min(self.cfg.reconnect_max);
        }
    }

    /// True while more envelopes may be taken in. Holding off when the send side is backed up
    /// leaves them in the bounded command queue, which is what makes `publish` answer `Backlog`
    /// instead of this task buffering without bound during an outage.
    fn can_accept(&self) -> bool {
        self.link.is_some() && self.ready.len() < self.cfg.confirm_window
    }

    /// Takes in every command already queued.
    fn absorb(&mut self) {
        while self.can_accept() && self.closing.is_none() {
            match self.rx.try_recv() {
                Ok(cmd) => self.on_command(cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closing = Some(None);
                    break;
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(env) => self.add(env),
            Command::Flush(done) => {
                self.seal_all();
                self.flushes.push((self.next_batch_id - 1, done));
            }
            Command::Close(done) => {
                self.seal_all();
                self.closing = Some(Some(done));
            }
        }
    }

    /// Numbers `env`, encodes it and appends it to its destination's open batch, sealing the
    /// batch first if the envelope would overflow it, and after if it is now full.
    fn add(&mut self, mut env: BusEnvelope) {
        env.from_node.clone_from(&self.cfg.node_id);
        env.seq = self.seq.next();
        let bytes = encode_envelope(&env);
        let max = self.cfg.max_batch_bytes;
        let overflows = self
            .open
            .get(&env.to_node)
            .is_some_and(|o| o.batch.count() > 0 && o.batch.len_with(bytes.len()) > max);
        if overflows {
            self.seal(&env.to_node);
        }
        let open = self.open.entry(env.to_node.clone()).or_insert_with(|| Open {
            batch: BatchBuilder::new(max.min(bytes.len().saturating_mul(4) + 64)),
            opened: Instant::now(),
        });
        open.batch.push(&bytes);
        if open.batch.len_bytes() >= max {
            self.seal(&env.to_node);
        }
    }

    /// Seals every open batch that is due: a small one whose destination is idle (nothing to
    /// wait for, so lingering would only add latency), or any that has lingered long enough. A
    /// bulk one (`bulk_batch_bytes`) waits for its linger or to fill up even when the
    /// destination is idle, since the next frames of its byte stream are usually on their way.
    fn seal_due(&mut self, now: Instant) {
        let linger = self.cfg.linger;
        let bulk = self.cfg.bulk_batch_bytes;
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(to, o)| {
                let idle = self.pending.get(*to).copied().unwrap_or(0) == 0;
                (idle && o.batch.len_bytes() < bulk) || now.duration_since(o.opened) >= linger
            })
            .map(|(to, _)| to.clone())
            .collect();
        for to in due {
            self.seal(&to);
        }
    }

    fn seal_all(&mut self) {
        let all: Vec<String> = self.open.keys().cloned().collect();
        for to in all {
            self.seal(&to);
        }
    }

    fn seal(&mut self, to_node: &str) {
        let Some(open) = self.open.remove(to_node) else { return };
        let envelopes = open.batch.count();
        if envelopes == 0 {
            return;
        }
        let routing_key = match short_string(&self.cfg.stream_name(to_node)) {
            Ok(k) => k,
            Err(e) => {
                // Unreachable with validated ids and prefix; dropping beats panicking.
                tracing::error!(to = %to_node, error = %e, "bus batch dropped");
                return;
            }
        };
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        *self.pending.entry(to_node.to_owned()).or_default() += 1;
        self.ready.push_back(Sealed {
            id,
            to_node: to_node.to_owned(),
            routing_key,
            body: open.batch.finish(),
            envelopes,
        });
    }

    /// Sends ready batches while the confirm window has room. Never waits for a confirm.
    async fn publish_ready(&mut self) -> Result<(), lapin::Error> {
        // A clone, so no borrow of the link (whose event stream is not `Sync`) lives across
        // the awaits below.
        let Some(channel) = self.link.as_ref().map(|l| l.channel.clone()) else {
            return Ok(());
        };
        while self.inflight.len() < self.cfg.confirm_window {
            let Some(batch) = self.ready.pop_front() else { break };
            let props = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
            // `mandatory`: a batch for a node without a stream comes back (and is counted)
            // instead of vanishing silently.
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let sent = channel
                .basic_publish("".into(), batch.routing_key.clone(), options, &batch.body, props)
                .await;
            match sent {
                Ok(confirm) => {
                    self.stats.add(Stat::BatchesPublished, 1);
                    self.inflight.push_back(InFlight { batch, confirm });
                }
                Err(e) => {
                    self.ready.push_front(batch);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Handles the confirms that have already arrived, oldest first, without waiting.
    fn collect_ready_confirms(&mut self) -> Result<(), Failure> {
        loop {
            let Some(front) = self.inflight.front_mut() else {
                return Ok(());
            };
            match (&mut front.confirm).now_or_never() {
                Some(res) => self.on_confirm(res)?,
                None => return Ok(()),
            }
        }
    }

    /// Retires the oldest in-flight batch according to its confirm.
    fn on_confirm(&mut self, res: lapin::Result<Confirmation>) -> Result<(), Failure> {
        match res {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
                if let Some(done) = self.retire_front() {
                    self.stats.add(Stat::BatchesConfirmed, 1);
                    self.stats.add(Stat::EnvelopesPublished, done.envelopes as u64);
                }
                Ok(())
            }
            Ok(Confirmation::Ack(Some(_returned))) => {
                if let Some(done) = self.retire_front() {
                    self.stats.add(Stat::BatchesConfirmed, 1);
                    self.stats.add(Stat::EnvelopesUnroutable, done.envelopes as u64);
                    tracing::warn!(to = %done.to_node, envelopes = done.envelopes, "bus: destination node has no stream; batch dropped");
                }
                Ok(())
            }
            Ok(Confirmation::Nack(_)) => Err(Failure::Nacked),
            Err(e) => Err(Failure::Lost(e)),
        }
    }

    fn retire_front(&mut self) -> Option<Sealed> {
        let done = self.inflight.pop_front()?.batch;
        if let Some(n) = self.pending.get_mut(&done.to_node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&done.to_node);
            }
        }
        Some(done)
    }

    /// Answers every flush whose batches are all confirmed. Batch ids grow in send order and
    /// `inflight` precedes `ready`, so the oldest pending id bounds what is done.
    fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let oldest_pending = self
            .inflight
            .front()
            .map(|f| f.batch.id)
            .or_else(|| self.ready.front().map(|b| b.id))
            .unwrap_or(self.next_batch_id);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(upto, _)| *upto < oldest_pending);
        self.flushes = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
    }

    fn is_idle(&self) -> bool {
        self.open.is_empty() && self.ready.is_empty() && self.inflight.is_empty()
    }

    /// Gives up the connection: every unconfirmed batch goes back to the front of `ready`, in
    /// order, to be sent again on the next connection.
    fn lose_link(&mut self, why: Failure) {
        match &why {
            Failure::Lost(e) => {
                tracing::warn!(node = %self.cfg.node_id, error = %e, "bus publisher lost its connection")
            }
            Failure::Nacked => {
                tracing::warn!(node = %self.cfg.node_id, "bus batch nacked; resending unconfirmed batches")
            }
        }
        if let Some(link) = self.link.take() {
            link.close_in_background(self.cfg.op_timeout);
        }
        let resend = self.inflight.len() as u64;
        while let Some(f) = self.inflight.pop_back() {
            self.ready.push_front(f.batch);
        }
        self.stats.add(Stat::BatchesRepublished, resend);
    }

    /// Stopped for good: whatever is still unconfirmed is lost, and said so.
    fn abandon(&mut self) {
        let queued = self.ready.len() + self.inflight.len() + self.open.len();
        if queued > 0 {
            tracing::warn!(node = %self.cfg.node_id, batches = queued, "bus publisher stopped with unconfirmed batches");
        }
        if let Some(link) = self.link.take() {
            link.close_in_background(self.cfg.op_timeout);
        }
    }
}

/// The oldest in-flight confirm; pending forever when nothing is in flight, so `select!` can
/// poll it unconditionally.
async fn front_confirm(inflight: &mut VecDeque<InFlight>) -> lapin::Result<Confirmation> {
    match inflight.front_mut() {
        Some(f) => (&mut f.confirm).await,
        None => std::future::pending().await,
    }
}

/// The next connection event; pending forever once the event stream has ended.
async fn next_event(events: &mut Option<Pin<Box<dyn Stream<Item = Event> + Send>>>) -> Option<Event> {
    let Some(stream) = events.as_mut() else {
        return std::future::pending().await;
    };
    let ev = stream.next().await;
    if ev.is_none() {
        *events = None;
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_clock_strictly_increases_even_within_one_microsecond() {
        let mut clock = SeqClock::default();
        let mut prev = clock.next();
        for _ in 0..100_000 {
            let s = clock.next();
            assert!(s > prev);
            prev = s;
        }
    }

    #[test]
    fn seq_clock_starts_at_the_wall_clock_so_a_restart_continues_above() {
        let mut before = SeqClock::default();
        let last = (0..1000).map(|_| before.next()).last().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let mut restarted = SeqClock::default();
        assert!(restarted.next() > last);
    }
}
