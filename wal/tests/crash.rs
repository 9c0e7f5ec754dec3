//! Crash safety: a child process appends with acknowledged durability and is killed with
//! SIGKILL at random points; after each kill the log reopens with every acknowledged
//! record present, byte for byte, at its LSN.
//!
//! The child is this test binary itself, re-run with an environment variable, so the
//! appender is the real log in a real separate process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use parley_wal::{Entry, Wal, WalOptions};

const CHILD_DIR_ENV: &str = "PARLEY_WAL_CRASH_CHILD_DIR";
const TEST_NAME: &str = "sigkill_at_random_points_loses_no_acknowledged_record";
const KILLS: usize = 12;
const APPENDERS: u64 = 4;
/// How long a child may take to acknowledge what a kill waits for: generous, as reaching
/// it fails the test. (The child stops appending by itself after 30 s.)
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

fn options() -> WalOptions {
    // Small segments so the kills also land around segment roll-over.
    WalOptions {
        segment_size: 512 * 1024,
        max_batch_bytes: 128 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

/// The payload of an append, derived from what the child prints, so the parent can
/// check every byte.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_record() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        return run_child(Path::new(&dir));
    }
    let seed = std::env::var("PARLEY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test seed {seed} (rerun with PARLEY_CRASH_SEED={seed})");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    let mut kill_points = 0;
    for kill in 0..KILLS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // The acknowledgements read so far, and whether the child's output has ended.
        let seen = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let (state, changed) = &*seen;
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    // Only whole lines count: a kill can cut the last one short.
                    if let ["ACK", lsn, len, seed, "END"] = words[..] {
                        let parsed = (
                            lsn.parse::<u64>(),
                            len.parse::<usize>(),
                            seed.parse::<u64>(),
                        );
                        if let (Ok(lsn), Ok(len), Ok(seed)) = parsed {
                            state.lock().unwrap().0.push((lsn, len, seed));
                            changed.notify_all();
                        }
                    }
                }
                state.lock().unwrap().1 = true;
                changed.notify_all();
            })
        };
        // The random moment of the kill is the point of this test. It is set by the
        // child's progress, not by the clock (a busy machine may make fdatasync slow):
        // after its k-th new acknowledgement, then a random pause, so kills land
        // anywhere in an append, a flush or a segment roll-over.
        let k = 1 + (rng.next() % 40) as usize;
        let pause = Duration::from_millis(rng.next() % 51);
        let started = Instant::now();
        {
            let (state, changed) = &*seen;
            let (progress, wait) = changed
                .wait_timeout_while(state.lock().unwrap(), CHILD_DEADLINE, |(acks, ended)| {
                    acks.len() < k && !*ended
                })
                .unwrap();
            assert!(
                !wait.timed_out() && progress.0.len() >= k,
                "kill {kill}: the child acknowledged {} of {k} records in {:?}",
                progress.0.len(),
                started.elapsed()
            );
        }
        std::thread::sleep(pause);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let alive_for = started.elapsed();
        let new: Vec<_> = std::mem::take(&mut seen.0.lock().unwrap().0);
        kill_points += k;
        for (lsn, len, seed) in &new {
            let previous = acked.insert(*lsn, (*len, *seed));
            assert!(previous.is_none(), "LSN {lsn} acknowledged twice");
        }
        let (wal, report) = Wal::open(dir.path(), options(), &mut |_| {}).unwrap();
        // One sequential pass over the log, checked against every acknowledgement.
        let mut present = wal.iter(1, report.last_lsn);
        for (&lsn, &(len, seed)) in &acked {
            let record = loop {
                match present.next() {
                    Some(Ok(record)) if record.lsn < lsn => continue,
                    Some(Ok(record)) => break record,
                    Some(Err(e)) => panic!("reading after kill {kill}: {e}"),
                    None => panic!("acknowledged LSN {lsn} lost after kill {kill}"),
                }
            };
            assert_eq!(
                record.lsn, lsn,
                "acknowledged LSN {lsn} lost after kill {kill}"
            );
            assert_eq!(
                record.payload,
                payload(seed, len),
                "LSN {lsn} changed after kill {kill}"
            );
        }
        drop(present);
        assert!(report.last_lsn >= acked.keys().next_back().copied().unwrap_or(0));
        eprintln!(
            "kill {kill}: after {k} acks and {pause:?} ({alive_for:?}), {} new acks, {} total, last LSN {}, torn bytes cut {}",
            new.len(),
            acked.len(),
            report.last_lsn,
            report.torn_bytes_cut
        );
        wal.close().unwrap();
    }
    // Each kill waited for its k acknowledgements: the total follows.
    assert!(
        acked.len() >= kill_points,
        "the children acknowledged {} records, fewer than the {kill_points} waited for",
        acked.len()
    );
}

/// The child: appenders that print each record once it is durable, until killed.
fn run_child(dir: &Path) {
    let (wal, _) = Wal::open(dir, options(), &mut |_| {}).unwrap();
    let out = Mutex::new(std::io::stdout());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..APPENDERS {
            let (wal, out) = (&wal, &out);
            scope.spawn(move || {
                let mut rng = Rng(started.elapsed().as_nanos() as u64 ^ (thread << 32) | 1);
                // Bounded even if nobody kills us.
                while started.elapsed() < Duration::from_secs(30) {
                    let count = 1 + (rng.next() % 3) as usize;
                    let specs: Vec<(usize, u64)> = (0..count)
                        .map(|_| ((rng.next() % 3000) as usize, rng.next()))
                        .collect();
                    let payloads: Vec<Vec<u8>> = specs
                        .iter()
                        .map(|&(len, seed)| payload(seed, len))
                        .collect();
                    let entries: Vec<Entry> = payloads
                        .iter()
                        .map(|p| Entry {
                            record_type: 1,
                            timestamp: 0,
                            payload: p,
                        })
                        .collect();
                    let last = wal.append_batch(&entries).unwrap();
                    wal.wait_durable(last).unwrap();
                    let first = last + 1 - count as u64;
                    let mut out = out.lock().unwrap();
                    for (i, (len, seed)) in specs.iter().enumerate() {
                        writeln!(out, "ACK {} {len} {seed} END", first + i as u64).unwrap();
                    }
                    out.flush().unwrap();
                }
            });
        }
    });
}
