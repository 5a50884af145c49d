//! Counters of one [`AmqpBus`](crate::AmqpBus), for the gateway's `/metrics`. Plain relaxed
//! atomics: each counter is monotonic on its own, and no reader needs two of them to agree.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the bus's publisher and consumer tasks. Read them with
/// [`BusStats::snapshot`].
#[derive(Debug, Default)]
pub struct BusStats {
    envelopes_queued: AtomicU64,
    envelopes_rejected: AtomicU64,
    envelopes_published: AtomicU64,
    batches_published: AtomicU64,
    batches_confirmed: AtomicU64,
    batches_republished: AtomicU64,
    envelopes_unroutable: AtomicU64,
    envelopes_delivered: AtomicU64,
    duplicates_dropped: AtomicU64,
    malformed_dropped: AtomicU64,
    reconnects: AtomicU64,
    offset_store_failures: AtomicU64,
}

/// One reading of every [`BusStats`] counter. All are totals since the bus was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStatsSnapshot {
    /// Envelopes [`Bus::publish`](crate::Bus::publish) accepted into the publish queue.
    pub envelopes_queued: u64,
    /// Envelopes refused because the publish queue was full ([`Error::Backlog`](crate::Error::Backlog)).
    pub envelopes_rejected: u64,
    /// Envelopes inside batches the broker confirmed (each counted once, however often its batch
    /// was sent).
    pub envelopes_published: u64,
    /// AMQP messages (batches) sent to the broker, re-sends included.
    pub batches_published: u64,
    /// Publisher confirms (acks) received.
    pub batches_confirmed: u64,
    /// Batches sent again because their confirm was nacked or lost with the connection.
    pub batches_republished: u64,
    /// Envelopes the broker returned because the destination node has no stream (never
    /// started, or its stream was deleted). They are dropped.
    pub envelopes_unroutable: u64,
    /// Envelopes handed to a subscriber's channel.
    pub envelopes_delivered: u64,
    /// Envelopes dropped because their sender's sequence number was already seen (replays).
    pub duplicates_dropped: u64,
    /// AMQP messages or envelopes in them that failed to decode or were addressed elsewhere.
    pub malformed_dropped: u64,
    /// Connections re-established after a loss (publisher and consumers).
    pub reconnects: u64,
    /// Offset writes to the [`OffsetStore`](crate::OffsetStore) that failed or timed out.
    pub offset_store_failures: u64,
}

impl BusStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> BusStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BusStatsSnapshot {
            envelopes_queued: r(&self.envelopes_queued),
            envelopes_rejected: r(&self.envelopes_rejected),
            envelopes_published: r(&self.envelopes_published),
            batches_published: r(&self.batches_published),
            batches_confirmed: r(&self.batches_confirmed),
            batches_republished: r(&self.batches_republished),
            envelopes_unroutable: r(&self.envelopes_unroutable),
            envelopes_delivered: r(&self.envelopes_delivered),
            duplicates_dropped: r(&self.duplicates_dropped),
            malformed_dropped: r(&self.malformed_dropped),
            reconnects: r(&self.reconnects),
            offset_store_failures: r(&self.offset_store_failures),
        }
    }
}

impl BusStatsSnapshot {
    /// Every counter with a stable snake-case name (a metric label), so whoever exports them
    /// gets a counter added here without touching its own code.
    pub fn named(&self) -> [(&'static str, u64); 12] {
        [
            ("envelopes_queued", self.envelopes_queued),
            ("envelopes_rejected", self.envelopes_rejected),
            ("envelopes_published", self.envelopes_published),
            ("batches_published", self.batches_published),
            ("batches_confirmed", self.batches_confirmed),
            ("batches_republished", self.batches_republished),
            ("envelopes_unroutable", self.envelopes_unroutable),
            ("envelopes_delivered", self.envelopes_delivered),
            ("duplicates_dropped", self.duplicates_dropped),
            ("malformed_dropped", self.malformed_dropped),
            ("reconnects", self.reconnects),
            ("offset_store_failures", self.offset_store_failures),
        ]
    }
}

/// Names the counters for the tasks that bump them, so call sites read `stats.add(Stat::X, n)`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
    EnvelopesQueued,
    EnvelopesRejected,
    EnvelopesPublished,
    BatchesPublished,
    BatchesConfirmed,
    BatchesRepublished,
    EnvelopesUnroutable,
    EnvelopesDelivered,
    DuplicatesDropped,
    MalformedDropped,
    Reconnects,
    OffsetStoreFailures,
}

impl BusStats {
    pub(crate) fn add(&self, stat: Stat, n: u64) {
        let c = match stat {
            Stat::EnvelopesQueued => &self.envelopes_queued,
            Stat::EnvelopesRejected => &self.envelopes_rejected,
            Stat::EnvelopesPublished => &self.envelopes_published,
            Stat::BatchesPublished => &self.batches_published,
            Stat::BatchesConfirmed => &self.batches_confirmed,
            Stat::BatchesRepublished => &self.batches_republished,
            Stat::EnvelopesUnroutable => &self.envelopes_unroutable,
            Stat::EnvelopesDelivered => &self.envelopes_delivered,
            Stat::DuplicatesDropped => &self.duplicates_dropped,
            Stat::MalformedDropped => &self.malformed_dropped,
            Stat::Reconnects => &self.reconnects,
            Stat::OffsetStoreFailures => &self.offset_store_failures,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }
}
