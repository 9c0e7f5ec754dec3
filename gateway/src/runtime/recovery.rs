//! Recovery: open the shard's log and rebuild its chat state from the state snapshot
//! (if the log has one) and the records after it, reporting progress every second so a
//! long recovery is not a hung start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::chat_log::WalLog;
use parley_router::record::CHAT_RECORD_TYPE;
use parley_router::shard::ShardCore;
use parley_wal::{SpaceEvent, SpaceObserver, Wal};

use super::{ShardEvent, ShardPlan};

/// Recovery reports progress this often.
const RECOVERY_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the shard's log says of its disk: logged once when an episode starts and once
/// when it ends, and shown as `parley_wal_disk_full`.
fn disk_space_observer(shard: usize, plan: &ShardPlan) -> SpaceObserver {
    let (metrics, dir) = (plan.metrics.clone(), plan.wal_dir.clone());
    SpaceObserver(Arc::new(move |event: &SpaceEvent<'_>| match event {
        SpaceEvent::Full {
            error,
            free_bytes,
            room,
        } => {
            metrics.wal_disk_full.store(true, Ordering::Relaxed);
            tracing::warn!(
                shard,
                dir = %dir.display(),
                free_bytes = free_bytes.map_or(-1, |b| b as i64),
                room_bytes = room,
                %error,
                "disk full: the log cannot allocate its next segment; it takes commands \
                 into the room left, then answers unavailable until space is freed"
            );
        }
        SpaceEvent::Recovered {
            free_bytes,
            refused,
            lasted,
        } => {
            metrics.wal_disk_full.store(false, Ordering::Relaxed);
            tracing::info!(
                shard,
                dir = %dir.display(),
                free_bytes = free_bytes.map_or(-1, |b| b as i64),
                refused,
                lasted_ms = lasted.as_millis() as u64,
                "disk space again: the log allocated its next segment and takes commands"
            );
        }
    }))
}

/// Open the shard's log and rebuild its state, reporting progress.
pub(super) fn recover(plan: &ShardPlan) -> Result<(Arc<Wal>, ShardCore), String> {
    let index = plan.index;
    let mut last_report = Instant::now();
    let mut report = |what: &str, done: u64, total: u64| {
        if last_report.elapsed() >= RECOVERY_PROGRESS_EVERY {
            last_report = Instant::now();
            tracing::info!(shard = index, done, total, "recovery: {what}");
            let _ = plan.lifecycle.send(ShardEvent::Recovering(index));
        }
    };
    let mut options = plan.wal_options.clone();
    options.on_disk_space = Some(disk_space_observer(index, plan));
    let (wal, recovery) = Wal::open(&plan.wal_dir, options, &mut |p| {
        report("scanning the log (bytes)", p.bytes_done, p.bytes_total)
    })
    .map_err(|error| format!("log {}: {error}", plan.wal_dir.display()))?;
    let wal = Arc::new(wal);
    let mut core = ShardCore::new(
        index,
        plan.shards,
        plan.chat_limits.clone(),
        Box::new(WalLog(wal.clone())),
    );
    let last = recovery.last_lsn;
    let mut first = 1;
    let state = wal
        .load_state()
        .map_err(|error| format!("state snapshot in {}: {error}", plan.wal_dir.display()))?;
    if let Some((lsn, bytes)) = state {
        if lsn > last {
            return Err(format!(
                "state snapshot in {} is at LSN {lsn}, beyond the log's last record {last}",
                plan.wal_dir.display()
            ));
        }
        core.restore(lsn, &bytes)
            .map_err(|error| format!("state snapshot in {}: {error}", plan.wal_dir.display()))?;
        tracing::info!(
            shard = index,
            lsn,
            bytes = bytes.len(),
            "loaded the state snapshot"
        );
        first = lsn + 1;
    }
    for record in wal.iter(first, last) {
        let record = record.map_err(|error| format!("log {}: {error}", plan.wal_dir.display()))?;
        if record.record_type != CHAT_RECORD_TYPE {
            return Err(format!(
                "log {}: record {} has type {}, which this build does not know",
                plan.wal_dir.display(),
                record.lsn,
                record.record_type
            ));
        }
        core.replay(record.lsn, &record.payload)
            .map_err(|error| format!("log {}: {error}", plan.wal_dir.display()))?;
        report("replaying records", record.lsn, last);
    }
    tracing::info!(
        shard = index,
        records = last,
        replayed = last + 1 - first,
        conversations = core.sequencer().conversations(),
        torn_bytes_cut = recovery.torn_bytes_cut,
        io = recovery.io_path,
        direct_io = recovery.direct_io,
        took_ms = recovery.duration.as_millis() as u64,
        "recovered"
    );
    Ok((wal, core))
}
