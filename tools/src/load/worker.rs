//! One pinned worker thread: an epoll loop (mio) over its share of the clients, a timer
//! heap for connects, scheduled sends, storm drops and pings, and a timerfd so a send
//! due in 300 µs fires then and not at the next whole millisecond.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use super::churn::ChurnClient;
use super::client::{Client, Ctx, Outcome, Timer, Timers, Window};
use super::scenario::{Engine, Plan, Protocol};
use super::stats::{Live, Stats};

/// Phases the main thread moves the workers through.
pub const PHASE_RUN: u8 = 0;
pub const PHASE_STOP: u8 = 1;

/// What the main thread and the workers share.
pub struct Shared {
    pub plan: Plan,
    pub workers: usize,
    /// The socket engine every worker runs.
    pub engine: Engine,
    /// Time zero of the run: every timestamp is nanoseconds since it.
    pub epoch: Instant,
    pub lives: Vec<Live>,
    pub phase: AtomicU8,
    /// Set once, when every session is ready: when sending starts and stops.
    pub window: OnceLock<Window>,
    /// Start of the idle scenario's ping round (0: none yet).
    pub ping_round_at: AtomicU64,
}

impl Shared {
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What a worker hands back when the run stops.
pub struct WorkerResult {
    pub stats: Stats,
    pub outcomes: Vec<Outcome>,
    /// Engine figures for the report's `extra`, summed over workers.
    pub figures: BTreeMap<&'static str, f64>,
    /// Why the worker stopped before it was told to, with what it had measured until then.
    pub error: Option<String>,
}

/// Longest sleep in one poll, so phase changes are seen promptly.
const POLL_MAX: Duration = Duration::from_millis(20);
/// Connections start this long after the run's epoch.
pub const SETUP_START_NS: u64 = 10_000_000;
/// The idle scenario spreads its ping round over this long.
pub(crate) const PING_ROUND_NS: u64 = 1_000_000_000;
const TIMER_TOKEN: Token = Token(usize::MAX);

/// Run worker `worker` until the main thread says stop.
pub fn run(shared: Arc<Shared>, worker: usize, cpu: Option<usize>) -> Result<WorkerResult, String> {
    if shared.engine == Engine::Uring {
        return super::uring::run(shared, worker, cpu);
    }
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu).map_err(|error| format!("pin worker {worker} to cpu {cpu}: {error}"))?;
    }
    let plan = &shared.plan;
    let live = &shared.lives[worker];
    let mut poll = Poll::new().map_err(|error| format!("epoll: {error}"))?;
    let timer = TimerFd::new().map_err(|error| format!("timerfd: {error}"))?;
    poll.registry()
        .register(
            &mut SourceFd(&timer.fd.as_raw_fd()),
            TIMER_TOKEN,
            Interest::READABLE,
        )
        .map_err(|error| format!("register timerfd: {error}"))?;

    let mine: Vec<u32> = (0..plan.clients)
        .filter(|c| *c as usize % shared.workers == worker)
        .collect();
    let mut clients: Vec<Client> = mine
        .iter()
        .enumerate()
        .map(|(slot, &index)| Client::new(plan, index, slot as u32))
        .collect();
    // The churn's sessions of their own, after the chat clients in the slot space.
    let churn_sessions = plan.churn.map_or(0, |churn| churn.sessions());
    let mine_churn: Vec<u32> = (0..churn_sessions)
        .filter(|c| *c as usize % shared.workers == worker)
        .collect();
    let mut churners: Vec<ChurnClient> = mine_churn
        .iter()
        .enumerate()
        .map(|(i, &index)| ChurnClient::new(plan, index, (clients.len() + i) as u32))
        .collect();
    let mut timers = Timers::new();
    let ramp_step = 1e9 / plan.connect_rate.max(1e-3);
    for (slot, &index) in mine.iter().enumerate() {
        let due = SETUP_START_NS + (f64::from(index) * ramp_step) as u64;
        timers.push(Reverse((due, slot as u32, Timer::Connect)));
    }

    let registry = poll
        .registry()
        .try_clone()
        .map_err(|error| format!("epoll: {error}"))?;
    let mut state = LoopState {
        plan,
        live,
        window: None,
        stats: Stats::new(),
        timers,
        dirty: Vec::new(),
        registry,
        quic: match plan.protocol {
            Protocol::Quic => Some(
                crate::quic::client_config(&crate::quic::QuicOptions {
                    trust: crate::quic::Trust::Insecure,
                    server_name: "localhost".into(),
                    datagrams: true,
                })
                .map_err(|error| error.to_string())?,
            ),
            _ => None,
        },
    };
    let mut events = Events::with_capacity(1024);
    let mut ping_round = 0;
    let interval = plan.send_interval_ns();

    while shared.phase.load(Ordering::Relaxed) != PHASE_STOP {
        if state.window.is_none() {
            if let Some(&published) = shared.window.get() {
                state.window = Some(published);
                schedule_sends(plan, &mine, published, interval, &mut state.timers);
                schedule_churn(plan, &mine, &mine_churn, published, &mut state.timers);
            }
        }
        let round = shared.ping_round_at.load(Ordering::Relaxed);
        if round != 0 && round != ping_round {
            ping_round = round;
            for (slot, &index) in mine.iter().enumerate() {
                let offset = u64::from(index) * PING_ROUND_NS / u64::from(plan.clients);
                state
                    .timers
                    .push(Reverse((round + offset, slot as u32, Timer::Ping)));
            }
        }

        let now = shared.now();
        while let Some(&Reverse((due, slot, what))) = state.timers.peek() {
            if due > now {
                break;
            }
            state.timers.pop();
            let window = state.window;
            let mut ctx = state.ctx(now);
            let Some(client) = clients.get_mut(slot as usize) else {
                let churner = &mut churners[slot as usize - mine.len()];
                match what {
                    Timer::ChurnTick => {
                        churner.tick(&mut ctx);
                        reschedule_churn(plan, window, due, slot, ctx.timers);
                    }
                    Timer::ChurnDeadline => churner.deadline(&mut ctx, due),
                    _ => {}
                }
                continue;
            };
            match what {
                Timer::Connect => client.connect(&mut ctx, due),
                Timer::Send => {
                    client.scheduled(&mut ctx, due);
                    let next = due.saturating_add(interval);
                    if window.is_some_and(|w| next < w.send_until) {
                        ctx.timers.push(Reverse((next, slot, Timer::Send)));
                    }
                }
                Timer::Drop => {
                    let jitter = plan.storm.map_or(0, |storm| storm.jitter_ns);
                    client.storm_drop(&mut ctx, jitter);
                }
                Timer::Ping => client.ping(&mut ctx),
                Timer::Quic => client.quic_timer(&mut ctx, due),
                Timer::ChurnTick => {
                    if let (Some(w), Some(churn)) = (window, plan.churn) {
                        client.churn_tick(&mut ctx, (due - w.send_from) / churn.every_ns);
                    }
                    reschedule_churn(plan, window, due, slot, ctx.timers);
                }
                Timer::StallEnd => client.stall_end(&mut ctx),
                Timer::ChurnDeadline => {}
            }
        }
        state.flush(&mut clients, shared.now());

        if let Some(&Reverse((due, _, _))) = state.timers.peek() {
            let wait = due.saturating_sub(shared.now());
            if wait < POLL_MAX.as_nanos() as u64 {
                timer
                    .arm(wait.max(1))
                    .map_err(|e| format!("timerfd: {e}"))?;
            }
        }
        match poll.poll(&mut events, Some(POLL_MAX)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("epoll_wait: {error}")),
        }
        let now = shared.now();
        for event in events.iter() {
            if event.token() == TIMER_TOKEN {
                timer.clear();
                continue;
            }
            let token = event.token().0;
            if let Some(client) = clients.get_mut(token) {
                client.on_event(&mut state.ctx(now));
            } else if let Some(churner) = token
                .checked_sub(clients.len())
                .and_then(|i| churners.get_mut(i))
            {
                churner.on_event(&mut state.ctx(now));
            }
        }
        state.flush(&mut clients, shared.now());
    }
    // QUIC has no FIN a process exit sends for it: close each session, or the server
    // keeps it until its idle timeout.
    for client in &mut clients {
        client.end_quic_session();
    }
    Ok(WorkerResult {
        stats: state.stats,
        outcomes: clients.iter().map(Client::outcome).collect(),
        figures: BTreeMap::new(),
        error: None,
    })
}

