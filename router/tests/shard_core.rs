//! Sans-IO tests of the chat core: several `ShardCore`s wired by in-memory queues, with
//! the clock and durability in the test's hands.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::chat_log::{ChatLog, LogError, MemoryLog};
use parley_router::clock::Now;
use parley_router::command::{self, ChatCommand};
use parley_router::limits::ChatLimits;
use parley_router::ownership::{conversation_home, user_home};
use parley_router::shard::{direct_conv_id, MeshEntry, ShardCore};
use serde_json::{json, Value};

const SHARDS: usize = 2;
const T0_MS: u64 = 1_800_000_000_000;

/// A log the test can read back and make refuse appends.
#[derive(Clone, Default)]
struct SharedLog {
    inner: Rc<RefCell<MemoryLog>>,
    full: Rc<RefCell<bool>>,
    disk: Rc<RefCell<Disk>>,
}

/// The disk under a [`SharedLog`], as the WAL reports it (see `parley_wal::space`).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Disk {
    #[default]
    Room,
    /// Ordinary appends are refused `NoSpace`, deferred ones still taken, and the log
    /// does not say so yet (the disk filled during the turn).
    Filling,
    /// As `Filling`, and the log says it refuses.
    Full,
}

impl ChatLog for SharedLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        if *self.full.borrow() {
            return Err(LogError::Full);
        }
        if *self.disk.borrow() != Disk::Room {
            return Err(LogError::NoSpace("injected".into()));
        }
        self.inner.borrow_mut().append(timestamp, payload)
    }

    fn append_deferred(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        if *self.full.borrow() {
            return Err(LogError::Full);
        }
        self.inner.borrow_mut().append(timestamp, payload)
    }

    fn refusing(&self) -> Option<LogError> {
        (*self.disk.borrow() == Disk::Full).then(|| LogError::NoSpace("injected".into()))
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        self.inner.borrow_mut().read(lsn)
    }

    fn max_record_bytes(&self) -> usize {
        self.inner.borrow().max_record_bytes()
    }
}

/// A session: its shard, connection id, user and device.
#[derive(Clone)]
struct Sess {
    shard: usize,
    conn: u64,
    user: String,
    device: String,
}

struct Cluster {
    cores: Vec<ShardCore>,
    logs: Vec<SharedLog>,
    t0: Instant,
    elapsed: Duration,
    /// Durability is granted by the test unless this is set.
    hold_durability: bool,
    /// What each session received, in order.
    inbox: BTreeMap<(usize, u64), VecDeque<Value>>,
    next_conn: u64,
    next_id: u64,
}

impl Cluster {
    fn new() -> Self {
        Self::with_limits(ChatLimits::default())
    }

    fn with_limits(limits: ChatLimits) -> Self {
        let limits = Arc::new(limits);
        let logs: Vec<SharedLog> = (0..SHARDS).map(|_| SharedLog::default()).collect();
        let cores = (0..SHARDS)
            .map(|k| ShardCore::new(k, SHARDS, limits.clone(), Box::new(logs[k].clone())))
            .collect();
        Self {
            cores,
            logs,
            t0: Instant::now(),
            elapsed: Duration::ZERO,
            hold_durability: false,
            inbox: BTreeMap::new(),
            next_conn: 0,
            next_id: 0,
        }
    }

    fn now(&self) -> Now {
        Now {
            instant: self.t0 + self.elapsed,
            unix_ms: T0_MS + self.elapsed.as_millis() as u64,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.elapsed += by;
        let now = self.now();
        for core in &mut self.cores {
            core.on_tick(now);
        }
        self.settle();
    }

    fn connect(&mut self, shard: usize, user: &str, device: &str) -> Sess {
        self.next_conn += 1;
        let conn = self.next_conn;
        let now = self.now();
        self.cores[shard].session_opened(conn, user, now);
        self.inbox.insert((shard, conn), VecDeque::new());
        self.settle();
        Sess {
            shard,
            conn,
            user: user.into(),
            device: device.into(),
        }
    }

    fn disconnect(&mut self, s: &Sess) {
        let now = self.now();
        self.cores[s.shard].session_closed(s.conn, now);
        self.settle();
    }

    /// Submit a command as the session's transport would; returns its id.
    fn submit(&mut self, s: &Sess, op: &str, fields: Value) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let mut doc = fields;
        doc["id"] = json!(id);
        doc["op"] = json!(op);
        let command = command::parse(op, &doc.to_string(), self.cores[0].limits())
            .unwrap_or_else(|r| panic!("{op} refused before routing: {r:?}"));
        let now = self.now();
        self.cores[s.shard].on_request(s.conn, id, &s.user, &s.device, command, now);
        id
    }

