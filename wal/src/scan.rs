//! Recovery's reading of one segment, as a pure function over its bytes.
//!
//! The scan walks records while each verifies and carries the next LSN; zeros after a
//! record are padding up to the next block. It stops at the first thing that is not the
//! next record, and then classifies that stop:
//! - nothing but zeros after it: the clean end of the log;
//! - a later flush starts after it (here, or any valid record in a later segment): the
//!   damaged bytes were already durable when that flush was issued, so this is
//!   corruption in the middle, and the log must not open;
//! - otherwise: a torn tail from the final, unacknowledged flush, to be cut.
//!
//! Then an incomplete batch at the end is cut too: batches are atomic.

use crate::format::{
    align_up, decode_record, decode_segment_header, Decoded, Lsn, RecordHeader, BLOCK,
    MAX_FIRST_LSN, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, RECORD_ALIGN, SEGMENT_HEADER,
};

/// Keep every Nth record's position for reads by LSN.
pub const INDEX_EVERY: u64 = 64;

/// How a segment's records end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Valid records, then zeros.
    Clean,
    /// Damage at `offset` with no later flush in this segment: a torn tail, unless a
    /// later segment holds records (the caller decides).
    Stopped { offset: usize, nonzero_bytes: usize },
    /// Damage at `offset` followed by a later flush in the same segment.
    Corrupt { offset: usize },
}

/// The result of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub first_lsn: Lsn,
    /// The size its header records (what it was preallocated to): the log writes to the
    /// segment only below it, whatever size it is configured to give new segments.
    pub segment_size: u64,
    /// LSN after the last record of the last complete batch.
    pub next_lsn: Lsn,
    /// Byte offset just past that record: where the log ends after recovery.
    pub committed_end: usize,
    /// Bytes of whole records after `committed_end` that belong to an incomplete batch.
    pub incomplete_batch_bytes: usize,
    pub end: SegmentEnd,
    /// (lsn, offset) of the first record and every INDEX_EVERY-th after it.
    pub index: Vec<(Lsn, usize)>,
    /// Epoch of the last complete record, if any.
    pub last_epoch: Option<u32>,
}

/// Why a segment could not be scanned at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    BadHeader(String),
    /// The header's first LSN is not the one the file name says.
    LsnMismatch {
        header: Lsn,
        expected: Lsn,
    },
}

/// Scan a whole segment file's bytes. `expected_first_lsn` comes from the file name.
pub fn scan_segment(data: &[u8], expected_first_lsn: Lsn) -> Result<SegmentScan, ScanError> {
    let header =
        decode_segment_header(data).map_err(|error| ScanError::BadHeader(format!("{error:?}")))?;
    // LSN 0 is no record's (LSNs start at 1), and LSNs must have room to count on: a
    // header outside that was not written by the log.
    if !(1..=MAX_FIRST_LSN).contains(&header.first_lsn) {
        let detail = format!("first LSN {} outside 1..={MAX_FIRST_LSN}", header.first_lsn);
        return Err(ScanError::BadHeader(detail));
    }
    if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&header.segment_size) {
        let detail = format!(
            "segment size {} outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}",
            header.segment_size
        );
        return Err(ScanError::BadHeader(detail));
    }
    if header.first_lsn != expected_first_lsn {
        return Err(ScanError::LsnMismatch {
            header: header.first_lsn,
            expected: expected_first_lsn,
        });
    }
    let mut scan = SegmentScan {
        first_lsn: header.first_lsn,
        segment_size: header.segment_size,
        next_lsn: header.first_lsn,
        committed_end: SEGMENT_HEADER,
        incomplete_batch_bytes: 0,
        end: SegmentEnd::Clean,
        index: Vec::new(),
        last_epoch: None,
    };
    let mut pos = SEGMENT_HEADER;
    let mut records_end = SEGMENT_HEADER;
    let mut expected = header.first_lsn;
    let mut pending_index: Vec<(Lsn, usize)> = Vec::new();
    let stop = loop {
        if pos >= data.len() {
            break None;
        }
        match decode_record(&data[pos..]) {
            Decoded::Record(record, _) if record.lsn == expected => {
                if (record.lsn - header.first_lsn) % INDEX_EVERY == 0 {
                    pending_index.push((record.lsn, pos));
                }
                pos += record.stored_len();
                records_end = pos;
                expected += 1;
                if record.batch_end() {
                    scan.committed_end = pos;
                    scan.next_lsn = expected;
                    scan.last_epoch = Some(record.epoch);
                    scan.index.append(&mut pending_index);
                }
            }
            _ => match padding_end(data, 0, pos) {
                Some(next_block) => pos = next_block,
                None => break Some(pos),
            },
        }
    };
    scan.incomplete_batch_bytes = records_end - scan.committed_end;
    scan.end = match stop {
        None => SegmentEnd::Clean,
        Some(offset) if has_flush_start_after(data, offset) => SegmentEnd::Corrupt { offset },
        Some(offset) => {
            let nonzero_bytes = data[offset..]
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |last| last + 1);
            if nonzero_bytes == 0 {
                SegmentEnd::Clean
            } else {
                SegmentEnd::Stopped {
                    offset,
                    nonzero_bytes,
                }
            }
        }
    };
    Ok(scan)
}

