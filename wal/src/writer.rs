//! The group-commit writer thread. It swaps the pending batch for the spare and makes it
//! durable with one write and one fdatasync per segment it touches, while appenders fill
//! the spare; it rolls to a new segment (created, preallocated, headed) when the next
//! batch does not fit, and runs the commands appenders hand it (a truncation).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{
    align_up, decode_record, encode_record_into, encode_segment_header, set_flush_start, Decoded,
    Lsn, RecordHeader, SegmentHeader, BLOCK, SEGMENT_HEADER,
};
use crate::io::{AlignedBuf, LogIo};
use crate::log::WalOptions;
use crate::read::SegmentIndex;
use crate::recovery::{segment_name, sync_dir};
use crate::replication::cut_after;
use crate::shared::{Command, Shared, State};

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
        let (file, direct) = open_write(path, direct)?;
        let write_pos = align_up(end as usize, BLOCK) as u64;
        let active = ActiveSegment {
            file,
            path: path.to_path_buf(),
            write_pos,
            limit: recorded_size.max(write_pos),
        };
        Ok((active, direct))
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
}

/// Where a new segment goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewSegment {
    /// After the last one.
    Beside,
    /// In place of the last one, which holds no records (and so begins at the same LSN)
    /// but is too small for the next batch: it was made at an older, smaller size.
    Replacing,
}
pub(crate) struct Writer {
    shared: Arc<Shared>,
    io: Box<dyn LogIo>,
    active: ActiveSegment,
    direct_io: bool,
    /// For parts of a batch that do not start at the buffer's start (segment roll-over).
    scratch: AlignedBuf,
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
        }
    }

    /// Start the writer thread.
    pub(crate) fn spawn(mut self) -> Result<std::thread::JoinHandle<()>, WalError> {
        let dir = self.shared.dir.clone();
        std::thread::Builder::new()
            .name("parley-wal".into())
            .spawn(move || self.run())
            .map_err(|e| WalError::io("start writer thread for", dir, e))
    }

    fn run(&mut self) {
        while let Some(mut batch) = self.next_batch() {
            let result = self.flush(&mut batch);
            self.return_spare(batch, result);
            if self.shared.poison.get().is_some() {
                self.refuse_work_until_closed();
                return;
            }
        }
    }

    /// Wait for pending records and take them, swapping in the spare; run commands
    /// meanwhile. `None` once the log is closing and nothing is pending.
    fn next_batch(&mut self) -> Option<Batch> {
        let shared = self.shared.clone();
        let mut state = shared.lock();
        loop {
            if let Some(Command::TruncateAfter(lsn)) = state.command.take() {
                let result = self.truncate_after(lsn, &mut state);
                state.command_result = Some(result);
                shared.command_done.notify_all();
                continue;
            }
            if !state.pending.buf.is_empty() {
                break;
            }
            if state.closing {
                return None;
            }
            state = shared.wait(&shared.work_ready, state);
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
        Some(batch)
    }

    /// Hand the flushed buffer back as the spare; a failed flush poisons the log.
    fn return_spare(&mut self, mut batch: Batch, flushed: Result<(), WalError>) {
        let mut state = self.shared.lock();
        state.flushing = false;
        batch.clear();
        state.spare = Some(batch);
        if let Err(error) = flushed {
            let _first_failure_wins = self.shared.poison.set(error.to_string().into());
        }
        drop(state);
        self.shared.room_ready.notify_all();
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
                self.roll(first_lsn)?;
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

    /// Continue in a new segment of the configured size, beginning at `first_lsn`: the
    /// next batch does not fit the rest of the active one.
    fn roll(&mut self, first_lsn: Lsn) -> Result<(), WalError> {
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
        let (active, index, direct) = create_segment(
            &self.shared.dir,
            first_lsn,
            &self.shared.options,
            self.direct_io,
            self.io.as_mut(),
            new,
        )?;
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
fn open_write(path: &Path, direct: bool) -> Result<(File, bool), WalError> {
    if direct {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => return Ok((file, true)),
            // The filesystem refuses O_DIRECT (tmpfs on older kernels): buffered + fdatasync.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(error) => return Err(WalError::io("open", path, error)),
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WalError::io("open", path, e))?;
    Ok((file, false))
}

/// Create, preallocate and header a new segment of the configured size; make its name
/// durable. A replacement is made under another name and renamed over the segment it
/// replaces, so that a crash leaves one of the two: each an empty segment at `first_lsn`.
pub(crate) fn create_segment(
    dir: &Path,
    first_lsn: Lsn,
    options: &WalOptions,
    direct: bool,
    io: &mut dyn LogIo,
    new: NewSegment,
) -> Result<(ActiveSegment, SegmentIndex, bool), WalError> {
    let path = dir.join(segment_name(first_lsn));
    let mut create = OpenOptions::new();
    let made = match new {
        NewSegment::Beside => {
            create.write(true).create_new(true);
            path.clone()
        }
        NewSegment::Replacing => {
            create.write(true).create(true).truncate(true);
            path.with_extension(REPLACEMENT_EXTENSION)
        }
    };
    create
        .open(&made)
        .map_err(|e| WalError::io("create", &made, e))?;
    let header = SegmentHeader {
        first_lsn,
        segment_size: options.segment_size,
    };
    let (file, direct) = write_segment_header(&made, &header, direct, io)?;
    if new == NewSegment::Replacing {
        std::fs::rename(&made, &path).map_err(|e| WalError::io("rename", &made, e))?;
    }
    sync_dir(dir)?;
    let index = SegmentIndex::empty(first_lsn, &path, options.segment_size)?;
    let active = ActiveSegment {
        file,
        path,
        write_pos: SEGMENT_HEADER as u64,
        limit: options.segment_size,
    };
    Ok((active, index, direct))
}

/// A replacement segment's name until it is renamed over the one it replaces (not a
/// segment's suffix, so recovery passes over one a crash left).
const REPLACEMENT_EXTENSION: &str = "new";

/// Preallocate the created file at `path` to the header's size and make the header
/// durable. Returns the file, open for writing, and whether it is direct.
fn write_segment_header(
    path: &Path,
    header: &SegmentHeader,
    direct: bool,
    io: &mut dyn LogIo,
) -> Result<(File, bool), WalError> {
    let (file, direct) = open_write(path, direct)?;
    preallocate(&file, header.segment_size).map_err(|e| WalError::io("preallocate", path, e))?;
    let mut block = AlignedBuf::new(SEGMENT_HEADER);
    let bytes = encode_segment_header(header);
    block.full_mut()[..bytes.len()].copy_from_slice(&bytes);
    block.commit(bytes.len());
    io.write_durable(&file, 0, block.padded_blocks())
        .map_err(|e| WalError::io("write header of", path, e))?;
    Ok((file, direct))
}

fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a valid descriptor we own.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if result == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(size);
    }
    Err(error)
}
