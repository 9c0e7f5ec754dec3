//! parleyd's chat commands and events (PROTOCOL.md sections 3-7) over real WebSockets.
//!
//! Every daemon runs two shards. Direct conversations are between users chosen so that
//! neither user is homed on the shard that homes the conversation; group ids are random,
//! so group tests create groups until both shards home one and check each. Sessions are
//! placed on both shards (`Client::chat_on`), so commands, replies and events cross the
//! mesh in both directions.
//!
//! Nothing here sleeps to synchronise: every wait is for a specific document, bounded by
//! `common::WAIT` (or a stated shorter bound). "Nothing arrives" is checked with a round
//! trip through the conversation's home shard (`Client::assert_no_event`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{token, Client, Daemon, WAIT};
use parley_router::ownership::{conversation_home, user_home};
use parley_router::shard::direct_conv_id;
use serde_json::{json, Value};

const SHARDS: u32 = 2;

// ---------------------------------------------------------------------------------------
// Helpers.

fn conv_home(conv: &str) -> usize {
    conversation_home(conv, SHARDS) as usize
}

fn home_of(user: &str) -> usize {
    user_home(user, SHARDS) as usize
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Users `a` < `b` whose direct conversation is homed on the shard that homes neither of
/// them, and that conversation's id.
fn direct_pair(prefix: &str) -> (String, String, String) {
    for i in 0..64 {
        for j in 0..64 {
            let (a, b) = (format!("{prefix}-a{i}"), format!("{prefix}-b{j}"));
            let conv = direct_conv_id(&a, &b);
            if home_of(&a) != conv_home(&conv) && home_of(&b) != conv_home(&conv) {
                assert!(a < b);
                return (a, b, conv);
            }
        }
    }
    panic!("no pair of {prefix} users homed away from their conversation");
}

/// Conversation ids that exist nowhere, one homed on each shard.
fn missing_convs() -> Vec<String> {
    let mut by_home: [Option<String>; 2] = [None, None];
    for i in 0.. {
        let conv = format!("g-{i:032x}");
        by_home[conv_home(&conv)].get_or_insert(conv);
        if by_home.iter().all(Option::is_some) {
            break;
        }
    }
    by_home.into_iter().flatten().collect()
}

/// Create groups (by `creator`, named `creator_name`, with `members`) until both shards
/// home one, checking each reply. Returns every group created, in order, and the first
/// homed on each shard.
fn groups_on_both_shards(
    creator: &mut Client,
    creator_name: &str,
    members: &[&str],
    title: Option<&str>,
) -> (Vec<String>, [String; 2]) {
    let mut all_members: Vec<&str> = members.iter().copied().chain([creator_name]).collect();
    all_members.sort_unstable();
    let mut created = Vec::new();
    let mut by_home: [Option<String>; 2] = [None, None];
    for _ in 0..64 {
        let mut fields = json!({"kind": "group", "members": members});
        if let Some(title) = title {
            fields["title"] = title.into();
        }
        let reply = creator.ok("conv.create", fields);
        let conv = reply["conv"].as_str().expect("conv id").to_string();
        assert!(
            conv.len() == 34
                && conv.starts_with("g-")
                && conv[2..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "group id {conv:?} is not g- and 32 hex digits"
        );
        assert_eq!(
            reply,
            json!({"conv": conv, "kind": "group", "members": all_members, "created": true})
        );
        by_home[conv_home(&conv)].get_or_insert(conv.clone());
        created.push(conv);
        if by_home.iter().all(Option::is_some) {
            let [first, second] = by_home;
            return (created, [first.unwrap(), second.unwrap()]);
        }
    }
    panic!("64 groups and not both shards home one");
}

/// Matches event `ev` of conversation `conv`.
fn is_ev<'a>(ev: &'a str, conv: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |doc| doc["ev"] == ev && doc["conv"] == conv
}

/// This session's `conv.list` entry for `conv`.
fn list_entry(client: &mut Client, conv: &str) -> Value {
    let list = client.ok("conv.list", json!({}));
    let entries = list["convs"].as_array().expect("convs");
    let mut found = entries.iter().filter(|entry| entry["conv"] == conv);
    let entry = found
        .next()
        .unwrap_or_else(|| panic!("{conv} not in {list}"))
        .clone();
    assert!(found.next().is_none(), "{conv} listed twice: {list}");
    entry
}

/// The seqs of a `msg` list.
fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// conv.create, conv.get, conv.list.

#[test]
fn direct_conversation_create_is_idempotent_and_announced() {
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("dm");
    let mut alice = Client::chat_on(&daemon, &a, None, 0);
    let mut bob = Client::chat_on(&daemon, &b, None, 1);

    let created = alice.ok("conv.create", json!({"kind": "direct", "members": [b]}));
    assert_eq!(
        created,
        json!({"conv": conv, "kind": "direct", "members": [a, b], "created": true})
    );
    let event = bob.expect_event("bob's conv event", is_ev("conv", &conv));
    assert_eq!(
        event,
        json!({"ev": "conv", "conv": conv, "kind": "direct", "members": [a, b]})
    );

    // Again, by either user: the same conversation, not created.
    let again = json!({"conv": conv, "kind": "direct", "members": [a, b], "created": false});
    assert_eq!(
        alice.ok("conv.create", json!({"kind": "direct", "members": [b]})),
        again
    );
    assert_eq!(
        bob.ok("conv.create", json!({"kind": "direct", "members": [a]})),
        again
    );
    bob.assert_no_event(&conv, "a second conv event", is_ev("conv", &conv));
    alice.assert_no_event(&conv, "a conv event to the creator", is_ev("conv", &conv));

    for client in [&mut alice, &mut bob] {
        let entry = list_entry(client, &conv);
        let created_ts = entry["last_ts"].as_u64().expect("last_ts");
        assert_eq!(
            entry,
            json!({"conv": conv, "kind": "direct", "last_seq": 0, "read_seq": 0,
                   "delivered_seq": 0, "unread": 0, "last_ts": created_ts})
        );
        assert_eq!(
            client.ok("conv.get", json!({"conv": conv})),
            json!({"conv": conv, "kind": "direct", "last_seq": 0,
                   "members": [{"user": a, "role": "member"}, {"user": b, "role": "member"}]})
        );
    }

    // Bad shapes.
    let long_id = "x".repeat(65);
    for members in [
        json!([b, "carol"]),
        json!([a]),
        json!([]),
        json!(["not a user!"]),
        json!([long_id]),
    ] {
        assert_eq!(
            alice.err(
                "conv.create",
                json!({"kind": "direct", "members": members.clone()})
            ),
            "bad_request",
            "direct with {members}"
        );
    }
    assert_eq!(
        alice.err("conv.create", json!({"kind": "channel", "members": [b]})),
        "bad_request"
    );
    assert_eq!(
        alice.err("conv.create", json!({"members": [b]})),
        "bad_request"
    );
}

#[test]
fn group_create_get_and_access() {
    let daemon = Daemon::start(&[]);
    let mut gina = Client::chat_on(&daemon, "gina", None, 0);
    let mut hal = Client::chat_on(&daemon, "hal", None, 1);
    let mut ivy = Client::chat(&daemon, "ivy");
    let mut otto = Client::chat(&daemon, "otto");

    let (groups, _) = groups_on_both_shards(&mut gina, "gina", &["hal", "ivy"], Some("Team"));
    for conv in &groups {
        for member in [&mut hal, &mut ivy] {
            let event = member.expect_event("conv event", is_ev("conv", conv));
            assert_eq!(
                event,
                json!({"ev": "conv", "conv": conv, "kind": "group", "title": "Team",
                       "members": ["gina", "hal", "ivy"]})
            );
        }
        gina.assert_no_event(conv, "a conv event to the creator", is_ev("conv", conv));
        let view = json!({"conv": conv, "kind": "group", "title": "Team", "last_seq": 0,
                          "members": [{"user": "gina", "role": "admin"},
                                      {"user": "hal", "role": "member"},
                                      {"user": "ivy", "role": "member"}]});
        assert_eq!(gina.ok("conv.get", json!({"conv": conv})), view);
        assert_eq!(hal.ok("conv.get", json!({"conv": conv})), view);
        assert_eq!(otto.err("conv.get", json!({"conv": conv})), "forbidden");
    }

    let list = hal.ok("conv.list", json!({}));
    let listed: BTreeSet<&str> = list["convs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            assert_eq!(entry["kind"], "group");
            assert_eq!(entry["title"], "Team");
            assert_eq!(entry["last_seq"], 0);
            entry["conv"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        listed,
        groups.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    assert_eq!(otto.ok("conv.list", json!({})), json!({"convs": []}));

    for conv in missing_convs() {
        assert_eq!(otto.err("conv.get", json!({"conv": conv})), "not_found");
    }
    assert_eq!(
        otto.err("conv.get", json!({"conv": "c".repeat(65)})),
        "bad_request"
    );

    // The creator may be listed, and duplicates count once.
    let reply = gina.ok(
        "conv.create",
        json!({"kind": "group", "members": ["ivy", "gina", "ivy"], "title": "dups"}),
    );
    assert_eq!(reply["members"], json!(["gina", "ivy"]));
    assert_eq!(reply["created"], true);

    // Without a title, none is shown.
    let untitled = gina.ok("conv.create", json!({"kind": "group", "members": ["hal"]}));
    let conv = untitled["conv"].as_str().unwrap();
    assert_eq!(
        gina.ok("conv.get", json!({"conv": conv})),
        json!({"conv": conv, "kind": "group", "last_seq": 0,
               "members": [{"user": "gina", "role": "admin"}, {"user": "hal", "role": "member"}]})
    );
    assert_eq!(
        gina.err(
            "conv.create",
            json!({"kind": "group", "members": ["hal"], "title": "t".repeat(257)})
        ),
        "bad_request"
    );
    assert_eq!(
        gina.err(
            "conv.create",
            json!({"kind": "group", "members": ["hal", "bad user"]})
        ),
        "bad_request"
    );
}

// ---------------------------------------------------------------------------------------
// send, dedupe, order.

#[test]
fn send_replies_and_delivers_to_every_live_session() {
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("send");
    let mut phone = Client::chat_on(&daemon, &a, Some("phone"), 0);
    let mut laptop = Client::chat_on(&daemon, &a, Some("laptop"), 1);
    let mut bob = Client::chat(&daemon, &b);
    let mut carol = Client::chat(&daemon, "carol");
    phone.ok("conv.create", json!({"kind": "direct", "members": [b]}));

    let mut expected: Vec<Value> = Vec::new();
    let mut last_ts = 0;
    let mut check = |sent: Value, from: &str, fields: Value| {
        let seq = expected.len() as u64 + 1;
        let ts = sent["ts"].as_u64().expect("ts");
        assert_eq!(
            sent,
            json!({"conv": conv, "seq": seq, "mid": format!("{conv}#{seq}"), "ts": ts, "dup": false})
        );
        assert!(
            ts >= last_ts && ts > 1_700_000_000_000,
            "ts {ts} after {last_ts}"
        );
        last_ts = ts;
        let mut event = json!({"ev": "msg", "conv": conv, "seq": seq, "mid": format!("{conv}#{seq}"),
                               "from": from, "ts": ts, "kind": "text"});
        for (key, value) in fields.as_object().unwrap() {
            if key != "conv" {
                event[key] = value.clone();
            }
        }
        expected.push(event);
    };

    let fields = json!({"conv": conv, "cmid": "c1", "body": "hello"});
    check(phone.ok("send", fields.clone()), &a, fields);
    let fields = json!({"conv": conv, "cmid": "c2", "body": "look", "kind": "image",
                        "media": {"url": "https://example.com/p.png", "w": 640, "h": 480,
                                  "nested": {"list": [1, 2.5, null, "x"]}},
                        "reply_to": 1});
    check(laptop.ok("send", fields.clone()), &a, fields);
    let fields = json!({"conv": conv, "cmid": "c3", "body": "the report", "kind": "file",
                        "media": {"name": "r.pdf", "size": 3}});
    check(bob.ok("send", fields.clone()), &b, fields);
    // Exactly the limit is accepted.
    let fields = json!({"conv": conv, "cmid": "c4", "body": "é".repeat(8 * 1024), "kind": "video"});
    check(bob.ok("send", fields.clone()), &b, fields);

    // Refusals take no seq.
    let body = |body: String| json!({"conv": conv, "cmid": "bad", "body": body});
    assert_eq!(carol.err("send", body("not a member".into())), "forbidden");
    for missing in missing_convs() {
        let fields = json!({"conv": missing, "cmid": "x", "body": "anyone?"});
        assert_eq!(phone.err("send", fields), "not_found");
    }
    assert_eq!(
        phone.err("send", body("x".repeat(16 * 1024 + 1))),
        "too_large"
    );
    for (field, value) in [
        ("reply_to", json!(99)),
        ("reply_to", json!(5)),
        ("reply_to", json!(0)),
        ("kind", json!("gif")),
        ("media", json!("not an object")),
        ("cmid", json!("")),
        ("cmid", json!("c".repeat(65))),
    ] {
        let mut fields = body("b".into());
        fields[field] = value.clone();
        assert_eq!(phone.err("send", fields), "bad_request", "{field}: {value}");
    }
    assert_eq!(
        phone.err("send", json!({"conv": conv, "cmid": "no body"})),
        "bad_request"
    );

    let fields = json!({"conv": conv, "cmid": "c5", "body": "to the last", "reply_to": 4});
    check(phone.ok("send", fields.clone()), &a, fields);

    // Every live session of every member, the sending one and the sender's other device
    // included, gets every message, in order, once.
    for client in [&mut phone, &mut laptop, &mut bob] {
        let got = client.expect_events(expected.len(), "msg events", is_ev("msg", &conv));
        assert_eq!(got, expected);
        client.assert_no_event(&conv, "an extra msg", is_ev("msg", &conv));
    }
    carol.assert_no_event(&conv, "a msg to a non-member", |d| d["ev"] == "msg");
}

#[test]
fn resent_cmid_is_deduplicated_per_sender() {
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("dedupe");
    let mut alice = Client::chat_on(&daemon, &a, None, 0);
    let mut tablet = Client::chat_on(&daemon, &a, Some("tablet"), 1);
    let mut bob = Client::chat(&daemon, &b);
    alice.ok("conv.create", json!({"kind": "direct", "members": [b]}));

    let first = alice.ok(
        "send",
        json!({"conv": conv, "cmid": "same", "body": "once"}),
    );
    assert_eq!(first["seq"], 1);
    assert_eq!(first["dup"], false);
    let dup =
        json!({"conv": conv, "seq": 1, "mid": format!("{conv}#1"), "ts": first["ts"], "dup": true});
    let again = alice.ok(
        "send",
        json!({"conv": conv, "cmid": "same", "body": "retry"}),
    );
    assert_eq!(again, dup);
    // The same user from another device: still the same message.
    let again = tablet.ok(
        "send",
        json!({"conv": conv, "cmid": "same", "body": "tablet"}),
    );
    assert_eq!(again, dup);

    // Another user's cmid is their own.
    let bobs = bob.ok(
        "send",
        json!({"conv": conv, "cmid": "same", "body": "bob's"}),
    );
    assert_eq!(
        bobs,
        json!({"conv": conv, "seq": 2, "mid": format!("{conv}#2"), "ts": bobs["ts"], "dup": false})
    );
    let again = bob.ok(
        "send",
        json!({"conv": conv, "cmid": "same", "body": "bob again"}),
    );
    assert_eq!(
        again,
        json!({"conv": conv, "seq": 2, "mid": format!("{conv}#2"), "ts": bobs["ts"], "dup": true})
    );

    for client in [&mut alice, &mut tablet, &mut bob] {
        let got = client.expect_events(2, "msg events", is_ev("msg", &conv));
        assert_eq!(seqs(&got), [1, 2]);
        assert_eq!(got[0]["body"], "once");
        assert_eq!(got[1]["body"], "bob's");
        client.assert_no_event(&conv, "a msg for a duplicate", is_ev("msg", &conv));
    }
    let next = alice.ok(
        "send",
        json!({"conv": conv, "cmid": "fresh", "body": "three"}),
    );
    assert_eq!(next["seq"], 3);
    assert_eq!(next["dup"], false);
}

#[test]
fn concurrent_senders_get_one_gapless_order() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 200;
    const PER_CONV: usize = SENDERS * PER_SENDER / 2;
    // The rate limit and the outbound queue are not what this test is about.
    let daemon = Daemon::start(&[
        "--rate-limit-per-sec",
        "1000000",
        "--rate-limit-burst",
        "1000",
        "--outbound-queue-len",
        "100000",
        "--outbound-queue-bytes",
        "100000000",
    ]);
    let users: Vec<String> = (0..SENDERS).map(|i| format!("racer{i}")).collect();
    let mut clients: Vec<Client> = users
        .iter()
        .enumerate()
        .map(|(i, user)| Client::chat_on(&daemon, user, None, i % 2))
        .collect();
    let observer = Client::chat_on(&daemon, &users[0], Some("observer"), 1);
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let (_, convs) = groups_on_both_shards(&mut clients[0], &users[0], &others, None);

    type Seen = [Vec<(u64, String, String)>; 2];
    // Read until `replies` are answered and both groups have PER_CONV messages; every msg
    // must be the next seq of its group. Returns (conv, seq, cmid) per reply, and the
    // messages (seq, from, cmid) of each group in arrival order.
    fn receive(
        client: &mut Client,
        convs: &[String; 2],
        mut replies: HashMap<u64, (usize, String)>,
    ) -> (Vec<(usize, u64, String)>, Seen) {
        let mut answered = Vec::new();
        let mut seen: Seen = Default::default();
        let deadline = Instant::now() + WAIT * 2;
        let mut backlog = client.take_inbox(|_| true).into_iter();
        while !replies.is_empty() || seen.iter().any(|msgs| msgs.len() < PER_CONV) {
            let doc = backlog
                .next()
                .or_else(|| client.next_doc_before(deadline))
                .unwrap_or_else(|| {
                    panic!(
                        "timed out: {} replies missing, {}/{} messages",
                        replies.len(),
                        seen[0].len(),
                        seen[1].len()
                    )
                });
            if let Some(re) = doc["re"].as_u64() {
                if let Some((c, cmid)) = replies.remove(&re) {
                    let ok = doc
                        .get("ok")
                        .unwrap_or_else(|| panic!("send failed: {doc}"));
                    assert_eq!(ok["conv"], convs[c].as_str());
                    assert_eq!(ok["dup"], false);
                    answered.push((c, ok["seq"].as_u64().unwrap(), cmid));
                }
            } else if doc["ev"] == "msg" {
                let c = convs
                    .iter()
                    .position(|conv| doc["conv"] == conv.as_str())
                    .unwrap_or_else(|| panic!("msg of another conversation: {doc}"));
                let seq = doc["seq"].as_u64().unwrap();
                let msgs = &mut seen[c];
                assert_eq!(
                    seq,
                    msgs.len() as u64 + 1,
                    "msg out of order in group {c} after {} messages",
                    msgs.len()
                );
                msgs.push((
                    seq,
                    doc["from"].as_str().unwrap().to_string(),
                    doc["cmid"].as_str().unwrap().to_string(),
                ));
            }
        }
        (answered, seen)
    }

    let started = Instant::now();
    let mut threads = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let user = users[i].clone();
        let convs = convs.clone();
        threads.push(std::thread::spawn(move || {
            let mut replies = HashMap::new();
            for k in 0..PER_SENDER {
                let c = k % 2;
                let cmid = format!("{user}-{k}");
                let fields =
                    json!({"conv": convs[c], "cmid": cmid, "body": format!("{k} of {user}")});
                replies.insert(client.command("send", fields), (c, cmid));
            }
            receive(&mut client, &convs, replies)
        }));
    }
    let observed = {
        let convs = convs.clone();
        let mut observer = observer;
        std::thread::spawn(move || receive(&mut observer, &convs, HashMap::new()).1)
    };
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("a sender failed"))
        .collect();
    let observed = observed.join().expect("the observer failed");
    eprintln!(
        "{} messages in {:?}",
        SENDERS * PER_SENDER,
        started.elapsed()
    );

    // Every receiver saw the same order.
    for (_, seen) in &results {
        assert_eq!(seen, &observed);
    }
    // The replies' seqs are unique, make up exactly 1..=N per group, and name the
    // message the receivers saw at that seq.
    let mut seqs_of: [Vec<u64>; 2] = Default::default();
    for (user, (answered, _)) in users.iter().zip(&results) {
        assert_eq!(answered.len(), PER_SENDER);
        for (c, seq, cmid) in answered {
            seqs_of[*c].push(*seq);
            let (at, from, seen_cmid) = &observed[*c][*seq as usize - 1];
            assert_eq!((at, from, seen_cmid), (seq, user, cmid));
        }
    }
    for seqs in &mut seqs_of {
        seqs.sort_unstable();
        assert_eq!(*seqs, (1..=PER_CONV as u64).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------------------
// ack, read, receipts, conv.list cursors.

#[test]
fn acks_and_reads_move_cursors_and_send_receipts() {
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("receipts");
    let mut phone = Client::chat_on(&daemon, &a, Some("phone"), 0);
    let mut laptop = Client::chat_on(&daemon, &a, Some("laptop"), 1);
    let mut bob = Client::chat_on(&daemon, &b, None, 1);
    let mut tab = Client::chat_on(&daemon, &b, Some("tab"), 0);
    let mut carol = Client::chat(&daemon, "carol");
    phone.ok("conv.create", json!({"kind": "direct", "members": [b]}));
    let mut last_ts = 0;
    for i in 1..=3 {
        let sent = phone.ok(
            "send",
            json!({"conv": conv, "cmid": format!("r{i}"), "body": format!("m{i}")}),
        );
        last_ts = sent["ts"].as_u64().unwrap();
    }

    let entry = |last: u64, read: u64, delivered: u64, ts: u64| {
        json!({"conv": conv, "kind": "direct", "last_seq": last, "read_seq": read,
               "delivered_seq": delivered, "unread": last - read, "last_ts": ts})
    };
    // Sending moves no cursor: the sender's device acks and reads like any other.
    assert_eq!(list_entry(&mut phone, &conv), entry(3, 0, 0, last_ts));
    assert_eq!(list_entry(&mut bob, &conv), entry(3, 0, 0, last_ts));

    let receipt = |user: &str, kind: &str, seq: u64| json!({"ev": "receipt", "conv": conv, "user": user, "kind": kind, "seq": seq});
    let is_receipt = is_ev("receipt", &conv);
    macro_rules! everyone {
        () => {
            [&mut phone, &mut laptop, &mut bob, &mut tab]
        };
    }

    assert_eq!(bob.ok("ack", json!({"conv": conv, "seq": 2})), json!({}));
    for client in everyone!() {
        let got = client.expect_event("delivered 2", &is_receipt);
        assert_eq!(got, receipt(&b, "delivered", 2));
    }
    // Bob's other device acks less: its own cursor moves, no receipt.
    assert_eq!(tab.ok("ack", json!({"conv": conv, "seq": 1})), json!({}));
    for client in everyone!() {
        client.assert_no_event(&conv, "a receipt for a lower ack", &is_receipt);
    }
    assert_eq!(list_entry(&mut bob, &conv), entry(3, 0, 2, last_ts));
    assert_eq!(list_entry(&mut tab, &conv), entry(3, 0, 1, last_ts));
    // And then more: a receipt.
    assert_eq!(tab.ok("ack", json!({"conv": conv, "seq": 3})), json!({}));
    for client in everyone!() {
        let got = client.expect_event("delivered 3", &is_receipt);
        assert_eq!(got, receipt(&b, "delivered", 3));
    }
    assert_eq!(list_entry(&mut tab, &conv), entry(3, 0, 3, last_ts));
    assert_eq!(list_entry(&mut bob, &conv), entry(3, 0, 2, last_ts));

    assert_eq!(bob.ok("read", json!({"conv": conv, "seq": 2})), json!({}));
    for client in everyone!() {
        let got = client.expect_event("read 2", &is_receipt);
        assert_eq!(got, receipt(&b, "read", 2));
    }
    assert_eq!(list_entry(&mut bob, &conv), entry(3, 2, 2, last_ts));
    assert_eq!(list_entry(&mut tab, &conv), entry(3, 2, 3, last_ts));
    // Reading less than already read: nothing.
    assert_eq!(tab.ok("read", json!({"conv": conv, "seq": 1})), json!({}));
    for client in everyone!() {
        client.assert_no_event(&conv, "a receipt for a lower read", &is_receipt);
    }
    assert_eq!(list_entry(&mut bob, &conv), entry(3, 2, 2, last_ts));

    // Beyond the last seq, not a member, no such conversation.
    for op in ["ack", "read"] {
        assert_eq!(bob.err(op, json!({"conv": conv, "seq": 4})), "bad_request");
        assert_eq!(carol.err(op, json!({"conv": conv, "seq": 1})), "forbidden");
        for missing in missing_convs() {
            assert_eq!(bob.err(op, json!({"conv": missing, "seq": 1})), "not_found");
        }
    }

    // Bob sends: no cursor moves (his own message counts as unread until he reads it).
    let sent = bob.ok("send", json!({"conv": conv, "cmid": "b1", "body": "reply"}));
    assert_eq!(sent["seq"], 4);
    let ts = sent["ts"].as_u64().unwrap();
    assert_eq!(list_entry(&mut bob, &conv), entry(4, 2, 2, ts));
    assert_eq!(list_entry(&mut phone, &conv), entry(4, 0, 0, ts));
    assert_eq!(
        laptop.ok("read", json!({"conv": conv, "seq": 4})),
        json!({})
    );
    // Reading implies receiving: the laptop's delivered cursor moves too, and that
    // receipt comes first.
    for client in everyone!() {
        let got = client.expect_events(2, "alice's receipts for 4", &is_receipt);
        assert_eq!(got, [receipt(&a, "delivered", 4), receipt(&a, "read", 4)]);
    }
    assert_eq!(list_entry(&mut laptop, &conv), entry(4, 4, 4, ts));
    assert_eq!(list_entry(&mut phone, &conv), entry(4, 4, 0, ts));
}

// ---------------------------------------------------------------------------------------
// member.add, member.remove, conv.leave.

#[test]
fn members_are_added_removed_and_leave() {
    let daemon = Daemon::start(&[]);
    let mut zed = Client::chat_on(&daemon, "zed", None, 0);
    let mut mia = Client::chat_on(&daemon, "mia", None, 1);
    let mut abe = Client::chat(&daemon, "abe");
    let mut kim = Client::chat(&daemon, "kim");

    let (_, groups) = groups_on_both_shards(&mut zed, "zed", &["kim", "mia"], Some("club"));
    for conv in &groups {
        let member_ev = |user: &'static str, change: &'static str| {
            move |d: &Value| {
                d["ev"] == "member"
                    && d["conv"] == conv.as_str()
                    && d["user"] == user
                    && d["change"] == change
            }
        };
        let users = |users: &[&str]| json!({"conv": conv, "users": users});
        for client in [&mut kim, &mut mia] {
            let event = client.expect_event("conv event", is_ev("conv", conv));
            assert_eq!(event["members"], json!(["kim", "mia", "zed"]));
        }

        // Only admins change members.
        assert_eq!(mia.err("member.add", users(&["abe"])), "forbidden");
        assert_eq!(mia.err("member.remove", users(&["kim"])), "forbidden");
        assert_eq!(abe.err("member.add", users(&["abe"])), "forbidden");
        assert_eq!(zed.err("member.add", users(&[])), "bad_request");
        assert_eq!(zed.err("member.add", users(&["bad user"])), "bad_request");

        let added = zed.ok("member.add", users(&["abe"]));
        assert_eq!(
            added,
            json!({"conv": conv, "members": ["abe", "kim", "mia", "zed"]})
        );
        for client in [&mut zed, &mut mia, &mut kim, &mut abe] {
            let event = client.expect_event("abe added", member_ev("abe", "added"));
            assert_eq!(
                event,
                json!({"ev": "member", "conv": conv, "user": "abe", "change": "added", "by": "zed"})
            );
        }
        let event = abe.expect_event("abe's conv event", is_ev("conv", conv));
        assert_eq!(
            event,
            json!({"ev": "conv", "conv": conv, "kind": "group", "title": "club",
                   "members": ["abe", "kim", "mia", "zed"]})
        );
        // Adding a member again changes nothing and tells no one.
        assert_eq!(zed.ok("member.add", users(&["abe"])), added);
        for client in [&mut zed, &mut mia, &mut kim, &mut abe] {
            client.assert_no_event(conv, "events for a no-op add", |d| {
                d["conv"] == conv.as_str() && (d["ev"] == "member" || d["ev"] == "conv")
            });
        }

        let removed = zed.ok("member.remove", users(&["kim"]));
        assert_eq!(
            removed,
            json!({"conv": conv, "members": ["abe", "mia", "zed"]})
        );
        for client in [&mut zed, &mut mia, &mut abe, &mut kim] {
            let event = client.expect_event("kim removed", member_ev("kim", "removed"));
            assert_eq!(
                event,
                json!({"ev": "member", "conv": conv, "user": "kim", "change": "removed", "by": "zed"})
            );
        }
        let send = json!({"conv": conv, "cmid": "k1", "body": "still here?"});
        assert_eq!(kim.err("send", send), "forbidden");
        let sent = zed.ok(
            "send",
            json!({"conv": conv, "cmid": "z1", "body": "kim left"}),
        );
        assert_eq!(sent["seq"], 1);
        for client in [&mut zed, &mut mia, &mut abe] {
            let msg = client.expect_event("msg after the removal", is_ev("msg", conv));
            assert_eq!(msg["body"], "kim left");
        }
        kim.assert_no_event(conv, "a msg after removal", |d| d["ev"] == "msg");
        let listed = kim.ok("conv.list", json!({}));
        assert!(
            listed["convs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|entry| entry["conv"] != conv.as_str()),
            "a removed member still lists {conv}: {listed}"
        );

        // The only admin leaves: the longest-standing member (mia, a member since the
        // creation; abe sorts first but joined later) becomes admin.
        assert_eq!(zed.ok("conv.leave", json!({"conv": conv})), json!({}));
        for client in [&mut zed, &mut mia, &mut abe] {
            let event = client.expect_event("zed left", member_ev("zed", "left"));
            assert_eq!(
                event,
                json!({"ev": "member", "conv": conv, "user": "zed", "change": "left", "by": "zed"})
            );
        }
        assert_eq!(
            abe.ok("conv.get", json!({"conv": conv})),
            json!({"conv": conv, "kind": "group", "title": "club", "last_seq": 1,
                   "members": [{"user": "abe", "role": "member"}, {"user": "mia", "role": "admin"}]})
        );
        assert_eq!(zed.err("conv.get", json!({"conv": conv})), "forbidden");
        assert_eq!(zed.err("conv.leave", json!({"conv": conv})), "forbidden");
        // The new admin manages the members.
        let readded = mia.ok("member.add", users(&["zed"]));
        assert_eq!(
            readded,
            json!({"conv": conv, "members": ["abe", "mia", "zed"]})
        );
        zed.expect_event("zed's conv event", is_ev("conv", conv));
    }

    // A direct conversation's members are fixed.
    let direct = zed.ok("conv.create", json!({"kind": "direct", "members": ["mia"]}));
    let direct = direct["conv"].as_str().unwrap();
    let users = |users: &[&str]| json!({"conv": direct, "users": users});
    assert_eq!(zed.err("member.add", users(&["abe"])), "forbidden");
    assert_eq!(zed.err("member.remove", users(&["mia"])), "forbidden");
    for missing in missing_convs() {
        let fields = json!({"conv": missing, "users": ["abe"]});
        assert_eq!(zed.err("member.add", fields.clone()), "not_found");
        assert_eq!(zed.err("member.remove", fields), "not_found");
        assert_eq!(zed.err("conv.leave", json!({"conv": missing})), "not_found");
    }
}

// ---------------------------------------------------------------------------------------
// typing and presence.

#[test]
fn typing_reaches_the_other_members_and_expires() {
    let daemon = Daemon::start(&[]);
    let (t, u, conv) = direct_pair("typing");
    let mut typer = Client::chat_on(&daemon, &t, Some("phone"), 0);
    let mut typer2 = Client::chat_on(&daemon, &t, Some("laptop"), 1);
    let mut other = Client::chat_on(&daemon, &u, Some("phone"), 0);
    let mut other2 = Client::chat_on(&daemon, &u, Some("laptop"), 1);
    let mut outsider = Client::chat(&daemon, "outsider");
    typer.ok("conv.create", json!({"kind": "direct", "members": [u]}));
    let typing_on = json!({"ev": "typing", "conv": conv, "user": t, "on": true});
    let typing_off = json!({"ev": "typing", "conv": conv, "user": t, "on": false});
    let is_typing = is_ev("typing", &conv);

    let first = typer.command("typing", json!({"conv": conv, "on": true}));
    for client in [&mut other, &mut other2] {
        assert_eq!(client.expect_event("typing on", &is_typing), typing_on);
    }
    // A fresh `on` while on: no new event, and the expiry counts from it.
    let refreshed = Instant::now();
    let second = typer.command("typing", json!({"conv": conv, "on": true}));
    // No reply to the typer, and no typing event to any of the typer's sessions. (The
    // typer's round trip also means the home shard has handled the second `on`.)
    typer.assert_no_event(&conv, "a reply to typing", |d| {
        d["ev"] == "typing" || d["re"] == first || d["re"] == second
    });
    typer2.assert_no_event(&conv, "typing to the typer's device", &is_typing);
    for client in [&mut other, &mut other2] {
        client.assert_no_event(&conv, "a repeated typing on", &is_typing);
    }

    // The server's clock: on:false 5 s after the last on.
    for client in [&mut other, &mut other2] {
        let off = client.expect_event_within(WAIT, "typing expiry", &is_typing);
        assert_eq!(off, typing_off);
    }
    let waited = refreshed.elapsed();
    assert!(
        waited >= Duration::from_millis(4_950),
        "typing expired after {waited:?}, before 5 s"
    );
    typer2.assert_no_event(&conv, "typing to the typer's device", &is_typing);

    // on:false ends it at once.
    typer2.command("typing", json!({"conv": conv, "on": true}));
    for client in [&mut other, &mut other2] {
        assert_eq!(
            client.expect_event("typing on again", &is_typing),
            typing_on
        );
    }
    typer2.command("typing", json!({"conv": conv, "on": false}));
    // Once the typer's round trip through the conversation's home shard is back, the
    // home shard has handled the on:false; sent at once (not by the 5 s expiry), its
    // typing-off then reaches each other member before the reply to that member's own
    // round trip through the home shard.
    typer2.assert_no_event(&conv, "typing to the typer", &is_typing);
    for client in [&mut other, &mut other2] {
        let (_, before) = client.barrier("conv.get", json!({ "conv": conv }));
        let typing: Vec<&Value> = before.iter().filter(|doc| is_typing(doc)).collect();
        assert_eq!(typing, [&typing_off], "on:false was not sent at once");
    }
    // Off while off: nothing.
    typer2.command("typing", json!({"conv": conv, "on": false}));
    typer2.assert_no_event(&conv, "typing to the typer", &is_typing);
    for client in [&mut other, &mut other2] {
        client.assert_no_event(&conv, "typing off while off", &is_typing);
    }

    assert_eq!(
        outsider.err("typing", json!({"conv": conv, "on": true})),
        "forbidden"
    );
    for missing in missing_convs() {
        let fields = json!({"conv": missing, "on": true});
        assert_eq!(outsider.err("typing", fields), "not_found");
    }
}

#[test]
fn presence_follows_the_last_session() {
    let daemon = Daemon::start(&[]);
    let (p, q, conv) = direct_pair("presence");
    // The watched user's sessions come first, on both shards, before any conversation:
    // the connections `chat_on` tries and drops make presence changes nobody hears.
    let pat1 = Client::chat_on(&daemon, &p, Some("one"), 0);
    let pat2 = Client::chat_on(&daemon, &p, Some("two"), 1);
    let mut quin = Client::chat_on(&daemon, &q, Some("one"), 0);
    let mut quin2 = Client::chat_on(&daemon, &q, Some("two"), 1);
    quin.ok("conv.create", json!({"kind": "direct", "members": [p]}));
    assert_ne!(home_of(&p), conv_home(&conv));

    let got = quin.ok("presence.get", json!({"users": [p, q, "nobody"]}));
    assert_eq!(
        got,
        json!({"users": [{"user": p, "status": "online"}, {"user": q, "status": "online"},
                         {"user": "nobody", "status": "offline"}]})
    );
    let got = quin.ok("presence.get", json!({"users": ["nobody", q, p]}));
    assert_eq!(
        got,
        json!({"users": [{"user": "nobody", "status": "offline"}, {"user": q, "status": "online"},
                         {"user": p, "status": "online"}]})
    );
    assert_eq!(
        quin.err("presence.get", json!({"users": ["not a user"]})),
        "bad_request"
    );

    // The last session goes: offline, with when. (A presence change from before this
    // point would carry an older last_seen.)
    let closing = unix_ms();
    drop(pat1);
    drop(pat2);
    let is_offline = |d: &Value| {
        d["ev"] == "presence"
            && d["user"] == p.as_str()
            && d["status"] == "offline"
            && d["last_seen"].as_u64().is_some_and(|t| t >= closing)
    };
    let mut last_seen = None;
    for (shard, client) in [&mut quin, &mut quin2].into_iter().enumerate() {
        let what = format!("offline, at the session on shard {shard}");
        let event = client.expect_event(&what, is_offline);
        let seen = event["last_seen"].as_u64().unwrap();
        assert!(seen <= unix_ms());
        assert_eq!(
            event,
            json!({"ev": "presence", "user": p, "status": "offline", "last_seen": seen})
        );
        assert_eq!(*last_seen.get_or_insert(seen), seen);
    }
    let got = quin.ok("presence.get", json!({"users": [p]}));
    assert_eq!(
        got,
        json!({"users": [{"user": p, "status": "offline", "last_seen": last_seen.unwrap()}]})
    );

    // Back: online (duplicates of the offline event may still come first).
    for client in [&mut quin, &mut quin2] {
        client.take_inbox(|d| d["ev"] == "presence");
    }
    let _pat = Client::chat(&daemon, &p);
    for (shard, client) in [&mut quin, &mut quin2].into_iter().enumerate() {
        let event = client.expect_event(&format!("online, at the session on shard {shard}"), |d| {
            d["ev"] == "presence" && d["user"] == p.as_str() && d["status"] == "online"
        });
        assert_eq!(
            event,
            json!({"ev": "presence", "user": p, "status": "online"})
        );
    }
    let got = quin2.ok("presence.get", json!({"users": [p]}));
    assert_eq!(got, json!({"users": [{"user": p, "status": "online"}]}));
}

/// The one case the other presence test leaves out: the shared conversation is homed on
/// the watched user's own home shard, which then both tells the other shard and delivers
/// the change for its own conversations. The watcher has a session on each shard.
#[test]
fn presence_reaches_watchers_on_both_shards_from_the_users_home() {
    let daemon = Daemon::start(&[]);
    let p = "homebody";
    let home = home_of(p);
    let mut on_home = Client::chat_on(&daemon, "watcher", Some("home"), home);
    let mut elsewhere = Client::chat_on(&daemon, "watcher", Some("away"), 1 - home);
    let conv = (0..64)
        .map(|_| {
            let created = on_home.ok("conv.create", json!({"kind": "group", "members": []}));
            created["conv"].as_str().unwrap().to_string()
        })
        .find(|conv| conv_home(conv) == home)
        .expect("a group homed on the user's home shard");
    on_home.ok("member.add", json!({"conv": conv, "users": [p]}));
    let watchers = [("home", &mut on_home), ("other", &mut elsewhere)];

    let pat = Client::chat(&daemon, p);
    for (shard, client) in watchers {
        let event = client.expect_event(&format!("online, on the {shard} shard"), |d| {
            d["ev"] == "presence" && d["user"] == p && d["status"] == "online"
        });
        assert_eq!(
            event,
            json!({"ev": "presence", "user": p, "status": "online"})
        );
    }
    let closing = unix_ms();
    drop(pat);
    for (shard, client) in [("home", &mut on_home), ("other", &mut elsewhere)] {
        client.expect_event(&format!("offline, on the {shard} shard"), |d| {
            d["ev"] == "presence"
                && d["user"] == p
                && d["status"] == "offline"
                && d["last_seen"].as_u64().is_some_and(|t| t >= closing)
        });
    }
}

// ---------------------------------------------------------------------------------------
// history and react.

#[test]
fn history_pages_by_seq() {
    const N: u64 = 120;
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("history");
    let mut alice = Client::chat_on(&daemon, &a, None, 0);
    let mut bob = Client::chat_on(&daemon, &b, None, 1);
    let mut carol = Client::chat(&daemon, "carol");
    alice.ok("conv.create", json!({"kind": "direct", "members": [b]}));
    // More than the in-memory cache (64): older pages come from the log.
    let ids: Vec<u64> = (1..=N)
        .map(|i| {
            let fields =
                json!({"conv": conv, "cmid": format!("h{i}"), "body": format!("message {i}")});
            alice.command("send", fields)
        })
        .collect();
    let mut ts = vec![0];
    for (i, id) in ids.into_iter().enumerate() {
        let reply = alice.reply_keeping(id);
        assert_eq!(reply["ok"]["seq"], i + 1, "{reply}");
        ts.push(reply["ok"]["ts"].as_u64().unwrap());
    }
    let expected = |seq: u64| {
        json!({"ev": "msg", "conv": conv, "seq": seq, "mid": format!("{conv}#{seq}"), "from": a,
               "ts": ts[seq as usize], "kind": "text", "body": format!("message {seq}"),
               "cmid": format!("h{seq}")})
    };
    let page = |client: &mut Client, fields: Value| -> (Vec<u64>, bool) {
        let mut query = fields.clone();
        query["conv"] = conv.as_str().into();
        let got = client.ok("history", query);
        let msgs = got["msgs"].as_array().expect("msgs").clone();
        for msg in &msgs {
            assert_eq!(*msg, expected(msg["seq"].as_u64().unwrap()), "{fields}");
        }
        (seqs(&msgs), got["more"].as_bool().expect("more"))
    };
    let range = |r: std::ops::RangeInclusive<u64>| r.collect::<Vec<u64>>();

    assert_eq!(page(&mut alice, json!({})), (range(71..=120), true));
    assert_eq!(page(&mut bob, json!({})), (range(71..=120), true));
    assert_eq!(
        page(&mut bob, json!({"limit": 10})),
        (range(111..=120), true)
    );
    assert_eq!(
        page(&mut bob, json!({"before": 11, "limit": 5})),
        (range(6..=10), true)
    );
    assert_eq!(
        page(&mut bob, json!({"before": 3, "limit": 5})),
        (range(1..=2), false)
    );
    assert_eq!(page(&mut bob, json!({"before": 1})), (vec![], false));
    assert_eq!(
        page(&mut bob, json!({"before": 1000, "limit": 3})),
        (range(118..=120), true)
    );
    assert_eq!(
        page(&mut bob, json!({"before": 121, "limit": 200})),
        (range(1..=120), false)
    );
    assert_eq!(
        page(&mut bob, json!({"after": 115})),
        (range(116..=120), false)
    );
    assert_eq!(
        page(&mut bob, json!({"after": 10, "limit": 20})),
        (range(11..=30), true)
    );
    assert_eq!(
        page(&mut bob, json!({"after": 100, "limit": 20})),
        (range(101..=120), false)
    );
    assert_eq!(
        page(&mut bob, json!({"after": 0, "limit": 200})),
        (range(1..=120), false)
    );
    assert_eq!(page(&mut bob, json!({"after": 120})), (vec![], false));

    for bad in [
        json!({"limit": 201}),
        json!({"limit": 0}),
        json!({"before": 10, "after": 2}),
    ] {
        let mut query = bad.clone();
        query["conv"] = conv.as_str().into();
        assert_eq!(bob.err("history", query), "bad_request", "{bad}");
    }
    assert_eq!(carol.err("history", json!({"conv": conv})), "forbidden");
    for missing in missing_convs() {
        assert_eq!(carol.err("history", json!({"conv": missing})), "not_found");
    }

    // An old message (out of the cache) still dedupes, with its original ts.
    let dup = alice.ok("send", json!({"conv": conv, "cmid": "h1", "body": "again"}));
    assert_eq!(
        dup,
        json!({"conv": conv, "seq": 1, "mid": format!("{conv}#1"), "ts": ts[1], "dup": true})
    );

    // Reactions show in history, on old and new messages alike.
    bob.ok(
        "react",
        json!({"conv": conv, "seq": 5, "emoji": "👍", "on": true}),
    );
    alice.ok(
        "react",
        json!({"conv": conv, "seq": 5, "emoji": "👍", "on": true}),
    );
    bob.ok(
        "react",
        json!({"conv": conv, "seq": 120, "emoji": "🎉", "on": true}),
    );
    let got = bob.ok("history", json!({"conv": conv, "after": 4, "limit": 2}));
    let mut with = expected(5);
    with["reactions"] = json!({"👍": [a, b]});
    assert_eq!(got, json!({"msgs": [with, expected(6)], "more": true}));
    let got = bob.ok("history", json!({"conv": conv, "limit": 1}));
    let mut with = expected(120);
    with["reactions"] = json!({"🎉": [b]});
    assert_eq!(got, json!({"msgs": [with], "more": true}));
}

#[test]
fn reactions_are_announced_and_kept() {
    let daemon = Daemon::start(&[]);
    let (a, b, conv) = direct_pair("react");
    let mut alice = Client::chat_on(&daemon, &a, None, 0);
    let mut bob = Client::chat_on(&daemon, &b, None, 1);
    let mut carol = Client::chat(&daemon, "carol");
    alice.ok("conv.create", json!({"kind": "direct", "members": [b]}));
    for i in 1..=2 {
        alice.ok(
            "send",
            json!({"conv": conv, "cmid": format!("m{i}"), "body": format!("m{i}")}),
        );
    }
    let react = |seq: u64, emoji: &str, on: bool| json!({"conv": conv, "seq": seq, "emoji": emoji, "on": on});
    let reaction = |seq: u64, user: &str, emoji: &str, on: bool| json!({"ev": "reaction", "conv": conv, "seq": seq, "user": user, "emoji": emoji, "on": on});
    let is_reaction = is_ev("reaction", &conv);
    let reactions_of = |client: &mut Client| -> Vec<Value> {
        let got = client.ok("history", json!({"conv": conv}));
        got["msgs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.get("reactions").cloned().unwrap_or(Value::Null))
            .collect()
    };

    assert_eq!(bob.ok("react", react(1, "👍", true)), json!({}));
    for client in [&mut alice, &mut bob] {
        let got = client.expect_event("bob 👍", &is_reaction);
        assert_eq!(got, reaction(1, &b, "👍", true));
    }
    assert_eq!(alice.ok("react", react(1, "👍", true)), json!({}));
    assert_eq!(bob.ok("react", react(2, "🎉", true)), json!({}));
    for client in [&mut alice, &mut bob] {
        let got = client.expect_events(2, "reactions", &is_reaction);
        assert_eq!(
            got,
            [reaction(1, &a, "👍", true), reaction(2, &b, "🎉", true)]
        );
    }
    assert_eq!(
        reactions_of(&mut bob),
        [json!({"👍": [a, b]}), json!({"🎉": [b]})]
    );

    assert_eq!(bob.ok("react", react(1, "👍", false)), json!({}));
    for client in [&mut alice, &mut bob] {
        let got = client.expect_event("bob 👍 off", &is_reaction);
        assert_eq!(got, reaction(1, &b, "👍", false));
    }
    assert_eq!(
        reactions_of(&mut alice),
        [json!({"👍": [a]}), json!({"🎉": [b]})]
    );
    assert_eq!(alice.ok("react", react(1, "👍", false)), json!({}));
    alice.expect_event("alice 👍 off", &is_reaction);
    assert_eq!(reactions_of(&mut alice), [Value::Null, json!({"🎉": [b]})]);

    assert_eq!(bob.err("react", react(3, "👍", true)), "not_found");
    assert_eq!(bob.err("react", react(0, "👍", true)), "not_found");
    assert_eq!(bob.err("react", react(1, "", true)), "bad_request");
    assert_eq!(carol.err("react", react(1, "👍", true)), "forbidden");
    for missing in missing_convs() {
        let fields = json!({"conv": missing, "seq": 1, "emoji": "👍", "on": true});
        assert_eq!(bob.err("react", fields), "not_found");
    }
}

// ---------------------------------------------------------------------------------------
// sync and hello resume.

/// Split a replay (documents up to `synced`) into its msg events by conversation (in
/// arrival order), the documents after the `re` reply (if any) and the final `synced`.
/// Asserts that no msg comes after the reply and that nothing but presence is mixed in.
fn split_replay(docs: Vec<Value>, re: Option<u64>) -> (HashMap<String, Vec<Value>>, Value) {
    let mut msgs: HashMap<String, Vec<Value>> = HashMap::new();
    let mut replied = false;
    let mut synced = None;
    for doc in docs {
        if doc["ev"] == "msg" {
            assert!(!replied, "msg after the reply: {doc}");
            let conv = doc["conv"].as_str().unwrap().to_string();
            msgs.entry(conv).or_default().push(doc);
        } else if re.is_some() && doc["re"] == re.unwrap() {
            replied = true;
        } else if doc["ev"] == "synced" {
            assert!(replied || re.is_none(), "synced before the reply");
            synced = Some(doc);
        } else {
            assert_eq!(doc["ev"], "presence", "unexpected in a replay: {doc}");
        }
    }
    (msgs, synced.expect("synced"))
}

#[test]
fn sync_replays_then_lists_the_rest_and_hello_resumes() {
    let daemon = Daemon::start(&[]);
    let (sam, tom, direct) = direct_pair("sync");
    let mut tom_c = Client::chat(&daemon, &tom);
    tom_c.ok("conv.create", json!({"kind": "direct", "members": [sam]}));
    let (mut groups, homed) =
        groups_on_both_shards(&mut tom_c, &tom, &[sam.as_str()], Some("sync"));
    let extra = tom_c.ok(
        "conv.create",
        json!({"kind": "group", "members": [sam], "title": "sync"}),
    );
    groups.push(extra["conv"].as_str().unwrap().to_string());
    let hidden = tom_c.ok(
        "conv.create",
        json!({"kind": "group", "members": ["ursula"]}),
    );
    let hidden = hidden["conv"].as_str().unwrap().to_string();

    let mut sent: HashMap<String, Vec<Value>> = HashMap::new();
    let mut send = |conv: &str, n: usize| {
        for i in 0..n {
            let fields =
                json!({"conv": conv, "cmid": format!("{i}"), "body": format!("{conv} {i}")});
            tom_c.ok("send", fields);
        }
        let page = tom_c.ok("history", json!({"conv": conv}));
        sent.insert(conv.to_string(), page["msgs"].as_array().unwrap().clone());
    };
    send(&direct, 3);
    for group in &groups {
        send(group, 2);
    }
    send(&hidden, 1);

    // A session that starts with sync: nothing was live for it before.
    let mut sam_c = Client::connect(&daemon, Some(&token(&sam, None)));
    let cursors = json!([
        {"conv": direct, "after": 1},
        {"conv": homed[0], "after": 0},
        {"conv": homed[1], "after": 1},
        {"conv": hidden, "after": 0},
        {"conv": missing_convs()[0], "after": 0},
    ]);
    let id = sam_c.command("sync", json!({ "cursors": cursors }));
    let docs = sam_c.docs_until("sync", |d| d["ev"] == "synced");
    let reply = docs
        .iter()
        .find(|d| d["re"] == id)
        .expect("the sync reply")
        .clone();
    let (msgs, synced) = split_replay(docs, Some(id));
    assert_eq!(synced, json!({"ev": "synced"}));
    let mut want: HashMap<String, Vec<Value>> = HashMap::new();
    want.insert(direct.clone(), sent[&direct][1..].to_vec());
    want.insert(homed[0].clone(), sent[&homed[0]].clone());
    want.insert(homed[1].clone(), sent[&homed[1]][1..].to_vec());
    assert_eq!(msgs, want);
    // The reply lists the conversations not named, as conv.list does.
    let listed = reply["ok"]["convs"].as_array().expect("convs").clone();
    let mut unnamed: Vec<&String> = groups.iter().filter(|g| !homed.contains(g)).collect();
    unnamed.sort();
    let mut listed_ids: Vec<&str> = listed.iter().map(|e| e["conv"].as_str().unwrap()).collect();
    listed_ids.sort_unstable();
    assert_eq!(listed_ids, unnamed);
    for entry in &listed {
        let conv = entry["conv"].as_str().unwrap();
        let last_ts = sent[conv][1]["ts"].clone();
        assert_eq!(
            *entry,
            json!({"conv": conv, "kind": "group", "title": "sync", "last_seq": 2, "read_seq": 0,
                   "delivered_seq": 0, "unread": 2, "last_ts": last_ts})
        );
    }
    // conv.list: newest first.
    let list = sam_c.ok("conv.list", json!({}));
    let stamps: Vec<u64> = list["convs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["last_ts"].as_u64().unwrap())
        .collect();
    assert_eq!(stamps.len(), groups.len() + 1);
    assert!(stamps.windows(2).all(|w| w[0] >= w[1]), "{list}");

    // hello with resume after the upgrade authenticated: welcome, missed msgs, synced.
    let mut tablet = Client::connect(&daemon, Some(&token(&sam, Some("tablet"))));
    let resume = json!([{"conv": direct, "after": 0}, {"conv": homed[1], "after": 1}]);
    let id = tablet.command("hello", json!({ "resume": resume }));
    let docs = tablet.docs_until("resume", |d| d["ev"] == "synced");
    assert_eq!(docs[0]["re"], id, "the welcome comes first: {docs:?}");
    assert_eq!(docs[0]["ok"]["user"], sam.as_str());
    assert_eq!(docs[0]["ok"]["device"], "tablet");
    let (msgs, synced) = split_replay(docs[1..].to_vec(), None);
    assert_eq!(synced, json!({"ev": "synced"}));
    let mut want: HashMap<String, Vec<Value>> = HashMap::new();
    want.insert(direct.clone(), sent[&direct].clone());
    want.insert(homed[1].clone(), sent[&homed[1]][1..].to_vec());
    assert_eq!(msgs, want);

    // A resume that cannot be served gets one reply to the hello, bad_request (no
    // welcome), and no synced (docs/protocol.md 9.2, 9.17). The refusal is the session's
    // own, so a ping is a fair barrier: anything else the hello caused comes before it.
    let mut phone = Client::connect(&daemon, Some(&token(&sam, Some("phone"))));
    let id = phone.command("hello", json!({"resume": [{"conv": "", "after": 0}]}));
    let reply = phone.reply_keeping(id);
    assert_eq!(reply["err"]["code"], "bad_request", "{reply}");
    let (_, before) = phone.barrier("ping", json!({}));
    assert!(
        before.iter().all(|d| d["re"] != id && d["ev"] != "synced"),
        "a second reply or a synced after a refused resume: {before:?}"
    );
    // Nothing changed: the session, authenticated at the upgrade, may say hello again.
    let again = phone.ok("hello", json!({}));
    assert_eq!(again["user"], sam.as_str());

    // Both sessions are live now.
    let sent = tom_c.ok(
        "send",
        json!({"conv": direct, "cmid": "live", "body": "live"}),
    );
    for client in [&mut sam_c, &mut tablet] {
        let msg = client.expect_event("live msg", is_ev("msg", &direct));
        assert_eq!(msg["seq"], sent["seq"]);
    }
}

#[test]
fn replay_is_capped_by_sync_max_messages() {
    let daemon = Daemon::start(&["--sync-max-messages", "5"]);
    let (sam, tom, direct) = direct_pair("cap");
    let mut tom_c = Client::chat(&daemon, &tom);
    tom_c.ok("conv.create", json!({"kind": "direct", "members": [sam]}));
    let group = tom_c.ok("conv.create", json!({"kind": "group", "members": [sam]}));
    let group = group["conv"].as_str().unwrap().to_string();
    for i in 1..=12 {
        tom_c.ok(
            "send",
            json!({"conv": direct, "cmid": format!("d{i}"), "body": "d"}),
        );
    }
    for i in 1..=3 {
        tom_c.ok(
            "send",
            json!({"conv": group, "cmid": format!("g{i}"), "body": "g"}),
        );
    }

    let mut sam_c = Client::connect(&daemon, Some(&token(&sam, None)));
    let mut sync = |cursors: Value| {
        let id = sam_c.command("sync", json!({ "cursors": cursors }));
        let docs = sam_c.docs_until("sync", |d| d["ev"] == "synced");
        let (msgs, synced) = split_replay(docs, Some(id));
        let seqs_of = |conv: &str| msgs.get(conv).map(|m| seqs(m)).unwrap_or_default();
        (seqs_of(&direct), seqs_of(&group), synced)
    };
    // One replay's budget is shared by the conversations it names (docs/protocol.md
    // 9.17): two named, two messages each.
    let (d, g, synced) = sync(json!([{"conv": direct, "after": 0}, {"conv": group, "after": 0}]));
    assert_eq!((d, g), (vec![1, 2], vec![1, 2]));
    assert!(direct < group);
    assert_eq!(
        synced,
        json!({"ev": "synced", "more": [{"conv": direct, "after": 2}, {"conv": group, "after": 2}]})
    );
    // Named alone, a conversation gets the whole budget.
    let (d, _, synced) = sync(json!([{"conv": direct, "after": 2}]));
    assert_eq!(d, [3, 4, 5, 6, 7]);
    assert_eq!(
        synced,
        json!({"ev": "synced", "more": [{"conv": direct, "after": 7}]})
    );
    let (d, _, synced) = sync(json!([{"conv": direct, "after": 7}]));
    assert_eq!(d, [8, 9, 10, 11, 12]);
    assert_eq!(synced, json!({"ev": "synced"}));
    let (_, g, synced) = sync(json!([{"conv": group, "after": 2}]));
    assert_eq!(g, [3]);
    assert_eq!(synced, json!({"ev": "synced"}));

    let mut tablet = Client::connect(&daemon, Some(&token(&sam, Some("tablet"))));
    let id = tablet.command("hello", json!({"resume": [{"conv": direct, "after": 2}]}));
    let docs = tablet.docs_until("resume", |d| d["ev"] == "synced");
    assert_eq!(docs[0]["re"], id);
    let (msgs, synced) = split_replay(docs[1..].to_vec(), None);
    assert_eq!(seqs(&msgs[&direct]), [3, 4, 5, 6, 7]);
    assert_eq!(
        synced,
        json!({"ev": "synced", "more": [{"conv": direct, "after": 7}]})
    );
}

// ---------------------------------------------------------------------------------------
// Restart.

#[test]
fn state_survives_a_graceful_restart() {
    let daemon = Daemon::start(&[]);
    let (a, b, direct) = direct_pair("restart");
    let mut ann = Client::chat_on(&daemon, &a, None, 0);
    let mut ben = Client::chat_on(&daemon, &b, None, 1);
    let mut cal = Client::chat(&daemon, "cal");
    ann.ok("conv.create", json!({"kind": "direct", "members": [b]}));
    let (_, groups) = groups_on_both_shards(&mut ann, &a, &[b.as_str()], Some("kept"));
    for (g, conv) in groups.iter().enumerate() {
        ann.ok("member.add", json!({"conv": conv, "users": ["cal"]}));
        // Past the in-memory cache of 64.
        let ids: Vec<u64> = (0..70)
            .map(|i| {
                let fields =
                    json!({"conv": conv, "cmid": format!("k{g}-{i}"), "body": format!("{g}/{i}")});
                ann.command("send", fields)
            })
            .collect();
        for id in ids {
            assert!(ann.reply_keeping(id)["ok"].is_object());
        }
        ben.ok(
            "react",
            json!({"conv": conv, "seq": 3, "emoji": "❤️", "on": true}),
        );
        ann.ok(
            "react",
            json!({"conv": conv, "seq": 3, "emoji": "❤️", "on": true}),
        );
        cal.ok(
            "react",
            json!({"conv": conv, "seq": 70, "emoji": "👀", "on": true}),
        );
        ben.ok("read", json!({"conv": conv, "seq": 40}));
        ben.ok("ack", json!({"conv": conv, "seq": 50}));
    }
    // In one group the admin leaves: ben (a member since the creation) takes over.
    ann.ok("conv.leave", json!({"conv": groups[1]}));
    let dup_ben = ben.ok(
        "send",
        json!({"conv": direct, "cmid": "ben-1", "body": "hi ann"}),
    );
    ann.ok(
        "send",
        json!({"conv": direct, "cmid": "ann-1", "body": "hi ben"}),
    );
    ann.ok("read", json!({"conv": direct, "seq": 2}));
    // Last seen: dee comes and goes; ann, who shares a conversation, hears when.
    let dee = (0..)
        .map(|i| format!("restart-d{i}"))
        .find(|dee| home_of(dee) != conv_home(&direct_conv_id(&a, dee)))
        .unwrap();
    ann.ok("conv.create", json!({"kind": "direct", "members": [dee]}));
    let closing = unix_ms();
    drop(Client::chat(&daemon, &dee));
    let offline = ann.expect_event("dee offline", |d| {
        d["ev"] == "presence"
            && d["user"] == dee.as_str()
            && d["status"] == "offline"
            && d["last_seen"].as_u64().is_some_and(|t| t >= closing)
    });
    let dee_seen =
        json!({"users": [{"user": dee, "status": "offline", "last_seen": offline["last_seen"]}]});
    assert_eq!(ann.ok("presence.get", json!({"users": [dee]})), dee_seen);

    // What the clients see of the state: each user's conv.list, and each conversation's
    // conv.get and whole history (as ben, a member of all).
    fn snapshot(clients: [&mut Client; 3], convs: &[&String]) -> Vec<Value> {
        let [ann, ben, cal] = clients;
        let mut state = Vec::new();
        for client in [&mut *ann, &mut *ben, &mut *cal] {
            state.push(client.ok("conv.list", json!({})));
        }
        for conv in convs {
            state.push(ben.ok("conv.get", json!({"conv": conv})));
            state.push(ben.ok("history", json!({"conv": conv, "after": 0, "limit": 200})));
        }
        state
    }
    let convs = [&groups[0], &groups[1], &direct];
    let before = snapshot([&mut ann, &mut ben, &mut cal], &convs);
    let history = &before[4];
    assert_eq!(history["msgs"].as_array().unwrap().len(), 70);
    assert_eq!(history["msgs"][2]["reactions"], json!({"❤️": [a, b]}));
    assert_eq!(
        before[5]["members"],
        json!([{"user": "cal", "role": "member"}, {"user": b, "role": "admin"}])
    );
    drop((ann, ben, cal));

    let daemon = Daemon::start_in(daemon.stop(), &[]);
    let mut ann = Client::chat(&daemon, &a);
    let mut ben = Client::chat(&daemon, &b);
    let mut cal = Client::chat(&daemon, "cal");
    let after = snapshot([&mut ann, &mut ben, &mut cal], &convs);
    for (before, after) in before.iter().zip(&after) {
        assert_eq!(before, after);
    }

    assert_eq!(ann.ok("presence.get", json!({"users": [dee]})), dee_seen);

    // Old cmids still dedupe, with their original seq and ts.
    let first = &before[4]["msgs"][0];
    let dup = ann.ok(
        "send",
        json!({"conv": groups[0], "cmid": "k0-0", "body": "again"}),
    );
    assert_eq!(
        dup,
        json!({"conv": groups[0], "seq": 1, "mid": first["mid"], "ts": first["ts"], "dup": true})
    );
    let dup = ben.ok(
        "send",
        json!({"conv": direct, "cmid": "ben-1", "body": "again"}),
    );
    assert_eq!(dup["dup"], true);
    assert_eq!(dup["seq"], dup_ben["seq"]);
    assert_eq!(dup["ts"], dup_ben["ts"]);
    // And the sequence goes on.
    let next = ann.ok(
        "send",
        json!({"conv": groups[0], "cmid": "new", "body": "new"}),
    );
    assert_eq!(next["seq"], 71);
    assert_eq!(next["dup"], false);
}
