//! Test harness: starts the real `parleyd` binary on free ports and talks to it over
//! real sockets with tungstenite's client.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_router::auth::{Claims, JwtKey};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "integration-test-secret";
/// Upper bound on any single wait in these tests; reaching it is a failure, not a pass.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct Daemon {
    child: Option<Child>,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
    pub data_dir: tempfile::TempDir,
    stderr: mpsc::Receiver<String>,
    /// What it logged until it was listening.
    pub startup: Vec<String>,
}

/// Run parleyd to completion (for startup failures): exit status and stderr.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parleyd"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().expect("spawn parleyd");
    let output = wait_exit(child, &format!("parleyd {args:?}"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status, stderr)
}

/// Wait (blocking, on a helper thread) for `child` to exit and collect what it piped;
/// kill it and fail if that takes longer than WAIT.
pub fn wait_exit(child: Child, what: &str) -> std::process::Output {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.expect("wait for child"),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not exit within {WAIT:?}");
        }
    }
}

/// A started parleyd: its process, addresses and log lines.
pub struct Launched {
    pub child: Child,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
    /// The lines logged up to and including the listening line (recovery's among them).
    pub startup: Vec<String>,
}

/// Start parleyd with `args` and wait for its "listening" line (logged once every shard
/// serves, after the data dir and secret are ready).
pub fn launch(args: &[String]) -> Launched {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parleyd"));
    // The daemon starts from a clean slate: no PARLEY_* setting of the caller's (a
    // PARLEY_LOG=warn would hide the listening line, a PARLEY_SHARDS change the layout).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PARLEY_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parleyd");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut startup = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "parleyd {args:?} never said it was listening; it logged:\n{}",
                startup.join("\n")
            );
        };
        startup.push(line.clone());
        if let Some(rest) = line.split("listening ws=").nth(1) {
            let mut words = rest.split_whitespace();
            let ws = words.next().unwrap().parse().unwrap();
            let admin = words
                .next()
                .unwrap()
                .trim_start_matches("admin=")
                .parse()
                .unwrap();
            let quic = words
                .next()
                .unwrap()
                .trim_start_matches("quic=")
                .parse()
                .unwrap();
            return Launched {
                child,
                ws,
                admin,
                quic,
                stderr: rx,
                startup,
            };
        }
    }
}

/// A start in `data_dir` on free loopback ports (WebSocket, admin, QUIC); callers add
/// the flags they test.
pub fn local_args(data_dir: &std::path::Path) -> Vec<String> {
    let data_dir = data_dir.display().to_string();
    let mut args = vec!["--data-dir".to_string(), data_dir];
    for flag in ["--ws-listen", "--admin-listen", "--quic-listen"] {
        args.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
    }
    args
}

impl Daemon {
    /// Start on free ports with two shards and the test secret, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    pub fn start_in(data_dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        Self::start_sharded(data_dir, 2, extra)
    }

    /// Start with `shards` shards (each test's layout is fixed per data dir).
    pub fn start_sharded(data_dir: tempfile::TempDir, shards: usize, extra: &[&str]) -> Daemon {
        let mut args = local_args(data_dir.path());
        let shards = shards.to_string();
        args.extend(["--jwt-secret", SECRET, "--shards", &shards].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        let Launched {
            child,
            ws,
            admin,
            quic,
            stderr,
            startup,
        } = launch(&args);
        Daemon {
            child: Some(child),
            ws,
            admin,
            quic,
            data_dir,
            stderr,
            startup,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.ws)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Send a signal and wait for the exit, bounded by WAIT.
    pub fn signal_and_wait(&mut self, signal: i32) -> (ExitStatus, Duration) {
        let started = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), signal) };
        let child = self.child.take().unwrap();
        let output = wait_exit(child, &format!("parleyd after signal {signal}"));
        (output.status, started.elapsed())
    }

    /// Lines parleyd logged since the last call.
    pub fn log_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    /// The next line parleyd logs, waiting until `deadline` at most.
    pub fn next_log_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.stderr.recv_timeout(left).ok()
    }

    /// `GET path` on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// Sum of a metric over every label set that contains `labels`. A metric that is not
    /// exported (no series of that name with those labels) fails the test: it is an
    /// error, not a zero.
    pub fn metric(&self, name: &str, labels: &str) -> u64 {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        let prefix = format!("{name}{{");
        let values: Vec<u64> = body
            .lines()
            .filter(|line| line.starts_with(&prefix) && line.contains(labels))
            .map(|line| {
                let value = line.rsplit(' ').next().unwrap_or_default();
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: value {value:?} is not a count: {line}"))
            })
            .collect();
        assert!(
            !values.is_empty(),
            "no series {name}{{..{labels}..}} in /metrics:\n{body}"
        );
        values.iter().sum()
    }

    /// Stop gracefully (SIGTERM, the drain), check the clean exit, and hand back the data
    /// dir so that a new daemon can start on it (`Daemon::start_in`).
    pub fn stop(mut self) -> tempfile::TempDir {
        let (status, _) = self.signal_and_wait(libc::SIGTERM);
        assert_eq!(status.code(), Some(0), "drain exit: {status:?}");
        // The daemon owns its TempDir (deleted on drop): swap in a throwaway one.
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect admin");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

pub fn token(user: &str, device: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    JwtKey::new(SECRET.as_bytes()).sign(&Claims {
        sub: user.into(),
        exp: now + 3600,
        dev: device.map(Into::into),
    })
}

/// A test client session.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    next_id: u64,
    /// Documents of a batched frame not yet returned.
    pending: std::collections::VecDeque<Value>,
    /// Documents that arrived while waiting for something else (a reply, another event),
    /// oldest first, kept for the `expect_*` helpers.
    inbox: std::collections::VecDeque<Value>,
}