/// What a worker's loop keeps besides its clients: lent to each handler as a `Ctx`.
struct LoopState<'a> {
    plan: &'a Plan,
    live: &'a Live,
    window: Option<Window>,
    stats: Stats,
    timers: Timers,
    /// Slots with unflushed writes.
    dirty: Vec<u32>,
    registry: Registry,
    /// quiche's client configuration (one per worker: it holds a TLS context).
    quic: Option<quiche::Config>,
}

impl LoopState<'_> {
    fn ctx(&mut self, now: u64) -> Ctx<'_> {
        Ctx {
            now,
            plan: self.plan,
            window: self.window,
            stats: &mut self.stats,
            live: self.live,
            timers: &mut self.timers,
            registry: &self.registry,
            dirty: &mut self.dirty,
            quic: self.quic.as_mut(),
        }
    }

    /// Write out every client that has buffered writes this turn.
    fn flush(&mut self, clients: &mut [Client], now: u64) {
        let mut slots = std::mem::take(&mut self.dirty);
        for &slot in &slots {
            clients[slot as usize].flush(&mut self.ctx(now));
        }
        slots.clear();
        if self.dirty.is_empty() {
            // Keep the allocation for the next turn.
            self.dirty = slots;
        }
    }
}

/// Schedule every sender's first send (spread evenly over one interval, so senders
/// do not fire together) and the storm's drops.
fn schedule_sends(plan: &Plan, mine: &[u32], window: Window, interval: u64, timers: &mut Timers) {
    let senders = u64::from(plan.senders().max(1));
    for (slot, &index) in mine.iter().enumerate() {
        if plan.is_sender(index) && interval != u64::MAX {
            let phase = u64::from(index) % senders * interval / senders;
            let first = window.send_from + phase;
            if first < window.send_until {
                timers.push(Reverse((first, slot as u32, Timer::Send)));
            }
        }
        if let Some(storm) = plan.storm {
            if plan.storm_drops(index) {
                let at = window.send_from + storm.at_ns;
                timers.push(Reverse((at, slot as u32, Timer::Drop)));
            }
        }
    }
}

