//! `parley-wal` run as an operator would run it, on logs built with the WAL's own API and
//! then damaged the ways a crash or a bad disk damages them.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use parley_wal::format::{BLOCK, SEGMENT_HEADER};
use parley_wal::recovery::analyze;
use parley_wal::scan::records_from;
use parley_wal::{Wal, WalOptions};

fn options() -> WalOptions {
    WalOptions {
        segment_size: 256 * 1024,
        max_batch_bytes: 64 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("message {i} {}", "x".repeat((i % 50) as usize)).into_bytes()
}

/// A log of `records` records. With `flush_each`, every append waits for its own flush,
/// so every record starts a flush; otherwise they go in as few flushes as fit.
fn build_log(dir: &Path, records: u64, flush_each: bool) {
    let (wal, _) = Wal::open(dir, options(), &mut |_| {}).unwrap();
    let mut last = 0;
    for i in 1..=records {
        last = wal
            .append((i % 3 + 1) as u8, 1_000 + i, &payload(i))
            .unwrap();
        assert_eq!(last, i);
        if flush_each {
            wal.wait_durable(last).unwrap();
        }
    }
    wal.wait_durable(last).unwrap();
    wal.close().unwrap();
}

fn run(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parley-wal"))
        .args(args)
        .arg(dir)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn verify_passes_a_clean_log() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 200, false);
    let out = run(&["verify"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let line = stdout(&out);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("ok: "), "{line}");
    assert!(line.contains("LSN 1..=200"), "{line}");
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    // Right at the end of the last record, and at the next block boundary (after padding).
    for aligned in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 150, true);
        let analysis = analyze(dir.path(), &mut |_| {}).unwrap();
        assert!(analysis.segments.len() > 1, "the log should span segments");
        let last = analysis.segments.last().unwrap();
        let at = if aligned {
            last.end.next_multiple_of(BLOCK as u64)
        } else {
            last.end
        };
        let file = OpenOptions::new().write(true).open(&last.path).unwrap();
        file.write_all_at(&[0xa5; 300], at).unwrap();
        drop(file);

        let out = run(&["verify"], dir.path());
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let line = stdout(&out);
        assert!(line.starts_with("torn tail: "), "{line}");
        assert!(line.contains(&file_name(&last.path)), "{line}");
        assert!(line.contains(&format!("offset {}", last.end)), "{line}");

        // dump still prints every record, then says why it exits 1.
        let out = run(&["dump"], dir.path());
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert_eq!(stdout(&out).lines().count(), 150);
        assert!(String::from_utf8_lossy(&out.stderr).contains("torn tail"));

        // Nothing was repaired: the garbage is still there.
        let out = run(&["verify"], dir.path());
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    }
}

