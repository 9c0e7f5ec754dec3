//! `search` against the real parleyd (PROTOCOL.md section 10): a message is found soon
//! after its `ok`; only conversations the user is a member of now give hits; filters and
//! paging; case and accents fold; the index deleted, corrupted or cut short by `kill -9`
//! is rebuilt or resumed from the log and gives the same hits.
//!
//! Two shards, so a user's conversations are homed on both and every search merges the
//! hits of two indexes.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Daemon, WAIT};
use parley_router::ownership::conversation_home;
use serde_json::{json, Value};

/// Commits every 100 ms: the tests wait for the index less.
const FLAGS: &[&str] = &[
    "--search-commit-interval-ms",
    "100",
    "--rate-limit-per-sec",
    "100000",
];

fn start(dir: tempfile::TempDir) -> Daemon {
    Daemon::start_in(dir, FLAGS)
}

fn group(client: &mut Client, members: &[&str]) -> String {
    let ok = client.ok("conv.create", json!({"kind": "group", "members": members}));
    ok["conv"].as_str().expect("conv id").to_string()
}

fn send(client: &mut Client, conv: &str, cmid: &str, body: &str) -> u64 {
    let ok = client.ok("send", json!({"conv": conv, "cmid": cmid, "body": body}));
    ok["seq"].as_u64().expect("seq")
}

fn search(client: &mut Client, fields: Value) -> Value {
    let ok = client.ok("search", fields);
    // Events of the conversations pile up in the inbox meanwhile; they are not looked at.
    client.take_inbox(|_| true);
    ok
}

