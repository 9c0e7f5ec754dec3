//! The result of one `parley-load` run: what `--json` prints, what `--report` plots and
//! what the final table shows. Plain data, so it can be saved and re-rendered.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `idle`, `chat-1to1`, `group`, `reconnect-storm` or `mixed`.
    pub scenario: String,
    /// The options the run was given, as `--name value` text (the command line, parsed),
    /// and `engine`: the client socket engine the run used (`epoll` or `uring`).
    pub params: BTreeMap<String, String>,
    /// When the run started, Unix seconds.
    pub started_unix_s: u64,
    /// Host facts: cpus, kernel, hostname.
    pub host: BTreeMap<String, String>,
    pub connections: Connections,
    /// Length of the measured window, seconds (sends scheduled in it are measured).
    pub measured_s: f64,
    pub throughput: Throughput,
    /// One entry per measured latency: `e2e` (send scheduled -> recipient has it), `ack`
    /// (send scheduled -> durable `ok`), `ping`, `connect`, `resume`, one per mixed op...
    pub latencies: Vec<LatencySummary>,
    /// One entry per second of the run, from the start of sending.
    pub timeline: Vec<Second>,
    /// Errors by code: protocol error codes, close codes (`close:4009`), connect failures.
    pub errors: BTreeMap<String, u64>,
    pub verification: Verification,
    /// The target's memory and CPU when it runs locally (`--pid`).
    pub server: Option<ServerUsage>,
    /// What the generator itself cost, to show it was not the bottleneck.
    pub generator: GeneratorUsage,
    /// Scenario-specific figures, such as `resume_all_s` for a reconnect storm.
    pub extra: BTreeMap<String, f64>,
    /// Why and when the run ended. Every run that started writes its report, however it
    /// ends; a report without this field predates it.
    #[serde(default)]
    pub stop: Stop,
}

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stop {
    /// `completed` (every phase ran; the verification says whether it went well),
    /// `setup_timeout` (not every session was set up within --setup-timeout),
    /// `ping_round_timeout` or `drain_timeout` (answers still missing at the bound; the
    /// run went on), `signal` (SIGINT or SIGTERM), `worker_failed` (a worker thread
    /// ended with an error or a panic: the rest was stopped), `error` (something else
    /// the run needed failed).
    pub reason: String,
    /// What exactly: the signal's name, the worker's error...
    pub detail: String,
    /// The phase the run was in: `setup`, `ping round`, `hold`, `warm-up`, `measure`,
    /// `drain`, or `done`.
    pub phase: String,
    /// Seconds from the start of the run.
    pub at_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Connections {
    /// Sessions the run asked for.
    pub target: u64,
    /// Sessions that were authenticated and ready at the end of setup.
    pub established: u64,
    /// Connection attempts that failed (each is retried with backoff).
    pub failed_attempts: u64,
    /// Source addresses used (127.0.0.1 ..).
    pub sources: u64,
    /// Seconds from the first connect to the last session ready.
    pub setup_s: f64,
}

/// Rates over the measured window, per second: what was sent, acknowledged and
/// delivered within it. Under overload they fall below the offered rate: that gap is
/// the server's (or generator's) limit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Offered load: operations (sends, mixed ops) the scheduler fired due inside the
    /// window, per second of it.
    pub offered_per_s: f64,
    /// Messages sent (written to a socket).
    pub sent_per_s: f64,
    /// Sends answered `ok` (durable on the server).
    pub acked_per_s: f64,
    /// `msg` events received by sessions other than the sending one.
    pub delivered_per_s: f64,
    /// All commands answered (any op), for the mixed scenario.
    pub replies_per_s: f64,
}

/// One latency distribution, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub name: String,
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// (percentile, microseconds) points for a percentile-distribution plot, from 0 to
    /// 99.9999, denser towards the tail (HdrHistogram's iter_quantiles).
    pub curve: Vec<(f64, f64)>,
}

/// Counts within one second of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since sending started (may be negative for setup seconds: never, setup is
    /// not in the timeline).
    pub t: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    /// End-to-end (or, for `idle`, ping) latency of the messages received this second.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The run's correctness check: every recipient received every acknowledged message,
