//! A shard's life on its executor: recover, start the core task and the transports,
//! say it serves, serve until asked to drain, then close every session (1001) within
//! `drain_timeout`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures::future::{select, Either};
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use parley_router::shard::ShardCore;

use super::core_task::run_core_task;
use super::loop_lag::run_probe;
use super::recovery::recover;
use super::streams_engine::{accept_loop, SCRATCH_BYTES};
use super::uring_engine::{Engine, EnginePlan};
use super::{quic_tasks, Shard, ShardControl, ShardEvent, ShardPlan};

/// glommio's registered-buffer pool per shard. Small, so every shard's pool fits in the
/// 8 MiB `ulimit -l` of this kind of machine; the socket path does not use it.
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// Start the shard's pinned executor on its own thread.
pub fn spawn_shard(plan: ShardPlan) -> io::Result<std::thread::JoinHandle<()>> {
    let name = format!("parley-shard-{}", plan.index);
    let builder = LocalExecutorBuilder::new(Placement::Fixed(plan.cpu))
        .name(&name)
        .io_memory(IO_MEMORY_BYTES);
    let (index, lifecycle) = (plan.index, plan.lifecycle.clone());
    let handle = builder
        .spawn(move || run_shard(plan))
        .map_err(|error| io::Error::other(error.to_string()))?;
    Ok(std::thread::spawn(move || {
        if let Err(error) = handle.join() {
            tracing::error!(%error, "shard executor failed");
        }
        // Nobody listens once the process is up; that is fine.
        let _ = lifecycle.send(ShardEvent::Stopped(index));
    }))
}

async fn run_shard(plan: ShardPlan) {
    let lifecycle = plan.lifecycle.clone();
    let index = plan.index;
    let (wal, core) = match recover(&plan) {
        Ok(recovered) => recovered,
        Err(reason) => {
            let _ = lifecycle.send(ShardEvent::Failed(index, reason));
            return;
        }
    };
    plan.metrics
        .connection_limit
        .store(plan.max_connections as u64, Ordering::Relaxed);
    // The search index follows the recovered log from where its last commit stopped.
    let indexer = match &plan.search {
        Some(search) => match search.start_indexer(index, wal.clone()) {
            Ok(indexer) => Some(indexer),
            Err(error) => {
                let _ = lifecycle.send(ShardEvent::Failed(index, error.to_string()));
                return;
            }
        },
        None => None,
    };
    let search = plan.search.as_ref().and_then(|s| s.shard_end(index));
    let shard = Rc::new(Shard::new(&plan, core));
    glommio::spawn_local(run_core_task(
        shard.clone(),
        plan.mesh,
        wal,
        plan.snapshot_every_records,
        search,
    ))
    .detach();
    if let Some(period) = plan.loop_lag_probe {
        glommio::spawn_local(run_probe(plan.metrics.clone(), period)).detach();
    }
    let started = quic_tasks::spawn(&shard, plan.quic).and_then(|()| {
        start_websocket(
            &shard,
            plan.ws_listener,
            plan.max_connections,
            plan.socket_engine,
        )
    });
    let listener = match started {
        Ok(listener) => listener,
        Err(reason) => {
            let _ = lifecycle.send(ShardEvent::Failed(index, reason));
            return;
        }
    };
    // State is recovered: the shard is ready as soon as it accepts.
    plan.metrics.ready.store(true, Ordering::Release);
    let _ = lifecycle.send(ShardEvent::Serving(index));
    tracing::debug!(shard = index, cpu = plan.cpu, "shard serving");

    serve_until_drain(&shard, listener.as_ref(), &plan.control).await;
    drop(listener);
    plan.metrics.ready.store(false, Ordering::Release);
    drain(&shard, plan.drain_timeout).await;
    // What the indexer indexed is committed, so a restart need not index it again.
    if let Some(indexer) = indexer {
        indexer.stop();
    }
}