/// The churn's first period for each client it touches: chat clients (reconnect storms,
/// slow readers) from one period into sending, churn sessions from the start; each spread
/// over the period by its index.
fn schedule_churn(
    plan: &Plan,
    mine: &[u32],
    churn_mine: &[u32],
    window: Window,
    timers: &mut Timers,
) {
    let Some(churn) = plan.churn else {
        return;
    };
    for (slot, &index) in mine.iter().enumerate() {
        if churn.reconnect > 0.0 || plan.is_slow_reader(index) {
            let phase = u64::from(index) * churn.every_ns / u64::from(plan.clients.max(1));
            let at = window.send_from + churn.every_ns + phase;
            if at < window.send_until {
                timers.push(Reverse((at, slot as u32, Timer::ChurnTick)));
            }
        }
    }
    let sessions = u64::from(churn.sessions().max(1));
    for (i, &index) in churn_mine.iter().enumerate() {
        let phase = u64::from(index) * churn.every_ns / sessions;
        let at = window.send_from + phase;
        if at < window.send_until {
            timers.push(Reverse((at, (mine.len() + i) as u32, Timer::ChurnTick)));
        }
    }
}

/// The next period of a churn tick that fired at `due`, while sending lasts.
fn reschedule_churn(plan: &Plan, window: Option<Window>, due: u64, slot: u32, timers: &mut Timers) {
    let (Some(window), Some(churn)) = (window, plan.churn) else {
        return;
    };
    let next = due.saturating_add(churn.every_ns);
    if next < window.send_until {
        timers.push(Reverse((next, slot, Timer::ChurnTick)));
    }
}

pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0, ..)
    // applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A monotonic one-shot timer with nanosecond resolution that epoll can wait on.
pub(crate) struct TimerFd {
    pub(crate) fd: OwnedFd,
}

impl TimerFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(TimerFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fire once, `nanos` from now.
    pub(crate) fn arm(&self, nanos: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (nanos / 1_000_000_000) as libc::time_t,
                tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid descriptor and a fully initialised itimerspec.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consume the expiration so the next one wakes epoll again.
    pub(crate) fn clear(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer; EAGAIN is fine.
        unsafe {
            libc::read(self.fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8);
        }
    }
}