    fn request(&mut self, s: &Sess, op: &str, fields: Value) -> Value {
        let id = self.submit(s, op, fields);
        self.settle();
        self.take_reply(s, id)
    }

    fn take_reply(&mut self, s: &Sess, id: u64) -> Value {
        let inbox = self.inbox.get_mut(&(s.shard, s.conn)).expect("session");
        let at = inbox
            .iter()
            .position(|d| d["re"] == json!(id))
            .unwrap_or_else(|| panic!("no reply to {id}; inbox: {inbox:?}"));
        inbox.remove(at).expect("found")
    }

    fn has_reply(&self, s: &Sess, id: u64) -> bool {
        self.inbox[&(s.shard, s.conn)]
            .iter()
            .any(|d| d["re"] == json!(id))
    }

    /// Events (not replies) a session received, oldest first; they are taken.
    fn events(&mut self, s: &Sess) -> Vec<Value> {
        let inbox = self.inbox.get_mut(&(s.shard, s.conn)).expect("session");
        let (events, rest): (Vec<Value>, Vec<Value>) =
            inbox.drain(..).partition(|d| d.get("ev").is_some());
        inbox.extend(rest);
        events
    }

    /// Move entries between shards and documents to sessions until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            if !self.hold_durability {
                for core in &mut self.cores {
                    let last = core.last_appended();
                    if last > core.durable_lsn() {
                        core.on_durable(last);
                        moved = true;
                    }
                }
            }
            for from in 0..SHARDS {
                for (conn, doc, _) in self.cores[from].take_local().collect::<Vec<_>>() {
                    moved = true;
                    if let Some(inbox) = self.inbox.get_mut(&(from, conn)) {
                        inbox.push_back(serde_json::from_str(doc.as_str()).expect("JSON"));
                    }
                }
                for to in 0..SHARDS {
                    if to == from {
                        continue;
                    }
                    let entries: Vec<(usize, MeshEntry)> = self.cores[from]
                        .outgoing(to)
                        .drain(..)
                        .map(|e| (from, e))
                        .collect();
                    if !entries.is_empty() {
                        moved = true;
                        let now = self.now();
                        self.cores[to].on_entries(entries, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the cluster never settled");
    }
}

/// A user homed on `shard`.
fn user_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| user_home(u, SHARDS as u32) as usize == shard)
        .expect("some name hashes there")
}

/// Two users on shard `user_shard` whose direct conversation lives on the other shard.
fn pair_homed_apart(user_shard: usize) -> (String, String, String) {
    let a = user_on(user_shard, "a");
    for i in 0.. {
        let b = format!("b{i}");
        let conv = direct_conv_id(&a, &b);
        if user_home(&b, SHARDS as u32) as usize == user_shard
            && conversation_home(&conv, SHARDS as u32) as usize != user_shard
        {
            return (a, b, conv);
        }
    }
    unreachable!()
}

fn create_direct(c: &mut Cluster, s: &Sess, other: &str) -> String {
    let r = c.request(
        s,
        "conv.create",
        json!({"kind": "direct", "members": [other]}),
    );
    r["ok"]["conv"].as_str().expect("conv id").to_string()
}

#[test]
fn ok_waits_for_durability_and_fan_out_follows_it() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "phone");
    let sb = c.connect(1, &b, "laptop");
    assert_eq!(create_direct(&mut c, &sa, &b), conv);
    c.events(&sb);

    c.hold_durability = true;
    let id = c.submit(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "m1", "body": "hi"}),
    );
    c.settle();
    assert!(!c.has_reply(&sa, id), "ok before the log was durable");
    assert!(
        c.events(&sb).is_empty(),
        "delivered before the log was durable"
    );

    c.hold_durability = false;
    c.settle();
    let reply = c.take_reply(&sa, id);
    assert_eq!(reply["ok"]["seq"], 1);
    assert_eq!(reply["ok"]["dup"], false);
    let got = c.events(&sb);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["ev"], "msg");
    assert_eq!(got[0]["body"], "hi");
    // The sender's own session gets the event too.
    assert_eq!(c.events(&sa).iter().filter(|e| e["ev"] == "msg").count(), 1);
}

