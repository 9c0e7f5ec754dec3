//! The log: appends, group commit on a writer thread, durable waits, reads, follow,
//! replication and retention.
//!
//! Appenders encode records into the pending buffer under a short lock and get their LSN
//! at once. The writer thread swaps the pending buffer for a spare and makes it durable
//! with one write and one fdatasync, while appenders fill the spare: that is the group
//! commit. An I/O error poisons the log: nothing after it is acknowledged, ever.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use crate::error::WalError;
use crate::format::{
    align_up, decode_record, encode_record_into, encode_segment_header, set_flush_start,
    stored_len, Decoded, Lsn, RecordHeader, SegmentHeader, BLOCK, FLAG_BATCH_END, SEGMENT_HEADER,
};
use crate::io::{AlignedBuf, LogIo, SyncIo, UringIo};
use crate::recovery::{analyze, repair, segment_name, sync_dir, Progress};
use crate::scan::{records_from, INDEX_EVERY};

const LOCK_FILE: &str = "LOCK";
const EPOCH_FILE: &str = "epoch";
const SNAPSHOT_FILE: &str = "snapshot";
/// The owner's state as of the snapshot LSN (see [`Wal::save_state`]).
const STATE_FILE: &str = "state";
const STATE_MAGIC: &[u8; 8] = b"PARLEYS1";
/// magic, LSN, length, crc32c (of LSN, length and state).
const STATE_HEADER: usize = 8 + 8 + 8 + 4;

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

/// Retention of segments already covered by a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Segments older than this (by modification time) go.
    pub max_age: Duration,
    /// Oldest segments go while the log is larger than this.
    pub max_bytes: u64,
}

/// Counters for the owner's metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    pub flushes: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// Records encoded but not yet durable, with where their batches end.
struct Batch {
    buf: AlignedBuf,
    /// (offset just past the batch, its last LSN), in order.
    batch_ends: Vec<(usize, Lsn)>,
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Self {
            buf: AlignedBuf::new(capacity),
            batch_ends: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.batch_ends.clear();
    }
}

enum Command {
    TruncateAfter(Lsn),
}

struct State {
    pending: Batch,
    spare: Option<Batch>,
    next_lsn: Lsn,
    epoch: u32,
    closing: bool,
    flushing: bool,
    command: Option<Command>,
    command_result: Option<Result<(), WalError>>,
}

/// Where readers find records: per segment, its file and a sparse LSN index.
struct SegmentIndex {
    first_lsn: Lsn,
    path: PathBuf,
    file: Arc<File>,
    next_lsn: Lsn,
    end: u64,
    index: Vec<(Lsn, u64)>,
}

