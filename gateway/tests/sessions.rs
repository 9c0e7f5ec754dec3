//! parleyd over real WebSockets: authentication, the envelope, limits and close codes.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{token, Client, Daemon, Event, WAIT};
use serde_json::json;

#[test]
fn header_token_authenticates_and_hello_welcomes() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::connect(&daemon, Some(&token("alice", Some("phone"))));
    let id = client.command("hello", json!({}));
    let welcome = client.reply(id);
    assert_eq!(welcome["ok"]["user"], "alice");
    assert_eq!(welcome["ok"]["device"], "phone");
    assert_eq!(welcome["ok"]["node"], "local");
    assert_eq!(welcome["ok"]["heartbeat_ms"], 30_000);
    assert!(welcome["ok"]["server_ts"].as_u64().unwrap() > 1_700_000_000_000);
    let id = client.command("ping", json!({}));
    assert!(client.reply(id)["ok"]["server_ts"].is_u64());
}

/// A client may send frames in the same write as its upgrade request: they wait behind
/// the request head and are served once the upgrade is done, none lost, in order.
#[test]
fn frames_pipelined_behind_the_upgrade_request_are_served() {
    use std::io::Read;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::{Frame, FrameHeader};
    let daemon = Daemon::start(&[]);
    let mut bytes = format!(
        "GET /v1/ws?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        token("bob", None),
        daemon.ws
    )
    .into_bytes();
    for id in 1..=3 {
        let header = FrameHeader {
            is_final: true,
            opcode: OpCode::Data(Data::Text),
            mask: Some([1, 2, 3, 4]),
            ..FrameHeader::default()
        };
        let payload = format!(r#"{{"id":{id},"op":"ping"}}"#).into_bytes();
        Frame::from_payload(header, payload.into())
            .format(&mut bytes)
            .unwrap();
    }
    let mut stream = std::net::TcpStream::connect(daemon.ws).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(&bytes).unwrap();
    // The response head, byte by byte, so nothing behind it is read here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).expect("the upgrade's answer");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
    // Documents may share a frame, one per line (PROTOCOL.md 9.4).
    let mut replies: Vec<String> = Vec::new();
    while replies.len() < 3 {
        let frame = ws.read().expect("a reply").into_text().unwrap();
        replies.extend(frame.lines().map(str::to_string));
    }
    for (id, reply) in (1..=3).zip(&replies) {
        assert!(reply.contains(&format!(r#""re":{id},"#)), "{replies:?}");
    }
}

#[test]
fn query_and_hello_tokens_authenticate() {
    let daemon = Daemon::start(&[]);
    let url = format!("{}?token={}", daemon.url(), token("bob", None));
    let (mut ws, _) = tungstenite::connect(url).expect("upgrade with ?token=");
    ws.send(tungstenite::Message::text(r#"{"id":1,"op":"ping"}"#))
        .unwrap();
    let reply = ws.read().unwrap().into_text().unwrap();
    assert!(
        reply.contains(r#""re":1"#) && reply.contains("server_ts"),
        "{reply}"
    );

    let mut client = Client::connect(&daemon, None);
    let id = client.command(
        "hello",
        json!({"token": token("carol", None), "device": "tab"}),
    );
    let welcome = client.reply(id);
    assert_eq!(welcome["ok"]["user"], "carol");
    assert_eq!(welcome["ok"]["device"], "tab");
}

#[test]
fn bad_tokens_close_4001() {
    let daemon = Daemon::start(&[]);
    // Wrong token on the upgrade: no reply, close 4001.
    let mut client = Client::connect(&daemon, Some("not.a.jwt"));
    assert_eq!(client.expect_close().0, Some(4001));

    // A token signed with another secret in hello: an error reply, then 4001.
    let forged =
        parley_router::auth::JwtKey::new(b"not-the-secret").sign(&parley_router::auth::Claims {
            sub: "mallory".into(),
            exp: u64::MAX,
            dev: None,
        });
    let mut client = Client::connect(&daemon, None);
    let id = client.command("hello", json!({ "token": forged }));
    let reply = client.next_doc();
    assert_eq!(reply["re"], id);
    assert_eq!(reply["err"]["code"], "unauthorized");
    assert_eq!(client.expect_close().0, Some(4001));

    // A command before authenticating.
    let mut client = Client::connect(&daemon, None);
    let id = client.command("ping", json!({}));
    assert_eq!(client.reply(id)["err"]["code"], "unauthorized");
    assert_eq!(client.expect_close().0, Some(4001));
    assert!(daemon.metric("parley_closes_total", "code=\"4001\"") >= 3);
}

#[test]
fn auth_timeout_closes_4002() {
    const AUTH_TIMEOUT: Duration = Duration::from_millis(300);
    let daemon = Daemon::start(&["--auth-timeout-ms", "300"]);
    // The auth window runs from accept (docs/configuration.md), which comes after this
    // instant: so the close cannot come sooner than the whole timeout after it, however
    // long the connect and the upgrade take.
    let started = Instant::now();
    let mut client = Client::connect(&daemon, None);
    let (code, reason) = client.expect_close();
    let waited = started.elapsed();
    assert_eq!(code, Some(4002), "{reason}");
    assert!(
        waited >= AUTH_TIMEOUT,
        "closed {waited:?} after connecting, before the {AUTH_TIMEOUT:?} auth timeout"
    );
}

#[test]
fn malformed_json_gets_an_error_and_the_session_stays_usable() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::authed(&daemon, "alice");
    client.send_text("{this is not json");
    let reply = client.next_doc();
    assert_eq!(reply["re"], json!(null));
    assert_eq!(reply["err"]["code"], "bad_request");
    assert!(reply["err"]["msg"].as_str().unwrap().contains("malformed"));
    client.send_text(r#"{"id":5}"#);
    let reply = client.next_doc();
    assert_eq!(reply["re"], json!(null), "no op: re is null");
    let id = client.command("ping", json!({}));
    assert!(client.reply(id)["ok"].is_object());
    assert_eq!(
        daemon.metric("parley_errors_total", "code=\"bad_request\""),
        2
    );
}

#[test]
fn unknown_op_gets_bad_request_with_its_id() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::authed(&daemon, "alice");
    let id = client.command("teleport", json!({"to": "mars"}));
    let reply = client.reply(id);
    assert_eq!(reply["err"]["code"], "bad_request");
    assert!(reply["err"]["msg"].as_str().unwrap().contains("teleport"));
    let id = client.command("ping", json!({}));
    assert!(client.reply(id)["ok"].is_object());
}

#[test]
fn batched_frame_gets_every_reply() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::authed(&daemon, "alice");
    client.send_text(
        "{\"id\":1,\"op\":\"ping\"}\n{\"id\":2,\"op\":\"ping\"}\n{\"id\":3,\"op\":\"ping\"}",
    );
    for id in 1..=3 {
        assert_eq!(client.next_doc()["re"], id);
    }
}

#[test]
fn oversized_frame_gets_too_large_and_the_session_stays_usable() {
    let daemon = Daemon::start(&[
        "--max-frame-bytes",
        "1024",
        "--max-frame-hard-bytes",
        "65536",
    ]);
    let mut client = Client::authed(&daemon, "alice");
    let big = json!({"id": 1, "op": "ping", "pad": "x".repeat(4000)}).to_string();
    client.send_text(&big);
    let reply = client.next_doc();
    assert_eq!(reply["re"], json!(null));
    assert_eq!(reply["err"]["code"], "too_large");
    let id = client.command("ping", json!({}));
    assert!(client.reply(id)["ok"].is_object());

    // Over the hard limit the frame is not even read: close 1009.
    client.send_text(&"y".repeat(70_000));
    assert_eq!(client.expect_close().0, Some(1009));
}

#[test]
fn rate_limit_replies_then_closes_4008() {
    let daemon = Daemon::start(&[
        "--rate-limit-per-sec",
        "1",
        "--rate-limit-burst",
        "3",
        "--abuse-strikes",
        "10",
    ]);
    let mut client = Client::authed(&daemon, "alice");
    let mut frame = String::new();
    for id in 1..=30 {
        frame.push_str(&format!("{{\"id\":{id},\"op\":\"ping\"}}\n"));
    }
    client.send_text(&frame);
    let mut ok = 0;
    let mut limited = 0;
    let code = loop {
        match client.next_event() {
            Event::Docs(docs) => {
                for doc in docs {
                    if doc["ok"].is_object() {
                        ok += 1;
                    } else {
                        assert_eq!(doc["err"]["code"], "rate_limited", "{doc}");
                        assert!(doc["re"].is_u64(), "answered by id: {doc}");
                        limited += 1;
                    }
                }
            }
            Event::Ping => {}
            Event::Closed(code, _) => break code,
        }
    };
    assert_eq!(ok, 3, "the burst is served");
    assert_eq!(
        limited, 10,
        "every rejected command is answered, the tenth then closes"
    );
    assert_eq!(code, Some(4008));
}

#[test]
fn slow_consumer_is_closed_4009() {
    let daemon = Daemon::start(&[
        // One socket read holds at most 64 KiB, about 2,500 pings, all within the burst;
        // the fast refill restores it between reads. So no ping is rate-limited, and
        // only the backed-up socket can fill the queue.
        "--outbound-queue-len",
        "3100",
        "--write-batch-bytes",
        "4096",
        "--rate-limit-per-sec",
        "1000000000",
        "--rate-limit-burst",
        "3000",
    ]);
    let mut client = Client::slow_reader(&daemon, "slow");
    // Flood in bursts, and stop as soon as the server has closed the session. After its
    // 4009 the server keeps the close frame for close_linger_ms (5 s by default) while
    // this client, which reads nothing while it floods, cannot take it; a flood that went
    // on past that would lose the close frame (and a close with input unread resets the
    // connection). Each burst resumes where the last write stopped, so a pause of the
    // server's reads (a zero-window probe) never cuts a frame in two.
    let ping = br#"{"id":1,"op":"ping"}"#;
    let mut frame = vec![0x81, 0x80 | ping.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(ping);
    let burst = frame.repeat(1000);
    let closes = || daemon.metric("parley_closes_total", "code=\"4009\"");
    let deadline = Instant::now() + WAIT;
    let mut bursts = 0;
    let mut at = 0;
    let stream = client.ws.get_mut();
    stream
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while closes() == 0 {
        assert!(
            Instant::now() < deadline,
            "no 4009 within {WAIT:?}, after {bursts} bursts of 1000 pings"
        );
        // Up to one burst; a write the socket does not take within 50 ms is a turn to
        // look at the counter, not an end.
        while at < burst.len() {
            match stream.write(&burst[at..]) {
                Ok(n) => at += n,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(error) => panic!("flood write failed after {bursts} bursts: {error}"),
            }
        }
        if at == burst.len() {
            at = 0;
            bursts += 1;
        }
    }
    stream.set_write_timeout(None).unwrap();
    let code = loop {
        if let Event::Closed(code, _) = client.next_event() {
            break code;
        }
    };
    assert_eq!(code, Some(4009), "after {bursts} bursts of 1000 pings");
    assert_eq!(closes(), 1);
}

#[test]
fn heartbeat_pings_and_idle_timeout_closes_1001() {
    const HEARTBEAT: Duration = Duration::from_millis(200);
    // The idle timeout leaves the client IDLE - HEARTBEAT to answer each ping (its pong
    // goes out at the start of its next read), ample on a busy machine.
    const IDLE: Duration = Duration::from_millis(2000);
    // Enough pings to outlive the idle timeout by answering them.
    const PINGS: u32 = 12;
    let daemon = Daemon::start(&[
        "--heartbeat-interval-ms",
        "200",
        "--idle-timeout-ms",
        "2000",
    ]);
    // The server pings after HEARTBEAT of silence since the last inbound frame (or the
    // accept, which comes after this instant); each pong starts a new silence.
    let started = Instant::now();
    let mut client = Client::authed(&daemon, "alice");
    let mut last_read = started;
    for n in 1..=PINGS {
        last_read = Instant::now();
        // This read first sends the pong to the previous ping.
        match client.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => {}
            Ok(other) => panic!("ping {n} of {PINGS}: got {other:?}"),
            Err(error) => panic!(
                "ping {n} of {PINGS}: none within {WAIT:?} ({error}) after {:?}",
                started.elapsed()
            ),
        }
    }
    let pinged = started.elapsed();
    assert!(
        pinged >= HEARTBEAT * PINGS,
        "{PINGS} pings in {pinged:?}: each must follow {HEARTBEAT:?} of silence"
    );
    assert!(
        pinged > IDLE,
        "{PINGS} pings in {pinged:?} do not show the pongs kept the session past {IDLE:?}"
    );

    // Now stay silent, and do not even read (a read would answer the last ping): the
    // silence is the point of this test. The server counts the close it sends.
    let deadline = Instant::now() + WAIT;
    while daemon.metric("parley_closes_total", "code=\"1001\"") == 0 {
        assert!(Instant::now() < deadline, "no idle close within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The last pong went out in the last read, after `last_read`.
    let silent = last_read.elapsed();
    assert!(
        silent >= IDLE,
        "closed after {silent:?} of silence, before the {IDLE:?} idle timeout"
    );
    let (code, reason) = client.expect_close();
    assert_eq!(code, Some(1001));
    assert_eq!(reason, "idle timeout");
}

#[test]
fn wrong_path_gets_404_and_subprotocol_is_echoed() {
    let daemon = Daemon::start(&[]);
    let error = tungstenite::connect(format!("ws://{}/elsewhere", daemon.ws)).unwrap_err();
    match error {
        tungstenite::Error::Http(response) => assert_eq!(response.status(), 404),
        other => panic!("expected HTTP 404, got {other}"),
    }
    use tungstenite::client::IntoClientRequest;
    let mut request = daemon.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "parley.v1".parse().unwrap());
    let (_, response) = tungstenite::connect(request).unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "parley.v1");
}

/// The loop-lag histogram of every shard: buckets that add up (cumulative, `+Inf` equal
/// to `_count`), samples that keep coming on an idle shard (probed once a second), and a
/// stall that shows: the whole process stopped (SIGSTOP) for 1.5 s, longer than an idle
/// shard's probe period, puts a sample of every shard above 250 ms (its probe was due at
/// least 0.4 s before the end of the stop).
#[test]
fn loop_lag_histogram_shows_a_stalled_shard() {
    let daemon = Daemon::start(&[]);
    let name = "parley_shard_loop_lag_seconds";
    let count = |shard: u32| daemon.metric(&format!("{name}_count"), &format!("shard=\"{shard}\""));
    let deadline = Instant::now() + WAIT;
    while (0..2).any(|shard| count(shard) < 3) {
        assert!(
            Instant::now() < deadline,
            "the probe never ran 3 times on every shard"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let bounds = [
        "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
        "0.25", "0.5", "1", "+Inf",
    ];
    for shard in 0..2 {
        let (_, body) = daemon.admin_get("/metrics");
        let value = |series: &str| {
            body.lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
                .to_string()
        };
        let counts: Vec<u64> = bounds
            .iter()
            .map(|le| {
                let series = format!("{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}}");
                value(&series).parse().expect("a bucket count")
            })
            .collect();
        assert!(
            counts.windows(2).all(|pair| pair[0] <= pair[1]),
            "shard {shard}: buckets are not cumulative: {counts:?}"
        );
        let total: u64 = value(&format!("{name}_count{{shard=\"{shard}\"}}"))
            .parse()
            .expect("a count");
        assert_eq!(
            counts[bounds.len() - 1],
            total,
            "shard {shard}: +Inf is the count"
        );
        let sum: f64 = value(&format!("{name}_sum{{shard=\"{shard}\"}}"))
            .parse()
            .expect("a sum");
        assert!(
            sum > 0.0,
            "shard {shard}: {total} samples, none late at all: {sum}"
        );
    }
    // Samples above 250 ms: the count less the 250 ms bucket, both of one scrape.
    let above_250ms = |shard: u32| {
        let (_, body) = daemon.admin_get("/metrics");
        let value = |series: String| -> u64 {
            body.lines()
                .find_map(|line| line.strip_prefix(&series)?.strip_prefix(' '))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no count {series} in /metrics:\n{body}"))
        };
        let total = value(format!("{name}_count{{shard=\"{shard}\"}}"));
        total - value(format!("{name}_bucket{{shard=\"{shard}\",le=\"0.25\"}}"))
    };
    let before: Vec<u64> = (0..2).map(above_250ms).collect();
    // The stall itself, not a wait for something: the process does not run for 1.5 s.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid(), libc::SIGCONT) };
    let deadline = Instant::now() + WAIT;
    while (0..2).any(|shard| above_250ms(shard) == before[shard as usize]) {
        assert!(
            Instant::now() < deadline,
            "no shard sample above 250 ms after a 1.5 s stop: {:?}",
            (0..2).map(above_250ms).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A request whose head is not UTF-8 (a header may carry any octet) still gets its
/// response (found by the fuzz target `admin`: it used to get none).
#[test]
fn the_admin_listener_answers_a_request_that_is_not_utf8() {
    use std::io::Read;
    let daemon = Daemon::start(&[]);
    let mut stream = std::net::TcpStream::connect(daemon.admin).expect("connect admin");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nUser-Agent: caf\xe9\r\n\r\n")
        .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    assert!(response.ends_with("\r\n\r\nok\n"), "{response:?}");
}

#[test]
fn metrics_count_connections_sessions_frames_and_errors() {
    let daemon = Daemon::start(&[]);
    let (status, body) = daemon.admin_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "parley_connections{shard=\"0\"}",
        "parley_connections{shard=\"1\"}",
        "parley_sessions{shard=\"1\"}",
        "parley_frames_in_total",
        "parley_frames_out_total",
        "parley_errors_total{shard=\"0\",code=\"rate_limited\"}",
        "parley_closes_total{shard=\"1\",code=\"4009\"}",
        "parley_shard_ready{shard=\"0\"} 1",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    let mut alice = Client::authed(&daemon, "alice");
    let mut bob = Client::connect(&daemon, None);
    let id = bob.command("hello", json!({"token": token("bob", None)}));
    bob.reply(id);
    let id = alice.command("ping", json!({}));
    alice.reply(id);
    alice.send_text("nope");
    alice.next_doc();
    assert_eq!(daemon.metric("parley_connections", ""), 2);
    assert_eq!(daemon.metric("parley_sessions", ""), 2);
    assert_eq!(daemon.metric("parley_frames_in_total", ""), 3);
    assert_eq!(daemon.metric("parley_frames_out_total", ""), 3);
    assert_eq!(
        daemon.metric("parley_errors_total", "code=\"bad_request\""),
        1
    );
    drop(alice);
    drop(bob);
    let deadline = Instant::now() + common::WAIT;
    while daemon.metric("parley_connections", "") != 0 {
        assert!(Instant::now() < deadline, "connections never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(daemon.metric("parley_sessions", ""), 0);
}
