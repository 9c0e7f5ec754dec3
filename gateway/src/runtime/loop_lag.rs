//! The loop-lag probe: a task that asks the shard's executor to run it `period` from now,
//! and records how late it actually ran (timer slack, the reactor's turn, and every task
//! queued ahead of it) in `parley_shard_loop_lag_seconds`. A shard whose loop is blocked
//! (a long turn, a blocking call) shows up there even when no client measures it.
//!
//! It runs in the default task queue, beside the core task, so it waits behind the same
//! work acknowledgements and deliveries wait behind. Its cost is one timer wake-up per
//! period on an otherwise idle shard (100 a second at the 10 ms default) and two relaxed
//! atomic adds per sample.

use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::timer::Timer;

use crate::metrics::ShardMetrics;

/// Probe every `period`, for the life of the executor.
pub(super) async fn run_probe(metrics: Arc<ShardMetrics>, period: Duration) {
    loop {
        // Each wait is measured from when it was asked for, so one late wake-up is one
        // late sample, not a run of catching-up ones.
        let due = Instant::now() + period;
        Timer::new(period).await;
        metrics
            .loop_lag
            .record(Instant::now().saturating_duration_since(due));
    }
}
