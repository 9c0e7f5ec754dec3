//! The shard runtime: one glommio executor per shard, pinned to its CPU. This is the only
//! module that names glommio (ARCHITECTURE.md: the runtime must stay replaceable).
//!
//! A shard's life, one file each:
//!
//! - `bring_up`: the executor's thread, then recovery, the tasks, serving, the drain;
//! - `recovery`: open the shard's log and rebuild its chat state, reporting progress;
//! - `core_task`: the task that moves entries between the [`ShardCore`] and the mesh of
//!   rings, waits for the log's durability and fills the sessions' mailboxes;
//! - `snapshots`: periodic snapshots of the chat state, saved off the shard's thread;
//! - `sessions`: what every transport does the same way: admit a socket, hand a
//!   session's requests to the core, end it, and the mailboxes the core's documents
//!   arrive in;
//! - `streams_engine`: WebSocket over glommio's readiness-based streams, a task per
//!   connection (the fallback, `socket_engine = "streams"`);
//! - `uring_engine`: WebSocket over io_uring with direct descriptors, one task per shard;
//! - `quic_tasks`: the QUIC socket's receive, drive and send tasks;
//! - `deadline`: a task's timer for a deadline that moves;
//! - `loop_lag`: the probe that measures how late the shard's loop runs what it scheduled.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;
use parley_router::limits::ChatLimits;
use parley_router::mesh::MeshEnds;
use parley_router::session::SessionConfig;
use parley_router::shard::{MeshEntry, ShardCore};
use parley_wal::WalOptions;

use crate::metrics::ShardMetrics;
use crate::search::SearchService;
use crate::ws::WsLimits;

mod bring_up;
mod core_task;
mod deadline;
mod loop_lag;
mod quic_tasks;
mod recovery;
mod sessions;
mod snapshots;
mod streams_engine;
mod throttled;
mod uring_engine;

pub use bring_up::spawn_shard;
pub use quic_tasks::{ForwardedDatagram, QuicPlan};
pub use uring_engine::EnginePlan;

use sessions::{MailNotice, Mailbox};

/// The cross-thread handle of a shard: the signal thread asks it to drain.
#[derive(Debug, Default)]
pub struct ShardControl {
    drain: AtomicBool,
    waker: AtomicWaker,
}

impl ShardControl {
    pub fn request_drain(&self) {
        self.drain.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn drain_requested(&self) -> impl Future<Output = ()> + '_ {
        futures::future::poll_fn(move |cx| {
            self.waker.register(cx.waker());
            if self.drain.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Everything a shard needs, handed over when it starts.
pub struct ShardPlan {
    pub index: usize,
    pub cpu: usize,
    pub ws_listener: OwnedFd,
    pub metrics: Arc<ShardMetrics>,
    pub control: Arc<ShardControl>,
    pub ws_limits: WsLimits,
    pub session_config: Arc<SessionConfig>,
    pub max_connections: usize,
    /// `max_refusing_connections_per_shard`.
    pub max_refusing: usize,
    pub drain_timeout: Duration,
    /// Where the shard says it serves, or that its executor stopped.
    pub lifecycle: std::sync::mpsc::Sender<ShardEvent>,
    pub shards: usize,
    /// This shard's log directory, `<data_dir>/shard-<k>`.
    pub wal_dir: PathBuf,
    pub wal_options: WalOptions,
    pub chat_limits: Arc<ChatLimits>,
    pub mesh: MeshEnds<MeshEntry>,
    /// Records between snapshots of the chat state; 0 never.
    pub snapshot_every_records: u64,
    /// Period of the loop-lag probe, or `None` for no probe.
    pub loop_lag_probe: Option<Duration>,
    pub quic: QuicPlan,
    /// The io_uring socket engine's sizes, or `None` for glommio's readiness-based
    /// streams on regular descriptors.
    pub socket_engine: Option<EnginePlan>,
    /// The node's search service, or `None` with `search = false`.
    pub search: Option<Arc<SearchService>>,
}

/// What a shard tells the process about its start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEvent {
    /// Still recovering (sent every second, so a long recovery is not a hung start).
    Recovering(usize),
    Serving(usize),
    /// The shard cannot start: why.
    Failed(usize, String),
    Stopped(usize),
}

/// Shard-local state, shared by the shard's tasks (never across threads).
struct Shard {
    index: usize,
    metrics: Arc<ShardMetrics>,
    ws_limits: Rc<WsLimits>,
    session_config: Arc<SessionConfig>,
    scratch: RefCell<Box<[u8]>>,
    core: RefCell<ShardCore>,
    /// Wakes the core task after a connection handed the core something.
    core_task_waker: RefCell<Option<Waker>>,
    /// Set while the core's entries for other shards exceed what the rings take: the
    /// connections stop reading until it clears.
    backpressure: Cell<bool>,
    /// Connection tasks parked by backpressure, each at most once per episode.
    blocked: RefCell<Vec<Waker>>,
    /// Counts the times `blocked` was woken and emptied.
    blocked_epoch: Cell<u64>,
    /// Live sessions' mailboxes, also used to wake them for the drain.
    connections: RefCell<HashMap<u64, Rc<Mailbox>>>,
    /// Open sockets, including connections lingering after their close frame: what
    /// `max_connections_per_shard` bounds.
    open_sockets: Cell<usize>,
    max_connections: usize,
    /// Refused sockets being answered 503 and closed, and how many may be at once.
    refusing: Cell<usize>,
    max_refusing: usize,
    next_connection: Cell<u64>,
    draining: Cell<bool>,
    /// Woken when the last connection ends during a drain.
    idle_waker: Cell<Option<Waker>>,
    /// The shard's QUIC side, for the drain.
    quic: RefCell<Option<Rc<quic_tasks::QuicShard>>>,
    /// The io_uring socket engine's notice, when the shard runs it (for the drain).
    engine_notice: RefCell<Option<Rc<MailNotice>>>,
}

impl Shard {
    /// Wake the core task: the core has output to move.
    fn kick(&self) {
        if let Some(waker) = self.core_task_waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// While the rings to other shards are full, a transport must not read: this parks
    /// the task (once per backpressure episode; `parked_in` is the task's note of the
    /// episode it parked in) and says true. The core task wakes the parked when it ends.
    fn held_back(&self, cx: &mut Context<'_>, parked_in: &mut Option<u64>) -> bool {
        if !self.backpressure.get() {
            return false;
        }
        let epoch = self.blocked_epoch.get();
        if *parked_in != Some(epoch) {
            *parked_in = Some(epoch);
            self.blocked.borrow_mut().push(cx.waker().clone());
        }
        true
    }
}
