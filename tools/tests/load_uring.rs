//! `parley-load`'s io_uring engine (`--engine uring`) against a real `parleyd`, and the
//! engine choice around it.
//!
//! The harness is tests/load.rs's: each test starts its own daemon (two shards, a
//! temporary data dir, ports picked by the kernel), runs the real binary with
//! `--json --quiet`, and checks what the report says. Every child process has a bounded
//! wait, and the daemon is killed when its test ends, pass or fail.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use parley_tools::load::report::{LatencySummary, Report};

/// parleyd listens within a second or so; past this it is broken, not slow.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Longest a parley-load run may take before it is killed and its test fails.
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Setup and drain bounds for the runs that are expected to work: short enough that a
/// broken run still ends (with a report to show) well inside RUN_LIMIT.
const SETUP_TIMEOUT: &str = "30s";
const DRAIN_TIMEOUT: &str = "15s";
/// Lines of the daemon's log kept for failure messages.
const LOG_KEEP: usize = 200;
/// Sessions of the io_uring run: well past what a test needs to see every path many
/// times, below the ~20,000 descriptors the daemon itself may hold.
const URING_SESSIONS: u64 = 3000;

/// parleyd sits beside this package's binaries in the workspace's target directory.
fn parleyd_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_parley")).with_file_name("parleyd");
    assert!(
        path.exists(),
        "{} is missing: run cargo build -p parley-gateway",
        path.display()
    );
    path
}

/// Children start from a clean slate: no PARLEY_* setting of the caller's.
fn scrubbed(program: impl Into<PathBuf>) -> Command {
    let mut command = Command::new(program.into());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PARLEY_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// A running parleyd, killed on drop.
struct Parleyd {
    child: Child,
    ws: SocketAddr,
    data_dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl Parleyd {
    /// Start two shards on kernel-picked ports and wait for the "listening" line (logged
    /// once every shard serves and the data dir's JWT secret exists).
    fn start() -> Parleyd {
        Parleyd::start_with(&[])
    }

    /// As `start`, with more daemon flags.
    fn start_with(flags: &[&str]) -> Parleyd {
        Parleyd::launch(flags, None)
    }

    /// As `start_with`, in a process allowed only `descriptors` open files.
    fn start_limited(flags: &[&str], descriptors: u64) -> Parleyd {
        Parleyd::launch(flags, Some(descriptors))
    }

    fn launch(flags: &[&str], descriptor_limit: Option<u64>) -> Parleyd {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut command = scrubbed(parleyd_path());
        if let Some(limit) = descriptor_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir.path())
            .args([
                "--shards",
                "2",
                "--ws-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn parleyd");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            // Keep reading to the end so the daemon never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(ws) = listening(&line) {
                        let _ = tx.send(ws);
                    }
                    let mut log = log.lock().unwrap();
                    if log.len() == LOG_KEEP {
                        log.remove(0);
                    }
                    log.push(line);
                }
            });
        }
        // The guard exists before the wait, so a failed start still kills the child.
        let mut daemon = Parleyd {
            child,
            ws: SocketAddr::from(([0, 0, 0, 0], 0)),
            data_dir,
            log,
        };
        match rx.recv_timeout(START_LIMIT) {
            Ok(ws) => daemon.ws = ws,
            Err(_) => panic!(
                "parleyd never said it was listening; its log:\n{}",
                daemon.log_text()
            ),
        }
        daemon
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Run parley-load `scenario` against this daemon with its secret, short setup and
    /// drain bounds and `args`.
    fn load(&self, scenario: &str, args: &[&str]) -> Run {
        let mut all: Vec<String> = [
            "--target",
            &self.ws.to_string(),
            "--data-dir",
            &self.data_dir.path().display().to_string(),
            "--setup-timeout",
            SETUP_TIMEOUT,
            "--drain-timeout",
            DRAIN_TIMEOUT,
        ]
        .map(String::from)
        .to_vec();
        all.extend(args.iter().map(|s| s.to_string()));
        parley_load(scenario, &all, Some(self))
    }
}

