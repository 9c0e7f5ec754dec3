//! The io_uring socket engine frees everything a connection held, however it ends:
//! clean closes, resets, peers that vanish mid-frame or mid-handshake, half-closed
//! peers, and silent ones the idle timeout ends. Checked by counting the engine's
//! fixed-file slots, receive buffers, sends in flight and connections after the churn.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{token, Client, Daemon, WAIT};

/// The engine's gauges that must all return to zero once every connection is gone.
const LEAK_GAUGES: [&str; 5] = [
    "parley_socket_slots",
    "parley_engine_connections",
    "parley_recv_buffers_held",
    "parley_send_buffers_in_flight",
    "parley_connections",
];

/// A metric summed over both shards.
fn total(daemon: &Daemon, name: &str) -> u64 {
    daemon.metric(name, "shard=")
}

/// Wait (bounded) until every leak gauge reads zero; fail naming the ones that do not.
fn assert_all_freed(daemon: &Daemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        let held: Vec<(&str, u64)> = LEAK_GAUGES
            .iter()
            .map(|name| (*name, total(daemon, name)))
            .filter(|(_, value)| *value > 0)
            .collect();
        if held.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still held: {held:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn upgrade_request(daemon: &Daemon, user: &str) -> String {
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        daemon.ws,
        token(user, None)
    )
}

/// Reset instead of FIN when the socket closes.
fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

#[test]
fn io_uring_is_chosen_and_descriptors_remain_a_fallback() {
    let daemon = Daemon::start(&[]);
    // Published by each engine's first turn, which may follow the listening line.
    let deadline = Instant::now() + WAIT;
    while total(&daemon, "parley_socket_rings") < 2 {
        assert!(Instant::now() < deadline, "one ring per shard");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = Client::authed(&daemon, "uring");
    let id = client.command("ping", serde_json::json!({}));
    assert!(client.reply(id)["ok"]["server_ts"].is_u64());

    let fallback = Daemon::start(&["--socket-engine", "descriptors"]);
    assert_eq!(total(&fallback, "parley_socket_rings"), 0);
    let mut client = Client::authed(&fallback, "descriptors");
    let id = client.command("ping", serde_json::json!({}));
    assert!(client.reply(id)["ok"]["server_ts"].is_u64());
}

#[test]
fn churn_leaks_no_slot_buffer_or_connection() {
    let daemon = Daemon::start(&["--close-linger-ms", "500", "--auth-timeout-ms", "1000"]);
    for round in 0..120 {
        let user = format!("churn{round}");
        match round % 6 {
            // Authenticate, ping, close cleanly.
            0 => {
                let mut client = Client::authed(&daemon, &user);
                let id = client.command("ping", serde_json::json!({}));
                client.reply(id);
                client.ws.close(None).unwrap();
                let _ = client.expect_close();
            }
            // Authenticated, then reset.
            1 => {
                let client = Client::authed(&daemon, &user);
                reset_on_close(client.ws.get_ref());
                drop(client);
            }
            // Gone mid-handshake: half a request, then reset.
            2 => {
                let mut stream = TcpStream::connect(daemon.ws).unwrap();
                stream
                    .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
                reset_on_close(&stream);
            }
            // Gone mid-frame: a frame header promising 100 bytes, 3 of them, then FIN.
            3 => {
                let mut stream = TcpStream::connect(daemon.ws).unwrap();
                stream
                    .write_all(upgrade_request(&daemon, &user).as_bytes())
                    .unwrap();
                stream
                    .write_all(&[0x81, 0x80 | 100, 0, 0, 0, 0, b'{', b'"', b'i'])
                    .unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
            }
            // Half-closed: FIN after a ping, keep reading until the server closes.
            4 => {
                let mut client = Client::authed(&daemon, &user);
                client.command("ping", serde_json::json!({}));
                client.ws.get_ref().shutdown(Shutdown::Write).unwrap();
                // The server sees EOF and ends the session; reading ends with it.
                let mut sink = [0u8; 4096];
                let stream = client.ws.get_mut();
                stream.set_read_timeout(Some(WAIT)).unwrap();
                while matches!(std::io::Read::read(stream, &mut sink), Ok(n) if n > 0) {}
            }
            // Connect and say nothing: the auth timeout ends it.
            _ => {
                let stream = TcpStream::connect(daemon.ws).unwrap();
                std::mem::forget(stream);
            }
        }
    }
    // A connection reset while still in the listen queue may never be accepted.
    let accepted = total(&daemon, "parley_connections_accepted_total");
    assert!(accepted >= 100, "{accepted} accepted");
    assert_all_freed(&daemon);
}

#[test]
fn silent_peers_are_ended_by_the_idle_timeout_and_freed() {
    let daemon = Daemon::start(&["--heartbeat-interval-ms", "100", "--idle-timeout-ms", "300"]);
    // Authenticated sessions whose peer never reads nor answers a ping, like a peer
    // whose host vanished: the streams stay open on this side.
    let silent: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut stream = TcpStream::connect(daemon.ws).unwrap();
            stream
                .write_all(upgrade_request(&daemon, &format!("silent{i}")).as_bytes())
                .unwrap();
            stream
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while total(&daemon, "parley_sessions") < 20 {
        assert!(Instant::now() < deadline, "sessions did not authenticate");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_all_freed(&daemon);
    assert_eq!(
        daemon.metric("parley_closes_total", "code=\"1001\""),
        20,
        "each silent session was closed for idleness"
    );
    drop(silent);
}