#[test]
fn seq_is_gapless_under_interleaved_senders_on_both_shards() {
    let mut c = Cluster::new();
    let users: Vec<String> = (0..4)
        .map(|i| user_on(i % SHARDS, &format!("u{i}_")))
        .collect();
    let sessions: Vec<Sess> = users
        .iter()
        .enumerate()
        .map(|(i, u)| c.connect(i % SHARDS, u, "d"))
        .collect();
    let r = c.request(
        &sessions[0],
        "conv.create",
        json!({"kind": "group", "members": users[1..]}),
    );
    let conv = r["ok"]["conv"].as_str().unwrap().to_string();
    for s in &sessions {
        c.events(s);
    }
    // Submit without settling in between, so commands from both shards interleave.
    let mut ids = Vec::new();
    for round in 0..50 {
        for (i, s) in sessions.iter().enumerate() {
            let cmid = format!("{i}-{round}");
            ids.push((
                i,
                c.submit(s, "send", json!({"conv": conv, "cmid": cmid, "body": "x"})),
            ));
        }
        if round % 7 == 0 {
            c.settle();
        }
    }
    c.settle();
    let mut seqs: Vec<u64> = ids
        .iter()
        .map(|(i, id)| {
            let s = sessions[*i].clone();
            c.take_reply(&s, *id)["ok"]["seq"].as_u64().unwrap()
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    for s in &sessions {
        let got: Vec<u64> = c
            .events(s)
            .iter()
            .filter(|e| e["ev"] == "msg")
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            got,
            (1..=200).collect::<Vec<u64>>(),
            "{} sees seq order",
            s.user
        );
    }
}

#[test]
fn resends_are_deduped_per_sender() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(1);
    let sa = c.connect(1, &a, "d");
    let sb = c.connect(0, &b, "d");
    create_direct(&mut c, &sa, &b);
    let first = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "same", "body": "one"}),
    );
    c.events(&sb);
    let again = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "same", "body": "two"}),
    );
    assert_eq!(again["ok"]["dup"], true);
    assert_eq!(again["ok"]["seq"], first["ok"]["seq"]);
    assert_eq!(again["ok"]["ts"], first["ok"]["ts"]);
    assert!(c.events(&sb).is_empty(), "a duplicate delivers nothing");
    let other = c.request(
        &sb,
        "send",
        json!({"conv": conv, "cmid": "same", "body": "b"}),
    );
    assert_eq!(other["ok"]["seq"], 2, "another sender's cmid is its own");
}

#[test]
fn membership_is_checked_at_the_home() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    create_direct(&mut c, &sa, &b);
    let eve = c.connect(1, "eve", "d");
    let r = c.request(
        &eve,
        "send",
        json!({"conv": conv, "cmid": "x", "body": "no"}),
    );
    assert_eq!(r["err"]["code"], "forbidden");
    let r = c.request(
        &eve,
        "send",
        json!({"conv": "nope", "cmid": "x", "body": "no"}),
    );
    assert_eq!(r["err"]["code"], "not_found");
    let r = c.request(&sa, "member.add", json!({"conv": conv, "users": ["eve"]}));
    assert_eq!(r["err"]["code"], "forbidden", "direct members are fixed");
}

#[test]
fn a_full_log_answers_unavailable_and_changes_nothing() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    create_direct(&mut c, &sa, &b);
    let home = conversation_home(&conv, SHARDS as u32) as usize;
    *c.logs[home].full.borrow_mut() = true;
    let r = c.request(&sa, "send", json!({"conv": conv, "cmid": "m", "body": "x"}));
    assert_eq!(r["err"]["code"], "unavailable");
    *c.logs[home].full.borrow_mut() = false;
    let r = c.request(&sa, "send", json!({"conv": conv, "cmid": "m", "body": "x"}));
    assert_eq!(r["ok"]["seq"], 1, "the refused send took no seq");
    assert_eq!(r["ok"]["dup"], false);
}

