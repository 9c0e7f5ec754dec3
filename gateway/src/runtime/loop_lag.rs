//! The loop-lag probe: a task that asks the shard's executor to run it a period from now,
//! and records how late it actually ran (timer slack, the reactor's turn, and every task
//! queued ahead of it) in `parley_shard_loop_lag_seconds`. A shard whose loop is blocked
//! (a long turn, a blocking call, a starved CPU) shows up there even when no client
//! measures it.
//!
//! It runs in the default task queue, beside the core task, so it waits behind the same
//! work acknowledgements and deliveries wait behind. Waking a parked glommio executor
//! costs about 100 µs of CPU here (a 10 ms probe on an idle two-shard parleyd took 2-3%
//! of a core), so the probe runs every `loop_lag_probe_ms` only while the shard works:
//! a shard that received, sent, accepted and sequenced nothing since the last sample is
//! probed once a second.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::timer::Timer;

use crate::metrics::ShardMetrics;

/// The probe's period on a shard that did nothing since its last sample.
pub(super) const IDLE_PERIOD: Duration = Duration::from_secs(1);

/// Probe every `period` while the shard works, every `IDLE_PERIOD` while it does not, for
/// the life of the executor.
pub(super) async fn run_probe(metrics: Arc<ShardMetrics>, period: Duration) {
    let mut seen = activity(&metrics);
    let mut wait = period;
    loop {
        // Each wait is measured from when it was asked for, so one late wake-up is one
        // late sample, not a run of catching-up ones.
        let due = Instant::now() + wait;
        Timer::new(wait).await;
        metrics
            .loop_lag
            .record(Instant::now().saturating_duration_since(due));
        let now_seen = activity(&metrics);
        wait = if now_seen == seen {
            IDLE_PERIOD.max(period)
        } else {
            period
        };
        seen = now_seen;
    }
}

/// A number that moves whenever the shard does client or chat work.
fn activity(metrics: &ShardMetrics) -> u64 {
    [
        &metrics.frames_in,
        &metrics.frames_out,
        &metrics.connections_accepted,
        &metrics.messages_sequenced,
    ]
    .iter()
    .fold(0u64, |sum, counter| sum.wrapping_add(counter.load(Relaxed)))
}
