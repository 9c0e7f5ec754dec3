//! The io_uring client engine: the idle scenario over Parley WebSocket without a file
//! descriptor per session, so one generator holds more sessions than `ulimit -n`.
//!
//! Each worker runs as many rings as its share of the sessions needs, each with a sparse
//! fixed-file table of min(20,000, RLIMIT_NOFILE) slots. A session's socket is created
//! straight into its ring's table (IORING_OP_SOCKET, slot allocated by the kernel),
//! `TCP_NODELAY` and `IP_BIND_ADDRESS_NO_PORT` are set (IORING_OP_URING_CMD), the socket is
//! bound to the client's source address (port 0) and connected, all linked, all on the
//! direct descriptor. It receives with one multishot receive from the ring's
//! provided buffers (re-armed when the kernel ends it: out of buffers, or otherwise), and
//! sends from a per-session buffer that exists only while a send is in flight. The upgrade
//! is tungstenite's client handshake over an in-memory pipe; frames are read with
//! tungstenite's header codec from the receive buffers (`ws`). An authenticated, idle
//! session is a 32-byte struct and a slot: no buffer, no descriptor.
//!
//! A session that ends (error, close from the server, end of the run) first cancels what
//! it has in flight, waits for the last completion of each, and only then closes its slot
//! (IORING_OP_CLOSE on the fixed descriptor), so no completion ever names a reused slot
//! or a freed buffer. Then, unless the run is over, it reconnects with jittered
//! exponential backoff, like the epoll clients.
//!
//! Submissions are batched: handlers only queue entries; each ring is submitted once per
//! loop turn. The worker sleeps in epoll on its rings' descriptors and a timerfd.

mod ring;
mod ws;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{DestinationSlot, Fixed};
use io_uring::{cqueue, opcode, squeue};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::client::Outcome;
use super::scenario::{Kind, Plan, Protocol};
use super::stats::{Live, Stats, PING_SKIPPED};
use super::wire::{self, Incoming};
use super::worker::{
    pin_to_cpu, Shared, TimerFd, WorkerResult, PHASE_STOP, PING_ROUND_NS, SETUP_START_NS,
};
use ring::Ring;
pub use ring::{probe, table_size};

/// Whether the engine serves this run: the idle scenario, Parley over WebSocket, an IPv4
/// target.
pub fn serves(plan: &Plan) -> Result<(), String> {
    if plan.kind != Kind::Idle || plan.protocol != Protocol::Parley {
        return Err("the io_uring engine runs the idle scenario over Parley WebSocket only".into());
    }
    if !plan.target.is_ipv4() {
        return Err("the io_uring engine connects to IPv4 targets only".into());
    }
    Ok(())
}

/// Sessions stay valid for the whole run (as the epoll clients' tokens).
const TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
const BACKOFF_FIRST_NS: u64 = 50_000_000;
const BACKOFF_MAX_NS: u64 = 5_000_000_000;
/// Largest frame or message accepted from the server (an idle session gets small ones).
const MAX_PAYLOAD: u64 = 1 << 20;
/// Longest sleep in one wait, so phase changes are seen promptly.
const POLL_MAX_NS: u64 = 20_000_000;
/// Connects and pings started in one loop turn, per ring.
const STARTS_PER_RING_TURN: usize = 1024;
/// At the end, how long sessions get to cancel, close and give their slots back.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// A connect, upgrade or setup ping unanswered this long after it was due is given up
/// and retried like a failed one. A server whose listen queue overflowed can leave a
/// connection the client thinks established and the server never accepted; without
/// this, such a session hangs until the setup timeout, neither set up nor failed.
const ATTEMPT_TIMEOUT_NS: u64 = 30_000_000_000;
/// How often sessions are checked against ATTEMPT_TIMEOUT_NS.
const ATTEMPT_SWEEP_NS: u64 = 1_000_000_000;

/// What a submission was, in the low byte of its user data (the session above it).
const OP_SOCKET: u8 = 1;
const OP_SOCKOPT: u8 = 2;
const OP_BIND: u8 = 3;
const OP_CONNECT: u8 = 4;
const OP_RECV: u8 = 5;
const OP_SEND: u8 = 6;
const OP_CANCEL: u8 = 7;
const OP_CLOSE: u8 = 8;

fn user_data(session: u32, op: u8) -> u64 {
    (u64::from(session) << 8) | u64::from(op)
}

/// The socket options' value ("on"), read by the kernel whenever their submissions run.
static ONE: libc::c_int = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No socket, nothing in flight (before the first connect, or waiting to reconnect).
    Closed,
    /// IORING_OP_SOCKET in flight.
    Creating,
    /// Socket options, bind and connect (linked) in flight on the slot.
    Connecting,
    /// Upgrade request sent; reading the response.
    Upgrading,
    Open,
    /// Ended: waiting for the last completion of what was in flight.
    Closing,
    /// IORING_OP_CLOSE of the slot in flight.
    Releasing,
}

/// Session flags.
const READY: u8 = 1;
/// A multishot receive is armed.
const RECEIVING: u8 = 2;
/// A send is in flight (its bytes are `Io::out`).
const SENDING: u8 = 4;
/// The pending command is the setup ping (not a ping-round one).
const SETUP: u8 = 8;

