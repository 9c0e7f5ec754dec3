//! One shard's indexer: a thread that follows the shard's log and indexes each durable
//! message, off the shard's loop. The log is its queue: the shard never waits for it and
//! never buffers for it; how far it trails the log is a metric. It commits at most every
//! `search_commit_interval_ms`, recording in the commit the LSN it covers, so that a
//! message is searchable that long after it is durable, and a restart resumes there.
//!
//! Following the live tail costs CPU in proportion to the chat, and runs at the shards'
//! priority, so that search stays fresh. Catching up with a long stretch of log (a
//! rebuild, a restart after long with search off) runs first, on a thread of its own at
//! nice `search_rebuild_nice`, so that it takes the CPU chat leaves idle rather than the
//! shards' (lowering a priority needs no privilege; raising it back would).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::record::{ChatRecord, StoredMessage, CHAT_RECORD_TYPE};
use parley_wal::log::Record;
use parley_wal::Wal;
use tantivy::{doc, IndexWriter, TantivyDocument};

use super::index::{committed_lsn, position_payload, size_on_disk, Fields, Opened, ShardIndex};
use crate::metrics::ShardMetrics;

/// Records read from the log per pass, between checks of the commit clock.
const RECORDS_PER_PASS: u64 = 4096;
/// How long an idle indexer waits for the log before it looks at its clock again.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// After a failure (a full disk, say) the indexer starts again from its last commit.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// While it trails the log by more than this, it reports its progress every second, and
/// indexes on the catch-up thread.
const CATCH_UP_RECORDS: u64 = 10_000;

/// When `index_until` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The catch-up: once the index trails by at most `CATCH_UP_RECORDS` (committed).
    CaughtUp,
    /// Following the tail: once `stop` is set (committed).
    Stopped,
}

pub struct IndexerPlan {
    pub shard: usize,
    pub wal: Arc<Wal>,
    pub index: Arc<ShardIndex>,
    /// The LSN the index covers, from its last commit.
    pub position: u64,
    pub opened: Opened,
    pub heap_bytes: usize,
    pub commit_interval: Duration,
    /// The catch-up thread's nice value (and that of the threads tantivy starts for it,
    /// which inherit it): at 10, a shard's pinned thread (at 0) gets about ten times its
    /// share of a core both want.
    pub rebuild_nice: i32,
    pub metrics: Arc<ShardMetrics>,
    pub stop: Arc<AtomicBool>,
}

/// Run until `stop` is set (then commit what was indexed and return).
pub fn run(plan: IndexerPlan) {
    let shard = plan.shard;
    match &plan.opened {
        Opened::Resumed { lsn } => {
            tracing::info!(shard, lsn, "search index resumes after its last commit")
        }
        Opened::Created => tracing::info!(shard, "search index created; indexing the log"),
        Opened::Rebuilt { why } => tracing::warn!(
            shard,
            why = why.as_str(),
            "search index rebuilt from the log"
        ),
    }
    let mut position = plan.position;
    loop {
        // A panic in the search library stops indexing for a second, not for good.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            catch_up(&plan, &mut position)?;
            index_until(&plan, &mut position, Until::Stopped)
        }));
        let ran = ran.unwrap_or_else(|_| {
            Err(tantivy::TantivyError::InternalError(
                "the indexer panicked".into(),
            ))
        });
        match ran {
            Ok(()) => return,
            Err(error) => {
                tracing::error!(shard, %error, "search indexing failed; starting again from the last commit");
                std::thread::sleep(RETRY_AFTER);
                if plan.stop.load(Relaxed) {
                    return;
                }
                // What was added after the last commit is gone with the writer.
                position = committed_lsn(&plan.index.index).unwrap_or(position);
            }
        }
    }
}

/// A long stretch of log not indexed yet is indexed on a thread of lower priority, which
/// ends (with its writer and tantivy's threads) once the index trails by little.
fn catch_up(plan: &IndexerPlan, position: &mut u64) -> Result<(), tantivy::TantivyError> {
    if plan.wal.durable_lsn().saturating_sub(*position) <= CATCH_UP_RECORDS {
        return Ok(());
    }
    std::thread::scope(|scope| {
        let catching_up = std::thread::Builder::new()
            .name(format!("parley-index-{}-catch-up", plan.shard))
            .spawn_scoped(scope, || {
                lower_priority(plan.shard, plan.rebuild_nice);
                index_until(plan, position, Until::CaughtUp)
            })
            .map_err(|e| tantivy::TantivyError::InternalError(e.to_string()))?;
        catching_up.join().unwrap_or_else(|_| {
            Err(tantivy::TantivyError::InternalError(
                "the catch-up panicked".into(),
            ))
        })
    })
}

/// Nice this thread (Linux: a nice value is a thread's own; threads it starts inherit it).
fn lower_priority(shard: usize, nice: i32) {
    // SAFETY: plain system calls on the calling thread.
    let result = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, nice)
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(shard, %error, "search indexer: cannot lower its priority; it competes with the shards for CPU");
    }
}

/// Progress since the last commit.
struct Pending {
    /// LSN the next commit will cover.
    lsn: u64,
    /// WAL timestamp (Unix ms) of the oldest record read since the last commit.
    oldest_ms: Option<u64>,
    last_commit: Instant,
}

