//! Parley's append-only write-ahead log. It knows nothing of chat: records are typed bytes
//! with an LSN, an epoch and a timestamp.
//!
//! - [`format`] and [`scan`]: the on-disk format and recovery's reading of it, pure.
//! - [`recovery`]: a directory's verdict (clean, torn tail, corruption) and its repair.
//! - [`io`]: aligned buffers and the durable-write operation (io_uring, or a fallback, or
//!   a fault injector).
//! - [`log`]: the log itself: appends, group commit, reads, replication, retention.

pub mod error;
pub mod format;
pub mod io;
pub mod log;
pub mod recovery;
pub mod scan;

pub use error::WalError;
pub use format::Lsn;
pub use log::{Entry, Record, RecoveryReport, Retention, Wal, WalOptions};
