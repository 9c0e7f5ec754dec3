//! Starts after a crash: the health endpoints answer, documented ids hold, and a data
//! dir it cannot trust (a corrupted record, another shard count) is refused with where.

use super::*;

#[test]
fn readyz_and_healthz_answer_after_a_kill_9_restart() {
    let mut daemon = start(tempfile::tempdir().expect("tempdir"));
    let (a, b) = direct_pair("ready-", 0, 1);
    let conv = create_direct(&daemon, &a, &b);
    let mut client = session(&daemon, &a, "phone");
    let mut acked = Vec::new();
    for n in 0..20 {
        let sent = ok(
            &mut client,
            "send",
            json!({"conv": conv, "cmid": format!("ready-{n}"), "body": format!("before the kill {n}")}),
        );
        acked.push(sent["seq"].as_u64().unwrap());
    }
    assert_eq!(acked, (1..=20).collect::<Vec<_>>());
    let data_dir = kill9(&mut daemon);

    // Daemon::start_in returns once parleyd logged that it listens.
    let daemon = start(data_dir);
    assert_eq!(daemon.admin_get("/readyz"), (200, "ready\n".to_string()));
    assert_eq!(daemon.admin_get("/healthz"), (200, "ok\n".to_string()));
    let mut client = session(&daemon, &b, "tablet");
    let msgs = history(&mut client, &conv);
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, acked);
}

/// The one direct conversation id the docs show (docs/protocol.md section 10 and
/// operations.md): alice and bob's is `d-141a4cd242b67e82edf4a78bb418d40a`, whichever of
/// them creates it, another pair's is another, and it stays the same across kill -9.
#[test]
fn direct_conversation_ids_are_the_documented_ones() {
    const ALICE_BOB: &str = "d-141a4cd242b67e82edf4a78bb418d40a";
    let mut daemon = start(tempfile::tempdir().expect("tempdir"));
    // create_direct checks the form and that bob creating it gets the same id back.
    assert_eq!(create_direct(&daemon, "alice", "bob"), ALICE_BOB);
    let carol = create_direct(&daemon, "carol", "alice");
    assert_ne!(carol, ALICE_BOB);
    let mut alice = session(&daemon, "alice", "phone");
    let sent = ok(
        &mut alice,
        "send",
        json!({"conv": ALICE_BOB, "cmid": "doc-1", "body": "hi bob"}),
    );
    assert_eq!(sent["mid"], format!("{ALICE_BOB}#1"));
    let data_dir = kill9(&mut daemon);

    let daemon = start(data_dir);
    let mut bob = session(&daemon, "bob", "tablet");
    let again = ok(
        &mut bob,
        "conv.create",
        json!({"kind": "direct", "members": ["alice"]}),
    );
    assert_eq!(again["conv"], ALICE_BOB, "{again}");
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["members"], json!(["alice", "bob"]), "{again}");
    let mut alice = session(&daemon, "alice", "phone");
    let again = ok(
        &mut alice,
        "conv.create",
        json!({"kind": "direct", "members": ["carol"]}),
    );
    assert_eq!(again["conv"], carol.as_str(), "{again}");
    assert_eq!(again["created"], false, "{again}");
    let msgs = history(&mut bob, ALICE_BOB);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["body"], "hi bob");
}

/// `--data-dir` and the other flags of a start expected to fail, on free ports.
fn failing_args(data_dir: &Path, shards: &str) -> Vec<String> {
    let mut args = common::local_args(data_dir);
    args.extend(["--jwt-secret", SECRET, "--shards", shards].map(String::from));
    args
}

