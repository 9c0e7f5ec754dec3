//! The core task: one per shard, beside the transports' tasks. Each turn it takes the
//! other shards' entries from the mesh, releases what the log made durable, runs the
//! core's timers, sends the core's entries out to the rings and its documents into the
//! sessions' mailboxes, and stops the transports reading while the rings are full. It
//! parks (no CPU) when there is nothing to do.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parley_router::clock::Now;
use parley_router::mesh::MeshEnds;
use parley_router::protocol::{encode_err, Doc, ErrorCode};
use parley_router::shard::{MeshEntry, ShardCore, SHED_EPHEMERAL_BACKLOG};
use parley_wal::Wal;

use super::deadline::DeadlineTimer;
use super::snapshots::Snapshots;
use super::Shard;
use crate::metrics::ShardMetrics;
use crate::search::ShardSearch;

/// Mesh entries taken per turn, so one busy peer cannot starve the sockets.
const MESH_ENTRIES_PER_TURN: usize = 1024;
/// How soon the core task retries a full ring or a log that had no room.
const RETRY_AFTER: Duration = Duration::from_micros(200);

/// The core task's own state between wake-ups.
struct CoreTask {
    mesh: MeshEnds<MeshEntry>,
    wal: Arc<Wal>,
    inbound: Vec<(usize, MeshEntry)>,
    /// The durability wait in flight: (LSN, its future).
    durable: Option<(u64, parley_wal::log::Durable)>,
    timer: DeadlineTimer,
    snapshots: Snapshots,
    /// The search service's end for this shard, or `None` with `search = false`.
    search: Option<ShardSearch>,
}

/// Run the shard's core task; never returns (the executor drops it when the shard stops).
pub(super) async fn run_core_task(
    shard: Rc<Shard>,
    mesh: MeshEnds<MeshEntry>,
    wal: Arc<Wal>,
    snapshot_every_records: u64,
    search: Option<ShardSearch>,
) {
    let last_snapshot = wal.snapshot_lsn().ok().flatten().unwrap_or(0);
    let mut task = CoreTask {
        mesh,
        wal,
        inbound: Vec::with_capacity(MESH_ENTRIES_PER_TURN),
        durable: None,
        timer: DeadlineTimer::default(),
        snapshots: Snapshots::new(snapshot_every_records, last_snapshot),
        search,
    };
    // Never resolves: a turn with progress wakes itself to go round again, so the
    // executor interleaves the core task with the connection tasks.
    futures::future::poll_fn(|cx| {
        let registered = shard
            .core_task_waker
            .borrow()
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !registered {
            *shard.core_task_waker.borrow_mut() = Some(cx.waker().clone());
        }
        turn(cx, &shard, &mut task)
    })
    .await
}

/// One turn; wakes itself again if it made progress or the mesh has more.
fn turn(cx: &mut Context<'_>, shard: &Shard, task: &mut CoreTask) -> Poll<()> {
    let now = Now::system();
    let mut core = shard.core.borrow_mut();
    let mut progress = take_mesh_entries(&mut core, task, now);
    progress |= release_durable(cx, shard.index, &mut core, task);
    if let Some(error) = core.failed() {
        fail_stop(shard.index, &error.to_string());
    }
    progress |= run_timers(cx, &mut core, task, now);
    send_out(shard, &mut core, &mut task.mesh);
    run_searches(cx, shard, &mut core, task.search.as_ref());
    apply_backpressure(shard, &core, task.mesh.shards());
    task.snapshots.step(shard.index, &core, &task.wal);
    publish_metrics(&shard.metrics, &core, &task.wal);
    drop(core);

    if progress || task.mesh.poll_ready(cx).is_ready() {
        // Go round again after the other tasks had a turn: there may be more.
        cx.waker().wake_by_ref();
    }
    Poll::Pending
}

/// The other shards' entries for this one, a bounded number per turn.
fn take_mesh_entries(core: &mut ShardCore, task: &mut CoreTask, now: Now) -> bool {
    let inbound = &mut task.inbound;
    let taken = task.mesh.receive(MESH_ENTRIES_PER_TURN, |from, entry| {
        inbound.push((from, entry))
    });
    debug_assert!(taken <= MESH_ENTRIES_PER_TURN && inbound.len() == taken);
    if taken == 0 {
        return false;
    }
    core.on_entries(inbound.drain(..), now);
    true
}

/// Wait for the last record appended to be durable; release what it covers. A log that
/// failed stops the process.
fn release_durable(
    cx: &mut Context<'_>,
    shard: usize,
    core: &mut ShardCore,
    task: &mut CoreTask,
) -> bool {
    let mut progress = false;
    loop {
        let target = core.last_appended();
        if target <= core.durable_lsn() {
            task.durable = None;
            return progress;
        }
        let wal = &task.wal;
        let (_, waiting) = task
            .durable
            .get_or_insert_with(|| (target, wal.durable(target)));
        match Pin::new(waiting).poll(cx) {
            Poll::Ready(Ok(())) => {
                task.durable = None;
                // The log asserts it never publishes an LSN it did not give out, and the
                // core that it is never past what it appended.
                core.on_durable(task.wal.durable_lsn());
                progress = true;
            }
            Poll::Ready(Err(error)) => fail_stop(shard, &error.to_string()),
            Poll::Pending => return progress,
        }
    }
}

