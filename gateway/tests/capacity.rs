//! A full shard sheds cleanly: a connection past `max_connections_per_shard` is answered
//! 503 at once (never left in the listen queue), the sessions it holds are unharmed, a
//! freed slot lets a new one in, and past `max_refusing_connections_per_shard` answers a
//! refused connection is closed without one. The io_uring engine makes every ring the
//! limit needs at start, and a limit the process cannot hold fails the start, saying why.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{local_args, token, wait_exit, Client, Daemon, SECRET, WAIT};

const LIMIT: u64 = 3;

/// One shard held at a tiny limit, on rings of 4 slots (io_uring) or on descriptors.
fn full_shard(engine: &str) -> Daemon {
    Daemon::start_sharded(
        tempfile::tempdir().expect("tempdir"),
        1,
        &[
            "--socket-engine",
            engine,
            "--max-connections-per-shard",
            "3",
            "--max-refusing-connections-per-shard",
            "1",
            "--socket-ring-files",
            "4",
            "--listen-backlog",
            "1",
            // A refused connection whose client keeps it open lingers this long: longer
            // than the test, so the unanswered case below is certain.
            "--close-linger-ms",
            "30000",
        ],
    )
}

fn metric(daemon: &Daemon, name: &str) -> u64 {
    daemon.metric(name, "shard=\"0\"")
}

/// Wait (bounded) until `name` reads `want`.
fn wait_metric(daemon: &Daemon, name: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(daemon, name);
        if value == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {value}, not {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ping(client: &mut Client) {
    let id = client.command("ping", serde_json::json!({}));
    let reply = client.reply(id);
    assert!(reply["ok"]["server_ts"].is_u64(), "{reply}");
}

/// An upgrade request written on a raw socket: what came back until the server closed
/// (or reset) it, and whether it was a reset. The read is bounded by WAIT: a connection
/// left in the listen queue fails here.
fn upgrade_raw(daemon: &Daemon, user: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(daemon.ws).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        daemon.ws,
        token(user, None)
    );
    // A refusal may close before the request is read: a failed write is an answer too.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                // A 503 is complete at its body's end; the server then lingers for our EOF.
                if answer.ends_with(b"limit\n") {
                    break;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("no answer to a connection past the limit: {error}"),
        }
    }
    (stream, String::from_utf8_lossy(&answer).into_owned())
}

fn sheds_at_the_limit(engine: &str) {
    let daemon = full_shard(engine);
    assert_eq!(metric(&daemon, "parley_connection_limit"), LIMIT);
    if engine == "io_uring" {
        // The limit in effect is the setting: slots for every admitted connection, every
        // refusal being answered and every armed accept, made at start.
        // The gauges are published at the end of the shard's first turn, which may come
        // after the port is announced: wait (bounded) for an armed accept.
        let deadline = Instant::now() + WAIT;
        let armed = loop {
            let armed = metric(&daemon, "parley_socket_accepts_armed");
            if armed >= 1 || Instant::now() >= deadline {
                break armed;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(armed >= 1, "no accept armed");
        let capacity = metric(&daemon, "parley_socket_slots_capacity");
        assert!(
            capacity >= LIMIT + 1 + armed,
            "{capacity} slots for {LIMIT} connections, 1 refusal and {armed} accepts"
        );
        assert_eq!(
            metric(&daemon, "parley_socket_rings") * 4,
            capacity,
            "rings of 4"
        );
    }
    let mut held: Vec<Client> = (0..LIMIT)
        .map(|i| Client::authed(&daemon, &format!("held{i}")))
        .collect();
    for client in &mut held {
        ping(client);
    }
    wait_metric(&daemon, "parley_connections", LIMIT);

    // One past the limit: 503 at once, with the reason.
    let (kept_open, answer) = upgrade_raw(&daemon, "past1");
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && answer.ends_with("the server is at its connection limit\n"),
        "answer past the limit: {answer:?}"
    );
    assert_eq!(metric(&daemon, "parley_connections_refused_total"), 1);
    wait_metric(&daemon, "parley_connections_refusing", 1);

    // That refusal still lingers (its client has not closed): the next one is closed
    // unanswered, at once too.
    let (_, unanswered) = upgrade_raw(&daemon, "past2");
    assert_eq!(unanswered, "", "past max_refusing_connections_per_shard");
    assert_eq!(
        metric(&daemon, "parley_connections_refused_unanswered_total"),
        1
    );
    drop(kept_open);
    wait_metric(&daemon, "parley_connections_refusing", 0);

    // The held sessions never noticed.
    for client in &mut held {
        ping(client);
    }
    assert_eq!(metric(&daemon, "parley_connections"), LIMIT);

    // A freed slot lets a new session in.
    let mut leaving = held.pop().unwrap();
    leaving.ws.close(None).unwrap();
    let _ = leaving.expect_close();
    drop(leaving);
    wait_metric(&daemon, "parley_connections", LIMIT - 1);
    let mut newcomer = Client::authed(&daemon, "newcomer");
    ping(&mut newcomer);
    for client in &mut held {
        ping(client);
    }
    assert_eq!(metric(&daemon, "parley_connections_refused_total"), 2);
}

#[test]
fn a_full_shard_answers_503_and_keeps_its_sessions_io_uring() {
    sheds_at_the_limit("io_uring");
}

#[test]
fn a_full_shard_answers_503_and_keeps_its_sessions_descriptors() {
    sheds_at_the_limit("descriptors");
}

/// The io_uring engine makes the rings at start: a limit that needs more rings than the
/// process may open (each ring is a descriptor) fails the start, naming the setting.
#[test]
fn a_limit_the_rings_cannot_hold_fails_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = local_args(dir.path());
    args.extend(
        [
            "--jwt-secret",
            SECRET,
            "--shards",
            "1",
            "--socket-engine",
            "io_uring",
            "--max-connections-per-shard",
            "100000",
        ]
        .map(String::from),
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_parleyd"));
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // 64 descriptors: a ring's table is capped there, so 100,000 connections need
    // about 1,600 rings, and the process runs out of descriptors long before.
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let output = wait_exit(command.spawn().expect("spawn parleyd"), "parleyd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("max_connections_per_shard 100000 needs")
            && stderr.contains("io_uring ring"),
        "the start failed without saying the limit cannot be held: {stderr}"
    );
}
