//! The log's facade: open (recover, then start the writer thread), append, and wait for
//! durability. Reads, replication, retention and the state snapshot are further `impl Wal`
//! blocks in [`read`](crate::read), [`replication`](crate::replication),
//! [`retention`](crate::retention) and [`state_file`](crate::state_file).
//!
//! Appenders encode records into the pending buffer under a short lock and get their LSN
//! at once. The writer thread ([`writer`](crate::writer)) swaps the pending buffer for a
//! spare and makes it durable with one write and one fdatasync, while appenders fill the
//! spare: that is the group commit. An I/O error poisons the log: nothing after it is
//! acknowledged, ever. A full disk is not an I/O error: appends are refused for a while
//! ([`WalError::NoSpace`], see [`space`](crate::space)) and taken again once there is room.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

pub use crate::durable::Durable;
pub use crate::read::{Follower, RecordIter};
pub use crate::retention::Retention;

use crate::error::WalError;
use crate::format::{
    align_up, stored_len, Lsn, RecordHeader, BLOCK, FLAG_BATCH_END, MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE, SEGMENT_HEADER,
};
use crate::io::{LogIo, SyncIo, UringIo};
use crate::read::SegmentIndex;
use crate::recovery::{analyze, repair, Progress};
use crate::replication::{persisted_epoch, Replicated};
use crate::shared::{Shared, State};
use crate::space::SpaceObserver;
use crate::spare::{create_segment, discard_spare, NewSegment};
use crate::writer::{ActiveSegment, Writer};

const LOCK_FILE: &str = "LOCK";

/// Refuse a segment size that leaves no block for records after the header, or one over
/// the largest a header may record (recovery would refuse the segments).
fn check_options(options: &WalOptions) -> Result<(), WalError> {
    if options.segment_size < MIN_SEGMENT_SIZE {
        return Err(WalError::SegmentSizeTooSmall {
            configured: options.segment_size,
            min: MIN_SEGMENT_SIZE,
        });
    }
    if options.segment_size > MAX_SEGMENT_SIZE {
        return Err(WalError::SegmentSizeTooLarge {
            configured: options.segment_size,
            max: MAX_SEGMENT_SIZE,
        });
    }
    Ok(())
}

/// Create `dir` if need be and take its lock: one process opens a log at a time.
fn lock_dir(dir: &Path) -> Result<File, WalError> {
    std::fs::create_dir_all(dir).map_err(|e| WalError::io("create directory", dir, e))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| WalError::io("open", dir.join(LOCK_FILE), e))?;
    lock.try_lock()
        .map_err(|_| WalError::Locked(dir.to_path_buf()))?;
    Ok(lock)
}

/// The segment appends go to: the last recovered one, or the first of a new log (added
/// to `segments`). Returns it and whether it is open for direct I/O.
fn open_active_segment(
    dir: &Path,
    options: &WalOptions,
    segments: &mut Vec<SegmentIndex>,
    next_lsn: Lsn,
    io: &mut dyn LogIo,
) -> Result<(ActiveSegment, bool), WalError> {
    if let Some(last) = segments.last() {
        return ActiveSegment::reopen(&last.path, last.end, last.size, options.direct_io);
    }
    let (size, direct) = (options.segment_size, options.direct_io);
    let (active, index, direct) =
        create_segment(dir, next_lsn, size, direct, io, NewSegment::Beside)?;
    segments.push(index);
    Ok((active, direct))
}

/// Encode `entries` as one batch into the pending buffer, which has room, at the next
/// LSNs; returns the last LSN.
fn encode_batch(
    state: &mut State,
    entries: &[Entry<'_>],
    replicated: Option<&Replicated<'_>>,
) -> Lsn {
    for (i, entry) in entries.iter().enumerate() {
        let (epoch, flags, timestamp) = match replicated {
            Some(replicated) => replicated.framing(i),
            None if i + 1 == entries.len() => (state.epoch, FLAG_BATCH_END, entry.timestamp),
            None => (state.epoch, 0, entry.timestamp),
        };
        let header = RecordHeader {
            payload_len: entry.payload.len() as u32,
            lsn: state.next_lsn,
            epoch,
            record_type: entry.record_type,
            flags,
            timestamp,
        };
        state.pending.push(&header, entry.payload);
        state.next_lsn += 1;
    }
    state.next_lsn - 1
}

/// How an append is admitted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Wait while the pending buffer is full.
    Wait,
    /// Fail with `Full` instead.
    NoWait,
    /// As `NoWait`, and may take the room kept for deferred records on a full disk.
    Reserved,
}

