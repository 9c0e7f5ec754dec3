//! What the appenders, the readers and the writer thread share: the pending batch and
//! the LSN counter under one lock, the durable LSN, the poison, the waiters and the
//! readers' segment index, with the condition variables that hand work across.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::Instant;

use crate::durable::Waiters;
use crate::error::WalError;
use crate::format::Lsn;
use crate::log::{WalOptions, WalStats};
use crate::read::SegmentIndex;
use crate::space::Episode;
use crate::writer::Batch;

/// A request an appender thread hands to the writer thread.
pub(crate) enum Command {
    TruncateAfter(Lsn),
}

/// Under [`Shared::state`]: what appenders change and the writer takes.
pub(crate) struct State {
    /// Records encoded and given LSNs, not yet handed to the writer.
    pub(crate) pending: Batch,
    /// The buffer the writer hands back after a flush; `None` while it flushes.
    pub(crate) spare: Option<Batch>,
    /// The LSN the next record gets.
    pub(crate) next_lsn: Lsn,
    /// The epoch new records carry.
    pub(crate) epoch: u32,
    pub(crate) closing: bool,
    pub(crate) flushing: bool,
    pub(crate) command: Option<Command>,
    pub(crate) command_result: Option<Result<(), WalError>>,
    /// While the disk has no room for the next segment (see [`space`](crate::space)).
    pub(crate) no_space: Option<Episode>,
}

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) options: WalOptions,
    pub(crate) state: Mutex<State>,
    /// The writer waits here for pending records or a command.
    pub(crate) work_ready: Condvar,
    /// Appenders wait here for room in the pending buffer.
    pub(crate) room_ready: Condvar,
    /// Followers wait here for the durable LSN to move.
    pub(crate) durable_changed: Condvar,
    /// The thread that sent a command waits here for its result.
    pub(crate) command_done: Condvar,
    /// Every LSN up to this one is durable.
    pub(crate) durable_lsn: AtomicU64,
    /// Set once, by the first I/O failure; nothing is acknowledged after it.
    pub(crate) poison: OnceLock<Arc<str>>,
    /// Who waits for which LSN; the writer wakes only those a flush covers.
    pub(crate) waiters: Mutex<Waiters>,
    pub(crate) segments: RwLock<Vec<SegmentIndex>>,
    pub(crate) stats: WalStats,
}

impl Shared {
    /// A log that recovered `segments`, whose next record gets `next_lsn`, all of it
    /// durable, at `epoch`.
    pub(crate) fn new(
        dir: &Path,
        options: WalOptions,
        next_lsn: Lsn,
        epoch: u32,
        segments: Vec<SegmentIndex>,
    ) -> Self {
        let capacity = options.max_batch_bytes;
        Shared {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(State {
                pending: Batch::new(capacity),
                spare: Some(Batch::new(capacity)),
                next_lsn,
                epoch,
                closing: false,
                flushing: false,
                command: None,
                command_result: None,
                no_space: None,
            }),
            work_ready: Condvar::new(),
            room_ready: Condvar::new(),
            durable_changed: Condvar::new(),
            command_done: Condvar::new(),
            durable_lsn: AtomicU64::new(next_lsn - 1),
            poison: OnceLock::new(),
            waiters: Mutex::new(Waiters::default()),
            segments: RwLock::new(segments),
            stats: WalStats::default(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this crate; the state is still
        // consistent enough to report errors, so do not propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait on `condvar` with the state lock (see [`lock`](Self::lock) on poison).
    pub(crate) fn wait<'a>(
        &self,
        condvar: &Condvar,
        state: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        condvar.wait(state).unwrap_or_else(|e| e.into_inner())
    }

    /// As [`wait`](Self::wait), until `deadline` at most.
    pub(crate) fn wait_until<'a>(
        &self,
        condvar: &Condvar,
        state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> MutexGuard<'a, State> {
        let left = deadline.saturating_duration_since(Instant::now());
        match condvar.wait_timeout(state, left) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(crate) fn poisoned(&self) -> Option<WalError> {
        self.poison.get().map(|why| WalError::Poisoned(why.clone()))
    }

    pub(crate) fn segments(&self) -> RwLockReadGuard<'_, Vec<SegmentIndex>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn segments_mut(&self) -> RwLockWriteGuard<'_, Vec<SegmentIndex>> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }
}