/// A full disk is a refusal: commands get `unavailable`, nothing changes, the shard does
/// not fail, and everything works again once the disk has room. An ack answered in the
/// turn the disk filled is written from the log's reserve, not held.
#[test]
fn a_full_disk_answers_unavailable_and_the_shard_goes_on() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    let sb = c.connect(0, &b, "d");
    create_direct(&mut c, &sa, &b);
    let sent = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "m1", "body": "x"}),
    );
    assert_eq!(sent["ok"]["seq"], 1);
    let home = conversation_home(&conv, SHARDS as u32) as usize;
    let logged = c.logs[home].inner.borrow().last_lsn();

    *c.logs[home].disk.borrow_mut() = Disk::Filling;
    let r = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "m2", "body": "x"}),
    );
    assert_eq!(r["err"]["code"], "unavailable", "{r}");
    let r = c.request(&sb, "ack", json!({"conv": conv, "seq": 1}));
    assert!(
        r["ok"].is_object(),
        "an ack of the turn the disk filled: {r}"
    );
    assert_eq!(
        c.logs[home].inner.borrow().last_lsn(),
        logged + 1,
        "its record"
    );

    *c.logs[home].disk.borrow_mut() = Disk::Full;
    c.events(&sa);
    let r = c.request(&sb, "read", json!({"conv": conv, "seq": 1}));
    assert_eq!(r["err"]["code"], "unavailable", "{r}");
    assert!(c.events(&sa).is_empty(), "a refused read sends no receipt");
    let r = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "m2", "body": "x"}),
    );
    assert_eq!(r["err"]["code"], "unavailable", "{r}");
    assert_eq!(c.logs[home].inner.borrow().last_lsn(), logged + 1);
    for core in &c.cores {
        assert!(core.failed().is_none(), "{:?}", core.failed());
    }

    *c.logs[home].disk.borrow_mut() = Disk::Room;
    let r = c.request(
        &sa,
        "send",
        json!({"conv": conv, "cmid": "m2", "body": "x"}),
    );
    assert_eq!(r["ok"]["seq"], 2, "the refused sends took no seq: {r}");
    assert_eq!(r["ok"]["dup"], false);
    let r = c.request(&sb, "read", json!({"conv": conv, "seq": 2}));
    assert!(r["ok"].is_object(), "{r}");
}

/// While the log answers `Full`, cursor advances pile up; once it takes records again
/// they go out split into records within the log's limit, and nothing fails.
#[test]
fn cursors_piled_up_behind_a_full_log_go_out_in_records_the_log_takes() {
    const LIMIT: usize = 1024;
    let mut c = Cluster::new();
    for log in &c.logs {
        log.inner.borrow_mut().max_record_bytes = LIMIT;
    }
    let users: Vec<String> = (0..40).map(|i| format!("member{i:02}")).collect();
    let owner = c.connect(0, &users[0], "d0");
    let g = c.request(
        &owner,
        "conv.create",
        json!({"kind": "group", "members": users[1..]}),
    );
    let group = g["ok"]["conv"].as_str().expect("created").to_string();
    c.request(
        &owner,
        "send",
        json!({"conv": group, "cmid": "m", "body": "x"}),
    );
    let home = conversation_home(&group, SHARDS as u32) as usize;
    let logged_before = c.logs[home].inner.borrow().last_lsn();
    *c.logs[home].full.borrow_mut() = true;
    let mut asked = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for device in ["d0", "d1"] {
            let s = c.connect(i % SHARDS, user, device);
            let id = c.submit(&s, "read", json!({"conv": group, "seq": 1}));
            asked.push((s, id));
        }
    }
    c.settle();
    assert!(
        asked.iter().all(|(s, id)| !c.has_reply(s, *id)),
        "held for the log"
    );
    *c.logs[home].full.borrow_mut() = false;
    c.advance(Duration::from_millis(1));
    for core in &c.cores {
        assert!(core.failed().is_none(), "{:?}", core.failed());
    }
    for (s, id) in &asked {
        assert!(c.take_reply(s, *id)["ok"].is_object());
    }
    let records = c.logs[home].inner.borrow().records.clone();
    let cursor_records = &records[logged_before as usize..];
    assert!(cursor_records.len() > 1, "{} records", cursor_records.len());
    assert!(cursor_records.iter().all(|r| r.len() <= LIMIT));

    // A restart finds every cursor.
    let mut r = Cluster::new();
    for k in 0..SHARDS {
        let records = c.logs[k].inner.borrow().records.clone();
        for (i, payload) in records.iter().enumerate() {
            r.cores[k].replay(i as u64 + 1, payload).expect("replays");
        }
        r.logs[k].inner.borrow_mut().records = records;
    }
    let last = r.connect(0, &users[39], "d1");
    let list = r.request(&last, "conv.list", json!({}));
    assert_eq!(list["ok"]["convs"][0]["read_seq"], 1);
    assert_eq!(list["ok"]["convs"][0]["delivered_seq"], 1);
}

