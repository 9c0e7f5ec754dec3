//! Crash durability: what parleyd acknowledged survives `kill -9` exactly as it was
//! acknowledged (PROTOCOL.md 7.1, 7.2), and a data dir it cannot trust refuses to start.
//!
//! Everything runs with two shards. Users are homed on one shard and their conversations
//! on the other, so every send crosses the mesh both ways and both shards' logs are
//! written in every burst.

#[path = "../common/mod.rs"]
mod common;

// What a restarted daemon must serve, test by test: messages under send bursts
// (`messages`), every other kind of change (`changes`), the starts it must refuse or
// answer (`startup`), and a disk that fills under sends (`full_disk`). The burst, the model and the checks they share are here.
mod changes;
mod full_disk;
mod messages;
mod startup;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use common::{run_to_exit, Client, Daemon, SECRET, WAIT};
use parley_router::ownership::{conversation_home, user_home};
use parley_router::shard::direct_conv_id;
use serde_json::{json, Value};
use tungstenite::Message;

const SHARDS: u32 = 2;
/// Sends each burst client keeps unanswered at once.
const IN_FLIGHT: usize = 32;
/// A burst client sends until the kill ends its connection, for this long at most. The
/// kill follows a count of acks; how many sends the clients get out between that count
/// and the SIGKILL depends on the machine (a busy one: thousands), so a client is not
/// bounded by a number of sends.
const BURST_LIMIT: std::time::Duration = WAIT;
/// Bursts pipeline far above the default per-session rate limit; the limit is not what
/// these tests are about. (The outbound queue must hold burst + strikes + 1 replies.)
const FLAGS: &[&str] = &[
    "--rate-limit-per-sec",
    "1000000",
    "--rate-limit-burst",
    "500",
];
/// History page size asked for (the protocol's maximum).
const PAGE: u64 = 200;
/// Ids of burst sends start here, clear of the few `Client::command` ids before them.
const FIRST_BURST_ID: u64 = 1_000;

// ---------------------------------------------------------------------------------------
// Small client helpers.

fn start(data_dir: tempfile::TempDir) -> Daemon {
    Daemon::start_in(data_dir, FLAGS)
}

fn start_with(data_dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
    let flags: Vec<&str> = FLAGS.iter().chain(extra).copied().collect();
    Daemon::start_in(data_dir, &flags)
}

/// `kill -9` the daemon, reap it, and take its data dir back for the next start.
fn kill9(daemon: &mut Daemon) -> tempfile::TempDir {
    let (status, _) = daemon.signal_and_wait(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    take_dir(daemon)
}

/// SIGTERM (the drain), expect exit 0, and take the data dir back.
fn stop(daemon: &mut Daemon) -> tempfile::TempDir {
    let (status, took) = daemon.signal_and_wait(libc::SIGTERM);
    assert_eq!(
        status.code(),
        Some(0),
        "drain exit {status:?} after {took:?}; parleyd logged:\n{}",
        daemon.log_lines().join("\n")
    );
    take_dir(daemon)
}

/// The daemon owns its TempDir (and deletes it on drop): swap in a throwaway one.
fn take_dir(daemon: &mut Daemon) -> tempfile::TempDir {
    std::mem::replace(&mut daemon.data_dir, tempfile::tempdir().expect("tempdir"))
}

/// A command's reply.
fn call(client: &mut Client, op: &str, fields: Value) -> Value {
    let id = client.command(op, fields);
    client.reply(id)
}

/// A command's `ok` body; anything else fails the test.
fn ok(client: &mut Client, op: &str, fields: Value) -> Value {
    let reply = call(client, op, fields.clone());
    assert!(
        reply["ok"].is_object(),
        "{op} {fields} was refused: {reply}"
    );
    reply["ok"].clone()
}

/// An authenticated session whose live delivery has started (its first `conv.list`).
fn session(daemon: &Daemon, user: &str, device: &str) -> Client {
    let mut client = Client::connect(daemon, Some(&common::token(user, Some(device))));
    ok(&mut client, "conv.list", json!({}));
    client
}

/// Replies to every id in `ids`, whatever order they come in.
fn replies(client: &mut Client, ids: &[u64]) -> HashMap<u64, Value> {
    let wanted: HashSet<u64> = ids.iter().copied().collect();
    let mut got = HashMap::new();
    while got.len() < wanted.len() {
        let doc = client.next_doc();
        if let Some(re) = doc["re"].as_u64() {
            if wanted.contains(&re) {
                assert!(got.insert(re, doc).is_none(), "two replies to {re}");
            }
        }
    }
    got
}

/// The whole history of `conv`, paged forward with `after`.
fn history(client: &mut Client, conv: &str) -> Vec<Value> {
    let mut msgs: Vec<Value> = Vec::new();
    loop {
        let after = msgs.last().map_or(0, |m| m["seq"].as_u64().unwrap());
        let page = ok(
            client,
            "history",
            json!({"conv": conv, "after": after, "limit": PAGE}),
        );
        let batch = page["msgs"].as_array().unwrap();
        assert!(batch.len() as u64 <= PAGE, "page of {}", batch.len());
        msgs.extend(batch.iter().cloned());
        if !page["more"].as_bool().unwrap() {
            return msgs;
        }
        assert!(!batch.is_empty(), "{conv}: more=true on an empty page");
    }
}

// ---------------------------------------------------------------------------------------
// Placement: users on one shard, their conversations on the other.

/// `n` user names with `prefix` homed on `shard`.
fn users_on(prefix: &str, shard: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|user| user_home(user, SHARDS) == shard)
        .take(n)
        .collect()
}

