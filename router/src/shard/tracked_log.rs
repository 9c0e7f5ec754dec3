//! The log as the shard core holds it.

use crate::chat_log::{ChatLog, LogError};

/// A log that remembers the last LSN it handed out.
pub(super) struct TrackedLog {
    pub(super) inner: Box<dyn ChatLog>,
    pub(super) last_appended: u64,
}

impl TrackedLog {
    fn appended(&mut self, lsn: u64) {
        // The log hands out LSNs in order, one per record, after those recovered.
        assert!(
            lsn > self.last_appended,
            "the log handed out LSN {lsn} after {}",
            self.last_appended
        );
        self.last_appended = lsn;
    }
}

impl ChatLog for TrackedLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let lsn = self.inner.append(timestamp, payload)?;
        self.appended(lsn);
        Ok(lsn)
    }

    fn append_deferred(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let lsn = self.inner.append_deferred(timestamp, payload)?;
        self.appended(lsn);
        Ok(lsn)
    }

    fn refusing(&self) -> Option<LogError> {
        self.inner.refusing()
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        self.inner.read(lsn)
    }

    fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes()
    }
}
