//! Reading durable records: one by LSN, a range, or following the durable tail. Readers
//! find records through a sparse index per segment (every [`INDEX_EVERY`]th record), so
//! one read decodes at most one index interval.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::WalError;
use crate::format::{Lsn, SEGMENT_HEADER};
use crate::log::{Record, Wal};
use crate::recovery::GoodSegment;
use crate::scan::{records_from, INDEX_EVERY};
use crate::writer::open_read;

/// Where readers find records: per segment, its file and a sparse LSN index.
pub(crate) struct SegmentIndex {
    pub(crate) first_lsn: Lsn,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
    /// The size its header records: writes to it end there.
    pub(crate) size: u64,
    /// LSN after its last durable record.
    pub(crate) next_lsn: Lsn,
    /// Byte offset after its last durable record.
    pub(crate) end: u64,
    /// (LSN, offset) of every INDEX_EVERY-th record from the first.
    pub(crate) index: Vec<(Lsn, u64)>,
}

impl SegmentIndex {
    /// A segment as recovery found it.
    pub(crate) fn recovered(good: &GoodSegment) -> Result<Self, WalError> {
        Ok(SegmentIndex {
            first_lsn: good.first_lsn,
            path: good.path.clone(),
            file: Arc::new(open_read(&good.path)?),
            size: good.segment_size,
            next_lsn: good.next_lsn,
            end: good.end,
            index: good.index.clone(),
        })
    }

    /// A segment just created, with no records yet.
    pub(crate) fn empty(first_lsn: Lsn, path: &Path, size: u64) -> Result<Self, WalError> {
        Ok(SegmentIndex {
            first_lsn,
            path: path.to_path_buf(),
            file: Arc::new(open_read(path)?),
            size,
            next_lsn: first_lsn,
            end: SEGMENT_HEADER as u64,
            index: Vec::new(),
        })
    }

    /// Extend the index with a durable chunk of records written at `offset`.
    pub(crate) fn index_written(&mut self, chunk: &[u8], offset: u64) {
        for (at, header, _) in records_from(chunk, offset as usize, 0) {
            debug_assert_eq!(header.lsn, self.next_lsn, "{}", self.path.display());
            if (header.lsn - self.first_lsn).is_multiple_of(INDEX_EVERY) {
                self.index.push((header.lsn, offset + at as u64));
            }
            self.next_lsn = header.lsn + 1;
            self.end = offset + (at + header.stored_len()) as u64;
        }
    }

    /// Byte range of the index interval holding `lsn`, which this segment holds.
    fn interval_of(&self, lsn: Lsn) -> Option<(u64, u64)> {
        let at = self.index.partition_point(|&(l, _)| l <= lsn);
        let (_, start) = *self.index.get(at.wrapping_sub(1))?;
        let end = self.index.get(at).map_or(self.end, |&(_, offset)| offset);
        assert!(
            start <= end,
            "index of {} out of order",
            self.path.display()
        );
        Some((start, end))
    }
}

impl Wal {
    /// Read one durable record.
    pub fn read(&self, lsn: Lsn) -> Result<Record, WalError> {
        let mut records = self.read_interval(lsn)?;
        let record = (records.iter())
            .position(|r| r.lsn == lsn)
            .map(|i| records.swap_remove(i))
            .ok_or(WalError::NotFound(lsn))?;
        assert_eq!(record.lsn, lsn);
        Ok(record)
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

    /// Wait up to `timeout` for `lsn` to be durable; whether it is. A reader that
    /// follows the tail waits with this and then reads what became durable as a range
    /// (`iter`), rather than one record at a time: each read decodes an index interval.
    pub fn wait_durable_timeout(&self, lsn: Lsn, timeout: Duration) -> Result<bool, WalError> {
        let deadline = Instant::now() + timeout;
        let shared = &self.shared;
        let mut state = shared.lock();
        while self.durable_lsn() < lsn {
            if let Some(poisoned) = shared.poisoned() {
                return Err(poisoned);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            state = shared
                .durable_changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(true)
    }

    /// The records of the index interval holding `lsn`.
    fn read_interval(&self, lsn: Lsn) -> Result<Vec<Record>, WalError> {
        if lsn == 0 || lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        let segments = self.shared.segments();
        let segment = segments
            .iter()
            .rev()
            .find(|s| s.first_lsn <= lsn && lsn < s.next_lsn)
            .ok_or(WalError::NotFound(lsn))?;
        let (start, end) = segment.interval_of(lsn).ok_or(WalError::NotFound(lsn))?;
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
        if !self.wal.wait_durable_timeout(self.next, timeout)? {
            return Ok(None);
        }
        let record = self.wal.read(self.next)?;
        assert_eq!(
            record.lsn, self.next,
            "a follower yields every LSN in order"
        );
        self.next += 1;
        Ok(Some(record))
    }
}
