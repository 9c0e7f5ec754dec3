//! A full disk: the log's state while its next segment cannot be allocated (ENOSPC or
//! EDQUOT), and what it tells its owner.
//!
//! A full disk is a refusal, not a failure. The writer allocates the next segment ahead
//! of need (`WalOptions::next_segment_at_percent`), so the first sign of a full disk is an
//! allocation that fails while the active segment still has room: an episode starts. The
//! log then lives on what is left of the active segment. An append is admitted while its
//! batch, counted in whole blocks (what the batch's own flush would take; a flush of
//! several batches pads once, so takes less), fits what is not yet promised; after that
//! appends are refused with [`WalError::NoSpace`], nothing of them taken. Everything
//! admitted fits the active segment, so it becomes durable as usual and nothing that
//! was acknowledged is touched. The writer retries the allocation every
//! `WalOptions::disk_full_retry` and ends the episode once it succeeds.
//!
//! The last [`RESERVE_DIVISOR`]th of the segment is kept for deferred records (see
//! [`Wal::try_append_reserved`](crate::Wal::try_append_reserved)): records the owner
//! has already answered for and writes at the end of its turn, which must not find the
//! room taken by the ordinary appends of the same turn.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::WalError;
use crate::format::{align_up, BLOCK};

/// Of the active segment's size, the share (one part in this many) kept back from
/// ordinary appends during an episode, for deferred records.
pub const RESERVE_DIVISOR: u64 = 16;

/// Under the state lock, while an episode lasts.
pub(crate) struct Episode {
    /// What refused appends get.
    pub(crate) error: WalError,
    /// Bytes of the active segment not yet promised to an admitted batch.
    pub(crate) room: u64,
    /// Of `room`, what only deferred records may take.
    pub(crate) reserve: u64,
    pub(crate) since: Instant,
    /// Appends refused in this episode.
    pub(crate) refused: u64,
}

impl Episode {
    /// Admit a batch of `size` stored bytes (deferred: it may take the reserve), or
    /// count the refusal and say why.
    pub(crate) fn admit(&mut self, size: usize, deferred: bool) -> Result<(), WalError> {
        let keep = if deferred { 0 } else { self.reserve };
        let cost = cost(size);
        if cost.saturating_add(keep) > self.room {
            self.refused += 1;
            return Err(self.error.clone());
        }
        Ok(())
    }

    /// The batch admitted last was encoded: its blocks are promised.
    pub(crate) fn promise(&mut self, size: usize) {
        self.room = self.room.saturating_sub(cost(size));
    }
}

/// The most of a segment a batch of `size` stored bytes takes: its own flush's blocks.
pub(crate) fn cost(size: usize) -> u64 {
    align_up(size, BLOCK) as u64
}

/// Whether an I/O error says the disk (or the user's quota) has no room.
pub(crate) fn is_no_space(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Bytes free for unprivileged use on the filesystem of `dir` (what `df` shows as
/// available), if the kernel says.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let result = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (result == 0).then(|| stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// What the writer tells the owner about the disk, once per change.
#[derive(Debug)]
pub enum SpaceEvent<'a> {
    /// The next segment could not be allocated: appends go on into the `room` bytes left
    /// in the active segment, then are refused with `NoSpace` until space is freed.
    Full {
        /// The allocation that failed and why (the `NoSpace` error appends get).
        error: &'a WalError,
        /// Free bytes on the log's filesystem when it failed.
        free_bytes: Option<u64>,
        room: u64,
    },
    /// A segment was allocated again: appends are taken as before.
    Recovered {
        free_bytes: Option<u64>,
        /// Appends refused during the episode.
        refused: u64,
        lasted: Duration,
    },
}

/// Called by the writer thread for each [`SpaceEvent`] (keep it short: the writer
/// waits for it).
#[derive(Clone)]
pub struct SpaceObserver(pub Arc<dyn Fn(&SpaceEvent<'_>) + Send + Sync>);

impl std::fmt::Debug for SpaceObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpaceObserver")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn episode(room: u64, reserve: u64) -> Episode {
        let error = WalError::Closed;
        Episode {
            error,
            room,
            reserve,
            since: Instant::now(),
            refused: 0,
        }
    }

    #[test]
    fn a_batch_costs_its_whole_blocks() {
        assert_eq!(cost(1), BLOCK as u64);
        assert_eq!(cost(BLOCK), BLOCK as u64);
        assert_eq!(cost(BLOCK + 1), 2 * BLOCK as u64);
    }

    #[test]
    fn ordinary_appends_leave_the_reserve_to_deferred_ones() {
        let block = BLOCK as u64;
        let mut full = episode(3 * block, block);
        assert!(full.admit(BLOCK, false).is_ok());
        full.promise(BLOCK);
        assert!(full.admit(100, false).is_ok());
        full.promise(100);
        // One block left, and it is the reserve.
        assert!(full.admit(100, false).is_err());
        assert!(full.admit(100, true).is_ok());
        full.promise(100);
        assert!(full.admit(1, true).is_err());
        assert_eq!((full.room, full.refused), (0, 2));
    }
}
