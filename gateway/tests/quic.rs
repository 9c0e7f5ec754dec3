//! The QUIC transport against the real parleyd, with the quiche client of
//! `parley connect --quic` (parley_tools::quic): sessions, interplay with WebSocket users,
//! NAT rebinding across shards, hostile datagrams, TLS pinning, drain, and startup errors.
//! The independent client (Python aioquic) is in tests/python/test_quic.py.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{run_to_exit, token, Client, Daemon, WAIT};
use parley_tools::quic::{BlockingQuic, QuicClientError, QuicOptions, Trust};
use serde_json::{json, Value};

/// A Parley session over QUIC, with bounded waits and an inbox for documents that
/// arrive while waiting for another.
struct QuicUser {
    link: BlockingQuic,
    next_id: u64,
    inbox: Vec<Value>,
}

/// The development certificate's fingerprint, as parleyd logged it at startup.
fn logged_fingerprint(daemon: &Daemon) -> String {
    daemon
        .startup
        .iter()
        .find_map(|line| line.split("sha256=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("parleyd logs the QUIC certificate's sha256")
        .to_string()
}

fn pinned(daemon: &Daemon) -> QuicOptions {
    QuicOptions {
        trust: Trust::Pin(logged_fingerprint(daemon)),
        server_name: "localhost".into(),
        datagrams: true,
    }
}

impl QuicUser {
    /// Connected (certificate pinned) but not authenticated.
    fn connect(daemon: &Daemon) -> QuicUser {
        let link = BlockingQuic::connect(daemon.quic, &pinned(daemon), WAIT)
            .unwrap_or_else(|error| panic!("QUIC connect to {}: {error}", daemon.quic));
        QuicUser {
            link,
            next_id: 1,
            inbox: Vec::new(),
        }
    }

    /// Authenticated as `user` with live delivery started (first conv.list).
    fn chat(daemon: &Daemon, user: &str) -> (QuicUser, Value) {
        let mut client = Self::connect(daemon);
        let welcome = client.ok("hello", json!({"token": token(user, None)}));
        client.ok("conv.list", json!({}));
        (client, welcome)
    }

    fn send(&mut self, op: &str, fields: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut document = fields;
        document["id"] = id.into();
        document["op"] = op.into();
        self.link
            .send_document(&document.to_string())
            .expect("send on the session stream");
        id
    }

    fn next_doc(&mut self) -> Result<Value, QuicClientError> {
        let text = self.link.recv_document(WAIT)?;
        Ok(serde_json::from_str(&text).unwrap_or_else(|_| panic!("server sent {text:?}")))
    }

    /// The first document (inbox first) that `matches`, keeping the others.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.inbox.iter().position(&matches) {
            return self.inbox.remove(at);
        }
        loop {
            let doc = self
                .next_doc()
                .unwrap_or_else(|error| panic!("waiting for {what}: {error}"));
            if matches(&doc) {
                return doc;
            }
            self.inbox.push(doc);
        }
    }

    fn call(&mut self, op: &str, fields: Value) -> Value {
        let id = self.send(op, fields);
        self.wait_for(&format!("the reply to {op}"), |doc| doc["re"] == id)
    }

    fn ok(&mut self, op: &str, fields: Value) -> Value {
        let reply = self.call(op, fields.clone());
        match reply.get("ok") {
            Some(ok) => ok.clone(),
            None => panic!("{op} {fields} failed: {reply}"),
        }
    }

    /// Read until the server closes the connection; its application error code.
    fn expect_close(&mut self) -> (u64, String) {
        loop {
            match self.next_doc() {
                Ok(doc) => self.inbox.push(doc),
                Err(QuicClientError::Closed { code, reason }) => return (code, reason),
                Err(error) => panic!("expected a close from the server, got {error}"),
            }
        }
    }
}