/// What a read returned.
#[derive(Debug)]
pub enum Event {
    Docs(Vec<Value>),
    Ping,
    Closed(Option<u16>, String),
}

impl Client {
    /// Connect with an optional `Authorization: Bearer` token.
    pub fn connect(daemon: &Daemon, bearer: Option<&str>) -> Client {
        Self::connect_stream(
            daemon,
            bearer,
            TcpStream::connect(daemon.ws).expect("connect"),
        )
    }

    pub fn connect_stream(daemon: &Daemon, bearer: Option<&str>, stream: TcpStream) -> Client {
        let mut request = daemon.url().into_client_request().unwrap();
        if let Some(token) = bearer {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client(request, stream).expect("upgrade");
        Client {
            ws,
            next_id: 1,
            pending: Default::default(),
            inbox: Default::default(),
        }
    }

    /// As `connect` with a bearer token, to a WebSocket address (a thread that does not
    /// hold the `Daemon` may connect), and `None` instead of a panic when the server is
    /// gone (a test that kills it connects until it cannot).
    pub fn try_connect_to(ws: SocketAddr, bearer: &str) -> Option<Client> {
        let stream = TcpStream::connect(ws).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        let mut request = format!("ws://{ws}/v1/ws").into_client_request().ok()?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {bearer}").parse().ok()?);
        let (ws, _) = tungstenite::client(request, stream).ok()?;
        Some(Client {
            ws,
            next_id: 1,
            pending: Default::default(),
            inbox: Default::default(),
        })
    }

    /// Authenticated as `user` over a socket with a tiny receive buffer, so the server's
    /// writes back up after a few KiB of unread replies.
    pub fn slow_reader(daemon: &Daemon, user: &str) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&daemon.ws.into()).unwrap();
        Self::connect_stream(daemon, Some(&token(user, None)), socket.into())
    }

    /// Write up to `thousands` x 1000 pings without reading a reply, as raw masked frames
    /// (mask key 0) on the socket so tungstenite's write state stays clean for reading
    /// afterwards. Stops early once the socket has taken nothing for `write_timeout`
    /// (read as: the server stopped reading; the last burst may then be cut mid-frame,
    /// so write nothing more on this socket); returns the thousands sent.
    ///
    /// A server that stopped reading blocks a write for good; one still reading may pause
    /// it for a TCP zero-window probe (200 ms and more on loopback, longer on a busy
    /// machine) when a flood outruns the io_uring engine's provided receive buffers. So
    /// where the server must keep reading, pass a long timeout (`WAIT`): a short one
    /// reads such a pause as "stopped".
    pub fn flood_pings(&mut self, thousands: usize, write_timeout: Duration) -> usize {
        let ping = br#"{"id":1,"op":"ping"}"#;
        let mut frame = vec![0x81, 0x80 | ping.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(ping);
        let burst = frame.repeat(1000);
        let stream = self.ws.get_mut();
        stream.set_write_timeout(Some(write_timeout)).unwrap();
        let sent = (0..thousands)
            .take_while(|_| stream.write_all(&burst).is_ok())
            .count();
        stream.set_write_timeout(None).unwrap();
        sent
    }

    /// Connected and authenticated as `user` through the upgrade header.
    pub fn authed(daemon: &Daemon, user: &str) -> Client {
        Self::connect(daemon, Some(&token(user, None)))
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Send `{"id": <next>, "op": op, ...fields}` and return the id.
    pub fn command(&mut self, op: &str, fields: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut doc = fields;
        doc["id"] = id.into();
        doc["op"] = op.into();
        self.send_text(&doc.to_string());
        id
    }

    pub fn next_event(&mut self) -> Event {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => return Event::Docs(split_frame(&text)),
                Ok(Message::Ping(_)) => return Event::Ping,
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| {
                            (Some(u16::from(code)), reason.to_string())
                        })
                        .unwrap_or((None, String::new()));
                    return Event::Closed(code, reason);
                }
                Ok(_) => {}
                Err(error) => panic!("read failed: {error}"),
            }
        }
    }

    /// The next document, skipping pings.
    pub fn next_doc(&mut self) -> Value {
        loop {
            if let Some(doc) = self.pending.pop_front() {
                return doc;
            }
            match self.next_event() {
                Event::Docs(docs) => self.pending.extend(docs),
                Event::Ping => {}
                Event::Closed(code, reason) => {
                    panic!("closed ({code:?} {reason}) while waiting for a document")
                }
            }
        }
    }

    /// The reply to command `id`, skipping other documents.
    pub fn reply(&mut self, id: u64) -> Value {
        loop {
            let doc = self.next_doc();
            if doc["re"] == id {
                return doc;
            }
        }
    }

    /// Read until the close frame; its code.
    pub fn expect_close(&mut self) -> (Option<u16>, String) {
        loop {
            if let Event::Closed(code, reason) = self.next_event() {
                return (code, reason);
            }
        }
    }
}

