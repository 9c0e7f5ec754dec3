//! The log's contract, on a real directory with real I/O.

use std::time::{Duration, SystemTime};

use parley_wal::io::{Fault, FaultyIo, UringIo};
use parley_wal::{Entry, Retention, Wal, WalError, WalOptions};

fn small() -> WalOptions {
    WalOptions {
        segment_size: 256 * 1024,
        max_batch_bytes: 64 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

fn open(dir: &std::path::Path, options: WalOptions) -> (Wal, parley_wal::RecoveryReport) {
    Wal::open(dir, options, &mut |_| {}).expect("open")
}

fn payload(lsn: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lsn as usize * 31 + i) as u8).collect()
}

#[test]
fn append_returns_lsns_at_once_and_reads_back_after_durability() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, report) = open(dir.path(), small());
    assert_eq!(report.last_lsn, 0);
    assert_eq!(report.io_path, "io_uring");
    assert!(report.direct_io);
    let mut last = 0;
    for i in 1..=500u64 {
        last = wal
            .append(7, i * 10, &payload(i, (i % 300) as usize))
            .unwrap();
        assert_eq!(last, i);
    }
    wal.wait_durable(last).unwrap();
    assert_eq!(wal.durable_lsn(), 500);
    for i in [1u64, 2, 63, 64, 65, 128, 499, 500] {
        let record = wal.read(i).unwrap();
        assert_eq!(record.lsn, i);
        assert_eq!(record.record_type, 7);
        assert_eq!(record.timestamp, i * 10);
        assert_eq!(record.payload, payload(i, (i % 300) as usize));
    }
    let lsns: Vec<u64> = wal.iter(60, 130).map(|r| r.unwrap().lsn).collect();
    assert_eq!(lsns, (60..=130).collect::<Vec<_>>());
    assert!(matches!(wal.read(501), Err(WalError::NotFound(501))));
    assert!(matches!(wal.read(0), Err(WalError::NotFound(0))));
}

#[test]
fn records_survive_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _) = open(dir.path(), small());
        for i in 1..=3000u64 {
            wal.append(1, i, &payload(i, 200)).unwrap();
        }
        wal.close().unwrap();
    }
    let segments = parley_wal::recovery::list_segments(dir.path()).unwrap();
    assert!(
        segments.len() > 2,
        "expected roll-over, got {} segments",
        segments.len()
    );
    let (wal, report) = open(dir.path(), small());
    assert_eq!(report.last_lsn, 3000);
    assert_eq!(report.torn_bytes_cut, 0);
    for (i, record) in wal.iter(1, 3000).enumerate() {
        let record = record.unwrap();
        assert_eq!(record.lsn, i as u64 + 1);
        assert_eq!(record.payload, payload(record.lsn, 200));
    }
    assert_eq!(wal.append(1, 0, b"next").unwrap(), 3001);
    wal.wait_durable(3001).unwrap();
    assert_eq!(wal.read(3001).unwrap().payload, b"next");
}

#[test]
fn batches_get_consecutive_lsns() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), small());
    wal.append(1, 0, b"one").unwrap();
    let entries: Vec<Entry> = (0..10)
        .map(|_| Entry {
            record_type: 2,
            timestamp: 5,
            payload: b"batched",
        })
        .collect();
    assert_eq!(wal.append_batch(&entries).unwrap(), 11);
    wal.wait_durable(11).unwrap();
    assert_eq!(wal.read(11).unwrap().record_type, 2);
}

#[test]
fn oversized_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), small());
    let big = vec![0u8; 70 * 1024];
    assert!(matches!(
        wal.append(1, 0, &big),
        Err(WalError::TooLarge { .. })
    ));
    assert_eq!(wal.append(1, 0, b"fine").unwrap(), 1);
}

/// Durable writes that wait for the test to let each one through: the test decides when
/// records become durable.
struct GatedIo {
    gate: std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
}

/// Opens the gate for good when dropped: a failing assertion unwinds through it before
/// the log's drop waits for its writer, which would otherwise wait at the gate for ever.
struct OpenOnDrop(std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = u64::MAX;
        self.0 .1.notify_all();
    }
}