/// The log's limits. Each is a named setting of its owner.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size each new segment file is preallocated to; at least two blocks (the header
    /// and one of records). The size is recorded in each segment's header, and a segment
    /// keeps it: a changed setting applies to segments created from then on.
    pub segment_size: u64,
    /// Bytes of records one flush carries at most; also the largest single batch.
    /// Two buffers of this size exist per log.
    pub max_batch_bytes: usize,
    /// Open segments with O_DIRECT (falls back to buffered I/O where refused).
    pub direct_io: bool,
    /// How full the active segment is, in percent of its room for records, when the
    /// writer allocates the next one: ahead of need, so that the allocation is off the
    /// path of the flush that rolls over, and a full disk shows (and is told) while the
    /// active segment still has room. 100 allocates only when a batch needs it.
    pub next_segment_at_percent: u8,
    /// How often the writer tries to allocate the next segment again while the disk has
    /// no room for it.
    pub disk_full_retry: Duration,
    /// Told when the disk runs out of room for the log and when it has room again.
    pub on_disk_space: Option<SpaceObserver>,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 << 20,
            max_batch_bytes: 4 << 20,
            direct_io: true,
            next_segment_at_percent: 50,
            disk_full_retry: Duration::from_secs(1),
            on_disk_space: None,
        }
    }
}

impl WalOptions {
    /// The largest batch a log opened with these options takes (see
    /// [`Wal::max_batch_size`]), for owners that check their own limits against it
    /// before they open one.
    pub fn max_batch_size(&self) -> usize {
        let segment_room = (self.segment_size as usize).saturating_sub(SEGMENT_HEADER);
        // Flushes are whole blocks: a batch fits a new segment when its blocks do.
        let whole_blocks = segment_room / BLOCK * BLOCK;
        self.max_batch_bytes.min(whole_blocks)
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
    /// True while the disk has no room for the next segment (an episode, see `space`).
    pub disk_full: AtomicBool,
    /// Appends refused with `NoSpace`.
    pub appends_refused: AtomicU64,
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
        check_options(&options)?;
        let lock = lock_dir(dir)?;
        let analysis = analyze(dir, progress)?;
        repair(dir, &analysis)?;
        let epoch = persisted_epoch(dir)?.max(analysis.max_epoch);
        discard_spare(dir)?;
        let mut segments = (analysis.segments.iter())
            .map(SegmentIndex::recovered)
            .collect::<Result<Vec<_>, _>>()?;
        let next_lsn = analysis.next_lsn;
        // Recovery keeps only a contiguous run of segments, ending where the log does.
        let contiguous = segments.windows(2).all(|w| w[0].next_lsn == w[1].first_lsn);
        assert!(contiguous && segments.last().is_none_or(|s| s.next_lsn == next_lsn));
        let (active, direct_io) =
            open_active_segment(dir, &options, &mut segments, next_lsn, io.as_mut())?;
        let report = RecoveryReport {
            segments: segments.len(),
            last_lsn: next_lsn - 1,
            torn_bytes_cut: analysis.torn_tail.as_ref().map_or(0, |t| t.bytes),
            bytes_scanned: analysis.bytes_total,
            duration: started.elapsed(),
            io_path: io.name(),
            direct_io,
        };
        let shared = Arc::new(Shared::new(dir, options, next_lsn, epoch, segments));
        let writer = Writer::new(shared.clone(), io, active, direct_io).spawn()?;
        let wal = Wal {
            shared,
            writer: Some(writer),
            _lock: lock,
        };
        Ok((wal, report))
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
        self.append_inner(entries, None, Admit::Wait)
    }

