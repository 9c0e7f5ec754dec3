//! The seed corpora: real examples of what each target parses, made by the code that
//! makes them for real (the wal writes the segments and the state file, quiche the
//! Initial, tungstenite's client the upgrade request, the key the tokens), so that the
//! fuzzer starts from inputs that get deep. `cargo test -p parley-fuzz-harness --test
//! corpus -- --ignored write_seeds` writes them under tools/fuzz/corpus; they are
//! checked in, small, and replayed by `cargo test` like every other corpus input.

use std::sync::Arc;

use parley_router::framing::frame_document;
use parley_router::memory_pipe::MemoryPipe;
use parley_router::record::{
    ChatRecord, ConvKind, CursorAdvance, MemberChange, MessageKind, StoredMessage, CHAT_RECORD_TYPE,
};
use parley_router::sequencer::Sequencer;
use parley_wal::io::SyncIo;
use parley_wal::{Entry, Wal, WalOptions};

use crate::fixture::{self, ScratchDir, TOKEN_EXP};
use crate::input::Chunks;

/// One seed: its target, a name for its file, and its bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(session());
    seeds.extend(ws());
    seeds.extend(quic());
    seeds.extend(framing());
    seeds.extend(wal());
    seeds.extend(records());
    seeds.extend(jwt());
    seeds.extend(admin());
    seeds.extend(config());
    seeds
}

/// The upgrade request tungstenite's client writes (parley's own client uses it), with
/// `token` as a bearer token, the sub-protocol offered.
pub fn upgrade_request(token: Option<&str>) -> Vec<u8> {
    use tungstenite::client::IntoClientRequest;
    let mut request = "ws://127.0.0.1:7070/v1/ws"
        .into_client_request()
        .expect("a request");
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "parley.v1".parse().expect("header"),
    );
    if let Some(token) = token {
        let bearer = format!("Bearer {token}").parse().expect("header");
        headers.insert("authorization", bearer);
    }
    let pipe = MemoryPipe::default();
    match tungstenite::client(request, pipe) {
        Err(tungstenite::HandshakeError::Interrupted(mid)) => {
            mid.get_ref().get_ref().output.clone()
        }
        _ => panic!("a client handshake over an empty pipe waits for the response"),
    }
}

fn hello(token: &str) -> String {
    format!(r#"{{"id":1,"op":"hello","token":"{token}","device":"laptop"}}"#)
}

/// A client's documents, one of each op, as PROTOCOL.md section 5 writes them.
fn commands() -> Vec<&'static str> {
    vec![
        r#"{"id":2,"op":"ping"}"#,
        r#"{"id":3,"op":"conv.create","kind":"group","members":["bob","carol"],"title":"lunch"}"#,
        r#"{"id":4,"op":"conv.create","kind":"direct","members":["bob"]}"#,
        r#"{"id":5,"op":"send","conv":"g-1","cmid":"c-1","body":"hello ☃"}"#,
        r#"{"id":6,"op":"send","conv":"g-1","cmid":"c-2","body":"","kind":"image","media":{"url":"https://x/y.png","w":3,"h":4},"reply_to":1}"#,
        r#"{"id":7,"op":"history","conv":"g-1","before":9,"limit":5}"#,
        r#"{"id":8,"op":"history","conv":"g-1","after":2}"#,
        r#"{"id":9,"op":"sync","cursors":[{"conv":"g-1","after":3},{"conv":"d-2","after":0}]}"#,
        r#"{"id":10,"op":"ack","conv":"g-1","seq":2}"#,
        r#"{"id":11,"op":"read","conv":"g-1","seq":2}"#,
        r#"{"id":12,"op":"typing","conv":"g-1","on":true}"#,
        r#"{"id":13,"op":"react","conv":"g-1","seq":1,"emoji":"👍","on":true}"#,
        r#"{"id":14,"op":"presence.get","users":["bob","carol"]}"#,
        r#"{"id":15,"op":"member.add","conv":"g-1","users":["dave"]}"#,
        r#"{"id":16,"op":"member.remove","conv":"g-1","users":["dave"]}"#,
        r#"{"id":17,"op":"conv.get","conv":"g-1"}"#,
        r#"{"id":18,"op":"conv.list"}"#,
        r#"{"id":19,"op":"conv.leave","conv":"d-2"}"#,
        r#"{"id":20,"op":"search","q":"Crème \"lunch plans\" cho*","conv":"g-1","from":"bob","after_ts":1,"before_ts":99999999999999,"limit":5}"#,
    ]
}