impl parley_wal::io::LogIo for GatedIo {
    fn write_durable(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        buf: &[u8],
    ) -> std::io::Result<()> {
        let (permits, opened) = &*self.gate;
        let mut permits = permits.lock().unwrap();
        while *permits == 0 {
            permits = opened.wait(permits).unwrap();
        }
        *permits -= 1;
        drop(permits);
        parley_wal::io::SyncIo.write_durable(file, offset, buf)
    }

    fn name(&self) -> &'static str {
        "gated"
    }
}

#[test]
fn follow_yields_records_only_once_durable_and_as_written() {
    let dir = tempfile::tempdir().unwrap();
    // Open freely (it may write the first segment's header); then close the gate.
    let gate = std::sync::Arc::new((std::sync::Mutex::new(u64::MAX), std::sync::Condvar::new()));
    let io = Box::new(GatedIo { gate: gate.clone() });
    let (wal, _) = Wal::open_with_io(dir.path(), small(), io, &mut |_| {}).expect("open");
    *gate.0.lock().unwrap() = 0;
    let _open_on_drop = OpenOnDrop(gate.clone());
    let release = |n: u64| {
        *gate.0.lock().unwrap() += n;
        gate.1.notify_all();
    };
    let quiet = Duration::from_millis(50);
    let mut follow = wal.follow(1);
    for i in 1..=5u64 {
        assert_eq!(wal.append(1, i, &payload(i, 100)).unwrap(), i);
    }
    // Appended, none durable yet: the follower has nothing to yield.
    assert_eq!(follow.next_timeout(quiet).unwrap(), None);
    assert_eq!(wal.durable_lsn(), 0);

    // One flush through: exactly what it made durable is yielded, then nothing.
    release(1);
    let first = follow
        .next_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let durable = wal.durable_lsn();
    assert!((1..=5).contains(&durable), "durable {durable}");
    assert_eq!((first.lsn, first.timestamp), (1, 1));
    assert_eq!(first.payload, payload(1, 100));
    for lsn in 2..=durable {
        let record = follow
            .next_timeout(quiet)
            .unwrap()
            .expect("durable, so yielded");
        assert_eq!((record.lsn, record.payload), (lsn, payload(lsn, 100)));
    }
    if durable < 5 {
        assert_eq!(
            follow.next_timeout(quiet).unwrap(),
            None,
            "past durable {durable}"
        );
    }

    // The rest, once let through; a follower from the start sees the same 5, in order.
    release(u64::MAX / 2);
    for lsn in durable + 1..=5 {
        let record = follow
            .next_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!((record.lsn, record.payload), (lsn, payload(lsn, 100)));
    }
    assert!(wal.durable_lsn() >= 5);
    let mut again = wal.follow(1);
    let lsns: Vec<u64> = (0..5)
        .map(|_| again.next_timeout(quiet).unwrap().unwrap().lsn)
        .collect();
    assert_eq!(lsns, [1, 2, 3, 4, 5]);
    assert_eq!(
        follow.next_timeout(quiet).unwrap(),
        None,
        "nothing past the end"
    );
}

#[test]
fn follow_sees_records_as_they_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), small());
    std::thread::scope(|scope| {
        let wal = &wal;
        let follower = scope.spawn(move || {
            let mut follow = wal.follow(1);
            (0..100)
                .map(|_| {
                    let record = follow
                        .next_timeout(Duration::from_secs(10))
                        .unwrap()
                        .unwrap();
                    // Yielded only once durable (durable_lsn never goes back).
                    assert!(wal.durable_lsn() >= record.lsn);
                    assert_eq!(record.payload, payload(record.lsn, 10));
                    record.lsn
                })
                .collect::<Vec<_>>()
        });
        for i in 1..=100u64 {
            wal.append(1, i, &payload(i, 10)).unwrap();
        }
        assert_eq!(follower.join().unwrap(), (1..=100).collect::<Vec<_>>());
    });
    let mut follow = wal.follow(101);
    assert_eq!(
        follow.next_timeout(Duration::from_millis(20)).unwrap(),
        None
    );
}

#[test]
fn durable_future_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), small());
    let lsn = wal.append(1, 0, b"x").unwrap();
    block_on(wal.durable(lsn)).unwrap();
    assert!(wal.durable_lsn() >= lsn);
}

use futures::executor::block_on;

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_wal, _) = open(dir.path(), small());
    assert!(matches!(
        Wal::open(dir.path(), small(), &mut |_| {}),
        Err(WalError::Locked(_))
    ));
}

