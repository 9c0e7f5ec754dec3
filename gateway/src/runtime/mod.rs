//! The shard runtime: one glommio executor per shard, pinned to its CPU. This is the only
//! module that names glommio (ARCHITECTURE.md: the runtime must stay replaceable).
//!
//! A shard first recovers its chat state from its WAL, then accepts on its own
//! SO_REUSEPORT socket and runs one task per connection. The task owns the socket and a
//! [`WsConnection`]; it moves bytes between the two, hands chat commands to the shard's
//! [`ShardCore`] and takes documents for its session from a mailbox. Reads go through
//! one scratch buffer per shard: glommio's stream reads are readiness-based, so a pending
//! read pins no buffer, and an idle connection holds no read memory of ours.
//!
//! One more task per shard, the router, moves entries between the core and the mesh of
//! rings, waits for the log's durability, and fills the sessions' mailboxes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncWrite};
use futures::task::AtomicWaker;
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use parley_router::chat_log::WalLog;
use parley_router::clock::Now;
use parley_router::limits::ChatLimits;
use parley_router::mesh::MeshEnds;
use parley_router::protocol::Doc;
use parley_router::record::CHAT_RECORD_TYPE;
use parley_router::session::SessionConfig;
use parley_router::shard::{MeshEntry, ShardCore, SHED_EPHEMERAL_BACKLOG};
use parley_wal::{Wal, WalOptions};

use crate::metrics::{dec, inc, ShardMetrics};
use crate::ws::{WsConnection, WsLimits};

mod quic_tasks;
mod uring_engine;
pub use quic_tasks::{ForwardedDatagram, QuicPlan};
pub use uring_engine::EnginePlan;

/// Bytes read from a socket in one go; one buffer per shard, shared by its connections.
const SCRATCH_BYTES: usize = 64 * 1024;
/// glommio's registered-buffer pool per shard. Small, so every shard's pool fits in the
/// 8 MiB `ulimit -l` of this kind of machine; the socket path does not use it.
const IO_MEMORY_BYTES: usize = 512 * 1024;
/// Pause after an accept error such as EMFILE, so a full descriptor table is not a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Reads discarded per wake while lingering on close.
const LINGER_READS_PER_WAKE: usize = 16;
/// Mesh entries the router takes per turn, so one busy peer cannot starve the sockets.
const MESH_ENTRIES_PER_TURN: usize = 1024;
/// How soon the router retries a full ring or a log that had no room.
const RETRY_AFTER: Duration = Duration::from_micros(200);
/// Recovery reports progress this often.
const RECOVERY_PROGRESS_EVERY: Duration = Duration::from_secs(1);

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
    pub quic: QuicPlan,
    /// The io_uring socket engine's sizes, or `None` for glommio's readiness-based
    /// streams on regular descriptors.
    pub socket_engine: Option<EnginePlan>,
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

/// Documents from the core for one session, and the waker of its task.
#[derive(Default)]
struct Mailbox {
    documents: RefCell<VecDeque<(Doc, bool)>>,
    waker: RefCell<Option<Waker>>,
    /// A mailbox of a session served by a shard-wide task (QUIC, the io_uring socket
    /// engine): that task is told which of its sessions have mail.
    notice: Option<(u64, Rc<MailNotice>)>,
}

/// Which sessions of a shard-wide task have mail from the core, and that task's waker.
#[derive(Default)]
pub struct MailNotice {
    pending: RefCell<Vec<u64>>,
    waker: RefCell<Option<Waker>>,
}

impl MailNotice {
    pub fn post(&self, id: u64) {
        self.pending.borrow_mut().push(id);
        self.wake();
    }