#[test]
fn quic_and_websocket_users_chat_both_ways() {
    let daemon = Daemon::start(&[]);
    let (mut quic, welcome) = QuicUser::chat(&daemon, "qalice");
    assert_eq!(welcome["user"], "qalice");
    assert!(
        welcome["session"].as_str().unwrap().contains(".q"),
        "{welcome}"
    );
    let mut ws = Client::chat(&daemon, "wbob");

    let conv = quic.ok(
        "conv.create",
        json!({"kind": "direct", "members": ["wbob"]}),
    )["conv"]
        .as_str()
        .unwrap()
        .to_string();
    let sent = quic.ok(
        "send",
        json!({"conv": conv, "cmid": "q1", "body": "over QUIC"}),
    );
    let got = ws.expect_event("the QUIC user's message", |doc| {
        doc["ev"] == "msg" && doc["cmid"] == "q1"
    });
    assert_eq!(got["body"], "over QUIC");
    assert_eq!(got["seq"], sent["seq"]);

    let sent = ws.ok(
        "send",
        json!({"conv": conv, "cmid": "w1", "body": "over WebSocket"}),
    );
    let got = quic.wait_for("the WebSocket user's message", |doc| {
        doc["ev"] == "msg" && doc["cmid"] == "w1"
    });
    assert_eq!(got["body"], "over WebSocket");
    assert_eq!(got["seq"], sent["seq"]);
    assert!(daemon.metric("parley_quic_retries_total", "") >= 1);
}

