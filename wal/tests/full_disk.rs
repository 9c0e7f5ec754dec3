//! A full disk is a refusal, not a failure: when the next segment cannot be allocated
//! (injected ENOSPC), the log takes appends while the active segment has room, then
//! refuses them with `NoSpace`, acknowledges nothing it did not make durable, and takes
//! appends again by itself once an allocation succeeds.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use parley_wal::format::BLOCK;
use parley_wal::io::{FullDiskIo, UringIo};
use parley_wal::recovery::list_segments;
use parley_wal::{Entry, Lsn, SpaceEvent, SpaceObserver, Wal, WalError, WalOptions};

/// Upper bound on any one wait; reaching it fails the test.
const WAIT: Duration = Duration::from_secs(10);
const SEGMENT: u64 = 64 * 1024;
const RECORD: usize = 100;

/// What the observer saw, in order.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Full,
    Recovered,
}

fn options(next_segment_at_percent: u8, events: mpsc::Sender<Seen>) -> WalOptions {
    let observer = move |event: &SpaceEvent<'_>| {
        let _ = events.send(match event {
            SpaceEvent::Full { .. } => Seen::Full,
            SpaceEvent::Recovered { .. } => Seen::Recovered,
        });
    };
    WalOptions {
        segment_size: SEGMENT,
        max_batch_bytes: 16 * 1024,
        next_segment_at_percent,
        disk_full_retry: Duration::from_millis(5),
        on_disk_space: Some(SpaceObserver(Arc::new(observer))),
        ..WalOptions::default()
    }
}

fn payload(lsn: Lsn) -> Vec<u8> {
    (0..RECORD).map(|i| (lsn as usize * 13 + i) as u8).collect()
}

fn entry(payload: &[u8]) -> [Entry<'_>; 1] {
    [Entry {
        record_type: 1,
        timestamp: 0,
        payload,
    }]
}

/// Wait (bounded) for `lsn` to be durable.
fn assert_durable(wal: &Wal, lsn: Lsn) {
    let waited = wal.follow(lsn).next_timeout(WAIT);
    let got = waited.as_ref().map(|r| r.as_ref().map(|r| r.lsn));
    assert!(
        matches!(got, Ok(Some(l)) if l == lsn),
        "LSN {lsn} did not become durable: {got:?}"
    );
}

/// Every record 1..=last reads back after a reopen, and nothing after it.
fn assert_reopens_with(dir: &Path, last: Lsn) {
    let (events, _) = mpsc::channel();
    let (wal, report) = Wal::open(dir, options(50, events), &mut |_| {}).expect("reopen");
    assert_eq!(report.last_lsn, last, "records after a reopen");
    for lsn in 1..=last {
        assert_eq!(wal.read(lsn).unwrap().payload, payload(lsn), "LSN {lsn}");
    }
}

