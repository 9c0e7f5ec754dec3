//! A whole run: start the workers, walk them through setup, sending and drain while
//! printing progress, then merge what they measured, verify delivery and build the
//! report.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::{Outcome, Window};
use super::report::{
    Connections, GeneratorUsage, LatencySummary, Report, Second, ServerUsage, Stop, Throughput,
    Verification,
};
use super::scenario::{Engine, EngineChoice, Kind, Plan, Role};
use super::stats::{sum, Live, Stats};
use super::stop;
use super::uring;
use super::worker::{self, Shared, PHASE_STOP};

/// How a run is paced.
pub struct Options {
    pub plan: Plan,
    pub workers: usize,
    pub pin: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// Longest wait for every session to be set up.
    pub setup_timeout: Duration,
    /// Longest wait, after the last send, for every answer and delivery.
    pub drain_timeout: Duration,
    /// Idle: how long to hold the sessions after the ping round.
    pub hold: Duration,
    pub pid: Option<u32>,
    /// The command line, for the report.
    pub params: BTreeMap<String, String>,
    /// Print the progress line (and the engine chosen) to stderr.
    pub progress: bool,
    /// `--engine`: the client socket engine.
    pub engine: EngineChoice,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(50);

/// The engine the run uses, and why (for the line on stderr).
pub fn choose_engine(plan: &Plan, choice: EngineChoice) -> Result<(Engine, String), String> {
    const URING: &str = "io_uring, direct descriptors";
    match choice {
        EngineChoice::Epoll => Ok((Engine::Epoll, "--engine epoll".into())),
        EngineChoice::Uring => {
            uring::serves(plan).map_err(|why| format!("--engine uring: {why}"))?;
            uring::probe()
                .map_err(|why| format!("--engine uring: io_uring is not usable here: {why}"))?;
            Ok((Engine::Uring, URING.into()))
        }
        EngineChoice::Auto => match uring::serves(plan).and_then(|()| uring::probe()) {
            Ok(()) => Ok((Engine::Uring, URING.into())),
            Err(why) => Ok((Engine::Epoll, why)),
        },
    }
}

/// Run the plan. An `Err` is a run refused before it started (a plan that cannot run, an
/// unusable engine, an unreadable --pid); once the workers start, a report always comes
/// back, whatever ends the run (its `stop` says what).
pub fn run(mut options: Options) -> Result<Report, String> {
    options.plan.validate()?;
    let (engine, why) = choose_engine(&options.plan, options.engine)?;
    if options.progress {
        eprintln!("parley-load: engine {} ({why})", engine.name());
    }
    options
        .params
        .insert("engine".into(), engine.name().to_string());
    let own_rss_start = memory_kib(std::process::id()).unwrap_or(0);
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rss_before = options.pid.map(memory_kib).transpose()?;
    stop::install()?;
    let workers = options.workers.max(1);
    let shared = Arc::new(Shared {
        plan: options.plan.clone(),
        workers,
        engine,
        epoch: Instant::now(),
        lives: (0..workers).map(|_| Live::default()).collect(),
        phase: AtomicU8::new(worker::PHASE_RUN),
        window: OnceLock::new(),
        ping_round_at: AtomicU64::new(0),
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::with_capacity(workers);
    let mut ended: Option<Stop> = None;
    for index in 0..workers {
        let worker_shared = Arc::clone(&shared);
        let cpu = options.pin.then_some(index % cpus);
        match std::thread::Builder::new()
            .name(format!("load-{index}"))
            .spawn(move || worker::run(worker_shared, index, cpu))
        {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                // The workers already started are stopped and reported below.
                ended = Some(stopped(
                    &shared,
                    "error",
                    format!("spawn worker {index}: {error}"),
                    "setup",
                ));
                break;
            }
        }
    }

    let mut progress = Progress::new(&shared, options.progress);
    let plan = &options.plan;
    let clients = u64::from(plan.clients);
    let watch = Watch {
        shared: &shared,
        handles: &handles,
    };

    // Setup: connect, authenticate, create conversations.
    let setup_deadline = Instant::now() + options.setup_timeout;
    while ended.is_none() && sum(&shared.lives, |l| &l.ready) < clients {
        if let Some(stop) = watch.interrupted("setup") {
            ended = Some(stop);
            break;
        }
        if Instant::now() >= setup_deadline {
            let ready = sum(&shared.lives, |l| &l.ready);
            let detail = format!("{ready} of {clients} sessions set up within --setup-timeout");
            ended = Some(stopped(&shared, "setup_timeout", detail, "setup"));
            break;
        }
        progress.tick("setup");
        std::thread::sleep(Duration::from_millis(2));
    }
    let setup_s = (shared.now().saturating_sub(worker::SETUP_START_NS)) as f64 / 1e9;
    let established = sum(&shared.lives, |l| &l.ready);
    // Not the end: what to say if nothing stops the run later.
    let mut late: Option<Stop> = None;

    let mut extra = BTreeMap::new();
    let mut cpu_window = (0.0, 0.0);
    let mut ping_round = None;
    if ended.is_some() {
        // Setup did not finish: nothing meaningful can be measured; report what happened.
    } else if plan.kind == Kind::Idle {
        let round = shared.now() + 10_000_000;
        shared.ping_round_at.store(round, Ordering::Relaxed);
        // Over when the round has reached every session and every ping is answered. A
        // worker that a busy machine starves may reach its last sessions well after the
        // round's nominal second: the clock alone would end the round without them.
        let waited = wait_until(
            &watch,
            &mut progress,
            "ping round",
            options.drain_timeout,
            |s| sum(&s.lives, |l| &l.pinged) >= clients && sum(&s.lives, |l| &l.outstanding) == 0,
        );
        let complete = waited == Waited::Done;
        ping_round = Some(PingRound {
            complete,
            reached: sum(&shared.lives, |l| &l.pinged),
            answered: 0,
        });
        extra.insert("ping_round_complete".into(), f64::from(u8::from(complete)));
        match waited {
            Waited::Stopped(stop) => ended = Some(stop),
            Waited::TimedOut => {
                let detail = "pings unanswered at --drain-timeout".to_string();
                late = Some(stopped(&shared, "ping_round_timeout", detail, "ping round"));
            }
            Waited::Done => {}
        }
        let hold_until = Instant::now() + options.hold;
        while ended.is_none() && Instant::now() < hold_until {
            if let Some(stop) = watch.interrupted("hold") {
                ended = Some(stop);
                break;
            }
            progress.tick("hold");
            std::thread::sleep(TICK);
        }
    } else {
        let send_from = shared.now() + 50_000_000;
        let measure_from = send_from + options.warmup.as_nanos() as u64;
        let window = Window {
            send_from,
            measure_from,
            send_until: measure_from + options.duration.as_nanos() as u64,
        };
        let _ = shared.window.set(window);
        ended = sleep_until(&watch, &mut progress, window.measure_from, "warm-up");
        let cpu_start = (own_cpu_s(), options.pid.map(process_cpu_s));
        if ended.is_none() {
            ended = sleep_until(&watch, &mut progress, window.send_until, "measure");
        }
        let cpu_end = (own_cpu_s(), options.pid.map(process_cpu_s));
        cpu_window = (
            cpu_end.0 - cpu_start.0,
            match (cpu_start.1, cpu_end.1) {
                (Some(Ok(a)), Some(Ok(b))) => b - a,
                _ => 0.0,
            },
        );
        if ended.is_none() {
            let waited = wait_until(&watch, &mut progress, "drain", options.drain_timeout, |s| {
                sum(&s.lives, |l| &l.outstanding) == 0
                    && sum(&s.lives, |l| &l.delivered) >= sum(&s.lives, |l| &l.owed)
                    && sum(&s.lives, |l| &l.resuming) == 0
                    && sum(&s.lives, |l| &l.churning) == 0
            });
            extra.insert(
                "drained".into(),
                f64::from(u8::from(waited == Waited::Done)),
            );
            match waited {
                Waited::Stopped(stop) => ended = Some(stop),
                Waited::TimedOut => {
                    let detail =
                        "answers or deliveries still missing at --drain-timeout".to_string();
                    late = Some(stopped(&shared, "drain_timeout", detail, "drain"));
                }
                Waited::Done => {}
            }
        } else {
            extra.insert("drained".into(), 0.0);
        }
    }
    // The target may be gone (it crashed: that may be why the run ended): no figure then.
    let rss_after = options.pid.and_then(|pid| memory_kib(pid).ok());
    // The generator's own memory while it still holds every session.
    let own_rss_held = memory_kib(std::process::id()).unwrap_or(0);

    shared.phase.store(PHASE_STOP, Ordering::Relaxed);
    let mut stats = Stats::new();
    let mut outcomes = Vec::with_capacity(plan.clients as usize);
    let mut figures: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut worker_errors = Vec::new();
    for (index, handle) in handles.into_iter().enumerate() {
        let result = match handle.join() {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => {
                worker_errors.push(format!("worker {index}: {error}"));
                continue;
            }
            Err(_) => {
                worker_errors.push(format!("worker {index} panicked"));
                continue;
            }
        };
        if let Some(error) = &result.error {
            worker_errors.push(format!("worker {index}: {error}"));
        }
        stats.merge(result.stats);
        outcomes.extend(result.outcomes);
        for (name, value) in result.figures {
            *figures.entry(name).or_default() += value;
        }
    }
    let mut stop = ended
        .or(late)
        .unwrap_or_else(|| stopped(&shared, "completed", String::new(), "done"));
    if !worker_errors.is_empty() {
        // A worker that failed is the cause, whatever the main thread saw of it.
        if !matches!(stop.reason.as_str(), "signal" | "error") {
            stop.reason = "worker_failed".into();
        }
        let detail = worker_errors.join("; ");
        stop.detail = match stop.detail.is_empty() {
            true => detail,
            false => format!("{}; {detail}", stop.detail),
        };
    }
    for (name, value) in figures {
        extra.insert(name.into(), value);
    }
    extra.insert("generator_rss_kib_held".into(), own_rss_held as f64);
    if established > 0 {
        extra.insert(
            "generator_rss_bytes_per_session".into(),
            own_rss_held.saturating_sub(own_rss_start) as f64 * 1024.0 / established as f64,
        );
    }
    progress.finish();

    if let Some(round) = ping_round.as_mut() {
        round.answered = stats.latencies.get("ping").map_or(0, |h| h.len());
    }
    let mut verification = verify(plan, &outcomes, established == clients, ping_round);
    if !matches!(
        stop.reason.as_str(),
        "completed" | "setup_timeout" | "ping_round_timeout" | "drain_timeout"
    ) {
        // Said in the verification too, which a reader checks first.
        verification.ok = false;
        verification.detail.insert(
            0,
            format!("the run ended early ({}): {}", stop.reason, stop.detail),
        );
    }
    if plan.churn.is_some() {
        super::churn::report(&stats.churn, &mut extra, &mut verification);
    }
    let measured_s = if plan.kind == Kind::Idle {
        0.0
    } else {
        options.duration.as_secs_f64()
    };
    let per_s = |n: u64| {
        if measured_s > 0.0 {
            n as f64 / measured_s
        } else {
            0.0
        }
    };
    if plan.storm.is_some() {
        // What the storm did, not what the plan asked of it.
        extra.insert("storm_dropped".into(), stats.storm_dropped as f64);
    }
    if plan.kind != Kind::Idle {
        extra.insert("scheduled_in_window".into(), stats.scheduled as f64);
        extra.insert("done_in_window".into(), stats.done as f64);
        extra.insert("skipped_in_window".into(), stats.skipped as f64);
    }
    if let Some(storm) = stats.latencies.get("storm_resume") {
        extra.insert("storm_resumed".into(), storm.len() as f64);
        extra.insert("storm_all_resumed_s".into(), storm.max() as f64 / 1e9);
    }
    if plan.kind == Kind::Idle && setup_s > 0.0 {
        extra.insert("connect_per_s".into(), established as f64 / setup_s);
    }
    let server = match (options.pid, rss_before, rss_after) {
        (Some(pid), Some(before), Some(after)) => Some(ServerUsage {
            pid,
            rss_kib_before: before,
            rss_kib_after: after,
            rss_bytes_per_session: (after as f64 - before as f64) * 1024.0
                / (established.max(1) as f64),
            cpu_s: cpu_window.1,
        }),
        _ => None,
    };
    Ok(Report {
        scenario: plan.kind.name().to_string(),
        params: options.params,
        started_unix_s,
        host: host_facts(),
        connections: Connections {
            target: clients,
            established,
            failed_attempts: stats.failed_connects,
            sources: u64::from(plan.sources),
            setup_s,
        },
        measured_s,
        throughput: Throughput {
            offered_per_s: per_s(stats.scheduled),
            sent_per_s: per_s(stats.sent),
            acked_per_s: per_s(stats.acked),
            delivered_per_s: per_s(stats.delivered),
            replies_per_s: per_s(stats.replies),
        },
        latencies: stats
            .latencies
            .iter()
            .map(|(name, histogram)| LatencySummary::from_histogram(name, histogram))
            .collect(),
        timeline: stats
            .timeline
            .iter()
            .enumerate()
            .map(|(t, second)| Second {
                t: t as u64,
                sent: second.sent,
                acked: second.acked,
                delivered: second.delivered,
                errors: second.errors,
                p50_us: second.latency.value_at_quantile(0.5) as f64 / 1000.0,
                p99_us: second.latency.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect(),
        errors: stats.errors,
        verification,
        server,
        generator: GeneratorUsage {
            workers: workers as u64,
            cpu_s: cpu_window.0,
            rss_kib: memory_kib(std::process::id()).unwrap_or(0),
        },
        extra,
        stop,
    })
}

/// Every acknowledged message reached every other member, with no gaps and in order.
/// What the idle scenario's ping round achieved.
#[derive(Clone, Copy, Debug)]
struct PingRound {
    /// Every session was reached and every ping answered within the drain timeout.
    complete: bool,
    /// Sessions the round reached (pinged, or found not open).
    reached: u64,
    /// Pings answered (the `ping` latencies recorded).
    answered: u64,
}

fn verify(
    plan: &Plan,
    outcomes: &[Outcome],
    all_ready: bool,
    ping_round: Option<PingRound>,
) -> Verification {
    if plan.kind == Kind::Idle {
        let sessions = outcomes.len();
        let mut detail = Vec::new();
        if !all_ready {
            let unready = outcomes.iter().filter(|o| !o.ready).count();
            detail.push(format!(
                "{unready} of {sessions} sessions were never set up"
            ));
        }
        match ping_round {
            Some(round) if !round.complete => detail.push(format!(
                "the ping round did not finish within the drain timeout: it reached {} of {sessions} sessions, {} answered",
                round.reached, round.answered
            )),
            Some(round) if round.answered < sessions as u64 => detail.push(format!(
                "{} of {sessions} sessions answered the ping round",
                round.answered
            )),
            _ => {}
        }
        return Verification {
            checked: true,
            ok: detail.is_empty(),
            detail,
            ..Verification::default()
        };
    }
    let by_client: HashMap<u32, &Outcome> = outcomes.iter().map(|o| (o.client, o)).collect();
    let mut verification = Verification {
        checked: true,
        ..Verification::default()
    };
    let note = |verification: &mut Verification, line: String| {
        if verification.detail.len() < 20 {
            verification.detail.push(line);
        }
    };
    if !all_ready {
        let unready = outcomes.iter().filter(|o| !o.ready).count();
        note(
            &mut verification,
            format!("{unready} of {} sessions were never set up", outcomes.len()),
        );
    }
    for sender in outcomes.iter().filter(|o| o.acked > 0) {
        let recipients: Vec<u32> = match plan.role(sender.client) {
            Role::Pair { partner } => vec![partner],
            Role::Group { first, size } => (first..first + size)
                .filter(|&m| m != sender.client)
                .collect(),
            Role::Idle => Vec::new(),
        };
        for recipient in recipients {
            let got = by_client
                .get(&recipient)
                .and_then(|o| o.from.get(&sender.client))
                .copied()
                .unwrap_or(0);
            if got < sender.acked {
                verification.missing += sender.acked - got;
                note(
                    &mut verification,
                    format!(
                        "client {recipient} received {got} of the {} messages client {} had acknowledged",
                        sender.acked, sender.client
                    ),
                );
            }
        }
    }
    let mut gaps = 0;
    for outcome in outcomes {
        verification.duplicates += outcome.duplicates;
        verification.out_of_order += outcome.out_of_order;
        gaps += outcome.gaps;
        if outcome.gaps > 0 {
            // What is lost is counted per sender above; this says where.
            note(
                &mut verification,
                format!(
                    "client {} holds {} messages above a gap in its conversation",
                    outcome.client, outcome.gaps
                ),
            );
        }
        if outcome.out_of_order > 0 {
            note(
                &mut verification,
                format!(
                    "client {} received {} messages out of order",
                    outcome.client, outcome.out_of_order
                ),
            );
        }
    }
    verification.ok =
        all_ready && verification.missing == 0 && verification.out_of_order == 0 && gaps == 0;
    verification
}

/// What ends a run early, looked at between the main thread's waits: a signal, or a
/// worker that stopped before it was told to (an error or a panic; its own report comes
/// when it is joined).
struct Watch<'a> {
    shared: &'a Shared,
    handles: &'a [std::thread::JoinHandle<Result<worker::WorkerResult, String>>],
}

impl Watch<'_> {
    fn interrupted(&self, phase: &str) -> Option<Stop> {
        if let Some(signal) = stop::received() {
            return Some(stopped(self.shared, "signal", stop::name(signal), phase));
        }
        let gone = self.handles.iter().position(|h| h.is_finished())?;
        let detail = format!("worker {gone} stopped on its own");
        Some(stopped(self.shared, "worker_failed", detail, phase))
    }
}

/// A stop now, in `phase`.
fn stopped(shared: &Shared, reason: &str, detail: String, phase: &str) -> Stop {
    Stop {
        reason: reason.into(),
        detail,
        phase: phase.into(),
        at_s: shared.epoch.elapsed().as_secs_f64(),
    }
}

#[derive(Debug, PartialEq)]
enum Waited {
    Done,
    TimedOut,
    Stopped(Stop),
}

/// Wait until `done`, `timeout` or an interruption.
fn wait_until(
    watch: &Watch,
    progress: &mut Progress,
    phase: &str,
    timeout: Duration,
    done: impl Fn(&Shared) -> bool,
) -> Waited {
    let deadline = Instant::now() + timeout;
    loop {
        if done(watch.shared) {
            return Waited::Done;
        }
        if let Some(stop) = watch.interrupted(phase) {
            return Waited::Stopped(stop);
        }
        if Instant::now() >= deadline {
            return Waited::TimedOut;
        }
        progress.tick(phase);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sleep until `at_ns` of the run, unless interrupted first.
fn sleep_until(watch: &Watch, progress: &mut Progress, at_ns: u64, phase: &str) -> Option<Stop> {
    loop {
        let now = watch.shared.now();
        if now >= at_ns {
            return None;
        }
        if let Some(stop) = watch.interrupted(phase) {
            return Some(stop);
        }
        progress.tick(phase);
        std::thread::sleep(Duration::from_nanos(at_ns - now).min(TICK));
    }
}

/// The live progress line: one per second, on stderr.
struct Progress<'a> {
    shared: &'a Shared,
    enabled: bool,
    last: Instant,
    last_counts: [u64; 4],
}

impl<'a> Progress<'a> {
    fn new(shared: &'a Shared, enabled: bool) -> Self {
        Progress {
            shared,
            enabled,
            last: Instant::now(),
            last_counts: [0; 4],
        }
    }

    fn counts(&self) -> [u64; 4] {
        let lives = &self.shared.lives;
        [
            sum(lives, |l| &l.sent),
            sum(lives, |l| &l.acked),
            sum(lives, |l| &l.delivered),
            sum(lives, |l| &l.errors),
        ]
    }

    fn tick(&mut self, phase: &str) {
        let elapsed = self.last.elapsed();
        if !self.enabled || elapsed < PROGRESS_EVERY {
            return;
        }
        let counts = self.counts();
        let rate = |i: usize| (counts[i] - self.last_counts[i]) as f64 / elapsed.as_secs_f64();
        let lives = &self.shared.lives;
        eprintln!(
            "[{:7.1}s] {phase:<10} ready {}/{}  sent {:.0}/s  acked {:.0}/s  delivered {:.0}/s  errors {}  outstanding {}  resuming {}",
            self.shared.epoch.elapsed().as_secs_f64(),
            sum(lives, |l| &l.ready),
            self.shared.plan.clients,
            rate(0),
            rate(1),
            rate(2),
            counts[3],
            sum(lives, |l| &l.outstanding),
            sum(lives, |l| &l.resuming),
        );
        self.last = Instant::now();
        self.last_counts = counts;
    }

    fn finish(&mut self) {
        if self.enabled {
            eprintln!("[{:7.1}s] done", self.shared.epoch.elapsed().as_secs_f64());
        }
    }
}

/// Resident memory of a process, in KiB, from /proc/PID/status.
pub fn memory_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|error| format!("/proc/{pid}/status: {error}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))
}

/// User + system CPU seconds of a process, from /proc/PID/stat.
fn process_cpu_s(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|error| format!("/proc/{pid}/stat: {error}"))?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) / hz),
        _ => Err(format!("/proc/{pid}/stat: unexpected format")),
    }
}