#[test]
fn receipts_follow_the_users_cursors() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(1);
    let sa = c.connect(1, &a, "d");
    let phone = c.connect(0, &b, "phone");
    let laptop = c.connect(1, &b, "laptop");
    create_direct(&mut c, &sa, &b);
    for i in 0..3 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": "x"}),
        );
    }
    c.events(&sa);
    c.request(&phone, "ack", json!({"conv": conv, "seq": 3}));
    let got = c.events(&sa);
    assert_eq!(
        got,
        vec![json!({"ev": "receipt", "conv": conv, "user": b, "kind": "delivered", "seq": 3})]
    );
    // The laptop catching up to less than the phone moves no user-level cursor.
    c.request(&laptop, "ack", json!({"conv": conv, "seq": 2}));
    assert!(c.events(&sa).is_empty());
    c.request(&laptop, "read", json!({"conv": conv, "seq": 2}));
    let got = c.events(&sa);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["kind"], "read");
    let r = c.request(&laptop, "ack", json!({"conv": conv, "seq": 9}));
    assert_eq!(r["err"]["code"], "bad_request");
    let list = c.request(&laptop, "conv.list", json!({}));
    let entry = &list["ok"]["convs"][0];
    assert_eq!(entry["read_seq"], 2);
    assert_eq!(entry["delivered_seq"], 2, "this device's cursor");
    assert_eq!(entry["unread"], 1);
}

#[test]
fn typing_expires_and_is_not_echoed_to_the_typer() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    let sb = c.connect(1, &b, "d");
    create_direct(&mut c, &sa, &b);
    c.events(&sb);
    let id = c.submit(&sa, "typing", json!({"conv": conv, "on": true}));
    c.settle();
    assert!(!c.has_reply(&sa, id), "typing needs no reply");
    assert!(c.events(&sa).is_empty());
    assert_eq!(c.events(&sb)[0]["on"], true);
    c.advance(Duration::from_secs(4));
    c.submit(&sa, "typing", json!({"conv": conv, "on": true}));
    c.settle();
    assert!(c.events(&sb).is_empty(), "a refresh is not a change");
    c.advance(Duration::from_secs(4));
    assert!(c.events(&sb).is_empty(), "the refresh extended it");
    c.advance(Duration::from_millis(1100));
    let got = c.events(&sb);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["on"], false);
}

#[test]
fn presence_goes_to_co_members_with_last_seen() {
    let mut c = Cluster::new();
    let (a, b, _) = pair_homed_apart(0);
    let sa = c.connect(1, &a, "d");
    create_direct(&mut c, &sa, &b);
    let sb = c.connect(1, &b, "d");
    let got = c.events(&sa);
    assert!(
        got.contains(&json!({"ev": "presence", "user": b, "status": "online"})),
        "{got:?}"
    );
    let r = c.request(&sa, "presence.get", json!({"users": [b, "nobody"]}));
    assert_eq!(r["ok"]["users"][0]["status"], "online");
    assert_eq!(r["ok"]["users"][1]["status"], "offline");
    c.advance(Duration::from_secs(3));
    c.disconnect(&sb);
    let got = c.events(&sa);
    let offline = got
        .iter()
        .find(|e| e["ev"] == "presence" && e["status"] == "offline")
        .expect("offline event");
    let last_seen = offline["last_seen"].as_u64().unwrap();
    assert_eq!(last_seen, T0_MS + 3000);
    let r = c.request(&sa, "presence.get", json!({"users": [b]}));
    assert_eq!(r["ok"]["users"][0]["last_seen"], last_seen);
}

