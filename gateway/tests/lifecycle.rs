//! parleyd's process lifecycle: the drain on SIGTERM/SIGINT and each startup failure.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{run_to_exit, Client, Daemon, WAIT};
use serde_json::json;

/// Start a parleyd expected to fail: exit status and stderr.
fn start_failing(
    data_dir: &std::path::Path,
    ws: &str,
    admin: &str,
) -> (std::process::ExitStatus, String) {
    let data_dir = data_dir.to_str().unwrap();
    run_to_exit(
        &[
            "--data-dir",
            data_dir,
            "--ws-listen",
            ws,
            "--admin-listen",
            admin,
            "--quic-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
}

fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or("")
}

/// What a drained daemon logged after its start, up to its last line ("drained;
/// exiting", logged once every shard has stopped), waiting (bounded) for the log
/// reader to pass it on.
fn drain_log(daemon: &Daemon) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|line: &String| line.contains("drained; exiting"))
    {
        assert!(
            Instant::now() < deadline,
            "no \"drained; exiting\" logged within {WAIT:?}; got:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
        lines.extend(daemon.log_lines());
    }
    lines
}

/// The shards whose drain ended with every connection closed ("drained"), and those
/// that reached drain_timeout_ms ("drain_timeout reached"), from the runtime's log lines.
fn drain_outcomes(log: &[String]) -> (Vec<&str>, Vec<&str>) {
    fn shards<'a>(log: &'a [String], message: &str) -> Vec<&'a str> {
        log.iter()
            .filter_map(|line| line.split_once(message))
            .filter_map(|(_, rest)| rest.split_whitespace().find(|w| w.starts_with("shard=")))
            .collect()
    }
    (
        // By message, not by the module that logs it.
        shards(log, ": drained "),
        shards(log, ": drain_timeout reached"),
    )
}

#[test]
fn sigterm_drains_sessions_with_1001_and_exits_0() {
    let mut daemon = Daemon::start(&["--drain-timeout-ms", "3000"]);
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::authed(&daemon, &format!("user{i}")))
        .collect();
    for client in &mut clients {
        let id = client.command("ping", json!({}));
        client.reply(id);
    }
    assert_eq!(daemon.admin_get("/readyz").0, 200);
    let admin = daemon.admin;
    let (status, took) = daemon.signal_and_wait(libc::SIGTERM);
    for client in &mut clients {
        let (code, reason) = client.expect_close();
        assert_eq!(code, Some(1001));
        assert_eq!(reason, "server shutting down");
    }
    assert_eq!(status.code(), Some(0), "drain exits 0");
    // Every shard drained by closing its sessions, none by reaching drain_timeout_ms.
    // (How long that took is not the point: a busy machine may take long; the watchdog
    // at drain_timeout_ms + 2 s, which would exit 1, and signal_and_wait bound it.)
    let log = drain_log(&daemon);
    let (drained, timed_out) = drain_outcomes(&log);
    assert_eq!(
        (drained.len(), timed_out.len()),
        (2, 0),
        "drained in {took:?}; the log:\n{}",
        log.join("\n")
    );
    // The listeners are gone. glommio accepts through io_uring, and the kernel tears an
    // exited process's ring down asynchronously: for a few milliseconds after the exit a
    // pending accept still holds the listening socket, so wait (bounded) for refusal.
    for addr in [daemon.ws, admin] {
        let deadline = std::time::Instant::now() + common::WAIT;
        while std::net::TcpStream::connect(addr).is_ok() {
            assert!(std::time::Instant::now() < deadline, "{addr} still accepts");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn sigint_drains_too() {
    let mut daemon = Daemon::start(&[]);
    let mut client = Client::authed(&daemon, "alice");
    let (status, _) = daemon.signal_and_wait(libc::SIGINT);
    assert_eq!(client.expect_close().0, Some(1001));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn drain_is_bounded_by_drain_timeout() {
    let mut daemon = Daemon::start(&[
        "--drain-timeout-ms",
        "500",
        "--outbound-queue-len",
        "100000000",
        "--outbound-queue-bytes",
        "1000000000",
        // Bursts that cover one 64 KiB read of pings, refilled between reads (see the
        // slow-consumer test).
        "--rate-limit-per-sec",
        "1000000000",
        "--rate-limit-burst",
        "3000",
    ]);
    // A session that never reads while its replies pile up: the drain's 1001 waits
    // behind them forever, so only drain_timeout_ms ends it. The server keeps reading
    // (nothing limits this session), though it may pause the flood now and then, so a
    // write gets as long as any wait here.
    let mut client = Client::slow_reader(&daemon, "stuck");
    assert_eq!(
        client.flood_pings(300, WAIT),
        300,
        "the server reads until the drain"
    );
    let (status, took) = daemon.signal_and_wait(libc::SIGTERM);
    assert_eq!(
        status.code(),
        Some(0),
        "the drain exits 0 (not the watchdog's 1)"
    );
    // The drain timer starts once the signal is seen, after `took` started.
    assert!(
        took >= Duration::from_millis(500),
        "drain ended in {took:?}, before drain_timeout_ms"
    );
    // Stuck, as the daemon says: the stuck session's shard reached drain_timeout_ms, the
    // other drained.
    let log = drain_log(&daemon);
    let (drained, timed_out) = drain_outcomes(&log);
    assert_eq!(
        (drained.len(), timed_out.len()),
        (1, 1),
        "drained in {took:?}; the log:\n{}",
        log.join("\n")
    );
}

#[test]
fn port_in_use_is_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = start_failing(dir.path(), &addr, "127.0.0.1:0");
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        last_line(&stderr),
        format!("parleyd: error: cannot listen on ws_listen {addr}: Address already in use (os error 98)")
    );

    let (status, stderr) = start_failing(dir.path(), "127.0.0.1:0", &addr);
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr).starts_with(&format!(
            "parleyd: error: cannot listen on admin_listen {addr}"
        )),
        "{stderr}"
    );
}

