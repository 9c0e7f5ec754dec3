//! The log's facade: open (recover, then start the writer thread), append, and wait for
//! durability. Reads, replication, retention and the state snapshot are further `impl Wal`
//! blocks in [`read`](crate::read), [`replication`](crate::replication),
//! [`retention`](crate::retention) and [`state_file`](crate::state_file).
//!
//! Appenders encode records into the pending buffer under a short lock and get their LSN
//! at once. The writer thread ([`writer`](crate::writer)) swaps the pending buffer for a
//! spare and makes it durable with one write and one fdatasync, while appenders fill the
//! spare: that is the group commit. An I/O error poisons the log: nothing after it is
//! acknowledged, ever.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

pub use crate::durable::Durable;
pub use crate::read::{Follower, RecordIter};
pub use crate::retention::Retention;

use crate::durable::Waiters;
use crate::error::WalError;
use crate::format::{stored_len, Lsn, RecordHeader, FLAG_BATCH_END, SEGMENT_HEADER};
use crate::io::{LogIo, SyncIo, UringIo};
use crate::read::SegmentIndex;
use crate::recovery::{analyze, repair, Progress};
use crate::replication::{persist_epoch, persisted_epoch};
use crate::shared::{Shared, State};
use crate::writer::{create_segment, ActiveSegment, Batch, Writer};

const LOCK_FILE: &str = "LOCK";

/// The log's limits. Each is a named setting of its owner.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size each segment file is preallocated to.
    pub segment_size: u64,
    /// Bytes of records one flush carries at most; also the largest single batch.
    /// Two buffers of this size exist per log.
    pub max_batch_bytes: usize,
    /// Open segments with O_DIRECT (falls back to buffered I/O where refused).
    pub direct_io: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 << 20,
            max_batch_bytes: 4 << 20,
            direct_io: true,
        }
    }
}

/// One record to append.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub record_type: u8,
    pub timestamp: u64,
    pub payload: &'a [u8],
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub epoch: u32,
    pub record_type: u8,
    pub timestamp: u64,
    pub payload: Vec<u8>,
}

/// What opening found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    /// LSN of the last record, 0 for an empty log.
    pub last_lsn: Lsn,
    pub torn_bytes_cut: u64,
    pub bytes_scanned: u64,
    pub duration: Duration,
    /// The I/O path in use ("io_uring", or the fallback) and whether I/O is direct.
    pub io_path: &'static str,
    pub direct_io: bool,
}

/// Counters for the owner's metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    pub flushes: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// An open log. Appends may come from any thread.
pub struct Wal {
    pub(crate) shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    _lock: File,
}

impl Wal {
    /// Open (or create) the log in `dir`, recovering it, with io_uring where the kernel
    /// allows and pwrite + fdatasync otherwise.
    pub fn open(
        dir: &Path,
        options: WalOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let io: Box<dyn LogIo> = match UringIo::new() {
            Ok(io) => Box::new(io),
            Err(_) => Box::new(SyncIo),
        };
        Self::open_with_io(dir, options, io, progress)
    }