/// Two users homed on `users_shard` whose direct conversation is homed on `conv_shard`.
fn direct_pair(prefix: &str, users_shard: u32, conv_shard: u32) -> (String, String) {
    let candidates = users_on(prefix, users_shard, 16);
    for (i, a) in candidates.iter().enumerate() {
        for b in &candidates[i + 1..] {
            if conversation_home(&direct_conv_id(a, b), SHARDS) == conv_shard {
                return (a.clone(), b.clone());
            }
        }
    }
    panic!("no {prefix} pair on shard {users_shard} with a direct conv on {conv_shard}");
}

/// Create groups of `members` (the first creates) until one is homed on `shard`.
fn group_on(daemon: &Daemon, members: &[String], shard: u32) -> String {
    let mut creator = session(daemon, &members[0], "setup");
    for _ in 0..64 {
        let created = ok(
            &mut creator,
            "conv.create",
            json!({"kind": "group", "members": &members[1..], "title": "durable"}),
        );
        let conv = created["conv"].as_str().unwrap().to_string();
        // docs/protocol.md section 4 (this build): `g-` and 32 hex digits.
        let digits = conv.strip_prefix("g-").unwrap_or_default();
        assert!(
            digits.len() == 32 && digits.bytes().all(|b| b.is_ascii_hexdigit()),
            "group id {conv:?} is not g- and 32 hex digits"
        );
        if conversation_home(&conv, SHARDS) == shard {
            return conv;
        }
    }
    panic!("64 groups and none homed on shard {shard}");
}

fn create_direct(daemon: &Daemon, a: &str, b: &str) -> String {
    let mut client = session(daemon, a, "setup");
    let created = ok(
        &mut client,
        "conv.create",
        json!({"kind": "direct", "members": [b]}),
    );
    let conv = created["conv"].as_str().unwrap().to_string();
    assert_eq!(created["created"], true, "{a} + {b}: {created}");
    assert_direct_id_form(&conv);
    // Both users derive the same id: the other one creating it gets it back, unchanged.
    let mut other = session(daemon, b, "setup");
    let again = ok(
        &mut other,
        "conv.create",
        json!({"kind": "direct", "members": [a]}),
    );
    assert_eq!(again["conv"], conv.as_str(), "{b} + {a}: {again}");
    assert_eq!(again["created"], false, "{b} + {a}: {again}");
    conv
}

/// docs/protocol.md section 4 (this build): a direct conversation's id is `d-` and 32
/// lowercase hex digits. (Which hash makes the digits is not documented; the one pair the
/// docs show is checked by `direct_conversation_ids_are_the_documented_ones`.)
fn assert_direct_id_form(conv: &str) {
    let digits = conv
        .strip_prefix("d-")
        .unwrap_or_else(|| panic!("direct conversation id {conv:?} does not start with d-"));
    assert!(
        digits.len() == 32
            && digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "direct conversation id {conv:?} is not d- and 32 lowercase hex digits"
    );
}

/// A conversation under test and who sends into it.
struct Conv {
    id: String,
    senders: Vec<String>,
}

