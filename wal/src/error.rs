//! The log's errors. Each names what failed and where.

use std::path::PathBuf;
use std::sync::Arc;

use crate::format::Lsn;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("corruption in {path} at offset {offset}: {detail}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error(
        "the log is poisoned by an earlier I/O failure ({0}); nothing after it is acknowledged"
    )]
    Poisoned(Arc<str>),
    /// A refusal, not a failure: the batch of `size` stored bytes is larger than
    /// [`Wal::max_batch_size`](crate::Wal::max_batch_size) (`max`), so nothing of it was
    /// appended and the log is as it was. The caller splits its records into batches
    /// of at most `max` bytes (a single record larger than that can never be appended).
    #[error("a batch of {size} bytes exceeds the largest batch the log takes ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("the log's buffer is full: the disk is behind")]
    Full,
    /// A refusal, not a failure: the disk (or the quota) had no room for the log's next
    /// segment (`op` on `path` failed with ENOSPC or EDQUOT, `free_bytes` free then), and
    /// what is left of the active segment is promised. Nothing of this append was taken;
    /// everything appended before it becomes durable as usual. The writer retries the
    /// allocation and the log takes appends again once it succeeds (see `space`).
    #[error("no space for the log: {op} {path}: {source} ({} bytes free)", free_bytes.map_or("unknown".to_string(), |b| b.to_string()))]
    NoSpace {
        op: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
        free_bytes: Option<u64>,
    },
    #[error("stale epoch {got}: the log is at epoch {current}")]
    StaleEpoch { got: u32, current: u32 },
    #[error("expected LSN {expected}, got {got}")]
    LsnMismatch { expected: Lsn, got: Lsn },
    #[error("replicated bytes are not valid records at LSN {lsn}: {detail}")]
    BadReplicatedRecords { lsn: Lsn, detail: String },
    #[error("LSN {0} is not in the log")]
    NotFound(Lsn),
    #[error("LSN {0} is inside a batch: a log can only be cut at a batch's end")]
    NotBatchEnd(Lsn),
    #[error("the log directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("the log is closed")]
    Closed,
    /// `WalOptions::segment_size` leaves no room for records: a segment holds its header
    /// block and at least one block of records.
    #[error("a segment size of {configured} bytes leaves no room for records: it must be at least {min} bytes")]
    SegmentSizeTooSmall { configured: u64, min: u64 },
    /// `WalOptions::segment_size` is over the largest size a segment header may record
    /// (`MAX_SEGMENT_SIZE`, 1 TiB).
    #[error("a segment size of {configured} bytes is over the largest, {max} bytes")]
    SegmentSizeTooLarge { configured: u64, max: u64 },
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }
}