struct Shared {
    dir: PathBuf,
    options: WalOptions,
    state: Mutex<State>,
    work_ready: Condvar,
    room_ready: Condvar,
    durable_changed: Condvar,
    command_done: Condvar,
    durable_lsn: AtomicU64,
    poison: OnceLock<Arc<str>>,
    /// Who waits for which LSN; the writer wakes only those a flush covers.
    waiters: Mutex<Waiters>,
    segments: RwLock<Vec<SegmentIndex>>,
    stats: WalStats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this module; the state is still
        // consistent enough to report errors, so do not propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poisoned(&self) -> Option<WalError> {
        self.poison.get().map(|why| WalError::Poisoned(why.clone()))
    }

    fn publish_durable(&self, lsn: Lsn) {
        self.durable_lsn.store(lsn, Ordering::Release);
        let _guard = self.lock();
        self.durable_changed.notify_all();
        drop(_guard);
        // Only the waiters this flush covers; after a poison, everyone (to see it).
        let woken = {
            let mut waiters = self.waiters();
            if self.poison.get().is_some() {
                std::mem::take(&mut waiters.by_lsn)
            } else {
                let later = waiters.by_lsn.split_off(&(lsn + 1, 0));
                std::mem::replace(&mut waiters.by_lsn, later)
            }
        };
        for wake in woken.into_values() {
            match wake {
                Wake::Thread(thread) => thread.unpark(),
                Wake::Task(waker) => waker.wake(),
            }
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Done waiting for `lsn`: durable, or never will be.
    fn wait_outcome(&self, lsn: Lsn) -> Option<Result<(), WalError>> {
        if self.durable_lsn.load(Ordering::Acquire) >= lsn {
            Some(Ok(()))
        } else {
            self.poisoned().map(Err)
        }
    }
}

/// How to wake one waiter.
enum Wake {
    Thread(std::thread::Thread),
    Task(Waker),
}

/// Waiters ordered by the LSN they wait for, so a flush wakes exactly the ones it covers
/// (waking every waiter on every flush costs a context switch per waiter per flush).
#[derive(Default)]
struct Waiters {
    by_lsn: BTreeMap<(Lsn, u64), Wake>,
    next_id: u64,
}

impl Waiters {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// An open log. Appends may come from any thread.
pub struct Wal {
    shared: Arc<Shared>,
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
        let epoch = read_number(&dir.join(EPOCH_FILE))?.unwrap_or(0) as u32;
        let epoch = epoch.max(analysis.max_epoch);

        let mut direct_io = options.direct_io;
        let mut segments = Vec::new();
        for good in &analysis.segments {
            segments.push(SegmentIndex {
                first_lsn: good.first_lsn,
                path: good.path.clone(),
                file: Arc::new(open_read(&good.path)?),
                next_lsn: good.next_lsn,
                end: good.end,
                index: good.index.clone(),
            });
        }
        let next_lsn = analysis.next_lsn;
        let active = match segments.last() {
            Some(last) => {
                let (file, direct) = open_write(&last.path, direct_io)?;
                direct_io = direct;
                ActiveSegment {
                    file,
                    path: last.path.clone(),
                    write_pos: align_up(last.end as usize, BLOCK) as u64,
                }
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
        let mut writer = Writer {
            shared: shared.clone(),
            io,
            active,
            direct_io,
            scratch: AlignedBuf::new(capacity),
        };
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

    fn append_inner(
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
            state = self
                .shared
                .room_ready
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
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
                write_number(&self.shared.dir.join(EPOCH_FILE), u64::from(epoch))?;
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
            let pending = &mut state.pending;
            let at = pending.buf.len();
            let used =
                encode_record_into(&mut pending.buf.full_mut()[at..], &header, entry.payload);
            pending.buf.commit(used);
            if flags & FLAG_BATCH_END != 0 {
                let end = pending.buf.len();
                pending.batch_ends.push((end, header.lsn));
            }
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
        let id = shared.waiters().id();
        loop {
            shared
                .waiters()
                .by_lsn
                .insert((lsn, id), Wake::Thread(std::thread::current()));
            // Re-check after registering: the writer may have published in between.
            if let Some(outcome) = shared.wait_outcome(lsn) {
                shared.waiters().by_lsn.remove(&(lsn, id));
                return outcome;
            }
            std::thread::park();
        }
    }

    /// A future that resolves once `lsn` is durable (wakers may be woken from the writer
    /// thread, so any executor works).
    pub fn durable(&self, lsn: Lsn) -> Durable {
        Durable {
            shared: self.shared.clone(),
            lsn,
            id: None,
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// The epoch new records carry.
    pub fn epoch(&self) -> u32 {
        self.shared.lock().epoch
    }

    /// Move to a newer epoch (a new leader); persisted before it returns.
    pub fn set_epoch(&self, epoch: u32) -> Result<(), WalError> {
        let mut state = self.shared.lock();
        if epoch < state.epoch {
            return Err(WalError::StaleEpoch {
                got: epoch,
                current: state.epoch,
            });
        }
        write_number(&self.shared.dir.join(EPOCH_FILE), u64::from(epoch))?;
        state.epoch = epoch;
        Ok(())
    }

    /// A follower stores the leader's records (as the leader stored them, whole batches)
    /// at the same LSNs. Refused if `epoch` is older than this log's, or if `lsn` is not
    /// the next LSN. Returns the last LSN; durability follows as for appends.
    pub fn append_replicated(&self, lsn: Lsn, epoch: u32, bytes: &[u8]) -> Result<Lsn, WalError> {
        // Fencing first: a deposed leader learns that before anything about its bytes.
        let current = self.epoch();
        if epoch < current {
            return Err(WalError::StaleEpoch {
                got: epoch,
                current,
            });
        }
        let bad = |at: Lsn, detail: &str| WalError::BadReplicatedRecords {
            lsn: at,
            detail: detail.to_string(),
        };
        let mut headers = Vec::new();
        let mut payloads = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let expected = lsn + headers.len() as u64;
            match decode_record(&bytes[offset..]) {
                Decoded::Record(header, payload) if header.lsn == expected => {
                    if header.epoch > epoch {
                        return Err(bad(expected, "record epoch is newer than the append's"));
                    }
                    offset += header.stored_len();
                    headers.push(header);
                    payloads.push(payload);
                }
                Decoded::Record(header, _) => {
                    return Err(bad(expected, &format!("found LSN {}", header.lsn)))
                }
                _ => return Err(bad(expected, "not a valid record")),
            }
        }
        if !headers.last().is_some_and(|h| h.batch_end()) {
            return Err(bad(lsn, "bytes must end with a complete batch"));
        }
        let entries: Vec<Entry<'_>> = headers
            .iter()
            .zip(&payloads)
            .map(|(h, payload)| Entry {
                record_type: h.record_type,
                timestamp: h.timestamp,
                payload,
            })
            .collect();
        self.append_inner(&entries, Some((lsn, epoch, &headers)), true)
    }

    /// Remove every record after `lsn` (a follower's divergent tail), which must end a
    /// batch (batches replicate whole, so a divergence point always does). Waits for
    /// pending appends to become durable first.
    pub fn truncate_after(&self, lsn: Lsn) -> Result<(), WalError> {
        let last = self.next_lsn() - 1;
        if lsn >= last {
            return Ok(());
        }
        self.wait_durable(last)?;
        let mut state = self.shared.lock();
        state.command = Some(Command::TruncateAfter(lsn));
        self.shared.work_ready.notify_one();
        loop {
            if let Some(result) = state.command_result.take() {
                return result;
            }
            if let Some(poisoned) = self.shared.poisoned() {
                return Err(poisoned);
            }
            state = self
                .shared
                .command_done
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Read one durable record.
    pub fn read(&self, lsn: Lsn) -> Result<Record, WalError> {
        let mut records = self.read_interval(lsn)?;
        records
            .iter()
            .position(|r| r.lsn == lsn)
            .map(|i| records.swap_remove(i))
            .ok_or(WalError::NotFound(lsn))
    }

    /// Durable records from `from` to `to` inclusive, read lazily.
    pub fn iter(&self, from: Lsn, to: Lsn) -> RecordIter<'_> {
        RecordIter {
            wal: self,
            next: from,
            to,
            buffered: VecDeque::new(),
        }
    }

    /// Records from `from` on, waiting for new ones as they become durable.
    pub fn follow(&self, from: Lsn) -> Follower<'_> {
        Follower {
            wal: self,
            next: from,
        }
    }

    /// The records of the index interval holding `lsn`.
    fn read_interval(&self, lsn: Lsn) -> Result<Vec<Record>, WalError> {
        if lsn == 0 || lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let segment = segments
            .iter()
            .rev()
            .find(|s| s.first_lsn <= lsn && lsn < s.next_lsn)
            .ok_or(WalError::NotFound(lsn))?;
        let at = segment.index.partition_point(|&(l, _)| l <= lsn);
        let (_, start) = *segment
            .index
            .get(at.wrapping_sub(1))
            .ok_or(WalError::NotFound(lsn))?;
        let end = segment
            .index
            .get(at)
            .map_or(segment.end, |&(_, offset)| offset);
        let mut data = vec![0u8; (end - start) as usize];
        segment
            .file
            .read_exact_at(&mut data, start)
            .map_err(|e| WalError::io("read", &segment.path, e))?;
        Ok(records_from(&data, start as usize, 0)
            .map(|(_, h, payload)| Record {
                lsn: h.lsn,
                epoch: h.epoch,
                record_type: h.record_type,
                timestamp: h.timestamp,
                payload: payload.to_vec(),
            })
            .collect())
    }

    /// Record that the owner's state up to `lsn` is captured elsewhere; segments wholly
    /// at or before it become eligible for retention.
    pub fn record_snapshot(&self, lsn: Lsn) -> Result<(), WalError> {
        if lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        write_number(&self.shared.dir.join(SNAPSHOT_FILE), lsn)
    }

    /// Save the owner's state as of `lsn`, which must be durable: written whole to a
    /// temporary file, synced and renamed, then recorded as the snapshot LSN. Recovery
    /// loads it ([`load_state`](Self::load_state)) and replays only the records after it.
    pub fn save_state(&self, lsn: Lsn, state: &[u8]) -> Result<(), WalError> {
        if lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        let mut bytes = Vec::with_capacity(STATE_HEADER + state.len());
        bytes.extend_from_slice(STATE_MAGIC);
        bytes.extend_from_slice(&lsn.to_le_bytes());
        bytes.extend_from_slice(&(state.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[8..24]), state);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(state);
        let path = self.shared.dir.join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| WalError::io("write", &path, e))?;
        sync_dir(&self.shared.dir)?;
        self.record_snapshot(lsn)
    }

    /// The state saved last and its LSN, checked whole; `None` when none was saved.
    pub fn load_state(&self) -> Result<Option<(Lsn, Vec<u8>)>, WalError> {
        let path = self.shared.dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WalError::io("read", &path, e)),
        };
        let corrupt = |detail: &str| WalError::Corruption {
            path: path.clone(),
            offset: 0,
            detail: detail.to_string(),
        };
        if bytes.len() < STATE_HEADER || &bytes[..8] != STATE_MAGIC {
            return Err(corrupt("not a state snapshot"));
        }
        let number = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (lsn, len) = (number(8), number(16));
        let stored_crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let state = &bytes[STATE_HEADER..];
        if state.len() as u64 != len {
            return Err(corrupt("state snapshot is truncated"));
        }
        if crc32c::crc32c_append(crc32c::crc32c(&bytes[8..24]), state) != stored_crc {
            return Err(corrupt("state snapshot checksum mismatch"));
        }
        Ok(Some((lsn, state.to_vec())))
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
        let mut segments = self
            .shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner());
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
        if !deleted.is_empty() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(deleted)
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

/// Resolves once its LSN is durable (see [`Wal::durable`]).
pub struct Durable {
    shared: Arc<Shared>,
    lsn: Lsn,
    /// Its key among the waiters, once registered.
    id: Option<u64>,
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.waiters().by_lsn.remove(&(self.lsn, id));
        }
    }
}

impl std::future::Future for Durable {
    type Output = Result<(), WalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lsn = self.lsn;
        if let Some(outcome) = self.shared.wait_outcome(lsn) {
            return Poll::Ready(outcome);
        }
        let shared = self.shared.clone();
        let mut waiters = shared.waiters();
        let id = *self.id.get_or_insert_with(|| waiters.id());
        waiters
            .by_lsn
            .insert((lsn, id), Wake::Task(cx.waker().clone()));
        drop(waiters);
        // Re-check: the writer may have published between the check and the registration.
        match shared.wait_outcome(lsn) {
            Some(outcome) => Poll::Ready(outcome),
            None => Poll::Pending,
        }
    }
}

