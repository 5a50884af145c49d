//! Where a consumer remembers how far it has read its stream. RabbitMQ does not keep offsets
//! for AMQP 0.9.1 stream consumers, so the node keeps its own: in Redis (the gateway's
//! directory) in a cluster, in memory in tests.

use std::collections::HashMap;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::Error;

/// Remembers, per stream name, the offset of the last message whose envelopes were all handed to
/// the subscriber. The consumer resumes at `load() + 1` (stream offsets are inclusive).
///
/// The bus calls `store` with increasing offsets for one stream (forward-only) and at most every
/// ~50 ms, so an implementation need not compare before writing. A stored offset that lags
/// behind only means replay, which the per-sender sequence numbers drop again; one that runs
/// ahead would lose envelopes, so never store anything the bus did not hand you.
#[async_trait]
pub trait OffsetStore: Send + Sync {
    /// The last stored offset of `stream`, or `None` if it has never been stored.
    async fn load(&self, stream: &str) -> Result<Option<u64>, Error>;
    /// Records `offset` as the last one delivered from `stream`.
    async fn store(&self, stream: &str, offset: u64) -> Result<(), Error>;
}

/// Offsets kept in process memory: for tests, and for a node that accepts replaying from "next"
/// after a restart. Shared by cloning an `Arc<MemoryOffsets>`.
#[derive(Debug, Default)]
pub struct MemoryOffsets {
    offsets: Mutex<HashMap<String, u64>>,
}

impl MemoryOffsets {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stored offset of `stream`, without going through the async trait (for tests).
    pub fn offset(&self, stream: &str) -> Option<u64> {
        self.offsets.lock().get(stream).copied()
    }
}

#[async_trait]
impl OffsetStore for MemoryOffsets {
    async fn load(&self, stream: &str) -> Result<Option<u64>, Error> {
        Ok(self.offset(stream))
    }

    async fn store(&self, stream: &str, offset: u64) -> Result<(), Error> {
        self.offsets.lock().insert(stream.to_owned(), offset);
        Ok(())
    }
}