impl Drop for Parleyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WebSocket address out of `... listening ws=A admin=B ...`.
fn listening(line: &str) -> Option<SocketAddr> {
    line.split("listening ws=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A finished parley-load run.
struct Run {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    daemon_log: Option<String>,
}

/// Run `parley-load <scenario> --json --quiet <args>`, killed (and the test failed)
/// after RUN_LIMIT.
fn parley_load(scenario: &str, args: &[String], daemon: Option<&Parleyd>) -> Run {
    let mut command = scrubbed(env!("CARGO_BIN_EXE_parley-load"));
    command
        .arg(scenario)
        .args(["--json", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("parley-load {scenario} --json --quiet {}", args.join(" "));
    let started = Instant::now();
    let child = command.spawn().expect("spawn parley-load");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("wait for parley-load"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which is not reaped yet (its waiter has
            // not returned), so the pid is still its own.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let partial = rx
                .recv_timeout(Duration::from_secs(10))
                .ok()
                .and_then(Result::ok);
            let (stdout, stderr) = partial.map_or_else(Default::default, |o| {
                (
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            });
            panic!(
                "{shown} did not finish within {RUN_LIMIT:?} and was killed\n\
                 --- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
            );
        }
    };
    Run {
        command: shown,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
        daemon_log: daemon.map(Parleyd::log_text),
    }
}

impl Run {
    /// What to show when an assertion about this run fails.
    fn context(&self) -> String {
        let mut text = format!(
            "run: {}\nexit: {} after {:.1?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.command, self.status, self.elapsed, self.stderr, self.stdout
        );
        if let Some(log) = &self.daemon_log {
            text.push_str("\n--- parleyd log ---\n");
            text.push_str(log);
        }
        text
    }

    fn report(&self) -> Report {
        match serde_json::from_str(&self.stdout) {
            Ok(report) => report,
            Err(error) => panic!("stdout is not a JSON report ({error})\n{}", self.context()),
        }
    }

    fn latency<'a>(&self, report: &'a Report, name: &str) -> &'a LatencySummary {
        match report.latencies.iter().find(|l| l.name == name) {
            Some(latency) => latency,
            None => panic!("no {name:?} latency in the report\n{}", self.context()),
        }
    }
}

/// `assert!` that shows the run's output, stderr and daemon log when it fails.
macro_rules! ensure {
    ($run:expr, $cond:expr, $($message:tt)+) => {
        assert!($cond, "{}\n{}", format!($($message)+), $run.context())
    };
}

fn engine(report: &Report) -> &str {
    report.params.get("engine").map_or("", String::as_str)
}

fn extra(report: &Report, name: &str) -> Option<f64> {
    report.extra.get(name).copied()
}

/// An idle run that set up and pinged every one of `sessions` without an error.
fn assert_idle_clean(run: &Run, report: &Report, sessions: u64) {
    ensure!(run, run.status.success(), "exit status {}", run.status);
    ensure!(
        run,
        report.scenario == "idle",
        "scenario {}",
        report.scenario
    );
    let c = &report.connections;
    ensure!(
        run,
        c.target == sessions && c.established == sessions && c.failed_attempts == 0,
        "sessions: {c:?}"
    );
    ensure!(run, report.errors.is_empty(), "errors: {:?}", report.errors);
    for name in ["connect", "setup", "ping"] {
        let latency = run.latency(report, name);
        ensure!(
            run,
            latency.count == sessions && latency.p50_us > 0.0,
            "one {name} per session: {latency:?}"
        );
    }
    ensure!(
        run,
        report.verification.checked && report.verification.ok,
        "verification: {:?}",
        report.verification
    );
}

#[test]
fn idle_on_io_uring_sets_up_and_pings_every_session() {
    let daemon = Parleyd::start();
    let pid = daemon.pid().to_string();
    let sessions = URING_SESSIONS.to_string();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            &sessions,
            "--sources",
            "4",
            "--pid",
            &pid,
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, URING_SESSIONS);
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        report.connections.sources == 4,
        "{:?}",
        report.connections
    );
    // Every session held a slot at the peak, and gave it back at the end.
    ensure!(
        run,
        extra(&report, "uring_slots_peak") == Some(URING_SESSIONS as f64)
            && extra(&report, "uring_slots_open_at_exit") == Some(0.0),
        "extra: {:?}",
        report.extra
    );
    ensure!(
        run,
        extra(&report, "uring_rings").is_some_and(|rings| rings >= 1.0),
        "extra: {:?}",
        report.extra
    );
    let per_session = extra(&report, "generator_rss_bytes_per_session");
    ensure!(
        run,
        per_session.is_some_and(f64::is_finite),
        "extra: {:?}",
        report.extra
    );
    ensure!(
        run,
        report
            .server
            .as_ref()
            .is_some_and(|s| s.pid == daemon.pid()),
        "server: {:?}",
        report.server
    );
}

/// Sessions one parleyd holds in the capacity test, and the descriptors it may open
/// (this machine's hard limit, set explicitly so the test means the same anywhere).
const CAPACITY_SESSIONS: u64 = 30_000;
const CAPACITY_DESCRIPTOR_LIMIT: u64 = 20_000;

/// One parleyd holds 30,000 authenticated sessions at once, more than the 20,000
/// descriptors it may open (the idle scenario pings every one while all are held): its
/// sockets are direct descriptors in its shards' fixed-file tables.
#[test]
fn one_parleyd_holds_30000_sessions_past_its_descriptor_limit() {
    // With a 512 backlog the accepting ring keeps 576 slots free, so each shard's
    // ~15,000 sessions fit its first 20,000-slot ring.
    let daemon = Parleyd::start_limited(&["--listen-backlog", "512"], CAPACITY_DESCRIPTOR_LIMIT);
    let pid = daemon.pid().to_string();
    let sessions = CAPACITY_SESSIONS.to_string();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            &sessions,
            "--connect-rate",
            "10000",
            "--sources",
            "8",
            "--pid",
            &pid,
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, CAPACITY_SESSIONS);
    let log = daemon.log_text();
    ensure!(
        run,
        log.contains("socket engine: io_uring") && log.contains("descriptor_limit=20000"),
        "parleyd log:\n{log}"
    );
}