/// Durable records of a range, in LSN order.
pub struct RecordIter<'a> {
    wal: &'a Wal,
    next: Lsn,
    to: Lsn,
    buffered: VecDeque<Record>,
}

impl Iterator for RecordIter<'_> {
    type Item = Result<Record, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next > self.to {
            return None;
        }
        if self.buffered.is_empty() {
            match self.wal.read_interval(self.next) {
                Ok(records) => {
                    self.buffered = records.into_iter().filter(|r| r.lsn >= self.next).collect()
                }
                Err(error) => {
                    self.next = self.to + 1;
                    return Some(Err(error));
                }
            }
        }
        let record = self.buffered.pop_front()?;
        self.next = record.lsn + 1;
        Some(Ok(record))
    }
}

/// Follows the log's durable tail.
pub struct Follower<'a> {
    wal: &'a Wal,
    next: Lsn,
}

impl Follower<'_> {
    /// The next record, waiting up to `timeout` for it to become durable.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Record>, WalError> {
        let deadline = Instant::now() + timeout;
        let shared = &self.wal.shared;
        let mut state = shared.lock();
        while self.wal.durable_lsn() < self.next {
            if let Some(poisoned) = shared.poisoned() {
                return Err(poisoned);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            state = shared
                .durable_changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(state);
        let record = self.wal.read(self.next)?;
        self.next += 1;
        Ok(Some(record))
    }
}