const NO_SLOT: u16 = u16::MAX;

/// One session, kept small: what an idle, authenticated session costs the generator.
struct Session {
    /// While connecting: when the connect was due (connect latency). Once open: when the
    /// pending command was sent. While ending: when to reconnect.
    t: u64,
    /// Buffers, only while there is something to hold.
    io: Option<Box<Io>>,
    /// Id of the command awaiting its reply (0: none).
    pending: u16,
    next_id: u16,
    /// Fixed-file slot in the session's ring (NO_SLOT: none).
    slot: u16,
    state: State,
    flags: u8,
    /// Submissions whose last completion has not arrived.
    inflight: u8,
    attempts: u8,
}

const _: () = assert!(std::mem::size_of::<Session>() <= 32);

impl Session {
    fn new() -> Session {
        Session {
            t: 0,
            io: None,
            pending: 0,
            next_id: 1,
            slot: NO_SLOT,
            state: State::Closed,
            flags: 0,
            inflight: 0,
            attempts: 0,
        }
    }
}

/// A session's buffers while it has something in them.
#[derive(Default)]
struct Io {
    /// The upgrade request's `Sec-WebSocket-Key`, until the answer is checked.
    key: String,
    /// The bytes of the send in flight: not touched until its completion.
    out: Vec<u8>,
    /// How much of `out` the kernel took so far (a short send is continued).
    sent: usize,
    /// Written while a send was in flight; sent after it.
    queued: Vec<u8>,
    /// The start of a frame (or of the upgrade's answer) that has not fully arrived.
    carry: Vec<u8>,
    /// A fragmented message being assembled: (is text, bytes so far).
    message: Option<(bool, Vec<u8>)>,
}

impl Io {
    fn is_empty(&self) -> bool {
        self.key.is_empty()
            && self.out.is_empty()
            && self.queued.is_empty()
            && self.carry.is_empty()
            && self.message.is_none()
    }
}

/// Why a session ends.
enum End {
    /// The run is over.
    Stop,
    /// Socket, bind or connect failed.
    Connect(String),
    /// The upgrade failed (a refused token, a bad response).
    Upgrade(String),
    /// The session was lost (closed by the server, reset); the text is the error code.
    Lost(String),
}

/// Run worker `worker` on io_uring until the main thread says stop.
pub fn run(shared: Arc<Shared>, worker: usize, cpu: Option<usize>) -> Result<WorkerResult, String> {
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu).map_err(|error| format!("pin worker {worker} to cpu {cpu}: {error}"))?;
    }
    let plan = &shared.plan;
    let workers = shared.workers.max(1) as u32;
    let worker = worker as u32;
    let mine = plan.clients.saturating_sub(worker).div_ceil(workers);
    let table = table_size();
    let ring_count = (mine as usize).div_ceil(table as usize);
    let rings = (0..ring_count)
        .map(|_| Ring::new(table))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|error| format!("io_uring ring: {error}"))?;
    let timer = TimerFd::new().map_err(|error| format!("timerfd: {error}"))?;
    let poller = Poller::new().map_err(|error| format!("epoll: {error}"))?;
    for ring in &rings {
        poller
            .add(ring.fd())
            .map_err(|error| format!("epoll: {error}"))?;
    }
    poller
        .add(timer.fd.as_raw_fd())
        .map_err(|error| format!("epoll: {error}"))?;

    let SocketAddr::V4(target) = plan.target else {
        return Err("the io_uring engine connects to IPv4 targets only".into());
    };
    let sources = u32::from(plan.sources.max(1));
    let mut engine = Engine {
        shared: &shared,
        plan,
        live: &shared.lives[worker as usize],
        worker,
        workers,
        sessions: (0..mine).map(|_| Session::new()).collect(),
        rings,
        stats: Stats::new(),
        retries: BinaryHeap::new(),
        rearm: Vec::new(),
        scratch: Vec::new(),
        sources: (0..sources)
            .map(|client| sockaddr(SocketAddrV4::new(plan.source(client), 0)))
            .collect(),
        target: Box::new(sockaddr(target)),
        stopping: false,
        rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(worker + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        active: 0,
        slots: 0,
        slots_peak: 0,
        enobufs: 0,
        rearms: 0,
        sockopt_failed: 0,
        now: 0,
    };
    // A failing ring (ENOMEM under memory pressure...) ends this worker, but what it
    // measured until then still goes into the report, with the error.
    let error = engine
        .run(&timer, &poller)
        .and_then(|()| engine.stop(&timer, &poller))
        .err();
    if error.is_some() {
        // Receives may still be armed: the kernel may write the buffers until the ring
        // is gone, so they are never freed.
        for ring in &mut engine.rings {
            ring.leak_buffers();
        }
    }

    let mut figures = BTreeMap::new();
    figures.insert("uring_rings", engine.rings.len() as f64);
    figures.insert("uring_slots_peak", f64::from(engine.slots_peak));
    figures.insert("uring_slots_open_at_exit", f64::from(engine.slots));
    figures.insert("uring_recv_enobufs", engine.enobufs as f64);
    figures.insert("uring_recv_rearms", engine.rearms as f64);
    if engine.sockopt_failed > 0 {
        figures.insert("uring_sockopt_failed", engine.sockopt_failed as f64);
    }
    let outcomes = (0..mine)
        .map(|k| Outcome {
            client: engine.client(k),
            acked: 0,
            from: HashMap::new(),
            gaps: 0,
            duplicates: 0,
            out_of_order: 0,
            ready: engine.sessions[k as usize].flags & READY != 0,
        })
        .collect();
    Ok(WorkerResult {
        stats: std::mem::take(&mut engine.stats),
        outcomes,
        figures,
        error,
    })
}