#[test]
fn sync_replays_then_lists_the_rest_then_synced() {
    let limits = ChatLimits {
        sync_max_messages: 3,
        ..ChatLimits::default()
    };
    let mut c = Cluster::with_limits(limits);
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    create_direct(&mut c, &sa, &b);
    let g = c.request(&sa, "conv.create", json!({"kind": "group", "members": [b]}));
    let group = g["ok"]["conv"].as_str().unwrap().to_string();
    for i in 0..5 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": "x"}),
        );
    }
    let sb = c.connect(1, &b, "d");
    let id = c.submit(
        &sb,
        "sync",
        json!({"cursors": [{"conv": conv, "after": 1}]}),
    );
    c.settle();
    let inbox: Vec<Value> = c.inbox[&(1, sb.conn)].iter().cloned().collect();
    let seqs: Vec<u64> = inbox
        .iter()
        .filter(|d| d["ev"] == "msg")
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 3, 4], "at most sync_max_messages");
    let reply_at = inbox.iter().position(|d| d["re"] == json!(id)).unwrap();
    let last = inbox.last().unwrap();
    assert_eq!(
        last,
        &json!({"ev": "synced", "more": [{"conv": conv, "after": 4}]})
    );
    assert_eq!(reply_at, inbox.len() - 2);
    let convs = inbox[reply_at]["ok"]["convs"].as_array().unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0]["conv"], group.as_str());
}

#[test]
fn replaying_the_log_rebuilds_the_same_state() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(1);
    let sa = c.connect(1, &a, "d");
    let sb = c.connect(0, &b, "d");
    create_direct(&mut c, &sa, &b);
    let g = c.request(
        &sa,
        "conv.create",
        json!({"kind": "group", "members": [b, "carol"], "title": "t"}),
    );
    let group = g["ok"]["conv"].as_str().unwrap().to_string();
    c.request(
        &sa,
        "member.remove",
        json!({"conv": group, "users": ["carol"]}),
    );
    for i in 0..10 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": format!("m{i}")}),
        );
    }
    c.request(&sb, "read", json!({"conv": conv, "seq": 7}));
    c.request(
        &sb,
        "react",
        json!({"conv": conv, "seq": 2, "emoji": "+1", "on": true}),
    );
    c.disconnect(&sb);
    let before_list = c.request(&sa, "conv.list", json!({}));
    let before_history = c.request(&sa, "history", json!({"conv": conv}));
    let before_group = c.request(&sa, "conv.get", json!({"conv": group}));

    // A fresh cluster rebuilt from the same logs.
    let mut r = Cluster::new();
    for k in 0..SHARDS {
        let records = c.logs[k].inner.borrow().records.clone();
        for (i, payload) in records.iter().enumerate() {
            r.cores[k].replay(i as u64 + 1, payload).expect("replays");
        }
        r.logs[k].inner.borrow_mut().records = records;
    }
    let sa2 = r.connect(1, &a, "d");
    let strip = |v: Value| v["ok"].clone();
    assert_eq!(
        strip(r.request(&sa2, "conv.list", json!({}))),
        strip(before_list)
    );
    assert_eq!(
        strip(r.request(&sa2, "history", json!({"conv": conv}))),
        strip(before_history)
    );
    assert_eq!(
        strip(r.request(&sa2, "conv.get", json!({"conv": group}))),
        strip(before_group)
    );
    let dup = r.request(
        &sa2,
        "send",
        json!({"conv": conv, "cmid": "3", "body": "again"}),
    );
    assert_eq!(dup["ok"]["dup"], true);
    assert_eq!(dup["ok"]["seq"], 4);
    let r2 = r.request(&sa2, "presence.get", json!({"users": [b]}));
    assert!(
        r2["ok"]["users"][0]["last_seen"].is_u64(),
        "last seen survives"
    );
}

