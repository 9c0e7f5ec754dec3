//! The group-commit writer thread. It swaps the pending batch for the spare and makes it
//! durable with one write and one fdatasync per segment it touches, while appenders fill
//! the spare; it allocates the next segment ahead of need and rolls onto it when the next
//! batch does not fit, and runs the commands appenders hand it (a truncation). When the
//! disk has no room for the next segment it keeps the log going on what the active one
//! has left, and tries again on a timer (see [`space`](crate::space)).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::error::WalError;
use crate::format::{
    align_up, decode_record, encode_record_into, set_flush_start, Decoded, Lsn, RecordHeader,
    BLOCK, SEGMENT_HEADER,
};
use crate::io::{AlignedBuf, LogIo};
use crate::replication::cut_after;
use crate::shared::{Command, Shared, State};
use crate::space::{cost, free_bytes, Episode, SpaceEvent, RESERVE_DIVISOR};
use crate::spare::{create_segment, NewSegment, SegmentError, Spare};

/// Records encoded but not yet durable, with where their batches end.
pub(crate) struct Batch {
    pub(crate) buf: AlignedBuf,
    /// (offset just past the batch, its last LSN), in order.
    batch_ends: Vec<(usize, Lsn)>,
    /// The first and the last LSN it holds.
    lsns: Option<(Lsn, Lsn)>,
}

impl Batch {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            buf: AlignedBuf::new(capacity),
            batch_ends: Vec::new(),
            lsns: None,
        }
    }

    /// Encode one record after the others, at the next LSN; the caller has checked that
    /// it fits.
    pub(crate) fn push(&mut self, header: &RecordHeader, payload: &[u8]) {
        debug_assert!(
            self.lsns.is_none_or(|(_, last)| header.lsn == last + 1),
            "LSN {} does not follow {:?}",
            header.lsn,
            self.lsns
        );
        let at = self.buf.len();
        let used = encode_record_into(&mut self.buf.full_mut()[at..], header, payload);
        self.buf.commit(used);
        if header.batch_end() {
            self.batch_ends.push((self.buf.len(), header.lsn));
        }
        let first = self.lsns.map_or(header.lsn, |(first, _)| first);
        self.lsns = Some((first, header.lsn));
    }

    /// Every record in it belongs to a whole batch: appenders encode a batch under one
    /// lock, so the writer never sees part of one.
    fn assert_whole_batches(&self) {
        let (end, last) = self.batch_ends.last().copied().unzip();
        assert_eq!(end.unwrap_or(0), self.buf.len(), "a batch is cut short");
        assert_eq!(
            last,
            self.lsns.map(|(_, last)| last),
            "a batch is cut short"
        );
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.batch_ends.clear();
        self.lsns = None;
    }

    /// The most of a segment its batches take, each flushed alone (see `space::cost`).
    fn promised(&self) -> u64 {
        let starts = std::iter::once(0).chain(self.batch_ends.iter().map(|&(end, _)| end));
        (self.batch_ends.iter().zip(starts))
            .map(|(&(end, _), start)| cost(end - start))
            .sum()
    }
}

/// The segment the writer appends to.
pub(crate) struct ActiveSegment {
    file: File,
    path: PathBuf,
    /// Block-aligned offset of the next flush.
    write_pos: u64,
    /// Writes end at or before this offset: the size the segment's header records,
    /// which is the configured size only for segments created since the log opened.
    limit: u64,
}

impl ActiveSegment {
    /// Reopen an existing segment for appending after its last record, at `end`, within
    /// `recorded_size`, the size its header records. If its records already reach past
    /// that (as the writer before this check left a segment after the setting was
    /// raised), the segment is full: it is read as it is and never written again.
    pub(crate) fn reopen(
        path: &Path,
        end: u64,
        recorded_size: u64,
        direct: bool,
    ) -> Result<(Self, bool), WalError> {
        let (file, direct) = open_write(path, direct).map_err(|e| WalError::io("open", path, e))?;
        let write_pos = align_up(end as usize, BLOCK) as u64;
        let active = ActiveSegment {
            file,
            path: path.to_path_buf(),
            write_pos,
            limit: recorded_size.max(write_pos),
        };
        Ok((active, direct))
    }

