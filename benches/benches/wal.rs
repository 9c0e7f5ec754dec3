//! The WAL's costs: encoding a record (copy + crc32c), recovery's scan of a segment, and
//! pipelined appends through group commit to a real file (write + fdatasync per flush).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley_wal::format::{
    align_up, encode_record, encode_record_into, encode_segment_header, set_flush_start,
    stored_len, RecordHeader, SegmentHeader, BLOCK, FLAG_BATCH_END,
};
use parley_wal::scan::scan_segment;
use parley_wal::{Wal, WalOptions};

const SIZES: [(usize, &str); 3] = [(100, "100B"), (1024, "1KiB"), (16 * 1024, "16KiB")];

fn header(lsn: u64, payload_len: usize) -> RecordHeader {
    RecordHeader {
        payload_len: payload_len as u32,
        lsn,
        epoch: 1,
        record_type: 1,
        flags: FLAG_BATCH_END,
        timestamp: 1_800_000_000_000,
    }
}

fn encode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_encode");
    for (size, name) in SIZES {
        let payload = vec![0x5a; size];
        let mut out = vec![0u8; stored_len(size)];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode_record", name), &size, |b, _| {
            let header = header(42, size);
            b.iter(|| encode_record_into(&mut out, black_box(&header), black_box(&payload)));
        });
        group.bench_with_input(BenchmarkId::new("crc32c", name), &size, |b, _| {
            b.iter(|| crc32c::crc32c(black_box(&payload)));
        });
    }
    group.finish();
}

/// A `len`-byte segment full of 1 KiB records, 16 records per flush (block-padded).
fn prebuilt_segment(len: usize) -> (Vec<u8>, u64) {
    let mut data = encode_segment_header(&SegmentHeader {
        first_lsn: 1,
        segment_size: len as u64,
    });
    let payload = vec![0xa5; 1024];
    let mut lsn = 1;
    loop {
        let flush = data.len();
        if flush + 16 * stored_len(payload.len()) > len {
            break;
        }
        for _ in 0..16 {
            encode_record(&mut data, &header(lsn, payload.len()), &payload);
            lsn += 1;
        }
        set_flush_start(&mut data[flush..]);
        data.resize(align_up(data.len(), BLOCK), 0);
    }
    data.resize(len, 0);
    (data, lsn)
}

fn scan_benches(c: &mut Criterion) {
    let len = 4 << 20;
    let (data, next_lsn) = prebuilt_segment(len);
    assert_eq!(scan_segment(&data, 1).unwrap().next_lsn, next_lsn);
    let mut group = c.benchmark_group("wal_scan");
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function("scan_segment_4MiB_1KiB_records", |b| {
        b.iter(|| scan_segment(black_box(&data), 1).unwrap());
    });
    group.finish();
}

/// Append `RECORDS` records from one thread without waiting, then wait for the last:
/// throughput through group commit, with real write + fdatasync on the disk under
/// the temporary directory.
fn append_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append_pipelined");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(3));
    for (size, name, records) in [(100, "100B", 20_000u64), (16 * 1024, "16KiB", 1_000)] {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default(), &mut |_| {}).unwrap();
        let payload = vec![0x3c; size];
        if size >= 1024 {
            group.throughput(Throughput::Bytes(records * size as u64));
        } else {
            group.throughput(Throughput::Elements(records));
        }
        group.bench_function(BenchmarkId::new("append_then_wait_last", name), |b| {
            b.iter(|| {
                let mut last = 0;
                for _ in 0..records {
                    last = wal.append(1, 0, &payload).unwrap();
                }
                wal.wait_durable(last).unwrap();
            });
        });
        wal.close().unwrap();
    }
    group.finish();
}

criterion_group!(benches, encode_benches, scan_benches, append_benches);
criterion_main!(benches);