/// The core's timers (typing expiry) and retries of a full ring or a log without room.
fn run_timers(cx: &mut Context<'_>, core: &mut ShardCore, task: &mut CoreTask, now: Now) -> bool {
    let retry = core.flush_pending() || core.backlog() > 0;
    let deadline = match (core.next_deadline(), retry) {
        (Some(at), true) => Some(at.min(now.instant + RETRY_AFTER)),
        (at, true) => at.or(Some(now.instant + RETRY_AFTER)),
        (at, false) => at,
    };
    let Some(deadline) = deadline else {
        task.timer.disarm();
        return false;
    };
    if task.timer.poll_fired(cx, deadline, now.instant) {
        core.on_tick(now);
        return true;
    }
    false
}

/// The core's entries out to the rings, and its documents into the mailboxes.
fn send_out(shard: &Shard, core: &mut ShardCore, mesh: &mut MeshEnds<MeshEntry>) {
    for to in 0..mesh.shards() {
        if to != shard.index && !core.outgoing(to).is_empty() {
            mesh.send_batch(to, core.outgoing(to));
        }
    }
    let connections = shard.connections.borrow();
    for (conn, document, ephemeral) in core.take_local() {
        // A session that ended meanwhile simply misses it; it will resume.
        if let Some(mailbox) = connections.get(&conn) {
            mailbox
                .documents
                .borrow_mut()
                .push_back((document, ephemeral));
            mailbox.wake();
        }
    }
}

/// Hand the core's searches to the search service, and its answers to the sessions.
fn run_searches(
    cx: &Context<'_>,
    shard: &Shard,
    core: &mut ShardCore,
    search: Option<&ShardSearch>,
) {
    let connections = shard.connections.borrow();
    let deliver = |conn: u64, doc: String| {
        if let Some(mailbox) = connections.get(&conn) {
            mailbox
                .documents
                .borrow_mut()
                .push_back((Doc::Owned(doc), false));
            mailbox.wake();
        }
    };
    let Some(search) = search else {
        for request in core.take_searches() {
            shard.metrics.error_sent(ErrorCode::Unavailable);
            let msg = "search is off on this server (search = false)";
            deliver(
                request.conn,
                encode_err(Some(request.re), ErrorCode::Unavailable, msg),
            );
        }
        return;
    };
    for request in core.take_searches() {
        search.submit(request);
    }
    search.take_replies(cx.waker(), deliver);
}

/// Stop the transports reading while the rings cannot take the core's output; wake the
/// parked once the backlog is down to half the limit.
fn apply_backpressure(shard: &Shard, core: &ShardCore, shards: usize) {
    let backlog = core.backlog();
    let limit = shards.max(1) * SHED_EPHEMERAL_BACKLOG;
    if backlog > limit {
        shard.backpressure.set(true);
    } else if shard.backpressure.get() && backlog <= limit / 2 {
        shard.backpressure.set(false);
        shard.blocked_epoch.set(shard.blocked_epoch.get() + 1);
        for waker in shard.blocked.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// Copy the core's counters where the admin thread reads them (plain stores, no contention).
fn publish_metrics(metrics: &ShardMetrics, core: &ShardCore, wal: &Wal) {
    let store =
        |gauge: &std::sync::atomic::AtomicU64, value: u64| gauge.store(value, Ordering::Relaxed);
    let stats = core.sequencer().stats;
    store(&metrics.messages_sequenced, stats.sequenced);
    store(&metrics.sends_deduplicated, stats.duplicates);
    store(
        &metrics.conversations,
        core.sequencer().conversations() as u64,
    );
    store(&metrics.ephemeral_shed, core.stats.shed_ephemeral);
    store(&metrics.mesh_backlog, core.backlog() as u64);
    store(
        &metrics.wal_flushes,
        wal.stats().flushes.load(Ordering::Relaxed),
    );
    store(
        &metrics.wal_bytes_written,
        wal.stats().bytes_written.load(Ordering::Relaxed),
    );
    store(
        &metrics.wal_appends_refused,
        wal.stats().appends_refused.load(Ordering::Relaxed),
    );
}

/// The log failed: nothing after this can be acknowledged. Stop the process, so a
/// supervisor restarts it and recovery decides what is durable (never retry and pretend).
fn fail_stop(shard: usize, error: &str) -> ! {
    crate::daemon::stderr_line(format_args!(
        "parleyd: error: shard {shard}: the log failed, stopping: {error}"
    ));
    std::process::exit(1);
}