    pub fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

impl Mailbox {
    fn wake(&self) {
        if let Some((id, notice)) = &self.notice {
            notice.post(*id);
            return;
        }
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// Shard-local state, shared by the shard's tasks (never across threads).
struct Shard {
    index: usize,
    metrics: Arc<ShardMetrics>,
    ws_limits: Rc<WsLimits>,
    session_config: Arc<SessionConfig>,
    scratch: RefCell<Box<[u8]>>,
    core: RefCell<ShardCore>,
    /// Wakes the router task after a connection handed the core something.
    router_waker: RefCell<Option<Waker>>,
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
    next_connection: Cell<u64>,
    draining: Cell<bool>,
    /// Woken when the last connection ends during a drain.
    idle_waker: Cell<Option<Waker>>,
    /// The shard's QUIC side, for the drain.
    quic: RefCell<Option<Rc<quic_tasks::QuicShard>>>,
    /// The io_uring socket engine's notice, when the shard runs it (for the drain).
    engine_notice: RefCell<Option<Rc<MailNotice>>>,
}

/// Open the shard's log and rebuild its state, reporting progress.
fn recover(plan: &ShardPlan) -> Result<(Arc<Wal>, ShardCore), String> {
    let index = plan.index;
    let mut last_report = Instant::now();
    let mut report = |what: &str, done: u64, total: u64| {
        if last_report.elapsed() >= RECOVERY_PROGRESS_EVERY {
            last_report = Instant::now();
            tracing::info!(shard = index, done, total, "recovery: {what}");
            let _ = plan.lifecycle.send(ShardEvent::Recovering(index));
        }
    };
    let (wal, recovery) = Wal::open(&plan.wal_dir, plan.wal_options.clone(), &mut |p| {
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

async fn run_shard(plan: ShardPlan) {
    let (wal, core) = match recover(&plan) {
        Ok(recovered) => recovered,
        Err(reason) => {
            let _ = plan.lifecycle.send(ShardEvent::Failed(plan.index, reason));
            return;
        }
    };
    let mesh = plan.mesh;
    let shard = Rc::new(Shard {
        index: plan.index,
        metrics: plan.metrics.clone(),
        ws_limits: Rc::new(plan.ws_limits),
        session_config: plan.session_config,
        scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
        core: RefCell::new(core),
        router_waker: RefCell::new(None),
        backpressure: Cell::new(false),
        blocked: RefCell::new(Vec::new()),
        blocked_epoch: Cell::new(0),
        connections: RefCell::new(HashMap::new()),
        open_sockets: Cell::new(0),
        next_connection: Cell::new(0),
        draining: Cell::new(false),
        idle_waker: Cell::new(None),
        quic: RefCell::new(None),
        engine_notice: RefCell::new(None),
    });
    glommio::spawn_local(run_router(
        shard.clone(),
        mesh,
        wal,
        plan.snapshot_every_records,
    ))
    .detach();
    if let Err(reason) = quic_tasks::spawn(&shard, plan.quic) {
        let _ = plan.lifecycle.send(ShardEvent::Failed(plan.index, reason));
        return;
    }
    let listener = match plan.socket_engine {
        Some(engine_plan) => {
            match uring_engine::Engine::new(
                shard.clone(),
                plan.ws_listener,
                plan.max_connections,
                engine_plan,
            ) {
                Ok(engine) => {
                    // Its own task queue, with an equal share. Not `Latency::Matters`:
                    // in glommio 0.9.0 the engine's task then sometimes sleeps through its
                    // wake-up for good (on a busy 2-core machine, about 1 daemon start in
                    // 250: a connection accepted but never read, heartbeats that stop), and
                    // the shard serves its WebSocket clients no more.
                    let queue = glommio::executor().create_task_queue(
                        glommio::Shares::default(),
                        glommio::Latency::NotImportant,
                        "parley-sockets",
                    );
                    match glommio::spawn_local_into(engine.run(), queue) {
                        Ok(task) => {
                            task.detach();
                        }
                        Err(error) => {
                            let reason = format!("socket engine: cannot start its task: {error}");
                            let _ = plan.lifecycle.send(ShardEvent::Failed(plan.index, reason));
                            return;
                        }
                    }
                    None
                }
                Err(error) => {
                    let reason = format!("socket engine: io_uring ring setup failed: {error}");
                    let _ = plan.lifecycle.send(ShardEvent::Failed(plan.index, reason));
                    return;
                }
            }
        }
        // SAFETY: main created this listening socket for this shard alone and gave up
        // its fd.
        None => Some(unsafe {
            use std::os::fd::FromRawFd;
            TcpListener::from_raw_fd(plan.ws_listener.into_raw_fd())
        }),
    };
    // State is recovered: the shard is ready as soon as it accepts.
    plan.metrics.ready.store(true, Ordering::Release);
    let _ = plan.lifecycle.send(ShardEvent::Serving(plan.index));
    tracing::debug!(shard = plan.index, cpu = plan.cpu, "shard serving");

    let drain = Box::pin(plan.control.drain_requested());
    match &listener {
        Some(listener) => {
            let accepting = Box::pin(accept_loop(&shard, listener, plan.max_connections));
            if let Either::Left(((), _)) = select(accepting, drain).await {
                unreachable!("the accept loop never ends by itself");
            }
        }
        // The engine's task accepts, and stops when it sees the drain.
        None => drain.await,
    }
    drop(listener);
    plan.metrics.ready.store(false, Ordering::Release);
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
        shard = plan.index,
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
    let deadline = Box::pin(Timer::new(plan.drain_timeout));
    match select(all_closed, deadline).await {
        Either::Left(_) => tracing::info!(shard = plan.index, "drained"),
        Either::Right(_) => tracing::warn!(
            shard = plan.index,
            left = shard.connections.borrow().len(),
            "drain_timeout reached; dropping the remaining connections"
        ),
    };
}

async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener, max_connections: usize) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if shard.open_sockets.get() >= max_connections {
                    inc(&shard.metrics.connections_refused);
                    drop(stream);
                    continue;
                }
                inc(&shard.metrics.connections_accepted);
                inc(&shard.metrics.connections_open);
                shard.open_sockets.set(shard.open_sockets.get() + 1);
                let id = shard.next_connection.get();
                shard.next_connection.set(id + 1);
                glommio::spawn_local(serve_connection(shard.clone(), stream, id)).detach();
            }
            Err(error) => {
                if last_error_log.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(shard = shard.index, %error, "accept failed; backing off");
                    last_error_log = Some(Instant::now());
                }
                Timer::new(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// What one wake-up of a connection task found.
enum Step {
    Progress,
    Done,
}

async fn serve_connection(shard: Rc<Shard>, mut stream: TcpStream, id: u64) {
    let _nodelay_is_an_optimisation = stream.set_nodelay(true);
    let session_id = format!("{}.{id}", shard.index);
    let mut conn = WsConnection::new(
        shard.ws_limits.clone(),
        shard.session_config.clone(),
        shard.metrics.clone(),
        session_id,
        Now::system(),
    );
    let mailbox = Rc::new(Mailbox::default());
    shard.connections.borrow_mut().insert(id, mailbox.clone());
    let mut task = ConnectionTask {
        id,
        timer: None,
        drained: false,
        opened: false,
        parked_in: None,
    };
    loop {
        let step = futures::future::poll_fn(|cx| {
            if mailbox.waker.borrow().is_none() {
                *mailbox.waker.borrow_mut() = Some(cx.waker().clone());
            }
            poll_connection(cx, &shard, &mut stream, &mut conn, &mailbox, &mut task)
        })
        .await;
        if let Step::Done = step {
            break;
        }
        glommio::yield_if_needed().await;
    }
    // The executor drops tasks still lingering when the shard stops.
    end_session(&shard, id, &mut false, task.opened, Now::system());
    linger_close(&shard, &mut stream).await;
    drop(stream);
    shard.open_sockets.set(shard.open_sockets.get() - 1);
    dec(&shard.metrics.connections_open);
}

/// A connection task's own bookkeeping.
struct ConnectionTask {
    id: u64,
    timer: Option<(Instant, Timer)>,
    drained: bool,
    /// The core knows this session (it said hello or sent a chat command).
    opened: bool,
    /// The backpressure episode (`blocked_epoch`) this task's waker is parked in.
    parked_in: Option<u64>,
}

impl Shard {
    /// Wake the router: the core has output to move.
    fn kick(&self) {
        if let Some(waker) = self.router_waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// Hand what the session accepted to the core: the session itself, then its commands.
///
/// A session joins the core (live delivery, presence) with its first `hello` or chat
/// command, not at authentication: a `hello` with `resume` then starts live delivery
/// and its replay together, so no live message can overtake the replay.
fn forward_to_core(shard: &Shard, conn: &mut WsConnection, id: u64, opened: &mut bool, now: Now) {
    let requests = conn.take_requests();
    if !*opened && requests.is_empty() && !conn.said_hello() {
        return;
    }
    let Some((user, device)) = conn.identity() else {
        return;
    };
    let mut core = shard.core.borrow_mut();
    if !*opened {
        *opened = true;
        core.session_opened(id, user, now);
    }
    for request in requests {
        core.on_request(id, request.re, user, device, request.command, now);
    }
    drop(core);
    shard.kick();
}

/// The session is over (its close frame is flushed, or the peer is gone): forget its
/// mailbox and tell the core, once. A drain need not wait for the socket's lingering.
fn end_session(shard: &Shard, id: u64, ended: &mut bool, opened: bool, now: Now) {
    if std::mem::replace(ended, true) {
        return;
    }
    shard.connections.borrow_mut().remove(&id);
    if opened {
        shard.core.borrow_mut().session_closed(id, now);
        shard.kick();
    }
    if shard.draining.get() && shard.connections.borrow().is_empty() {
        if let Some(waker) = shard.idle_waker.take() {
            waker.wake();
        }
    }
}
/// Close gracefully: send FIN, then read and discard until the peer's EOF or the linger
/// deadline. Closing a socket with unread input makes Linux send RST, which can destroy
/// the replies and close frame the peer has not read yet.
async fn linger_close(shard: &Shard, stream: &mut TcpStream) {
    if stream.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let mut deadline = Timer::new(shard.ws_limits.close_linger);
    futures::future::poll_fn(|cx| {
        if Pin::new(&mut deadline).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut scratch = shard.scratch.borrow_mut();
        // A bounded number of reads per wake, so a flooding peer cannot hog the shard.
        for _ in 0..LINGER_READS_PER_WAKE {
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

fn poll_connection(
    cx: &mut Context<'_>,
    shard: &Shard,
    stream: &mut TcpStream,
    conn: &mut WsConnection,
    mailbox: &Mailbox,
    task: &mut ConnectionTask,
) -> Poll<Step> {
    let now = Now::system();
    let mut progress = false;
    if shard.draining.get() && !task.drained {
        task.drained = true;
        conn.drain(now);
        progress = true;
    }
    if !mailbox.documents.borrow().is_empty() {
        let documents = std::mem::take(&mut *mailbox.documents.borrow_mut());
        conn.push_documents(now, documents.into_iter());
        progress = true;
    }
    while !conn.output().is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, conn.output()) {
            Poll::Ready(Ok(n)) if n > 0 => {
                conn.consume_output(n, now);
                progress = true;
            }
            Poll::Ready(_) => {
                conn.on_peer_gone();
                return Poll::Ready(Step::Done);
            }
            Poll::Pending => break,
        }
    }
    if conn.is_finished() && conn.output().is_empty() {
        return Poll::Ready(Step::Done);
    }
    if conn.wants_input() && shard.backpressure.get() {
        // The rings to other shards are full: leave this socket's data in the kernel.
        let epoch = shard.blocked_epoch.get();
        if task.parked_in != Some(epoch) {
            task.parked_in = Some(epoch);
            shard.blocked.borrow_mut().push(cx.waker().clone());
        }
    } else if conn.wants_input() {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) if n > 0 => {
                conn.on_bytes(now, &scratch[..n]);
                drop(scratch);
                forward_to_core(shard, conn, task.id, &mut task.opened, now);
                return Poll::Ready(Step::Progress);
            }
            Poll::Ready(_) => {
                conn.on_peer_gone();
                return Poll::Ready(Step::Done);
            }
            Poll::Pending => {}
        }
    }
    if let Some(deadline) = conn.next_deadline() {
        let timer = &mut task.timer;
        if deadline <= now.instant {
            *timer = None;
            conn.on_tick(now);
            return Poll::Ready(Step::Progress);
        }
        // Deadlines mostly move later (each inbound frame pushes the heartbeat out), so
        // an armed timer is kept and simply re-checked when it fires; re-arm only earlier.
        if timer.as_ref().is_none_or(|(at, _)| *at > deadline) {
            *timer = Some((deadline, Timer::new(deadline - now.instant)));
        }
        if let Some((_, armed)) = timer {
            if Pin::new(armed).poll(cx).is_ready() {
                *timer = None;
                conn.on_tick(now);
                return Poll::Ready(Step::Progress);
            }
        }
    }
    if progress {
        Poll::Ready(Step::Progress)
    } else {
        Poll::Pending
    }
}

/// The router task's own state between wake-ups.
struct Router {
    mesh: MeshEnds<MeshEntry>,
    wal: Arc<Wal>,
    inbound: Vec<(usize, MeshEntry)>,
    /// The durability wait in flight: (LSN, its future).
    durable: Option<(u64, parley_wal::log::Durable)>,
    timer: Option<(Instant, Timer)>,
    snapshots: Snapshots,
}

/// Periodic snapshots of the chat state: encoded on the shard at a turn's end, saved by a
/// thread once the log is durable up to the LSN they reflect.
struct Snapshots {
    every: u64,
    /// LSN of the last snapshot taken (saved or being saved).
    last: u64,
    /// Taken, waiting for the log to be durable up to its LSN.
    pending: Option<(u64, Vec<u8>)>,
    /// A save thread is running.
    saving: Arc<AtomicBool>,
}

impl Snapshots {
    fn step(&mut self, shard: usize, core: &ShardCore, wal: &Arc<Wal>) {
        if self.every == 0 || self.saving.load(Ordering::Acquire) {
            return;
        }
        if self.pending.is_none() && core.last_appended() >= self.last + self.every {
            self.pending = core.snapshot();
        }
        let Some((lsn, _)) = &self.pending else {
            return;
        };
        if *lsn > core.durable_lsn() {
            return;
        }
        let Some((lsn, bytes)) = self.pending.take() else {
            return;
        };
        self.last = lsn;
        self.saving.store(true, Ordering::Release);
        let (saving, wal) = (self.saving.clone(), wal.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("parley-snap-{shard}"))
            .spawn(move || {
                let started = Instant::now();
                match wal.save_state(lsn, &bytes) {
                    Ok(()) => tracing::info!(
                        shard,
                        lsn,
                        bytes = bytes.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "saved a state snapshot"
                    ),
                    // Not fatal: the log still holds everything; recovery replays more.
                    Err(error) => tracing::warn!(shard, lsn, %error, "state snapshot failed"),
                }
                saving.store(false, Ordering::Release);
            });
        if let Err(error) = spawned {
            tracing::warn!(shard, %error, "cannot start the snapshot thread");
            self.saving.store(false, Ordering::Release);
        }
    }
}

/// Move entries between the core and the mesh, release what became durable, and fill
/// the sessions' mailboxes. Parks (no CPU) when there is nothing to do.
async fn run_router(
    shard: Rc<Shard>,
    mesh: MeshEnds<MeshEntry>,
    wal: Arc<Wal>,
    snapshot_every_records: u64,
) {
    let last_snapshot = wal.snapshot_lsn().ok().flatten().unwrap_or(0);
    let mut router = Router {
        mesh,
        wal,
        inbound: Vec::with_capacity(MESH_ENTRIES_PER_TURN),
        durable: None,
        timer: None,
        snapshots: Snapshots {
            every: snapshot_every_records,
            last: last_snapshot,
            pending: None,
            saving: Arc::new(AtomicBool::new(false)),
        },
    };
    // Never resolves: a turn with progress wakes itself to go round again, so the
    // executor interleaves the router with the connection tasks.
    futures::future::poll_fn(|cx| {
        let registered = shard
            .router_waker
            .borrow()
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !registered {
            *shard.router_waker.borrow_mut() = Some(cx.waker().clone());
        }
        poll_router(cx, &shard, &mut router)
    })
    .await
}

fn poll_router(cx: &mut Context<'_>, shard: &Shard, router: &mut Router) -> Poll<()> {
    let now = Now::system();
    let mut progress = false;
    let mut core = shard.core.borrow_mut();

    let inbound = &mut router.inbound;
    if router.mesh.receive(MESH_ENTRIES_PER_TURN, |from, entry| {
        inbound.push((from, entry))
    }) > 0
    {
        core.on_entries(inbound.drain(..), now);
        progress = true;
    }

    // Durability: wait for the last record written; release what it covers.
    loop {
        let target = core.last_appended();
        if target <= core.durable_lsn() {
            router.durable = None;
            break;
        }
        let (_, waiting) = router
            .durable
            .get_or_insert_with(|| (target, router.wal.durable(target)));
        match Pin::new(waiting).poll(cx) {
            Poll::Ready(Ok(())) => {
                router.durable = None;
                core.on_durable(router.wal.durable_lsn());
                progress = true;
            }
            Poll::Ready(Err(error)) => fail_stop(shard.index, &error.to_string()),
            Poll::Pending => break,
        }
    }
    if let Some(error) = core.failed() {
        fail_stop(shard.index, &error.to_string());
    }

    // Timers: typing expiry; retries of a full ring or a log without room.
    let retry = core.flush_pending() || core.backlog() > 0;
    let deadline = match (core.next_deadline(), retry) {
        (Some(at), true) => Some(at.min(now.instant + RETRY_AFTER)),
        (at, true) => at.or(Some(now.instant + RETRY_AFTER)),
        (at, false) => at,
    };
    if let Some(deadline) = deadline {
        if deadline <= now.instant {
            router.timer = None;
            core.on_tick(now);
            progress = true;
        } else {
            if router.timer.as_ref().is_none_or(|(at, _)| *at > deadline) {
                router.timer = Some((deadline, Timer::new(deadline - now.instant)));
            }
            if let Some((_, armed)) = &mut router.timer {
                if Pin::new(armed).poll(cx).is_ready() {
                    router.timer = None;
                    core.on_tick(now);
                    progress = true;
                }
            }
        }
    }

    // Out to the rings, and into the mailboxes.
    for to in 0..router.mesh.shards() {
        if to != shard.index && !core.outgoing(to).is_empty() {
            router.mesh.send_batch(to, core.outgoing(to));
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
    drop(connections);

    // Backpressure: stop reading sockets while the rings cannot take the core's output.
    let backlog = core.backlog();
    let limit = router.mesh.shards().max(1) * SHED_EPHEMERAL_BACKLOG;
    if backlog > limit {
        shard.backpressure.set(true);
    } else if shard.backpressure.get() && backlog <= limit / 2 {
        shard.backpressure.set(false);
        shard.blocked_epoch.set(shard.blocked_epoch.get() + 1);
        for waker in shard.blocked.borrow_mut().drain(..) {
            waker.wake();
        }
    }
    router.snapshots.step(shard.index, &core, &router.wal);
    publish_metrics(&shard.metrics, &core, &router.wal);
    drop(core);

    if progress || router.mesh.poll_ready(cx).is_ready() {
        // Go round again after the other tasks had a turn: there may be more.
        cx.waker().wake_by_ref();
    }
    Poll::<()>::Pending
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
}

/// The log failed: nothing after this can be acknowledged. Stop the process, so a
/// supervisor restarts it and recovery decides what is durable (never retry and pretend).
fn fail_stop(shard: usize, error: &str) -> ! {
    crate::daemon::stderr_line(format_args!(
        "parleyd: error: shard {shard}: the log failed, stopping: {error}"
    ));
    std::process::exit(1);
}