/// A shard makes more rings as its tables fill, and accepting moves along: 6,000
/// sessions over 1,024-slot tables. The accepting ring keeps backlog + 64 = 128 slots free
/// for the accepts a multishot accept completes before the move lands; a connection the kernel
/// accepts into a full table is closed and the client retries, so a few retries are
/// tolerated (and reported), but every session ends up held and answering.
#[test]
fn shards_add_rings_as_their_tables_fill() {
    let daemon = Parleyd::start_with(&["--socket-ring-files", "1024", "--listen-backlog", "64"]);
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "uring",
            "--connections",
            "6000",
            "--connect-rate",
            "2000",
            "--sources",
            "2",
        ],
    );
    let report = run.report();
    let c = &report.connections;
    ensure!(run, c.established == 6000, "sessions: {c:?}");
    ensure!(
        run,
        c.failed_attempts <= 60,
        "at most 1% of connects retried: {c:?}"
    );
    let ping = run.latency(&report, "ping");
    ensure!(run, ping.count == 6000, "every session answered: {ping:?}");
    let log = daemon.log_text();
    let extra_rings = log.matches("another ring for more connections").count();
    ensure!(
        run,
        extra_rings >= 6,
        "6,000 sessions over 1,024-slot tables need at least 8 rings; made {extra_rings} more:\n{log}"
    );
}