#[test]
fn history_pages_older_entries_from_the_log() {
    let limits = ChatLimits {
        message_cache_per_conv: 4,
        ..ChatLimits::default()
    };
    let mut c = Cluster::with_limits(limits);
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    create_direct(&mut c, &sa, &b);
    for i in 1..=20 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": format!("m{i}")}),
        );
    }
    let page = c.request(
        &sa,
        "history",
        json!({"conv": conv, "before": 11, "limit": 5}),
    );
    let bodies: Vec<&str> = page["ok"]["msgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["m6", "m7", "m8", "m9", "m10"]);
    assert_eq!(page["ok"]["more"], true);
    let page = c.request(&sa, "history", json!({"conv": conv, "after": 17}));
    assert_eq!(page["ok"]["msgs"].as_array().unwrap().len(), 3);
    assert_eq!(page["ok"]["more"], false);
    // An old resend is recognised from the log too.
    let dup = c.request(&sa, "send", json!({"conv": conv, "cmid": "2", "body": "x"}));
    assert_eq!(dup["ok"]["dup"], true);
    assert_eq!(dup["ok"]["seq"], 2);
}

#[test]
fn commands_are_parsed_as_chat_commands() {
    // The cluster bypasses the session; make sure the parse it relies on is the real one.
    let parsed = command::parse("conv.list", "{}", &ChatLimits::default()).unwrap();
    assert_eq!(parsed, ChatCommand::ConvList);
}

#[test]
fn a_snapshot_plus_the_log_after_it_rebuilds_the_same_state() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let sa = c.connect(0, &a, "d");
    let sb = c.connect(1, &b, "d");
    create_direct(&mut c, &sa, &b);
    let g = c.request(
        &sa,
        "conv.create",
        json!({"kind": "group", "members": [b, "carol"]}),
    );
    let group = g["ok"]["conv"].as_str().unwrap().to_string();
    for i in 0..6 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": format!("m{i}")}),
        );
        c.request(
            &sb,
            "send",
            json!({"conv": group, "cmid": format!("{i}"), "body": "g"}),
        );
    }
    c.request(&sb, "read", json!({"conv": conv, "seq": 4}));
    let snapshots: Vec<(u64, Vec<u8>)> = c
        .cores
        .iter()
        .map(|core| core.snapshot().unwrap())
        .collect();
    // More after the snapshot: it must come from the log.
    for i in 6..9 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": format!("m{i}")}),
        );
    }
    c.request(
        &sa,
        "member.remove",
        json!({"conv": group, "users": ["carol"]}),
    );
    c.request(
        &sb,
        "react",
        json!({"conv": conv, "seq": 1, "emoji": "+1", "on": true}),
    );
    c.request(&sb, "ack", json!({"conv": conv, "seq": 8}));
    c.disconnect(&sb);
    let before = [
        c.request(&sa, "conv.list", json!({}))["ok"].clone(),
        c.request(&sa, "history", json!({"conv": conv}))["ok"].clone(),
        c.request(&sa, "conv.get", json!({"conv": group}))["ok"].clone(),
    ];

    let mut r = Cluster::new();
    for (k, (lsn, bytes)) in snapshots.iter().enumerate() {
        let records = c.logs[k].inner.borrow().records.clone();
        r.cores[k].restore(*lsn, bytes).expect("restores");
        for (i, payload) in records.iter().enumerate().skip(*lsn as usize) {
            r.cores[k].replay(i as u64 + 1, payload).expect("replays");
        }
        r.logs[k].inner.borrow_mut().records = records;
    }
    let sa2 = r.connect(0, &a, "d");
    let after = [
        r.request(&sa2, "conv.list", json!({}))["ok"].clone(),
        r.request(&sa2, "history", json!({"conv": conv}))["ok"].clone(),
        r.request(&sa2, "conv.get", json!({"conv": group}))["ok"].clone(),
    ];
    assert_eq!(after, before);
    for (cmid, seq) in [("2", 3), ("7", 8)] {
        let dup = r.request(
            &sa2,
            "send",
            json!({"conv": conv, "cmid": cmid, "body": "again"}),
        );
        assert_eq!(dup["ok"]["dup"], true, "cmid {cmid}");
        assert_eq!(dup["ok"]["seq"], seq);
    }
    let next = r.request(
        &sa2,
        "send",
        json!({"conv": conv, "cmid": "new", "body": "n"}),
    );
    assert_eq!(next["ok"]["seq"], 10);
}

