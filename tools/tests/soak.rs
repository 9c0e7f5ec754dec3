//! The soak: parleyd under `parley-load mixed` with every kind of churn for
//! `SOAK_SECONDS` (60 unless set; hours by hand), its /metrics and /proc/PID sampled
//! every second. At the end:
//!
//! - delivery verified (every acknowledged message delivered, in order, resumes
//!   included) and every churn episode met as the protocol says, the server's own close
//!   and error counters agreeing with what the churn sessions saw;
//! - RSS after the run within 10% of its level after the warm-up (the first 20% of the
//!   run, by which time every bounded cache is full);
//! - the socket engine's slots, buffers and connections back to zero, no ring added after
//!   the warm-up and no descriptor gained (log files aside, which the log opens as it
//!   grows: segments, and the spare it allocates ahead of the next roll; those must each
//!   name a file on disk, at most two descriptors each);
//! - no shard stalled: each shard's loop-lag p99 under 10 ms, from its histogram.
//!
//! It prints its figures (`cargo test ... -- --nocapture` shows them). It is the only
//! test of its binary, and cargo runs test binaries one after another, so it never
//! shares the machine with the other load tests.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use parley_tools::load::report::Report;

/// Chat sessions (pairs), and the operations they do per second in all: 5 a session,
/// far under the rate limit the floods must meet.
const CONNECTIONS: &str = "200";
const RATE: &str = "1000";
/// Every kind of churn, each once per `CHURN_EVERY`. A slow reader's burst of history
/// pages and a flood's frame are each handled in one turn of a shard, which the debug
/// build of the default suite makes long: a few of each keep its loop-lag p99 clear of
/// 10 ms while every kind still acts a dozen times a minute.
const CHURN: &str = "reconnect=5,slow=2,flood=1,garbage=4,half-open=4";
const CHURN_EVERY: &str = "5s";
/// The share of the run that is warm-up, and how far above its RSS the end may be. The
/// level after the warm-up is the highest RSS of its second half (from 10% to 20% of the
/// run): the churn's bursts make RSS swing by several MiB, and a leak shows as growth past
/// the swings, not as one sample above another.
const WARM_UP_SHARE: f64 = 0.2;
const RSS_SLACK: f64 = 0.10;
/// Memory that grows with the log by design, allowed on top of the slack for every
/// message sequenced after the warm-up: each conversation keeps every message's log
/// position (`lsn_by_seq`, 8 bytes, in a Vec up to twice as large), and the log a sparse
/// index of one (LSN, offset) per 64 records. In a 60 s soak it is about 0.5 MiB.
const LOG_STATE_BYTES_PER_MESSAGE: f64 = 16.0;
/// A shard whose loop-lag p99 is above this stalled. It is a bucket bound of the
/// histogram, so the check is exact.
const LAG_P99_LIMIT: &str = "0.01";
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The engine's gauges that read zero once every connection is gone.
const LEAK_GAUGES: [&str; 6] = [
    "parley_socket_slots",
    "parley_engine_connections",
    "parley_connections",
    "parley_sessions",
    "parley_recv_buffers_held",
    "parley_send_buffers_in_flight",
];
/// The loop-lag histogram's bounds, as /metrics writes them.
const LAG_BOUNDS: [&str; 14] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "+Inf",
];
const SHARDS: usize = 2;

fn soak_seconds() -> u64 {
    match std::env::var("SOAK_SECONDS") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("SOAK_SECONDS={text:?} is not a whole number")),
        Err(_) => 60,
    }
}

/// One look at the daemon.
#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the load started.
    at_s: f64,
    rss_kib: u64,
    /// Descriptors other than log files, and those of log files (segments and spares).
    descriptors: u64,
    segment_descriptors: u64,
    /// Log files on disk: segments, and at most one spare a shard.
    segments: u64,
    /// Every per-shard series summed over shards, by name (with its labels but `shard`).
    totals: BTreeMap<String, u64>,
    /// Each shard's cumulative loop-lag buckets, in `LAG_BOUNDS` order.
    lag: Vec<Vec<u64>>,
}