    /// A segment just made, of `size` bytes, with nothing after its header.
    pub(crate) fn new_empty(file: File, path: PathBuf, size: u64) -> Self {
        ActiveSegment {
            file,
            path,
            write_pos: SEGMENT_HEADER as u64,
            limit: size,
        }
    }

    /// Bytes left for flushes.
    fn room(&self) -> usize {
        assert!(
            self.write_pos <= self.limit,
            "write position {} past the end {} of {}",
            self.write_pos,
            self.limit,
            self.path.display()
        );
        (self.limit - self.write_pos) as usize
    }

    /// Whether any record was written after the header (flushes start on fresh blocks,
    /// so the first one moves the write position past the header block).
    fn holds_records(&self) -> bool {
        self.write_pos > SEGMENT_HEADER as u64
    }

    /// Whether records fill `percent` of the room after the header (never, for 100 or
    /// more: the next segment is then made only when a batch needs it).
    fn filled(&self, percent: u8) -> bool {
        let room = self.limit.saturating_sub(SEGMENT_HEADER as u64);
        let used = self.write_pos.saturating_sub(SEGMENT_HEADER as u64);
        // In u128: the header's size is bounded (MAX_SEGMENT_SIZE), but this is a write
        // bound's arithmetic and must not depend on it.
        percent < 100 && u128::from(used) * 100 >= u128::from(room) * u128::from(percent)
    }
}