fn sockaddr(address: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*address.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const SOCKADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// An errno from a completion as the epoll clients name it (`ConnectionRefused`), or its
/// text when it has no specific kind.
fn errno_name(res: i32) -> String {
    let error = io::Error::from_raw_os_error(-res);
    let kind = format!("{:?}", error.kind());
    if kind == "Uncategorized" || kind == "Other" {
        error.to_string()
    } else {
        kind
    }
}

/// One worker's sessions and rings.
struct Engine<'a> {
    shared: &'a Shared,
    plan: &'a Plan,
    live: &'a Live,
    worker: u32,
    workers: u32,
    /// Session `k` is client `worker + k * workers`, on ring `k % rings.len()`.
    sessions: Vec<Session>,
    rings: Vec<Ring>,
    stats: Stats,
    /// Reconnects: (due, session).
    retries: BinaryHeap<Reverse<(u64, u32)>>,
    /// Sessions whose multishot receive ended and must be armed again.
    rearm: Vec<u32>,
    /// Received bytes, copied out of a provided buffer so the buffer goes back at once.
    scratch: Vec<u8>,
    /// Source addresses by `client % sources` and the target: the kernel reads them
    /// when the bind and connect submissions are prepared, so they live as long as the
    /// engine.
    sources: Box<[libc::sockaddr_in]>,
    target: Box<libc::sockaddr_in>,
    stopping: bool,
    rng: u64,
    /// Sessions not `Closed`.
    active: usize,
    /// Fixed-file slots in use over all rings, and the most at once.
    slots: u32,
    slots_peak: u32,
    enobufs: u64,
    rearms: u64,
    sockopt_failed: u64,
    /// The clock of the completion or timer being handled.
    now: u64,
}

