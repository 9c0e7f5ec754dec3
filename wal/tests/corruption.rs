//! Damaged logs: what recovery cuts, what it refuses, and what it says.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parley_wal::recovery::{analyze, list_segments};
use parley_wal::{Wal, WalError, WalOptions};

fn options() -> WalOptions {
    WalOptions {
        segment_size: 256 * 1024,
        max_batch_bytes: 64 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

fn payload(lsn: u64) -> Vec<u8> {
    vec![(lsn % 251) as u8 + 1; 100 + (lsn % 500) as usize]
}

/// A log of `records` records, each its own flush (append + wait), so there are many
/// flushes after any early record.
fn build(dir: &Path, records: u64) {
    let (wal, _) = Wal::open(dir, options(), &mut |_| {}).unwrap();
    for lsn in 1..=records {
        assert_eq!(wal.append(1, lsn, &payload(lsn)).unwrap(), lsn);
        wal.wait_durable(lsn).unwrap();
    }
    wal.close().unwrap();
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn flip(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Offset just past the last record of the last segment.
fn tail_end(dir: &Path) -> (PathBuf, u64) {
    let analysis = analyze(dir, &mut |_| {}).unwrap();
    let last = analysis.segments.last().unwrap();
    (last.path.clone(), last.end)
}

#[test]
fn a_flipped_byte_mid_log_refuses_to_open_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 600);
    let files = segments(dir.path());
    assert!(files.len() >= 2);
    // Inside the payload of a record in the middle of the first segment.
    let target = &files[0];
    flip(target, 40_000);
    let error = Wal::open(dir.path(), options(), &mut |_| {})
        .err()
        .expect("must refuse");
    match &error {
        WalError::Corruption { path, offset, .. } => {
            assert_eq!(path, target);
            // The offset names the damaged record: at or before the flipped byte, within
            // one flush of it.
            assert!(
                *offset <= 40_000 && 40_000 - offset < 4096 + 700,
                "offset {offset}"
            );
        }
        other => panic!("expected corruption, got {other}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(target.to_str().unwrap()) && message.contains("offset"),
        "{message}"
    );
    // Refusing changed nothing: the same verdict again.
    assert!(matches!(
        Wal::open(dir.path(), options(), &mut |_| {}),
        Err(WalError::Corruption { .. })
    ));
}

#[test]
fn a_flipped_byte_in_an_earlier_segment_refuses_even_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 600);
    let files = segments(dir.path());
    let analysis = analyze(dir.path(), &mut |_| {}).unwrap();
    // The last record of the first segment: no later flush in that file, but later
    // segments hold records, so it cannot be a torn tail.
    let end = analysis.segments[0].end;
    flip(&files[0], end - 20);
    match Wal::open(dir.path(), options(), &mut |_| {}) {
        Err(WalError::Corruption { path, detail, .. }) => {
            assert_eq!(path, files[0]);
            assert!(detail.contains("later segments"), "{detail}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
}

#[test]
fn a_zeroed_block_mid_log_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 300);
    let files = segments(dir.path());
    write_at(&files[0], 8 * 4096, &[0u8; 4096]);
    assert!(matches!(
        Wal::open(dir.path(), options(), &mut |_| {}),
        Err(WalError::Corruption { offset: 32768, .. })
    ));
}

#[test]
fn a_zeroed_tail_record_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 50);
    let (path, end) = tail_end(dir.path());
    // Zero the second half of the last record: a short, partly zeroed record.
    let last_len = (32 + payload(50).len()).div_ceil(8) as u64 * 8;
    let last_start = end - last_len;
    write_at(
        &path,
        last_start + last_len / 2,
        &vec![0u8; (last_len / 2) as usize],
    );
    let (wal, report) = Wal::open(dir.path(), options(), &mut |_| {}).unwrap();
    assert_eq!(report.last_lsn, 49);
    assert_eq!(
        report.torn_bytes_cut,
        last_len / 2,
        "the non-zero bytes of the torn record"
    );
    assert_eq!(wal.read(49).unwrap().payload, payload(49));
    // The log goes on from the cut, and the cut stays cut.
    assert_eq!(wal.append(1, 0, b"after").unwrap(), 50);
    wal.wait_durable(50).unwrap();
    wal.close().unwrap();
    let (wal, report) = Wal::open(dir.path(), options(), &mut |_| {}).unwrap();
    assert_eq!((report.last_lsn, report.torn_bytes_cut), (50, 0));
    assert_eq!(wal.read(50).unwrap().payload, b"after");
}

#[test]
fn a_fully_zeroed_last_flush_is_the_end_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 50);
    let (path, end) = tail_end(dir.path());
    let last_len = (32 + payload(50).len()).div_ceil(8) as u64 * 8;
    write_at(&path, end - last_len, &vec![0u8; last_len as usize]);
    let (_, report) = Wal::open(dir.path(), options(), &mut |_| {}).unwrap();
    assert_eq!((report.last_lsn, report.torn_bytes_cut), (49, 0));
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 50);
    let (path, end) = tail_end(dir.path());
    write_at(&path, end, &[0xab; 100]);
    let analysis = analyze(dir.path(), &mut |_| {}).unwrap();
    let torn = analysis.torn_tail.expect("a torn tail");
    assert_eq!(
        (torn.path, torn.offset, torn.bytes),
        (path.clone(), end, 100)
    );
    let (wal, report) = Wal::open(dir.path(), options(), &mut |_| {}).unwrap();
    assert_eq!((report.last_lsn, report.torn_bytes_cut), (50, 100));
    assert_eq!(wal.read(50).unwrap().payload, payload(50));
}

#[test]
fn recovery_reports_progress_per_segment() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 600);
    let count = segments(dir.path()).len();
    let mut reports = Vec::new();
    let (_, report) = Wal::open(dir.path(), options(), &mut |p| reports.push(p)).unwrap();
    assert_eq!(reports.len(), count);
    assert_eq!(report.segments, count);
    let last = reports.last().unwrap();
    assert_eq!((last.segment, last.segments), (count, count));
    assert_eq!(last.bytes_done, last.bytes_total);
    assert!(reports
        .windows(2)
        .all(|w| w[0].bytes_done < w[1].bytes_done));
}
