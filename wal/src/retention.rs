//! Retention: the snapshot LSN (the owner's state up to it is captured elsewhere) and the
//! deletion of old segments wholly covered by it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::error::WalError;
use crate::format::Lsn;
use crate::log::Wal;
use crate::number_file::{read_number, write_number};
use crate::read::SegmentIndex;
use crate::recovery::sync_dir;

/// The snapshot LSN, persisted beside the segments.
const SNAPSHOT_FILE: &str = "snapshot";

/// Retention of segments already covered by a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Segments older than this (by modification time) go.
    pub max_age: Duration,
    /// Oldest segments go while the log is larger than this.
    pub max_bytes: u64,
}

impl Wal {
    /// Record that the owner's state up to `lsn` is captured elsewhere; segments wholly
    /// at or before it become eligible for retention.
    pub fn record_snapshot(&self, lsn: Lsn) -> Result<(), WalError> {
        if lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        write_number(&self.shared.dir.join(SNAPSHOT_FILE), lsn)
    }

    /// The latest snapshot LSN, if any.
    pub fn snapshot_lsn(&self) -> Result<Option<Lsn>, WalError> {
        read_number(&self.shared.dir.join(SNAPSHOT_FILE))
    }

    /// Delete segments that lie wholly at or before the latest snapshot and are past
    /// retention: older than `max_age`, or beyond `max_bytes` (oldest first). The active
    /// segment always stays. Returns the deleted files.
    pub fn apply_retention(
        &self,
        retention: Retention,
        now: SystemTime,
    ) -> Result<Vec<PathBuf>, WalError> {
        let Some(snapshot) = self.snapshot_lsn()? else {
            return Ok(Vec::new());
        };
        let mut segments = self.shared.segments_mut();
        let size = |s: &SegmentIndex| std::fs::metadata(&s.path).map_or(0, |m| m.len());
        let mut total: u64 = segments.iter().map(size).sum();
        let mut deleted = Vec::new();
        while segments.len() > 1 && segments[0].next_lsn - 1 <= snapshot {
            let oldest = &segments[0];
            let age = std::fs::metadata(&oldest.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .unwrap_or_default();
            if age <= retention.max_age && total <= retention.max_bytes {
                break;
            }
            total -= size(oldest);
            std::fs::remove_file(&oldest.path)
                .map_err(|e| WalError::io("remove", &oldest.path, e))?;
            deleted.push(oldest.path.clone());
            segments.remove(0);
        }
        assert!(!segments.is_empty(), "the active segment stays");
        if !deleted.is_empty() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(deleted)
    }
}
