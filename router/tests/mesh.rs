//! The shard mesh across real threads: nothing lost, nothing reordered, no lost wake-up,
//! and a parked shard burns no CPU.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parley_router::mesh::{mesh, MeshEnds};

/// Block the thread on a shard's doorbell: the thread parks until a producer wakes it.
fn wait_ready<T>(ends: &MeshEnds<T>) {
    futures::executor::block_on(ends.ready());
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Run `f` on a thread; fail (rather than hang) if it does not finish in time.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("stuck: a wake-up was lost or an entry never arrived")
}

#[test]
fn two_shards_exchange_every_entry_in_order_with_parking() {
    const ENTRIES: u64 = 200_000;
    within(Duration::from_secs(60), || {
        let mut ends = mesh::<u64>(2, 64);
        let b = ends.pop().unwrap();
        let a = ends.pop().unwrap();
        let shard = |mut me: MeshEnds<u64>, seed: u64| {
            std::thread::spawn(move || {
                let peer = 1 - me.shard();
                let mut rng = seed | 1;
                let mut next_to_send = 0u64;
                let mut pending: VecDeque<u64> = VecDeque::new();
                let mut expected = 0u64;
                while expected < ENTRIES || next_to_send < ENTRIES || !pending.is_empty() {
                    // Produce a random batch (sometimes none, so the peer parks).
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let batch = (rng % 100).min(ENTRIES - next_to_send);
                    pending.extend(next_to_send..next_to_send + batch);
                    next_to_send += batch;
                    me.send_batch(peer, &mut pending);
                    let got = me.receive(usize::MAX, |from, entry| {
                        assert_eq!(from, peer);
                        assert_eq!(entry, expected, "reordered or lost");
                        expected += 1;
                    });
                    if got == 0
                        && pending.is_empty()
                        && next_to_send == ENTRIES
                        && expected < ENTRIES
                    {
                        wait_ready(&me);
                    }
                }
                expected
            })
        };
        let (a, b) = (shard(a, 1), shard(b, 2));
        assert_eq!(a.join().unwrap(), ENTRIES);
        assert_eq!(b.join().unwrap(), ENTRIES);
    });
}

#[test]
fn a_parked_shard_uses_no_cpu_and_wakes_on_the_first_entry() {
    within(Duration::from_secs(30), || {
        let mut ends = mesh::<&'static str>(2, 8);
        let consumer = ends.pop().unwrap();
        let mut producer = ends.pop().unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let parked = std::thread::spawn(move || {
            let mut consumer = consumer;
            // SAFETY: gettid(2) has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let before = thread_cpu_time();
            wait_ready(&consumer);
            let spent = thread_cpu_time() - before;
            let mut got = Vec::new();
            consumer.receive(8, |_, entry| got.push(entry));
            (spent, got)
        });
        // Send only once the consumer has parked (asleep in the kernel, state S: all it
        // does from the moment it sent its thread id is wait for its doorbell), so that
        // the wake-up, not an entry already there, is what it returns on.
        let tid = tid_rx.recv().unwrap();
        let stat = format!("/proc/self/task/{tid}/stat");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(&stat).expect("the consumer thread is alive");
            // The state follows the command name, which is in parentheses.
            let state = state.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
            if state == Some("S") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the consumer never parked (state {state:?})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Parked, it stays idle a while: what it spends meanwhile is measured. (A busy
        // machine only makes this longer.)
        std::thread::sleep(Duration::from_millis(300));
        producer.send(1, "wake up").unwrap();
        let (spent, got) = parked.join().unwrap();
        assert_eq!(got, vec!["wake up"]);
        assert!(
            spent < Duration::from_millis(30),
            "a parked shard spent {spent:?} of CPU"
        );
    });
}