#[test]
fn a_second_parleyd_on_the_same_port_is_refused() {
    // SO_REUSEPORT alone would let a second daemon share the port silently.
    let first = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ws = first.ws.to_string();
    let (status, stderr) = start_failing(dir.path(), &ws, "127.0.0.1:0");
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr).contains("Address already in use"),
        "{stderr}"
    );
}

#[test]
fn unusable_data_dir_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let data_dir = file.join("data");
    let (status, stderr) = run_to_exit(&["--data-dir", data_dir.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        last_line(&stderr),
        format!(
            "parleyd: error: data dir {}: Not a directory (os error 20)",
            data_dir.display()
        )
    );
}

#[test]
fn data_dir_in_use_is_refused() {
    let first = Daemon::start(&[]);
    let (status, stderr) = start_failing(first.data_dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr).contains("is in use by another parleyd"),
        "{stderr}"
    );
}

#[test]
fn bad_config_values_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();

    let (status, stderr) = run_to_exit(&["--data-dir", data_dir, "--max-frame-bytes", "0"], &[]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        last_line(&stderr),
        "parleyd: error: setting max_frame_bytes: must be greater than 0"
    );

    let (status, stderr) = run_to_exit(
        &["--data-dir", data_dir],
        &[("PARLEY_AUTH_TIMEOUT_MS", "soon")],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr)
            .starts_with("parleyd: error: environment variable PARLEY_AUTH_TIMEOUT_MS=\"soon\""),
        "{stderr}"
    );

    let config = dir.path().join("parley.toml");
    std::fs::write(&config, "idle_timeout_ms = \"long\"\n").unwrap();
    let (status, stderr) = run_to_exit(
        &["--data-dir", data_dir, "--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr)
            .starts_with(&format!("parleyd: error: config file {}", config.display())),
        "{stderr}"
    );

    let (status, stderr) = run_to_exit(&["--ws-listen", "not-an-address"], &[]);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--ws-listen"), "{stderr}");

    let (status, stderr) = run_to_exit(&["--shards", "4096"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        last_line(&stderr).starts_with("parleyd: error: setting shards:"),
        "{stderr}"
    );
}

#[test]
fn generated_secret_is_reused_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let args = common::local_args(dir.path());
    let run = |args: &[String]| {
        // parleyd says it is listening only after the secret is in place.
        let mut launched = common::launch(args);
        let secret = std::fs::read_to_string(dir.path().join("jwt-secret")).unwrap();
        launched.child.kill().unwrap();
        common::wait_exit(launched.child, "parleyd");
        secret
    };
    let first = run(&args);
    let second = run(&args);
    assert_eq!(first, second);
    assert_eq!(first.trim().len(), 64);
    let mode = std::fs::metadata(dir.path().join("jwt-secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A supervisor or an operator that restarts at once after a kill -9, without waiting
/// for the process to be reaped: the dying parleyd still holds the data dir's lock
/// (and, for a moment after that, its io_uring instances the listening sockets). The new
/// parleyd waits them out rather than failing with "in use".
#[test]
fn a_restart_right_after_kill_9_gets_the_same_ports() {
    let dir = tempfile::tempdir().unwrap();
    let secret = ["--jwt-secret", common::SECRET].map(String::from);
    let mut args = common::local_args(dir.path());
    args.extend(secret.clone());
    let first = common::launch(&args);
    let mut args = vec!["--data-dir".to_string(), dir.path().display().to_string()];
    args.extend(secret);
    for (flag, addr) in [
        ("--ws-listen", first.ws),
        ("--admin-listen", first.admin),
        ("--quic-listen", first.quic),
    ] {
        args.extend([flag.to_string(), addr.to_string()]);
    }
    // A session, so the socket engine has a connection in flight when the process dies.
    let mut client = Client::try_connect_to(first.ws, &common::token("alice", None))
        .expect("a session on the first parleyd");
    client.ok("hello", json!({}));
    let mut dead = first.child;
    dead.kill().unwrap();
    // Started before the dead one is reaped, as a restart loop in a shell would.
    let second = common::launch(&args);
    dead.wait().unwrap();
    assert_eq!(second.ws, first.ws);
    let mut client = Client::try_connect_to(second.ws, &common::token("alice", None))
        .expect("a session on the restarted parleyd");
    client.ok("hello", json!({}));
    let mut child = second.child;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Set for the lock-holder child of `a_killed_holder_of_the_lock_is_waited_for`.
const LOCK_HOLDER_ENV: &str = "PARLEY_TEST_LOCK_HOLDER";

/// Not a test: the child process of `a_killed_holder_of_the_lock_is_waited_for`. It
/// takes the data dir's lock as parleyd does, names itself in it, and touches enough
/// memory that the kernel's teardown after a SIGKILL (which frees memory before it
/// closes files) keeps the lock held for a while after the kill.
#[test]
#[ignore]
fn lock_holder_child() {
    use std::io::Write;
    let Ok(dir) = std::env::var(LOCK_HOLDER_ENV) else {
        return;
    };
    let mut lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::path::Path::new(&dir).join("LOCK"))
        .unwrap();
    lock.try_lock().unwrap();
    writeln!(lock, "pid {}", std::process::id()).unwrap();
    let ballast = vec![1u8; 1 << 30];
    println!("holding {}", ballast.iter().step_by(4096).count());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}

/// The deterministic form of the race above: the lock's holder is killed, and parleyd
/// starts while the kernel is still tearing it down.
#[test]
fn a_killed_holder_of_the_lock_is_waited_for() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_holder_child", "--ignored", "--nocapture"])
        .env(LOCK_HOLDER_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("holding") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the holder exited"
        );
    }
    holder.kill().unwrap();
    let mut args = common::local_args(dir.path());
    args.extend(["--jwt-secret", common::SECRET].map(String::from));
    let started = common::launch(&args);
    holder.wait().unwrap();
    assert!(
        started
            .startup
            .iter()
            .any(|line| line.contains("is exiting; waiting up to")),
        "parleyd took the lock without waiting, so the holder was gone already and this \
         test tried nothing: {:#?}",
        started.startup
    );
    let mut child = started.child;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// After an unclean exit (the lock file still names the dead parleyd), a listen address
/// in use is retried: here the test holds the port until parleyd says it is retrying,
/// as a killed process's io_uring instances would while the kernel tears them down.
#[test]
fn a_listen_address_held_after_an_unclean_exit_is_retried() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    // No process has this pid (pid_max is at most 2^22): a parleyd that died.
    std::fs::write(dir.path().join("LOCK"), "pid 4294967\n").unwrap();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parleyd"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--ws-listen",
            &addr,
        ])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .args(["--jwt-secret", common::SECRET])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // parleyd gives up after restart_after_kill_wait_ms and exits, closing stderr, so
    // reading its lines is bounded.
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut until = |what: &str, seen: &mut Vec<String>| loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("parleyd stopped before logging {what:?}: {seen:#?}"));
        seen.push(line.clone());
        if line.contains(what) {
            return;
        }
    };
    let retried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        until("is still in use after the previous parleyd", &mut seen);
        drop(held);
        until("listening ws=", &mut seen);
    }));
    let _ = child.kill();
    child.wait().unwrap();
    if let Err(panic) = retried {
        std::panic::resume_unwind(panic);
    }
}