/// This process's user + system CPU seconds.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn host_facts() -> BTreeMap<String, String> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut host = BTreeMap::new();
    host.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    host.insert("kernel".into(), read("/proc/sys/kernel/osrelease"));
    host.insert("hostname".into(), read("/proc/sys/kernel/hostname"));
    host
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::load::scenario::{Mix, Protocol};

    fn plan(kind: Kind, clients: u32) -> Plan {
        Plan {
            kind,
            protocol: Protocol::Parley,
            tag: "t".into(),
            clients,
            target: "127.0.0.1:1".parse().unwrap(),
            sources: 1,
            connect_rate: 1000.0,
            message_size: 64,
            rate: 100.0,
            max_inflight: 16,
            group_size: 4,
            senders_per_group: 1,
            mix: Mix {
                send: 1,
                ack: 0,
                read: 0,
                typing: 0,
                history: 0,
            },
            storm: None,
            churn: None,
            secret: "s".into(),
        }
    }

    /// A ready client that had `acked` sends acknowledged and received `from`.
    fn outcome(client: u32, acked: u64, from: &[(u32, u64)]) -> Outcome {
        Outcome {
            client,
            acked,
            from: from.iter().copied().collect::<HashMap<_, _>>(),
            gaps: 0,
            duplicates: 0,
            out_of_order: 0,
            ready: true,
        }
    }

    /// Two pairs (0-1, 2-3) where everyone received everything the partner had acked.
    fn pairs_all_delivered() -> Vec<Outcome> {
        vec![
            outcome(0, 10, &[(1, 7)]),
            outcome(1, 7, &[(0, 10)]),
            outcome(2, 5, &[(3, 5)]),
            outcome(3, 5, &[(2, 5)]),
        ]
    }

    #[test]
    fn everything_delivered_is_ok() {
        let v = verify(&plan(Kind::OneToOne, 4), &pairs_all_delivered(), true, None);
        assert!(v.checked && v.ok, "{v:?}");
        assert_eq!((v.missing, v.out_of_order, v.duplicates), (0, 0, 0));
        assert!(v.detail.is_empty(), "{:?}", v.detail);
    }

    #[test]
    fn duplicates_are_counted_but_do_not_fail() {
        let mut outcomes = pairs_all_delivered();
        outcomes[1].duplicates = 2;
        outcomes[2].duplicates = 1;
        let v = verify(&plan(Kind::ReconnectStorm, 4), &outcomes, true, None);
        assert!(v.ok, "{v:?}");
        assert_eq!(v.duplicates, 3);
    }

    #[test]
    fn a_recipient_short_of_three_messages_is_missing_three() {
        let mut outcomes = pairs_all_delivered();
        // Client 3 got only 2 of client 2's 5 acknowledged messages.
        outcomes[3].from.insert(2, 2);
        let v = verify(&plan(Kind::OneToOne, 4), &outcomes, true, None);
        assert!(v.checked && !v.ok, "{v:?}");
        assert_eq!(v.missing, 3);
        assert!(
            v.detail
                .iter()
                .any(|line| line.contains("client 3") && line.contains("client 2")),
            "{:?}",
            v.detail
        );
    }

    #[test]
    fn a_recipient_that_got_nothing_misses_everything() {
        let mut outcomes = pairs_all_delivered();
        outcomes[0].from.clear();
        let v = verify(&plan(Kind::Mixed, 4), &outcomes, true, None);
        assert!(!v.ok);
        assert_eq!(v.missing, 7);
    }

    #[test]
    fn a_gap_fails_the_run_without_counting_held_messages_as_missing() {
        let mut outcomes = pairs_all_delivered();
        outcomes[1].gaps = 2;
        let v = verify(&plan(Kind::OneToOne, 4), &outcomes, true, None);
        assert!(!v.ok, "{v:?}");
        // The two seqs above the gap were received; what is lost is counted per sender.
        assert_eq!(v.missing, 0);
        assert!(
            v.detail
                .iter()
                .any(|line| line.contains("client 1") && line.contains("gap")),
            "{:?}",
            v.detail
        );
    }

    #[test]
    fn out_of_order_fails_without_anything_missing() {
        let mut outcomes = pairs_all_delivered();
        outcomes[2].out_of_order = 1;
        let v = verify(&plan(Kind::OneToOne, 4), &outcomes, true, None);
        assert!(v.checked && !v.ok, "{v:?}");
        assert_eq!((v.missing, v.out_of_order), (0, 1));
        assert!(
            v.detail.iter().any(|line| line.contains("out of order")),
            "{:?}",
            v.detail
        );
    }

    #[test]
    fn a_client_never_set_up_fails() {
        // Client 3 never became ready; nobody sent anything, so nothing is missing.
        let mut outcomes = vec![
            outcome(0, 0, &[]),
            outcome(1, 0, &[]),
            outcome(2, 0, &[]),
            outcome(3, 0, &[]),
        ];
        outcomes[3].ready = false;
        let v = verify(&plan(Kind::OneToOne, 4), &outcomes, false, None);
        assert!(v.checked && !v.ok, "{v:?}");
        assert_eq!(v.missing, 0);
        assert!(
            v.detail
                .iter()
                .any(|line| line.contains("1 of 4 sessions were never set up")),
            "{:?}",
            v.detail
        );
    }

    #[test]
    fn idle_passes_only_when_the_ping_round_reached_and_heard_from_everyone() {
        let idle = plan(Kind::Idle, 4);
        let outcomes: Vec<Outcome> = (0..4).map(|c| outcome(c, 0, &[])).collect();
        let round = |complete, reached, answered| {
            Some(PingRound {
                complete,
                reached,
                answered,
            })
        };
        let v = verify(&idle, &outcomes, true, round(true, 4, 4));
        assert!(v.checked && v.ok, "{v:?}");
        // The round ended (clock or drain timeout) before reaching every session.
        let v = verify(&idle, &outcomes, true, round(false, 3, 3));
        assert!(!v.ok, "{v:?}");
        assert_eq!(
            v.detail,
            ["the ping round did not finish within the drain timeout: it reached 3 of 4 sessions, 3 answered"]
        );
        // Reached everyone, but one session was not open to be pinged.
        let v = verify(&idle, &outcomes, true, round(true, 4, 3));
        assert!(!v.ok, "{v:?}");
        assert_eq!(v.detail, ["3 of 4 sessions answered the ping round"]);
    }

    #[test]
    fn group_members_each_owe_every_other_members_messages() {
        // One group of 4; client 0 sends 6, client 1 sends 2 (senders_per_group aside:
        // whoever had acks is checked).
        let mut outcomes = vec![
            outcome(0, 6, &[(1, 2)]),
            outcome(1, 2, &[(0, 6)]),
            outcome(2, 0, &[(0, 6), (1, 2)]),
            outcome(3, 0, &[(0, 6), (1, 2)]),
        ];
        let group = plan(Kind::Group, 4);
        let v = verify(&group, &outcomes, true, None);
        assert!(v.ok, "{v:?}");
        // Client 3 lost one of client 0's and both of client 1's.
        outcomes[3].from.insert(0, 5);
        outcomes[3].from.remove(&1);
        let v = verify(&group, &outcomes, true, None);
        assert!(!v.ok);
        assert_eq!(v.missing, 3);
    }

    #[test]
    fn idle_is_checked_only_for_its_sessions() {
        let mut outcomes = vec![outcome(0, 0, &[]), outcome(1, 0, &[])];
        let round = Some(PingRound {
            complete: true,
            reached: 2,
            answered: 2,
        });
        let v = verify(&plan(Kind::Idle, 2), &outcomes, true, round);
        assert!(v.checked && v.ok, "{v:?}");
        outcomes[1].ready = false;
        // Setup failed: no ping round ran.
        let v = verify(&plan(Kind::Idle, 2), &outcomes, false, None);
        assert!(v.checked && !v.ok, "{v:?}");
        assert_eq!(v.detail, ["1 of 2 sessions were never set up"]);
    }
}
