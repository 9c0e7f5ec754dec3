//! The log as the chat core sees it: append without blocking, read back by LSN. The
//! shard's WAL implements it; tests and benchmarks use [`MemoryLog`]. Durability is not
//! asked here: the driver tells the core which LSN is durable (`ShardCore::on_durable`).

use std::sync::Arc;

use parley_wal::{Wal, WalError};

use crate::record::CHAT_RECORD_TYPE;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// The log's buffer is full for now: answer `unavailable`, the client retries.
    #[error("the log is full for now")]
    Full,
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
}

/// The shard's WAL.
pub struct WalLog(pub Arc<Wal>);

impl ChatLog for WalLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let entry = parley_wal::Entry {
            record_type: CHAT_RECORD_TYPE,
            timestamp,
            payload,
        };
        self.0
            .try_append_batch(&[entry])
            .map_err(|error| match error {
                WalError::Full => LogError::Full,
                other => LogError::Failed(other.to_string()),
            })
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        match self.0.read(lsn) {
            Ok(record) => Ok(record.payload),
            Err(WalError::NotFound(lsn)) => Err(LogError::Missing(lsn)),
            Err(other) => Err(LogError::Failed(other.to_string())),
        }
    }
}

/// A log in memory, for tests and benchmarks: LSNs from 1, nothing is ever full.
#[derive(Debug, Default)]
pub struct MemoryLog {
    pub records: Vec<Vec<u8>>,
}

impl MemoryLog {
    pub fn last_lsn(&self) -> u64 {
        self.records.len() as u64
    }
}

impl ChatLog for MemoryLog {
    fn append(&mut self, _timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        self.records.push(payload.to_vec());
        Ok(self.records.len() as u64)
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        lsn.checked_sub(1)
            .and_then(|i| self.records.get(i as usize))
            .cloned()
            .ok_or(LogError::Missing(lsn))
    }
}
