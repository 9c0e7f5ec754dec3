//! A shard's WAL over a simulated disk. The bytes are the real format
//! (`parley_wal::format`) and recovery is the real scan (`parley_wal::scan`); the
//! writer follows the real log's discipline: one flush (a write, then fdatasync) in
//! flight at a time, every flush on a fresh 4 KiB block, each chat record its own batch.
//!
//! The disk injects what disks do: I/O latency (now and then a slow one), fdatasync
//! failures, and at a crash a flush in flight lands as any subset of its 512-byte
//! sectors, in any order, with one sector possibly torn mid-way.

use std::cell::RefCell;
use std::rc::Rc;

use parley_router::chat_log::{wal_record_limit, ChatLog, LogError};
use parley_router::record::CHAT_RECORD_TYPE;
use parley_wal::format::{
    align_up, decode_record, encode_record, encode_segment_header, Decoded, RecordHeader,
    SegmentHeader, BLOCK, FLAG_BATCH_END, FLAG_FLUSH_START, SEGMENT_HEADER,
};
use parley_wal::scan::{scan_segment, SegmentEnd};
use parley_wal::WalOptions;

use crate::rng::Rng;

/// The unit a disk writes atomically (when it does not tear).
pub const SECTOR: usize = 512;

/// How a shard's disk behaves in one run (drawn from the seed).
#[derive(Debug, Clone, Copy)]
pub struct DiskProfile {
    /// Latency of a write and of an fdatasync, in µs.
    pub io_us: (u64, u64),
    /// Chance that an I/O is slow (10-50 ms).
    pub slow_io_per_mille: u64,
    /// Chance that an fdatasync fails (the log is poisoned: the process fail-stops).
    pub fsync_fail_per_mille: u64,
    /// Records appended but not yet durable before appends are refused (`Full`).
    pub buffer_records: u64,
    /// A broken disk for the simulator's self-test: fdatasync returns before the data is
    /// stable, so a crash loses what was acknowledged.
    pub lies_about_fsync: bool,
}

/// What a completed I/O means for the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDone {
    Durable(u64),
    FsyncFailed,
    SnapshotSaved(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Writing,
    Syncing,
}

#[derive(Debug)]
struct Flush {
    offset: usize,
    bytes: Vec<u8>,
    last_lsn: u64,
    stage: Stage,
    done_at_us: u64,
}

/// What recovery found on the disk after a crash.
#[derive(Debug)]
pub struct Recovered {
    /// Records that survived (now `Disk::payloads`).
    pub records: u64,
    /// The last saved state snapshot: (LSN it reflects, bytes).
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub torn_bytes_cut: usize,
}

#[derive(Debug)]
pub struct Disk {
    profile: DiskProfile,
    // What the process sees: every record appended since it started.
    payloads: Vec<Vec<u8>>,
    timestamps: Vec<u64>,
    first_unflushed: u64,
    durable_lsn: u64,
    in_flight: Option<Flush>,
    next_flush_offset: usize,
    snapshot_saving: Option<(u64, Vec<u8>, u64)>,
    /// Payloads refused (`Full`) since the oracle last looked.
    refused: Vec<Vec<u8>>,
    // What stable storage holds: survives crashes.
    stable: Vec<u8>,
    snapshot: Option<(u64, Vec<u8>)>,
}

impl Disk {
    pub fn new(profile: DiskProfile) -> Self {
        let header = encode_segment_header(&SegmentHeader {
            first_lsn: 1,
            segment_size: 1 << 30,
        });
        Self {
            profile,
            payloads: Vec::new(),
            timestamps: Vec::new(),
            first_unflushed: 1,
            durable_lsn: 0,
            in_flight: None,
            next_flush_offset: SEGMENT_HEADER,
            snapshot_saving: None,
            refused: Vec::new(),
            stable: header,
            snapshot: None,
        }
    }

    /// Make this disk lie about fdatasync (the simulator's self-test).
    pub fn lie_about_fsync(&mut self) {
        self.profile.lies_about_fsync = true;
    }

    /// The faults are over: no more failed fdatasyncs or slow I/O.
    pub fn stop_faults(&mut self) {
        self.profile.fsync_fail_per_mille = 0;
        self.profile.slow_io_per_mille = 0;
    }