    /// Open with a given I/O layer (tests inject faults this way).
    pub fn open_with_io(
        dir: &Path,
        options: WalOptions,
        mut io: Box<dyn LogIo>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| WalError::io("create directory", dir, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| WalError::io("open", dir.join(LOCK_FILE), e))?;
        lock.try_lock()
            .map_err(|_| WalError::Locked(dir.to_path_buf()))?;

        let analysis = analyze(dir, progress)?;
        repair(dir, &analysis)?;
        let epoch = persisted_epoch(dir)?.max(analysis.max_epoch);

        let mut direct_io = options.direct_io;
        let mut segments = Vec::new();
        for good in &analysis.segments {
            segments.push(SegmentIndex::recovered(good)?);
        }
        let next_lsn = analysis.next_lsn;
        let active = match segments.last() {
            Some(last) => {
                let (active, direct) = ActiveSegment::reopen(&last.path, last.end, direct_io)?;
                direct_io = direct;
                active
            }
            None => {
                let (active, index, direct) =
                    create_segment(dir, next_lsn, &options, direct_io, io.as_mut())?;
                direct_io = direct;
                segments.push(index);
                active
            }
        };
        let report = RecoveryReport {
            segments: segments.len(),
            last_lsn: next_lsn - 1,
            torn_bytes_cut: analysis.torn_tail.as_ref().map_or(0, |t| t.bytes),
            bytes_scanned: analysis.bytes_total,
            duration: started.elapsed(),
            io_path: io.name(),
            direct_io,
        };
        let capacity = options.max_batch_bytes;
        let shared = Arc::new(Shared {
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
        });
        let mut writer = Writer::new(shared.clone(), io, active, direct_io);
        let thread = std::thread::Builder::new()
            .name("parley-wal".into())
            .spawn(move || writer.run())
            .map_err(|e| WalError::io("start writer thread for", dir, e))?;
        Ok((
            Wal {
                shared,
                writer: Some(thread),
                _lock: lock,
            },
            report,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Append one record; its LSN is returned at once, durability follows.
    /// Waits while the buffer is full.
    pub fn append(&self, record_type: u8, timestamp: u64, payload: &[u8]) -> Result<Lsn, WalError> {
        self.append_batch(&[Entry {
            record_type,
            timestamp,
            payload,
        }])
    }

    /// Append records atomically: after a crash all of them are there or none. Returns
    /// the last LSN. Waits while the buffer is full.
    pub fn append_batch(&self, entries: &[Entry<'_>]) -> Result<Lsn, WalError> {
        self.append_inner(entries, None, true)
    }

    /// As `append_batch`, but fails with `Full` instead of waiting (for callers that must
    /// not block, such as a shard's event loop).
    pub fn try_append_batch(&self, entries: &[Entry<'_>]) -> Result<Lsn, WalError> {
        self.append_inner(entries, None, false)
    }

    pub(crate) fn append_inner(
        &self,
        entries: &[Entry<'_>],
        replicated: Option<(Lsn, u32, &[RecordHeader])>,
        wait: bool,
    ) -> Result<Lsn, WalError> {
        let size: usize = entries.iter().map(|e| stored_len(e.payload.len())).sum();
        let max = self.max_batch_size();
        if size > max {
            return Err(WalError::TooLarge { size, max });
        }
        let mut state = self.shared.lock();
        loop {
            if let Some(poisoned) = self.shared.poisoned() {
                return Err(poisoned);
            }
            if state.closing {
                return Err(WalError::Closed);
            }
            if state.pending.buf.remaining() >= size {
                break;
            }
            if !wait {
                return Err(WalError::Full);
            }
            state = self.shared.wait(&self.shared.room_ready, state);
        }
        if let Some((lsn, epoch, _)) = replicated {
            if epoch < state.epoch {
                return Err(WalError::StaleEpoch {
                    got: epoch,
                    current: state.epoch,
                });
            }
            if lsn != state.next_lsn {
                return Err(WalError::LsnMismatch {
                    expected: state.next_lsn,
                    got: lsn,
                });
            }
            if epoch > state.epoch {
                persist_epoch(&self.shared.dir, epoch)?;
                state.epoch = epoch;
            }
        }
        let was_empty = state.pending.buf.is_empty();
        let epoch = state.epoch;
        for (i, entry) in entries.iter().enumerate() {
            let (record_epoch, flags, timestamp) = match replicated {
                Some((_, _, headers)) => {
                    let h = &headers[i];
                    (h.epoch, h.flags & FLAG_BATCH_END, h.timestamp)
                }
                None => {
                    let last = i + 1 == entries.len();
                    (
                        epoch,
                        if last { FLAG_BATCH_END } else { 0 },
                        entry.timestamp,
                    )
                }
            };
            let header = RecordHeader {
                payload_len: entry.payload.len() as u32,
                lsn: state.next_lsn,
                epoch: record_epoch,
                record_type: entry.record_type,
                flags,
                timestamp,
            };
            state.pending.push(&header, entry.payload);
            state.next_lsn += 1;
        }
        let last = state.next_lsn - 1;
        if was_empty {
            self.shared.work_ready.notify_one();
        }
        Ok(last)
    }

    /// The largest batch one append may carry.
    pub fn max_batch_size(&self) -> usize {
        let segment_room = self.shared.options.segment_size as usize - SEGMENT_HEADER;
        self.shared.options.max_batch_bytes.min(segment_room)
    }

    /// Every LSN up to this one is durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// The LSN the next append will get.
    pub fn next_lsn(&self) -> Lsn {
        self.shared.lock().next_lsn
    }

    /// Block until `lsn` is durable, or the log is poisoned.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let shared = &self.shared;
        if let Some(outcome) = shared.wait_outcome(lsn) {
            return outcome;
        }
        if lsn >= self.next_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        shared.wait_durable(lsn)
    }

    /// A future that resolves once `lsn` is durable (wakers may be woken from the writer
    /// thread, so any executor works).
    pub fn durable(&self, lsn: Lsn) -> Durable {
        Durable::new(self.shared.clone(), lsn)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Flush what is pending and stop the writer.
    pub fn close(mut self) -> Result<(), WalError> {
        self.shutdown();
        match self.shared.poisoned() {
            Some(poisoned) => Err(poisoned),
            None => Ok(()),
        }
    }

    fn shutdown(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work_ready.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}