/// Where the zero padding at `data[offset]` ends (the next block boundary), if `offset`
/// is inside a block and only zeros follow it up to that boundary. Padding is checked up
/// to the block end only: a record header may not fit there, and the next block already
/// belongs to the next flush. `data` starts at file offset `base`.
fn padding_end(data: &[u8], base: usize, offset: usize) -> Option<usize> {
    if (base + offset).is_multiple_of(BLOCK) {
        return None;
    }
    let next_block = align_up(base + offset, BLOCK) - base;
    let tail = &data[offset..next_block.min(data.len())];
    tail.iter().all(|&b| b == 0).then_some(next_block)
}

/// Whether a valid flush-start record begins at any block boundary after `offset`.
fn has_flush_start_after(data: &[u8], offset: usize) -> bool {
    let mut block = align_up(offset + 1, BLOCK);
    while block < data.len() {
        if let Decoded::Record(header, _) = decode_record(&data[block..]) {
            if header.flush_start() {
                return true;
            }
        }
        block += BLOCK;
    }
    false
}

/// Whether a segment holds any valid record at all (for the segments after a stop).
pub fn has_any_record(data: &[u8]) -> bool {
    let mut pos = SEGMENT_HEADER;
    while pos + RECORD_ALIGN <= data.len() {
        if matches!(decode_record(&data[pos..]), Decoded::Record(..)) {
            return true;
        }
        pos += RECORD_ALIGN;
    }
    false
}