#[test]
fn typing_reaches_a_quic_user_as_a_datagram() {
    let daemon = Daemon::start(&[]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qtyper");
    let mut ws = Client::chat(&daemon, "wtyper");
    let conv = ws.ok(
        "conv.create",
        json!({"kind": "direct", "members": ["qtyper"]}),
    )["conv"]
        .as_str()
        .unwrap()
        .to_string();
    // typing gets no reply on success (docs/protocol.md).
    ws.command("typing", json!({"conv": conv, "on": true}));
    let typing = quic.wait_for("typing", |doc| doc["ev"] == "typing");
    assert_eq!(typing["user"], "wtyper");
    assert_eq!(quic.link.session.datagrams_received, 1);

    // And the other way: typing sent as a DATAGRAM.
    let sent = quic
        .link
        .session
        .send_datagram(&json!({"id": 99, "op": "typing", "conv": conv, "on": true}).to_string());
    assert!(sent, "datagrams were negotiated");
    quic.link.flush().unwrap();
    let typing = ws.expect_event("typing from the QUIC user", |doc| doc["ev"] == "typing");
    assert_eq!(typing["user"], "qtyper");
}

#[test]
fn a_session_survives_its_client_changing_ports_across_shards() {
    // Twelve rebindings that keep the connection id: thirteen client addresses.
    let daemon = Daemon::start(&["--quic-max-client-addresses", "16"]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qmover");
    let mut ws = Client::chat(&daemon, "wstill");
    let conv = ws.ok(
        "conv.create",
        json!({"kind": "direct", "members": ["qmover"]}),
    )["conv"]
        .as_str()
        .unwrap()
        .to_string();
    // Each new source port lands on either shard (SO_REUSEPORT hashes the address), so
    // twelve moves reach the shard that does not own the connection with near certainty
    // (all twelve on the owner: 1 in 4096); its packets must then be forwarded.
    for round in 0..12 {
        quic.link.rebind_source_port().unwrap();
        quic.ok("ping", json!({}));
        let cmid = format!("m{round}");
        ws.ok(
            "send",
            json!({"conv": conv, "cmid": cmid, "body": "still there?"}),
        );
        quic.wait_for("a message after the move", |doc| {
            doc["ev"] == "msg" && doc["cmid"] == cmid.as_str()
        });
    }
    // One connection, one session throughout: no second handshake happened.
    assert_eq!(daemon.metric("parley_quic_handshakes_total", ""), 1);
    assert_eq!(daemon.metric("parley_quic_connections", ""), 1);
    assert!(
        daemon.metric("parley_quic_forwarded_total", "") > 0,
        "no move landed on the other shard in 12 tries"
    );
}

/// Wait (bounded, polling) until `parley_quic_dropped_total` has reached `at_least`.
fn wait_dropped(daemon: &Daemon, at_least: u64, what: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let dropped = daemon.metric("parley_quic_dropped_total", "");
        if dropped >= at_least {
            return dropped;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {dropped} datagrams counted as dropped within {WAIT:?}, not {at_least}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hostile_datagrams_cost_nothing_and_disturb_no_session() {
    let daemon = Daemon::start(&[]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qsteady");
    // What the session's own handshake left in the counter (nothing, normally).
    let before = daemon.metric("parley_quic_dropped_total", "");
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = daemon.quic;
    let mut noise = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = || {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        noise
    };
    for round in 0..3000u32 {
        let datagram: Vec<u8> = match round % 3 {
            // Garbage of any size (never a long header: a random one could be a valid
            // Initial of an unknown version, which is answered, not dropped).
            0 => (0..1 + (random() % 1400) as usize)
                .map(|_| random() as u8 & 0x3f)
                .collect(),
            // A short-header packet for a connection id nobody issued.
            1 => {
                let mut packet = vec![0x40];
                packet.extend((0..40).map(|_| random() as u8));
                packet
            }
            // A truncated long-header Initial (version 1).
            _ => vec![0xc0, 0, 0, 0, 1, 8, 1, 2, 3],
        };
        attacker.send_to(&datagram, target).unwrap();
        if round % 100 == 99 {
            // Pace on the counter itself: the shard whose socket the kernel gives the
            // attacker's address (SO_REUSEPORT) has read and counted every datagram so
            // far (one a shard forwards is counted where it lands), so at most 100 wait
            // in a socket buffer, far below its size, and none is lost in the kernel.
            let sent = u64::from(round) + 1;
            wait_dropped(&daemon, before + sent, "pacing");
            // And the real session is served throughout.
            quic.ok("ping", json!({}));
        }
    }
    // An Initial from a spoofable address below the 1200-byte minimum (dropped), and one
    // with a forged retry token (a bad token): neither may create state.
    let mut initial = vec![0xc0, 0, 0, 0, 1, 8];
    initial.extend([7u8; 8]);
    initial.extend([0u8, 4, b'f', b'a', b'k', b'e']);
    attacker.send_to(&initial, target).unwrap();
    let mut forged = initial.clone();
    forged.resize(1200, 0);
    attacker.send_to(&forged, target).unwrap();

    // Every hostile datagram was read and counted once, no more.
    let deadline = Instant::now() + WAIT;
    while daemon.metric("parley_quic_bad_tokens_total", "") == 0 {
        assert!(
            Instant::now() < deadline,
            "the forged token was not counted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dropped = wait_dropped(&daemon, before + 3001, "at the end");
    assert_eq!(
        dropped - before,
        3001,
        "hostile datagrams counted as dropped"
    );
    assert_eq!(daemon.metric("parley_quic_bad_tokens_total", ""), 1);
    assert_eq!(daemon.metric("parley_quic_connections", ""), 1);
    assert_eq!(daemon.metric("parley_quic_handshakes_total", ""), 1);
    quic.ok("ping", json!({}));
}

#[test]
fn the_first_document_must_be_hello_with_a_valid_token() {
    // Refused for what they sent: under the default auth timeout, so that a slow
    // handshake (a Retry round trip on a busy machine) cannot end them first.
    let daemon = Daemon::start(&[]);
    let mut early = QuicUser::connect(&daemon);
    let id = early.send("ping", json!({}));
    let refused = early.wait_for("the refusal", |doc| doc["re"] == id);
    assert_eq!(refused["err"]["code"], "unauthorized");
    assert_eq!(early.expect_close().0, 4001);

    let mut forged = QuicUser::connect(&daemon);
    forged.send("hello", json!({"token": "not.a.jwt"}));
    assert_eq!(forged.expect_close().0, 4001);

    // Refused for saying nothing: 4002, the auth timeout's own code, is the proof. The
    // session's auth window starts when the server accepts the connection, after this
    // instant, so the close cannot come sooner.
    let daemon = Daemon::start(&["--auth-timeout-ms", "500"]);
    let started = Instant::now();
    let mut silent = QuicUser::connect(&daemon);
    assert_eq!(silent.expect_close().0, 4002);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "closed {waited:?} after connecting, before the 500 ms auth timeout"
    );
}

#[test]
fn oversized_and_malformed_documents_get_errors_and_the_session_stays() {
    let daemon = Daemon::start(&["--max-frame-bytes", "1024"]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qbig");
    let big = json!({"op": "ping", "id": 5, "pad": "x".repeat(4000)}).to_string();
    quic.link.send_document(&big).unwrap();
    let refused = quic.wait_for("too_large", |doc| doc["err"]["code"] == "too_large");
    assert!(refused["err"]["msg"].as_str().unwrap().contains("1024"));
    quic.link.send_document("{not json").unwrap();
    quic.wait_for("bad_request", |doc| doc["err"]["code"] == "bad_request");
    // Pretty-printed JSON is one document on QUIC (no newline splitting).
    quic.link
        .send_document("{\n  \"id\": 77,\n  \"op\": \"ping\"\n}")
        .unwrap();
    let pong = quic.wait_for("the pong", |doc| doc["re"] == 77);
    assert!(pong["ok"]["server_ts"].is_u64(), "{pong}");
}

#[test]
fn a_wrong_pin_is_refused_before_any_token_is_sent() {
    let daemon = Daemon::start(&[]);
    let mut options = pinned(&daemon);
    options.trust = Trust::Pin("00:11".into());
    match BlockingQuic::connect(daemon.quic, &options, WAIT) {
        Err(QuicClientError::PinMismatch { found, .. }) => {
            assert_eq!(found, logged_fingerprint(&daemon))
        }
        Err(other) => panic!("expected a pin mismatch, got {other}"),
        Ok(_) => panic!("a wrong pin was accepted"),
    }
    // The certificate also verifies as its own CA, by name.
    let ca = QuicOptions {
        trust: Trust::Ca(daemon.data_dir.path().join("quic-dev-cert.pem")),
        server_name: "localhost".into(),
        datagrams: false,
    };
    BlockingQuic::connect(daemon.quic, &ca, WAIT).expect("the dev certificate verifies");
}

#[test]
fn drain_closes_quic_sessions_with_1001() {
    let mut daemon = Daemon::start(&[]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qdrained");
    let (status, _) = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    // The drain sent the close before the process exited; it waits in our socket.
    assert_eq!(quic.expect_close().0, 1001);
}

/// A client that ends its session by finishing the session stream (FIN) gets the
/// connection closed at once with 1001, rather than kept until the idle timeout with its
/// session still known (found by the fuzz target `quic`).
#[test]
fn a_client_finishing_its_stream_has_the_connection_closed() {
    let daemon = Daemon::start(&[]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qfinished");
    quic.link
        .session
        .conn
        .stream_send(0, &[], true)
        .expect("finish the session stream");
    quic.link.flush().expect("send the FIN");
    let (code, reason) = quic.expect_close();
    assert_eq!((code, reason.as_str()), (1001, "peer closed"));
}

#[test]
fn without_retry_a_client_connects_in_one_round_trip() {
    let daemon = Daemon::start(&["--quic-retry", "false"]);
    let (mut quic, _) = QuicUser::chat(&daemon, "qfast");
    quic.ok("ping", json!({}));
    assert_eq!(daemon.metric("parley_quic_retries_total", ""), 0);
    assert_eq!(daemon.metric("parley_quic_handshakes_total", ""), 1);
}

/// Run parleyd on free ports (QUIC on `quic_listen`) plus `extra`, expecting it to refuse
/// to start: its exit status and stderr.
fn refused_start(quic_listen: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = common::local_args(dir.path());
    let quic_flag = args.iter().position(|a| a == "--quic-listen").unwrap();
    args[quic_flag + 1] = quic_listen.to_string();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stderr) = run_to_exit(&args, &[]);
    (status.code(), stderr)
}

#[test]
fn a_busy_quic_port_refuses_the_start_with_the_setting_named() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let (code, stderr) = refused_start(&addr.to_string(), &[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("cannot listen on quic_listen {addr}")),
        "{stderr}"
    );
}

#[test]
fn half_a_configured_certificate_refuses_the_start() {
    let (code, stderr) = refused_start("127.0.0.1:0", &["--quic-cert", "/nonexistent/cert.pem"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("must be set together"), "{stderr}");
}
