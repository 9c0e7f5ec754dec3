//! Signals must not break a flush: a signal that lands on the writer thread while it waits
//! for io_uring ends the wait early (EINTR, or with only the write's completion), and the
//! writer must wait again rather than fail or reuse a buffer the kernel still reads.
//! (A SIGTERM drain of parleyd poisoned its log this way about once in fifty runs.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_wal::{Wal, WalOptions};

/// The log writer thread's name (wal/src/log.rs).
const WRITER_THREAD: &str = "parley-wal";

extern "C" fn ignore(_: libc::c_int) {}

/// The thread id of the log's writer thread, found by its name (a new thread names
/// itself once it runs, so look until it has, for a bounded time).
fn writer_thread() -> Option<libc::pid_t> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == WRITER_THREAD {
                return task.file_name().to_str()?.parse().ok();
            }
        }
        std::thread::yield_now();
    }
    None
}

#[test]
fn flushes_survive_a_storm_of_signals() {
    // A handler without SA_RESTART, so a blocking io_uring_enter returns EINTR.
    // SAFETY: installing a handler that does nothing is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default(), &mut |_| {}).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let pid = std::process::id() as libc::pid_t;
    let writer = writer_thread().expect("the log's writer thread is running");
    let storm = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: a handled signal to a thread of this process.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, writer, libc::SIGUSR1) };
                sent.fetch_add(1, Ordering::Relaxed);
                // Pacing, so the writer also gets to finish waits between signals.
                std::thread::sleep(Duration::from_micros(20));
            }
        })
    };
    // At least 3,000 flushes, and on until the storm has sent at least 100 signals (a
    // busy machine may run the storm's thread seldom): bounded, as reaching the bound
    // fails the test.
    let deadline = Instant::now() + Duration::from_secs(60);
    let payload = vec![7u8; 3000];
    let mut i = 0u64;
    while i < 3_000 || sent.load(Ordering::Relaxed) < 100 {
        assert!(
            Instant::now() < deadline,
            "after {i} flushes the storm had sent only {} signals",
            sent.load(Ordering::Relaxed)
        );
        let lsn = wal.append(1, i, &payload).expect("append");
        wal.wait_durable(lsn)
            .unwrap_or_else(|e| panic!("flush {i} failed under signals: {e}"));
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
    let last = wal.durable_lsn();
    assert_eq!(last, i);
    assert_eq!(wal.read(1_234).unwrap().payload, payload);
}