#[test]
fn a_live_message_never_overtakes_a_resume_replay() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(0);
    let home = conversation_home(&conv, SHARDS as u32) as usize;
    let sa = c.connect(home, &a, "d");
    create_direct(&mut c, &sa, &b);
    for i in 1..=3 {
        c.request(
            &sa,
            "send",
            json!({"conv": conv, "cmid": format!("{i}"), "body": "x"}),
        );
    }
    // b's session joins on the other shard and resumes after 1. Its announcement and its
    // replay request reach the home one after the other; a new message is sequenced in
    // between, so its live delivery is on its way before the replay is.
    c.next_conn += 1;
    let sb = Sess {
        shard: 1 - home,
        conn: c.next_conn,
        user: b.clone(),
        device: "d".into(),
    };
    c.inbox.insert((sb.shard, sb.conn), VecDeque::new());
    let now = c.now();
    c.cores[sb.shard].session_opened(sb.conn, &b, now);
    let resume = command::resume(
        vec![command::Cursor {
            conv: conv.clone(),
            after: 1,
        }],
        c.cores[0].limits(),
    )
    .unwrap();
    c.cores[sb.shard].on_request(sb.conn, 99, &b, "d", resume, now);
    let entries: Vec<MeshEntry> = c.cores[sb.shard].outgoing(home).drain(..).collect();
    let mut entries = entries.into_iter();
    let directory = entries.next().expect("the announcement");
    assert!(matches!(directory, MeshEntry::Directory { .. }));
    c.cores[home].on_entry(sb.shard, directory, now);
    c.submit(&sa, "send", json!({"conv": conv, "cmid": "4", "body": "x"}));
    // Let the live delivery of 4 reach b's shard before the replay request is served.
    c.settle();
    for entry in entries {
        c.cores[home].on_entry(sb.shard, entry, now);
    }
    c.settle();
    let seqs: Vec<u64> = c
        .events(&sb)
        .iter()
        .filter(|e| e["ev"] == "msg")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    // The replay (2, 3 and 4, all sequenced before it was served), then the live 4 that
    // waited behind it: a message both replayed and live arrives twice (docs/protocol.md
    // 9.11), never ahead of the older replayed ones.
    assert_eq!(seqs, [2, 3, 4, 4]);
}

#[test]
fn hostile_arguments_are_answered_not_panicked_on() {
    let mut c = Cluster::new();
    let (a, b, conv) = pair_homed_apart(1);
    let sa = c.connect(1, &a, "d");
    create_direct(&mut c, &sa, &b);
    c.request(&sa, "send", json!({"conv": conv, "cmid": "1", "body": "x"}));
    let page = c.request(&sa, "history", json!({"conv": conv, "after": u64::MAX}));
    assert_eq!(page["ok"]["msgs"], json!([]));
    let page = c.request(&sa, "history", json!({"conv": conv, "before": 0}));
    assert_eq!(page["ok"]["msgs"], json!([]));
    let r = c.request(&sa, "read", json!({"conv": conv, "seq": u64::MAX}));
    assert_eq!(r["err"]["code"], "bad_request");
    for i in 0..64 {
        let r = c.request(
            &sa,
            "react",
            json!({"conv": conv, "seq": 1, "emoji": format!("e{i}"), "on": true}),
        );
        assert_eq!(r["ok"], json!({}));
    }
    let r = c.request(
        &sa,
        "react",
        json!({"conv": conv, "seq": 1, "emoji": "one-more", "on": true}),
    );
    assert_eq!(r["err"]["code"], "too_large");
}

#[test]
fn a_member_removed_while_typing_stops_typing_for_the_rest() {
    let mut c = Cluster::new();
    let admin = c.connect(0, "admin", "d");
    let typer = c.connect(1, "typer", "d");
    let watcher = c.connect(1, "watcher", "d");
    let g = c.request(
        &admin,
        "conv.create",
        json!({"kind": "group", "members": ["typer", "watcher"]}),
    );
    let group = g["ok"]["conv"].as_str().unwrap().to_string();
    c.submit(&typer, "typing", json!({"conv": group, "on": true}));
    c.settle();
    c.events(&watcher);
    c.request(
        &admin,
        "member.remove",
        json!({"conv": group, "users": ["typer"]}),
    );
    let got = c.events(&watcher);
    assert!(
        got.contains(&json!({"ev": "typing", "conv": group, "user": "typer", "on": false})),
        "{got:?}"
    );
}