/// Two direct and two group conversations, one of each homed on each shard, each
/// between users homed on the other shard.
fn make_conversations(daemon: &Daemon, prefix: &str) -> Vec<Conv> {
    let mut convs = Vec::new();
    for conv_shard in 0..SHARDS {
        let users_shard = 1 - conv_shard;
        let (a, b) = direct_pair(&format!("{prefix}{users_shard}-"), users_shard, conv_shard);
        let direct = create_direct(daemon, &a, &b);
        assert_eq!(conversation_home(&direct, SHARDS), conv_shard);
        // The group adds a member who never connects.
        let quiet = users_on(&format!("{prefix}{users_shard}-quiet"), users_shard, 1);
        let group = group_on(
            daemon,
            &[a.clone(), b.clone(), quiet[0].clone()],
            conv_shard,
        );
        for user in [&a, &b] {
            assert_eq!(user_home(user, SHARDS), users_shard);
        }
        convs.push(Conv {
            id: direct,
            senders: vec![a.clone(), b.clone()],
        });
        convs.push(Conv {
            id: group,
            senders: vec![a, b],
        });
    }
    convs
}

// ---------------------------------------------------------------------------------------
// The burst.

#[derive(Debug, Clone)]
struct Outgoing {
    conv: String,
    cmid: String,
    body: String,
    user: String,
}

/// A message known to be durable: acknowledged, or seen after a restart.
#[derive(Debug, Clone)]
struct Known {
    cmid: String,
    mid: String,
    body: String,
    from: String,
    ts: u64,
}

#[derive(Default)]
struct BurstReport {
    acked: Vec<(Outgoing, Value)>,
    unacked: Vec<Outgoing>,
    problems: Vec<String>,
}

/// One burst client: pipeline sends (up to IN_FLIGHT unanswered) round-robin into
/// `convs` until the connection dies, reporting each `ok` on `acks`.
fn burst(
    mut client: Client,
    user: String,
    device: String,
    convs: Vec<String>,
    round: usize,
    acks: mpsc::Sender<()>,
) -> BurstReport {
    let mut report = BurstReport::default();
    let mut in_flight: HashMap<u64, Outgoing> = HashMap::new();
    let mut next_id = FIRST_BURST_ID;
    let mut sent = 0;
    let started = Instant::now();
    'session: loop {
        while in_flight.len() < IN_FLIGHT && started.elapsed() < BURST_LIMIT {
            let conv = convs[sent % convs.len()].clone();
            let cmid = format!("r{round}-{user}-{device}-{sent}");
            // Bodies of varied length, not only ASCII.
            let body = format!("{cmid} größe {}", "x".repeat(sent * 37 % 700));
            let id = next_id;
            next_id += 1;
            sent += 1;
            let doc = json!({"id": id, "op": "send", "conv": conv, "cmid": cmid, "body": body});
            let outgoing = Outgoing {
                conv,
                cmid,
                body,
                user: user.clone(),
            };
            // Unanswered from the moment it may have left.
            in_flight.insert(id, outgoing);
            if client.ws.send(Message::text(doc.to_string())).is_err() {
                break 'session;
            }
        }
        if in_flight.is_empty() {
            report.problems.push(format!(
                "{user}/{device}: sent {sent} in {BURST_LIMIT:?} and was never killed"
            ));
            break;
        }
        let text = match client.ws.read() {
            Ok(Message::Text(text)) => text,
            // SIGKILL sends no close frame: this is the server ending the session (4009
            // for a client too slow to read, say), which would end the burst early.
            Ok(Message::Close(frame)) => {
                report
                    .problems
                    .push(format!("{user}/{device}: closed by the server: {frame:?}"));
                break;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                report.problems.push(format!(
                    "{user}/{device}: no reply within {WAIT:?} with {} sends unanswered",
                    in_flight.len()
                ));
                break;
            }
            // The daemon died under us: what was acknowledged is in `report`.
            Err(_) => break,
        };
        for line in text.split('\n') {
            let doc: Value = match serde_json::from_str(line) {
                Ok(doc) => doc,
                Err(error) => {
                    report
                        .problems
                        .push(format!("{user}/{device}: bad JSON {line:?}: {error}"));
                    continue;
                }
            };
            let Some(outgoing) = doc["re"].as_u64().and_then(|id| in_flight.remove(&id)) else {
                continue;
            };
            let ok = &doc["ok"];
            if ok.is_object() && ok["dup"] == false && ok["conv"] == outgoing.conv.as_str() {
                report.acked.push((outgoing, ok.clone()));
                let _ = acks.send(());
            } else {
                report
                    .problems
                    .push(format!("{user}/{device}: send {} got {doc}", outgoing.cmid));
            }
        }
    }
    report.unacked.extend(in_flight.into_values());
    report
}

