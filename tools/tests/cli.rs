//! `parley token` and `parley connect`, run as a user would run them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_router::auth::JwtKey;

const WAIT: Duration = Duration::from_secs(15);

fn parley() -> Command {
    Command::new(env!("CARGO_BIN_EXE_parley"))
}

/// parleyd sits beside this package's binaries in the workspace's target directory
/// (`cargo test --workspace` builds it before any test runs).
fn parleyd_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_parley")).with_file_name("parleyd");
    assert!(
        path.exists(),
        "{} is missing: run cargo build -p parley-gateway",
        path.display()
    );
    path
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn token_from_a_secret_verifies() {
    let out = parley()
        .args([
            "token", "--user", "alice", "--device", "phone", "--ttl", "2h", "--secret", "s3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = JwtKey::new(b"s3").verify(token.trim(), now_s()).unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.dev.as_deref(), Some("phone"));
    assert!(claims.exp.abs_diff(now_s() + 7200) <= 5);
}

#[test]
fn token_from_a_data_dir_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt-secret"), "from-file\n").unwrap();
    let out = parley()
        .args(["token", "--user", "bob", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        JwtKey::new(b"from-file")
            .verify(token.trim(), now_s())
            .unwrap()
            .sub,
        "bob"
    );

    let out = parley()
        .args(["token", "--user", "bob", "--data-dir", "/nonexistent/dir"])
        .env_remove("PARLEY_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("parley: error: /nonexistent/dir/jwt-secret"),
        "{stderr}"
    );
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `reader`, read by a thread (to the end, so the writer never blocks on a full
/// pipe) and handed over a channel that can be waited on with a deadline.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[test]
fn connect_says_hello_and_sends_typed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = KillOnDrop(
        Command::new(parleyd_path())
            .arg("--data-dir")
            .arg(dir.path())
            .args(common::LOCAL_LISTEN)
            .args(["--shards", "1"])
            .env_remove("PARLEY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let daemon_log = lines_of(daemon.0.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT;
    let ws = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = daemon_log
            .recv_timeout(left)
            .expect("parleyd said it was listening within WAIT");
        if let Some(rest) = line.split("listening ws=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let mut client = KillOnDrop(
        parley()
            .args(["connect", "--user", "alice", "--device", "cli", "--url"])
            .arg(format!("ws://{ws}/v1/ws"))
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    writeln!(stdin, "ping").unwrap();
    writeln!(stdin, r#"{{"op":"nope"}}"#).unwrap();
    let replies = lines_of(client.0.stdout.take().unwrap());
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        lines.push(
            replies
                .recv_timeout(left)
                .expect("parley connect printed its replies"),
        );
    }
    drop(stdin); // End of input: parley connect closes the session and exits.
    let status = loop {
        if let Some(status) = client.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "parley connect did not exit at the end of its input"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let docs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs[0]["ok"]["user"], "alice");
    assert_eq!(docs[0]["ok"]["device"], "cli");
    assert!(docs[1]["ok"]["server_ts"].is_u64(), "{}", lines[1]);
    assert_eq!(docs[2]["err"]["code"], "bad_request");
    assert!(status.success());
}