/// The kernel thread id of `pid`'s thread named `name` (as /proc shows it: the first 15
/// bytes).
fn thread_named(pid: u32, name: &str) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.filter_map(Result::ok).find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        let tid = task.file_name().to_str()?.parse().ok()?;
        comm.trim_end().starts_with(name).then_some(tid)
    })
}

/// parleyd with `flags`, its stderr read up to the listening line and then closed: every
/// later write to it fails with EPIPE, as under a supervisor or terminal that went away.
/// Returns the child and its WebSocket address.
fn start_with_stderr_gone(dir: &std::path::Path, flags: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_parleyd"))
        .args(common::local_args(dir))
        .args(["--shards", "2", "--jwt-secret", common::SECRET])
        .args(flags)
        .env_remove("PARLEY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ws = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                Some(
                    line.split("listening ws=")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .to_string(),
                )
            });
        let _ = tx.send(ws);
    });
    match rx.recv_timeout(WAIT) {
        Ok(Some(ws)) => (child, ws),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("parleyd did not say it was listening: {other:?}");
        }
    }
}

/// Wait (bounded) for `child`'s exit, reaping `traced` (a thread we ptrace) as it goes:
/// a traced thread's exit is its tracer's to reap, or the process's never is.
fn exit_within(child: &mut std::process::Child, traced: Option<i32>) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(tid) = traced {
            let mut status = 0;
            // SAFETY: waitpid on a thread of our own child that we trace.
            unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        }
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > WAIT {
            if let Some(tid) = traced {
                // SAFETY: detaching lets the thread run (and die with the process).
                unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("parleyd still runs {WAIT:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn parleyd_serves_and_drains_when_stderr_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, ws) = start_with_stderr_gone(dir.path(), &[]);
    // Sessions come and go (each logs nothing, but a shard would die of a log line it
    // cannot write); then the drain, which every shard logs.
    for i in 0..3 {
        let url = format!(
            "ws://{ws}/v1/ws?token={}",
            common::token(&format!("u{i}"), None)
        );
        let (mut socket, _) = tungstenite::connect(url).expect("connect");
        socket
            .send(tungstenite::Message::text(r#"{"id":1,"op":"ping"}"#))
            .unwrap();
        let reply = socket.read().expect("the ping's reply");
        assert!(reply.to_text().unwrap().contains(r#""re":1"#), "{reply:?}");
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = exit_within(&mut child, None);
    assert_eq!(status.code(), Some(0), "a clean drain: {status:?}");
}

#[test]
fn the_drain_watchdog_exits_1_even_when_stderr_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = start_with_stderr_gone(dir.path(), &["--drain-timeout-ms", "300"]);
    // Shard 0 stops (only that thread: ptrace's group-stop-free interrupt), so the drain
    // cannot finish and only the watchdog, at drain_timeout_ms + 2 s, ends the process.
    let pid = child.id();
    let shard = thread_named(pid, "parley-shard-0").expect("shard 0's thread");
    // SAFETY: ptrace and waitpid on a thread of our own child; no memory is shared.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, shard, 0, 0), 0, "seize");
        assert_eq!(
            libc::ptrace(libc::PTRACE_INTERRUPT, shard, 0, 0),
            0,
            "interrupt"
        );
        let mut status = 0;
        assert_eq!(libc::waitpid(shard, &mut status, libc::__WALL), shard);
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = exit_within(&mut child, Some(shard));
    assert_eq!(status.code(), Some(1), "the watchdog's exit: {status:?}");
}
