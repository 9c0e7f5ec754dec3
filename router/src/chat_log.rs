//! The log as the chat core sees it: append without blocking, read back by LSN, the
//! largest record one append takes, and whether it refuses appends for a while (a full
//! disk). The shard's WAL implements it; tests and benchmarks
//! use [`MemoryLog`]. Durability is not asked here: the driver tells the core which LSN
//! is durable (`ShardCore::on_durable`).

use std::sync::Arc;

use parley_wal::format::stored_len;
use parley_wal::{Wal, WalError};

use crate::record::CHAT_RECORD_TYPE;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// The log's buffer is full for now: answer `unavailable`, the client retries.
    #[error("the log is full for now")]
    Full,
    /// The log's disk has no room (a refusal, not a failure: the log takes appends again
    /// once space is freed). The command is refused `unavailable`; nothing changed.
    #[error("the log's disk is full: {0}")]
    NoSpace(String),
    /// This one record is larger than the log takes ([`ChatLog::max_record_bytes`]):
    /// the command that made it is refused (`too_large`); nothing changed.
    #[error("a record of {size} bytes exceeds the largest the log takes ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    /// The log failed (an I/O error poisoned it): the shard must stop.
    #[error("the log failed: {0}")]
    Failed(String),
    #[error("no record at LSN {0}")]
    Missing(u64),
}

pub trait ChatLog {
    /// Append one chat record; its LSN is returned at once, durability follows.
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError>;
    /// A record appended earlier (durable or not).
    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError>;
    /// The largest payload one append takes; a larger one gets [`LogError::TooLarge`].
    /// At least [`MIN_RECORD_BYTES`].
    fn max_record_bytes(&self) -> usize;
    /// Append a record the core answered for before writing it (a turn's cursor
    /// advances, written at the turn's end): a log whose disk is full keeps some room
    /// for these, which [`append`](Self::append) does not take.
    fn append_deferred(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        self.append(timestamp, payload)
    }
    /// `Some(NoSpace)` while the log refuses appends for a while (its disk is full):
    /// commands whose records would be written late are refused with it at once, so
    /// that the room kept for deferred records is never asked for more than it holds.
    fn refusing(&self) -> Option<LogError> {
        None
    }
}

/// Every log takes records of this size: a cursor advance, a reaction or a last-seen
/// record (ids of at most 64 bytes each) always fits one, so the records the core
/// splits (cursor advances) can always be split to fit.
pub const MIN_RECORD_BYTES: usize = 1024;

/// The largest payload of a record that the WAL takes alone in one batch of at most
/// `max_batch_size` bytes (its header and padding count against the batch).
pub fn wal_record_limit(max_batch_size: usize) -> usize {
    let mut payload = max_batch_size.saturating_sub(stored_len(0));
    while payload > 0 && stored_len(payload) > max_batch_size {
        payload -= 1;
    }
    payload
}

/// The shard's WAL.
pub struct WalLog(pub Arc<Wal>);

impl WalLog {
    /// The chat core's name for the log's `error` on an append of `size` bytes.
    fn log_error(&self, error: WalError, size: usize) -> LogError {
        match error {
            WalError::Full => LogError::Full,
            WalError::NoSpace { .. } => LogError::NoSpace(error.to_string()),
            WalError::TooLarge { .. } => LogError::TooLarge {
                size,
                max: self.max_record_bytes(),
            },
            other => LogError::Failed(other.to_string()),
        }
    }
}

impl ChatLog for WalLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let entry = parley_wal::Entry {
            record_type: CHAT_RECORD_TYPE,
            timestamp,
            payload,
        };
        let appended = self.0.try_append_batch(&[entry]);
        appended.map_err(|error| self.log_error(error, payload.len()))
    }

    fn append_deferred(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let entry = parley_wal::Entry {
            record_type: CHAT_RECORD_TYPE,
            timestamp,
            payload,
        };
        let appended = self.0.try_append_reserved(&[entry]);
        appended.map_err(|error| self.log_error(error, payload.len()))
    }

    fn refusing(&self) -> Option<LogError> {
        let error = self.0.refusing()?;
        Some(LogError::NoSpace(error.to_string()))
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        match self.0.read(lsn) {
            Ok(record) => Ok(record.payload),
            Err(WalError::NotFound(lsn)) => Err(LogError::Missing(lsn)),
            Err(other) => Err(LogError::Failed(other.to_string())),
        }
    }

    fn max_record_bytes(&self) -> usize {
        wal_record_limit(self.0.max_batch_size())
    }
}

/// A log in memory, for tests and benchmarks: LSNs from 1, nothing is ever full, and
/// records up to `max_record_bytes` (unbounded by default).
#[derive(Debug)]
pub struct MemoryLog {
    pub records: Vec<Vec<u8>>,
    pub max_record_bytes: usize,
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            max_record_bytes: usize::MAX,
        }
    }
}

impl MemoryLog {
    /// An empty log that takes records up to `max` bytes.
    pub fn with_max_record_bytes(max: usize) -> Self {
        Self {
            records: Vec::new(),
            max_record_bytes: max,
        }
    }

    pub fn last_lsn(&self) -> u64 {
        self.records.len() as u64
    }
}

impl ChatLog for MemoryLog {
    fn append(&mut self, _timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        if payload.len() > self.max_record_bytes {
            return Err(LogError::TooLarge {
                size: payload.len(),
                max: self.max_record_bytes,
            });
        }
        self.records.push(payload.to_vec());
        Ok(self.records.len() as u64)
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        lsn.checked_sub(1)
            .and_then(|i| self.records.get(i as usize))
            .cloned()
            .ok_or(LogError::Missing(lsn))
    }

    fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_record_limit_leaves_room_for_the_header() {
        for batch in [4096, 4100, 1 << 20] {
            let payload = wal_record_limit(batch);
            assert!(stored_len(payload) <= batch, "{batch}");
            assert!(stored_len(payload + 1) > batch, "{batch}");
        }
        assert_eq!(wal_record_limit(0), 0);
    }
}
