//! Target `wal_recovery`: a log directory holding arbitrary segment bytes, opened by
//! `Wal::open` (wal/src/recovery.rs and scan.rs), then read, appended to and reopened.
//!
//! Input: a mode byte, a split byte, then the bytes of one segment file, or of two (cut
//! at `split` blocks) with mode bit 3. Checksums would stop almost every mutation at the
//! first record, so the mode can seal what the input holds as a writer would: bit 0 makes
//! each segment's header valid (magic, version, checksum), bit 2 first sets its first
//! LSN to 1, bit 1 recomputes the checksum of every record-like thing it walks over. A
//! file is named by the first LSN its header claims, as the log names segments.
//!
//! Invariants:
//! - the pure scan (scan_segment) of each file: the committed end on a record boundary
//!   within the file, the index naming records that are there, the records it walks
//!   contiguous from the first LSN;
//! - opening either refuses with `WalError::Corruption`, leaving every file as it was,
//!   or opens; then every record it serves is one the files held whole, with a checksum
//!   that verifies (checked here from the bytes written), the LSNs run contiguously to
//!   the last, and the last ends its batch;
//! - recovery is idempotent: a second open serves the same records and cuts nothing;
//! - the log goes on: a record appended after recovery is durable, and read back after
//!   another reopen, after the records recovery kept.

use std::collections::HashMap;
use std::path::Path;

use parley_wal::format::{
    align_up, decode_record, Decoded, Lsn, BLOCK, FORMAT_VERSION, RECORD_ALIGN, RECORD_HEADER,
    SEGMENT_HEADER, SEGMENT_MAGIC,
};
use parley_wal::io::SyncIo;
use parley_wal::recovery::{list_segments, segment_name};
use parley_wal::scan::{records_from, scan_segment};
use parley_wal::{Record, Wal, WalError, WalOptions};

use crate::fixture::ScratchDir;

/// A record's content as the files held it, and whether it ended its batch.
type Held = (u32, u8, u64, Vec<u8>, bool);

fn options() -> WalOptions {
    WalOptions {
        segment_size: 16 * 1024,
        max_batch_bytes: 8 * 1024,
        direct_io: false,
        ..WalOptions::default()
    }
}

pub fn wal_recovery(data: &[u8]) {
    let [mode, split, bytes @ ..] = data else {
        return;
    };
    let mut segments: Vec<Vec<u8>> = if mode & 8 != 0 {
        let cut = (usize::from(*split) * BLOCK).min(bytes.len());
        vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]
    } else {
        vec![bytes.to_vec()]
    };
    for segment in &mut segments {
        seal(segment, *mode);
    }
    let dir = ScratchDir::new();
    let mut files: Vec<(Lsn, Vec<u8>)> = Vec::new();
    for (i, segment) in segments.into_iter().enumerate() {
        let first_lsn = named_lsn(&segment).unwrap_or(i as Lsn + 1);
        files.retain(|(lsn, _)| *lsn != first_lsn);
        files.push((first_lsn, segment));
    }
    for (first_lsn, segment) in &files {
        check_scan(segment, *first_lsn);
        std::fs::write(dir.path().join(segment_name(*first_lsn)), segment).expect("write segment");
    }
    let held = whole_records(&files);
    let opened = Wal::open_with_io(dir.path(), options(), Box::new(SyncIo), &mut |_| {});
    let (wal, report) = match opened {
        Ok(opened) => opened,
        Err(WalError::Corruption { .. }) => {
            for (first_lsn, segment) in &files {
                let now = std::fs::read(dir.path().join(segment_name(*first_lsn)));
                assert!(
                    now.is_ok_and(|now| now == *segment),
                    "a refused log was changed"
                );
            }
            return;
        }
        Err(error) => panic!("opening failed with neither a log nor corruption: {error}"),
    };
    let first = first_lsn(dir.path());
    let records = served(&wal, first, report.last_lsn, &held);
    assert_eq!(wal.next_lsn(), report.last_lsn + 1);
    wal.close().expect("close");

    let (wal, again) = Wal::open_with_io(dir.path(), options(), Box::new(SyncIo), &mut |_| {})
        .expect("a recovered log opens again");
    assert_eq!(again.torn_bytes_cut, 0, "the second recovery cut more");
    assert_eq!(again.last_lsn, report.last_lsn);
    assert_eq!(served(&wal, first, again.last_lsn, &held), records);
    let appended = wal
        .append(1, 42, b"after recovery")
        .unwrap_or_else(|e| panic!("append after recovery: {e}"));
    assert_eq!(appended, report.last_lsn + 1);
    wal.wait_durable(appended)
        .expect("the appended record is durable");
    wal.close().expect("close");

    let (wal, last) = Wal::open_with_io(dir.path(), options(), Box::new(SyncIo), &mut |_| {})
        .expect("the log opens after an append");
    assert_eq!(last.last_lsn, appended);
    let read = wal.read(appended).expect("the appended record");
    assert_eq!((read.record_type, read.timestamp), (1, 42));
    assert_eq!(read.payload, b"after recovery");
    if report.last_lsn >= first {
        let kept = wal
            .iter(first, report.last_lsn)
            .collect::<Result<Vec<_>, _>>()
            .expect("the kept records");
        assert_eq!(kept, records, "an append changed what was recovered");
    }
    wal.close().expect("close");
}

