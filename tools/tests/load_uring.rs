//! `parley-load`'s io_uring engine (`--engine uring`) against a real `parleyd`, and the
//! engine choice around it.
//!
//! The harness is tests/common: each test starts its own daemon (two shards, a
//! temporary data dir, ports picked by the kernel), runs the real binary with
//! `--json --quiet`, and checks what the report says. Every child process has a bounded
//! wait, and the daemon is killed when its test ends, pass or fail.

#[macro_use]
mod common;

use common::*;
use parley_tools::load::report::Report;

/// Sessions of the io_uring run: well past what a test needs to see every path many
/// times, below the ~20,000 descriptors the daemon itself may hold.
const URING_SESSIONS: u64 = 3000;

/// The tests here that hold thousands of sessions (or time heartbeats) run one at a time:
/// side by side on two cores, each would be the other's busy machine.
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn engine(report: &Report) -> &str {
    report.params.get("engine").map_or("", String::as_str)
}

fn extra(report: &Report, name: &str) -> Option<f64> {
    report.extra.get(name).copied()
}

/// An idle run that set up and pinged every one of `sessions` without an error.
fn assert_idle_clean(run: &Run, report: &Report, sessions: u64) {
    ensure!(run, run.status.success(), "exit status {}", run.status);
    ensure!(
        run,
        report.scenario == "idle",
        "scenario {}",
        report.scenario
    );
    let c = &report.connections;
    ensure!(
        run,
        c.target == sessions && c.established == sessions && c.failed_attempts == 0,
        "sessions: {c:?}"
    );
    ensure!(run, report.errors.is_empty(), "errors: {:?}", report.errors);
    for name in ["connect", "setup", "ping"] {
        let latency = run.latency(report, name);
        ensure!(
            run,
            latency.count == sessions && latency.p50_us > 0.0,
            "one {name} per session: {latency:?}"
        );
    }
    ensure!(
        run,
        report.verification.checked && report.verification.ok,
        "verification: {:?}",
        report.verification
    );
}

#[test]
fn idle_on_io_uring_sets_up_and_pings_every_session() {
    let _alone = heavy();
    let daemon = Parleyd::start();
    let pid = daemon.pid().to_string();
    let sessions = URING_SESSIONS.to_string();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            &sessions,
            "--sources",
            "4",
            "--pid",
            &pid,
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, URING_SESSIONS);
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        report.connections.sources == 4,
        "{:?}",
        report.connections
    );
    // Every session held a slot at the peak, and gave it back at the end.
    ensure!(
        run,
        extra(&report, "uring_slots_peak") == Some(URING_SESSIONS as f64)
            && extra(&report, "uring_slots_open_at_exit") == Some(0.0),
        "extra: {:?}",
        report.extra
    );
    ensure!(
        run,
        extra(&report, "uring_rings").is_some_and(|rings| rings >= 1.0),
        "extra: {:?}",
        report.extra
    );
    let per_session = extra(&report, "generator_rss_bytes_per_session");
    ensure!(
        run,
        per_session.is_some_and(f64::is_finite),
        "extra: {:?}",
        report.extra
    );
    ensure!(
        run,
        report
            .server
            .as_ref()
            .is_some_and(|s| s.pid == daemon.pid()),
        "server: {:?}",
        report.server
    );
}

/// Sessions one parleyd holds in the capacity test, and the descriptors it may open
/// (this machine's hard limit, set explicitly so the test means the same anywhere).
const CAPACITY_SESSIONS: u64 = 30_000;
const CAPACITY_DESCRIPTOR_LIMIT: u64 = 20_000;

/// One parleyd holds 30,000 authenticated sessions at once, more than the 20,000
/// descriptors it may open (the idle scenario pings every one while all are held): its
/// sockets are direct descriptors in its shards' fixed-file tables.
#[test]
fn one_parleyd_holds_30000_sessions_past_its_descriptor_limit() {
    // Each shard's ~15,000 sessions fit the rings it makes at start (20,000 slots each,
    // enough for max_connections_per_shard, the refusals and 512 armed accepts).
    let _alone = heavy();
    let daemon = Parleyd::start_limited(&["--listen-backlog", "512"], CAPACITY_DESCRIPTOR_LIMIT);
    let pid = daemon.pid().to_string();
    let sessions = CAPACITY_SESSIONS.to_string();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            &sessions,
            "--connect-rate",
            "10000",
            "--sources",
            "8",
            "--pid",
            &pid,
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, CAPACITY_SESSIONS);
    let log = daemon.log_text();
    ensure!(
        run,
        log.contains("socket engine: io_uring") && log.contains("descriptor_limit=20000"),
        "parleyd log:\n{log}"
    );
}