    /// As `append_batch`, but fails with `Full` instead of waiting (for callers that must
    /// not block, such as a shard's event loop).
    pub fn try_append_batch(&self, entries: &[Entry<'_>]) -> Result<Lsn, WalError> {
        self.append_inner(entries, None, Admit::NoWait)
    }

    /// As `try_append_batch`, for records the owner has already answered for and writes
    /// late (a turn's cursor advances): while the disk is full these may take the room
    /// kept back from other appends (see [`space`](crate::space)).
    pub fn try_append_reserved(&self, entries: &[Entry<'_>]) -> Result<Lsn, WalError> {
        self.append_inner(entries, None, Admit::Reserved)
    }

    /// While the disk has no room for the next segment: the `NoSpace` error appends get
    /// once the active segment's room is promised (until then they are still taken).
    pub fn disk_full(&self) -> Option<WalError> {
        if !self.shared.stats.disk_full.load(Ordering::Acquire) {
            return None;
        }
        self.shared
            .lock()
            .no_space
            .as_ref()
            .map(|e| e.error.clone())
    }

    /// The `NoSpace` error an ordinary append gets now, if it would be refused: the disk
    /// is full and only the reserve of the active segment is left. An owner refuses at
    /// once the commands whose records it would write late.
    pub fn refusing(&self) -> Option<WalError> {
        if !self.shared.stats.disk_full.load(Ordering::Acquire) {
            return None;
        }
        let state = self.shared.lock();
        let full = state.no_space.as_ref()?;
        (full.room <= full.reserve).then(|| full.error.clone())
    }

    /// Append `entries` as one batch at the next LSNs, local (framed with this log's
    /// epoch) or `replicated` (framed as the leader framed them); returns the last LSN.
    pub(crate) fn append_inner(
        &self,
        entries: &[Entry<'_>],
        replicated: Option<Replicated<'_>>,
        admit: Admit,
    ) -> Result<Lsn, WalError> {
        let size: usize = entries.iter().map(|e| stored_len(e.payload.len())).sum();
        let max = self.max_batch_size();
        if size > max {
            return Err(WalError::TooLarge { size, max });
        }
        let mut state = self.lock_with_room(size, admit)?;
        if let Some(replicated) = &replicated {
            replicated.admit(&self.shared.dir, &mut state)?;
        }
        if let Some(full) = &mut state.no_space {
            full.promise(size);
        }
        let (first, was_len) = (state.next_lsn, state.pending.buf.len());
        assert!(first > self.durable_lsn(), "LSN {first} is durable already");
        let last = encode_batch(&mut state, entries, replicated.as_ref());
        // Contiguous LSNs after the durable one, and exactly the bytes admitted.
        assert_eq!(last + 1, first + entries.len() as u64);
        assert_eq!(state.pending.buf.len() - was_len, size);
        if was_len == 0 {
            self.shared.work_ready.notify_one();
        }
        Ok(last)
    }

    /// The state, locked once the pending buffer has room for `size` bytes; waits for
    /// the writer to make room, or fails with `Full` if `admit` does not wait. While the
    /// disk is full, fails with `NoSpace` unless the batch fits what is left.
    fn lock_with_room(&self, size: usize, admit: Admit) -> Result<MutexGuard<'_, State>, WalError> {
        let mut state = self.shared.lock();
        // Else waiting for room would never end: the writer empties the buffer at most.
        assert!(
            size <= state.pending.buf.capacity(),
            "{size} bytes never fit"
        );
        loop {
            if let Some(poisoned) = self.shared.poisoned() {
                return Err(poisoned);
            }
            if state.closing {
                return Err(WalError::Closed);
            }
            if let Some(full) = &mut state.no_space {
                if let Err(refused) = full.admit(size, admit == Admit::Reserved) {
                    let refusals = &self.shared.stats.appends_refused;
                    refusals.fetch_add(1, Ordering::Relaxed);
                    return Err(refused);
                }
            }
            if state.pending.buf.remaining() >= size {
                return Ok(state);
            }
            if admit != Admit::Wait {
                return Err(WalError::Full);
            }
            state = self.shared.wait(&self.shared.room_ready, state);
        }
    }

    /// The largest batch one append may carry, in stored bytes: the sum over its
    /// records of [`stored_len`](crate::format::stored_len) of the payload (header and
    /// padding included). It is `max_batch_bytes`, or what a new segment holds after its
    /// header in whole blocks if that is less (a batch never spans segments), and it is
    /// fixed for the life of the `Wal`. A larger batch is refused whole with
    /// [`WalError::TooLarge`], nothing of it appended: callers split their records into
    /// batches of at most this size.
    pub fn max_batch_size(&self) -> usize {
        let max = self.shared.options.max_batch_size();
        // The options were checked on open: a batch of this size, padded to blocks, fits
        // a new segment after its header.
        let segment_size = self.shared.options.segment_size as usize;
        assert!(SEGMENT_HEADER + align_up(max, BLOCK) <= segment_size);
        max
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
        let outcome = match shared.wait_outcome(lsn) {
            Some(outcome) => outcome,
            None if lsn >= self.next_lsn() => return Err(WalError::NotFound(lsn)),
            None => shared.wait_durable(lsn),
        };
        assert!(outcome.is_err() || self.durable_lsn() >= lsn);
        outcome
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