/// Seal the segment as the mode asks (see the module's comment).
fn seal(segment: &mut [u8], mode: u8) {
    if segment.len() < 32 {
        return;
    }
    if mode & 4 != 0 {
        segment[12..20].copy_from_slice(&1u64.to_le_bytes());
    }
    if mode & 1 != 0 {
        segment[..8].copy_from_slice(SEGMENT_MAGIC);
        segment[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let crc = crc32c::crc32c(&segment[..28]);
        segment[28..32].copy_from_slice(&crc.to_le_bytes());
    }
    if mode & 2 != 0 {
        let mut pos = SEGMENT_HEADER;
        while pos + RECORD_HEADER <= segment.len() {
            let len = u32::from_le_bytes(segment[pos + 4..pos + 8].try_into().expect("4 bytes"));
            let end = pos + RECORD_HEADER + len as usize;
            let zero = segment[pos..pos + RECORD_HEADER].iter().all(|&b| b == 0);
            if zero || end > segment.len() {
                pos += RECORD_ALIGN;
                continue;
            }
            let crc = crc32c::crc32c(&segment[pos + 4..end]);
            segment[pos..pos + 4].copy_from_slice(&crc.to_le_bytes());
            pos = align_up(end, RECORD_ALIGN);
        }
    }
}

/// The first LSN a segment's header claims, if it has one to claim.
fn named_lsn(segment: &[u8]) -> Option<Lsn> {
    Some(u64::from_le_bytes(segment.get(12..20)?.try_into().ok()?))
}

/// Every whole record with a valid checksum anywhere in the files, by LSN.
fn whole_records(files: &[(Lsn, Vec<u8>)]) -> HashMap<Lsn, Vec<Held>> {
    let mut held: HashMap<Lsn, Vec<Held>> = HashMap::new();
    for (_, segment) in files {
        let mut pos = SEGMENT_HEADER;
        while pos < segment.len() {
            if let Decoded::Record(header, payload) = decode_record(&segment[pos..]) {
                let crc = u32::from_le_bytes(segment[pos..pos + 4].try_into().expect("4 bytes"));
                let end = pos + RECORD_HEADER + payload.len();
                assert_eq!(crc, crc32c::crc32c(&segment[pos + 4..end]));
                held.entry(header.lsn).or_default().push((
                    header.epoch,
                    header.record_type,
                    header.timestamp,
                    payload.to_vec(),
                    header.batch_end(),
                ));
            }
            pos += RECORD_ALIGN;
        }
    }
    held
}

/// The pure scan's promises about one file.
fn check_scan(segment: &[u8], first_lsn: Lsn) {
    let Ok(scan) = scan_segment(segment, first_lsn) else {
        return;
    };
    assert!(scan.committed_end >= SEGMENT_HEADER);
    assert!(scan.committed_end <= segment.len().max(SEGMENT_HEADER));
    assert_eq!(scan.committed_end % RECORD_ALIGN, 0);
    assert!(scan.next_lsn >= first_lsn);
    for &(lsn, offset) in &scan.index {
        assert!(
            matches!(decode_record(&segment[offset..]), Decoded::Record(h, _) if h.lsn == lsn),
            "the index names LSN {lsn} at {offset}, which holds no such record"
        );
    }
    let kept = records_from(
        &segment[..scan.committed_end.min(segment.len())],
        0,
        SEGMENT_HEADER,
    );
    let mut expected = first_lsn;
    for (_, header, _) in kept {
        assert_eq!(header.lsn, expected, "the scan kept a gap");
        expected += 1;
    }
    assert_eq!(
        expected, scan.next_lsn,
        "the scan's next LSN is not after its records"
    );
}

/// The smallest first LSN of the segments left after recovery.
fn first_lsn(dir: &Path) -> Lsn {
    let segments = list_segments(dir).expect("list segments");
    segments.first().map_or(1, |(lsn, _)| *lsn)
}

/// The records the log serves from `first` to `last`, each checked against what the
/// files held whole.
fn served(wal: &Wal, first: Lsn, last: Lsn, held: &HashMap<Lsn, Vec<Held>>) -> Vec<Record> {
    if last < first {
        return Vec::new();
    }
    let records: Vec<Record> = wal
        .iter(first, last)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("recovery said LSNs {first}..={last} are there: {e}"));
    for (record, lsn) in records.iter().zip(first..) {
        assert_eq!(record.lsn, lsn, "LSNs are not contiguous");
        let candidates = held.get(&lsn).map_or(&[][..], Vec::as_slice);
        let content = |h: &&Held| {
            (h.0, h.1, h.2, &h.3[..])
                == (
                    record.epoch,
                    record.record_type,
                    record.timestamp,
                    &record.payload[..],
                )
        };
        let whole: Vec<&Held> = candidates.iter().filter(content).collect();
        assert!(
            !whole.is_empty(),
            "LSN {lsn} served, but no whole record holds it"
        );
        if lsn == last {
            assert!(
                whole.iter().any(|h| h.4),
                "the last record served ends no batch"
            );
        }
    }
    assert_eq!(records.len() as u64, last - first + 1, "records missing");
    records
}
