//! A full disk (issue 24): parleyd's data directory on a small loop-mounted ext4
//! filesystem (which takes O_DIRECT), filled by another file while clients send. Every
//! command is answered (bounded waits, never a hang), with `unavailable` once the disk
//! is full and never a wrong `ok`; parleyd stays up and says why in its log and
//! metrics; a state snapshot that cannot be written leaves the previous one; and once
//! the filler is removed sends succeed again without a restart. What was acknowledged is
//! in the history then, and after a kill -9 and restart.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::Command;

use super::*;

/// The filesystem image: small enough to fill in moments, large enough for parleyd's
/// files and a few of its 1 MiB segments per shard.
const IMAGE_BYTES: u64 = 96 << 20;
/// Records between state snapshots: a few before the disk fills, and attempts while full.
const SNAPSHOT_EVERY: &str = "200";

/// A loop-mounted ext4 image in a temporary directory; unmounted on drop, also when the
/// test fails (drop it after the daemon that uses it: a busy mount does not unmount).
struct Ext4 {
    /// Holds the image and the mount point; removed after the unmount.
    _root: tempfile::TempDir,
    mount: PathBuf,
}

/// Run a command that must succeed; the reason it did not fails the test.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (this test needs mkfs.ext4)"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {} (this test needs root and loop devices)",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

impl Ext4 {
    fn mount() -> Ext4 {
        let root = tempfile::tempdir().expect("tempdir");
        let image = root.path().join("fs.img");
        let mount = root.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        File::create(&image)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .expect("image file");
        let image = image.to_str().expect("UTF-8 path");
        // No blocks kept for root (-m 0): the test runs as root, and parleyd with it.
        run("mkfs.ext4", &["-q", "-m", "0", image]);
        let fs = Ext4 { _root: root, mount };
        run("mount", &["-o", "loop", image, fs.path_str()]);
        fs
    }

    fn path_str(&self) -> &str {
        self.mount.to_str().expect("UTF-8 path")
    }

    /// A data directory on it.
    fn data_dir(&self) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("data-")
            .tempdir_in(&self.mount)
            .expect("data dir on the image")
    }

    /// Take every free block with a file of its own (fallocated: nothing is written), and
    /// return its path.
    fn fill(&self) -> PathBuf {
        let path = self.mount.join("filler");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("filler");
        let mut at = 0i64;
        for chunk in [1i64 << 20, 4096] {
            // SAFETY: fallocate on a descriptor we own.
            while unsafe { libc::fallocate(file.as_raw_fd(), 0, at, chunk) } == 0 {
                at += chunk;
            }
        }
        let error = std::io::Error::last_os_error();
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "filling: {error}");
        path
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.mount).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            // Something still holds it: detach now, the kernel finishes when it lets go.
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// What one sending client saw.
#[derive(Default)]
struct Sent {
    report: BurstReport,
    /// Sends answered `unavailable`, by conversation, and one such reply's message.
    refused: BTreeMap<String, usize>,
    refusal_msg: Option<String>,
}

/// When a sender stops.
#[derive(Clone, Copy)]
enum Until {
    /// After this many acknowledgements.
    Acked(usize),
    /// Once every one of its conversations refused a send.
    Refused,
}

