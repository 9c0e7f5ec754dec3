//! A segment keeps the size its header records: a changed `WalOptions::segment_size`
//! (parleyd's `wal_segment_bytes`) applies to segments created from then on, and the
//! writer never writes past the end of the segment it writes to.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parley_wal::format::{decode_segment_header, encode_segment_header, SegmentHeader};
use parley_wal::recovery::{analyze, list_segments};
use parley_wal::{Entry, Lsn, Wal, WalError, WalOptions};

const KIB: u64 = 1024;
const RECORD: usize = 1000;

fn options(segment_size: u64) -> WalOptions {
    WalOptions {
        segment_size,
        max_batch_bytes: 16 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

fn open(dir: &Path, options: WalOptions) -> Wal {
    Wal::open(dir, options, &mut |_| {}).expect("open").0
}

fn payload(lsn: Lsn) -> Vec<u8> {
    (0..RECORD).map(|i| (lsn as usize * 7 + i) as u8).collect()
}

/// Wait (10 s at most) for `lsn` to be durable; a writer that died or was poisoned fails
/// the test instead of hanging it.
fn assert_durable(wal: &Wal, lsn: Lsn) {
    let waited = wal.follow(lsn).next_timeout(Duration::from_secs(10));
    let got = waited.as_ref().map(|r| r.as_ref().map(|r| r.lsn));
    assert!(
        matches!(got, Ok(Some(l)) if l == lsn),
        "LSN {lsn} did not become durable: {got:?}"
    );
}

/// Append one batch; while the buffer is full, wait for the writer to make a record
/// durable (which frees room), 10 s at most: a writer that died never makes room, and a
/// blocking append would hang the test.
fn append_batch(wal: &Wal, entries: &[Entry<'_>]) -> Lsn {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match wal.try_append_batch(entries) {
            Err(WalError::Full) if Instant::now() < deadline => {
                let left = deadline.saturating_duration_since(Instant::now());
                let _durable_or_timeout = wal.follow(wal.durable_lsn() + 1).next_timeout(left);
            }
            Err(error) => panic!("append at LSN {}: {error}", wal.next_lsn()),
            Ok(last) => return last,
        }
    }
}

/// Append `count` records, one batch each, and wait until they are durable.
fn append_durably(wal: &Wal, count: u64) -> Lsn {
    let mut last = 0;
    for _ in 0..count {
        let payload = payload(wal.next_lsn());
        let entry = Entry {
            record_type: 1,
            timestamp: 0,
            payload: &payload,
        };
        last = append_batch(wal, &[entry]);
    }
    assert_durable(wal, last);
    last
}

/// Every record from 1 to `last`, after a reopen, as it was written.
fn assert_all_read_back(dir: &Path, segment_size: u64, last: Lsn) {
    let wal = open(dir, options(segment_size));
    assert_eq!(wal.next_lsn(), last + 1);
    for (record, lsn) in wal.iter(1, last).zip(1..) {
        let record = record.expect("read");
        assert_eq!((record.lsn, &record.payload), (lsn, &payload(lsn)));
    }
}

/// Per segment file: its path, the size its header records and its file length.
fn segments(dir: &Path) -> Vec<(PathBuf, u64, u64)> {
    let segments = list_segments(dir).expect("list segments");
    (segments.into_iter())
        .map(|(_, path)| {
            let data = std::fs::read(&path).expect("read segment");
            let header = decode_segment_header(&data).expect("segment header");
            (path, header.segment_size, data.len() as u64)
        })
        .collect()
}

fn assert_sized(segments: &[(PathBuf, u64, u64)], size: u64) {
    for (path, recorded, len) in segments {
        assert_eq!(
            (*recorded, *len),
            (size, size),
            "{}: (recorded size, file length)",
            path.display()
        );
    }
}

#[test]
fn a_lowered_segment_size_applies_to_new_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), options(256 * KIB));
    let first = append_durably(&wal, 150);
    wal.close().unwrap();
    let before = segments(dir.path());
    assert_sized(&before, 256 * KIB);
    let analysis = analyze(dir.path(), &mut |_| {}).unwrap();
    let end = analysis.segments.last().unwrap().end;
    assert!(
        end > 64 * KIB,
        "the active segment must end past the new size: {end}"
    );

    // The old segment is written on to its own end, then new ones have the new size.
    let wal = open(dir.path(), options(64 * KIB));
    assert_eq!(wal.max_batch_size(), 16 * 1024);
    let last = append_durably(&wal, 200);
    wal.close().unwrap();
    let after = segments(dir.path());
    assert_sized(&after[..before.len()], 256 * KIB);
    assert!(after.len() > before.len(), "no segment at the new size");
    assert_sized(&after[before.len()..], 64 * KIB);
    assert_eq!(last, first + 200);
    assert_all_read_back(dir.path(), 64 * KIB, last);
}