impl Engine<'_> {
    fn client(&self, k: u32) -> u32 {
        self.worker + k * self.workers
    }

    fn ring_of(&self, k: u32) -> usize {
        k as usize % self.rings.len()
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.random() as u32).to_ne_bytes()
    }

    fn push(&mut self, k: u32, op: u8, entry: squeue::Entry) {
        let ring = self.ring_of(k);
        self.sessions[k as usize].inflight += 1;
        self.rings[ring].push(entry.user_data(user_data(k, op)));
    }

    /// The main loop: connects on the ramp, reconnects, the ping round, completions.
    fn run(&mut self, timer: &TimerFd, poller: &Poller) -> Result<(), String> {
        let plan = self.plan;
        let mine = self.sessions.len() as u32;
        let ramp_step = 1e9 / plan.connect_rate.max(1e-3);
        let connect_due = |client: u32| SETUP_START_NS + (f64::from(client) * ramp_step) as u64;
        let clients = u64::from(plan.clients.max(1));
        let ping_offset = |client: u32| u64::from(client) * PING_ROUND_NS / clients;
        let mut next_connect = 0u32;
        let mut round = 0u64;
        let mut next_ping = mine;
        let mut batch = Vec::new();
        let mut next_sweep = ATTEMPT_SWEEP_NS;

        while self.shared.phase.load(Ordering::Relaxed) != PHASE_STOP {
            let published = self.shared.ping_round_at.load(Ordering::Relaxed);
            if published != 0 && published != round {
                round = published;
                next_ping = 0;
            }
            self.now = self.shared.now();
            // Connects and pings started per turn are bounded, so a generator that fell
            // behind catches up in steps instead of queueing everything at once (their
            // latencies count from when they were due or sent, as in the epoll engine).
            let mut starts = STARTS_PER_RING_TURN * self.rings.len();
            while next_connect < mine && starts > 0 {
                let due = connect_due(self.client(next_connect));
                if due > self.now {
                    break;
                }
                self.connect(next_connect, due);
                next_connect += 1;
                starts -= 1;
            }
            while let Some(&Reverse((due, k))) = self.retries.peek() {
                if due > self.now || starts == 0 {
                    break;
                }
                self.retries.pop();
                self.connect(k, due);
                starts -= 1;
            }
            while next_ping < mine && starts > 0 {
                if round + ping_offset(self.client(next_ping)) > self.now {
                    break;
                }
                self.ping(next_ping);
                next_ping += 1;
                starts -= 1;
            }
            if self.now >= next_sweep {
                next_sweep = self.now + ATTEMPT_SWEEP_NS;
                self.give_up_stuck_attempts();
            }
            self.reap(&mut batch);
            self.submit()?;

            let mut next = u64::MAX;
            if next_connect < mine {
                next = next.min(connect_due(self.client(next_connect)));
            }
            if let Some(&Reverse((due, _))) = self.retries.peek() {
                next = next.min(due);
            }
            if next_ping < mine {
                next = next.min(round + ping_offset(self.client(next_ping)));
            }
            let busy = !self.rearm.is_empty() || self.rings.iter().any(|ring| ring.backlog() > 0);
            self.wait(timer, poller, if busy { Some(0) } else { Some(next) })?;
        }
        Ok(())
    }

    /// End (for a retry) every session whose connect, upgrade or setup ping has gone
    /// unanswered for ATTEMPT_TIMEOUT_NS (`t` is when it was due, or sent).
    fn give_up_stuck_attempts(&mut self) {
        let now = self.now;
        for k in 0..self.sessions.len() as u32 {
            let session = &self.sessions[k as usize];
            if session.flags & READY != 0 || now.saturating_sub(session.t) < ATTEMPT_TIMEOUT_NS {
                continue;
            }
            let why = format!("no answer within {} s", ATTEMPT_TIMEOUT_NS / 1_000_000_000);
            match session.state {
                State::Connecting => self.end(k, End::Connect(why)),
                State::Upgrading => self.end(k, End::Upgrade(why)),
                State::Open => self.end(k, End::Lost(format!("setup ping: {why}"))),
                State::Closed | State::Creating | State::Closing | State::Releasing => {}
            }
        }
    }

    /// Sleep until a completion, `until` (run ns; Some(0): do not sleep) or POLL_MAX.
    fn wait(&self, timer: &TimerFd, poller: &Poller, until: Option<u64>) -> Result<(), String> {
        let now = self.shared.now();
        let wait = until.map_or(POLL_MAX_NS, |at| at.saturating_sub(now));
        if wait == 0 {
            return Ok(());
        }
        if wait < POLL_MAX_NS {
            timer
                .arm(wait)
                .map_err(|error| format!("timerfd: {error}"))?;
        }
        let timer_fired = poller
            .wait((POLL_MAX_NS / 1_000_000) as i32, timer.fd.as_raw_fd())
            .map_err(|error| format!("epoll_wait: {error}"))?;
        if timer_fired {
            timer.clear();
        }
        Ok(())
    }

    /// Handle every completion of every ring, give the buffers back, re-arm receives.
    fn reap(&mut self, batch: &mut Vec<cqueue::Entry>) {
        for r in 0..self.rings.len() {
            batch.clear();
            self.rings[r].reap(batch);
            if batch.is_empty() {
                continue;
            }
            self.now = self.shared.now();
            for cqe in batch.iter() {
                self.complete(r, cqe);
            }
            self.rings[r].publish_buffers();
        }
        // Re-arm ended receives, at most as many per ring and turn as it has buffers:
        // when the buffers ran out, arming every session with data waiting at once would
        // only end each again at once (ENOBUFS). The rest wait for the next turn.
        if self.rearm.is_empty() {
            return;
        }
        let mut budget = vec![u32::from(ring::BUFFERS); self.rings.len()];
        let mut rearm = std::mem::take(&mut self.rearm);
        rearm.retain(|&k| {
            let session = &self.sessions[k as usize];
            if !matches!(session.state, State::Upgrading | State::Open)
                || session.flags & RECEIVING != 0
            {
                return false;
            }
            let ring = self.ring_of(k);
            if budget[ring] == 0 {
                return true;
            }
            budget[ring] -= 1;
            self.rearms += 1;
            self.receive(k);
            false
        });
        self.rearm = rearm;
    }

    fn submit(&mut self) -> Result<(), String> {
        for ring in &mut self.rings {
            ring.submit()
                .map_err(|error| format!("io_uring_enter: {error}"))?;
        }
        Ok(())
    }

    fn complete(&mut self, r: usize, cqe: &cqueue::Entry) {
        let k = (cqe.user_data() >> 8) as u32;
        let op = cqe.user_data() as u8;
        let res = cqe.result();
        if k as usize >= self.sessions.len() {
            return;
        }
        match op {
            OP_RECV => return self.received(r, k, res, cqe.flags()),
            OP_SOCKET => self.socket_created(k, res),
            OP_SOCKOPT => {
                self.done(k);
                if res < 0 {
                    self.sockopt_failed += 1;
                }
            }
            OP_BIND => {
                self.done(k);
                if res < 0 && self.sessions[k as usize].state == State::Connecting {
                    self.end(k, End::Connect(errno_name(res)));
                }
            }
            OP_CONNECT => self.connected(k, res),
            OP_SEND => self.sent(k, res),
            OP_CANCEL => self.done(k),
            OP_CLOSE => self.closed(k),
            _ => return,
        }
        self.settle(k);
        self.tidy(k);
    }

    /// One submission of session `k` has had its last completion.
    fn done(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        session.inflight = session.inflight.saturating_sub(1);
    }

    /// Drop the session's buffers once nothing is in them.
    fn tidy(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        if session.flags & SENDING == 0 && session.io.as_ref().is_some_and(|io| io.is_empty()) {
            session.io = None;
        }
    }

    /// Start a connection attempt that was due at `due`.
    fn connect(&mut self, k: u32, due: u64) {
        let session = &mut self.sessions[k as usize];
        if session.state != State::Closed || self.stopping {
            return;
        }
        session.t = due;
        session.state = State::Creating;
        self.active += 1;
        // No SOCK_CLOEXEC: a direct descriptor is no descriptor (the kernel refuses it).
        let entry = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
            .file_index(Some(DestinationSlot::auto_target()))
            .build();
        self.push(k, OP_SOCKET, entry);
    }

    fn socket_created(&mut self, k: u32, res: i32) {
        self.done(k);
        if res >= 0 {
            let ring = self.ring_of(k);
            self.rings[ring].slots += 1;
            self.slots += 1;
            self.slots_peak = self.slots_peak.max(self.slots);
            self.sessions[k as usize].slot = res as u16;
        }
        if self.sessions[k as usize].state != State::Creating {
            return;
        }
        if res < 0 {
            return self.end(k, End::Connect(errno_name(res)));
        }
        self.sessions[k as usize].state = State::Connecting;
        let fd = Fixed(res as u32);
        let client = self.client(k);
        let source: *const libc::sockaddr_in =
            &self.sources[(client % self.sources.len() as u32) as usize];
        let target: *const libc::sockaddr_in = &*self.target;
        // Options whose failure must not stop the connect (hard links): no delay for
        // small writes, and the source port chosen at connect rather than at bind, where
        // the kernel may take a port that another destination uses or that is in
        // TIME_WAIT (an earlier run's), instead of searching for one no socket holds.
        let option = |level: i32, name: i32| {
            opcode::SetSockOpt::new(
                fd,
                level as u32,
                name as u32,
                (&raw const ONE).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
        };
        let nodelay = option(libc::IPPROTO_TCP, libc::TCP_NODELAY);
        let no_port = option(libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT);
        let bind = opcode::Bind::new(fd, source.cast(), SOCKADDR_LEN)
            .build()
            .flags(squeue::Flags::IO_LINK);
        let connect = opcode::Connect::new(fd, target.cast(), SOCKADDR_LEN).build();
        // One chain, in one submit: split across two, the connect could run before the
        // bind (which then fails: EINVAL), seen once in 30,000 connects on a busy machine.
        let chain = [
            nodelay.user_data(user_data(k, OP_SOCKOPT)),
            no_port.user_data(user_data(k, OP_SOCKOPT)),
            bind.user_data(user_data(k, OP_BIND)),
            connect.user_data(user_data(k, OP_CONNECT)),
        ];
        self.sessions[k as usize].inflight += chain.len() as u8;
        let ring = self.ring_of(k);
        self.rings[ring].push_chain(&chain);
    }

    fn connected(&mut self, k: u32, res: i32) {
        self.done(k);
        if self.sessions[k as usize].state != State::Connecting {
            return;
        }
        if res < 0 {
            return self.end(k, End::Connect(errno_name(res)));
        }
        self.sessions[k as usize].state = State::Upgrading;
        // The token is minted when needed and not kept: it is most of a session's bytes.
        let user = self.plan.user(self.client(k));
        let token = crate::mint_token(&self.plan.secret, &user, None, TOKEN_TTL);
        match ws::start_upgrade(self.plan.target, &token) {
            Ok((request, key)) => {
                self.sessions[k as usize]
                    .io
                    .get_or_insert_with(Box::default)
                    .key = key;
                self.write(k, request);
                self.receive(k);
            }
            Err(why) => self.end(k, End::Upgrade(why)),
        }
    }

    /// Arm the session's multishot receive.
    fn receive(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        session.flags |= RECEIVING;
        let entry =
            opcode::RecvMulti::new(Fixed(u32::from(session.slot)), ring::BUFFER_GROUP).build();
        self.push(k, OP_RECV, entry);
    }

    /// Send `bytes` after whatever is in flight.
    fn write(&mut self, k: u32, bytes: Vec<u8>) {
        let session = &mut self.sessions[k as usize];
        let io = session.io.get_or_insert_with(Box::default);
        if session.flags & SENDING != 0 {
            io.queued.extend_from_slice(&bytes);
            return;
        }
        io.out = bytes;
        io.sent = 0;
        self.send(k);
    }

    /// Submit the unsent rest of `Io::out`.
    fn send(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        let Some(io) = session.io.as_ref() else {
            return;
        };
        let rest = &io.out[io.sent..];
        if rest.is_empty() {
            return;
        }
        session.flags |= SENDING;
        let entry = opcode::Send::new(
            Fixed(u32::from(session.slot)),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build();
        self.push(k, OP_SEND, entry);
    }

    fn sent(&mut self, k: u32, res: i32) {
        self.done(k);
        let session = &mut self.sessions[k as usize];
        session.flags &= !SENDING;
        if !matches!(session.state, State::Upgrading | State::Open) {
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "write: the socket took nothing".to_string()
            } else {
                format!("write: IO error: {}", io::Error::from_raw_os_error(-res))
            };
            return self.end(k, End::Lost(why));
        }
        let Some(io) = session.io.as_mut() else {
            return;
        };
        io.sent += res as usize;
        if io.sent < io.out.len() {
            return self.send(k);
        }
        // Let the sent bytes go (not just their length): an idle session keeps nothing.
        io.out = std::mem::take(&mut io.queued);
        io.sent = 0;
        if !io.out.is_empty() {
            self.send(k);
        }
    }

    fn received(&mut self, r: usize, k: u32, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        self.scratch.clear();
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 {
                self.scratch
                    .extend_from_slice(self.rings[r].received(bid, res as usize));
            }
            self.rings[r].recycle(bid);
        }
        if !more {
            self.sessions[k as usize].flags &= !RECEIVING;
            self.done(k);
        }
        let state = self.sessions[k as usize].state;
        if matches!(state, State::Upgrading | State::Open) {
            if res > 0 {
                let bytes = std::mem::take(&mut self.scratch);
                self.input(k, &bytes);
                self.scratch = bytes;
            } else if res == 0 {
                let why = match state {
                    State::Upgrading => End::Upgrade(
                        "WebSocket protocol error: Handshake not finished".into(),
                    ),
                    _ => End::Lost(
                        "read: WebSocket protocol error: Connection reset without closing handshake"
                            .into(),
                    ),
                };
                self.end(k, why);
            } else if res == -libc::ENOBUFS {
                self.enobufs += 1;
            } else {
                let error = io::Error::from_raw_os_error(-res);
                let why = match state {
                    State::Upgrading => End::Upgrade(format!("IO error: {error}")),
                    _ => End::Lost(format!("read: IO error: {error}")),
                };
                self.end(k, why);
            }
            let session = &self.sessions[k as usize];
            if !more && matches!(session.state, State::Upgrading | State::Open) {
                self.rearm.push(k);
            }
        }
        self.settle(k);
        self.tidy(k);
    }

    /// Bytes from the server.
    fn input(&mut self, k: u32, bytes: &[u8]) {
        if self.sessions[k as usize].state == State::Open {
            return self.frames(k, bytes);
        }
        // The upgrade's answer: checked once its head is all here (almost always in
        // one piece).
        let io = self.sessions[k as usize]
            .io
            .get_or_insert_with(Box::default);
        let joined;
        let bytes = if io.carry.is_empty() {
            bytes
        } else {
            let mut carry = std::mem::take(&mut io.carry);
            carry.extend_from_slice(bytes);
            joined = carry;
            &joined[..]
        };
        let Some(end) = ws::head_end(bytes) else {
            if bytes.len() > ws::MAX_HEAD {
                return self.end(k, End::Upgrade("the response head is too long".into()));
            }
            io.carry = bytes.to_vec();
            return;
        };
        let key = std::mem::take(&mut io.key);
        match ws::finish_upgrade(self.plan.target, &key, &bytes[..end]) {
            Ok(()) => {
                self.opened(k);
                if end < bytes.len() && self.sessions[k as usize].state == State::Open {
                    self.frames(k, &bytes[end..]);
                }
            }
            Err(why) => self.end(k, End::Upgrade(why)),
        }
    }

    /// The upgrade succeeded: the session is authenticated.
    fn opened(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        session.state = State::Open;
        let latency = self.now.saturating_sub(session.t);
        let ready = session.flags & READY != 0;
        self.stats.record("connect", latency);
        if !ready {
            // The idle scenario's setup is one ping.
            self.command(k, true);
        }
    }

    /// Read every complete frame of what arrived (after what was left of the last time).
    fn frames(&mut self, k: u32, bytes: &[u8]) {
        let carry = self.sessions[k as usize]
            .io
            .as_mut()
            .map(|io| std::mem::take(&mut io.carry))
            .unwrap_or_default();
        let joined;
        let bytes = if carry.is_empty() {
            bytes
        } else {
            let mut carry = carry;
            carry.extend_from_slice(bytes);
            joined = carry;
            &joined[..]
        };
        let mut at = 0;
        while at < bytes.len() {
            match ws::parse(bytes, at, MAX_PAYLOAD) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    at = frame.payload.end;
                    self.frame(k, frame.header, &bytes[frame.payload]);
                    if self.sessions[k as usize].state != State::Open {
                        return;
                    }
                }
                Err(error) => {
                    return self.end(
                        k,
                        End::Lost(format!("read: WebSocket protocol error: {error}")),
                    )
                }
            }
        }
        if at < bytes.len() {
            self.sessions[k as usize]
                .io
                .get_or_insert_with(Box::default)
                .carry = bytes[at..].to_vec();
        }
    }

    fn frame(&mut self, k: u32, header: FrameHeader, payload: &[u8]) {
        let unmasked;
        let payload = match header.mask {
            Some(mask) => {
                let mut bytes = payload.to_vec();
                ws::unmask(&mut bytes, mask);
                unmasked = bytes;
                &unmasked[..]
            }
            None => payload,
        };
        match header.opcode {
            OpCode::Data(Data::Text) if header.is_final => self.documents(k, payload),
            OpCode::Data(Data::Binary) if header.is_final => {}
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                self.sessions[k as usize]
                    .io
                    .get_or_insert_with(Box::default)
                    .message = Some((data == Data::Text, payload.to_vec()));
            }
            OpCode::Data(Data::Continue) => {
                let message = self.sessions[k as usize]
                    .io
                    .as_mut()
                    .and_then(|io| io.message.take());
                let Some((text, mut bytes)) = message else {
                    return self.end(
                        k,
                        End::Lost(
                            "read: WebSocket protocol error: continuation frame without a start"
                                .into(),
                        ),
                    );
                };
                bytes.extend_from_slice(payload);
                if bytes.len() as u64 > MAX_PAYLOAD {
                    return self.end(k, End::Lost("read: message too long".into()));
                }
                if !header.is_final {
                    self.sessions[k as usize]
                        .io
                        .get_or_insert_with(Box::default)
                        .message = Some((text, bytes));
                } else if text {
                    self.documents(k, &bytes);
                }
            }
            OpCode::Control(Control::Ping) => {
                let mut pong = Vec::with_capacity(payload.len() + 6);
                let mask = self.mask();
                ws::frame(&mut pong, OpCode::Control(Control::Pong), payload, mask);
                self.write(k, pong);
            }
            OpCode::Control(Control::Close) => {
                let code = match payload {
                    [high, low, ..] => u16::from_be_bytes([*high, *low]),
                    _ => 1005,
                };
                self.end(k, End::Lost(format!("close: {code}")));
            }
            // Pongs (never asked for) and reserved opcodes (refused by the parser).
            _ => {}
        }
    }

    /// A text message: one or more documents, one a line.
    fn documents(&mut self, k: u32, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.stats.error("unparsed document");
        };
        for line in text.split('\n') {
            if !line.is_empty() {
                self.document(k, line);
                if self.sessions[k as usize].state != State::Open {
                    return;
                }
            }
        }
    }

    fn document(&mut self, k: u32, line: &str) {
        let doc: Incoming = match serde_json::from_str(line) {
            Ok(doc) => doc,
            Err(_) => return self.stats.error("unparsed document"),
        };
        if doc.ev.is_some() {
            // An idle session has no conversation: events are not its concern.
            return;
        }
        let Some(id) = doc.re else {
            if let Some(err) = &doc.err {
                self.stats.error(&format!("{} (re: null)", err.code));
            }
            return;
        };
        let session = &mut self.sessions[k as usize];
        if session.pending == 0 || u64::from(session.pending) != id {
            return self.stats.error("reply to no command");
        }
        let setup = session.flags & SETUP != 0;
        session.pending = 0;
        session.flags &= !SETUP;
        Live::sub(&self.live.outstanding, 1);
        if let Some(err) = &doc.err {
            self.stats.error(&err.code);
            Live::add(&self.live.errors, 1);
            return;
        }
        let latency = self.now.saturating_sub(session.t);
        if setup {
            session.flags |= READY;
            session.attempts = 0;
            self.stats.record("setup", latency);
            Live::add(&self.live.ready, 1);
        } else {
            self.stats.record("ping", latency);
        }
    }

    /// Send a `ping` command now: the setup one, or one of the ping round.
    fn command(&mut self, k: u32, setup: bool) {
        let mask = self.mask();
        let session = &mut self.sessions[k as usize];
        let id = session.next_id.max(1);
        session.next_id = id.wrapping_add(1);
        session.pending = id;
        session.t = self.now;
        if setup {
            session.flags |= SETUP;
        } else {
            session.flags &= !SETUP;
        }
        let mut doc = String::with_capacity(32);
        wire::command(&mut doc, u64::from(id), "ping", "");
        let mut frame = Vec::with_capacity(doc.len() + 6);
        ws::text(&mut frame, doc.as_bytes(), mask);
        Live::add(&self.live.outstanding, 1);
        self.write(k, frame);
    }

    /// The ping round reached this session.
    fn ping(&mut self, k: u32) {
        let session = &self.sessions[k as usize];
        Live::add(&self.live.pinged, 1);
        // One command at a time: the round starts only when every setup ping is
        // answered, so a pending one here would be a ping of an earlier round.
        if session.state == State::Open && session.flags & READY != 0 && session.pending == 0 {
            self.now = self.shared.now();
            self.command(k, false);
        } else {
            self.stats.error(PING_SKIPPED);
        }
    }

    /// End the session: count why, cancel what is in flight; the slot is closed once
    /// the last completion is in (`settle`).
    fn end(&mut self, k: u32, why: End) {
        let state = self.sessions[k as usize].state;
        if matches!(state, State::Closed | State::Closing | State::Releasing) {
            return;
        }
        let ready = self.sessions[k as usize].flags & READY != 0;
        let stop = matches!(why, End::Stop);
        match why {
            End::Stop => {}
            End::Connect(why) => {
                self.stats.failed_connects += 1;
                self.stats.error(&format!("connect: {why}"));
            }
            End::Upgrade(why) => {
                self.stats.failed_connects += 1;
                self.stats.error(&format!("upgrade: {why}"));
            }
            End::Lost(why) => {
                if !ready {
                    self.stats.failed_connects += 1;
                }
                self.stats.error(&why);
                Live::add(&self.live.errors, 1);
            }
        }
        let jitter = self.random();
        let now = self.now;
        let session = &mut self.sessions[k as usize];
        if session.pending != 0 {
            // Commands other than sends are not resent: they stop being outstanding.
            Live::sub(&self.live.outstanding, 1);
            session.pending = 0;
            session.flags &= !SETUP;
        }
        if !stop {
            session.attempts = session.attempts.saturating_add(1);
            let backoff = BACKOFF_FIRST_NS
                .saturating_mul(1 << session.attempts.min(10))
                .min(BACKOFF_MAX_NS);
            session.t = now + backoff / 2 + jitter % backoff.max(1);
        }
        session.state = State::Closing;
        if let Some(io) = session.io.as_mut() {
            // Keep only `out`, which a send in flight may still be reading.
            io.key = String::new();
            io.queued = Vec::new();
            io.carry = Vec::new();
            io.message = None;
        }
        let flags = session.flags;
        if flags & RECEIVING != 0 {
            self.push(
                k,
                OP_CANCEL,
                opcode::AsyncCancel::new(user_data(k, OP_RECV)).build(),
            );
        }
        if flags & SENDING != 0 {
            self.push(
                k,
                OP_CANCEL,
                opcode::AsyncCancel::new(user_data(k, OP_SEND)).build(),
            );
        }
        if state == State::Connecting {
            self.push(
                k,
                OP_CANCEL,
                opcode::AsyncCancel::new(user_data(k, OP_CONNECT)).build(),
            );
        }
        self.settle(k);
    }

    /// A session that is ending and has nothing left in flight closes its slot, or, with
    /// no slot, is done.
    fn settle(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        if session.state != State::Closing || session.inflight > 0 {
            return;
        }
        if session.slot == NO_SLOT {
            return self.finish(k);
        }
        session.state = State::Releasing;
        let entry = opcode::Close::new(Fixed(u32::from(session.slot))).build();
        self.push(k, OP_CLOSE, entry);
    }

    fn closed(&mut self, k: u32) {
        self.done(k);
        let ring = self.ring_of(k);
        let session = &mut self.sessions[k as usize];
        if session.slot != NO_SLOT {
            session.slot = NO_SLOT;
            self.rings[ring].slots -= 1;
            self.slots -= 1;
        }
        if session.state == State::Releasing {
            self.finish(k);
        }
    }

    /// Nothing of the session is left in the kernel: reconnect later, unless stopping.
    fn finish(&mut self, k: u32) {
        let session = &mut self.sessions[k as usize];
        session.state = State::Closed;
        session.io = None;
        session.inflight = 0;
        self.active -= 1;
        if !self.stopping {
            self.retries.push(Reverse((session.t, k)));
        }
    }

    /// The run is over: end every session and wait (bounded) until every slot is closed.
    fn stop(&mut self, timer: &TimerFd, poller: &Poller) -> Result<(), String> {
        self.stopping = true;
        self.now = self.shared.now();
        for k in 0..self.sessions.len() as u32 {
            self.end(k, End::Stop);
        }
        let deadline = Instant::now() + STOP_LIMIT;
        let mut batch = Vec::new();
        loop {
            self.reap(&mut batch);
            self.submit()?;
            if self.active == 0 || Instant::now() >= deadline {
                break;
            }
            let busy = !self.rearm.is_empty() || self.rings.iter().any(|ring| ring.backlog() > 0);
            self.wait(timer, poller, if busy { Some(0) } else { None })?;
        }
        for ring in &mut self.rings {
            if self.active == 0 {
                ring.release_buffers();
            } else {
                ring.leak_buffers();
            }
        }
        Ok(())
    }
}