/// What the writer does next.
enum Work {
    Flush(Batch),
    /// Try the allocation of the next segment again (the disk was full).
    Retry,
    Closed,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    io: Box<dyn LogIo>,
    active: ActiveSegment,
    direct_io: bool,
    /// For parts of a batch that do not start at the buffer's start (segment roll-over).
    scratch: AlignedBuf,
    /// The next segment, allocated ahead of need.
    spare: Option<Spare>,
    /// While the disk is full: when to try the allocation again.
    retry_at: Option<Instant>,
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        io: Box<dyn LogIo>,
        active: ActiveSegment,
        direct_io: bool,
    ) -> Self {
        let scratch = AlignedBuf::new(shared.options.max_batch_bytes);
        Self {
            shared,
            io,
            active,
            direct_io,
            scratch,
            spare: None,
            retry_at: None,
        }
    }

    /// Start the writer thread.
    pub(crate) fn spawn(mut self) -> Result<std::thread::JoinHandle<()>, WalError> {
        let dir = self.shared.dir.clone();
        std::thread::Builder::new()
            .name("parley-wal".into())
            .spawn(move || self.run_or_poison())
            .map_err(|e| WalError::io("start writer thread for", dir, e))
    }

    /// [`run`](Self::run), and on a panic (a bug in this crate) poison the log with its
    /// message: the log then answers every waiter and command, where an ended thread
    /// would leave them waiting for ever. The shared state's lock tolerates the panic.
    fn run_or_poison(&mut self) {
        let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run()))
        else {
            return;
        };
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        let why = format!("the log's writer thread panicked: {message}");
        let _first_failure_wins = self.shared.poison.set(why.into());
        self.refuse_work_until_closed();
    }

    fn run(&mut self) {
        // A reopened log's active segment may be past the mark already.
        self.prepare_next_segment();
        loop {
            match self.next_work() {
                Work::Flush(mut batch) => {
                    let result = self.flush(&mut batch);
                    self.return_spare(batch, result);
                    if self.shared.poison.get().is_some() {
                        self.refuse_work_until_closed();
                        return;
                    }
                    self.prepare_next_segment();
                }
                Work::Retry => self.prepare_next_segment(),
                Work::Closed => return,
            }
        }
    }

    /// Wait for pending records and take them, swapping in the spare; run commands
    /// meanwhile. While the disk is full, wait no longer than the next retry.
    /// `Closed` once the log is closing and nothing is pending.
    fn next_work(&mut self) -> Work {
        let shared = self.shared.clone();
        let mut state = shared.lock();
        loop {
            if let Some(Command::TruncateAfter(lsn)) = state.command.take() {
                let result = self.truncate_after(lsn, &mut state);
                state.command_result = Some(result);
                self.refresh_room(&mut state);
                shared.command_done.notify_all();
                continue;
            }
            if !state.pending.buf.is_empty() {
                break;
            }
            if state.closing {
                return Work::Closed;
            }
            state = match self.retry_at {
                Some(at) if Instant::now() >= at => return Work::Retry,
                Some(at) => shared.wait_until(&shared.work_ready, state, at),
                None => shared.wait(&shared.work_ready, state),
            };
        }
        let spare = state
            .spare
            .take()
            .expect("the writer returns the spare after each flush");
        let batch = std::mem::replace(&mut state.pending, spare);
        state.flushing = true;
        // Handed over whole, and exactly what follows the durable LSN.
        batch.assert_whole_batches();
        let durable = shared.durable_lsn.load(Ordering::Acquire);
        assert_eq!(batch.lsns.map(|(first, _)| first), Some(durable + 1));
        drop(state);
        shared.room_ready.notify_all();
        Work::Flush(batch)
    }

    /// Hand the flushed buffer back as the spare; a failed flush poisons the log.
    ///
    /// A failed write or fdatasync into a segment's allocated blocks poisons even when
    /// it says ENOSPC: after a failed fdatasync the kernel may have dropped the dirty
    /// pages and reports the error once, so a retry that succeeds proves nothing about
    /// the bytes, and a filesystem that fails a write into blocks it allocated has broken
    /// the promise the log relies on. Only allocating a new segment, where nothing is
    /// acknowledged yet, is retried (see `roll_when_room`).
    fn return_spare(&mut self, mut batch: Batch, flushed: Result<(), WalError>) {
        let mut state = self.shared.lock();
        state.flushing = false;
        batch.clear();
        state.spare = Some(batch);
        if let Err(error) = flushed {
            let _first_failure_wins = self.shared.poison.set(error.to_string().into());
        }
        self.refresh_room(&mut state);
        drop(state);
        self.shared.room_ready.notify_all();
    }

    /// While the disk is full: what the active segment can still take of appends not yet
    /// handed to the writer (all the others are written). Under the state lock, between
    /// flushes.
    fn refresh_room(&self, state: &mut State) {
        let promised = state.pending.promised();
        if let Some(full) = &mut state.no_space {
            full.room = (self.active.room() as u64).saturating_sub(promised);
        }
    }

    /// Allocate the next segment once the active one is filled to the mark, unless it
    /// is ready; while the disk is full, only when the retry is due.
    fn prepare_next_segment(&mut self) {
        let percent = self.shared.options.next_segment_at_percent;
        if self.spare.is_some() || !self.active.filled(percent) {
            // Nothing to retry until a flush passes the mark (a cut can move back before it).
            self.retry_at = None;
            return;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let size = self.shared.options.segment_size;
        match Spare::allocate(&self.shared.dir, size, self.direct_io, self.io.as_mut()) {
            Ok(spare) => {
                self.spare = Some(spare);
                self.space_recovered();
            }
            Err(SegmentError::NoSpace(error)) => self.space_ran_out(error),
            // Not fatal ahead of need: nothing depends on the spare yet. The roll makes
            // the segment itself if this goes on, and fails the log then.
            Err(SegmentError::Failed(_)) => self.retry_at = Some(self.next_retry()),
        }
    }

    fn next_retry(&self) -> Instant {
        Instant::now() + self.shared.options.disk_full_retry
    }

    /// The disk had no room for the next segment (`error`): start an episode, or go on
    /// with the one under way; retry later.
    fn space_ran_out(&mut self, error: WalError) {
        self.retry_at = Some(self.next_retry());
        let mut state = self.shared.lock();
        if state.no_space.is_some() {
            return;
        }
        let reserve = self.active.limit / RESERVE_DIVISOR;
        state.no_space = Some(Episode {
            error: error.clone(),
            room: 0,
            reserve,
            since: Instant::now(),
            refused: 0,
        });
        self.refresh_room(&mut state);
        let room = state.no_space.as_ref().map_or(0, |full| full.room);
        self.shared.stats.disk_full.store(true, Ordering::Release);
        drop(state);
        let free_bytes = match &error {
            WalError::NoSpace { free_bytes, .. } => *free_bytes,
            _ => None,
        };
        self.tell(&SpaceEvent::Full {
            error: &error,
            free_bytes,
            room,
        });
    }

    /// A segment was allocated: end the episode, if one was under way.
    fn space_recovered(&mut self) {
        self.retry_at = None;
        let ended = self.shared.lock().no_space.take();
        let Some(episode) = ended else {
            return;
        };
        self.shared.stats.disk_full.store(false, Ordering::Release);
        self.tell(&SpaceEvent::Recovered {
            free_bytes: free_bytes(&self.shared.dir),
            refused: episode.refused,
            lasted: episode.since.elapsed(),
        });
    }

    fn tell(&self, event: &SpaceEvent<'_>) {
        if let Some(observer) = &self.shared.options.on_disk_space {
            (observer.0)(event);
        }
    }

    /// After a poison: wake every waiter to see it, and answer commands with it until
    /// the log closes. Nothing is flushed after it.
    fn refuse_work_until_closed(&mut self) {
        let shared = self.shared.clone();
        shared.publish_durable(shared.durable_lsn.load(Ordering::Acquire));
        let mut state = shared.lock();
        while !state.closing {
            if state.command.take().is_some() {
                state.command_result = shared.poisoned().map(Err);
                shared.command_done.notify_all();
            }
            state = shared.wait(&shared.work_ready, state);
        }
    }

    /// Make one batch durable: one write + fdatasync per segment it touches.
    fn flush(&mut self, batch: &mut Batch) -> Result<(), WalError> {
        let len = batch.buf.len();
        let mut start = 0usize;
        let mut ends = batch.batch_ends.iter().copied().peekable();
        while start < len {
            let room = self.active.room();
            // The longest run of whole batches from `start` that fits the segment.
            let mut chunk_end = None;
            while let Some(&(end, last_lsn)) = ends.peek() {
                if align_up(end - start, BLOCK) > room {
                    break;
                }
                chunk_end = Some((end, last_lsn));
                ends.next();
            }
            let Some((end, last_lsn)) = chunk_end else {
                let first_lsn = first_lsn_at(batch.buf.as_slice(), start);
                self.roll_when_room(first_lsn)?;
                continue;
            };
            self.write_chunk(&mut batch.buf, start, end)?;
            self.shared.publish_durable(last_lsn);
            start = end;
        }
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        assert_eq!(Some(durable), batch.lsns.map(|(_, last)| last));
        Ok(())
    }

    /// Write the whole batches at `start..end` of `pending` at the write position, make
    /// them durable, and index them.
    fn write_chunk(
        &mut self,
        pending: &mut AlignedBuf,
        start: usize,
        end: usize,
    ) -> Result<(), WalError> {
        let data: &mut AlignedBuf = if start == 0 && end == pending.len() {
            pending
        } else {
            self.scratch.clear();
            self.scratch.full_mut()[..end - start].copy_from_slice(&pending.as_slice()[start..end]);
            self.scratch.commit(end - start);
            &mut self.scratch
        };
        set_flush_start(&mut data.full_mut()[..end - start]);
        let offset = self.active.write_pos;
        let blocks = data.padded_blocks();
        let write_end = offset + blocks.len() as u64;
        assert!(
            offset.is_multiple_of(BLOCK as u64) && write_end <= self.active.limit,
            "a flush at {offset}..{write_end} of {} is not in its blocks before {}",
            self.active.path.display(),
            self.active.limit
        );
        self.io
            .write_durable(&self.active.file, offset, blocks)
            .map_err(|e| WalError::io("write and fdatasync", &self.active.path, e))?;
        self.shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .bytes_written
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.active.write_pos = write_end;
        let written = &data.as_slice()[..end - start];
        if let Some(segment) = self.shared.segments_mut().last_mut() {
            segment.index_written(written, offset);
        }
        Ok(())
    }

    /// Roll over, waiting while the disk has no room for the new segment. The batch in
    /// hand waits with it (nothing of it is acknowledged) and appends are refused
    /// meanwhile; this happens only when the spare could not be made ahead of need and
    /// the active segment filled first. Fails if the log closes meanwhile.
    fn roll_when_room(&mut self, first_lsn: Lsn) -> Result<(), WalError> {
        loop {
            match self.roll(first_lsn) {
                Ok(()) => {
                    self.space_recovered();
                    return Ok(());
                }
                Err(SegmentError::Failed(error)) => return Err(error),
                Err(SegmentError::NoSpace(error)) => {
                    self.space_ran_out(error.clone());
                    // Refresh_room counts the pending buffer only: the batch in hand does
                    // not fit either.
                    if let Some(full) = &mut self.shared.lock().no_space {
                        full.room = 0;
                    }
                    if !self.wait_for_retry() {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Sleep until the retry is due; false if the log closes first.
    fn wait_for_retry(&mut self) -> bool {
        let at = self.retry_at.unwrap_or_else(|| self.next_retry());
        let shared = self.shared.clone();
        let mut state = shared.lock();
        loop {
            if state.closing {
                return false;
            }
            if Instant::now() >= at {
                self.retry_at = None;
                return true;
            }
            state = shared.wait_until(&shared.work_ready, state, at);
        }
    }

    /// Continue in a new segment of the configured size, beginning at `first_lsn`: the
    /// next batch does not fit the rest of the active one. The spare if one is ready,
    /// else one made now.
    fn roll(&mut self, first_lsn: Lsn) -> Result<(), SegmentError> {
        let new = match self.active.holds_records() {
            true => NewSegment::Beside,
            false => NewSegment::Replacing,
        };
        // A new segment holds any batch an append admits (max_batch_size): so never roll
        // away from an empty one of the configured size.
        assert!(
            new == NewSegment::Beside || self.active.limit < self.shared.options.segment_size,
            "a batch at LSN {first_lsn} does not fit an empty segment"
        );
        let dir = &self.shared.dir;
        let (active, index, direct) = match self.spare.take() {
            Some(spare) => spare.adopt(dir, first_lsn, new, self.io.as_mut())?,
            None => {
                let size = self.shared.options.segment_size;
                create_segment(dir, first_lsn, size, self.direct_io, self.io.as_mut(), new)?
            }
        };
        self.direct_io = direct;
        self.active = active;
        let mut segments = self.shared.segments_mut();
        let last = segments.last().map(|s| (s.first_lsn, s.next_lsn));
        match (new, segments.last_mut()) {
            (NewSegment::Replacing, Some(last)) => {
                assert_eq!(last.first_lsn, first_lsn, "replacing a segment elsewhere");
                *last = index
            }
            _ => {
                let follows = last.is_none_or(|(_, next_lsn)| next_lsn == first_lsn);
                assert!(follows, "segment at {first_lsn} after {last:?}");
                segments.push(index)
            }
        }
        Ok(())
    }

    /// Cut every record after `lsn`. Runs with nothing pending or in flight.
    fn truncate_after(&mut self, lsn: Lsn, state: &mut State) -> Result<(), WalError> {
        let (active, direct) = cut_after(&self.shared, lsn, self.direct_io)?;
        self.direct_io = direct;
        self.active = active;
        state.next_lsn = lsn + 1;
        self.shared.durable_lsn.store(lsn, Ordering::Release);
        Ok(())
    }
}

fn first_lsn_at(buf: &[u8], offset: usize) -> Lsn {
    match decode_record(&buf[offset..]) {
        Decoded::Record(header, _) => header.lsn,
        _ => unreachable!("the pending buffer holds only records this crate encoded"),
    }
}

pub(crate) fn open_read(path: &Path) -> Result<File, WalError> {
    File::open(path).map_err(|e| WalError::io("open", path, e))
}

/// Open a segment for writing, direct when asked and allowed. Returns whether it is direct.
pub(crate) fn open_write(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    if direct {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => return Ok((file, true)),
            // The filesystem refuses O_DIRECT (tmpfs on older kernels): buffered + fdatasync.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(error) => return Err(error),
        }
    }
    let file = OpenOptions::new().write(true).open(path)?;
    Ok((file, false))
}