#[test]
fn a_raised_segment_size_applies_to_new_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), options(64 * KIB));
    append_durably(&wal, 40);
    wal.close().unwrap();
    let before = segments(dir.path());
    assert_sized(&before, 64 * KIB);

    // The old segments stay as they were made; the active one fills to its own end.
    let wal = open(dir.path(), options(256 * KIB));
    let last = append_durably(&wal, 300);
    wal.close().unwrap();
    let after = segments(dir.path());
    assert_sized(&after[..before.len()], 64 * KIB);
    assert!(after.len() > before.len(), "no segment at the new size");
    assert_sized(&after[before.len()..], 256 * KIB);
    assert_all_read_back(dir.path(), 256 * KIB, last);
}

#[test]
fn an_empty_last_segment_too_small_for_a_batch_is_remade_at_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let options = |segment_size| WalOptions {
        max_batch_bytes: 128 * 1024,
        ..self::options(segment_size)
    };
    let wal = open(dir.path(), options(64 * KIB));
    append_durably(&wal, 80);
    // Cut back to the start of the last segment: it stays, holding no record.
    let (empty_from, _) = *list_segments(dir.path()).unwrap().last().unwrap();
    assert!(empty_from > 1, "expected a roll-over");
    wal.truncate_after(empty_from - 1).unwrap();
    wal.close().unwrap();
    let before = segments(dir.path());
    assert_sized(&before, 64 * KIB);

    // One batch larger than the empty segment holds: it is remade in place.
    let wal = open(dir.path(), options(256 * KIB));
    let payloads: Vec<Vec<u8>> = (empty_from..empty_from + 100).map(payload).collect();
    let entries: Vec<Entry<'_>> = (payloads.iter())
        .map(|payload| Entry {
            record_type: 1,
            timestamp: 0,
            payload,
        })
        .collect();
    let last = append_batch(&wal, &entries);
    assert_durable(&wal, last);
    wal.close().unwrap();
    let after = segments(dir.path());
    assert_eq!(after.len(), before.len());
    assert_sized(&after[..before.len() - 1], 64 * KIB);
    assert_sized(&after[before.len() - 1..], 256 * KIB);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_all_read_back(dir.path(), 256 * KIB, last);
}

#[test]
fn a_segment_whose_records_reach_past_its_recorded_size_is_full() {
    // A log written before sizes were read back may hold such a segment (the setting
    // raised, the old segment written on past its size). It is read, never written.
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), options(64 * KIB));
    append_durably(&wal, 20);
    wal.close().unwrap();
    let (path, _, _) = segments(dir.path()).pop().unwrap();
    let header = SegmentHeader {
        first_lsn: list_segments(dir.path()).unwrap().last().unwrap().0,
        segment_size: 8 * KIB,
    };
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&encode_segment_header(&header), 0)
        .unwrap();
    drop(file);

    let wal = open(dir.path(), options(64 * KIB));
    let last = append_durably(&wal, 10);
    wal.close().unwrap();
    let after = segments(dir.path());
    assert_eq!(after.len(), 2, "the full segment was written on");
    assert_eq!((after[0].1, after[0].2), (8 * KIB, 64 * KIB));
    assert_sized(&after[1..], 64 * KIB);
    assert_all_read_back(dir.path(), 64 * KIB, last);
}

#[test]
fn a_segment_size_without_room_for_records_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0, 4096, 8191] {
        let refused = Wal::open(dir.path(), options(size), &mut |_| {}).err();
        assert!(
            matches!(
                refused,
                Some(WalError::SegmentSizeTooSmall { configured, min: 8192 }) if configured == size
            ),
            "segment size {size}: {refused:?}"
        );
    }
    assert!(list_segments(dir.path()).unwrap().is_empty());

    // A size that is not whole blocks: a batch is what fits in whole blocks.
    let wal = open(dir.path(), options(10_000));
    assert_eq!(wal.max_batch_size(), 4096);
    let too_large = wal.append(1, 0, &[1; 4072]);
    assert!(
        matches!(
            too_large,
            Err(WalError::TooLarge {
                size: 4104,
                max: 4096
            })
        ),
        "{too_large:?}"
    );
    wal.append(1, 0, &[2; 4064]).unwrap();
    let last = wal.append(1, 0, &[3; 4064]).unwrap();
    assert_durable(&wal, last);
    assert_eq!(wal.read(last).unwrap().payload, vec![3; 4064]);
}
