//! [`AmqpBus`]: the cluster bus on RabbitMQ streams (AMQP 0.9.1 through lapin).
//!
//! Each node owns one durable stream, `<prefix>.dispatch.<node_id>`, bounded by age and size.
//! Any node publishes to another node's stream through the default exchange; the owner consumes
//! it. What the broker does not give us, the bus adds:
//!
//! - **Batching.** Envelopes for one destination are packed into one AMQP message (see
//!   `batch`), because the broker's cost is per message: one store, one confirm, one delivery.
//! - **Pipelined confirms.** Up to [`BusConfig::confirm_window`] batches are unconfirmed at once;
//!   a batch whose confirm is nacked or lost with the connection is sent again after reconnect.
//! - **Sequence numbers and dedup.** The publisher stamps each envelope with a `seq` that only
//!   grows per sender; the consumer drops any envelope whose `seq` it has already passed, so
//!   re-sends and replays reach the node once.
//! - **Offsets.** The broker keeps no offsets for AMQP consumers, so the consumer stores its own
//!   in an [`OffsetStore`] and resumes at `stored + 1`.
//!
//! lapin's own auto-recovery is not used: it would re-subscribe with the *original* start offset.
//! Publisher and consumers each own a connection (the broker throttles publishing connections,
//! and that must never stall delivery) and reconnect themselves with backoff.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use strait_schema::{is_short_id, BusEnvelope, Limits};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::consumer::{Consumer, Start};
use crate::offsets::OffsetStore;
use crate::publisher::{Command, Publisher};
use crate::stats::{BusStats, BusStatsSnapshot, Stat};
use crate::{Bus, Error};

/// Settings of one node's [`AmqpBus`]. Build with [`BusConfig::new`] and adjust fields; the
/// defaults are the ones measured on a loaded 2-core box (see `docs/architecture.md`).
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Names every stream of one cluster (`<prefix>.dispatch.<node>`), so clusters and test runs
    /// sharing a broker never see each other. `[A-Za-z0-9._-]{1,128}`.
    pub prefix: String,
    /// This node's id: the stream it consumes, and the `from_node` of what it publishes. Must be
    /// unique among running processes, or their sequence numbers collide (see [`Bus::publish`]).
    pub node_id: String,
    /// Stream retention by age (`x-max-age`): how long a node may be away and still replay what
    /// was sent to it. Whole seconds.
    pub max_age: Duration,
    /// Stream retention by size (`x-max-length-bytes`).
    pub max_bytes: u64,
    /// Stream segment size (`x-stream-max-segment-size-bytes`). Retention drops whole segments
    /// and the broker's default is 500 MB, so keep it small or nothing is ever dropped.
    pub segment_bytes: u64,
    /// How long an open batch waits for more envelopes while earlier batches to the same node are
    /// still unconfirmed. A batch to an idle destination goes at once, so a lone request pays no
    /// linger; under load this trades a fraction of a millisecond for far fewer AMQP messages.
    pub linger: Duration,
    /// A batch is sent as soon as it reaches this many bytes. 1 MiB holds a whole default stream
    /// window of `Data`: one AMQP message per window instead of one per 64 KiB frame.
    pub max_batch_bytes: usize,
    /// A batch holding at least this many bytes carries bulk data (byte streams, large bodies),
    /// and lingers until it is full or `linger` has passed even when its destination is idle:
    /// the broker's CPU follows AMQP messages, not bytes, so a byte stream sent as soon as each
    /// 64 KiB frame arrives spends most of it on per-message work. Small batches keep going
    /// at once to an idle destination, so a lone request still pays no linger.
    pub bulk_batch_bytes: usize,
    /// Most batches sent but not yet confirmed. Confirms are pipelined, never awaited one by one
    /// (awaiting each caps a node at ~3k messages/s).
    pub confirm_window: usize,
    /// Most envelopes queued in the publisher. Beyond it (a long broker outage) `publish` answers
    /// [`Error::Backlog`] instead of growing memory without bound.
    pub max_queued: usize,
    /// `basic.qos` prefetch, in AMQP messages (batches). Streams need one before consuming.
    pub prefetch: u16,
    /// Deliveries are acked with `multiple: true` after this many...
    pub ack_every: u32,
    /// ...or this long after the first unacked one, whichever comes first.
    pub ack_interval: Duration,
    /// The delivered offset is stored after this many messages...
    pub offset_every: u32,
    /// ...or this long after the first unstored one, whichever comes first.
    pub offset_interval: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Bound on each connect, declare and offset-store call, so a hung broker or store cannot
    /// stall the bus forever.
    pub op_timeout: Duration,
    /// Bounds applied when decoding each envelope off the stream.
    pub limits: Limits,
}