/// Walk records while they verify. `data` holds segment bytes starting at file offset
/// `base` (padding runs to file block boundaries, so the walk must know where it is);
/// the walk starts at `data[offset]`, a record boundary. Yields offsets within `data`.
pub fn records_from(
    data: &[u8],
    base: usize,
    mut offset: usize,
) -> impl Iterator<Item = (usize, RecordHeader, &[u8])> {
    std::iter::from_fn(move || loop {
        if offset >= data.len() {
            return None;
        }
        match decode_record(&data[offset..]) {
            Decoded::Record(header, payload) => {
                let at = offset;
                offset += header.stored_len();
                return Some((at, header, payload));
            }
            _ => match padding_end(data, base, offset) {
                Some(next_block) => offset = next_block,
                None => return None,
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        encode_record, encode_segment_header, set_flush_start, SegmentHeader, FLAG_BATCH_END,
        RECORD_HEADER,
    };

    const SIZE: usize = 16 * BLOCK;

    /// A segment with flushes of `flushes[i]` single-record batches each.
    fn segment(flushes: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let mut data = encode_segment_header(&SegmentHeader {
            first_lsn: 1,
            segment_size: SIZE as u64,
        });
        let mut lsn = 1;
        let mut flush_offsets = Vec::new();
        for &records in flushes {
            let start = data.len();
            flush_offsets.push(start);
            for _ in 0..records {
                let payload = vec![lsn as u8; 100];
                let header = RecordHeader {
                    payload_len: 100,
                    lsn,
                    epoch: 1,
                    record_type: 1,
                    flags: FLAG_BATCH_END,
                    timestamp: 0,
                };
                encode_record(&mut data, &header, &payload);
                lsn += 1;
            }
            set_flush_start(&mut data[start..]);
            data.resize(align_up(data.len(), BLOCK), 0);
        }
        data.resize(SIZE, 0);
        (data, flush_offsets)
    }

    #[test]
    fn clean_log_scans_to_its_end() {
        let (data, _) = segment(&[3, 50, 1]);
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.end, SegmentEnd::Clean);
        assert_eq!(scan.next_lsn, 55);
        assert_eq!(scan.incomplete_batch_bytes, 0);
        assert_eq!(scan.index.first(), Some(&(1, SEGMENT_HEADER)));
        assert_eq!(scan.index.len(), 1); // LSN 1; LSN 65 does not exist
    }

    #[test]
    fn garbage_in_the_last_flush_is_a_torn_tail() {
        let (mut data, flushes) = segment(&[3, 5]);
        let last = flushes[1];
        data[last + 200] ^= 0xff; // inside the last flush's second record
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.next_lsn, 5);
        assert!(matches!(scan.end, SegmentEnd::Stopped { offset, .. } if offset == last + 136));
    }

    #[test]
    fn damage_before_a_later_flush_is_corruption() {
        let (mut data, flushes) = segment(&[3, 5, 2]);
        data[flushes[1] + 10] ^= 1;
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.end, SegmentEnd::Corrupt { offset: flushes[1] });
    }

    #[test]
    fn a_zeroed_block_before_a_later_flush_is_corruption() {
        let (mut data, flushes) = segment(&[3, 5, 2]);
        data[flushes[1]..flushes[1] + BLOCK].fill(0);
        assert_eq!(
            scan_segment(&data, 1).unwrap().end,
            SegmentEnd::Corrupt { offset: flushes[1] }
        );
    }

    #[test]
    fn zeroed_tail_is_a_clean_end() {
        let (mut data, flushes) = segment(&[3, 5]);
        data[flushes[1]..].fill(0);
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.end, SegmentEnd::Clean);
        assert_eq!(scan.next_lsn, 4);
    }

    #[test]
    fn padding_shorter_than_a_header_is_skipped() {
        // A flush whose last record ends 16 bytes before a block boundary, then a flush.
        let mut data = encode_segment_header(&SegmentHeader {
            first_lsn: 1,
            segment_size: SIZE as u64,
        });
        for (lsn, target_end) in (1..).zip([2 * BLOCK - 16, 3 * BLOCK - 8]) {
            let start = data.len();
            let payload_len = target_end - start - RECORD_HEADER;
            let header = RecordHeader {
                payload_len: payload_len as u32,
                lsn,
                epoch: 1,
                record_type: 1,
                flags: FLAG_BATCH_END,
                timestamp: 0,
            };
            encode_record(&mut data, &header, &vec![7; payload_len]);
            assert_eq!(data.len(), target_end);
            set_flush_start(&mut data[start..]);
            data.resize(align_up(data.len(), BLOCK), 0);
        }
        data.resize(SIZE, 0);
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.end, SegmentEnd::Clean);
        assert_eq!(scan.next_lsn, 3);
        assert_eq!(records_from(&data, 0, SEGMENT_HEADER).count(), 2);
    }

    #[test]
    fn incomplete_batch_is_cut() {
        let (mut data, _) = segment(&[]);
        data.truncate(SEGMENT_HEADER);
        for (lsn, flags) in [(1, FLAG_BATCH_END), (2, 0), (3, 0)] {
            let header = RecordHeader {
                payload_len: 8,
                lsn,
                epoch: 1,
                record_type: 1,
                flags,
                timestamp: 0,
            };
            encode_record(&mut data, &header, &[0xaa; 8]);
        }
        set_flush_start(&mut data[SEGMENT_HEADER..]);
        data.resize(SIZE, 0);
        let scan = scan_segment(&data, 1).unwrap();
        assert_eq!(scan.next_lsn, 2);
        assert_eq!(scan.committed_end, SEGMENT_HEADER + 40);
        assert_eq!(scan.incomplete_batch_bytes, 80);
    }

    #[test]
    fn a_header_starting_at_lsn_0_or_past_the_ceiling_is_bad() {
        for first_lsn in [0, MAX_FIRST_LSN + 1, u64::MAX] {
            let mut data = encode_segment_header(&SegmentHeader {
                first_lsn,
                segment_size: SIZE as u64,
            });
            data.resize(SIZE, 0);
            let detail = format!("first LSN {first_lsn} outside 1..={MAX_FIRST_LSN}");
            assert_eq!(
                scan_segment(&data, first_lsn),
                Err(ScanError::BadHeader(detail))
            );
        }
        let mut data = encode_segment_header(&SegmentHeader {
            first_lsn: MAX_FIRST_LSN,
            segment_size: SIZE as u64,
        });
        data.resize(SIZE, 0);
        assert!(scan_segment(&data, MAX_FIRST_LSN).is_ok());
    }

    /// Found by the wal_recovery fuzz target: a sealed header recording a size near 2^64
    /// was taken as the segment's write bound, and the writer's fill check overflowed.
    #[test]
    fn a_header_recording_a_size_outside_the_bounds_is_bad() {
        let scan = |segment_size: u64| {
            let mut data = encode_segment_header(&SegmentHeader {
                first_lsn: 1,
                segment_size,
            });
            data.resize(SIZE, 0);
            scan_segment(&data, 1)
        };
        for segment_size in [0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1, u64::MAX] {
            let detail = format!(
                "segment size {segment_size} outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
            );
            assert_eq!(scan(segment_size), Err(ScanError::BadHeader(detail)));
        }
        for segment_size in [MIN_SEGMENT_SIZE, SIZE as u64, MAX_SEGMENT_SIZE] {
            assert!(scan(segment_size).is_ok(), "{segment_size}");
        }
    }

    #[test]
    fn header_lsn_must_match_the_name() {
        let (data, _) = segment(&[1]);
        assert_eq!(
            scan_segment(&data, 7),
            Err(ScanError::LsnMismatch {
                header: 1,
                expected: 7
            })
        );
    }

    #[test]
    fn records_iterate_across_padding() {
        let (data, _) = segment(&[2, 3]);
        let lsns: Vec<Lsn> = records_from(&data, 0, SEGMENT_HEADER)
            .map(|(_, h, _)| h.lsn)
            .collect();
        assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
    }
}