#[test]
fn write_failure_poisons_with_no_false_acknowledgement() {
    for fault in [Fault::Write, Fault::Sync] {
        let dir = tempfile::tempdir().unwrap();
        // Call 1 writes the first segment's header; calls 2-3 are the first two flushes.
        let io = FaultyIo::new(UringIo::new().unwrap(), 4, fault);
        let (wal, report) =
            Wal::open_with_io(dir.path(), small(), Box::new(io), &mut |_| {}).unwrap();
        assert_eq!(report.io_path, "fault-injecting");
        let a = wal.append(1, 0, b"a").unwrap();
        wal.wait_durable(a).unwrap();
        let b = wal.append(1, 0, b"b").unwrap();
        wal.wait_durable(b).unwrap();
        let c = wal.append(1, 0, b"c").unwrap();
        let error = wal.wait_durable(c).unwrap_err();
        assert!(matches!(error, WalError::Poisoned(_)), "{fault:?}: {error}");
        assert!(error.to_string().contains("write and fdatasync"), "{error}");
        assert_eq!(
            wal.durable_lsn(),
            b,
            "{fault:?}: nothing acknowledged after the failure"
        );
        assert!(matches!(wal.append(1, 0, b"d"), Err(WalError::Poisoned(_))));
        assert!(matches!(
            block_on(wal.durable(c)),
            Err(WalError::Poisoned(_))
        ));
        assert!(wal.close().is_err());
    }
}

/// Writes through io_uring until the `panic_at`-th write, which panics (a bug in the
/// writer's path, as the wal_recovery fuzz target once found one).
struct PanickingIo {
    inner: UringIo,
    writes: u64,
    panic_at: u64,
}

impl parley_wal::io::LogIo for PanickingIo {
    fn write_durable(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        buf: &[u8],
    ) -> std::io::Result<()> {
        self.writes += 1;
        assert!(
            self.writes < self.panic_at,
            "a bug on write {}",
            self.writes
        );
        self.inner.write_durable(file, offset, buf)
    }

    fn name(&self) -> &'static str {
        "panicking"
    }
}