#[test]
fn a_flipped_byte_before_later_flushes_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 100, true);
    let analysis = analyze(dir.path(), &mut |_| {}).unwrap();
    let first = &analysis.segments[0];
    let data = std::fs::read(&first.path).unwrap();
    let (offset, header, _) = records_from(&data, 0, SEGMENT_HEADER)
        .find(|(_, h, _)| h.lsn == 3)
        .unwrap();
    assert_eq!(header.lsn, 3);
    let file = OpenOptions::new().write(true).open(&first.path).unwrap();
    let flip = offset as u64 + 40; // inside the payload
    file.write_all_at(&[data[flip as usize] ^ 0x10], flip)
        .unwrap();
    drop(file);

    let out = run(&["verify"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let line = stdout(&out);
    assert!(line.starts_with("corruption: "), "{line}");
    assert!(line.contains(&file_name(&first.path)), "{line}");
    assert!(line.contains(&format!("offset {offset}")), "{line}");

    // dump prints what is readable before the damage (LSNs 1 and 2), then exits 2.
    let out = run(&["dump"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let text = stdout(&out);
    let lsns: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(lsns, ["lsn=1", "lsn=2"], "{text}");

    let out = run(&["stat"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn dump_prints_every_record() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 300, false);
    let out = run(&["dump"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 300);
    assert!(lines[0].starts_with("lsn=1 "), "{}", lines[0]);
    assert!(
        lines[41].contains("payload=\"message 42 xx"),
        "{}",
        lines[41]
    );
    let len = format!("type=1 ts=1042 len={} ", payload(42).len());
    assert!(lines[41].contains(&len), "{}", lines[41]);

    let out = run(&["dump", "--json"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 300);
    for (i, record) in records.iter().enumerate() {
        let lsn = i as u64 + 1;
        assert_eq!(record["lsn"], lsn);
        assert_eq!(record["type"], lsn % 3 + 1);
        assert_eq!(record["timestamp"], 1_000 + lsn);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(record["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes, payload(lsn));
        assert_eq!(record["len"], bytes.len());
    }

    let out = run(&["dump", "--from", "10", "--to", "19"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 10);
    assert!(text.starts_with("lsn=10 "), "{text}");
}

#[test]
fn stat_reports_segments_and_the_lsn_range() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 120, true);
    let out = run(&["stat"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("LSN 1..=120 (120 records)"), "{text}");
    assert!(text.contains("00000000000000000001.seg"), "{text}");

    let out = run(&["stat", "--json"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["first_lsn"], 1);
    assert_eq!(doc["last_lsn"], 120);
    assert_eq!(doc["records"], 120);
    assert_eq!(doc["status"]["verdict"], "ok");
    let segments = doc["segments"].as_array().unwrap();
    assert!(segments.len() > 1);
    assert_eq!(segments[0]["first_lsn"], 1);
    let mut next = 1;
    for segment in segments {
        assert_eq!(segment["first_lsn"], next);
        next = segment["last_lsn"].as_u64().unwrap() + 1;
        assert_eq!(segment["bytes"], 256 * 1024);
    }
    assert_eq!(next, 121);
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-log");
    for command in ["verify", "dump", "stat"] {
        let out = run(&[command], &missing);
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("no-such-log"), "{err}");
    }
}

#[test]
fn usage_errors_exit_3() {
    let out = Command::new(env!("CARGO_BIN_EXE_parley-wal"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn bench_appends_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    for pipelined in [false, true] {
        let mut args = vec![
            "bench",
            "--records",
            "200",
            "--appenders",
            "4",
            "--segment-size",
            "256K",
            "--max-batch-bytes",
            "64K",
            "--json",
        ];
        if pipelined {
            args.push("--pipelined");
        }
        args.extend(["--keep", "--dir"]);
        let out = run(&args, dir.path());
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // What the bench says it appended is what a reader finds in the log it left:
        // every one of the records, durable, in LSN order, and nothing else.
        let kept = PathBuf::from(doc["dir"].as_str().expect("--keep names the log"));
        let stat = run(&["stat", "--json"], &kept);
        assert_eq!(stat.status.code(), Some(0), "{}", describe(&stat));
        let log: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
        assert_eq!(log["status"]["verdict"], "ok", "{log}");
        assert_eq!(log["records"], doc["records"], "bench {doc}\nlog {log}");
        assert_eq!(
            (log["first_lsn"].as_u64(), log["last_lsn"].as_u64()),
            (Some(1), Some(200))
        );
        assert_eq!(doc["durable_lsn"], 200, "{doc}");
        if !pipelined {
            // One latency sample per durable acknowledgement.
            assert_eq!(doc["latency_us"]["samples"], 200, "{doc}");
        }
        assert!(doc["flushes"].as_u64().unwrap() >= 1);
        assert!(doc["latency_us"]["p99"].as_f64().unwrap() > 0.0);
        std::fs::remove_dir_all(&kept).unwrap();
    }
    // Without --keep the bench cleans up after itself.
    let out = run(
        &[
            "bench",
            "--records",
            "50",
            "--segment-size",
            "256K",
            "--dir",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