/// in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verification {
    /// Whether the run was verified (always, today; false in a report that predates it).
    /// For `idle` the check is that every session was set up and answered the ping round.
    pub checked: bool,
    pub ok: bool,
    /// Acknowledged messages some member never received.
    pub missing: u64,
    /// Messages received with a seq lower than one already received in the same
    /// conversation (outside a resume replay).
    pub out_of_order: u64,
    /// Messages received more than once (allowed after a resume; counted for the record).
    pub duplicates: u64,
    /// Human-readable detail of the first problems found.
    pub detail: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerUsage {
    pub pid: u32,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    /// (after - before) / established sessions.
    pub rss_bytes_per_session: f64,
    /// Server CPU seconds (user + system) over the measured window.
    pub cpu_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GeneratorUsage {
    pub workers: u64,
    /// Generator CPU seconds (user + system) over the measured window.
    pub cpu_s: f64,
    /// Generator RSS at the end, KiB.
    pub rss_kib: u64,
}

impl LatencySummary {
    /// Summarise a histogram recorded in nanoseconds.
    pub fn from_histogram(name: &str, histogram: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        let curve = if histogram.is_empty() {
            Vec::new()
        } else {
            histogram
                .iter_quantiles(2)
                .map(|point| {
                    (
                        point.quantile_iterated_to() * 100.0,
                        us(point.value_iterated_to()),
                    )
                })
                .take_while(|&(percentile, _)| percentile <= 99.9999)
                .collect()
        };
        LatencySummary {
            name: name.to_string(),
            count: histogram.len(),
            p50_us: us(histogram.value_at_quantile(0.5)),
            p90_us: us(histogram.value_at_quantile(0.9)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
            curve,
        }
    }
}

impl Report {
    /// The final table printed at the end of a run.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = &self.connections;
        let _ = writeln!(out, "scenario      {}", self.scenario);
        let s = &self.stop;
        if s.reason != "completed" {
            let _ = writeln!(
                out,
                "stopped       {} in {} at {:.1} s: {}",
                s.reason, s.phase, s.at_s, s.detail
            );
        }
        if let Some(engine) = self.params.get("engine") {
            let _ = writeln!(out, "engine        {engine}");
        }
        let _ = writeln!(
            out,
            "sessions      {} of {} set up in {:.2} s ({} failed attempts, {} source addresses)",
            c.established, c.target, c.setup_s, c.failed_attempts, c.sources
        );
        if self.measured_s > 0.0 {
            let t = &self.throughput;
            let _ = writeln!(
                out,
                "measured      {:.1} s; per second: offered {:.0}, sent {:.0}, acked {:.0}, delivered {:.0}, replies {:.0}",
                self.measured_s, t.offered_per_s, t.sent_per_s, t.acked_per_s, t.delivered_per_s, t.replies_per_s
            );
        }
        let _ = writeln!(
            out,
            "latency (µs)  {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for l in &self.latencies {
            let _ = writeln!(
                out,
                "              {:>14} {:>10} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                l.name, l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors        none");
        }
        for (code, count) in &self.errors {
            let _ = writeln!(out, "errors        {count:>10}  {code}");
        }
        let v = &self.verification;
        if v.checked {
            let _ = writeln!(
                out,
                "verification  {}: {} missing, {} out of order, {} duplicates",
                if v.ok {
                    "OK, every acknowledged message reached every recipient in order"
                } else {
                    "FAILED"
                },
                v.missing,
                v.out_of_order,
                v.duplicates
            );
            for line in &v.detail {
                let _ = writeln!(out, "              {line}");
            }
        }
        if let Some(s) = &self.server {
            let _ = writeln!(
                out,
                "server        pid {}: RSS {} KiB -> {} KiB, {:.0} B per session; CPU {:.2} s in the measured window",
                s.pid, s.rss_kib_before, s.rss_kib_after, s.rss_bytes_per_session, s.cpu_s
            );
        }
        let g = &self.generator;
        let _ = writeln!(
            out,
            "generator     {} workers; CPU {:.2} s in the measured window; RSS {} KiB",
            g.workers, g.cpu_s, g.rss_kib
        );
        for (name, value) in &self.extra {
            let _ = writeln!(out, "{name:<13} {value:.3}");
        }
        out
    }
}
