//! The chat core's cost per command, without I/O: a `ShardCore` over an in-memory log,
//! durability granted after every command, and the documents for sessions drained (the
//! socket writes are not included). What a shard spends to sequence, persist-encode,
//! reply and fan out.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parley_router::chat_log::MemoryLog;
use parley_router::clock::Now;
use parley_router::command::{ChatCommand, SendArgs};
use parley_router::limits::ChatLimits;
use parley_router::record::{ConvKind, MessageKind};
use parley_router::shard::ShardCore;

// The allocator parleyd runs with: allocation is a large part of a command's cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now(t0: Instant, ms: u64) -> Now {
    Now {
        instant: t0 + Duration::from_millis(ms),
        unix_ms: 1_800_000_000_000 + ms,
    }
}

/// A one-shard core with `members` sessions in one conversation; returns the conv id.
fn setup(kind: ConvKind, members: usize, t0: Instant) -> (ShardCore, String) {
    let mut core = ShardCore::new(
        0,
        1,
        Arc::new(ChatLimits::default()),
        Box::new(MemoryLog::default()),
    );
    let users: Vec<String> = (0..members).map(|i| format!("user{i}")).collect();
    for (conn, user) in users.iter().enumerate() {
        core.session_opened(conn as u64, user, now(t0, 0));
    }
    core.on_request(
        0,
        1,
        &users[0],
        "d",
        ChatCommand::ConvCreate {
            kind,
            members: users[1..].to_vec(),
            title: None,
        },
        now(t0, 0),
    );
    core.on_durable(core.last_appended());
    let reply = core.take_local().next().expect("a reply").1;
    let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
    core.take_local().for_each(drop);
    (core, reply["ok"]["conv"].as_str().unwrap().to_string())
}

fn send(conv: &str, cmid: u64) -> ChatCommand {
    ChatCommand::Send(Box::new(SendArgs {
        conv: conv.to_string(),
        cmid: cmid.to_string(),
        body: "x".repeat(100),
        kind: MessageKind::Text,
        media: None,
        reply_to: None,
    }))
}

/// Send one message per iteration; returns documents drained per message.
fn run_sends(core: &mut ShardCore, conv: &str, t0: Instant, iters: u64, start: u64) -> Duration {
    let started = Instant::now();
    for i in start..start + iters {
        core.on_request(0, i, "user0", "d", send(conv, i), now(t0, i / 1000));
        core.on_durable(core.last_appended());
        black_box(core.take_local().count());
    }
    started.elapsed()
}

fn sequencer(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut group = c.benchmark_group("sequencer");
    group.throughput(Throughput::Elements(1));

    let (mut core, conv) = setup(ConvKind::Direct, 2, t0);
    let mut next = 1_000;
    group.bench_function("send_direct", |b| {
        b.iter_custom(|iters| {
            let took = run_sends(&mut core, &conv, t0, iters, next);
            next += iters;
            took
        })
    });

    group.bench_function("send_duplicate", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for i in 0..iters {
                core.on_request(0, i, "user0", "d", send(&conv, 1_000), now(t0, 0));
                core.on_durable(core.last_appended());
                black_box(core.take_local().count());
            }
            started.elapsed()
        })
    });

    group.bench_function("ack", |b| {
        let mut seq = 0;
        b.iter_custom(|iters| {
            let started = Instant::now();
            for i in 0..iters {
                seq = (seq % 1_000) + 1;
                let ack = ChatCommand::Ack {
                    conv: conv.clone(),
                    seq,
                };
                core.on_request(1, i, "user1", &format!("d{}", i % 4), ack, now(t0, 0));
                core.on_durable(core.last_appended());
                black_box(core.take_local().count());
            }
            started.elapsed()
        })
    });

    let (mut core, conv) = setup(ConvKind::Group, 100, t0);
    let mut next = 1_000;
    group.bench_function("send_group_100_members", |b| {
        b.iter_custom(|iters| {
            let took = run_sends(&mut core, &conv, t0, iters, next);
            next += iters;
            took
        })
    });
    group.finish();
}

criterion_group!(benches, sequencer);
criterion_main!(benches);