fn index_until(
    plan: &IndexerPlan,
    position: &mut u64,
    until: Until,
) -> Result<(), tantivy::TantivyError> {
    let mut writer: IndexWriter<TantivyDocument> = plan
        .index
        .index
        .writer_with_num_threads(1, plan.heap_bytes)?;
    let fields = plan.index.fields;
    let mut pending = Pending {
        lsn: *position,
        oldest_ms: None,
        last_commit: Instant::now(),
    };
    let mut last_report = Instant::now();
    let started = Instant::now();
    loop {
        let caught_up = plan.wal.durable_lsn().saturating_sub(pending.lsn) <= CATCH_UP_RECORDS;
        if plan.stop.load(Relaxed) || (until == Until::CaughtUp && caught_up) {
            commit(plan, &mut writer, &mut pending, position)?;
            if until == Until::CaughtUp {
                tracing::info!(
                    shard = plan.shard,
                    indexed_lsn = *position,
                    seconds = started.elapsed().as_secs_f64(),
                    "search index caught up with the log"
                );
            }
            return Ok(());
        }
        let durable = plan.wal.durable_lsn();
        let next = pending.lsn + 1;
        if next <= durable {
            let to = durable.min(next + RECORDS_PER_PASS - 1);
            for record in plan.wal.iter(next, to) {
                let record =
                    record.map_err(|e| tantivy::TantivyError::InternalError(e.to_string()))?;
                add(&writer, fields, &record, &plan.metrics, &mut pending)?;
            }
        } else {
            let wait = plan
                .commit_interval
                .saturating_sub(pending.last_commit.elapsed())
                .clamp(Duration::from_millis(1), IDLE_WAIT);
            let wait = if pending.lsn == *position {
                IDLE_WAIT
            } else {
                wait
            };
            // Only wait here: what became durable is read as a range next time round.
            if let Err(error) = plan.wal.wait_durable_timeout(next, wait) {
                return Err(tantivy::TantivyError::InternalError(error.to_string()));
            }
        }
        if pending.lsn > *position && pending.last_commit.elapsed() >= plan.commit_interval {
            commit(plan, &mut writer, &mut pending, position)?;
        }
        let behind = plan.wal.durable_lsn().saturating_sub(*position);
        publish(plan, *position, behind, &pending);
        if behind > CATCH_UP_RECORDS && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            tracing::info!(
                shard = plan.shard,
                indexed_lsn = *position,
                durable_lsn = plan.wal.durable_lsn(),
                "search index catching up with the log"
            );
        }
    }
}

/// Index `record` if it is a message.
fn add(
    writer: &IndexWriter<TantivyDocument>,
    fields: Fields,
    record: &Record,
    metrics: &ShardMetrics,
    pending: &mut Pending,
) -> Result<(), tantivy::TantivyError> {
    debug_assert_eq!(
        record.lsn,
        pending.lsn + 1,
        "the indexer reads every LSN in order"
    );
    pending.lsn = record.lsn;
    pending.oldest_ms.get_or_insert(record.timestamp);
    if record.record_type != CHAT_RECORD_TYPE {
        return Ok(());
    }
    match ChatRecord::decode(&record.payload) {
        Ok(ChatRecord::Message(message)) => {
            writer.add_document(document(fields, &message))?;
            metrics.search_docs_indexed.fetch_add(1, Relaxed);
        }
        Ok(_) => {}
        // The chat core replayed this record at recovery, so it decodes; if it did not,
        // the core refused to start. Count it rather than stop indexing.
        Err(_) => {
            metrics.search_records_undecodable.fetch_add(1, Relaxed);
        }
    }
    Ok(())
}

fn document(fields: Fields, message: &StoredMessage) -> TantivyDocument {
    doc!(
        fields.conv => message.conv.as_str(),
        fields.seq => message.seq,
        fields.from => message.from.as_str(),
        fields.ts => message.ts,
        fields.kind => message.kind.as_str(),
        fields.body => message.body.as_str(),
    )
}

fn commit(
    plan: &IndexerPlan,
    writer: &mut IndexWriter<TantivyDocument>,
    pending: &mut Pending,
    position: &mut u64,
) -> Result<(), tantivy::TantivyError> {
    if pending.lsn == *position {
        return Ok(());
    }
    let mut prepared = writer.prepare_commit()?;
    prepared.set_payload(&position_payload(pending.lsn));
    prepared.commit()?;
    plan.index.reader.reload()?;
    *position = pending.lsn;
    pending.oldest_ms = None;
    pending.last_commit = Instant::now();
    plan.metrics
        .search_index_bytes
        .store(size_on_disk(&plan.index.dir), Relaxed);
    Ok(())
}

fn publish(plan: &IndexerPlan, position: u64, behind: u64, pending: &Pending) {
    let metrics = &plan.metrics;
    metrics.search_indexed_lsn.store(position, Relaxed);
    metrics.search_lag_records.store(behind, Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let lag_ms = match (behind, pending.oldest_ms) {
        (0, _) => 0,
        (_, Some(oldest)) => now_ms.saturating_sub(oldest),
        // Behind, and nothing read yet since the last commit: the next record's age is
        // not known without reading it; it is read in the next pass.
        (_, None) => metrics.search_lag_ms.load(Relaxed),
    };
    metrics.search_lag_ms.store(lag_ms, Relaxed);
}
