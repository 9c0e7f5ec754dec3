//! The harness of the parley-load tests: a real `parleyd` on kernel-picked ports with a
//! temporary data dir, killed when its test ends, and the real `parley-load` binary run
//! with `--json --quiet` under a bounded wait.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// parleyd's listeners on free loopback ports (the kernel picks them; the log says which).
pub const LOCAL_LISTEN: [&str; 6] = [
    "--ws-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
    "--quic-listen",
    "127.0.0.1:0",
];

use parley_tools::load::report::{LatencySummary, Report};

/// parleyd listens within a second or so; past this it is broken, not slow.
pub const START_LIMIT: Duration = Duration::from_secs(30);
/// Longest a parley-load run may take before it is killed and its test fails.
pub const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Per-session commands per second allowed by the daemons here: far above any test's
/// offered rate, so the limiter never shapes a result (the burst stays at its default).
pub const RATE_LIMIT_PER_SEC: &str = "100000";
/// Setup and drain bounds for the runs that are expected to work: short enough that a
/// broken run still ends (with a report to show) well inside RUN_LIMIT.
pub const SETUP_TIMEOUT: &str = "30s";
pub const DRAIN_TIMEOUT: &str = "15s";
/// Lines of the daemon's log kept for failure messages.
pub const LOG_KEEP: usize = 200;

/// parleyd sits beside this package's binaries in the workspace's target directory.
pub fn parleyd_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_parley")).with_file_name("parleyd");
    assert!(
        path.exists(),
        "{} is missing: run cargo build -p parley-gateway",
        path.display()
    );
    path
}

/// Children start from a clean slate: no PARLEY_* setting of the caller's (a
/// PARLEY_JWT_SECRET would override parley-load's --data-dir, a PARLEY_LOG could hide
/// parleyd's listening line).
pub fn scrubbed(program: impl Into<PathBuf>) -> Command {
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
pub struct Parleyd {
    pub child: Child,
    pub ws: SocketAddr,
    pub quic: SocketAddr,
    /// The admin listener (/metrics).
    pub admin: SocketAddr,
    pub data_dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Parleyd {
    /// Start two shards on kernel-picked ports and wait for the "listening" line (logged
    /// once every shard serves and the data dir's JWT secret exists).
    pub fn start() -> Parleyd {
        Parleyd::start_with(&[])
    }

    /// As `start`, with more daemon flags.
    pub fn start_with(flags: &[&str]) -> Parleyd {
        Parleyd::launch(flags, None)
    }

    /// As `start_with`, in a process allowed only `descriptors` open files.
    pub fn start_limited(flags: &[&str], descriptors: u64) -> Parleyd {
        Parleyd::launch(flags, Some(descriptors))
    }

    pub fn launch(flags: &[&str], descriptor_limit: Option<u64>) -> Parleyd {
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
            .args(LOCAL_LISTEN)
            .args(["--shards", "2"])
            .args(flags)
            .env("PARLEY_RATE_LIMIT_PER_SEC", RATE_LIMIT_PER_SEC)
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
                    if let (Some(addresses), Some(admin)) = (listening(&line), admin_address(&line))
                    {
                        let _ = tx.send((addresses, admin));
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
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            data_dir,
            log,
        };
        match rx.recv_timeout(START_LIMIT) {
            Ok(((ws, quic), admin)) => (daemon.ws, daemon.quic, daemon.admin) = (ws, quic, admin),
            Err(_) => panic!(
                "parleyd never said it was listening; its log:\n{}",
                daemon.log_text()
            ),
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `--target` and `--data-dir` (the secret the daemon generated) for parley-load.
    pub fn target_args(&self) -> Vec<String> {
        vec![
            "--target".into(),
            self.ws.to_string(),
            "--data-dir".into(),
            self.data_dir.path().display().to_string(),
        ]
    }

    /// Run parley-load `scenario` against this daemon, with its secret, short setup and
    /// drain bounds and `args`.
    pub fn load(&self, scenario: &str, args: &[&str]) -> Run {
        self.load_at(self.target_args(), scenario, args)
    }

    /// As `load`, over QUIC.
    pub fn load_quic(&self, scenario: &str, args: &[&str]) -> Run {
        let mut target = self.target_args();
        target[1] = self.quic.to_string();
        target.push("--quic".into());
        self.load_at(target, scenario, args)
    }

    /// As `load`, killed (and the test failed) after `limit` rather than RUN_LIMIT.
    pub fn load_within(&self, limit: Duration, scenario: &str, args: &[&str]) -> Run {
        let mut all = self.target_args();
        all.extend(args.iter().map(|s| s.to_string()));
        parley_load_within(limit, scenario, &all, Some(self))
    }

    /// `GET /metrics` on the admin listener: the body of a 200 answer.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.admin).expect("connect to admin");
        stream
            .set_read_timeout(Some(START_LIMIT))
            .expect("admin read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .expect("ask for /metrics");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read /metrics");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "/metrics answered {head:?}"
        );
        body.to_string()
    }

    pub fn load_at(&self, mut all: Vec<String>, scenario: &str, args: &[&str]) -> Run {
        all.extend(
            [
                "--setup-timeout",
                SETUP_TIMEOUT,
                "--drain-timeout",
                DRAIN_TIMEOUT,
            ]
            .map(String::from),
        );
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

/// The WebSocket and QUIC addresses out of `... listening ws=A admin=B quic=C ...`.
pub fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut words = line.split("listening ws=").nth(1)?.split_whitespace();
    let ws = words.next()?.parse().ok()?;
    let quic = words
        .find_map(|word| word.strip_prefix("quic="))?
        .parse()
        .ok()?;
    Some((ws, quic))
}

/// The admin address out of `... listening ws=A admin=B quic=C ...`.
pub fn admin_address(line: &str) -> Option<SocketAddr> {
    let words = line.split("listening ws=").nth(1)?.split_whitespace();
    words
        .filter_map(|word| word.strip_prefix("admin="))
        .find_map(|address| address.parse().ok())
}

/// A finished parley-load run.
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The daemon's log at the end of the run, if there was a daemon.
    pub daemon_log: Option<String>,
}

/// Run `parley-load <scenario> --json --quiet <args>`, killed (and the test failed)
/// after RUN_LIMIT.
pub fn parley_load(scenario: &str, args: &[String], daemon: Option<&Parleyd>) -> Run {
    parley_load_within(RUN_LIMIT, scenario, args, daemon)
}

/// As `parley_load`, killed (and the test failed) after `limit`.
pub fn parley_load_within(
    limit: Duration,
    scenario: &str,
    args: &[String],
    daemon: Option<&Parleyd>,
) -> Run {
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
    let output = match rx.recv_timeout(limit) {
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
                "{shown} did not finish within {limit:?} and was killed\n\
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
    pub fn context(&self) -> String {
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

    pub fn report(&self) -> Report {
        match serde_json::from_str(&self.stdout) {
            Ok(report) => report,
            Err(error) => panic!("stdout is not a JSON report ({error})\n{}", self.context()),
        }
    }

    pub fn latency<'a>(&self, report: &'a Report, name: &str) -> &'a LatencySummary {
        match report.latencies.iter().find(|l| l.name == name) {
            Some(latency) => latency,
            None => panic!("no {name:?} latency in the report\n{}", self.context()),
        }
    }
}

/// `assert!` that shows the run's output, stderr and daemon log when it fails.
#[macro_export]
macro_rules! ensure {
    ($run:expr, $cond:expr, $($message:tt)+) => {
        assert!($cond, "{}\n{}", format!($($message)+), $run.context())
    };
}

/// A local port nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}