#[test]
fn a_writer_thread_panic_poisons_the_log_instead_of_leaving_waiters() {
    let dir = tempfile::tempdir().unwrap();
    // Write 1 is the first segment's header, 2 the first flush, 3 the second.
    let io = PanickingIo {
        inner: UringIo::new().unwrap(),
        writes: 0,
        panic_at: 3,
    };
    let (wal, _) = Wal::open_with_io(dir.path(), small(), Box::new(io), &mut |_| {}).unwrap();
    let wal = std::sync::Arc::new(wal);
    let a = wal.append(1, 0, b"a").unwrap();
    wal.wait_durable(a).unwrap();
    let b = wal.append(1, 0, b"b").unwrap();
    // A hang is this test's failure, so the wait runs on a thread with a deadline.
    let (done, outcome) = std::sync::mpsc::channel();
    let waiter = std::sync::Arc::clone(&wal);
    let waiting = std::thread::spawn(move || {
        let _ = done.send(waiter.wait_durable(b));
    });
    let error = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("wait_durable answered within 10 s of the writer's panic")
        .unwrap_err();
    waiting.join().unwrap();
    let wal = std::sync::Arc::try_unwrap(wal)
        .ok()
        .expect("the waiter's handle is gone");
    assert!(matches!(error, WalError::Poisoned(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("writer thread panicked: a bug on write 3"),
        "{error}"
    );
    assert_eq!(wal.durable_lsn(), a, "nothing acknowledged after the panic");
    assert!(matches!(wal.append(1, 0, b"c"), Err(WalError::Poisoned(_))));
    assert!(wal.close().is_err());
}

#[test]
fn replication_fences_older_epochs_and_truncates_divergent_tails() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (leader, _) = open(leader_dir.path(), small());
    leader.set_epoch(3).unwrap();
    for i in 1..=20u64 {
        leader.append(1, i, &payload(i, 50)).unwrap();
    }
    leader.wait_durable(20).unwrap();
    // Ship the leader's records as stored.
    let mut shipped = Vec::new();
    for record in leader.iter(1, 20) {
        let record = record.unwrap();
        let header = parley_wal::format::RecordHeader {
            payload_len: record.payload.len() as u32,
            lsn: record.lsn,
            epoch: record.epoch,
            record_type: record.record_type,
            flags: parley_wal::format::FLAG_BATCH_END,
            timestamp: record.timestamp,
        };
        parley_wal::format::encode_record(&mut shipped, &header, &record.payload);
    }
    let (follower, _) = open(follower_dir.path(), small());
    assert_eq!(follower.append_replicated(1, 3, &shipped).unwrap(), 20);
    follower.wait_durable(20).unwrap();
    assert_eq!(follower.read(7).unwrap(), leader.read(7).unwrap());
    assert_eq!(follower.epoch(), 3);
    // A deposed leader's epoch is refused.
    assert!(matches!(
        follower.append_replicated(21, 2, &shipped),
        Err(WalError::StaleEpoch { got: 2, current: 3 })
    ));
    // Wrong position.
    assert!(matches!(
        follower.append_replicated(5, 3, &shipped),
        Err(WalError::BadReplicatedRecords { .. }) | Err(WalError::LsnMismatch { .. })
    ));
    // Garbage.
    assert!(matches!(
        follower.append_replicated(21, 3, &[1, 2, 3]),
        Err(WalError::BadReplicatedRecords { .. })
    ));
    // Divergent tail: keep 1..=12, then new records continue at 13.
    follower.truncate_after(12).unwrap();
    assert_eq!(follower.next_lsn(), 13);
    assert!(matches!(follower.read(13), Err(WalError::NotFound(13))));
    assert_eq!(follower.append(1, 0, b"new 13").unwrap(), 13);
    follower.wait_durable(13).unwrap();
    drop(follower);
    let (follower, report) = open(follower_dir.path(), small());
    assert_eq!(report.last_lsn, 13);
    assert_eq!(report.torn_bytes_cut, 0);
    assert_eq!(follower.read(13).unwrap().payload, b"new 13");
    assert_eq!(follower.read(12).unwrap().payload, payload(12, 50));
    assert_eq!(follower.epoch(), 3);
}

#[test]
fn retention_deletes_only_snapshotted_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), small());
    for i in 1..=3000u64 {
        wal.append(1, i, &payload(i, 200)).unwrap();
    }
    wal.wait_durable(3000).unwrap();
    let before = parley_wal::recovery::list_segments(dir.path()).unwrap();
    let keep_all = Retention {
        max_age: Duration::from_secs(3600),
        max_bytes: u64::MAX,
    };
    let expire_all = Retention {
        max_age: Duration::ZERO,
        max_bytes: 0,
    };
    // No snapshot: nothing goes.
    assert!(wal
        .apply_retention(expire_all, SystemTime::now())
        .unwrap()
        .is_empty());
    wal.record_snapshot(1500).unwrap();
    // Within retention: nothing goes.
    assert!(wal
        .apply_retention(keep_all, SystemTime::now())
        .unwrap()
        .is_empty());
    let later = SystemTime::now() + Duration::from_secs(1);
    let deleted = wal.apply_retention(expire_all, later).unwrap();
    assert!(!deleted.is_empty());
    let after = parley_wal::recovery::list_segments(dir.path()).unwrap();
    assert_eq!(after.len(), before.len() - deleted.len());
    // What remains starts at or before the snapshot's next record, and still reads.
    assert!(after[0].0 <= 1501, "{after:?}");
    assert_eq!(wal.read(1501).unwrap().payload, payload(1501, 200));
    assert_eq!(wal.snapshot_lsn().unwrap(), Some(1500));
    drop(wal);
    let (_, report) = open(dir.path(), small());
    assert_eq!(report.last_lsn, 3000);
}

#[test]
fn state_snapshots_round_trip_and_refuse_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(wal.load_state().unwrap(), None);
    let lsn = wal.append(1, 0, b"record").unwrap();
    wal.wait_durable(lsn).unwrap();
    assert!(
        wal.save_state(lsn + 1, b"ahead").is_err(),
        "a state beyond the durable log is refused"
    );
    wal.save_state(lsn, b"the owner's state").unwrap();
    assert_eq!(
        wal.load_state().unwrap(),
        Some((lsn, b"the owner's state".to_vec()))
    );
    assert_eq!(wal.snapshot_lsn().unwrap(), Some(lsn));
    drop(wal);
    let path = dir.path().join("state");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default(), &mut |_| {}).unwrap();
    let error = wal.load_state().unwrap_err();
    assert!(error.to_string().contains("checksum"), "{error}");
}
