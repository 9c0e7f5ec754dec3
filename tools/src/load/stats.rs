//! What one worker measured, merged across workers at the end, and the live counters
//! the progress line reads while the run goes on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

/// Latencies are recorded in nanoseconds, up to this (longer ones saturate).
const LATENCY_MAX_NS: u64 = 120_000_000_000;

pub fn latency_histogram(significant_figures: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, significant_figures)
        .expect("static histogram bounds are valid")
}

/// Counts within one second of sending.
pub struct SecondStats {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    /// End-to-end latency of the messages received in this second (2 significant
    /// figures: enough for a plot, small enough to keep one per second).
    pub latency: Histogram<u64>,
}

impl SecondStats {
    fn new() -> Self {
        SecondStats {
            sent: 0,
            acked: 0,
            delivered: 0,
            errors: 0,
            latency: latency_histogram(2),
        }
    }
}

/// One worker's measurements. Counters and histograms cover the measured window only;
/// the timeline covers every second from the start of sending.
pub struct Stats {
    /// Named latency distributions (`e2e`, `ack`, `ping`, `connect`, `resume`, op names).
    pub latencies: BTreeMap<&'static str, Histogram<u64>>,
    pub timeline: Vec<SecondStats>,
    pub errors: BTreeMap<String, u64>,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub replies: u64,
    /// Operations (sends, mixed ops) due inside the measuring window: what was offered,
    /// counted as the scheduler fired them.
    pub scheduled: u64,
    /// Of those, the ones that completed (answered; typing: written), whenever that was.
    pub done: u64,
    /// Of those, the ones not issued (session busy or offline, nothing to ack yet).
    pub skipped: u64,
    /// Sessions a reconnect storm actually dropped.
    pub storm_dropped: u64,
    pub failed_connects: u64,
    pub churn: ChurnStats,
}

/// What the churn did and how the server met it: events by name (`flood_closed_4008`,
/// `garbage_binary`, ...) and violations, each a server answer the protocol does not
/// give (by description, counted).
#[derive(Default)]
pub struct ChurnStats {
    pub events: BTreeMap<&'static str, u64>,
    pub violations: BTreeMap<String, u64>,
}

impl ChurnStats {
    pub fn count(&mut self, event: &'static str) {
        *self.events.entry(event).or_default() += 1;
    }

    pub fn violation(&mut self, what: String) {
        *self.violations.entry(what).or_default() += 1;
    }

    fn merge(&mut self, other: ChurnStats) {
        for (event, count) in other.events {
            *self.events.entry(event).or_default() += count;
        }
        for (what, count) in other.violations {
            *self.violations.entry(what).or_default() += count;
        }
    }
}

/// Longest timeline kept (seconds); later seconds fold into the last one.
const TIMELINE_MAX_S: usize = 24 * 3600;

impl Stats {
    pub fn new() -> Self {
        Stats {
            latencies: BTreeMap::new(),
            timeline: Vec::new(),
            errors: BTreeMap::new(),
            sent: 0,
            acked: 0,
            delivered: 0,
            replies: 0,
            scheduled: 0,
            done: 0,
            skipped: 0,
            storm_dropped: 0,
            failed_connects: 0,
            churn: ChurnStats::default(),
        }
    }

    pub fn record(&mut self, name: &'static str, nanos: u64) {
        self.latencies
            .entry(name)
            .or_insert_with(|| latency_histogram(3))
            .saturating_record(nanos.max(1));
    }

    /// The timeline entry of second `second` since sending started.
    pub fn second(&mut self, second: u64) -> &mut SecondStats {
        let index = usize::try_from(second)
            .unwrap_or(usize::MAX)
            .min(TIMELINE_MAX_S);
        while self.timeline.len() <= index {
            self.timeline.push(SecondStats::new());
        }
        &mut self.timeline[index]
    }

    pub fn error(&mut self, code: &str) {
        match self.errors.get_mut(code) {
            Some(count) => *count += 1,
            None => {
                self.errors.insert(code.to_string(), 1);
            }
        }
    }

    pub fn merge(&mut self, other: Stats) {
        for (name, histogram) in other.latencies {
            match self.latencies.get_mut(name) {
                Some(mine) => {
                    // Same bounds on both sides, so adding cannot fail.
                    let _ = mine.add(&histogram);
                }
                None => {
                    self.latencies.insert(name, histogram);
                }
            }
        }
        for (second, theirs) in other.timeline.into_iter().enumerate() {
            let mine = self.second(second as u64);
            mine.sent += theirs.sent;
            mine.acked += theirs.acked;
            mine.delivered += theirs.delivered;
            mine.errors += theirs.errors;
            let _ = mine.latency.add(&theirs.latency);
        }
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.sent += other.sent;
        self.acked += other.acked;
        self.delivered += other.delivered;
        self.replies += other.replies;
        self.scheduled += other.scheduled;
        self.done += other.done;
        self.skipped += other.skipped;
        self.storm_dropped += other.storm_dropped;
        self.failed_connects += other.failed_connects;
        self.churn.merge(other.churn);
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters a worker bumps as it goes and the main thread sums for the progress line
/// and to decide when a phase is over. One per worker, on its own cache lines.
#[derive(Default)]
#[repr(align(128))]
pub struct Live {
    /// Sessions authenticated and set up (their conversation known).
    pub ready: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// New messages received by members other than the sender.
    pub delivered: AtomicU64,
    /// Deliveries owed: each acknowledged message times the recipients it has.
    pub owed: AtomicU64,
    pub errors: AtomicU64,
    /// Commands written and not answered, plus scheduled sends not yet written.
    pub outstanding: AtomicU64,
    /// Sessions dropped by a reconnect storm and not yet resumed.
    pub resuming: AtomicU64,
    /// Sessions the idle scenario's ping round has reached (pinged, or found not open):
    /// the round is over only when it has reached every session, not when the main
    /// thread's clock says it should have.
    pub pinged: AtomicU64,
    /// Churn episodes under way (a stalled reader, a flood or half-open connection
    /// waiting for the server's answer): the drain waits for them.
    pub churning: AtomicU64,
}

impl Live {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The error a session gets counted under when the ping round reaches it while it is not
/// open and set up (reconnecting, or never set up): it is not pinged this round.
pub const PING_SKIPPED: &str = "ping round: session not open";

/// Sum of one counter over all workers.
pub fn sum(lives: &[Live], pick: fn(&Live) -> &AtomicU64) -> u64 {
    lives
        .iter()
        .map(|live| pick(live).load(Ordering::Relaxed))
        .sum()
}