impl BusConfig {
    /// Defaults for node `node_id` in cluster `prefix`.
    pub fn new(prefix: impl Into<String>, node_id: impl Into<String>) -> Self {
        BusConfig {
            prefix: prefix.into(),
            node_id: node_id.into(),
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
            linger: Duration::from_micros(200),
            max_batch_bytes: 1 << 20,
            bulk_batch_bytes: 32 << 10,
            confirm_window: 64,
            max_queued: 1 << 18,
            prefetch: 256,
            ack_every: 100,
            ack_interval: Duration::from_millis(10),
            offset_every: 100,
            offset_interval: Duration::from_millis(50),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            op_timeout: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }

    /// The stream node `node` consumes.
    pub fn stream_name(&self, node: &str) -> String {
        format!("{}.dispatch.{}", self.prefix, node)
    }

    fn validate(&self) -> Result<(), Error> {
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 128
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !prefix_ok {
            return Err(Error::Config(format!(
                "prefix {:?} is not [A-Za-z0-9._-]{{1,128}}",
                self.prefix
            )));
        }
        if !is_short_id(&self.node_id) {
            return Err(Error::Config(format!("node id {:?} is not a short id", self.node_id)));
        }
        let positive = [
            ("max_age", self.max_age.as_secs() > 0),
            ("max_bytes", self.max_bytes > 0),
            ("segment_bytes", self.segment_bytes > 0),
            ("max_batch_bytes", self.max_batch_bytes > 0),
            ("confirm_window", self.confirm_window > 0),
            ("max_queued", self.max_queued > 0),
            ("prefetch", self.prefetch > 0),
            ("ack_every", self.ack_every > 0),
            ("offset_every", self.offset_every > 0),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(Error::Config(format!("{name} must be positive")));
        }
        Ok(())
    }

    /// Queue arguments of a dispatch stream. Every declarer must pass the same ones, or the
    /// broker refuses the declare (PRECONDITION_FAILED); only a stream's owner declares it.
    fn stream_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", self.max_age.as_secs()).into()),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(saturating_i64(self.max_bytes)),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(saturating_i64(self.segment_bytes)),
        );
        args
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The cluster bus of one node. Cheap to clone; all clones share one publisher and the same
/// subscriptions. Dropping the last clone stops everything at once, like [`AmqpBus::abort`];
/// call [`AmqpBus::shutdown`] first to deliver what is still queued.
#[derive(Clone)]
pub struct AmqpBus {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    cfg: Arc<BusConfig>,
    offsets: Arc<dyn OffsetStore>,
    stats: Arc<BusStats>,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    publisher: parking_lot::Mutex<Option<JoinHandle<()>>>,
    subscriptions: tokio::sync::Mutex<HashMap<String, Subscription>>,
}

/// A running consumer task. The weak sender tells whether its subscriber still listens without
/// keeping the subscriber's channel open.
struct Subscription {
    task: JoinHandle<()>,
    deliveries: mpsc::WeakUnboundedSender<BusEnvelope>,
}

impl std::fmt::Debug for AmqpBus {
    // The URL is left out on purpose: it carries the broker password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus")
            .field("stream", &self.inner.cfg.stream_name(&self.inner.cfg.node_id))
            .field("stats", &self.inner.stats.snapshot())
            .finish()
    }
}