/// Pipeline sends (up to IN_FLIGHT unanswered) round-robin into `convs` until `until`,
/// then collect the replies still owed. Every reply must come within WAIT; any answer
/// but `ok` or `unavailable` is a problem.
fn sender(mut client: Client, user: String, convs: Vec<String>, tag: &str, until: Until) -> Sent {
    let mut sent = Sent::default();
    let mut in_flight: HashMap<u64, Outgoing> = HashMap::new();
    let (mut next_id, mut n) = (FIRST_BURST_ID, 0usize);
    let started = Instant::now();
    let done = |sent: &Sent| match until {
        Until::Acked(count) => sent.report.acked.len() >= count,
        Until::Refused => convs.iter().all(|c| sent.refused.contains_key(c)),
    };
    loop {
        while !done(&sent) && in_flight.len() < IN_FLIGHT {
            if started.elapsed() > BURST_LIMIT {
                let problem = format!("{user}: {n} sends in {BURST_LIMIT:?}, still not done");
                sent.report.problems.push(problem);
                return sent;
            }
            let conv = convs[n % convs.len()].clone();
            let cmid = format!("{tag}-{user}-{n}");
            let body = format!("{cmid} größe {}", "x".repeat(n * 37 % 700));
            n += 1;
            let doc =
                json!({"id": next_id, "op": "send", "conv": conv, "cmid": cmid, "body": body});
            in_flight.insert(
                next_id,
                Outgoing {
                    conv,
                    cmid,
                    body,
                    user: user.clone(),
                },
            );
            next_id += 1;
            client.send_text(&doc.to_string());
        }
        if in_flight.is_empty() {
            return sent;
        }
        let text = match client.ws.read() {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                sent.report
                    .problems
                    .push(format!("{user}: closed: {frame:?}"));
                return sent;
            }
            Ok(_) => continue,
            Err(error) => {
                let owed = in_flight.len();
                // A read times out after WAIT (the client's read timeout): a hang.
                let problem = format!("{user}: {owed} replies owed, read failed: {error}");
                sent.report.problems.push(problem);
                return sent;
            }
        };
        for line in text.split('\n') {
            let doc: Value = serde_json::from_str(line).expect("JSON");
            let Some(out) = doc["re"].as_u64().and_then(|id| in_flight.remove(&id)) else {
                continue;
            };
            let ok = &doc["ok"];
            if ok.is_object() && ok["dup"] == false && ok["conv"] == out.conv.as_str() {
                sent.report.acked.push((out, ok.clone()));
            } else if doc["err"]["code"] == "unavailable" {
                *sent.refused.entry(out.conv.clone()).or_default() += 1;
                let msg = doc["err"]["msg"].as_str().unwrap_or_default();
                if msg.contains("disk is full") {
                    sent.refusal_msg.get_or_insert_with(|| msg.to_string());
                }
            } else {
                let problem = format!("{user}: send {} got {doc}", out.cmid);
                sent.report.problems.push(problem);
            }
        }
    }
}

/// Every sender of `convs`, one client each, until `until`; what they saw, merged.
fn drive(daemon: &Daemon, convs: &[Conv], tag: &str, until: Until) -> Sent {
    let mut targets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for conv in convs {
        for user in &conv.senders {
            targets
                .entry(user.clone())
                .or_default()
                .push(conv.id.clone());
        }
    }
    let threads: Vec<_> = targets
        .into_iter()
        .map(|(user, convs)| {
            let client = session(daemon, &user, "phone");
            let tag = tag.to_string();
            std::thread::spawn(move || sender(client, user, convs, &tag, until))
        })
        .collect();
    let mut all = Sent::default();
    for thread in threads {
        let sent = thread.join().expect("sender");
        all.report.acked.extend(sent.report.acked);
        all.report.problems.extend(sent.report.problems);
        for (conv, n) in sent.refused {
            *all.refused.entry(conv).or_default() += n;
        }
        all.refusal_msg = all.refusal_msg.or(sent.refusal_msg);
    }
    assert!(
        all.report.problems.is_empty(),
        "{tag}: {:#?}",
        all.report.problems
    );
    all
}

