//! The shard runtime: one glommio executor per shard, pinned to its CPU. This is the only
//! module that names glommio (ARCHITECTURE.md: the runtime must stay replaceable).
//!
//! A shard accepts on its own SO_REUSEPORT socket and runs one task per connection. The
//! task owns the socket and a [`WsConnection`]; it moves bytes between the two. Reads go
//! through one scratch buffer per shard: glommio's stream reads are readiness-based, so a
//! pending read pins no buffer, and an idle connection holds no read memory of ours.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
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
use parley_router::session::{Now, SessionConfig};

use crate::metrics::{dec, inc, ShardMetrics};
use crate::ws::{WsConnection, WsLimits};

/// Bytes read from a socket in one go; one buffer per shard, shared by its connections.
const SCRATCH_BYTES: usize = 64 * 1024;
/// glommio's registered-buffer pool per shard. Small, so every shard's pool fits in the
/// 8 MiB `ulimit -l` of this kind of machine; the socket path does not use it.
const IO_MEMORY_BYTES: usize = 512 * 1024;
/// Pause after an accept error such as EMFILE, so a full descriptor table is not a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Reads discarded per wake while lingering on close.
const LINGER_READS_PER_WAKE: usize = 16;

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
}

/// What a shard tells the process about its start and end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    Serving(usize),
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

/// Shard-local state, shared by the shard's tasks (never across threads).
struct Shard {
    index: usize,
    metrics: Arc<ShardMetrics>,
    ws_limits: Rc<WsLimits>,
    session_config: Arc<SessionConfig>,
    scratch: RefCell<Box<[u8]>>,
    /// Live sessions, to wake them for the drain.
    connections: RefCell<HashMap<u64, Waker>>,
    /// Open sockets, including connections lingering after their close frame: what
    /// `max_connections_per_shard` bounds.
    open_sockets: Cell<usize>,
    next_connection: Cell<u64>,
    draining: Cell<bool>,
    /// Woken when the last connection ends during a drain.
    idle_waker: Cell<Option<Waker>>,
}

async fn run_shard(plan: ShardPlan) {
    // SAFETY: main created this listening socket for this shard alone and gave up its fd.
    let listener = unsafe {
        use std::os::fd::FromRawFd;
        TcpListener::from_raw_fd(plan.ws_listener.into_raw_fd())
    };
    let shard = Rc::new(Shard {
        index: plan.index,
        metrics: plan.metrics.clone(),
        ws_limits: Rc::new(plan.ws_limits),
        session_config: plan.session_config,
        scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
        connections: RefCell::new(HashMap::new()),
        open_sockets: Cell::new(0),
        next_connection: Cell::new(0),
        draining: Cell::new(false),
        idle_waker: Cell::new(None),
    });
    // No state to recover yet: the shard is ready as soon as it accepts.
    plan.metrics.ready.store(true, Ordering::Release);
    let _ = plan.lifecycle.send(ShardEvent::Serving(plan.index));
    tracing::debug!(shard = plan.index, cpu = plan.cpu, "shard serving");

    let accepting = Box::pin(accept_loop(&shard, &listener, plan.max_connections));
    let drain = Box::pin(plan.control.drain_requested());
    if let Either::Left(((), _)) = select(accepting, drain).await {
        unreachable!("the accept loop never ends by itself");
    }
    drop(listener);
    plan.metrics.ready.store(false, Ordering::Release);
    shard.draining.set(true);
    for waker in shard.connections.borrow().values() {
        waker.wake_by_ref();
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
    let deadline = Box::pin(Timer::new(plan.drain_timeout));
    match select(all_closed, deadline).await {
        Either::Left(_) => tracing::info!(shard = plan.index, "drained"),
        Either::Right(_) => tracing::warn!(
            shard = plan.index,
            left = shard.connections.borrow().len(),
            "drain_timeout reached; dropping the remaining connections"
        ),
    }
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
    let mut timer: Option<(Instant, Timer)> = None;
    let mut drained = false;
    let mut registered = false;
    loop {
        let step = futures::future::poll_fn(|cx| {
            if !registered {
                shard
                    .connections
                    .borrow_mut()
                    .insert(id, cx.waker().clone());
                registered = true;
            }
            poll_connection(cx, &shard, &mut stream, &mut conn, &mut timer, &mut drained)
        })
        .await;
        if let Step::Done = step {
            break;
        }
        glommio::yield_if_needed().await;
    }
    // The close frame is flushed: the session is over, so a drain need not wait for the
    // lingering below (the executor drops lingering tasks when the shard stops).
    shard.connections.borrow_mut().remove(&id);
    if shard.draining.get() && shard.connections.borrow().is_empty() {
        if let Some(waker) = shard.idle_waker.take() {
            waker.wake();
        }
    }
    linger_close(&shard, &mut stream).await;
    drop(stream);
    shard.open_sockets.set(shard.open_sockets.get() - 1);
    dec(&shard.metrics.connections_open);
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
    timer: &mut Option<(Instant, Timer)>,
    drained: &mut bool,
) -> Poll<Step> {
    let now = Now::system();
    let mut progress = false;
    if shard.draining.get() && !*drained {
        *drained = true;
        conn.drain(now);
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
    if conn.wants_input() {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) if n > 0 => {
                conn.on_bytes(now, &scratch[..n]);
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
