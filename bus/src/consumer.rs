//! The consumer task of one subscription: reads a dispatch stream, unpacks batches, drops
//! replayed envelopes by sequence number, and hands the rest, in order, to the subscriber's
//! channel. It acks in batches and stores its offset after delivering, so a reconnect or a
//! restart resumes right after what the subscriber got.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use strait_schema::{decode_envelope_bytes, BusEnvelope};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::amqp::{amqp, declare_stream, open_connection, short_string, BusConfig};
use crate::batch;
use crate::offsets::OffsetStore;
use crate::stats::{BusStats, Stat};
use crate::Error;

/// Which start position to use when nothing has been delivered or stored yet.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// The first subscription: "next", i.e. only what is published from now on.
    First,
    /// A reconnect before anything was delivered: from the time of subscribing, so what was
    /// published during the outage is not skipped. Timestamps are chunk-granular, so this may
    /// also bring a few older envelopes, which is harmless for a fresh subscriber.
    Resume,
}

/// An open consumer: its connection must outlive the channel and the delivery stream.
pub(crate) struct Opened {
    conn: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
}

/// How one connection's consumption ended.
enum End {
    /// Shutdown, or the subscriber dropped its channel: do not reconnect.
    Stop,
    /// The connection, channel or consumer went away: reconnect.
    Lost(Error),
}