impl AmqpBus {
    /// Connects to the broker at `url`, declares this node's stream and starts the publisher.
    /// Fails when the broker cannot be reached now (a node should not report ready without its
    /// bus); after that, outages are ridden out by reconnecting.
    pub async fn connect(url: &str, cfg: BusConfig, offsets: Arc<dyn OffsetStore>) -> Result<AmqpBus, Error> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let link = crate::publisher::Link::open(url, &cfg).await?;
        declare_stream(&link.channel, &cfg.stream_name(&cfg.node_id), &cfg).await?;
        let stats = Arc::new(BusStats::default());
        let (commands, rx) = mpsc::channel(cfg.max_queued);
        let (stop, stop_rx) = watch::channel(false);
        let publisher = Publisher::new(url.to_owned(), cfg.clone(), stats.clone(), rx, stop_rx, link);
        let task = tokio::spawn(publisher.run());
        Ok(AmqpBus {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                cfg,
                offsets,
                stats,
                commands,
                stop,
                publisher: parking_lot::Mutex::new(Some(task)),
                subscriptions: tokio::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Live counters, for `/metrics`.
    pub fn stats(&self) -> Arc<BusStats> {
        self.inner.stats.clone()
    }

    /// One reading of [`AmqpBus::stats`].
    pub fn stats_snapshot(&self) -> BusStatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The settings this bus runs with.
    pub fn config(&self) -> &BusConfig {
        &self.inner.cfg
    }

    /// Waits until every envelope published before this call is confirmed by the broker (or
    /// dropped as unroutable). Resolves at once when nothing is pending.
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Stops the bus in order: sends and confirms everything already published (for at most
    /// `grace`), then stops every consumer, which acks, stores its last delivered offset and
    /// closes its subscriber's channel (the subscriber drains what is in it, then sees `None`).
    /// Later `publish` calls answer [`Error::Closed`].
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        let (tx, rx) = oneshot::channel();
        let closed = async {
            if inner.commands.send(Command::Close(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(grace, closed).await.is_err() {
            tracing::warn!(node = %inner.cfg.node_id, "bus shutdown: unconfirmed envelopes abandoned after grace");
        }
        inner.stop.send_replace(true);
        let subscriptions: Vec<Subscription> = inner.subscriptions.lock().await.drain().map(|(_, s)| s).collect();
        for s in subscriptions {
            let _ = s.task.await;
        }
        let publisher = inner.publisher.lock().take();
        if let Some(task) = publisher {
            let _ = task.await;
        }
    }

    /// Stops the publisher and every consumer now, without waiting: unconfirmed envelopes are
    /// abandoned, consumers store their offset and close their channels as they exit. Usable
    /// where nothing can be awaited (a `Drop`, a panic path); prefer [`AmqpBus::shutdown`].
    pub fn abort(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Deletes this node's stream and everything in it. For tests and decommissioning; a node
    /// that keeps running would recreate it on its next reconnect.
    pub async fn delete_own_stream(&self) -> Result<(), Error> {
        delete_stream(&self.inner.url, &self.inner.cfg.stream_name(&self.inner.cfg.node_id)).await
    }
}

#[async_trait]
impl Bus for AmqpBus {
    /// Queues `envelope` for its destination's stream and returns without touching the network.
    /// The bus overwrites `from_node` with its own node id and `seq` with the next number of its
    /// sequence clock, in queue order, so `seq` grows per (sender, destination) exactly as the
    /// envelopes were published. Refused with [`Error::Backlog`] when the queue is full,
    /// [`Error::NoSuchNode`] when `to_node` cannot name a stream, [`Error::Closed`] after
    /// shutdown.
    async fn publish(&self, envelope: BusEnvelope) -> Result<(), Error> {
        if !is_short_id(&envelope.to_node) {
            return Err(Error::NoSuchNode(envelope.to_node));
        }
        match self.inner.commands.try_send(Command::Publish(envelope)) {
            Ok(()) => {
                self.inner.stats.add(Stat::EnvelopesQueued, 1);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.stats.add(Stat::EnvelopesRejected, 1);
                Err(Error::Backlog)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Closed),
        }
    }

    fn transport_stats(&self) -> Option<BusStatsSnapshot> {
        Some(self.stats_snapshot())
    }

    /// Declares `node_id`'s stream and consumes it from the stored offset + 1 (or from "next"
    /// when none is stored). The returned channel stays the same across reconnects; it closes
    /// after [`AmqpBus::shutdown`]. Dropping it stops the consumer, which stores the offset of
    /// the last envelope it handed over, so a later `subscribe` continues right after it.
    async fn subscribe(&self, node_id: &str) -> Result<mpsc::UnboundedReceiver<BusEnvelope>, Error> {
        let inner = &self.inner;
        if !is_short_id(node_id) {
            return Err(Error::NoSuchNode(node_id.to_owned()));
        }
        if *inner.stop.borrow() {
            return Err(Error::Closed);
        }
        let mut subscriptions = inner.subscriptions.lock().await;
        if let Some(old) = subscriptions.remove(node_id) {
            let listening = old.deliveries.upgrade().is_some_and(|tx| !tx.is_closed());
            if listening && !old.task.is_finished() {
                subscriptions.insert(node_id.to_owned(), old);
                return Err(Error::AlreadySubscribed(node_id.to_owned()));
            }
            // Its subscriber is gone: let it store its last offset before we resume from it.
            let _ = old.task.await;
        }
        let stream = inner.cfg.stream_name(node_id);
        let stored = timeout(inner.cfg.op_timeout, "offset load", inner.offsets.load(&stream)).await??;
        let (tx, rx) = mpsc::unbounded_channel();
        let consumer = Consumer::new(
            inner.url.clone(),
            inner.cfg.clone(),
            node_id.to_owned(),
            stream,
            inner.stats.clone(),
            inner.offsets.clone(),
            tx.clone(),
            inner.stop.subscribe(),
            stored,
        );
        let opened = consumer.open(Start::First).await?;
        let task = tokio::spawn(consumer.run(opened));
        subscriptions.insert(
            node_id.to_owned(),
            Subscription {
                task,
                deliveries: tx.downgrade(),
            },
        );
        Ok(rx)
    }
}

/// Deletes stream `name` (and what it holds) on the broker at `url`. Deleting one that does not
/// exist succeeds. For test clean-up and decommissioning nodes.
pub async fn delete_stream(url: &str, name: &str) -> Result<(), Error> {
    let name = short_string(name)?;
    let op_timeout = Duration::from_secs(10);
    let conn = open_connection(url, "strait-bus admin", op_timeout).await?;
    let result = async {
        let channel = amqp("channel.open", op_timeout, conn.create_channel()).await?;
        amqp(
            "queue.delete",
            op_timeout,
            channel.queue_delete(name, QueueDeleteOptions::default()),
        )
        .await?;
        Ok(())
    }
    .await;
    let _ = tokio::time::timeout(op_timeout, conn.close(200, "done".into())).await;
    result
}

/// Opens a connection named `name` (shown in the broker's management UI), bounded by `limit`.
pub(crate) async fn open_connection(url: &str, name: &str, limit: Duration) -> Result<Connection, Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(limit, Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Error::Connect(e)),
        Err(_) => Err(Error::Timeout("AMQP connect")),
    }
}

/// Opens a channel with publisher confirms on.
pub(crate) async fn confirm_channel(conn: &Connection, limit: Duration) -> Result<Channel, Error> {
    let channel = amqp("channel.open", limit, conn.create_channel()).await?;
    amqp(
        "confirm.select",
        limit,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// Declares dispatch stream `name` with `cfg`'s retention (idempotent with the same arguments).
pub(crate) async fn declare_stream(channel: &Channel, name: &str, cfg: &BusConfig) -> Result<(), Error> {
    amqp(
        "queue.declare",
        cfg.op_timeout,
        channel.queue_declare(
            short_string(name)?,
            QueueDeclareOptions::durable(),
            cfg.stream_arguments(),
        ),
    )
    .await?;
    Ok(())
}

/// An AMQP short string from our own text; the names we build are far below the 255-byte limit,
/// but lapin's `From` would panic on a longer one, so it is checked.
pub(crate) fn short_string(s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|_| Error::Config(format!("AMQP name too long: {} bytes", s.len())))
}

/// Runs one lapin call under `limit`, naming it in the error.
pub(crate) async fn amqp<T>(
    op: &'static str,
    limit: Duration,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Amqp { op, source }),
        Err(_) => Err(Error::Timeout(op)),
    }
}

/// Bounds any future by `limit`.
pub(crate) async fn timeout<T>(limit: Duration, what: &'static str, f: impl Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(limit, f).await.map_err(|_| Error::Timeout(what))
}