/// The documents of a text frame (one or more, separated by `\n`).
fn split_frame(text: &str) -> Vec<Value> {
    text.split('\n')
        .map(|d| serde_json::from_str(d).expect("server sends JSON"))
        .collect()
}

/// Chat helpers: bounded waits that keep whatever arrives while waiting for something
/// else. Events and replies interleave (and a frame may batch several documents), so
/// every wait reads documents in order, returns the one it waits for and keeps the rest
/// in the client's inbox, where later waits look first.
impl Client {
    /// Authenticated as `user` (device "default"), with live delivery started: a new
    /// session's deliveries start no later than the reply to its first `conv.list`.
    pub fn chat(daemon: &Daemon, user: &str) -> Client {
        let mut client = Client::connect(daemon, Some(&token(user, None)));
        client.ok("conv.list", serde_json::json!({}));
        client
    }

    /// As `chat`, on shard `shard`: the kernel picks a connection's shard, so connect
    /// (and say `hello`, whose `session` is `<shard>.<n>`) until one lands there.
    pub fn chat_on(daemon: &Daemon, user: &str, device: Option<&str>, shard: usize) -> Client {
        for _ in 0..64 {
            let mut client = Client::connect(daemon, Some(&token(user, device)));
            let welcome = client.ok("hello", serde_json::json!({}));
            let session = welcome["session"]
                .as_str()
                .expect("welcome names the session");
            if Self::shard_of(session) == shard {
                client.ok("conv.list", serde_json::json!({}));
                return client;
            }
        }
        panic!("64 connections of {user} and none landed on shard {shard}");
    }

    /// The shard of a session id (`<shard>.<n>`).
    pub fn shard_of(session: &str) -> usize {
        session
            .split('.')
            .next()
            .and_then(|shard| shard.parse().ok())
            .unwrap_or_else(|| panic!("session id {session:?} is not <shard>.<n>"))
    }

    /// The next document, waiting until `deadline` at most (`None` then). Documents in
    /// the inbox are not looked at: this is the wire's next one.
    pub fn next_doc_before(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            if let Some(doc) = self.pending.pop_front() {
                return Some(doc);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let stream = self.ws.get_ref();
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let read = self.ws.read();
            self.ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
            match read {
                Ok(Message::Text(text)) => self.pending.extend(split_frame(&text)),
                Ok(Message::Close(frame)) => {
                    panic!("closed ({frame:?}) while waiting; inbox: {:?}", self.inbox)
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(error))
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(error) => panic!("read failed: {error}"),
            }
        }
    }