fn session() -> Vec<Seed> {
    let mut every_op = Chunks::with_options(&[0]).push(0, hello(&fixture::token()).as_bytes());
    for command in commands() {
        every_op = every_op.push(0, command.as_bytes());
    }
    let one_frame = commands().join("\n");
    let resume = r#"{"id":1,"op":"hello","resume":[{"conv":"g-1","after":4}]}"#;
    vec![
        (
            "session",
            "every-op",
            every_op.push(7, &[0, 0, 0x75, 0x30]).finish(),
        ),
        (
            "session",
            "upgrade-token-one-frame",
            Chunks::with_options(&[1])
                .push(0, resume.as_bytes())
                .push(4, one_frame.as_bytes())
                .finish(),
        ),
        (
            "session",
            "refusals",
            Chunks::with_options(&[2])
                .push(
                    0,
                    br#"{"id":1,"op":"send","conv":"g","cmid":"c","body":"early"}"#,
                )
                .finish(),
        ),
        (
            "session",
            "errors-after-hello",
            Chunks::with_options(&[3])
                .push(0, hello(&fixture::device_token()).as_bytes())
                .push(0, b"{not json")
                .push(0, br#"{"id":2,"op":"fly"}"#)
                .push(0, br#"{"op":"ping"}"#)
                .push(5, b"")
                .push(6, &[9])
                .push(
                    0,
                    br#"{"id":3,"op":"history","conv":"g","before":1,"after":2}"#,
                )
                .push(8, b"")
                .push(7, &[0, 1, 0x24, 0xf8])
                .finish(),
        ),
    ]
}

fn ws() -> Vec<Seed> {
    let text = |doc: &str| [&[0x81u8][..], doc.as_bytes()].concat();
    let mut session = Chunks::with_options(&[0])
        .push(0, &upgrade_request(None))
        .push(5, &text(&hello(&fixture::token())));
    for command in commands().into_iter().take(6) {
        session = session.push(5, &text(command));
    }
    let session = session
        .push(5, &[0x89, b'h', b'i'])
        .push(6, &[0, 0x75, 0x30])
        .push(5, &[0x88, 0x03, 0xe8, b'b', b'y', b'e'])
        .finish();
    // A request and frames in one read, as a client that does not wait writes them.
    let mut pipelined = upgrade_request(Some(&fixture::token()));
    pipelined.extend(crate::ws::client_frame(&text(r#"{"id":1,"op":"hello"}"#)));
    pipelined.extend(crate::ws::client_frame(&text(
        "{\"id\":2,\"op\":\"ping\"}\n{\"id\":3,\"op\":\"conv.list\"}",
    )));
    let query = String::from_utf8(upgrade_request(None))
        .expect("text")
        .replace("/v1/ws", &format!("/v1/ws?x=1&token={}", fixture::token()));
    vec![
        ("ws", "upgrade-hello-commands-close", session),
        (
            "ws",
            "pipelined-bearer",
            Chunks::with_options(&[0])
                .push(0, &pipelined)
                .push(7, b"")
                .finish(),
        ),
        (
            "ws",
            "query-token-fragments",
            Chunks::with_options(&[0])
                .push(0, query.as_bytes())
                .push(5, &[0x01, b'{', b'"', b'i', b'd', b'"'])
                .push(
                    5,
                    &[
                        0x80, b':', b'1', b',', b'"', b'o', b'p', b'"', b':', b'"', b'p', b'i',
                        b'n', b'g', b'"', b'}',
                    ],
                )
                .push(5, &[0x82, 1, 2, 3])
                .finish(),
        ),
        (
            "ws",
            "wrong-path",
            Chunks::with_options(&[0])
                .push(
                    0,
                    &String::from_utf8(upgrade_request(None))
                        .expect("text")
                        .replace("/v1/ws", "/chat")
                        .into_bytes(),
                )
                .finish(),
        ),
    ]
}

fn quic() -> Vec<Seed> {
    let mut config = crate::quic::client_config();
    let scid = quiche::ConnectionId::from_ref(&[0xc1; 16]);
    let mut conn = quiche::connect(
        Some("localhost"),
        &scid,
        crate::quic::client_addr(),
        crate::quic::server_addr(),
        &mut config,
    )
    .expect("client");
    let mut initial = vec![0; 1350];
    let (len, _) = conn.send(&mut initial).expect("a client's first datagram");
    initial.truncate(len);
    let mut stream = Vec::new();
    frame_document(&mut stream, hello(&fixture::token()).as_bytes());
    for command in commands().into_iter().take(4) {
        frame_document(&mut stream, command.as_bytes());
    }
    let typing = br#"{"id":40,"op":"typing","conv":"g-1","on":true}"#;
    let session = |options: u8| {
        Chunks::with_options(&[options])
            .push(2, &stream)
            .push(3, typing)
            .push(4, &[0, 0x13, 0x88])
            .push(5, &[])
            .finish()
    };
    vec![
        (
            "quic",
            "real-initial",
            Chunks::with_options(&[0]).push(0, &initial).finish(),
        ),
        (
            "quic",
            "real-initial-retry",
            Chunks::with_options(&[1]).push(0, &initial).finish(),
        ),
        ("quic", "session", session(0)),
        ("quic", "session-retry", session(1)),
    ]
}

fn framing() -> Vec<Seed> {
    let mut stream = Vec::new();
    frame_document(&mut stream, br#"{"id":1,"op":"ping"}"#);
    frame_document(&mut stream, &[b'x'; 100]);
    frame_document(&mut stream, b"{\n\"id\":2,\n\"op\":\"ping\"}");
    stream.extend_from_slice(&[0, 0, 0]);
    vec![("framing", "documents", [&[64u8, 7][..], &stream].concat())]
}

/// The records of a short conversation, as the sequencer writes them.
fn conversation() -> Vec<ChatRecord> {
    let message = |seq: u64, body: &str, reply_to: Option<u64>| {
        ChatRecord::Message(StoredMessage {
            conv: "g-1".into(),
            seq,
            from: "alice".into(),
            cmid: format!("c-{seq}"),
            ts: 1_750_000_000_000 + seq,
            kind: if reply_to.is_some() {
                MessageKind::Image
            } else {
                MessageKind::Text
            },
            body: body.into(),
            media: reply_to.map(|_| r#"{"url":"https://x/y.png"}"#.into()),
            reply_to,
        })
    };
    vec![
        ChatRecord::ConvCreated {
            conv: "g-1".into(),
            kind: ConvKind::Group,
            title: Some("lunch".into()),
            creator: "alice".into(),
            members: vec!["alice".into(), "bob".into()],
            ts: 1_750_000_000_000,
        },
        message(1, "hello ☃", None),
        ChatRecord::Members {
            conv: "g-1".into(),
            by: "alice".into(),
            change: MemberChange::Added,
            users: vec!["carol".into()],
            ts: 1_750_000_000_010,
        },
        message(2, "", Some(1)),
        ChatRecord::Cursors(vec![
            CursorAdvance {
                conv: "g-1".into(),
                user: "bob".into(),
                device: Some("phone".into()),
                seq: 2,
            },
            CursorAdvance {
                conv: "g-1".into(),
                user: "bob".into(),
                device: None,
                seq: 1,
            },
        ]),
        ChatRecord::Reaction {
            conv: "g-1".into(),
            seq: 1,
            user: "bob".into(),
            emoji: "👍".into(),
            on: true,
        },
        ChatRecord::Members {
            conv: "g-1".into(),
            by: "carol".into(),
            change: MemberChange::Left,
            users: vec!["carol".into()],
            ts: 1_750_000_000_020,
        },
        ChatRecord::LastSeen {
            user: "bob".into(),
            ts: 1_750_000_000_030,
        },
    ]
}

fn wal() -> Vec<Seed> {
    let options = |segment_size| WalOptions {
        segment_size,
        max_batch_bytes: 8 * 1024,
        direct_io: false,
        ..WalOptions::default()
    };
    let records: Vec<Vec<u8>> = conversation().iter().map(ChatRecord::encode).collect();
    // `each_durable`: every batch is made durable before the next (a flush each, so
    // small segments fill); otherwise the writer groups them as it will.
    let write = |segment_size: u64, each_durable: bool| {
        let dir = ScratchDir::new();
        let (wal, _) = Wal::open_with_io(
            dir.path(),
            options(segment_size),
            Box::new(SyncIo),
            &mut |_| {},
        )
        .expect("open");
        for (i, record) in records.iter().enumerate() {
            // Some records alone, some in batches of three, each durable before the next.
            let batch: Vec<Entry> = (0..if i % 2 == 0 { 1 } else { 3 })
                .map(|_| Entry {
                    record_type: CHAT_RECORD_TYPE,
                    timestamp: 1_750_000_000_000 + i as u64,
                    payload: record,
                })
                .collect();
            let lsn = wal.append_batch(&batch).expect("append");
            if each_durable || i + 1 == records.len() {
                wal.wait_durable(lsn).expect("durable");
            }
        }
        let state = replayed().snapshot().expect("a snapshot");
        wal.save_state(wal.durable_lsn(), &state)
            .expect("save state");
        wal.close().expect("close");
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        let segments: Vec<Vec<u8>> = files
            .iter()
            .map(|p| std::fs::read(p).expect("segment"))
            .collect();
        let state_file = std::fs::read(dir.path().join("state")).expect("state file");
        (segments, state_file)
    };
    let (one, state_file) = write(16 * 1024, false);
    let segment = one.into_iter().next().expect("one segment");
    // Trailing zeros past the last record's block are what a fresh segment holds too:
    // cut to keep the seed small (a short file is a case of its own).
    let used = segment.iter().rposition(|&b| b != 0).map_or(0, |at| at + 1);
    let trimmed = segment[..parley_wal::format::align_up(used, 4096)].to_vec();
    let (two, _) = write(8 * 1024, true);
    let blocks = (two[0].len() / 4096) as u8;
    let joined: Vec<u8> = two.iter().take(2).flatten().copied().collect();
    vec![
        (
            "wal_recovery",
            "segment",
            [&[0u8, 0][..], &trimmed].concat(),
        ),
        (
            "wal_recovery",
            "segment-sealed",
            [&[3u8, 0][..], &trimmed].concat(),
        ),
        (
            "wal_recovery",
            "two-segments",
            [&[8u8 | 3, blocks][..], &joined].concat(),
        ),
        ("snapshot", "state-file", state_file),
    ]
}

/// A sequencer that replayed [`conversation`].
fn replayed() -> Sequencer {
    let mut sequencer = Sequencer::new(Arc::new(fixture::chat_limits()));
    for (lsn, record) in (1..).zip(conversation()) {
        sequencer
            .replay(lsn, &record.encode())
            .expect("the seed records replay");
    }
    sequencer
}

fn records() -> Vec<Seed> {
    let names = [
        "conv-created",
        "message",
        "members",
        "message-reply",
        "cursors",
        "reaction",
        "left",
        "last-seen",
    ];
    let mut seeds: Vec<Seed> = names
        .into_iter()
        .zip(conversation())
        .map(|(name, record)| ("record", name, record.encode()))
        .collect();
    let mut replay = Chunks::default();
    for record in conversation() {
        replay = replay.push(0, &record.encode());
    }
    seeds.push(("record", "replay", replay.finish()));
    let state = replayed().snapshot().expect("a snapshot");
    let mut after_snapshot = Chunks::default().push(1, &state);
    after_snapshot = after_snapshot.push(
        0,
        &ChatRecord::Message(StoredMessage {
            conv: "g-1".into(),
            seq: 3,
            from: "bob".into(),
            cmid: "b-1".into(),
            ts: 1_750_000_000_040,
            kind: MessageKind::Text,
            body: "after the snapshot".into(),
            media: None,
            reply_to: Some(2),
        })
        .encode(),
    );
    seeds.push(("record", "snapshot-then-replay", after_snapshot.finish()));
    seeds.push(("snapshot", "state", state));
    seeds
}

fn jwt() -> Vec<Seed> {
    let key = fixture::key();
    let expired = key.sign(&parley_router::auth::Claims {
        sub: "alice".into(),
        exp: 1_000,
        dev: None,
    });
    let claims = format!(r#"{{"sub":"bob","exp":{TOKEN_EXP},"dev":"tablet"}}"#);
    vec![
        (
            "jwt",
            "valid",
            [b"\0", fixture::token().as_bytes()].concat(),
        ),
        (
            "jwt",
            "valid-device",
            [b"\0", fixture::device_token().as_bytes()].concat(),
        ),
        ("jwt", "expired", [b"\0", expired.as_bytes()].concat()),
        (
            "jwt",
            "alg-none",
            b"\0eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.".to_vec(),
        ),
        (
            "jwt",
            "sign-claims",
            [
                &b"\x01{\"alg\":\"HS256\",\"typ\":\"JWT\"}\0"[..],
                claims.as_bytes(),
            ]
            .concat(),
        ),
    ]
}

fn admin() -> Vec<Seed> {
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:7072\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n")
    };
    vec![
        (
            "admin",
            "metrics",
            [b"\x01", get("/metrics").as_bytes()].concat(),
        ),
        (
            "admin",
            "readyz",
            [b"\x01", get("/readyz").as_bytes()].concat(),
        ),
        (
            "admin",
            "readyz-draining",
            [b"\x03", get("/readyz?verbose=1").as_bytes()].concat(),
        ),
        (
            "admin",
            "healthz",
            [b"\x00", get("/healthz").as_bytes()].concat(),
        ),
        (
            "admin",
            "post",
            b"\x00POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
        ),
    ]
}

fn config() -> Vec<Seed> {
    let docs = include_str!("../../../docs/configuration.md");
    let example = docs
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/configuration.md has an example file");
    // Every setting at its documented default, as a file would write it.
    let mut every = String::new();
    for doc in parley_gateway::config::Settings::docs() {
        let shown = doc.default.split(" (").next().unwrap_or_default();
        let value = if shown == "\"\""
            || shown.parse::<i64>().is_ok()
            || shown == "true"
            || shown == "false"
        {
            shown.to_string()
        } else {
            format!("{shown:?}")
        };
        every.push_str(&format!("{} = {value}\n", doc.name));
    }
    vec![
        ("config", "docs-example", example.as_bytes().to_vec()),
        ("config", "every-setting", every.into_bytes()),
        (
            "config",
            "invalid",
            b"idle_timeout_ms = 1000\nheartbeat_interval_ms = 2000\n".to_vec(),
        ),
        ("config", "unknown-key", b"[shard]\nmax = 3\n".to_vec()),
    ]
}