#[test]
fn uring_sessions_answer_the_server_heartbeat_and_stay() {
    // The server pings after 200 ms of silence and drops a session silent for 1 s: held
    // for 3 s, every session lives only by answering the pings with pongs.
    let daemon = Parleyd::start_with(&[
        "--heartbeat-interval-ms",
        "200",
        "--idle-timeout-ms",
        "1000",
    ]);
    let run = daemon.load(
        "idle",
        &["--engine", "uring", "--connections", "100", "--hold", "3s"],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, 100);
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        extra(&report, "uring_slots_peak") == Some(100.0),
        "a session was lost and reconnected: {:?}",
        report.extra
    );
}

#[test]
fn idle_on_epoll_still_works_and_auto_takes_uring_for_idle_only() {
    let daemon = Parleyd::start();
    let run = daemon.load(
        "idle",
        &[
            "--engine",
            "epoll",
            "--connections",
            "300",
            "--sources",
            "3",
        ],
    );
    let report = run.report();
    assert_idle_clean(&run, &report, 300);
    ensure!(
        run,
        engine(&report) == "epoll",
        "params: {:?}",
        report.params
    );
    ensure!(
        run,
        !report.extra.keys().any(|name| name.starts_with("uring_")),
        "extra: {:?}",
        report.extra
    );

    // auto: io_uring for idle when this kernel and process allow it ...
    let expected = match parley_tools::load::uring::probe() {
        Ok(()) => "uring",
        Err(_) => "epoll",
    };
    let run = daemon.load("idle", &["--connections", "200"]);
    let report = run.report();
    assert_idle_clean(&run, &report, 200);
    ensure!(
        run,
        engine(&report) == expected,
        "params: {:?}",
        report.params
    );

    // ... and epoll for every other scenario.
    let run = daemon.load(
        "chat-1to1",
        &[
            "--connections",
            "10",
            "--rate",
            "100",
            "--warmup",
            "200ms",
            "--duration",
            "500ms",
        ],
    );
    let report = run.report();
    ensure!(run, run.status.success(), "exit status {}", run.status);
    ensure!(
        run,
        engine(&report) == "epoll",
        "params: {:?}",
        report.params
    );
}

#[test]
fn engine_uring_is_refused_for_other_scenarios() {
    let run = parley_load(
        "chat-1to1",
        &[
            "--engine".into(),
            "uring".into(),
            "--secret".into(),
            "s".into(),
            "--target".into(),
            closed_port().to_string(),
        ],
        None,
    );
    ensure!(
        run,
        run.status.code() == Some(1),
        "exit status {}",
        run.status
    );
    ensure!(
        run,
        run.stderr
            .contains("--engine uring: the io_uring engine runs the idle scenario"),
        "stderr: {}",
        run.stderr
    );
}

/// A local port nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

#[test]
fn uring_sessions_that_cannot_connect_retry_and_give_their_slots_back() {
    let run = parley_load(
        "idle",
        &[
            "--engine",
            "uring",
            "--secret",
            "s",
            "--target",
            &closed_port().to_string(),
            "--connections",
            "20",
            "--sources",
            "2",
            "--setup-timeout",
            "1s",
        ]
        .map(String::from),
        None,
    );
    // Nothing was set up: the verification fails, exit status 2, with a full report.
    ensure!(
        run,
        run.status.code() == Some(2),
        "exit status {}",
        run.status
    );
    let report = run.report();
    ensure!(
        run,
        engine(&report) == "uring",
        "params: {:?}",
        report.params
    );
    let c = &report.connections;
    ensure!(
        run,
        c.established == 0 && c.failed_attempts >= 20,
        "sessions: {c:?}"
    );
    let refused = report
        .errors
        .get("connect: ConnectionRefused")
        .copied()
        .unwrap_or(0);
    ensure!(
        run,
        refused == c.failed_attempts,
        "errors: {:?}",
        report.errors
    );
    // Each failed attempt had its slot, and closed it.
    ensure!(
        run,
        extra(&report, "uring_slots_peak").is_some_and(|peak| peak >= 1.0)
            && extra(&report, "uring_slots_open_at_exit") == Some(0.0),
        "extra: {:?}",
        report.extra
    );
}