/// epoll over the rings' descriptors (readable: completions waiting) and the timerfd.
struct Poller {
    fd: OwnedFd,
}

impl Poller {
    fn new() -> io::Result<Poller> {
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Poller {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: valid descriptors and a fully initialised event.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait up to `timeout_ms` for any descriptor to be ready (level-triggered); whether
    /// `watch` was one of them.
    fn wait(&self, timeout_ms: i32, watch: RawFd) -> io::Result<bool> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: the buffer holds 64 events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(error);
        }
        Ok(events[..n as usize]
            .iter()
            .any(|event| event.u64 == watch as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_32_bytes_and_user_data_round_trips() {
        assert!(std::mem::size_of::<Session>() <= 32);
        let data = user_data(1_000_000, OP_RECV);
        assert_eq!((data >> 8) as u32, 1_000_000);
        assert_eq!(data as u8, OP_RECV);
    }

    #[test]
    fn errno_names_match_the_epoll_clients() {
        assert_eq!(errno_name(-libc::ECONNREFUSED), "ConnectionRefused");
        assert_eq!(errno_name(-libc::EADDRNOTAVAIL), "AddrNotAvailable");
    }

    #[test]
    fn source_addresses_are_the_plans() {
        let address = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 3), 0));
        assert_eq!(u32::from_be(address.sin_addr.s_addr), 0x7f00_0003);
        assert_eq!(address.sin_port, 0);
    }
}