pub(crate) struct Consumer {
    url: String,
    cfg: Arc<BusConfig>,
    node_id: String,
    stream: String,
    stats: Arc<BusStats>,
    offsets: Arc<dyn OffsetStore>,
    tx: mpsc::UnboundedSender<BusEnvelope>,
    stop: watch::Receiver<bool>,
    /// Last offset written to the offset store.
    stored: Option<u64>,
    /// Last offset whose envelopes were all handed over (or dropped); ahead of `stored`.
    delivered: Option<u64>,
    /// Highest `seq` handed over per sending node. Survives reconnects, so re-sent batches and
    /// replays are dropped.
    highest: HashMap<String, u64>,
    subscribed_at: u64,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)] // one private constructor, called once
    pub(crate) fn new(
        url: String,
        cfg: Arc<BusConfig>,
        node_id: String,
        stream: String,
        stats: Arc<BusStats>,
        offsets: Arc<dyn OffsetStore>,
        tx: mpsc::UnboundedSender<BusEnvelope>,
        stop: watch::Receiver<bool>,
        stored: Option<u64>,
    ) -> Self {
        let subscribed_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Consumer {
            url,
            cfg,
            node_id,
            stream,
            stats,
            offsets,
            tx,
            stop,
            stored,
            delivered: None,
            highest: HashMap::new(),
            subscribed_at,
        }
    }

    /// Connects, declares the stream, sets the prefetch (streams refuse consumers without one)
    /// and starts consuming after the last delivered or stored offset.
    pub(crate) async fn open(&self, start: Start) -> Result<Opened, Error> {
        let cfg = &self.cfg;
        let name = format!("strait-bus {} consumer", self.node_id);
        let conn = open_connection(&self.url, &name, cfg.op_timeout).await?;
        let opened = async {
            let channel = amqp("channel.open", cfg.op_timeout, conn.create_channel()).await?;
            declare_stream(&channel, &self.stream, cfg).await?;
            amqp(
                "basic.qos",
                cfg.op_timeout,
                channel.basic_qos(cfg.prefetch, BasicQosOptions { global: false }),
            )
            .await?;
            let mut args = FieldTable::default();
            args.insert("x-stream-offset".into(), self.start_position(start));
            // `no_ack` stays false: on a stream it is a connection-level error.
            let deliveries = amqp(
                "basic.consume",
                cfg.op_timeout,
                channel.basic_consume(
                    short_string(&self.stream)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    args,
                ),
            )
            .await?;
            Ok::<_, Error>((channel, deliveries))
        }
        .await;
        match opened {
            Ok((channel, deliveries)) => Ok(Opened {
                conn,
                channel,
                deliveries,
            }),
            Err(e) => {
                close_in_background(conn, cfg);
                Err(e)
            }
        }
    }

    /// `x-stream-offset` for the next consume. Numeric offsets are inclusive, hence `+ 1`.
    fn start_position(&self, start: Start) -> AMQPValue {
        match self.delivered.max(self.stored) {
            Some(offset) => AMQPValue::LongLongInt(i64::try_from(offset.saturating_add(1)).unwrap_or(i64::MAX)),
            None => match start {
                Start::First => AMQPValue::LongString("next".into()),
                Start::Resume => AMQPValue::Timestamp(self.subscribed_at),
            },
        }
    }

    /// Consumes until shutdown or until the subscriber goes away, reconnecting with backoff in
    /// between. The subscriber's channel is the same throughout.
    pub(crate) async fn run(mut self, first: Opened) {
        let mut opened = Some(first);
        let mut delay = self.cfg.reconnect_min;
        loop {
            if let Some(o) = opened.take() {
                let end = self.consume(o).await;
                self.store_offset().await;
                match end {
                    End::Stop => break,
                    End::Lost(e) => {
                        tracing::warn!(stream = %self.stream, error = %e, "bus consumer lost its connection");
                        delay = self.cfg.reconnect_min;
                    }
                }
            }
            if *self.stop.borrow() || self.tx.is_closed() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => break,
                _ = self.tx.closed() => break,
            }
            match self.open(Start::Resume).await {
                Ok(o) => {
                    self.stats.add(Stat::Reconnects, 1);
                    tracing::info!(stream = %self.stream, after = ?self.delivered, "bus consumer reconnected");
                    opened = Some(o);
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, retry_in = ?delay, "bus consumer cannot reconnect");
                    delay = (delay * 2).min(self.cfg.reconnect_max);
                }
            }
        }
        self.store_offset().await;
    }

    async fn consume(&mut self, opened: Opened) -> End {
        let Opened {
            conn,
            channel,
            mut deliveries,
        } = opened;
        let tx = self.tx.clone();
        let mut stop = self.stop.clone();
        let (ack_every, offset_every) = (self.cfg.ack_every, self.cfg.offset_every);
        let mut unacked: u32 = 0;
        let mut last_tag: u64 = 0;
        let mut ack_due: Option<Instant> = None;
        let mut unstored: u32 = 0;
        let mut store_due: Option<Instant> = None;
        let end = loop {
            let deadline = match (ack_due, store_due) {
                (Some(a), Some(s)) => Some(a.min(s)),
                (a, s) => a.or(s),
            };
            tokio::select! {
                biased;
                _ = stop.changed() => break End::Stop,
                _ = tx.closed() => break End::Stop,
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => {
                        last_tag = delivery.delivery_tag;
                        unacked += 1;
                        if !self.handle(delivery) {
                            break End::Stop;
                        }
                        if unacked >= ack_every {
                            if let Err(e) = ack(&channel, last_tag, &self.cfg).await {
                                break End::Lost(e);
                            }
                            unacked = 0;
                            ack_due = None;
                        } else if ack_due.is_none() {
                            ack_due = Some(Instant::now() + self.cfg.ack_interval);
                        }
                        unstored += 1;
                        if unstored >= offset_every {
                            self.store_offset().await;
                            unstored = 0;
                            store_due = None;
                        } else if store_due.is_none() {
                            store_due = Some(Instant::now() + self.cfg.offset_interval);
                        }
                    }
                    Some(Err(source)) => break End::Lost(Error::Amqp { op: "basic.deliver", source }),
                    // The broker cancelled the consumer (its stream was deleted, or the node
                    // holding it went down).
                    None => break End::Lost(Error::Closed),
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let now = Instant::now();
                    if ack_due.is_some_and(|t| t <= now) {
                        if let Err(e) = ack(&channel, last_tag, &self.cfg).await {
                            break End::Lost(e);
                        }
                        unacked = 0;
                        ack_due = None;
                    }
                    if store_due.is_some_and(|t| t <= now) {
                        self.store_offset().await;
                        unstored = 0;
                        store_due = None;
                    }
                }
            }
        };
        match end {
            End::Stop => {
                if unacked > 0 {
                    let _ = ack(&channel, last_tag, &self.cfg).await;
                }
                let _ = tokio::time::timeout(self.cfg.op_timeout, conn.close(200, "shutdown".into())).await;
            }
            End::Lost(_) => close_in_background(conn, &self.cfg),
        }
        end
    }

    /// Unpacks one AMQP message and hands its new envelopes over. False when the subscriber has
    /// gone away (the message then counts as not delivered).
    fn handle(&mut self, delivery: Delivery) -> bool {
        let offset = stream_offset(&delivery.properties);
        if let (Some(o), Some(done)) = (offset, self.delivered) {
            if o <= done {
                return true; // already handed over before a reconnect
            }
        }
        let mut handed = 0u64;
        match batch::split(Bytes::from(delivery.data)) {
            Err(e) => {
                self.stats.add(Stat::MalformedDropped, 1);
                tracing::warn!(stream = %self.stream, offset, error = %e, "bus message dropped");
            }
            Ok(entries) => {
                for entry in entries {
                    let env = match decode_envelope_bytes(entry, &self.cfg.limits) {
                        Ok(env) if env.to_node == self.node_id => env,
                        Ok(env) => {
                            self.stats.add(Stat::MalformedDropped, 1);
                            tracing::warn!(stream = %self.stream, offset, to = %env.to_node, "bus envelope for another node dropped");
                            continue;
                        }
                        Err(e) => {
                            self.stats.add(Stat::MalformedDropped, 1);
                            tracing::warn!(stream = %self.stream, offset, error = %e, "bus envelope dropped");
                            continue;
                        }
                    };
                    if !self.is_new(&env) {
                        self.stats.add(Stat::DuplicatesDropped, 1);
                        continue;
                    }
                    if self.tx.send(env).is_err() {
                        self.stats.add(Stat::EnvelopesDelivered, handed);
                        return false;
                    }
                    handed += 1;
                }
            }
        }
        self.stats.add(Stat::EnvelopesDelivered, handed);
        if offset.is_some() {
            self.delivered = offset.max(self.delivered);
        }
        true
    }

    /// True if `env.seq` is above everything seen from its sender; records it if so.
    fn is_new(&mut self, env: &BusEnvelope) -> bool {
        match self.highest.get_mut(&env.from_node) {
            Some(high) if env.seq <= *high => false,
            Some(high) => {
                *high = env.seq;
                true
            }
            None => {
                self.highest.insert(env.from_node.clone(), env.seq);
                true
            }
        }
    }

    /// Writes the delivered offset if it moved. A failure is counted and retried on the next
    /// write; it only means more replay after a restart, never loss.
    async fn store_offset(&mut self) {
        let Some(done) = self.delivered else { return };
        if self.stored.is_some_and(|s| s >= done) {
            return;
        }
        match tokio::time::timeout(self.cfg.op_timeout, self.offsets.store(&self.stream, done)).await {
            Ok(Ok(())) => self.stored = Some(done),
            Ok(Err(e)) => {
                self.stats.add(Stat::OffsetStoreFailures, 1);
                tracing::warn!(stream = %self.stream, error = %e, "bus offset not stored");
            }
            Err(_) => {
                self.stats.add(Stat::OffsetStoreFailures, 1);
                tracing::warn!(stream = %self.stream, "bus offset store timed out");
            }
        }
    }
}

/// Acks every delivery up to `tag` at once.
async fn ack(channel: &Channel, tag: u64, cfg: &BusConfig) -> Result<(), Error> {
    amqp(
        "basic.ack",
        cfg.op_timeout,
        channel.basic_ack(tag, BasicAckOptions { multiple: true }),
    )
    .await
}

/// The `x-stream-offset` header the broker puts on every stream delivery.
fn stream_offset(props: &BasicProperties) -> Option<u64> {
    let value = props.headers().as_ref()?.inner().get("x-stream-offset")?;
    match *value {
        AMQPValue::LongLongInt(v) => u64::try_from(v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(v)),
        AMQPValue::ShortInt(v) => u64::try_from(v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(v)),
        AMQPValue::Timestamp(v) => Some(v),
        _ => None,
    }
}

fn close_in_background(conn: Connection, cfg: &BusConfig) {
    let limit = cfg.op_timeout;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(limit, conn.close(200, "strait-bus consumer reset".into())).await;
    });
}