    pub fn last_lsn(&self) -> u64 {
        self.payloads.len() as u64
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    /// Every record's payload, LSN 1 first.
    pub fn payloads(&self) -> &[Vec<u8>] {
        &self.payloads
    }

    pub fn payload(&self, lsn: u64) -> Option<&[u8]> {
        lsn.checked_sub(1)
            .and_then(|i| self.payloads.get(i as usize))
            .map(Vec::as_slice)
    }

    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        if self.last_lsn() - self.durable_lsn >= self.profile.buffer_records {
            self.refused.push(payload.to_vec());
            return Err(LogError::Full);
        }
        self.payloads.push(payload.to_vec());
        self.timestamps.push(timestamp);
        Ok(self.last_lsn())
    }

    /// The payloads appends were refused for since the last call (the log was full).
    pub fn take_refused(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.refused)
    }

    /// Begin saving a state snapshot (a temporary file, fsync, rename: atomic).
    pub fn save_snapshot(&mut self, lsn: u64, bytes: Vec<u8>, now_us: u64, rng: &mut Rng) {
        let done_at = now_us + self.latency(rng);
        self.snapshot_saving = Some((lsn, bytes, done_at));
    }

    pub fn saving_snapshot(&self) -> bool {
        self.snapshot_saving.is_some()
    }

    /// Start a flush when idle, and complete what is due by `now_us`.
    pub fn poll(&mut self, now_us: u64, rng: &mut Rng) -> Vec<IoDone> {
        let mut done = Vec::new();
        if let Some((lsn, _, at)) = &self.snapshot_saving {
            if *at <= now_us {
                let lsn = *lsn;
                let (_, bytes, _) = self.snapshot_saving.take().expect("checked");
                self.snapshot = Some((lsn, bytes));
                done.push(IoDone::SnapshotSaved(lsn));
            }
        }
        loop {
            match &mut self.in_flight {
                None => {
                    if self.first_unflushed > self.last_lsn() {
                        break;
                    }
                    self.start_flush(now_us, rng);
                    break;
                }
                Some(flush) if flush.done_at_us > now_us => break,
                Some(flush) if flush.stage == Stage::Writing => {
                    flush.stage = Stage::Syncing;
                    flush.done_at_us += latency(&self.profile, rng);
                }
                Some(_) => {
                    if rng.chance(self.profile.fsync_fail_per_mille) {
                        // Leave the flush in flight: the crash that follows decides
                        // which of its sectors made it.
                        done.push(IoDone::FsyncFailed);
                        break;
                    }
                    let flush = self.in_flight.take().expect("matched");
                    let end = flush.offset + flush.bytes.len();
                    if self.stable.len() < end {
                        self.stable.resize(end, 0);
                    }
                    if !self.profile.lies_about_fsync {
                        self.stable[flush.offset..end].copy_from_slice(&flush.bytes);
                    }
                    self.durable_lsn = flush.last_lsn;
                    done.push(IoDone::Durable(flush.last_lsn));
                }
            }
        }
        done
    }

    fn latency(&self, rng: &mut Rng) -> u64 {
        latency(&self.profile, rng)
    }

    fn start_flush(&mut self, now_us: u64, rng: &mut Rng) {
        let first = self.first_unflushed;
        let last = self.last_lsn();
        let mut bytes = Vec::new();
        for lsn in first..=last {
            let index = (lsn - 1) as usize;
            let payload = &self.payloads[index];
            let mut flags = FLAG_BATCH_END;
            if lsn == first {
                flags |= FLAG_FLUSH_START;
            }
            let header = RecordHeader {
                payload_len: payload.len() as u32,
                lsn,
                epoch: 1,
                record_type: CHAT_RECORD_TYPE,
                flags,
                timestamp: self.timestamps[index],
            };
            encode_record(&mut bytes, &header, payload);
        }
        bytes.resize(align_up(bytes.len(), BLOCK), 0);
        let offset = self.next_flush_offset;
        self.next_flush_offset += bytes.len();
        self.first_unflushed = last + 1;
        self.in_flight = Some(Flush {
            offset,
            bytes,
            last_lsn: last,
            stage: Stage::Writing,
            done_at_us: now_us + self.latency(rng),
        });
    }

    /// The process died: the flush in flight lands as a random subset of its sectors,
    /// one of them perhaps torn; a snapshot being saved is lost. Returns a line for the
    /// trace.
    pub fn crash(&mut self, rng: &mut Rng) -> String {
        self.snapshot_saving = None;
        let Some(flush) = self.in_flight.take() else {
            return "no flush in flight".into();
        };
        let sectors = flush.bytes.len() / SECTOR;
        let keep_per_mille = *rng.pick(&[0, 300, 700, 1000]).expect("non-empty");
        let mut landed = 0;
        let end = flush.offset + flush.bytes.len();
        if self.stable.len() < end {
            self.stable.resize(end, 0);
        }
        for sector in 0..sectors {
            let at = sector * SECTOR;
            let cut = if rng.chance(keep_per_mille) {
                SECTOR
            } else if rng.chance(100) {
                rng.index(SECTOR)
            } else {
                0
            };
            if cut > 0 {
                landed += 1;
            }
            self.stable[flush.offset + at..flush.offset + at + cut]
                .copy_from_slice(&flush.bytes[at..at + cut]);
        }
        format!(
            "flush of LSN ..={} ({:?}): {landed} of {sectors} sectors landed",
            flush.last_lsn, flush.stage
        )
    }

    /// Open the log after a crash: scan the segment with the real recovery scan, cut a
    /// torn tail, and load what survived. Damage before the last flush is an error.
    pub fn recover(&mut self) -> Result<Recovered, String> {
        let scan = scan_segment(&self.stable, 1).map_err(|e| format!("scan: {e:?}"))?;
        if let SegmentEnd::Corrupt { offset } = scan.end {
            return Err(format!(
                "recovery found corruption at offset {offset} (not a torn tail)"
            ));
        }
        let torn_bytes_cut = self.stable.len() - scan.committed_end;
        self.stable.truncate(scan.committed_end);
        let mut payloads = Vec::new();
        let mut timestamps = Vec::new();
        let mut pos = SEGMENT_HEADER;
        while pos < self.stable.len() {
            match decode_record(&self.stable[pos..]) {
                Decoded::Record(header, payload) => {
                    if header.lsn != payloads.len() as u64 + 1 {
                        return Err(format!("record at {pos} has LSN {}", header.lsn));
                    }
                    payloads.push(payload.to_vec());
                    timestamps.push(header.timestamp);
                    pos += header.stored_len();
                }
                _ => pos = align_up(pos + 1, BLOCK),
            }
        }
        if payloads.len() as u64 + 1 != scan.next_lsn {
            return Err(format!(
                "scan says the log ends before LSN {}, the walk found {} records",
                scan.next_lsn,
                payloads.len()
            ));
        }
        let last = payloads.len() as u64;
        if let Some((lsn, _)) = &self.snapshot {
            if *lsn > last {
                return Err(format!(
                    "the state snapshot is at LSN {lsn}, beyond the log's last record {last}"
                ));
            }
        }
        self.payloads = payloads;
        self.timestamps = timestamps;
        self.first_unflushed = last + 1;
        self.durable_lsn = last;
        self.in_flight = None;
        self.next_flush_offset = align_up(self.stable.len(), BLOCK);
        Ok(Recovered {
            records: last,
            snapshot: self.snapshot.clone(),
            torn_bytes_cut,
        })
    }
}

fn latency(profile: &DiskProfile, rng: &mut Rng) -> u64 {
    if rng.chance(profile.slow_io_per_mille) {
        rng.between(10_000, 50_000)
    } else {
        rng.between(profile.io_us.0, profile.io_us.1)
    }
}

/// The chat core's view of the disk.
pub struct SimLog(pub Rc<RefCell<Disk>>);

impl ChatLog for SimLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        self.0.borrow_mut().append(timestamp, payload)
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        self.0
            .borrow()
            .payload(lsn)
            .map(<[u8]>::to_vec)
            .ok_or(LogError::Missing(lsn))
    }

    /// As the real log's, with its default batch limit.
    fn max_record_bytes(&self) -> usize {
        wal_record_limit(WalOptions::default().max_batch_bytes)
    }
}