/// A shard holds more sessions than one fixed-file table: 6,000 sessions on 2 shards over
/// 1,024-slot tables, every ring the limit needs made at start (4,000 + 1,024 refusals +
/// 64 armed accepts = 5 rings per shard). Each accept names a free slot, so no table
/// overflows and no connection is lost to one; an attempt can still fail when the listen
/// queue overflows on a busy machine (the kernel drops the handshake, the client
/// retries), so a few retries are tolerated and reported.
#[test]
fn shards_hold_more_sessions_than_one_table() {
    let _alone = heavy();
    let daemon = Parleyd::start_with(&[
        "--socket-ring-files",
        "1024",
        "--listen-backlog",
        "64",
        "--max-connections-per-shard",
        "4000",
    ]);
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            "6000",
            "--connect-rate",
            "2000",
            "--sources",
            "2",
        ],
    );
    let report = run.report();
    let c = &report.connections;
    ensure!(run, c.established == 6000, "sessions: {c:?}");
    let ping = run.latency(&report, "ping");
    ensure!(run, ping.count == 6000, "every session answered: {ping:?}");
    ensure!(
        run,
        c.failed_attempts <= 60,
        "{} connects retried: {c:?}",
        c.failed_attempts
    );
    let log = daemon.log_text();
    ensure!(
        run,
        log.contains("rings made at start") && log.contains("rings_per_shard=5"),
        "parleyd log:\n{log}"
    );
}

#[test]
fn uring_sessions_answer_the_server_heartbeat_and_stay() {
    // The server pings after 200 ms of silence and drops a session silent for 2.5 s:
    // held for 4 s, every session lives only by answering the pings with pongs, and each
    // pong has 2.3 s to get through a busy machine's two schedulers.
    let _alone = heavy();
    let daemon = Parleyd::start_with(&[
        "--heartbeat-interval-ms",
        "200",
        "--idle-timeout-ms",
        "2500",
    ]);
    let run = daemon.load(
        "idle",
        &["--engine", "uring", "--connections", "100", "--hold", "4s"],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, 100);
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        extra(&report, "uring_slots_peak") == Some(100.0),
        "a session was lost and reconnected: {:?}",
        report.extra
    );
}

#[test]
fn idle_on_epoll_still_works_and_auto_takes_uring_for_idle_only() {
    let daemon = Parleyd::start();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "epoll",
            "--connections",
            "300",
            "--sources",
            "3",
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, 300);
    ensure!(
        run,
        engine(&report) == "epoll",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        !report.extra.keys().any(|name| name.starts_with("uring_")),
        "extra: {:?}",
        report.extra
    );

    // auto: io_uring for idle when this kernel and process allow it ...
    let expected = match parley_tools::load::uring::probe() {
        Ok(()) => "uring",
        Err(_) => "epoll",
    };
    let run = daemon.load("idle", &["--connections", "200"]);
    let report = run.report();
    assert_idle_clean(&run, &report, 200);
    ensure!(
        run,
        engine(&report) == expected,
        "params: {:?}",
        report.params
    );

    // ... and epoll for every other scenario.
    let run = daemon.load(
        "chat-1to1",
        &[
            "--connections",
            "10",
            "--rate",
            "100",
            "--warmup",
            "200ms",
            "--duration",
            "500ms",
        ],
    );
    let report = run.report();
    ensure!(run, run.status.success(), "exit status {}", run.status);
    ensure!(
        run,
        engine(&report) == "epoll",
        "params: {:?}",
        report.params
    );
}

#[test]
fn engine_uring_is_refused_for_other_scenarios() {
    let run = parley_load(
        "chat-1to1",
        &[
            "--engine".into(),
            "uring".into(),
            "--secret".into(),
            "s".into(),
            "--target".into(),
            closed_port().to_string(),
        ],
        None,
    );
    ensure!(
        run,
        run.status.code() == Some(1),
        "exit status {}",
        run.status
    );
    ensure!(
        run,
        run.stderr
            .contains("--engine uring: the io_uring engine runs the idle scenario"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn uring_sessions_that_cannot_connect_retry_and_give_their_slots_back() {
    let run = parley_load(
        "idle",
        &[
            "--engine",
            "uring",
            "--secret",
            "s",
            "--target",
            &closed_port().to_string(),
            "--connections",
            "20",
            "--sources",
            "2",
            "--setup-timeout",
            "1s",
        ]
        .map(String::from),
        None,
    );
    // Nothing was set up: the verification fails, exit status 2, with a full report.
    ensure!(
        run,
        run.status.code() == Some(2),
        "exit status {}",
        run.status
    );
    let report = run.report();
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    let c = &report.connections;
    ensure!(
        run,
        c.established == 0 && c.failed_attempts >= 20,
        "sessions: {c:?}"
    );
    let refused = report
        .errors
        .get("connect: ConnectionRefused")
        .copied()
        .unwrap_or(0);
    ensure!(
        run,
        refused == c.failed_attempts,
        "errors: {:?}",
        report.errors
    );
    // Each failed attempt had its slot, and closed it.
    ensure!(
        run,
        extra(&report, "uring_slots_peak").is_some_and(|peak| peak >= 1.0)
            && extra(&report, "uring_slots_open_at_exit") == Some(0.0),
        "extra: {:?}",
        report.extra
    );
}
