//! The io_uring socket engine of one shard: every WebSocket connection of the shard, on
//! as many [`SocketRing`]s as the fixed-file cap requires, driven by one task.
//!
//! - Accepts go straight into a ring's fixed-file table (direct descriptors), each into
//!   a slot it names, and several are always armed: the listen queue never waits for a
//!   turn of ours, and no table overflows. Every ring the shard's limit needs is made
//!   at start, so a limit the kernel cannot hold fails the start rather than a ramp.
//! - A connection past `max_connections_per_shard` (or during a drain) is answered
//!   HTTP 503 at once and closed like a session; past `max_refusing_connections_per_shard`
//!   such answers at a time, it is closed unanswered.
//! - Receive is multishot from the ring's provided buffers; the bytes are handed to the
//!   connection's [`WsConnection`] and the buffer goes straight back to the kernel.
//! - Sends copy a connection's pending output into a buffer from the shard's pool, which
//!   stays untouched until its completion. Everything queued in a turn is submitted
//!   with one system call per ring.
//! - Deadlines live in one [`TimerWheel`]: a tick costs nothing per idle connection.
//!
//! A connection costs its `Conn` (the session state) and nothing else while idle.
//! Closing is: session over, `shutdown(SHUT_WR)`, read and discard until the peer's EOF
//! or the linger deadline, cancel the receive, then close the slot; the `Conn` is freed
//! only once no operation can still complete for it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::Future;
use glommio::io::BufferedFile;
use io_uring::{opcode, squeue, types};
use parley_router::clock::Now;

use super::deadline::DeadlineTimer;
use super::sessions::{forward_ws_requests, Admission, MailNotice, Mailbox};
use super::throttled::Throttled;
use super::Shard;
use crate::metrics::inc;
use crate::uring::{Completion, RingSizes, SocketRing, BUFFER_GROUP};
use crate::wheel::TimerWheel;
use crate::ws::WsConnection;

/// Completions taken from one ring per turn, so one busy ring cannot starve the others.
const REAP_PER_TURN: usize = 4096;
/// Accepts kept armed, at most: each holds a reserved slot and takes one connection, so
/// this many can be taken per turn. As many as the listen backlog holds (one turn
/// empties a full queue), up to this bound.
const MAX_ACCEPTS_ARMED: u32 = 512;
/// Pause before arming accepts again after an error other than a peer's abort (ENOMEM,
/// EMFILE...), so a persistent one is not a busy loop; the engine's timer ends it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Received bytes are copied out of the provided buffers at once (so the buffers go back
/// to the kernel at once and one flooding connection cannot starve the ring), then
/// handed to the session at most this many per connection and turn: the per-read costs
/// of a session are paid per batch, and a flood is parsed in slices between other work.
const INPUT_BATCH_BYTES: usize = 64 * 1024;
/// Received bytes a connection may have waiting for its session; beyond, its receive is
/// cancelled until they are parsed (and while the rings to other shards are full), so
/// TCP flow control pushes back on the peer.
const INPUT_PENDING_BYTES: usize = 4 * INPUT_BATCH_BYTES;
/// Send buffers kept for reuse, and the largest one worth keeping.
const SEND_POOL_BUFFERS: usize = 256;
const SEND_POOL_KEEP_BYTES: usize = 64 * 1024;
/// Resolution of connection deadlines, and the span of one wheel rotation.
const WHEEL_TICK: Duration = Duration::from_millis(10);
const WHEEL_SLOTS: usize = 4096;

/// What an operation was, in the top byte of its user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Close = 4,
    /// The close of a socket refused unanswered at accept (no `Conn`); the token is the
    /// slot's (see [`slot_token`]).
    CloseRefused = 5,
    /// Completions nobody waits for: cancels.
    Ignored = 6,
    /// `shutdown(SHUT_WR)`. The kernel always runs it from a worker thread and looks up
    /// the fixed slot only then, so the slot must not be closed (and reused by a new
    /// connection) before it completes.
    Shutdown = 7,
}

impl Op {
    fn user_data(self, token: u64) -> u64 {
        (self as u64) << 56 | (token & ((1 << 56) - 1))
    }