#[test]
fn a_full_disk_refuses_appends_keeps_what_it_took_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (io, full) = FullDiskIo::new(UringIo::new().unwrap());
    let (events, seen) = mpsc::channel();
    let (wal, _) =
        Wal::open_with_io(dir.path(), options(50, events), Box::new(io), &mut |_| {}).unwrap();
    full.store(true, Ordering::SeqCst);

    // One record per flush (each durable before the next), so each takes a block.
    let mut last = 0;
    let refusal = loop {
        match wal.try_append_batch(&entry(&payload(last + 1))) {
            Ok(lsn) => {
                assert_eq!(lsn, last + 1);
                assert_durable(&wal, lsn);
                last = lsn;
            }
            Err(error) => break error,
        }
        assert!(last < SEGMENT / BLOCK as u64, "never refused");
    };
    assert!(
        matches!(
            &refusal,
            WalError::NoSpace {
                op: "preallocate",
                ..
            }
        ),
        "{refusal}"
    );
    assert_eq!(seen.recv_timeout(WAIT), Ok(Seen::Full));
    assert!(wal.disk_full().is_some());
    assert!(wal.stats().disk_full.load(Ordering::Relaxed));
    assert!(wal.stats().appends_refused.load(Ordering::Relaxed) >= 1);
    // Everything taken is durable, in the one segment there is.
    assert_eq!(wal.durable_lsn(), last);
    assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
    // The warning came with room left: more records were taken after it than before
    // the mark (half the segment) was passed.
    assert!(last > SEGMENT / BLOCK as u64 / 2, "refused at {last}");

    // What is left is the reserve: refused to ordinary appends, taken by a deferred one.
    assert!(wal.refusing().is_some());
    let reserved = wal.try_append_reserved(&entry(&payload(last + 1))).unwrap();
    assert_durable(&wal, reserved);
    last = reserved;
    let again = wal.try_append_reserved(&entry(&payload(last + 1)));
    assert!(matches!(again, Err(WalError::NoSpace { .. })), "{again:?}");

    // Space is freed: the writer's retry allocates, and appends are taken again.
    full.store(false, Ordering::SeqCst);
    assert_eq!(seen.recv_timeout(WAIT), Ok(Seen::Recovered));
    assert!(wal.disk_full().is_none() && wal.refusing().is_none());
    for _ in 0..SEGMENT / BLOCK as u64 {
        last = wal.try_append_batch(&entry(&payload(last + 1))).unwrap();
        assert_durable(&wal, last);
    }
    assert!(list_segments(dir.path()).unwrap().len() > 1, "no roll-over");
    wal.close().unwrap();
    // Refused appends got no LSN: the log is gapless and holds exactly what was taken.
    assert_reopens_with(dir.path(), last);
}

/// Without a segment allocated ahead of need (100%), the flush that rolls over finds no
/// room: its records wait, unacknowledged, and appends are refused until the retry
/// allocates.
#[test]
fn a_roll_with_no_room_waits_acknowledging_nothing_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let (io, full) = FullDiskIo::new(UringIo::new().unwrap());
    let (events, seen) = mpsc::channel();
    let (wal, _) =
        Wal::open_with_io(dir.path(), options(100, events), Box::new(io), &mut |_| {}).unwrap();
    full.store(true, Ordering::SeqCst);
    let fits = (SEGMENT / BLOCK as u64) - 1;
    for lsn in 1..=fits {
        assert_eq!(wal.try_append_batch(&entry(&payload(lsn))).unwrap(), lsn);
        assert_durable(&wal, lsn);
    }
    let held = wal.try_append_batch(&entry(&payload(fits + 1))).unwrap();
    assert_eq!(seen.recv_timeout(WAIT), Ok(Seen::Full));
    assert_eq!(
        wal.durable_lsn(),
        fits,
        "a record acknowledged without its segment"
    );
    let refused = wal.try_append_reserved(&entry(&payload(held + 1)));
    assert!(
        matches!(refused, Err(WalError::NoSpace { .. })),
        "{refused:?}"
    );

    full.store(false, Ordering::SeqCst);
    assert_eq!(seen.recv_timeout(WAIT), Ok(Seen::Recovered));
    assert_durable(&wal, held);
    let next = wal.try_append_batch(&entry(&payload(held + 1))).unwrap();
    assert_durable(&wal, next);
    wal.close().unwrap();
    assert_reopens_with(dir.path(), next);
}

/// A log closed while a roll waits for room reports it, and what waited was never
/// acknowledged: a reopen holds exactly the records made durable before.
#[test]
fn closing_while_a_roll_waits_for_room_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (io, full) = FullDiskIo::new(UringIo::new().unwrap());
    let (events, seen) = mpsc::channel();
    let (wal, _) =
        Wal::open_with_io(dir.path(), options(100, events), Box::new(io), &mut |_| {}).unwrap();
    full.store(true, Ordering::SeqCst);
    let fits = (SEGMENT / BLOCK as u64) - 1;
    for lsn in 1..=fits {
        wal.try_append_batch(&entry(&payload(lsn))).unwrap();
        assert_durable(&wal, lsn);
    }
    let held = wal.try_append_batch(&entry(&payload(fits + 1))).unwrap();
    assert_eq!(seen.recv_timeout(WAIT), Ok(Seen::Full));
    let closed = wal.close();
    assert!(
        matches!(&closed, Err(WalError::Poisoned(why)) if why.contains("no space")),
        "{closed:?}"
    );
    assert_reopens_with(dir.path(), held - 1);
}