// ---------------------------------------------------------------------------------------
// What the test knows, and the check of a restarted daemon against it.

#[derive(Default)]
struct Model {
    /// conv -> seq -> the message.
    known: HashMap<String, BTreeMap<u64, Known>>,
    /// conv -> cmid -> a send that was never answered and has not been seen since.
    pending: HashMap<String, HashMap<String, Outgoing>>,
}

impl Model {
    fn learn(&mut self, conv: &str, seq: u64, known: Known) {
        let previous = self
            .known
            .entry(conv.to_string())
            .or_default()
            .insert(seq, known.clone());
        if let Some(previous) = previous {
            assert_eq!(
                previous.cmid, known.cmid,
                "{conv} seq {seq} acknowledged for two different sends"
            );
        }
    }

    fn absorb(&mut self, report: BurstReport) -> usize {
        let acked = report.acked.len();
        for (out, ok) in report.acked {
            let seq = ok["seq"].as_u64().expect("seq");
            let mid = ok["mid"].as_str().expect("mid").to_string();
            let ts = ok["ts"].as_u64().expect("ts");
            self.learn(
                &out.conv,
                seq,
                Known {
                    cmid: out.cmid,
                    mid,
                    body: out.body,
                    from: out.user,
                    ts,
                },
            );
        }
        for out in report.unacked {
            self.pending
                .entry(out.conv.clone())
                .or_default()
                .insert(out.cmid.clone(), out);
        }
        acked
    }

    fn pending_count(&self) -> usize {
        self.pending.values().map(HashMap::len).sum()
    }
}

/// Check every conversation's history against the model: every known message at its
/// seq with the same mid, cmid, body, sender and ts; seqs exactly 1..=last_seq; no cmid
/// twice; anything else must be an unanswered send (which becomes known). Returns how
/// many unanswered sends turned out to be there.
fn verify(daemon: &Daemon, convs: &[Conv], model: &mut Model, when: &str) -> usize {
    let mut survived = 0;
    for conv in convs {
        let mut reader = session(daemon, &conv.senders[0], "reader");
        let msgs = history(&mut reader, &conv.id);
        let last_seq = ok(&mut reader, "conv.get", json!({"conv": conv.id}))["last_seq"]
            .as_u64()
            .unwrap();
        let id = &conv.id;
        assert_eq!(
            msgs.len() as u64,
            last_seq,
            "{when}: {id} history holds {} messages, last_seq is {last_seq}",
            msgs.len()
        );
        let mut cmids = HashSet::new();
        for (index, msg) in msgs.iter().enumerate() {
            let seq = msg["seq"].as_u64().unwrap();
            assert_eq!(seq, index as u64 + 1, "{when}: {id} seqs have a gap: {msg}");
            assert_eq!(msg["conv"], id.as_str(), "{when}: {msg}");
            let cmid = msg["cmid"].as_str().unwrap();
            assert!(
                cmids.insert(cmid.to_string()),
                "{when}: {id} cmid {cmid} twice"
            );
        }
        let known = model.known.entry(id.clone()).or_default();
        if let Some((&top, _)) = known.last_key_value() {
            assert!(
                top <= last_seq,
                "{when}: {id} lost acknowledged seqs: acked up to {top}, last_seq {last_seq}"
            );
        }
        for (&seq, k) in known.iter() {
            let msg = &msgs[seq as usize - 1];
            let what = format!("{when}: {id} seq {seq} (acked as cmid {})", k.cmid);
            assert_eq!(msg["cmid"], k.cmid.as_str(), "{what}: {msg}");
            assert_eq!(msg["mid"], k.mid.as_str(), "{what}: {msg}");
            assert_eq!(msg["body"], k.body.as_str(), "{what}: {msg}");
            assert_eq!(msg["from"], k.from.as_str(), "{what}: {msg}");
            assert_eq!(msg["ts"], k.ts, "{what}: {msg}");
        }
        let pending = model.pending.entry(id.clone()).or_default();
        for msg in &msgs {
            let seq = msg["seq"].as_u64().unwrap();
            if known.contains_key(&seq) {
                continue;
            }
            let cmid = msg["cmid"].as_str().unwrap();
            let Some(out) = pending.remove(cmid) else {
                panic!("{when}: {id} seq {seq} is no send of this test: {msg}");
            };
            assert_eq!(msg["body"], out.body.as_str(), "{when}: {msg}");
            assert_eq!(msg["from"], out.user.as_str(), "{when}: {msg}");
            survived += 1;
            known.insert(
                seq,
                Known {
                    cmid: out.cmid,
                    mid: msg["mid"].as_str().unwrap().to_string(),
                    body: out.body,
                    from: out.user,
                    ts: msg["ts"].as_u64().unwrap(),
                },
            );
        }
    }
    survived
}