/// The one `parleyd: error:` line of a failed start, which must also be its last line.
fn error_line(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("parleyd: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    errors[0].to_string()
}

/// Write a conversation homed on shard 0 with `n` messages, one flush each, and stop
/// parleyd cleanly (SIGTERM). Returns the data dir, the conversation and its users.
///
/// One session does it all and stays open until the drain closes it. (This once also
/// avoided a flush in flight at SIGTERM, which the WAL mishandled when the signal landed
/// on its writer thread; wal/tests/signals.rs covers that fix.)
fn write_shard_0(prefix: &str, n: usize) -> (tempfile::TempDir, String, (String, String)) {
    let mut daemon = start(tempfile::tempdir().expect("tempdir"));
    let (a, b) = direct_pair(prefix, 1, 0);
    let mut client = session(&daemon, &a, "phone");
    let created = ok(
        &mut client,
        "conv.create",
        json!({"kind": "direct", "members": [&b]}),
    );
    let conv = created["conv"].as_str().unwrap().to_string();
    assert_eq!(conversation_home(&conv, SHARDS), 0);
    for i in 0..n {
        let sent = ok(
            &mut client,
            "send",
            json!({"conv": conv, "cmid": format!("{prefix}{i}"), "body": format!("message {i} of {n}")}),
        );
        assert_eq!(sent["seq"], i as u64 + 1);
    }
    let data_dir = stop(&mut daemon);
    assert_eq!(client.expect_close().0, Some(1001));
    (data_dir, conv, (a, b))
}

fn segments(shard_dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(shard_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", shard_dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    segments
}

/// Flip 8 non-zero bytes of a record in `block` (a 4 KiB block of shard 0's first
/// segment, after its header), then expect parleyd to refuse to start, naming the shard,
/// the segment and an offset at or before the damage, and to keep refusing.
fn corrupt_block_and_expect_refusal(prefix: &str, block: usize) {
    let (data_dir, _, _) = write_shard_0(prefix, 40);
    let shard_dir = data_dir.path().join("shard-0");
    let segment = segments(&shard_dir)
        .into_iter()
        .next()
        .expect("shard 0 has a segment");
    let bytes = std::fs::read(&segment).unwrap();
    let written = bytes.iter().rposition(|&b| b != 0).expect("written data") + 1;
    // 40 messages flushed one by one take 40 blocks and more, each flush starting on a
    // fresh block: damage far before the log's last flush cannot pass for a torn write.
    assert!(written > 32 * 4096, "only {written} bytes written");
    assert!(block < 20, "block {block} is too close to the end");
    let block_start = block * 4096;
    let offset = (block_start + 64..block_start + 4096)
        .step_by(8)
        .find(|&at| bytes[at..at + 8].iter().all(|&b| b != 0))
        .unwrap_or_else(|| panic!("no non-zero stretch in block {block}"));
    let damaged: Vec<u8> = bytes[offset..offset + 8].iter().map(|b| b ^ 0xa5).collect();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.write_all_at(&damaged, offset as u64).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let args = failing_args(data_dir.path(), "2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stderr) = run_to_exit(&args, &[]);
    assert_eq!(
        status.code(),
        Some(1),
        "parleyd started on a log damaged at {offset}: {stderr}"
    );
    let line = error_line(&stderr);
    let file_name = segment.file_name().unwrap().to_str().unwrap();
    assert!(line.starts_with("parleyd: error: shard 0: "), "{line}");
    assert!(line.contains(&shard_dir.display().to_string()), "{line}");
    assert!(line.contains("corruption"), "{line}");
    assert!(line.contains(file_name), "names the segment: {line}");
    let reported: usize = line
        .split("at offset ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line}"));
    assert!(
        (block_start..=offset).contains(&reported),
        "damage at {offset}, reported at {reported}: {line}"
    );
    // And it keeps refusing: nothing was cut to make the damage go away.
    let (status, again) = run_to_exit(&args, &[]);
    assert_eq!(status.code(), Some(1), "{again}");
    assert_eq!(error_line(&again), line);
    assert_eq!(
        std::fs::read(&segment).unwrap()[offset..offset + 8],
        damaged[..]
    );
}

#[test]
fn a_corrupted_first_record_refuses_to_start_and_says_where() {
    corrupt_block_and_expect_refusal("corrupt-first-", 1);
}

#[test]
fn a_corrupted_record_mid_log_refuses_to_start_and_says_where() {
    corrupt_block_and_expect_refusal("corrupt-mid-", 12);
}

#[test]
fn a_changed_shard_count_refuses_to_start() {
    let (data_dir, conv, (a, _)) = write_shard_0("reshard-", 3);
    let args = failing_args(data_dir.path(), "1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stderr) = run_to_exit(&args, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(line.contains("written by 2 shards"), "{line}");
    assert!(line.contains("--shards 2"), "{line}");
    assert!(
        line.contains(&data_dir.path().display().to_string()),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.path().join("shards")).unwrap(),
        "2\n"
    );

    // The refusal touched nothing: two shards start and serve the history.
    let daemon = start(data_dir);
    let mut client = session(&daemon, &a, "phone");
    assert_eq!(history(&mut client, &conv).len(), 3);
}
