//! The body of one AMQP message on a dispatch stream: several encoded envelopes for the same
//! destination node, so the broker handles one message (one store, one confirm, one delivery)
//! per batch instead of per frame.
//!
//! Layout: the 4-byte magic [`MAGIC`] (format and version), then one or more entries, each a
//! big-endian `u32` length followed by that many bytes of `encode_envelope` output. The magic
//! lets a consumer refuse anything else that lands in its stream before reading lengths.

use bytes::Bytes;

/// Leads every batch; bump the digit if the layout ever changes.
pub(crate) const MAGIC: &[u8; 4] = b"STB1";

/// Bytes an entry adds beyond its envelope.
const ENTRY_HEADER: usize = 4;

/// Why a message body is not a batch. Each refusal is counted as one malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    /// Does not start with [`MAGIC`].
    #[error("not a Strait batch (bad magic)")]
    BadMagic,
    /// Holds no envelope at all.
    #[error("empty batch")]
    Empty,
    /// An entry's length is zero or runs past the end of the message.
    #[error("entry at byte {at} is truncated or empty")]
    BadEntry {
        /// Where the entry's length prefix starts.
        at: usize,
    },
}

/// Accumulates the entries of one batch.
#[derive(Debug)]
pub(crate) struct BatchBuilder {
    buf: Vec<u8>,
    count: usize,
}

impl BatchBuilder {
    /// An empty batch, with room for `capacity` bytes before it reallocates.
    pub(crate) fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(MAGIC.len()));
        buf.extend_from_slice(MAGIC);
        Self { buf, count: 0 }
    }

    /// Appends one encoded envelope. Envelopes are bounded by the decoder's `max_frame_bytes`
    /// (1 MiB), far below `u32::MAX`; a larger one is clamped to a length the consumer refuses
    /// rather than wrapping into a misleading one.
    pub(crate) fn push(&mut self, envelope: &[u8]) {
        let len = u32::try_from(envelope.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(envelope);
        self.count += 1;
    }

    /// Size of the message body so far.
    pub(crate) fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Size the body would have after pushing an envelope of `len` bytes.
    pub(crate) fn len_with(&self, len: usize) -> usize {
        self.buf.len() + ENTRY_HEADER + len
    }

    /// Envelopes pushed.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The finished message body.
    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Splits a message body into its envelopes' bytes (zero-copy slices of `body`). The framing is
/// checked whole before anything is returned, so a corrupt batch yields no envelope at all.
pub(crate) fn split(body: Bytes) -> Result<Vec<Bytes>, BatchError> {
    if body.len() < MAGIC.len() || &body[..MAGIC.len()] != MAGIC {
        return Err(BatchError::BadMagic);
    }
    let mut entries = Vec::new();
    let mut at = MAGIC.len();
    while at < body.len() {
        let header_end = at.checked_add(ENTRY_HEADER).filter(|&e| e <= body.len());
        let Some(header_end) = header_end else {
            return Err(BatchError::BadEntry { at });
        };
        let mut len_bytes = [0u8; ENTRY_HEADER];
        len_bytes.copy_from_slice(&body[at..header_end]);
        let len = u32::from_be_bytes(len_bytes) as usize;
        let end = header_end.checked_add(len).filter(|&e| e <= body.len());
        let Some(end) = end.filter(|_| len > 0) else {
            return Err(BatchError::BadEntry { at });
        };
        entries.push(body.slice(header_end..end));
        at = end;
    }
    if entries.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(entries: &[&[u8]]) -> Bytes {
        let mut b = BatchBuilder::new(64);
        for e in entries {
            b.push(e);
        }
        Bytes::from(b.finish())
    }

    #[test]
    fn round_trips_entries_in_order() {
        let body = built(&[b"one", b"two-two", b"3"]);
        let parts = split(body).unwrap();
        assert_eq!(parts, vec![&b"one"[..], &b"two-two"[..], &b"3"[..]]);
    }

    #[test]
    fn len_with_predicts_the_size_after_push() {
        let mut b = BatchBuilder::new(0);
        let predicted = b.len_with(5);
        b.push(b"12345");
        assert_eq!(b.len_bytes(), predicted);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn split_refuses_garbage_without_magic() {
        assert_eq!(split(Bytes::from_static(b"hello world")), Err(BatchError::BadMagic));
        assert_eq!(split(Bytes::from_static(b"ST")), Err(BatchError::BadMagic));
    }

    #[test]
    fn split_refuses_an_empty_batch() {
        assert_eq!(split(Bytes::from_static(MAGIC)), Err(BatchError::Empty));
    }

    #[test]
    fn split_refuses_a_truncated_entry() {
        let mut body = built(&[b"abc", b"defgh"]).to_vec();
        body.truncate(body.len() - 1);
        assert_eq!(split(Bytes::from(body)), Err(BatchError::BadEntry { at: 11 }));
    }

    #[test]
    fn split_refuses_a_partial_length_prefix() {
        let mut body = built(&[b"abc"]).to_vec();
        body.extend_from_slice(&[0, 0]);
        assert_eq!(split(Bytes::from(body)), Err(BatchError::BadEntry { at: 11 }));
    }

    #[test]
    fn split_refuses_a_zero_length_entry() {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(split(Bytes::from(body)), Err(BatchError::BadEntry { at: 4 }));
    }

    #[test]
    fn split_refuses_a_length_past_the_end() {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        body.extend_from_slice(b"xyz");
        assert_eq!(split(Bytes::from(body)), Err(BatchError::BadEntry { at: 4 }));
    }
}