/// Lines logged so far, kept in `log`, until one for each shard contains `what`.
fn wait_for_line_per_shard(daemon: &Daemon, log: &mut Vec<String>, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        log.extend(daemon.log_lines());
        let missing: Vec<u32> = (0..SHARDS)
            .filter(|k| {
                let shard = format!("shard={k}");
                !log.iter().any(|l| l.contains(what) && l.contains(&shard))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        match daemon.next_log_line(deadline) {
            Some(line) => log.push(line),
            None => panic!(
                "no {what:?} line for shards {missing:?} within {WAIT:?}; logged:\n{}",
                log.join("\n")
            ),
        }
    }
}

fn shard_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

#[test]
fn a_full_disk_refuses_with_unavailable_and_recovers_without_a_restart() {
    let fs = Ext4::mount();
    let flags = [
        "--wal-segment-bytes",
        "1048576",
        "--wal-disk-full-retry-ms",
        "50",
        "--snapshot-every-records",
        SNAPSHOT_EVERY,
    ];
    let mut daemon = start_with(fs.data_dir(), &flags);
    let data_dir = daemon.data_dir.path().to_path_buf();
    let convs = make_conversations(&daemon, "f");
    let mut model = Model::default();
    let mut log = daemon.startup.clone();

    // Enough before the disk fills for a state snapshot on each shard.
    let before = drive(&daemon, &convs, "before", Until::Acked(150));
    model.absorb(before.report);
    wait_for_line_per_shard(&daemon, &mut log, "saved a state snapshot");
    let snapshots: Vec<Vec<u8>> = (0..SHARDS)
        .map(|k| std::fs::read(shard_dir(&data_dir, k).join("state")).expect("a snapshot"))
        .collect();

    let filler = fs.fill();
    let full = drive(&daemon, &convs, "full", Until::Refused);
    let acked_while_filling = model.absorb(full.report);
    eprintln!(
        "while the disk filled: {acked_while_filling} acknowledged, {:?} refused",
        full.refused
    );
    assert!(
        full.refusal_msg.is_some(),
        "no refusal said the disk is full: {:?}",
        full.refused
    );
    wait_for_line_per_shard(&daemon, &mut log, "disk full");
    for line in log.iter().filter(|l| l.contains("disk full")) {
        assert!(
            line.contains("free_bytes=") && line.contains("next-segment.spare"),
            "the log line names the file and the free bytes: {line}"
        );
    }
    assert_eq!(daemon.admin_get("/healthz").0, 200, "parleyd is up");
    assert_eq!(daemon.admin_get("/readyz").0, 200, "and serves");
    for k in 0..SHARDS {
        let shard = format!("shard=\"{k}\"");
        assert_eq!(daemon.metric("parley_wal_disk_full", &shard), 1, "{shard}");
        let refused = daemon.metric("parley_wal_appends_refused_total", &shard);
        assert!(refused >= 1, "{shard}: {refused} refused appends");
    }
    // A snapshot due while the disk is full fails, leaving the previous one whole.
    assert!(
        log.iter().any(|l| l.contains("state snapshot failed")),
        "no snapshot was attempted on the full disk"
    );
    for k in 0..SHARDS {
        let dir = shard_dir(&data_dir, k);
        let state = std::fs::read(dir.join("state")).expect("the snapshot");
        assert!(
            state == snapshots[k as usize],
            "shard {k}: the snapshot changed"
        );
        assert!(
            !dir.join("state.tmp").exists(),
            "shard {k}: a partial snapshot"
        );
    }

    // Space is freed: each log allocates again by itself, and sends are taken at once.
    std::fs::remove_file(&filler).expect("remove the filler");
    wait_for_line_per_shard(&daemon, &mut log, "disk space again");
    for k in 0..SHARDS {
        let shard = format!("shard=\"{k}\"");
        assert_eq!(daemon.metric("parley_wal_disk_full", &shard), 0, "{shard}");
    }
    let after = drive(&daemon, &convs, "after", Until::Acked(20));
    assert!(
        after.refused.is_empty(),
        "refused after the disk was freed: {:?}",
        after.refused
    );
    model.absorb(after.report);
    // Every acknowledged message is in the history, and no refused one (verify knows
    // each send of this test that was acknowledged; there is no unanswered one).
    assert_eq!(model.pending_count(), 0);
    verify(&daemon, &convs, &mut model, "after the disk was freed");

    // And after a kill -9: recovery keeps exactly what was acknowledged.
    let data = kill9(&mut daemon);
    let daemon = start_with(data, &flags);
    let survived = verify(&daemon, &convs, &mut model, "after kill -9");
    assert_eq!(survived, 0, "every send was answered before the kill");
    let (_, recognised) = resend(&daemon, &mut model, "after kill -9");
    assert!(recognised > 0);
    let total: usize = model.known.values().map(BTreeMap::len).sum();
    eprintln!("{total} messages acknowledged in all, each in the history after the restart");
    drop(daemon);
    drop(fs);
}