    fn of(user_data: u64) -> (Option<Op>, u64) {
        let op = match user_data >> 56 {
            1 => Some(Op::Accept),
            2 => Some(Op::Recv),
            3 => Some(Op::Send),
            4 => Some(Op::Close),
            5 => Some(Op::CloseRefused),
            6 => Some(Op::Ignored),
            7 => Some(Op::Shutdown),
            _ => None,
        };
        (op, user_data & ((1 << 56) - 1))
    }
}

/// A connection's token: its slab index and that entry's generation, so completions
/// for a freed connection never reach its successor.
fn token(index: u32, generation: u32) -> u64 {
    u64::from(generation & 0xff_ffff) << 32 | u64::from(index)
}

/// The token of an accept or a refused socket's close: the ring and the slot.
fn slot_token(ring: usize, slot: u32) -> u64 {
    (ring as u64 & 0xffff) << 32 | u64::from(slot)
}

fn of_slot_token(token: u64) -> (usize, u32) {
    ((token >> 32 & 0xffff) as usize, token as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    Armed,
    /// Armed, and a cancel is on its way (pause or close): wait for the final completion.
    Cancelling,
    /// Ended (buffers ran out, or paused by backpressure): arm again when allowed.
    Rearm,
    /// Ended for good: EOF, an error, or the connection is closing.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// FIN sent: discarding input until EOF or the deadline.
    Lingering {
        until: Instant,
    },
    /// Receive and send being cancelled; then the slot is closed.
    Closing {
        close_submitted: bool,
    },
}

/// One connection. Idle, it holds no buffer of the engine's.
struct Conn {
    token: u64,
    /// The session's key in the shard's core and connection map.
    id: u64,
    ring: u16,
    slot: u32,
    ws: WsConnection,
    mailbox: Rc<Mailbox>,
    /// The send in flight: its buffer and how much of it the kernel already took.
    sending: Option<(Vec<u8>, usize)>,
    recv: Recv,
    /// The peer's EOF or a socket error was seen.
    eof: bool,
    /// The send in flight is being cancelled (the connection closes).
    send_cancelled: bool,
    /// A `shutdown` is in flight.
    shutting_down: bool,
    /// Received and not yet handed to the session (allocated only then).
    input: Vec<u8>,
    /// Listed in the engine's `inputs`.
    queued: bool,
    phase: Phase,
    /// The wheel holds an entry for this instant.
    timer_at: Option<Instant>,
    /// The core knows this session.
    opened: bool,
    drained: bool,
    /// The session's end was reported to the core and the connection map.
    ended: bool,
    /// Refused at accept: answered 503, never a session; counted in the engine's
    /// `refusing`, not in the shard's open sockets.
    refused: bool,
}

/// What a connection's timer needs after a turn.
enum Timer {
    /// A deadline has passed: service the connection again now.
    Due,
    /// Put an entry for this instant in the wheel.
    Arm(Instant),
    /// The wheel already holds an entry early enough, or nothing is due.
    Armed,
}

impl Conn {
    /// The drain and the core's documents reach the session.
    fn take_mail(&mut self, draining: bool, now: Now) {
        if draining && !self.drained {
            self.drained = true;
            self.ws.drain(now);
        }
        if !self.mailbox.documents.borrow().is_empty() {
            let documents = std::mem::take(&mut *self.mailbox.documents.borrow_mut());
            self.ws.push_documents(now, documents.into_iter());
        }
    }

    /// Move the session's pending output into `buffer` (pooled) and send it.
    fn start_send(&mut self, mut buffer: Vec<u8>, now: Now) -> squeue::Entry {
        debug_assert!(self.sending.is_none(), "one send in flight per connection");
        buffer.extend_from_slice(self.ws.output());
        self.ws.consume_output(buffer.len(), now);
        send_entry(self, buffer, 0)
    }

    /// The session is over and its output sent: close at once after the peer's EOF,
    /// else send FIN and linger until `linger_until`, reading until the peer's EOF
    /// (closing with unread input sends RST, which can destroy the close frame not yet
    /// read). Returns the shutdown to submit.
    fn begin_close(&mut self, linger_until: Instant) -> Option<squeue::Entry> {
        if self.eof {
            self.phase = Phase::Closing {
                close_submitted: false,
            };
            return None;
        }
        self.phase = Phase::Lingering {
            until: linger_until,
        };
        self.shutting_down = true;
        Some(
            opcode::Shutdown::new(types::Fixed(self.slot), libc::SHUT_WR)
                .build()
                .user_data(Op::Shutdown.user_data(self.token)),
        )
    }

    /// Lingering ends with the peer's EOF, the receive's end, or the deadline.
    fn end_lingering_when_over(&mut self, now: Instant) {
        if let Phase::Lingering { until } = self.phase {
            if self.eof || self.recv == Recv::Off || now >= until {
                self.phase = Phase::Closing {
                    close_submitted: false,
                };
            }
        }
    }

    fn arm_receive(&mut self) -> squeue::Entry {
        self.recv = Recv::Armed;
        opcode::RecvMulti::new(types::Fixed(self.slot), BUFFER_GROUP)
            .build()
            .user_data(Op::Recv.user_data(self.token))
    }

    /// The session's next deadline (or the linger's): tick it if due, else say whether
    /// the wheel needs an earlier entry.
    fn next_timer(&mut self, now: Now) -> Timer {
        let deadline = match self.phase {
            Phase::Lingering { until } => Some(until),
            _ => self.ws.next_deadline(),
        };
        let Some(deadline) = deadline else {
            return Timer::Armed;
        };
        if deadline <= now.instant {
            if self.phase == Phase::Open {
                self.ws.on_tick(now);
            }
            return Timer::Due;
        }
        if self.timer_at.is_none_or(|at| at > deadline) {
            self.timer_at = Some(deadline);
            return Timer::Arm(deadline);
        }
        Timer::Armed
    }

    /// Nothing may complete for this connection after its slot is closed: cancel what is
    /// in flight (its final completion brings the connection back here), then close.
    fn closing_entries(&mut self) -> [Option<squeue::Entry>; 3] {
        let mut entries = [None, None, None];
        if self.recv == Recv::Armed {
            self.recv = Recv::Cancelling;
            entries[0] = Some(cancel(Op::Recv.user_data(self.token)));
        }
        if self.sending.is_some() && !self.send_cancelled {
            self.send_cancelled = true;
            entries[1] = Some(cancel(Op::Send.user_data(self.token)));
        }
        let in_flight =
            self.recv == Recv::Cancelling || self.sending.is_some() || self.shutting_down;
        if !in_flight {
            self.phase = Phase::Closing {
                close_submitted: true,
            };
            entries[2] = Some(
                opcode::Close::new(types::Fixed(self.slot))
                    .build()
                    .user_data(Op::Close.user_data(self.token)),
            );
        }
        entries
    }
}

/// The sizes the engine runs with.
#[derive(Debug, Clone, Copy)]
pub struct EnginePlan {
    pub ring: RingSizes,
    /// The listen backlog of the shard's socket: what one turn's accepts should empty.
    pub listen_backlog: u32,
    /// `max_refusing_connections_per_shard`.
    pub max_refusing: usize,
}

impl EnginePlan {
    /// Rings a shard makes: slots for every admitted connection, every refusal being
    /// answered and every armed accept, so the limit in effect is the setting.
    pub fn rings_needed(&self, max_connections: usize) -> usize {
        let accepts = self.listen_backlog.clamp(1, MAX_ACCEPTS_ARMED) as usize;
        let slots = max_connections
            .saturating_add(self.max_refusing)
            .saturating_add(accepts);
        slots.div_ceil(self.ring.files.max(1) as usize).max(1)
    }
}

pub(super) struct Engine {
    shard: Rc<Shard>,
    listener: Option<OwnedFd>,
    rings: Vec<SocketRing>,
    /// The accepts armed, by ring and slot, and how many to keep armed.
    accepts: Vec<(usize, u32)>,
    accepts_wanted: usize,
    /// No accepts are armed before this (after an accept error).
    accept_retry_at: Option<Instant>,
    eventfd: OwnedFd,
    conns: Vec<Option<Box<Conn>>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    live: usize,
    wheel: TimerWheel,
    notice: Rc<MailNotice>,
    /// Connections to look at before the turn ends.
    dirty: Vec<u64>,
    /// Connections with input for their session, or waiting to receive again, once
    /// backpressure allows.
    inputs: Vec<u64>,
    send_pool: Vec<Vec<u8>>,
    sends_in_flight: u64,
    drain_seen: bool,
    accept_errors: Throttled,
}

impl Engine {
    /// Make every ring the limits need now, so a kernel that cannot hold them is found
    /// before serving, and says so.
    pub(super) fn new(
        shard: Rc<Shard>,
        listener: OwnedFd,
        max_connections: usize,
        plan: EnginePlan,
    ) -> Result<Self, String> {
        // SAFETY: plain eventfd creation; the result is checked. Blocking (no
        // EFD_NONBLOCK), so io_uring waits for it rather than failing with EAGAIN.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: just created, owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sizes = plan.ring;
        let accepts_wanted = plan.listen_backlog.clamp(1, MAX_ACCEPTS_ARMED) as usize;
        let needed = plan.rings_needed(max_connections);
        let mut rings = Vec::with_capacity(needed);
        for ring in 0..needed {
            let made = SocketRing::new(sizes, eventfd.as_raw_fd()).map_err(|error| {
                format!(
                    "io_uring ring {} of the {needed} that max_connections_per_shard {max_connections} \
                     needs ({} fixed-file slots each, with {} for refusals and {accepts_wanted} \
                     for armed accepts): {error}",
                    ring + 1,
                    sizes.files,
                    plan.max_refusing,
                )
            })?;
            rings.push(made);
        }
        set_nodelay(&listener);
        let notice = Rc::new(MailNotice::default());
        *shard.engine_notice.borrow_mut() = Some(notice.clone());
        Ok(Self {
            shard,
            listener: Some(listener),
            rings,
            accepts: Vec::with_capacity(accepts_wanted),
            accepts_wanted,
            accept_retry_at: None,
            eventfd,
            conns: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            live: 0,
            wheel: TimerWheel::new(Instant::now(), WHEEL_TICK, WHEEL_SLOTS),
            notice,
            dirty: Vec::new(),
            inputs: Vec::new(),
            send_pool: Vec::new(),
            sends_in_flight: 0,
            drain_seen: false,
            accept_errors: Throttled::default(),
        })
    }

    /// Serve until the shard stops (the executor drops this task).
    pub(super) async fn run(mut self) {
        let eventfd = match self.eventfd.try_clone() {
            // SAFETY: a descriptor of our own, handed to glommio to wait on.
            Ok(fd) => Rc::new(unsafe { BufferedFile::from_raw_fd(fd.into_raw_fd()) }),
            Err(error) => {
                tracing::error!(shard = self.shard.index, %error, "socket engine cannot wait");
                return;
            }
        };
        type Wakeup = Pin<Box<dyn Future<Output = ()>>>;
        let mut completions_ready: Option<Wakeup> = None;
        let mut timer = DeadlineTimer::default();
        let mut parked_in: Option<u64> = None;
        loop {
            if self.turn(Now::system()) {
                glommio::yield_if_needed().await;
                continue;
            }
            futures::future::poll_fn(|cx| {
                *self.notice.waker.borrow_mut() = Some(cx.waker().clone());
                if !self.notice.pending.borrow().is_empty()
                    || (self.shard.draining.get() && !self.drain_seen)
                {
                    return Poll::Ready(());
                }
                let ready = completions_ready.get_or_insert_with(|| {
                    let eventfd = eventfd.clone();
                    Box::pin(async move {
                        // Any completion posted since the last read makes this ready.
                        let _counted = eventfd.read_at(0, 8).await;
                    })
                });
                if ready.as_mut().poll(cx).is_ready() {
                    completions_ready = None;
                    return Poll::Ready(());
                }
                let wake_at = match (self.wheel.next_expiry(), self.accept_retry_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(at) = wake_at {
                    if timer.poll_fired(cx, at, Instant::now()) {
                        return Poll::Ready(());
                    }
                }
                // Input held back by backpressure is fed once it ends.
                if !self.inputs.is_empty() && !self.shard.held_back(cx, &mut parked_in) {
                    return Poll::Ready(());
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// One round: completions, mail, timers, then every touched connection; submit.
    /// True if anything happened (the caller goes round again without sleeping).
    fn turn(&mut self, now: Now) -> bool {
        let mut progress = false;
        let mut completions = Vec::new();
        for ring in 0..self.rings.len() {
            if self.rings[ring].reap(REAP_PER_TURN, &mut completions) > 0 {
                progress = true;
            }
            for completion in completions.drain(..) {
                self.on_completion(ring, completion);
            }
        }
        let posted = std::mem::take(&mut *self.notice.pending.borrow_mut());
        progress |= !posted.is_empty();
        self.dirty.extend(posted);

        let mut fired = Vec::new();
        self.wheel.expire(now.instant, &mut fired);
        for token in fired {
            if let Some(conn) = self.conn_mut(token) {
                conn.timer_at = None;
                self.dirty.push(token);
                progress = true;
            }
        }
        if self.shard.draining.get() && !self.drain_seen {
            self.drain_seen = true;
            self.stop_accepting();
            self.dirty
                .extend(self.conns.iter().flatten().map(|c| c.token));
            progress = true;
        }
        if !self.inputs.is_empty() && !self.shard.backpressure.get() {
            for token in std::mem::take(&mut self.inputs) {
                self.feed(token);
            }
            // Connections with more than one batch waiting stay listed.
            progress = true;
        }
        for token in std::mem::take(&mut self.dirty) {
            self.service(token, now);
        }
        if !self.drain_seen {
            self.keep_accepting(now.instant);
        }
        for ring in &mut self.rings {
            if let Err(error) = ring.submit() {
                tracing::error!(shard = self.shard.index, %error, "io_uring submit failed");
            }
        }
        self.publish_metrics();
        progress
    }

    fn conn_mut(&mut self, token: u64) -> Option<&mut Conn> {
        find(&mut self.conns, token)
    }

    fn push(&mut self, ring: usize, entry: squeue::Entry) {
        if let Err(error) = self.rings[ring].push(entry) {
            // Only a failing submit gets here; the connection's timers still end it.
            tracing::error!(shard = self.shard.index, %error, "io_uring push failed");
        }
    }

    fn on_completion(&mut self, ring: usize, completion: Completion) {
        let (op, token) = Op::of(completion.user_data);
        match op {
            Some(Op::Accept) => self.on_accept(token, completion),
            Some(Op::Recv) => self.on_recv(ring, token, completion),
            Some(Op::Send) => self.on_send(token, completion),
            Some(Op::Close) => self.on_closed(token),
            Some(Op::CloseRefused) => {
                let (ring, slot) = of_slot_token(token);
                self.rings[ring].release_slot(slot);
            }
            Some(Op::Shutdown) => {
                if let Some(conn) = self.conn_mut(token) {
                    conn.shutting_down = false;
                    self.dirty.push(token);
                }
            }
            Some(Op::Ignored) | None => {}
        }
    }

    fn on_accept(&mut self, accept: u64, completion: Completion) {
        let (ring, slot) = of_slot_token(accept);
        if let Some(at) = self.accepts.iter().position(|&a| a == (ring, slot)) {
            self.accepts.swap_remove(at);
        }
        if completion.result < 0 {
            self.rings[ring].release_slot(slot);
            let error = -completion.result;
            // A peer that reset before its accept, or a cancel (drain): nothing to fix.
            if error != libc::ECANCELED && error != libc::ECONNABORTED && error != libc::EINTR {
                inc(&self.shard.metrics.accept_errors);
                self.accept_retry_at = Some(Instant::now() + ACCEPT_ERROR_BACKOFF);
                if self.accept_errors.may_log() {
                    let error = io::Error::from_raw_os_error(error);
                    tracing::warn!(shard = self.shard.index, ring, %error, "accept failed; arming again shortly");
                }
            }
            return;
        }
        let shard = self.shard.clone();
        let (id, refused) = match shard.admit(self.drain_seen) {
            Admission::Session(id) => (id, false),
            // A refused connection's id is never a session's: it is in no map and the
            // core never hears of it.
            Admission::Answer => (u64::MAX, true),
            Admission::Close => {
                // The peer sees a reset (its request unread) or an EOF.
                let close = opcode::Close::new(types::Fixed(slot))
                    .build()
                    .user_data(Op::CloseRefused.user_data(slot_token(ring, slot)));
                self.push(ring, close);
                return;
            }
        };

        let index = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.generations.push(0);
            (self.conns.len() - 1) as u32
        });
        let generation = &mut self.generations[index as usize];
        *generation = generation.wrapping_add(1);
        let token = token(index, *generation);
        let mailbox = match refused {
            true => Rc::new(Mailbox::default()),
            false => shard.new_mailbox(id, Some((token, self.notice.clone()))),
        };
        let mut ws = WsConnection::new(
            shard.ws_limits.clone(),
            shard.session_config.clone(),
            shard.metrics.clone(),
            format!("{}.{id}", shard.index),
            Now::system(),
        );
        if refused {
            ws.refuse_unavailable(self.drain_seen);
        }
        self.conns[index as usize] = Some(Box::new(Conn {
            token,
            id,
            ring: ring as u16,
            slot,
            ws,
            mailbox,
            sending: None,
            recv: Recv::Rearm,
            eof: false,
            send_cancelled: false,
            shutting_down: false,
            input: Vec::new(),
            queued: false,
            phase: Phase::Open,
            timer_at: None,
            opened: false,
            drained: false,
            ended: refused,
            refused,
        }));
        self.live += 1;
        self.dirty.push(token);
    }

    fn on_recv(&mut self, ring: usize, token: u64, completion: Completion) {
        let shard = self.shard.clone();
        let rings = &mut self.rings;
        let conn = find(&mut self.conns, token);
        let buffer = completion.buffer();
        let mut consumed = false;
        if let Some(conn) = conn {
            if completion.result > 0 {
                consumed = true;
                let bytes =
                    rings[ring].received(buffer.unwrap_or(u16::MAX), completion.result as usize);
                // Lingering or closing: input is discarded.
                if conn.phase == Phase::Open {
                    if !conn.queued {
                        conn.queued = true;
                        self.inputs.push(token);
                    }
                    conn.input.extend_from_slice(bytes);
                    if conn.input.len() > INPUT_PENDING_BYTES && conn.recv == Recv::Armed {
                        // Stop the kernel handing us more until the session catches up.
                        conn.recv = Recv::Cancelling;
                        if let Err(error) = rings[ring].push(cancel(Op::Recv.user_data(token))) {
                            tracing::error!(shard = shard.index, %error, "io_uring push failed");
                        }
                    }
                }
            } else if completion.result == 0
                || completion.result != -libc::ENOBUFS && completion.result != -libc::ECANCELED
            {
                // EOF, or the socket failed (reset, timed out): what came before it is
                // the session's last input.
                conn.eof = true;
                if conn.phase == Phase::Open {
                    feed_session(&shard, conn, usize::MAX);
                    conn.ws.on_peer_gone();
                }
            }
            if !completion.more() {
                // A lingering connection keeps reading (and discarding) until EOF: a
                // close with unread input would reset the connection.
                conn.recv = if conn.eof { Recv::Off } else { Recv::Rearm };
            }
            self.dirty.push(token);
        }
        if let Some(id) = buffer {
            inc(&self.shard.metrics.recv_buffers_filled);
            if !consumed {
                // A completion for a connection already gone still filled a buffer.
                self.rings[ring].received(id, 0);
            }
            self.rings[ring].recycle(id);
        }
    }

    fn on_send(&mut self, token: u64, completion: Completion) {
        self.sends_in_flight -= 1;
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let Some((buffer, mut sent)) = conn.sending.take() else {
            return;
        };
        if completion.result <= 0 {
            conn.eof = true;
            if conn.phase == Phase::Open {
                conn.ws.on_peer_gone();
            }
        } else {
            sent += completion.result as usize;
        }
        let rest = completion.result > 0 && sent < buffer.len();
        let ring = usize::from(conn.ring);
        if rest {
            let entry = send_entry(conn, buffer, sent);
            self.sends_in_flight += 1;
            self.push(ring, entry);
        } else {
            self.recycle_send_buffer(buffer);
        }
        self.dirty.push(token);
    }

    fn on_closed(&mut self, token: u64) {
        let index = (token & 0xffff_ffff) as usize;
        let Some(conn) = self
            .conns
            .get_mut(index)
            .and_then(|c| c.take_if(|c| c.token == token))
        else {
            return;
        };
        let mut ended = conn.ended;
        self.shard
            .end_session(conn.id, &mut ended, conn.opened, Now::system());
        self.rings[usize::from(conn.ring)].release_slot(conn.slot);
        self.free.push(index as u32);
        self.live -= 1;
        if conn.refused {
            self.shard.refusal_closed();
        } else {
            self.shard.socket_closed();
        }
    }

    /// Bring a connection up to date: drain, mail, output, close, receive, timer.
    fn service(&mut self, token: u64, now: Now) {
        let shard = self.shard.clone();
        let draining = self.drain_seen;
        let backpressure = shard.backpressure.get();
        let Some(conn) = find(&mut self.conns, token) else {
            return;
        };
        let ring = usize::from(conn.ring);
        // At most three operations per connection and turn: send, shutdown, receive
        // (or two cancels, or the close).
        let mut entries: [Option<squeue::Entry>; 3] = [None, None, None];
        if conn.phase == Phase::Open {
            conn.take_mail(draining, now);
            if conn.sending.is_none() && !conn.ws.output().is_empty() {
                let buffer = self.send_pool.pop().unwrap_or_default();
                entries[0] = Some(conn.start_send(buffer, now));
                self.sends_in_flight += 1;
            }
            if conn.ws.is_finished() && conn.ws.output().is_empty() && conn.sending.is_none() {
                shard.end_session(conn.id, &mut conn.ended, conn.opened, now);
                entries[1] = conn.begin_close(now.instant + shard.ws_limits.close_linger);
            }
        }
        conn.end_lingering_when_over(now.instant);
        match conn.phase {
            Phase::Open | Phase::Lingering { .. } => {
                let held_back = conn.phase == Phase::Open
                    && (backpressure || conn.input.len() > INPUT_BATCH_BYTES);
                if conn.recv == Recv::Rearm && held_back && !conn.queued {
                    conn.queued = true;
                    self.inputs.push(token);
                }
                if conn.recv == Recv::Rearm && !held_back {
                    entries[2] = Some(conn.arm_receive());
                }
                match conn.next_timer(now) {
                    Timer::Due => self.dirty.push(token),
                    Timer::Arm(deadline) => self.wheel.insert(deadline, token),
                    Timer::Armed => {}
                }
            }
            Phase::Closing {
                close_submitted: true,
            } => {}
            Phase::Closing {
                close_submitted: false,
            } => {
                // Beside this turn's shutdown, if the connection stopped lingering at once.
                let closing = conn.closing_entries();
                for (slot, entry) in entries.iter_mut().zip(closing) {
                    if entry.is_some() {
                        *slot = entry;
                    }
                }
            }
        }
        for entry in entries.into_iter().flatten() {
            self.push(ring, entry);
        }
    }

    /// Hand a batch of a connection's received input to its session, and look at it
    /// again.
    fn feed(&mut self, token: u64) {
        let shard = self.shard.clone();
        let Some(conn) = find(&mut self.conns, token) else {
            return;
        };
        feed_session(&shard, conn, INPUT_BATCH_BYTES);
        if conn.input.is_empty() {
            conn.queued = false;
        } else {
            self.inputs.push(token);
        }
        self.dirty.push(token);
    }

    fn recycle_send_buffer(&mut self, mut buffer: Vec<u8>) {
        if self.send_pool.len() < SEND_POOL_BUFFERS && buffer.capacity() <= SEND_POOL_KEEP_BYTES {
            buffer.clear();
            self.send_pool.push(buffer);
        }
    }

    /// Keep `accepts_wanted` accepts armed, each into a free slot of its own. The rings
    /// hold every connection the limits allow plus these, so a slot is always there
    /// unless refused sockets are still being closed (their completions come, and this
    /// runs again).
    fn keep_accepting(&mut self, now: Instant) {
        let Some(listener) = self.listener.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        if self.accept_retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.accept_retry_at = None;
        let mut ring = 0;
        while self.accepts.len() < self.accepts_wanted && ring < self.rings.len() {
            // The lowest rings first, so connections gather in as few tables as may be.
            let Some(slot) = self.rings[ring].take_slot() else {
                ring += 1;
                continue;
            };
            let accept = opcode::Accept::new(
                types::Fd(listener),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .file_index(types::DestinationSlot::try_from_slot_target(slot).ok())
            .build()
            .user_data(Op::Accept.user_data(slot_token(ring, slot)));
            self.accepts.push((ring, slot));
            self.push(ring, accept);
        }
    }

    fn stop_accepting(&mut self) {
        for (ring, slot) in std::mem::take(&mut self.accepts) {
            // The final completion (ECANCELED) is not waited for: the shard stops.
            self.push(ring, cancel(Op::Accept.user_data(slot_token(ring, slot))));
        }
        // The kernel keeps the socket while the cancels are in flight; then it closes.
        self.listener = None;
    }

    fn publish_metrics(&self) {
        let metrics = &self.shard.metrics;
        let store = |gauge: &std::sync::atomic::AtomicU64, value: u64| {
            gauge.store(value, Ordering::Relaxed)
        };
        store(&metrics.socket_rings, self.rings.len() as u64);
        let taken: u64 = self.rings.iter().map(|r| u64::from(r.slots_taken())).sum();
        store(
            &metrics.socket_slots,
            taken.saturating_sub(self.accepts.len() as u64),
        );
        store(&metrics.accepts_armed, self.accepts.len() as u64);
        store(
            &metrics.socket_slots_capacity,
            self.rings.iter().map(|r| u64::from(r.files())).sum(),
        );
        store(
            &metrics.recv_buffers_held,
            self.rings.iter().map(|r| u64::from(r.buffers_held())).sum(),
        );
        store(&metrics.send_buffers_in_flight, self.sends_in_flight);
        store(&metrics.engine_connections, self.live as u64);
    }
}

/// Up to `budget` bytes of input go to the session (and its commands to the core), with a
/// fresh clock: the session's rate limit refills by the time between reads.
fn feed_session(shard: &Shard, conn: &mut Conn, budget: usize) {
    let rest = match conn.input.len() > budget {
        true => conn.input.split_off(budget),
        false => Vec::new(),
    };
    let input = std::mem::replace(&mut conn.input, rest);
    if conn.phase == Phase::Open && !input.is_empty() {
        let now = Now::system();
        conn.ws.on_bytes(now, &input);
        forward_ws_requests(shard, &mut conn.ws, conn.id, &mut conn.opened, now);
    }
}

/// A cancel of the operation with `user_data`; its own completion is of no interest.
fn cancel(user_data: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(user_data)
        .build()
        .user_data(Op::Ignored.user_data(0))
}

/// The live connection a token names (a stale token names none).
fn find(conns: &mut [Option<Box<Conn>>], token: u64) -> Option<&mut Conn> {
    let conn = conns
        .get_mut((token & 0xffff_ffff) as usize)?
        .as_deref_mut()?;
    (conn.token == token).then_some(conn)
}

/// A send of `buffer[sent..]`; the buffer moves into the connection until completion.
fn send_entry(conn: &mut Conn, buffer: Vec<u8>, sent: usize) -> squeue::Entry {
    let rest = &buffer[sent..];
    let entry = opcode::Send::new(
        types::Fixed(conn.slot),
        rest.as_ptr(),
        rest.len().min(u32::MAX as usize) as u32,
    )
    .build()
    .user_data(Op::Send.user_data(conn.token));
    // The Vec's heap memory does not move when the Vec itself moves.
    conn.sending = Some((buffer, sent));
    entry
}

/// Accepted sockets inherit TCP_NODELAY from the listener, so direct descriptors need
/// no per-socket setsockopt.
fn set_nodelay(listener: &OwnedFd) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    let _an_optimisation = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
