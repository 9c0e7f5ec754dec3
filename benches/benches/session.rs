//! The per-command cost of the session protocol, without sockets: what a shard spends
//! on one `ping` (parse, rate check, reply encode, batch) and on one token verification.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parley_router::auth::{Claims, JwtKey};
use parley_router::clock::Now;
use parley_router::limits::ChatLimits;
use parley_router::session::{Session, SessionConfig, SessionLimits};

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        limits: SessionLimits {
            rate_per_sec: u32::MAX,
            rate_burst: u32::MAX,
            ..SessionLimits::default()
        },
        chat: ChatLimits::default(),
        jwt: JwtKey::new(b"bench-secret"),
        node: "bench".into(),
    })
}

fn token() -> String {
    JwtKey::new(b"bench-secret").sign(&Claims {
        sub: "alice".into(),
        exp: u64::MAX / 2,
        dev: Some("phone".into()),
    })
}

fn session_benches(c: &mut Criterion) {
    let config = config();
    let token = token();
    let now = Now {
        instant: Instant::now(),
        unix_ms: 1_800_000_000_000,
    };

    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ping_round_trip", |b| {
        let mut session = Session::new(config.clone(), "s".into(), Some(&token), now);
        b.iter(|| {
            session.on_text(now, black_box(r#"{"id":7,"op":"ping"}"#));
            black_box(session.take_outbound_batch(64 * 1024));
        });
    });
    group.throughput(Throughput::Elements(32));
    let frame: String = (0..32)
        .map(|id| format!("{{\"id\":{id},\"op\":\"ping\"}}\n"))
        .collect();
    group.bench_function("ping_batch_of_32", |b| {
        let mut session = Session::new(config.clone(), "s".into(), Some(&token), now);
        b.iter(|| {
            session.on_text(now, black_box(&frame));
            black_box(session.take_outbound_batch(64 * 1024));
        });
    });
    group.finish();

    let key = JwtKey::new(b"bench-secret");
    c.bench_function("jwt_verify_hs256", |b| {
        b.iter(|| key.verify(black_box(&token), 1_800_000_000).unwrap());
    });
    c.bench_function("session_new_with_token", |b| {
        b.iter(|| Session::new(config.clone(), "s".into(), Some(black_box(&token)), now));
    });
}

criterion_group!(benches, session_benches);
criterion_main!(benches);