/// The segment the writer appends to.
struct ActiveSegment {
    file: File,
    path: PathBuf,
    /// Block-aligned offset of the next flush.
    write_pos: u64,
}

struct Writer {
    shared: Arc<Shared>,
    io: Box<dyn LogIo>,
    active: ActiveSegment,
    direct_io: bool,
    /// For parts of a batch that do not start at the buffer's start (segment roll-over).
    scratch: AlignedBuf,
}

impl Writer {
    fn run(&mut self) {
        let shared = self.shared.clone();
        loop {
            let mut state = shared.lock();
            loop {
                if let Some(Command::TruncateAfter(lsn)) = state.command.take() {
                    let result = self.truncate_after(lsn, &mut state);
                    state.command_result = Some(result);
                    self.shared.command_done.notify_all();
                    continue;
                }
                if !state.pending.buf.is_empty() {
                    break;
                }
                if state.closing {
                    return;
                }
                state = self
                    .shared
                    .work_ready
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            let spare = state
                .spare
                .take()
                .expect("the writer returns the spare after each flush");
            let mut batch = std::mem::replace(&mut state.pending, spare);
            state.flushing = true;
            drop(state);
            self.shared.room_ready.notify_all();

            let result = self.flush(&mut batch);

            let mut state = self.shared.lock();
            state.flushing = false;
            batch.clear();
            state.spare = Some(batch);
            if let Err(error) = result {
                let _first_failure_wins = self.shared.poison.set(error.to_string().into());
            }
            drop(state);
            self.shared.room_ready.notify_all();
            if self.shared.poison.get().is_some() {
                // Wake every waiter to see the poison; nothing is flushed after it.
                self.shared
                    .publish_durable(self.shared.durable_lsn.load(Ordering::Acquire));
                let mut state = self.shared.lock();
                while !state.closing {
                    if state.command.take().is_some() {
                        state.command_result = self.shared.poisoned().map(Err);
                        self.shared.command_done.notify_all();
                    }
                    state = self
                        .shared
                        .work_ready
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
        }
    }

    /// Make one batch durable: one write + fdatasync per segment it touches.
    fn flush(&mut self, batch: &mut Batch) -> Result<(), WalError> {
        let segment_size = self.shared.options.segment_size;
        let len = batch.buf.len();
        let mut start = 0usize;
        let mut ends = batch.batch_ends.iter().copied().peekable();
        while start < len {
            let room = (segment_size - self.active.write_pos) as usize;
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
            let whole = start == 0 && end == len;
            let data: &mut AlignedBuf = if whole {
                &mut batch.buf
            } else {
                self.scratch.clear();
                self.scratch.full_mut()[..end - start]
                    .copy_from_slice(&batch.buf.as_slice()[start..end]);
                self.scratch.commit(end - start);
                &mut self.scratch
            };
            set_flush_start(&mut data.full_mut()[..end - start]);
            let offset = self.active.write_pos;
            let blocks = data.padded_blocks();
            self.io
                .write_durable(&self.active.file, offset, blocks)
                .map_err(|e| WalError::io("write and fdatasync", &self.active.path, e))?;
            self.shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.shared
                .stats
                .bytes_written
                .fetch_add(blocks.len() as u64, Ordering::Relaxed);
            self.active.write_pos += blocks.len() as u64;
            let written = &data.as_slice()[..end - start];
            index_written(&self.shared, written, offset);
            self.shared.publish_durable(last_lsn);
            start = end;
        }
        Ok(())
    }
}

/// Extend the readers' index with a durable chunk written at `offset`.
fn index_written(shared: &Shared, chunk: &[u8], offset: u64) {
    {
        let mut segments = shared.segments.write().unwrap_or_else(|e| e.into_inner());
        let Some(segment) = segments.last_mut() else {
            return;
        };
        for (at, header, _) in records_from(chunk, offset as usize, 0) {
            if (header.lsn - segment.first_lsn) % INDEX_EVERY == 0 {
                segment.index.push((header.lsn, offset + at as u64));
            }
            segment.next_lsn = header.lsn + 1;
            segment.end = offset + (at + header.stored_len()) as u64;
        }
    }
}

impl Writer {
    fn roll(&mut self, first_lsn: Lsn) -> Result<(), WalError> {
        let (active, index, direct) = create_segment(
            &self.shared.dir,
            first_lsn,
            &self.shared.options,
            self.direct_io,
            self.io.as_mut(),
        )?;
        self.direct_io = direct;
        self.active = active;
        self.shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
        Ok(())
    }

    /// Cut every record after `lsn`. Runs on the writer with nothing pending or in flight.
    fn truncate_after(&mut self, lsn: Lsn, state: &mut State) -> Result<(), WalError> {
        let mut segments = self
            .shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let cut = lsn + 1;
        let Some(keep) = segments.iter().rposition(|s| s.first_lsn <= cut) else {
            return Err(WalError::NotFound(cut));
        };
        let mut data = vec![0u8; segments[keep].end as usize];
        segments[keep]
            .file
            .read_exact_at(&mut data, 0)
            .map_err(|e| WalError::io("read", &segments[keep].path, e))?;
        // Batches are atomic, so the log may only end at a batch's end. (The last record
        // of an earlier segment always is one: batches never span segments.)
        let kept_last = records_from(&data, 0, SEGMENT_HEADER).find(|(_, h, _)| h.lsn == lsn);
        if kept_last.is_some_and(|(_, h, _)| !h.batch_end()) {
            return Err(WalError::NotBatchEnd(lsn));
        }
        // Later segments go first: a crash before the zeroing below leaves the kept
        // segment whole, a consistent log that was simply not cut yet.
        for removed in segments.drain(keep + 1..) {
            std::fs::remove_file(&removed.path)
                .map_err(|e| WalError::io("remove", &removed.path, e))?;
        }
        sync_dir(&self.shared.dir)?;
        let segment = &mut segments[keep];
        let cut_at = records_from(&data, 0, SEGMENT_HEADER)
            .find(|(_, h, _)| h.lsn == cut)
            .map_or(segment.end, |(at, _, _)| at as u64);
        let zeros = vec![0u8; (segment.end - cut_at) as usize];
        let file = OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .map_err(|e| WalError::io("open", &segment.path, e))?;
        file.write_all_at(&zeros, cut_at)
            .and_then(|()| file.sync_data())
            .map_err(|e| WalError::io("truncate", &segment.path, e))?;
        sync_dir(&self.shared.dir)?;
        segment.end = cut_at;
        segment.next_lsn = cut;
        segment.index.retain(|&(l, _)| l < cut);
        let (write_file, direct) = open_write(&segment.path, self.direct_io)?;
        self.direct_io = direct;
        self.active = ActiveSegment {
            file: write_file,
            path: segment.path.clone(),
            write_pos: align_up(cut_at as usize, BLOCK) as u64,
        };
        state.next_lsn = cut;
        self.shared.durable_lsn.store(lsn, Ordering::Release);
        Ok(())
    }
}

fn first_lsn_at(buf: &[u8], offset: usize) -> Lsn {
    match decode_record(&buf[offset..]) {
        Decoded::Record(header, _) => header.lsn,
        _ => unreachable!("the pending buffer holds only records this module encoded"),
    }
}

fn open_read(path: &Path) -> Result<File, WalError> {
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

/// Create, preallocate and header a new segment; make its name durable.
fn create_segment(
    dir: &Path,
    first_lsn: Lsn,
    options: &WalOptions,
    direct: bool,
    io: &mut dyn LogIo,
) -> Result<(ActiveSegment, SegmentIndex, bool), WalError> {
    let path = dir.join(segment_name(first_lsn));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| WalError::io("create", &path, e))?;
    let (file, direct) = open_write(&path, direct)?;
    preallocate(&file, options.segment_size).map_err(|e| WalError::io("preallocate", &path, e))?;
    let mut header = AlignedBuf::new(SEGMENT_HEADER);
    let bytes = encode_segment_header(&SegmentHeader {
        first_lsn,
        segment_size: options.segment_size,
    });
    header.full_mut()[..bytes.len()].copy_from_slice(&bytes);
    header.commit(bytes.len());
    io.write_durable(&file, 0, header.padded_blocks())
        .map_err(|e| WalError::io("write header of", &path, e))?;
    sync_dir(dir)?;
    let index = SegmentIndex {
        first_lsn,
        path: path.clone(),
        file: Arc::new(open_read(&path)?),
        next_lsn: first_lsn,
        end: SEGMENT_HEADER as u64,
        index: Vec::new(),
    };
    let active = ActiveSegment {
        file,
        path,
        write_pos: SEGMENT_HEADER as u64,
    };
    Ok((active, index, direct))
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

/// A small decimal file, replaced atomically (write, fsync, rename, fsync directory).
fn write_number(path: &Path, value: u64) -> Result<(), WalError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n"))
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WalError::io("write", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn read_number(path: &Path) -> Result<Option<u64>, WalError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| WalError::Corruption {
                path: path.to_path_buf(),
                offset: 0,
                detail: format!("not a number: {:?}", text.trim()),
            }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(WalError::io("read", path, error)),
    }
}