/// (conv, seq) of each hit, in the order given.
fn hits(answer: &Value) -> Vec<(String, u64)> {
    answer["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|hit| {
            (
                hit["conv"].as_str().unwrap().to_string(),
                hit["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Search until the answer has `want` hits (bounded by WAIT): the index trails the log
/// by up to a commit interval.
fn search_until(client: &mut Client, fields: Value, want: usize) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let answer = search(client, fields.clone());
        let found = hits(&answer).len();
        if found == want {
            return (answer, started.elapsed());
        }
        assert!(
            started.elapsed() < WAIT,
            "{fields}: {found} hits after {WAIT:?}, not {want}: {answer}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every hit of `q` for `client`, page by page through the cursors.
fn all_hits(client: &mut Client, q: &str, limit: u64) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut fields = json!({"q": q, "limit": limit});
        if let Some(cursor) = &cursor {
            fields["cursor"] = json!(cursor);
        }
        let answer = search(client, fields);
        let page = hits(&answer);
        assert!(page.len() as u64 <= limit, "{answer}");
        found.extend(page);
        match answer["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return found,
        }
    }
}

#[test]
fn a_message_is_found_soon_after_its_ok_with_its_fields_and_a_marked_snippet() {
    let daemon = start(tempfile::tempdir().unwrap());
    let mut alice = Client::chat(&daemon, "alice");
    let conv = group(&mut alice, &["bob"]);
    let seq = send(&mut alice, &conv, "c1", "Lunch at the <new> place?");
    let ok_at = Instant::now();
    let (answer, _) = search_until(&mut alice, json!({"q": "lunch"}), 1);
    let took = ok_at.elapsed();
    let hit = &answer["hits"][0];
    assert_eq!(hit["conv"], conv);
    assert_eq!(hit["seq"], seq);
    assert_eq!(hit["from"], "alice");
    assert_eq!(hit["kind"], "text");
    assert!(hit["ts"].as_u64().unwrap() > 0);
    // The fragment is HTML: the text escaped, the match marked.
    assert_eq!(
        hit["snippet"], "<b>Lunch</b> at the &lt;new&gt; place",
        "{answer}"
    );
    assert!(answer.get("next").is_none(), "{answer}");
    eprintln!("found {took:?} after its ok (commit interval 100 ms)");
    assert!(daemon.metric("parley_search_queries_total", "") >= 1);
}

#[test]
fn only_conversations_the_user_is_a_member_of_now_give_hits() {
    let daemon = start(tempfile::tempdir().unwrap());
    let mut alice = Client::chat(&daemon, "alice");
    let mut bob = Client::chat(&daemon, "bob");
    let mut carol = Client::chat(&daemon, "carol");
    // Several conversations, so that both shards home some of alice's and carol's.
    let shared: Vec<String> = (0..4)
        .map(|_| group(&mut alice, &["bob", "carol"]))
        .collect();
    let private: Vec<String> = (0..4).map(|_| group(&mut alice, &["bob"])).collect();
    for (i, conv) in shared.iter().chain(&private).enumerate() {
        send(&mut alice, conv, &format!("c{i}"), "the secret plan");
    }
    search_until(&mut alice, json!({"q": "secret"}), 8);
    let (answer, _) = search_until(&mut carol, json!({"q": "secret"}), 4);
    let convs: BTreeSet<String> = hits(&answer).into_iter().map(|(c, _)| c).collect();
    assert_eq!(convs, shared.iter().cloned().collect(), "{answer}");

    // Naming a conversation carol is not in gives nothing from it.
    let answer = search(&mut carol, json!({"q": "secret", "conv": private[0]}));
    assert_eq!(hits(&answer), vec![], "{answer}");

    // Once she leaves one, it gives her nothing more; bob still finds it.
    carol.ok("conv.leave", json!({"conv": shared[0]}));
    let answer = search(&mut carol, json!({"q": "secret"}));
    let convs: BTreeSet<String> = hits(&answer).into_iter().map(|(c, _)| c).collect();
    assert_eq!(convs, shared[1..].iter().cloned().collect(), "{answer}");
    let answer = search(&mut bob, json!({"q": "secret", "conv": shared[0]}));
    assert_eq!(hits(&answer).len(), 1, "{answer}");

    // A removed member too.
    alice.ok(
        "member.remove",
        json!({"conv": shared[1], "users": ["carol"]}),
    );
    let answer = search(&mut carol, json!({"q": "secret", "conv": shared[1]}));
    assert_eq!(hits(&answer), vec![], "{answer}");
    // And a user in none of them finds nothing.
    let mut dave = Client::chat(&daemon, "dave");
    assert_eq!(hits(&search(&mut dave, json!({"q": "secret"}))), vec![]);
}

#[test]
fn filters_and_paging_work() {
    let daemon = start(tempfile::tempdir().unwrap());
    let mut alice = Client::chat(&daemon, "alice");
    let mut bob = Client::chat(&daemon, "bob");
    let one = group(&mut alice, &["bob"]);
    let two = group(&mut alice, &["bob"]);
    let mut sent = Vec::new();
    for i in 0..6 {
        let conv = if i % 2 == 0 { &one } else { &two };
        let (client, who) = if i < 3 {
            (&mut alice, "a")
        } else {
            (&mut bob, "b")
        };
        let seq = send(
            client,
            conv,
            &format!("{who}{i}"),
            &format!("report number {i}"),
        );
        sent.push((conv.clone(), seq));
        // Distinct timestamps for the time filters.
        std::thread::sleep(Duration::from_millis(5));
    }
    let (answer, _) = search_until(&mut alice, json!({"q": "report", "limit": 100}), 6);
    let ts: Vec<u64> = {
        let mut by_seq: Vec<(String, u64, u64)> = answer["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["conv"].as_str().unwrap().to_string(),
                    h["seq"].as_u64().unwrap(),
                    h["ts"].as_u64().unwrap(),
                )
            })
            .collect();
        by_seq.sort_by_key(|(_, _, ts)| *ts);
        by_seq.iter().map(|(_, _, ts)| *ts).collect()
    };

    let from_bob = hits(&search(&mut alice, json!({"q": "report", "from": "bob"})));
    assert_eq!(set(&from_bob), set(&sent[3..]));
    let in_one = hits(&search(&mut alice, json!({"q": "report", "conv": one})));
    assert_eq!(
        set(&in_one),
        set(&[sent[0].clone(), sent[2].clone(), sent[4].clone()])
    );
    // Exclusive bounds: strictly after the second message's ts, strictly before the fifth's.
    let window = json!({"q": "report", "after_ts": ts[1], "before_ts": ts[4]});
    let between = hits(&search(&mut alice, window));
    assert_eq!(set(&between), set(&sent[2..4]), "ts {ts:?}");

    // Pages of 4 then 2 hits: together every hit once, the best first.
    let pages = all_hits(&mut alice, "report", 4);
    assert_eq!(pages.len(), 6);
    assert_eq!(set(&pages), set(&sent));
    // A cursor pages only the query it was given for.
    let first = search(&mut alice, json!({"q": "report", "limit": 4}));
    let cursor = first["next"].as_str().expect("a next page").to_string();
    let code = alice.err(
        "search",
        json!({"q": "number", "limit": 4, "cursor": cursor}),
    );
    assert_eq!(code, "bad_request");

    // Words must all match; a phrase matches in order; a prefix any word starting so.
    assert_eq!(
        hits(&search(&mut alice, json!({"q": "report 3"}))),
        vec![sent[3].clone()]
    );
    assert_eq!(
        hits(&search(&mut alice, json!({"q": "\"number report\""}))),
        vec![]
    );
    assert_eq!(
        hits(&search(&mut alice, json!({"q": "\"report number 5\""}))).len(),
        1
    );
    assert_eq!(hits(&search(&mut alice, json!({"q": "rep*"}))).len(), 6);
    assert_eq!(hits(&search(&mut alice, json!({"q": "nomatch*"}))), vec![]);
    // Only punctuation: no word to look for, no hits.
    assert_eq!(hits(&search(&mut alice, json!({"q": "!!!"}))), vec![]);
    for bad in [
        json!({"q": ""}),
        json!({"q": "\"open"}),
        json!({"q": "x", "limit": 101}),
        json!({}),
    ] {
        assert_eq!(alice.err("search", bad.clone()), "bad_request", "{bad}");
    }
}

fn set(hits: &[(String, u64)]) -> BTreeSet<(String, u64)> {
    hits.iter().cloned().collect()
}

#[test]
fn case_and_accents_fold() {
    let daemon = start(tempfile::tempdir().unwrap());
    let mut alice = Client::chat(&daemon, "alice");
    let conv = group(&mut alice, &["bob"]);
    let creme = send(&mut alice, &conv, "c1", "Crème BRÛLÉE au café");
    let tokyo = send(&mut alice, &conv, "c2", "会議は東京タワーで");
    let athens = send(&mut alice, &conv, "c3", "Ἀθῆναι τὸ ἄστυ");
    // One conversation, one shard's index, indexed in order: once the last is
    // searchable, all are.
    search_until(&mut alice, json!({"q": "αθηναι"}), 1);
    for q in [
        "creme brulee",
        "CRÈME",
        "\"crème brûlée\"",
        "CAFE",
        "brû*",
        "cafe\u{301}",
    ] {
        let found = hits(&search(&mut alice, json!({"q": q})));
        assert_eq!(found, vec![(conv.clone(), creme)], "{q}");
    }
    for q in ["東京", "東京タワー", "タワ*"] {
        let found = hits(&search(&mut alice, json!({"q": q})));
        assert_eq!(found, vec![(conv.clone(), tokyo)], "{q}");
    }
    // 京東 is not in the text: the characters must be in order.
    assert_eq!(hits(&search(&mut alice, json!({"q": "京東"}))), vec![]);
    let found = hits(&search(&mut alice, json!({"q": "αθηναι"})));
    assert_eq!(found, vec![(conv.clone(), athens)]);
}

/// `n` messages containing `word` in two conversations, one homed on each shard, all
/// acknowledged.
fn fill(daemon: &Daemon, n: usize, word: &str) -> BTreeSet<(String, u64)> {
    let mut alice = Client::chat(daemon, "alice");
    let mut convs = [None, None];
    while convs.iter().any(Option::is_none) {
        let conv = group(&mut alice, &["bob"]);
        let home = conversation_home(&conv, 2) as usize;
        convs[home].get_or_insert(conv);
    }
    let convs = convs.map(Option::unwrap_or_default);
    let mut sent = BTreeSet::new();
    for i in 0..n {
        let conv = &convs[i % 2];
        let seq = send(
            &mut alice,
            conv,
            &format!("f{i}"),
            &format!("{word} item {i}"),
        );
        sent.insert((conv.clone(), seq));
    }
    sent
}

fn found_by_alice(daemon: &Daemon, word: &str, want: usize) -> BTreeSet<(String, u64)> {
    let mut alice = Client::chat(daemon, "alice");
    let deadline = Instant::now() + WAIT;
    loop {
        // Pages taken while the index grows may overlap; once all are there, none twice.
        let hits = all_hits(&mut alice, word, 100);
        let found = set(&hits);
        if found.len() == want || Instant::now() > deadline {
            assert_eq!(found.len(), hits.len(), "a message found twice: {hits:?}");
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each shard's index directory.
fn index_dirs(data_dir: &Path) -> Vec<std::path::PathBuf> {
    (0..2)
        .map(|shard| data_dir.join("search").join(format!("shard-{shard}")))
        .collect()
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_log_with_the_same_hits() {
    let daemon = start(tempfile::tempdir().unwrap());
    let sent = fill(&daemon, 40, "rebuild");
    assert_eq!(found_by_alice(&daemon, "rebuild", 40), sent);
    let dir = daemon.stop();
    for index in index_dirs(dir.path()) {
        assert!(index.is_dir(), "{} is not there", index.display());
        std::fs::remove_dir_all(&index).unwrap();
    }
    let daemon = start(dir);
    assert_eq!(found_by_alice(&daemon, "rebuild", 40), sent);
}

#[test]
fn a_corrupt_index_is_detected_at_start_and_rebuilt() {
    let daemon = start(tempfile::tempdir().unwrap());
    let sent = fill(&daemon, 40, "damaged");
    assert_eq!(found_by_alice(&daemon, "damaged", 40), sent);
    let dir = daemon.stop();
    // Flip a byte in the middle of every file of each index's segments.
    let mut damaged = 0;
    for index in index_dirs(dir.path()) {
        for entry in std::fs::read_dir(&index).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('.') || name == "meta.json" {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            if bytes.len() < 16 {
                continue;
            }
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no index files to damage");
    let daemon = start(dir);
    assert_eq!(found_by_alice(&daemon, "damaged", 40), sent);
    // Said at start, by each shard's indexer, with the reason.
    let lines: Vec<String> = daemon
        .startup
        .iter()
        .cloned()
        .chain(daemon.log_lines())
        .collect();
    let rebuilt: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("search index rebuilt from the log"))
        .collect();
    assert_eq!(
        rebuilt.len(),
        2,
        "not both shards said they rebuilt:\n{}",
        lines.join("\n")
    );
    for line in rebuilt {
        assert!(line.contains("checksum"), "{line}");
    }
}

#[test]
fn kill_9_during_indexing_loses_nothing_from_the_index() {
    let mut daemon = start(tempfile::tempdir().unwrap());
    // Some committed to the index before the kill...
    let mut sent = fill(&daemon, 150, "crashword");
    assert_eq!(found_by_alice(&daemon, "crashword", 150), sent);
    // ...and the last ones acknowledged just before it, not yet committed.
    sent.extend(fill(&daemon, 150, "crashword"));
    let (status, _) = daemon.signal_and_wait(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let dir = std::mem::replace(&mut daemon.data_dir, tempfile::tempdir().unwrap());
    drop(daemon);
    let daemon = start(dir);
    assert_eq!(found_by_alice(&daemon, "crashword", 300), sent);
    // And the indexers catch up with the logs (their last records are not messages).
    let deadline = Instant::now() + WAIT;
    while daemon.metric("parley_search_index_lag_records", "") > 0 {
        assert!(Instant::now() < deadline, "the indexers never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn search_off_answers_unavailable() {
    let daemon = Daemon::start(&["--search", "false"]);
    let mut alice = Client::chat(&daemon, "alice");
    assert_eq!(alice.err("search", json!({"q": "x"})), "unavailable");
    assert!(!daemon.data_dir.path().join("search").exists());
}

#[test]
fn an_index_that_cannot_be_created_refuses_the_start_naming_its_path() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the index directory goes.
    std::fs::write(dir.path().join("search"), b"not a directory").unwrap();
    let mut args = common::local_args(dir.path());
    args.extend(["--jwt-secret", common::SECRET, "--shards", "2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stderr) = common::run_to_exit(&args, &[]);
    assert!(!status.success(), "{status:?}: {stderr}");
    let index_dir = dir.path().join("search").join("shard-");
    assert!(
        stderr.contains(&*index_dir.to_string_lossy()) && stderr.contains("creating it"),
        "{stderr}"
    );
}
