//! Parley's append-only write-ahead log. It knows nothing of chat: records are typed bytes
//! with an LSN, an epoch and a timestamp.
//!
//! - [`format`] and [`scan`]: the segment format and recovery's reading of it, pure.
//! - [`recovery`]: a directory's verdict (clean, torn tail, corruption) and its repair.
//! - [`io`]: aligned buffers and the durable-write operation (io_uring, or a fallback, or
//!   a fault injector).
//! - [`log`]: the facade, [`Wal`]: open, append, durable waits.
//! - `writer`: the group-commit writer thread and segment creation.
//! - `durable`: who waits for which LSN, and how a flush wakes them.
//! - `shared`: what appenders, readers and the writer thread share.
//! - `read`: reads by LSN, ranges, following the durable tail; the segment index.
//! - `replication`: epochs, a follower's appends, the cut of a divergent tail.
//! - `retention`: the snapshot LSN and the deletion of old segments.
//! - [`space`]: a full disk, a refusal and not a failure: the episode and what the owner
//!   is told.
//! - `spare`: new segments, allocated ahead of need and named when the log rolls onto one.
//! - `state_file`: the state snapshot file, the second on-disk format.
//! - `number_file`: the small decimal files (epoch, snapshot LSN).
//! - `replace_file`: a small file replaced atomically (those, and the state snapshot).

mod durable;
pub mod error;
pub mod format;
pub mod io;
pub mod log;
mod number_file;
mod read;
pub mod recovery;
mod replace_file;
mod replication;
mod retention;
pub mod scan;
mod shared;
pub mod space;
mod spare;
mod state_file;
mod writer;

pub use error::WalError;
pub use format::Lsn;
pub use log::{Entry, Record, RecoveryReport, Retention, Wal, WalOptions};
pub use space::{SpaceEvent, SpaceObserver};

/// The state file's format as pure functions, for the fuzz target `snapshot`
/// (tools/fuzz): not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::state_file::{decode_state, encode_state};
}
