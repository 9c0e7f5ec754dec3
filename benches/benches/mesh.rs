//! The shard mesh: entries per second between two shards (threads), and the wake-up
//! latency from a parked state.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parley_router::mesh::{mesh, MeshEnds};

fn wait_ready<T>(ends: &MeshEnds<T>) {
    futures::executor::block_on(ends.ready());
}

/// Send `entries` from shard 0 to shard 1 in batches of `batch`; the receiver parks when
/// its inbox is empty. Returns the elapsed time.
fn hand_off(entries: u64, batch: usize) -> Duration {
    let mut ends = mesh::<u64>(2, 1024);
    let receiver = ends.pop().unwrap();
    let mut sender = ends.pop().unwrap();
    let started = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut receiver = receiver;
        let mut got = 0;
        while got < entries {
            let n = receiver.receive(usize::MAX, |_, _| {}) as u64;
            got += n;
            if n == 0 {
                wait_ready(&receiver);
            }
        }
    });
    let mut pending = VecDeque::with_capacity(batch);
    let mut next = 0;
    while next < entries || !pending.is_empty() {
        while pending.len() < batch && next < entries {
            pending.push_back(next);
            next += 1;
        }
        if sender.send_batch(1, &mut pending) == 0 {
            std::hint::spin_loop();
        }
    }
    consumer.join().unwrap();
    started.elapsed()
}

/// Ping-pong one entry between two parked shards `rounds` times; half a round trip is
/// one wake-up from parked plus one hand-off.
fn ping_pong(rounds: u64) -> Duration {
    let mut ends = mesh::<u64>(2, 8);
    let pong = ends.pop().unwrap();
    let mut ping = ends.pop().unwrap();
    let echo = std::thread::spawn(move || {
        let mut pong = pong;
        for _ in 0..rounds {
            wait_ready(&pong);
            let mut entry = 0;
            pong.receive(1, |_, e| entry = e);
            while pong.send(0, entry).is_err() {}
        }
    });
    let started = Instant::now();
    for round in 0..rounds {
        while ping.send(1, round).is_err() {}
        wait_ready(&ping);
        ping.receive(1, |_, _| {});
    }
    let elapsed = started.elapsed();
    echo.join().unwrap();
    elapsed
}

fn mesh_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("mesh");
    group.throughput(Throughput::Elements(1));
    for batch in [1usize, 64] {
        group.bench_function(format!("hand_off_batch_{batch}"), |b| {
            b.iter_custom(|iters| hand_off(iters, batch));
        });
    }
    group.bench_function("wake_from_parked_half_round_trip", |b| {
        b.iter_custom(|iters| ping_pong(iters) / 2);
    });
    group.finish();
}

criterion_group!(benches, mesh_benches);
criterion_main!(benches);
