//! Replication: the epoch that fences a deposed leader, a follower's appends of the
//! leader's records at the same LSNs, and the cut of a follower's divergent tail.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::WalError;
use crate::format::{decode_record, Decoded, Lsn, RecordHeader, FLAG_BATCH_END, SEGMENT_HEADER};
use crate::log::{Admit, Entry, Wal};
use crate::number_file::{read_number, write_number};
use crate::recovery::sync_dir;
use crate::scan::records_from;
use crate::shared::{Command, Shared, State};
use crate::writer::ActiveSegment;

/// The epoch, persisted beside the segments.
const EPOCH_FILE: &str = "epoch";

/// The epoch persisted in `dir`, 0 if none was.
pub(crate) fn persisted_epoch(dir: &Path) -> Result<u32, WalError> {
    Ok(read_number(&dir.join(EPOCH_FILE))?.unwrap_or(0) as u32)
}

pub(crate) fn persist_epoch(dir: &Path, epoch: u32) -> Result<(), WalError> {
    write_number(&dir.join(EPOCH_FILE), u64::from(epoch))
}

/// How a follower appends the leader's records: at the leader's LSNs, each framed as
/// the leader framed it.
pub(crate) struct Replicated<'a> {
    /// The LSN of the first record, which must be the log's next.
    pub(crate) lsn: Lsn,
    /// The leader's epoch; an older one than the log's is refused.
    pub(crate) epoch: u32,
    /// The leader's headers of the records, in order.
    pub(crate) headers: &'a [RecordHeader],
}

impl Replicated<'_> {
    /// Under the state lock, before anything is encoded: refuse a stale epoch or a wrong
    /// position, and move to a newer epoch (persisted first).
    pub(crate) fn admit(&self, dir: &Path, state: &mut State) -> Result<(), WalError> {
        if self.epoch < state.epoch {
            return Err(WalError::StaleEpoch {
                got: self.epoch,
                current: state.epoch,
            });
        }
        if self.lsn != state.next_lsn {
            return Err(WalError::LsnMismatch {
                expected: state.next_lsn,
                got: self.lsn,
            });
        }
        if self.epoch > state.epoch {
            persist_epoch(dir, self.epoch)?;
            state.epoch = self.epoch;
        }
        Ok(())
    }

    /// The epoch, flags and timestamp of the `i`th record as the leader framed it. Only
    /// the batch-end flag carries over: the flush-start flag describes the leader's file,
    /// and the follower's writer sets its own.
    pub(crate) fn framing(&self, i: usize) -> (u32, u8, u64) {
        let leader = &self.headers[i];
        (
            leader.epoch,
            leader.flags & FLAG_BATCH_END,
            leader.timestamp,
        )
    }
}

impl Wal {
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
        persist_epoch(&self.shared.dir, epoch)?;
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
        let (headers, payloads) = decode_replicated(lsn, epoch, bytes)?;
        let entries: Vec<Entry<'_>> = headers
            .iter()
            .zip(&payloads)
            .map(|(h, payload)| Entry {
                record_type: h.record_type,
                timestamp: h.timestamp,
                payload,
            })
            .collect();
        let replicated = Replicated {
            lsn,
            epoch,
            headers: &headers,
        };
        let last = self.append_inner(&entries, Some(replicated), Admit::Wait)?;
        assert_eq!(
            last,
            lsn + headers.len() as u64 - 1,
            "stored at the leader's LSNs"
        );
        Ok(last)
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
                if result.is_ok() {
                    assert_eq!(state.next_lsn, lsn + 1, "the log ends at the cut");
                }
                return result;
            }
            if let Some(poisoned) = self.shared.poisoned() {
                return Err(poisoned);
            }
            state = self.shared.wait(&self.shared.command_done, state);
        }
    }
}

/// The records in `bytes`, shipped by a leader at `epoch` from `lsn` on: whole records
/// at consecutive LSNs, none of a newer epoch, ending with a complete batch.
fn decode_replicated(
    lsn: Lsn,
    epoch: u32,
    bytes: &[u8],
) -> Result<(Vec<RecordHeader>, Vec<&[u8]>), WalError> {
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
    Ok((headers, payloads))
}

/// Cut every record after `lsn` from the segments and their index. Runs on the writer
/// thread with nothing pending or in flight. Returns the segment to append to next and
/// whether it is open for direct I/O.
pub(crate) fn cut_after(
    shared: &Shared,
    lsn: Lsn,
    direct_io: bool,
) -> Result<(ActiveSegment, bool), WalError> {
    let mut segments = shared.segments_mut();
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
    sync_dir(&shared.dir)?;
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
    sync_dir(&shared.dir)?;
    segment.end = cut_at;
    segment.next_lsn = cut;
    segment.index.retain(|&(l, _)| l < cut);
    ActiveSegment::reopen(&segment.path, cut_at, segment.size, direct_io)
}