impl Sample {
    fn take(daemon: &Parleyd, since: Instant) -> Sample {
        let pid = daemon.pid();
        let metrics = daemon.metrics();
        let (descriptors, segment_descriptors) = descriptors(pid);
        Sample {
            at_s: since.elapsed().as_secs_f64(),
            rss_kib: rss_kib(pid),
            descriptors,
            segment_descriptors,
            segments: segment_files(daemon.data_dir.path()),
            totals: totals(&metrics),
            lag: (0..SHARDS)
                .map(|shard| {
                    LAG_BOUNDS
                        .iter()
                        .map(|le| {
                            let series = format!(
                                "parley_shard_loop_lag_seconds_bucket{{shard=\"{shard}\",le=\"{le}\"}}"
                            );
                            value(&metrics, &series)
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// A series summed over shards; one /metrics does not have is an error.
    fn total(&self, series: &str) -> u64 {
        match self.totals.get(series) {
            Some(value) => *value,
            None => panic!("/metrics has no {series}"),
        }
    }
}

/// The value of `series` (name and labels, exactly) in a /metrics body.
fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no count {series}:\n{metrics}"))
}

/// Every integer series of /metrics summed over its `shard` label: `name` alone, and
/// `name{code="4009"}` for the ones with more labels.
fn totals(metrics: &str) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let others: Vec<&str> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|label| !label.is_empty() && !label.starts_with("shard="))
            .collect();
        let key = match others.is_empty() {
            true => name.to_string(),
            false => format!("{name}{{{}}}", others.join(",")),
        };
        *totals.entry(key).or_default() += value;
    }
    totals
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Whether `path` is one of the log's files: a segment, or the spare allocated ahead of
/// the next roll (`wal/src/spare.rs`), which appears once a segment fills.
fn is_log_file(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext == "seg" || ext == "spare")
}

/// (descriptors other than log files, descriptors of log files).
fn descriptors(pid: u32) -> (u64, u64) {
    let mut counts = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let Ok(entry) = entry else { continue };
        // A descriptor closed between the listing and the look is not counted.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if is_log_file(&target) {
            assert!(
                target.exists(),
                "a descriptor for a log file no longer on disk: {}",
                target.display()
            );
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
    }
    counts
}

fn segment_files(data_dir: &std::path::Path) -> u64 {
    let mut segments = 0;
    for shard in std::fs::read_dir(data_dir).expect("data dir").flatten() {
        if let Ok(files) = std::fs::read_dir(shard.path()) {
            segments += files
                .flatten()
                .filter(|file| is_log_file(&file.path()))
                .count() as u64;
        }
    }
    segments
}

/// Each shard's loop-lag samples between two looks: (count, at most 10 ms, the p99's
/// bucket bound).
fn lag_between(before: &Sample, after: &Sample) -> Vec<(u64, u64, &'static str)> {
    let limit = LAG_BOUNDS.iter().position(|le| *le == LAG_P99_LIMIT);
    let limit = limit.expect("the limit is a bound");
    (0..SHARDS)
        .map(|shard| {
            let delta: Vec<u64> = (0..LAG_BOUNDS.len())
                .map(|i| after.lag[shard][i] - before.lag[shard][i])
                .collect();
            let count = delta[LAG_BOUNDS.len() - 1];
            // The smallest bound that holds 99% of the samples (ceil, in whole samples).
            let p99 = delta
                .iter()
                .position(|&c| c * 100 >= count * 99)
                .map_or("+Inf", |i| LAG_BOUNDS[i]);
            (count, delta[limit], p99)
        })
        .collect()
}

fn extra(report: &Report, name: &str) -> u64 {
    match report.extra.get(name) {
        Some(value) => *value as u64,
        None => panic!("the report has no {name}: {:?}", report.extra),
    }
}

#[test]
fn soak_with_churn_leaks_nothing_and_stalls_no_shard() {
    let seconds = soak_seconds();
    let daemon = Parleyd::start_with(&[
        // The default, which the harness raises: the floods must meet it.
        "--rate-limit-per-sec",
        "100",
        // Half-open connections are timed out within one churn period.
        "--auth-timeout-ms",
        "2000",
        "--heartbeat-interval-ms",
        "2000",
        "--idle-timeout-ms",
        "5000",
        // The dedupe window fills within the warm-up; at its defaults it grows for a day
        // by design, which a leak check would count.
        "--dedupe-window-ms",
        "10000",
        "--dedupe-window-sends",
        "100",
        // Segments roll over during the run, so descriptors are checked across it (the
        // log keeps one open per segment: it has no retention here).
        "--wal-segment-bytes",
        "16777216",
    ]);
    let pid = daemon.pid().to_string();
    let duration = format!("{seconds}s");
    let args = [
        "--connections",
        CONNECTIONS,
        "--rate",
        RATE,
        "--warmup",
        "1s",
        "--duration",
        &duration,
        "--churn",
        CHURN,
        "--churn-every",
        CHURN_EVERY,
        "--setup-timeout",
        SETUP_TIMEOUT,
        "--drain-timeout",
        "30s",
        "--pid",
        &pid,
    ];
    let started = Instant::now();
    let before = Sample::take(&daemon, started);
    let limit = Duration::from_secs(seconds + 120);
    let mut samples = Vec::new();
    let run = std::thread::scope(|scope| {
        let load = scope.spawn(|| daemon.load_within(limit, "mixed", &args));
        while !load.is_finished() {
            samples.push(Sample::take(&daemon, started));
            std::thread::sleep(SAMPLE_EVERY);
        }
        load.join().expect("the parley-load thread")
    });
    let report = run.report();

    // Delivery, and every churn episode as the protocol says.
    ensure!(run, run.status.success(), "exit status {}", run.status);
    let v = &report.verification;
    ensure!(run, v.checked && v.ok, "verification: {v:?}");
    ensure!(
        run,
        extra(&report, "drained") == 1,
        "not drained: {:?}",
        report.extra
    );
    ensure!(
        run,
        extra(&report, "churn_violations") == 0,
        "{:?}",
        v.detail
    );
    let allowed = ["mixed op skipped (session busy or offline)"];
    let unexpected: Vec<_> = report
        .errors
        .iter()
        .filter(|(error, _)| !allowed.contains(&error.as_str()))
        .collect();
    ensure!(
        run,
        unexpected.is_empty(),
        "errors the run should not see: {unexpected:?}"
    );
    let garbage_survived = [
        "garbage_not_json",
        "garbage_not_an_object",
        "garbage_no_op",
        "garbage_unknown_op",
        "garbage_binary",
    ];
    let garbage_closed_4000 = [
        "garbage_not_utf8_closed_4000",
        "garbage_reserved_bits_closed_4000",
        "garbage_unmasked_closed_4000",
    ];
    let events = [
        "reconnect_dropped",
        "slow_stalls",
        "slow_closed_4009",
        "flood_closed_4008",
        "flood_rate_limited",
        "garbage_too_large",
        "garbage_over_hard_limit_closed_1009",
        "half_open_mid_upgrade_dropped",
        "half_open_silent_closed_1001",
    ];
    let churn = |event: &str| extra(&report, &format!("churn_{event}"));
    for event in events
        .iter()
        .chain(&garbage_survived)
        .chain(&garbage_closed_4000)
    {
        ensure!(
            run,
            churn(event) > 0,
            "no churn {event}: {:?}",
            report.extra
        );
    }
    ensure!(
        run,
        churn("reconnect_resumed") == churn("reconnect_dropped"),
        "every session a storm dropped resumed: {:?}",
        report.extra
    );
    let stall_outcomes = churn("slow_closed_4009")
        + report
            .extra
            .get("churn_slow_caught_up")
            .map_or(0, |c| *c as u64);
    ensure!(
        run,
        stall_outcomes >= churn("slow_stalls"),
        "every stall ended caught up or closed 4009: {:?}",
        report.extra
    );

    // The leak gauges back to zero once every connection (lingering ones too) is gone.
    let deadline = Instant::now() + START_LIMIT;
    let end = loop {
        let sample = Sample::take(&daemon, started);
        if LEAK_GAUGES.iter().all(|gauge| sample.total(gauge) == 0) {
            break sample;
        }
        let held: Vec<(&str, u64)> = LEAK_GAUGES.iter().map(|g| (*g, sample.total(g))).collect();
        ensure!(
            run,
            Instant::now() < deadline,
            "held after the run: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // The server saw what the churn sessions saw.
    for (series, expected) in [
        (
            "parley_closes_total{code=\"4008\"}",
            churn("flood_closed_4008"),
        ),
        (
            "parley_closes_total{code=\"4009\"}",
            churn("slow_closed_4009"),
        ),
        (
            "parley_closes_total{code=\"1001\"}",
            churn("half_open_silent_closed_1001"),
        ),
        (
            "parley_closes_total{code=\"1009\"}",
            churn("garbage_over_hard_limit_closed_1009"),
        ),
        (
            "parley_closes_total{code=\"4000\"}",
            garbage_closed_4000.iter().map(|e| churn(e)).sum(),
        ),
        (
            "parley_errors_total{code=\"rate_limited\"}",
            churn("flood_rate_limited"),
        ),
        (
            "parley_errors_total{code=\"too_large\"}",
            churn("garbage_too_large"),
        ),
        (
            "parley_errors_total{code=\"bad_request\"}",
            garbage_survived.iter().map(|e| churn(e)).sum(),
        ),
        (
            "parley_handshake_failures_total",
            churn("half_open_mid_upgrade_dropped"),
        ),
    ] {
        let counted = end.total(series) - before.total(series);
        ensure!(
            run,
            counted == expected,
            "{series}: the server counted {counted}, the churn saw {expected}"
        );
    }

    // Memory, rings and descriptors after the warm-up against the end.
    let warm_at = WARM_UP_SHARE * seconds as f64;
    let warm = samples
        .iter()
        .find(|sample| sample.at_s >= warm_at)
        .cloned()
        .unwrap_or_else(|| panic!("no sample after {warm_at} s of the run"));
    let warm_rss = samples
        .iter()
        .filter(|sample| sample.at_s >= warm_at / 2.0 && sample.at_s <= warm.at_s)
        .map(|sample| sample.rss_kib)
        .max()
        .unwrap_or(warm.rss_kib);
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let sequenced = end.total("parley_messages_sequenced_total")
        - warm.total("parley_messages_sequenced_total");
    let log_state_kib = sequenced as f64 * LOG_STATE_BYTES_PER_MESSAGE / 1024.0;
    let rss_limit = warm_rss as f64 * (1.0 + RSS_SLACK) + log_state_kib;
    let lag = lag_between(&before, &end);
    let acked = run.latency(&report, "ack").count;
    let delivered = run.latency(&report, "e2e").count;
    let churn_events: BTreeMap<&String, &f64> = report
        .extra
        .iter()
        .filter(|(name, _)| name.starts_with("churn_"))
        .collect();
    // RSS at each tenth of the run, to show a trend a single end figure hides.
    let tenths: Vec<(u64, u64)> = (1..=10)
        .filter_map(|tenth| {
            let at = seconds as f64 * f64::from(tenth) / 10.0;
            let sample = samples.iter().find(|s| s.at_s >= at)?;
            Some((sample.at_s as u64, sample.rss_kib))
        })
        .collect();
    println!("soak {seconds} s: RSS KiB by time (s, KiB): {tenths:?}");
    println!(
        "soak {seconds} s: RSS KiB start {} warm ({:.0}-{:.0} s) {warm_rss} peak {peak} end {} \
         (limit {rss_limit:.0}: 10% and {log_state_kib:.0} KiB for {sequenced} messages sequenced since); \
         descriptors (log files aside) warm {} end {}, log file descriptors {} for {} log files; \
         loop lag per shard (samples, <=10 ms, p99 bucket) {lag:?}; \
         sends acknowledged {acked}, deliveries verified {delivered}; churn {churn_events:?}",
        before.rss_kib,
        warm_at / 2.0,
        warm.at_s,
        end.rss_kib,
        warm.descriptors,
        end.descriptors,
        end.segment_descriptors,
        end.segments,
    );
    ensure!(
        run,
        end.rss_kib as f64 <= rss_limit,
        "RSS after the run {} KiB, over {rss_limit:.0} KiB: 10% over its {warm_rss} KiB after \
         the warm-up, and {log_state_kib:.0} KiB for the {sequenced} messages sequenced since",
        end.rss_kib
    );
    ensure!(
        run,
        end.total("parley_socket_rings") <= warm.total("parley_socket_rings"),
        "socket rings: {} after the warm-up, {} at the end",
        warm.total("parley_socket_rings"),
        end.total("parley_socket_rings")
    );
    ensure!(
        run,
        end.descriptors <= warm.descriptors,
        "descriptors (log files aside): {} after the warm-up, {} at the end",
        warm.descriptors,
        end.descriptors
    );
    ensure!(
        run,
        end.segment_descriptors <= 2 * end.segments,
        "{} descriptors for {} log files",
        end.segment_descriptors,
        end.segments
    );
    for (shard, (count, within, p99)) in lag.iter().enumerate() {
        ensure!(
            run,
            *count > 0,
            "shard {shard}: no loop-lag sample during the run"
        );
        ensure!(
            run,
            within * 100 >= count * 99,
            "shard {shard} stalled: {within} of {count} loop-lag samples within 10 ms (p99 <= {p99} s)"
        );
    }
}
