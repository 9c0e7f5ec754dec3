//! parleyd over real WebSockets: authentication, the envelope, limits and close codes.

mod common;

use std::time::{Duration, Instant};

use common::{token, Client, Daemon, Event};
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
    let daemon = Daemon::start(&["--auth-timeout-ms", "300"]);
    let mut client = Client::connect(&daemon, None);
    let started = Instant::now();
    let (code, _) = client.expect_close();
    assert_eq!(code, Some(4002));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed early"
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
    let sent = client.flood_pings(2_000);
    let code = loop {
        if let Event::Closed(code, _) = client.next_event() {
            break code;
        }
    };
    assert_eq!(code, Some(4009), "after {sent}k pings");
    assert_eq!(daemon.metric("parley_closes_total", "code=\"4009\""), 1);
}

#[test]
fn heartbeat_pings_and_idle_timeout_closes_1001() {
    let daemon = Daemon::start(&["--heartbeat-interval-ms", "200", "--idle-timeout-ms", "600"]);
    let mut client = Client::authed(&daemon, "alice");
    // Reading answers pings (tungstenite pongs automatically), so the session lives on
    // past several idle timeouts.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        match client.next_event() {
            Event::Ping => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "server sent {pings} pings");
    // Now stay silent: the silence is the point of this test.
    std::thread::sleep(Duration::from_millis(900));
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