impl Shard {
    fn new(plan: &ShardPlan, core: ShardCore) -> Self {
        Shard {
            index: plan.index,
            metrics: plan.metrics.clone(),
            ws_limits: Rc::new(plan.ws_limits.clone()),
            session_config: plan.session_config.clone(),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            core: RefCell::new(core),
            core_task_waker: RefCell::new(None),
            backpressure: Cell::new(false),
            blocked: RefCell::new(Vec::new()),
            blocked_epoch: Cell::new(0),
            connections: RefCell::new(HashMap::new()),
            open_sockets: Cell::new(0),
            max_connections: plan.max_connections,
            refusing: Cell::new(0),
            max_refusing: plan.max_refusing,
            next_connection: Cell::new(0),
            draining: Cell::new(false),
            idle_waker: Cell::new(None),
            quic: RefCell::new(None),
            engine_notice: RefCell::new(None),
        }
    }
}

/// Start the WebSocket side: the io_uring engine's task (which accepts itself: `None`
/// comes back), or glommio's listener for the streams engine.
fn start_websocket(
    shard: &Rc<Shard>,
    listener: OwnedFd,
    max_connections: usize,
    engine: Option<EnginePlan>,
) -> Result<Option<TcpListener>, String> {
    let Some(engine_plan) = engine else {
        // SAFETY: main created this listening socket for this shard alone and gave up
        // its fd.
        return Ok(Some(unsafe {
            use std::os::fd::FromRawFd;
            TcpListener::from_raw_fd(listener.into_raw_fd())
        }));
    };
    let engine = Engine::new(shard.clone(), listener, max_connections, engine_plan)
        .map_err(|error| format!("socket engine: {error}"))?;
    // Its own task queue, with an equal share. Not `Latency::Matters`: in glommio 0.9.0
    // the engine's task then sometimes sleeps through its wake-up for good (on a busy
    // 2-core machine, about 1 daemon start in 250: a connection accepted but never read,
    // heartbeats that stop), and the shard serves its WebSocket clients no more.
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::NotImportant,
        "parley-sockets",
    );
    glommio::spawn_local_into(engine.run(), queue)
        .map_err(|error| format!("socket engine: cannot start its task: {error}"))?
        .detach();
    Ok(None)
}

/// Accept (the streams engine) until the drain is asked for.
async fn serve_until_drain(
    shard: &Rc<Shard>,
    listener: Option<&TcpListener>,
    control: &ShardControl,
) {
    let drain = Box::pin(control.drain_requested());
    match listener {
        Some(listener) => {
            let accepting = Box::pin(accept_loop(shard, listener));
            if let Either::Left(((), _)) = select(accepting, drain).await {
                unreachable!("the accept loop never ends by itself");
            }
        }
        // The engine's task accepts, and stops when it sees the drain.
        None => drain.await,
    }
}

/// Close every session with 1001 and wait for them (and QUIC's close datagrams), at most
/// `drain_timeout`.
async fn drain(shard: &Rc<Shard>, drain_timeout: Duration) {
    shard.draining.set(true);
    if let Some(notice) = shard.engine_notice.borrow().as_ref() {
        notice.wake();
    }
    for mailbox in shard.connections.borrow().values() {
        mailbox.wake();
    }
    let quic = shard.quic.borrow().clone();
    if let Some(quic) = &quic {
        quic.wake_for_drain();
    }
    let open = shard.connections.borrow().len();
    tracing::info!(
        shard = shard.index,
        open,
        "draining: closing sessions with 1001"
    );
    let all_closed = Box::pin(futures::future::poll_fn(|cx| {
        if shard.connections.borrow().is_empty() {
            Poll::Ready(())
        } else {
            shard.idle_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }));
    // QUIC's close frames are datagrams still queued for the sender: wait for them too.
    let all_closed = Box::pin(async move {
        all_closed.await;
        if let Some(quic) = &quic {
            quic.output_sent().await;
        }
    });
    let deadline = Box::pin(Timer::new(drain_timeout));
    match select(all_closed, deadline).await {
        Either::Left(_) => tracing::info!(shard = shard.index, "drained"),
        Either::Right(_) => tracing::warn!(
            shard = shard.index,
            left = shard.connections.borrow().len(),
            "drain_timeout reached; dropping the remaining connections"
        ),
    };
}