    /// The reply to command `id`; what arrives before it stays in the inbox.
    pub fn reply_keeping(&mut self, id: u64) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next_doc_before(deadline) {
                Some(doc) if doc["re"] == id => return doc,
                Some(doc) => self.inbox.push_back(doc),
                None => panic!("no reply to {id} within {WAIT:?}; inbox: {:?}", self.inbox),
            }
        }
    }

    /// Send a command and wait for its reply (the whole `{"re", "ok"|"err"}` document).
    pub fn call(&mut self, op: &str, fields: Value) -> Value {
        let id = self.command(op, fields);
        self.reply_keeping(id)
    }

    /// Send a command that must succeed; its `ok` object.
    pub fn ok(&mut self, op: &str, fields: Value) -> Value {
        let reply = self.call(op, fields.clone());
        match reply.get("ok") {
            Some(ok) => ok.clone(),
            None => panic!("{op} {fields} failed: {reply}"),
        }
    }

    /// Send a command that must fail; its error code.
    pub fn err(&mut self, op: &str, fields: Value) -> String {
        let reply = self.call(op, fields.clone());
        match reply["err"]["code"].as_str() {
            Some(code) => code.to_string(),
            None => panic!("{op} {fields} was expected to fail: {reply}"),
        }
    }

    /// The first document (oldest in the inbox, else the next to arrive) that matches,
    /// waiting at most WAIT.
    pub fn expect_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_event_within(WAIT, what, pred)
    }

    /// As `expect_event`, waiting at most `timeout`.
    pub fn expect_event_within(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(index) = self.inbox.iter().position(&pred) {
            return self.inbox.remove(index).expect("position is in range");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_doc_before(deadline) {
                Some(doc) if pred(&doc) => return doc,
                Some(doc) => self.inbox.push_back(doc),
                None => panic!(
                    "{what}: nothing within {timeout:?}; inbox: {:?}",
                    self.inbox
                ),
            }
        }
    }

    /// The first `n` documents that match, in arrival order, waiting at most WAIT.
    pub fn expect_events(
        &mut self,
        n: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        let mut found = Vec::with_capacity(n);
        while found.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = found.len();
            found.push(self.expect_event_within(left, &format!("{what} ({got} of {n})"), &pred));
        }
        found
    }

    /// Documents up to and including the first that matches `last`, in arrival order:
    /// the inbox first, then the wire. The inbox is left empty.
    pub fn docs_until(&mut self, what: &str, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut docs: Vec<Value> = self.inbox.drain(..).collect();
        if let Some(index) = docs.iter().position(&last) {
            self.inbox.extend(docs.split_off(index + 1));
            return docs;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next_doc_before(deadline) {
                Some(doc) => {
                    let done = last(&doc);
                    docs.push(doc);
                    if done {
                        return docs;
                    }
                }
                None => panic!("{what}: not within {WAIT:?}; got {docs:?}"),
            }
        }
    }

    /// Remove and return the inbox documents that match, oldest first.
    pub fn take_inbox(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (taken, kept): (Vec<Value>, Vec<Value>) =
            self.inbox.drain(..).partition(|doc| pred(doc));
        self.inbox = kept.into();
        taken
    }

    /// Send a command and return its reply with every document that arrived before it
    /// (the inbox's included); the inbox is left empty. The server handles a session's
    /// commands in order, so whatever was due to this session before the command (on the
    /// path the command's reply takes) arrives before the reply.
    pub fn barrier(&mut self, op: &str, fields: Value) -> (Value, Vec<Value>) {
        let id = self.command(op, fields);
        let reply = self.reply_keeping(id);
        (reply, self.inbox.drain(..).collect())
    }

    /// Assert that nothing matching `pred` has arrived, by a round trip through the home
    /// shard of `conv` (a `conv.get`, answered even to a non-member): an event that
    /// conversation owed this session before now would arrive before that reply. A
    /// `ping` would not do: it is answered by the session's own shard, and an event from
    /// another shard could still be on its way. Other documents stay in the inbox.
    pub fn assert_no_event(&mut self, conv: &str, what: &str, pred: impl Fn(&Value) -> bool) {
        let (_, before) = self.barrier("conv.get", serde_json::json!({ "conv": conv }));
        let (unexpected, kept): (Vec<Value>, Vec<Value>) =
            before.into_iter().partition(|doc| pred(doc));
        assert!(unexpected.is_empty(), "{what}: got {unexpected:?}");
        self.inbox.extend(kept);
    }
}