/// What a client does after reconnecting: resend every unanswered send (each must be
/// sequenced now, since it is not in the history), and resend a few acknowledged ones
/// (each must be recognised: dup, the original seq, mid and ts). Returns (resent
/// unanswered, resent acknowledged).
fn resend(daemon: &Daemon, model: &mut Model, when: &str) -> (usize, usize) {
    /// A send to repeat, and what the first one got if it was acknowledged (or seen).
    struct Resend {
        out: Outgoing,
        original: Option<(u64, Known)>,
    }
    let mut by_user: BTreeMap<String, Vec<Resend>> = BTreeMap::new();
    for pending in std::mem::take(&mut model.pending).into_values() {
        for out in pending.into_values() {
            by_user.entry(out.user.clone()).or_default().push(Resend {
                out,
                original: None,
            });
        }
    }
    let mut acked_resent = 0;
    for (conv, known) in &model.known {
        // The first, the last, and a few between.
        let seqs: Vec<u64> = known.keys().copied().collect();
        let Some(last) = seqs.len().checked_sub(1) else {
            continue;
        };
        let picks: BTreeMap<u64, &Known> = [0, seqs.len() / 3, seqs.len() / 2, last]
            .into_iter()
            .map(|i| (seqs[i], &known[&seqs[i]]))
            .collect();
        for (seq, k) in picks {
            acked_resent += 1;
            let out = Outgoing {
                conv: conv.clone(),
                cmid: k.cmid.clone(),
                body: k.body.clone(),
                user: k.from.clone(),
            };
            by_user.entry(k.from.clone()).or_default().push(Resend {
                out,
                original: Some((seq, k.clone())),
            });
        }
    }
    let mut unacked_resent = 0;
    for (user, sends) in by_user {
        let mut client = session(daemon, &user, "retry");
        let ids: Vec<u64> = sends
            .iter()
            .map(|Resend { out, .. }| {
                client.command(
                    "send",
                    json!({"conv": out.conv, "cmid": out.cmid, "body": out.body}),
                )
            })
            .collect();
        let mut got = replies(&mut client, &ids);
        for (id, Resend { out, original }) in ids.into_iter().zip(sends) {
            let reply = got.remove(&id).unwrap();
            let ok = &reply["ok"];
            let what = format!("{when}: resend of {} cmid {} by {user}", out.conv, out.cmid);
            assert!(ok.is_object(), "{what}: {reply}");
            let seq = ok["seq"].as_u64().unwrap();
            match original {
                Some((original_seq, k)) => {
                    assert_eq!(ok["dup"], true, "{what} not recognised: {reply}");
                    assert_eq!(seq, original_seq, "{what}: {reply}");
                    assert_eq!(ok["mid"], k.mid.as_str(), "{what}: {reply}");
                    assert_eq!(ok["ts"], k.ts, "{what}: {reply}");
                }
                None => {
                    assert_eq!(
                        ok["dup"], false,
                        "{what}: not in the history, yet a duplicate: {reply}"
                    );
                    unacked_resent += 1;
                    model.learn(
                        &out.conv,
                        seq,
                        Known {
                            cmid: out.cmid,
                            mid: ok["mid"].as_str().unwrap().to_string(),
                            body: out.body,
                            from: out.user,
                            ts: ok["ts"].as_u64().unwrap(),
                        },
                    );
                }
            }
        }
    }
    (unacked_resent, acked_resent)
}

// ---------------------------------------------------------------------------------------
// What the restarts logged.

fn loaded_a_snapshot(restart_log: &[String]) -> bool {
    restart_log
        .iter()
        .any(|line| line.contains("loaded the state snapshot"))
}

/// Without snapshots, every recovery replayed the whole log.
fn assert_no_restart_loaded_a_snapshot(restarts: &[Vec<String>]) {
    assert!(!restarts.iter().any(|log| loaded_a_snapshot(log)));
}

/// With frequent snapshots, some recovery started from one (and replayed only the rest).
fn assert_some_restart_loaded_a_snapshot(restarts: &[Vec<String>]) {
    assert!(
        restarts.iter().any(|log| loaded_a_snapshot(log)),
        "no restart started from a snapshot"
    );
}
