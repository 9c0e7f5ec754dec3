//! Beyond messages: reactions, cursors, members and last seen under kill -9.
//!
//! The shape of the send bursts, with every other kind of change: clients pipeline sends,
//! reactions set and cleared, acks and reads, member additions, removals and leaves, and
//! sessions that open and close (last seen), across both shards; parleyd is killed after
//! so many acknowledgements, restarted on its data dir, and what it then serves is checked
//! against a model built only from what it acknowledged. An operation left unanswered may
//! or may not have happened: the model allows both, and nothing else.
//!
//! What the model may assume (docs/protocol.md): a session's commands for one
//! conversation are applied and logged in the order it sent them (9.4), and nothing is
//! answered before the log holds it durably (7.1, 9.19), so what survives of one session's
//! operations on one conversation is a prefix of them that holds every answered one.

use super::*;

/// Operations each client keeps unanswered at once.
const OPS_IN_FLIGHT: usize = 32;
/// A leaver keeps fewer: its leaves are few, and should last until the kill.
const LEAVER_IN_FLIGHT: usize = 8;
/// A client's operations per round at most: the kill comes long before (by ack count).
const MAX_OPS_PER_CLIENT: usize = 20_000;
/// Messages each conversation gets before the first round (reactions and cursors need them).
const PREFILL: u64 = 24;
/// Groups per shard whose members change under load.
const MEMBER_GROUPS: usize = 6;
/// Per shard: users an admin adds and removes, and users who leave.
const POOL: usize = 4;
const LEAVERS: usize = 2;
/// Per shard: users whose sessions open and close (last seen).
const CHURNERS: usize = 2;
/// A leaver's operations from one leave to the next (`conv.list`s pace them).
const LEAVE_EVERY: usize = 12;
/// The emoji a device reacts with, each suffixed with the device: every reaction key
/// (message, emoji, user) is set by one session only, so its order is known.
const EMOJI: [&str; 3] = ["👍", "❤️", "🎉"];
/// The kind of a churner's acknowledgement: a last seen `presence.get` showed.
const LAST_SEEN: &str = "last seen";
/// Acknowledgements of these kinds each round has before its kill, whatever the count of
/// all: churners and leavers are slower than the chat clients.
const AT_LEAST: [(&str, usize); 2] = [(LAST_SEEN, 8), ("conv.leave", 4)];
/// A chat client gets every member's receipts, reactions and messages besides its own
/// answers; on this shared 2-core machine a client thread may fall behind for a while.
/// Closing it (4009) is not what these tests are about: the queue is made roomy.
const CHANGE_FLAGS: &[&str] = &[
    "--outbound-queue-len",
    "65536",
    "--outbound-queue-bytes",
    "67108864",
];

/// One operation of a mixed burst.
#[derive(Debug, Clone)]
enum Op {
    Send(Outgoing),
    React {
        conv: String,
        seq: u64,
        emoji: String,
        on: bool,
    },
    Ack {
        conv: String,
        seq: u64,
    },
    Read {
        conv: String,
        seq: u64,
    },
    Add {
        conv: String,
        user: String,
    },
    Remove {
        conv: String,
        user: String,
    },
    Leave {
        conv: String,
    },
    /// A `conv.list` that paces a leaver; it changes nothing and is not counted.
    Filler,
}

impl Op {
    fn doc(&self, id: u64) -> Value {
        match self {
            Op::Send(out) => {
                json!({"id": id, "op": "send", "conv": out.conv, "cmid": out.cmid, "body": out.body})
            }
            Op::React {
                conv,
                seq,
                emoji,
                on,
            } => {
                json!({"id": id, "op": "react", "conv": conv, "seq": seq, "emoji": emoji, "on": on})
            }
            Op::Ack { conv, seq } => json!({"id": id, "op": "ack", "conv": conv, "seq": seq}),
            Op::Read { conv, seq } => json!({"id": id, "op": "read", "conv": conv, "seq": seq}),
            Op::Add { conv, user } => {
                json!({"id": id, "op": "member.add", "conv": conv, "users": [user]})
            }
            Op::Remove { conv, user } => {
                json!({"id": id, "op": "member.remove", "conv": conv, "users": [user]})
            }
            Op::Leave { conv } => json!({"id": id, "op": "conv.leave", "conv": conv}),
            Op::Filler => json!({"id": id, "op": "conv.list"}),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Send(_) => "send",
            Op::React { .. } => "react",
            Op::Ack { .. } => "ack",
            Op::Read { .. } => "read",
            Op::Add { .. } => "member.add",
            Op::Remove { .. } => "member.remove",
            Op::Leave { .. } => "conv.leave",
            Op::Filler => "conv.list",
        }
    }

    /// The `ok` of a reply to this operation, or what is wrong with the reply.
    fn check(&self, reply: &Value) -> Result<Value, String> {
        let ok = &reply["ok"];
        let fine = match self {
            Op::Send(out) => ok["dup"] == false && ok["conv"] == out.conv.as_str(),
            Op::Add { conv, .. } | Op::Remove { conv, .. } => {
                ok["conv"] == conv.as_str() && ok["members"].is_array()
            }
            Op::Filler => ok["convs"].is_array(),
            Op::React { .. } | Op::Ack { .. } | Op::Read { .. } | Op::Leave { .. } => {
                *ok == json!({})
            }
        };
        if fine {
            Ok(ok.clone())
        } else {
            Err(format!("{self:?} got {reply}"))
        }
    }
}

/// What a client does next. `acked` hears every `ok`.
trait Plan: Send {
    fn next(&mut self) -> Option<Op>;
    fn acked(&mut self, _op: &Op, _ok: &Value) {}
}

/// Where a chat client's operations stand in one conversation.
struct ChatConv {
    id: String,
    /// The highest seq known to exist (acked sends, and what the history held).
    known_last: u64,
    /// Reactions go to messages 1..=span (known to exist when the round starts).
    span: u64,
    ack_next: u64,
    read_next: u64,
    reacts: u64,
}

/// A chat client: round-robin over its conversations, a cycle of sends, acks (one of them
/// at or below the cursor, which changes nothing), reads and reactions set and cleared.
struct ChatPlan {
    user: String,
    device: String,
    round: usize,
    convs: Vec<ChatConv>,
    /// Acks and reads, or (a client that stops moving its cursors for a round) more sends.
    cursors: bool,
    step: usize,
}

impl Plan for ChatPlan {
    fn next(&mut self) -> Option<Op> {
        if self.step >= MAX_OPS_PER_CLIENT {
            return None;
        }
        let step = self.step;
        self.step += 1;
        let n = self.convs.len();
        let (round, user, device) = (self.round, &self.user, &self.device);
        let conv = &mut self.convs[step % n];
        let id = conv.id.clone();
        let kind = match (step / n) % 8 {
            1 | 3 | 5 | 7 if !self.cursors => 0,
            kind => kind,
        };
        Some(match kind {
            0 | 4 => {
                let cmid = format!("c{round}-{user}-{device}-{step}");
                let body = format!("{cmid} über {}", "y".repeat(step * 13 % 300));
                Op::Send(Outgoing {
                    conv: id,
                    cmid,
                    body,
                    user: user.clone(),
                })
            }
            1 => {
                let seq = conv.ack_next.min(conv.known_last);
                conv.ack_next = seq + 1;
                Op::Ack { conv: id, seq }
            }
            5 => Op::Ack {
                conv: id,
                seq: (conv.ack_next / 2).max(1),
            },
            3 | 7 => {
                let seq = conv.read_next.min(conv.known_last);
                conv.read_next = seq + 1;
                Op::Read { conv: id, seq }
            }
            _ => {
                let j = conv.reacts;
                conv.reacts += 1;
                let pair = j / 2;
                let seq = 1 + (pair * 7 + round as u64 * 3) % conv.span;
                let emoji = format!("{}{device}", EMOJI[pair as usize % EMOJI.len()]);
                // Each pair of operations sets a reaction, then clears it (even pairs) or
                // sets it again (odd pairs: an operation that changes nothing).
                let on = j.is_multiple_of(2) || !pair.is_multiple_of(2);
                Op::React {
                    conv: id,
                    seq,
                    emoji,
                    on,
                }
            }
        })
    }

    fn acked(&mut self, op: &Op, ok: &Value) {
        if let (Op::Send(out), Some(seq)) = (op, ok["seq"].as_u64()) {
            if let Some(conv) = self.convs.iter_mut().find(|c| c.id == out.conv) {
                conv.known_last = conv.known_last.max(seq);
            }
        }
    }
}

/// A group admin: adds each pool user to each group and removes them again, round-robin.
struct AdminPlan {
    groups: Vec<String>,
    pool: Vec<String>,
    /// group -> the pool users in it once everything sent so far is applied.
    members: BTreeMap<String, BTreeSet<String>>,
    step: usize,
}

impl Plan for AdminPlan {
    fn next(&mut self) -> Option<Op> {
        if self.step >= MAX_OPS_PER_CLIENT {
            return None;
        }
        let step = self.step;
        self.step += 1;
        let conv = self.groups[step % self.groups.len()].clone();
        let user = self.pool[(step / self.groups.len()) % self.pool.len()].clone();
        let members = self.members.entry(conv.clone()).or_default();
        Some(if members.remove(&user) {
            Op::Remove { conv, user }
        } else {
            members.insert(user.clone());
            Op::Add { conv, user }
        })
    }
}

/// A user who leaves their groups one by one, with `conv.list`s between the leaves.
struct LeaverPlan {
    groups: Vec<String>,
    step: usize,
}

impl Plan for LeaverPlan {
    fn next(&mut self) -> Option<Op> {
        if self.groups.is_empty() {
            return None;
        }
        self.step += 1;
        Some(if self.step.is_multiple_of(LEAVE_EVERY) {
            Op::Leave {
                conv: self.groups.remove(0),
            }
        } else {
            Op::Filler
        })
    }
}

struct WorkReport {
    user: String,
    device: String,
    /// Every operation sent, in order, with its `ok` if one came.
    ops: Vec<(Op, Option<Value>)>,
    problems: Vec<String>,
}

/// One client of a mixed burst: pipeline the plan's operations (up to `depth` unanswered)
/// until the connection dies, reporting each counted `ok` on `acks`.
fn work(
    mut client: Client,
    user: String,
    device: String,
    mut plan: Box<dyn Plan>,
    depth: usize,
    acks: mpsc::Sender<&'static str>,
) -> WorkReport {
    let who = format!("{user}/{device}");
    let mut ops: Vec<(Op, Option<Value>)> = Vec::new();
    let mut problems = Vec::new();
    // id -> index in `ops`.
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut next_id = FIRST_BURST_ID;
    'session: loop {
        while in_flight.len() < depth {
            let Some(op) = plan.next() else {
                break;
            };
            let id = next_id;
            next_id += 1;
            let doc = op.doc(id);
            // Unanswered from the moment it may have left.
            in_flight.insert(id, ops.len());
            ops.push((op, None));
            if client.ws.send(Message::text(doc.to_string())).is_err() {
                break 'session;
            }
        }
        let text = match client.ws.read() {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                problems.push(format!("{who}: closed by the server: {frame:?}"));
                break;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if in_flight.is_empty() {
                    // The plan is done; the kill ends the wait.
                    continue;
                }
                problems.push(format!(
                    "{who}: no reply within {WAIT:?} with {} operations unanswered",
                    in_flight.len()
                ));
                break;
            }
            // The daemon died under us: what was acknowledged is in `ops`.
            Err(_) => break,
        };
        for line in text.split('\n') {
            let doc: Value = match serde_json::from_str(line) {
                Ok(doc) => doc,
                Err(error) => {
                    problems.push(format!("{who}: bad JSON {line:?}: {error}"));
                    continue;
                }
            };
            let Some(index) = doc["re"].as_u64().and_then(|id| in_flight.remove(&id)) else {
                continue;
            };
            let (op, reply) = &mut ops[index];
            match op.check(&doc) {
                Ok(ok) => {
                    plan.acked(op, &ok);
                    if !matches!(op, Op::Filler) {
                        let _ = acks.send(op.kind());
                    }
                    *reply = Some(ok);
                }
                Err(what) => problems.push(format!("{who}: {what}")),
            }
        }
    }
    WorkReport {
        user,
        device,
        ops,
        problems,
    }
}

/// What a command on a bare socket came to.
enum Answer {
    Reply(Value),
    /// The connection is gone (the daemon was killed).
    Gone,
    /// No reply within WAIT.
    Silent,
}

/// Send `{"id": id, ...fields}` on the socket and read up to its reply, without the
/// panics of `Client`'s helpers (the daemon may be killed at any moment).
fn try_call(client: &mut Client, id: u64, mut fields: Value) -> Answer {
    fields["id"] = id.into();
    if client.ws.send(Message::text(fields.to_string())).is_err() {
        return Answer::Gone;
    }
    loop {
        let text = match client.ws.read() {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) => return Answer::Gone,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Answer::Silent
            }
            Err(_) => return Answer::Gone,
        };
        for line in text.split('\n') {
            if let Ok(doc) = serde_json::from_str::<Value>(line) {
                if doc["re"] == id {
                    return Answer::Reply(doc);
                }
            }
        }
    }
}

/// A churn step: a session of the user closed, or `presence.get` showed a last seen (its
/// reply leaves once the log holds that last seen durably: docs/protocol.md 9.19).
#[derive(Debug)]
enum Churn {
    Closed,
    Shown(u64),
}

struct ChurnReport {
    user: String,
    events: Vec<Churn>,
    problems: Vec<String>,
}

/// Open a session of `user` (on whichever shard the kernel picks), let it join (its
/// `conv.list`), close it, and ask `watcher`'s `presence.get` until the user is offline:
/// its `last_seen` is what the server showed. Again and again, until the daemon dies.
fn churn(
    ws: SocketAddr,
    user: String,
    mut watcher: Client,
    acks: mpsc::Sender<&'static str>,
) -> ChurnReport {
    let mut report = ChurnReport {
        user: user.clone(),
        events: Vec::new(),
        problems: Vec::new(),
    };
    let token = common::token(&user, Some("churn"));
    let mut next_id = FIRST_BURST_ID;
    'churn: for _ in 0..MAX_OPS_PER_CLIENT {
        let Some(mut session) = Client::try_connect_to(ws, &token) else {
            break;
        };
        next_id += 1;
        match try_call(&mut session, next_id, json!({"op": "conv.list"})) {
            Answer::Reply(doc) if doc["ok"].is_object() => {}
            Answer::Reply(doc) => {
                report.problems.push(format!("{user}: conv.list got {doc}"));
                break;
            }
            Answer::Gone => break,
            Answer::Silent => {
                report
                    .problems
                    .push(format!("{user}: conv.list unanswered"));
                break;
            }
        }
        // The session has joined (its first chat command): its end makes the user offline.
        report.events.push(Churn::Closed);
        drop(session);
        let deadline = Instant::now() + WAIT;
        loop {
            next_id += 1;
            let ask = json!({"op": "presence.get", "users": [&user]});
            let doc = match try_call(&mut watcher, next_id, ask) {
                Answer::Reply(doc) => doc,
                Answer::Gone => break 'churn,
                Answer::Silent => {
                    report
                        .problems
                        .push(format!("{user}: presence.get unanswered"));
                    break 'churn;
                }
            };
            let entry = &doc["ok"]["users"][0];
            if entry["user"] != user.as_str() {
                report
                    .problems
                    .push(format!("{user}: presence.get got {doc}"));
                break 'churn;
            }
            if entry["status"] == "offline" {
                let Some(ts) = entry["last_seen"].as_u64() else {
                    report
                        .problems
                        .push(format!("{user}: offline without last_seen: {doc}"));
                    break 'churn;
                };
                report.events.push(Churn::Shown(ts));
                let _ = acks.send(LAST_SEEN);
                break;
            }
            if Instant::now() > deadline {
                report.problems.push(format!(
                    "{user}: still {entry} {WAIT:?} after its session closed"
                ));
                break 'churn;
            }
        }
    }
    report
}

// What the test knows of these changes.

/// A yes/no state set by one session's operations, in order: a reaction on or off, a
/// user in a group or not. `now` is what the server last showed (after a restart).
#[derive(Debug, Clone, Default)]
struct Flag {
    now: bool,
    /// (value set, answered), in the order sent.
    ops: Vec<(bool, bool)>,
}

impl Flag {
    /// The values the log may hold: after any prefix of the operations that holds every
    /// answered one.
    fn allowed(&self) -> BTreeSet<bool> {
        match self.ops.iter().rposition(|(_, answered)| *answered) {
            Some(last) => self.ops[last..].iter().map(|(value, _)| *value).collect(),
            None => std::iter::once(self.now)
                .chain(self.ops.iter().map(|(value, _)| *value))
                .collect(),
        }
    }

    /// The value after the answered operations only.
    fn answered(&self) -> bool {
        self.ops
            .iter()
            .rev()
            .find(|(_, answered)| *answered)
            .map_or(self.now, |(value, _)| *value)
    }

    fn settle(&mut self, value: bool) {
        self.now = value;
        self.ops.clear();
    }
}

/// A cursor: coalesced and monotonic (docs/protocol.md 9.14), so after a restart it is
/// exactly the highest answered `ack`/`read` (or what was shown before), or one of the
/// unanswered ones above that, and nothing else.
#[derive(Debug, Clone, Default)]
struct CursorModel {
    floor: u64,
    unanswered: BTreeSet<u64>,
}

impl CursorModel {
    fn moved(&mut self, seq: u64, answered: bool) {
        if answered {
            self.floor = self.floor.max(seq);
        } else {
            self.unanswered.insert(seq);
        }
    }

    fn allows(&self, value: u64) -> bool {
        value == self.floor || (value > self.floor && self.unanswered.contains(&value))
    }

    fn settle(&mut self, value: u64) {
        self.floor = value;
        self.unanswered.clear();
    }
}

/// The pool users of one group: changed by its admin's one session, so what the log
/// holds is the state after a prefix of the admin's operations on it.
#[derive(Debug, Clone, Default)]
struct PoolModel {
    now: BTreeSet<String>,
    /// (user, added, answered), in the order sent.
    ops: Vec<(String, bool, bool)>,
}

impl PoolModel {
    fn allowed(&self) -> Vec<BTreeSet<String>> {
        let first = self.ops.iter().rposition(|op| op.2).map_or(0, |i| i + 1);
        let mut state = self.now.clone();
        let mut allowed = Vec::new();
        for k in 0..=self.ops.len() {
            if k >= first {
                allowed.push(state.clone());
            }
            if let Some((user, added, _)) = self.ops.get(k) {
                if *added {
                    state.insert(user.clone());
                } else {
                    state.remove(user);
                }
            }
        }
        allowed
    }
}

/// A churner's last seen: the last one `presence.get` showed, and whether a session closed
/// since (its last seen may then be newer, up to the kill).
#[derive(Debug, Clone, Default)]
struct SeenModel {
    shown: Option<u64>,
    closed_since: bool,
}

#[derive(Default)]
struct Changes {
    /// (conv, seq, emoji, user) -> on or off.
    reactions: BTreeMap<(String, u64, String, String), Flag>,
    /// (conv, user, device) -> that device's delivered cursor.
    delivered: BTreeMap<(String, String, String), CursorModel>,
    /// (conv, user) -> the user's read cursor.
    read: BTreeMap<(String, String), CursorModel>,
    /// group -> its pool users.
    pools: BTreeMap<String, PoolModel>,
    /// (group, leaver) -> a member or not.
    leavers: BTreeMap<(String, String), Flag>,
    /// churner -> last seen.
    seen: BTreeMap<String, SeenModel>,
    /// Every user an admin adds and removes.
    pool_users: BTreeSet<String>,
    /// Operations unanswered at the kill, by kind.
    unanswered: BTreeMap<&'static str, usize>,
    /// Operations answered, by kind.
    answered: BTreeMap<&'static str, usize>,
}

impl Changes {
    /// Learn a client's operations; its sends go to `sends` (for the message model).
    /// Returns what is wrong with its answers.
    fn absorb(&mut self, report: WorkReport, sends: &mut BurstReport) -> Vec<String> {
        let WorkReport {
            user,
            device,
            ops,
            mut problems,
        } = report;
        for (op, ok) in ops {
            let answered = ok.is_some();
            if matches!(op, Op::Filler) {
                continue;
            }
            *if answered {
                self.answered.entry(op.kind()).or_default()
            } else {
                self.unanswered.entry(op.kind()).or_default()
            } += 1;
            match op {
                Op::Send(out) => match ok {
                    Some(ok) => sends.acked.push((out, ok)),
                    None => sends.unacked.push(out),
                },
                Op::React {
                    conv,
                    seq,
                    emoji,
                    on,
                } => self
                    .reactions
                    .entry((conv, seq, emoji, user.clone()))
                    .or_default()
                    .ops
                    .push((on, answered)),
                Op::Ack { conv, seq } => self
                    .delivered
                    .entry((conv, user.clone(), device.clone()))
                    .or_default()
                    .moved(seq, answered),
                Op::Read { conv, seq } => {
                    // Reading moves this device's delivered cursor too (9.14).
                    self.delivered
                        .entry((conv.clone(), user.clone(), device.clone()))
                        .or_default()
                        .moved(seq, answered);
                    self.read
                        .entry((conv, user.clone()))
                        .or_default()
                        .moved(seq, answered);
                }
                Op::Add { conv, user: added } => {
                    let pool = self.pools.entry(conv.clone()).or_default();
                    pool.ops.push((added, true, answered));
                    problems.extend(check_members_reply(
                        &conv,
                        pool,
                        &self.pool_users,
                        ok.as_ref(),
                    ));
                }
                Op::Remove {
                    conv,
                    user: removed,
                } => {
                    let pool = self.pools.entry(conv.clone()).or_default();
                    pool.ops.push((removed, false, answered));
                    problems.extend(check_members_reply(
                        &conv,
                        pool,
                        &self.pool_users,
                        ok.as_ref(),
                    ));
                }
                Op::Leave { conv } => self
                    .leavers
                    .entry((conv, user.clone()))
                    .or_default()
                    .ops
                    .push((false, answered)),
                Op::Filler => {}
            }
        }
        problems
    }

    fn absorb_churn(&mut self, report: ChurnReport) -> Vec<String> {
        let mut problems = report.problems;
        let seen = self.seen.entry(report.user.clone()).or_default();
        for event in report.events {
            match event {
                Churn::Closed => {
                    seen.closed_since = true;
                    *self.unanswered.entry(LAST_SEEN).or_default() += 1;
                }
                Churn::Shown(ts) => {
                    if seen.shown.is_some_and(|before| ts < before) {
                        problems.push(format!(
                            "{}: last seen went back from {:?} to {ts}",
                            report.user, seen.shown
                        ));
                    }
                    seen.shown = Some(ts);
                    seen.closed_since = false;
                    *self.unanswered.entry(LAST_SEEN).or_default() -= 1;
                    *self.answered.entry(LAST_SEEN).or_default() += 1;
                }
            }
        }
        problems
    }
}

/// A `member.add`/`member.remove` answer names the members after it: its pool users must
/// be the model's after every operation up to it (the last in `pool.ops`).
fn check_members_reply(
    conv: &str,
    pool: &PoolModel,
    pool_users: &BTreeSet<String>,
    ok: Option<&Value>,
) -> Option<String> {
    let ok = ok?;
    let mut expected = pool.now.clone();
    for (user, added, _) in &pool.ops {
        if *added {
            expected.insert(user.clone());
        } else {
            expected.remove(user);
        }
    }
    let shown: BTreeSet<String> = ok["members"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .filter(|user| pool_users.contains(*user))
        .map(str::to_string)
        .collect();
    (shown != expected).then(|| {
        format!(
            "{conv}: the answer to {:?} lists pool members {shown:?}, not {expected:?}",
            pool.ops.last()
        )
    })
}

/// A group whose members change under load.
struct Group {
    id: String,
    admin: String,
    pool: Vec<String>,
    leavers: Vec<String>,
}

/// Everyone and everything the change rounds use.
struct Cast {
    /// Conversations with messages, reactions and cursors (as the send bursts have).
    convs: Vec<Conv>,
    /// Chat clients: (user, device, their conversations).
    chat: Vec<(String, String, Vec<String>)>,
    groups: Vec<Group>,
    churners: Vec<String>,
    watcher: String,
}

fn cast(daemon: &Daemon, model: &mut Model) -> Cast {
    let convs = make_conversations(daemon, "x");
    // Every sender of every conversation, plus a second device for every other one.
    let mut chat: Vec<(String, String, Vec<String>)> = Vec::new();
    for conv in &convs {
        for user in &conv.senders {
            match chat.iter_mut().find(|(u, _, _)| u == user) {
                Some((_, _, targets)) => targets.push(conv.id.clone()),
                None => chat.push((user.clone(), "phone".into(), vec![conv.id.clone()])),
            }
        }
    }
    let second: Vec<_> = chat
        .iter()
        .step_by(2)
        .map(|(user, _, targets)| (user.clone(), "laptop".to_string(), targets.clone()))
        .collect();
    chat.extend(second);
    // Messages to react to and move cursors over.
    for conv in &convs {
        let mut client = session(daemon, &conv.senders[0], "prefill");
        let sends: Vec<(u64, Outgoing)> = (0..PREFILL)
            .map(|n| {
                let out = Outgoing {
                    conv: conv.id.clone(),
                    cmid: format!("prefill-{n}"),
                    body: format!("prefill {n}"),
                    user: conv.senders[0].clone(),
                };
                let id = client.command(
                    "send",
                    json!({"conv": out.conv, "cmid": out.cmid, "body": out.body}),
                );
                (id, out)
            })
            .collect();
        let ids: Vec<u64> = sends.iter().map(|(id, _)| *id).collect();
        let mut got = replies(&mut client, &ids);
        for (id, out) in sends {
            let ok = got.remove(&id).unwrap()["ok"].clone();
            model.learn(
                &out.conv,
                ok["seq"].as_u64().unwrap(),
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
    // Per shard, groups homed there whose admin, pool users and leavers live on the other.
    let mut groups = Vec::new();
    for conv_shard in 0..SHARDS {
        let users_shard = 1 - conv_shard;
        let admin = users_on(&format!("adm{users_shard}-"), users_shard, 1).remove(0);
        let pool = users_on(&format!("pool{users_shard}-"), users_shard, POOL);
        let leavers = users_on(&format!("leave{users_shard}-"), users_shard, LEAVERS);
        for _ in 0..MEMBER_GROUPS {
            groups.push(Group {
                id: group_on(daemon, std::slice::from_ref(&admin), conv_shard),
                admin: admin.clone(),
                pool: pool.clone(),
                leavers: leavers.clone(),
            });
        }
    }
    let churners = (0..SHARDS)
        .flat_map(|shard| users_on(&format!("churn{shard}-"), shard, CHURNERS))
        .collect();
    Cast {
        convs,
        chat,
        groups,
        churners,
        watcher: "watcher".into(),
    }
}

// The checks of a restarted daemon against the model.

/// Last seen: each churner is offline, with the last seen `presence.get` showed before the
/// kill, or (if a session of theirs closed after that) a newer one up to the kill; none
/// only if none was ever shown and none may have been written. Returns how many closes
/// left unanswered turned out to be recorded.
fn verify_last_seen(
    daemon: &Daemon,
    cast: &Cast,
    changes: &mut Changes,
    killed_at: u64,
    when: &str,
) -> usize {
    let mut watcher = session(daemon, &cast.watcher, "verify");
    let got = ok(
        &mut watcher,
        "presence.get",
        json!({"users": cast.churners}),
    );
    let entries = got["users"].as_array().unwrap();
    assert_eq!(entries.len(), cast.churners.len(), "{when}: {got}");
    let mut newer = 0;
    for (user, entry) in cast.churners.iter().zip(entries) {
        assert_eq!(entry["user"], user.as_str(), "{when}: {got}");
        assert_eq!(entry["status"], "offline", "{when}: {entry}");
        let seen = changes.seen.entry(user.clone()).or_default();
        let now = entry["last_seen"].as_u64();
        let what = format!("{when}: last seen of {user} is {now:?}; the model says {seen:?}");
        match (seen.shown, now) {
            (Some(shown), Some(now)) if now == shown => {}
            (Some(shown), Some(now)) => {
                assert!(
                    seen.closed_since && now > shown && now <= killed_at,
                    "{what} (killed at {killed_at})"
                );
                newer += 1;
            }
            (Some(_), None) => panic!("{what}: lost"),
            (None, Some(now)) => {
                assert!(
                    seen.closed_since && now <= killed_at,
                    "{what} (killed at {killed_at})"
                );
                newer += 1;
            }
            (None, None) => {}
        }
        seen.shown = now;
        seen.closed_since = false;
    }
    newer
}

/// Reactions: every message's reactions (history, 9.16) are exactly the model's: each key
/// a session set or cleared holds an allowed value, and no other reaction exists. Returns
/// how many keys hold what only an unanswered operation set.
fn verify_reactions(daemon: &Daemon, cast: &Cast, changes: &mut Changes, when: &str) -> usize {
    let mut differ = 0;
    for conv in &cast.convs {
        let mut reader = session(daemon, &conv.senders[0], "reader");
        let mut shown: BTreeSet<(u64, String, String)> = BTreeSet::new();
        for msg in history(&mut reader, &conv.id) {
            let seq = msg["seq"].as_u64().unwrap();
            let Some(reactions) = msg.get("reactions") else {
                continue;
            };
            for (emoji, users) in reactions.as_object().unwrap() {
                let users = users.as_array().unwrap();
                assert!(!users.is_empty(), "{when}: {} seq {seq}: {msg}", conv.id);
                for user in users {
                    shown.insert((seq, emoji.clone(), user.as_str().unwrap().to_string()));
                }
            }
        }
        for ((c, seq, emoji, user), flag) in changes.reactions.range_mut(
            (conv.id.clone(), 0, String::new(), String::new())
                ..(conv.id.clone(), u64::MAX, String::new(), String::new()),
        ) {
            debug_assert_eq!(c, &conv.id);
            let on = shown.remove(&(*seq, emoji.clone(), user.clone()));
            assert!(
                flag.allowed().contains(&on),
                "{when}: {c} seq {seq}: {user}'s {emoji} is {}; acked: {:?} (was {}, then (on, acked) {:?})",
                if on { "on" } else { "off" },
                flag.answered(),
                flag.now,
                flag.ops
            );
            if on != flag.answered() {
                differ += 1;
            }
            flag.settle(on);
        }
        assert!(
            shown.is_empty(),
            "{when}: {}: reactions nobody set: {shown:?}",
            conv.id
        );
    }
    differ
}

/// Cursors: what `conv.list` shows each chat device (its `delivered_seq`, the user's
/// `read_seq`, `unread`) is allowed by the model; then the receipt state: a device new to
/// the server acking the user's highest delivered cursor, or reading at the read cursor,
/// moves nothing (no receipt), and acking one further does (a receipt). Returns how many
/// cursors hold what only an unanswered operation set.
fn verify_cursors(
    daemon: &Daemon,
    cast: &Cast,
    model: &Model,
    changes: &mut Changes,
    when: &str,
) -> usize {
    let mut differ = 0;
    for (user, device, targets) in &cast.chat {
        let mut client = session(daemon, user, device);
        let list = ok(&mut client, "conv.list", json!({}));
        for conv in targets {
            let entry = list["convs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["conv"] == conv.as_str())
                .unwrap_or_else(|| panic!("{when}: {user}/{device} does not list {conv}: {list}"))
                .clone();
            let last_seq = entry["last_seq"].as_u64().unwrap();
            assert_eq!(
                last_seq,
                model.known[conv].len() as u64,
                "{when}: {conv} {entry}"
            );
            let delivered = entry["delivered_seq"].as_u64().unwrap();
            let read = entry["read_seq"].as_u64().unwrap();
            assert_eq!(
                entry["unread"].as_u64().unwrap(),
                last_seq - read,
                "{when}: {entry}"
            );
            let key = (conv.clone(), user.clone(), device.clone());
            let cursor = changes.delivered.entry(key).or_default();
            assert!(
                cursor.allows(delivered),
                "{when}: {user}/{device} delivered_seq of {conv} is {delivered}; acked up to {}, unanswered {:?}",
                cursor.floor,
                cursor.unanswered
            );
            differ += usize::from(delivered != cursor.floor);
            cursor.settle(delivered);
            let cursor = changes
                .read
                .entry((conv.clone(), user.clone()))
                .or_default();
            assert!(
                cursor.allows(read),
                "{when}: {user} read_seq of {conv} is {read} (on {device}); acked up to {}, unanswered {:?}",
                cursor.floor,
                cursor.unanswered
            );
            differ += usize::from(read != cursor.floor);
            cursor.settle(read);
        }
    }
    // The receipt state: each user's delivered position (their devices' highest) and read
    // cursor, as receipts show them (9.14: a receipt only when one advances).
    let users: BTreeSet<&String> = cast.chat.iter().map(|(user, _, _)| user).collect();
    for user in users {
        let mut probe = session(daemon, user, "probe");
        for conv in cast.convs.iter().filter(|c| c.senders.contains(user)) {
            let id = conv.id.as_str();
            // The probe's own cursor counts too: it moved in the rounds before.
            let delivered = cast
                .chat
                .iter()
                .filter(|(u, _, _)| u == user)
                .map(|(_, device, _)| device.as_str())
                .chain(["probe"])
                .filter_map(|device| {
                    changes
                        .delivered
                        .get(&(conv.id.clone(), user.clone(), device.to_string()))
                })
                .map(|cursor| cursor.floor)
                .max()
                .unwrap();
            let read = changes.read[&(conv.id.clone(), user.clone())].floor;
            let mine = |doc: &Value| {
                doc["ev"] == "receipt" && doc["conv"] == id && doc["user"] == user.as_str()
            };
            let (reply, before) = probe.barrier("ack", json!({"conv": id, "seq": delivered}));
            assert!(reply["ok"].is_object(), "{when}: {reply}");
            let receipts: Vec<&Value> = before.iter().filter(|d| mine(d)).collect();
            assert!(
                receipts.is_empty(),
                "{when}: {user}'s delivered position in {id} is below {delivered} (a device acked it): {receipts:?}"
            );
            if read > 0 {
                let (reply, before) = probe.barrier("read", json!({"conv": id, "seq": read}));
                assert!(reply["ok"].is_object(), "{when}: {reply}");
                let receipts: Vec<&Value> = before.iter().filter(|d| mine(d)).collect();
                assert!(
                    receipts.is_empty(),
                    "{when}: {user}'s cursors in {id} are below read {read}: {receipts:?}"
                );
            }
            let last = model.known[&conv.id].len() as u64;
            if delivered < last {
                let (reply, before) =
                    probe.barrier("ack", json!({"conv": id, "seq": delivered + 1}));
                assert!(reply["ok"].is_object(), "{when}: {reply}");
                let receipts: Vec<&Value> = before.iter().filter(|d| mine(d)).collect();
                assert_eq!(
                    receipts,
                    [
                        &json!({"ev": "receipt", "conv": id, "user": user, "kind": "delivered", "seq": delivered + 1})
                    ],
                    "{when}: {user} acking {id} past {delivered}"
                );
            }
            let probed = delivered.saturating_add(1).min(last);
            changes
                .delivered
                .entry((conv.id.clone(), user.clone(), "probe".into()))
                .or_default()
                .settle(probed);
        }
    }
    differ
}

/// Members: each group's `conv.get` lists its admin (role admin), the leavers and pool
/// users the model allows (role member) and nobody else; then each pool user and leaver
/// sees exactly their groups in `conv.list`, and a group they are not in is closed to
/// them (`send` and `history` get `forbidden`). Returns how many memberships hold what
/// only an unanswered operation set.
fn verify_members(daemon: &Daemon, cast: &Cast, changes: &mut Changes, when: &str) -> usize {
    let mut differ = 0;
    // (user, group) -> a member.
    let mut member_of: BTreeMap<(String, String), bool> = BTreeMap::new();
    for group in &cast.groups {
        let id = &group.id;
        let mut admin = session(daemon, &group.admin, "reader");
        let got = ok(&mut admin, "conv.get", json!({"conv": id}));
        let mut members = BTreeSet::new();
        for member in got["members"].as_array().unwrap() {
            let user = member["user"].as_str().unwrap().to_string();
            let role = if user == group.admin {
                "admin"
            } else {
                "member"
            };
            assert_eq!(member["role"], role, "{when}: {id}: {got}");
            members.insert(user);
        }
        assert!(
            members.remove(&group.admin),
            "{when}: {id} lost its admin: {got}"
        );
        for leaver in &group.leavers {
            let flag = changes
                .leavers
                .entry((id.clone(), leaver.clone()))
                .or_default();
            let member = members.remove(leaver);
            assert!(
                flag.allowed().contains(&member),
                "{when}: {id}: leaver {leaver} a member: {member}; (member, acked) {:?} since {}",
                flag.ops,
                flag.now
            );
            differ += usize::from(member != flag.answered());
            flag.settle(member);
            member_of.insert((leaver.clone(), id.clone()), member);
        }
        let pool_now: BTreeSet<String> = group
            .pool
            .iter()
            .filter(|user| members.remove(*user))
            .cloned()
            .collect();
        assert!(
            members.is_empty(),
            "{when}: {id}: members nobody added: {members:?}"
        );
        let pool = changes.pools.entry(id.clone()).or_default();
        let allowed = pool.allowed();
        assert!(
            allowed.contains(&pool_now),
            "{when}: {id}: pool members {pool_now:?}; the admin's (user, added, acked) {:?} since {:?} allow {allowed:?}",
            pool.ops,
            pool.now
        );
        differ += usize::from(allowed.first() != Some(&pool_now));
        for user in &group.pool {
            member_of.insert((user.clone(), id.clone()), pool_now.contains(user));
        }
        pool.now = pool_now;
        pool.ops.clear();
    }
    // What the members and former members may do.
    let mut groups_of: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
    for ((user, conv), member) in &member_of {
        groups_of.entry(user).or_default().push((conv, *member));
    }
    for (user, groups) in groups_of {
        let mut client = session(daemon, user, "check");
        let list = ok(&mut client, "conv.list", json!({}));
        let listed: BTreeSet<&str> = list["convs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["conv"].as_str().unwrap())
            .collect();
        for (conv, member) in groups {
            assert_eq!(
                listed.contains(conv),
                member,
                "{when}: {user}: {conv} in {list}"
            );
            let history = call(&mut client, "history", json!({"conv": conv}));
            if member {
                assert!(
                    history["ok"].is_object(),
                    "{when}: {user} in {conv}: {history}"
                );
            } else {
                assert_eq!(
                    history["err"]["code"], "forbidden",
                    "{when}: {user}, no member of {conv}, asked its history: {history}"
                );
                let send = call(
                    &mut client,
                    "send",
                    json!({"conv": conv, "cmid": "not-a-member", "body": "let me in"}),
                );
                assert_eq!(
                    send["err"]["code"], "forbidden",
                    "{when}: {user}, no member of {conv}, sent: {send}"
                );
            }
        }
    }
    differ
}

// Tests.

#[test]
fn kill_9_during_change_bursts_loses_no_acknowledged_change() {
    assert_no_restart_loaded_a_snapshot(&kill_9_change_rounds(&[]));
}

/// The same with frequent state snapshots: the cursors, reactions, members and last seen
/// come back from a snapshot plus the log after it.
#[test]
fn kill_9_with_state_snapshots_loses_no_acknowledged_change() {
    assert_some_restart_loaded_a_snapshot(&kill_9_change_rounds(&[
        "--snapshot-every-records",
        "100",
    ]));
}

/// Rounds of: a burst of every kind of change, kill -9, restart, verify. Returns each
/// restart's log lines.
fn kill_9_change_rounds(extra: &[&str]) -> Vec<Vec<String>> {
    let started = Instant::now();
    let extra: Vec<&str> = CHANGE_FLAGS.iter().chain(extra).copied().collect();
    let extra = &extra[..];
    let mut restarts = Vec::new();
    let mut daemon = start_with(tempfile::tempdir().expect("tempdir"), extra);
    let mut model = Model::default();
    let cast = cast(&daemon, &mut model);
    let mut changes = Changes {
        pool_users: cast.groups.iter().flat_map(|g| g.pool.clone()).collect(),
        ..Changes::default()
    };
    // Acknowledged changes (all clients together) after which each round's kill comes.
    let kill_after = [700, 250, 1100];
    for (round, &threshold) in kill_after.iter().enumerate() {
        changes.unanswered.clear();
        changes.answered.clear();
        // The leavers are back in every group before the load.
        for group in &cast.groups {
            let mut admin = session(&daemon, &group.admin, "setup");
            ok(
                &mut admin,
                "member.add",
                json!({"conv": group.id, "users": group.leavers}),
            );
            for leaver in &group.leavers {
                changes
                    .leavers
                    .entry((group.id.clone(), leaver.clone()))
                    .or_default()
                    .settle(true);
            }
        }
        let (acks, acked) = mpsc::channel();
        let mut workers: Vec<(String, String, Box<dyn Plan>, usize)> = Vec::new();
        for (user, device, targets) in &cast.chat {
            let convs = targets
                .iter()
                .map(|conv| {
                    let known_last = model.known[conv].len() as u64;
                    let cursor = |key| {
                        changes
                            .delivered
                            .get(&key)
                            .map_or(0, |c: &CursorModel| c.floor)
                    };
                    ChatConv {
                        id: conv.clone(),
                        known_last,
                        span: known_last.min(PREFILL * 4),
                        ack_next: cursor((conv.clone(), user.clone(), device.clone())) + 1,
                        read_next: changes
                            .read
                            .get(&(conv.clone(), user.clone()))
                            .map_or(0, |c| c.floor)
                            + 1,
                        reacts: 0,
                    }
                })
                .collect();
            // From round 1 on, the users homed on one shard (in turn) leave their cursors
            // alone: those then come back from a snapshot with no log after it.
            let cursors = round == 0 || user_home(user, SHARDS) as usize != (round - 1) % 2;
            let plan = ChatPlan {
                user: user.clone(),
                device: device.clone(),
                round,
                convs,
                cursors,
                step: 0,
            };
            workers.push((user.clone(), device.clone(), Box::new(plan), OPS_IN_FLIGHT));
        }
        let admins: BTreeSet<&String> = cast.groups.iter().map(|g| &g.admin).collect();
        for admin in admins {
            let mine: Vec<&Group> = cast.groups.iter().filter(|g| &g.admin == admin).collect();
            let plan = AdminPlan {
                groups: mine.iter().map(|g| g.id.clone()).collect(),
                pool: mine[0].pool.clone(),
                members: mine
                    .iter()
                    .map(|g| {
                        (
                            g.id.clone(),
                            changes
                                .pools
                                .get(&g.id)
                                .map(|p| p.now.clone())
                                .unwrap_or_default(),
                        )
                    })
                    .collect(),
                step: 0,
            };
            workers.push((admin.clone(), "admin".into(), Box::new(plan), OPS_IN_FLIGHT));
        }
        let leavers: BTreeSet<&String> = cast.groups.iter().flat_map(|g| &g.leavers).collect();
        for leaver in leavers {
            let plan = LeaverPlan {
                groups: cast
                    .groups
                    .iter()
                    .filter(|g| g.leavers.contains(leaver))
                    .map(|g| g.id.clone())
                    .collect(),
                step: 0,
            };
            workers.push((
                leaver.clone(),
                "leaver".into(),
                Box::new(plan),
                LEAVER_IN_FLIGHT,
            ));
        }
        let threads: Vec<_> = workers
            .into_iter()
            .map(|(user, device, plan, depth)| {
                let client = session(&daemon, &user, &device);
                let acks = acks.clone();
                std::thread::spawn(move || work(client, user, device, plan, depth, acks))
            })
            .collect();
        let churners: Vec<_> = cast
            .churners
            .iter()
            .enumerate()
            .map(|(i, user)| {
                let watcher = session(&daemon, &cast.watcher, &format!("watch{i}"));
                let (ws, user, acks) = (daemon.ws, user.clone(), acks.clone());
                std::thread::spawn(move || churn(ws, user, watcher, acks))
            })
            .collect();
        drop(acks);
        let mut count = 0;
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        while count < threshold
            || AT_LEAST
                .iter()
                .any(|(kind, least)| by_kind.get(kind).copied().unwrap_or(0) < *least)
        {
            let Ok(kind) = acked.recv_timeout(WAIT) else {
                panic!("round {round}: acknowledgements stalled after {count} {by_kind:?} (or every client stopped)");
            };
            count += 1;
            *by_kind.entry(kind).or_default() += 1;
        }
        let loaded = started.elapsed();
        let data_dir = kill9(&mut daemon);
        let killed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut sends = BurstReport::default();
        let mut problems = Vec::new();
        for thread in threads {
            let report = thread.join().expect("client thread");
            problems.extend(changes.absorb(report, &mut sends));
        }
        for thread in churners {
            problems.extend(changes.absorb_churn(thread.join().expect("churn thread")));
        }
        assert!(problems.is_empty(), "round {round}: {problems:#?}");
        let total_answered: usize = changes.answered.values().sum();
        assert!(total_answered >= threshold);
        let sends_unanswered = sends.unacked.len();
        model.absorb(sends);

        daemon = start_with(data_dir, extra);
        let restarted = started.elapsed();
        restarts.push(daemon.startup.clone());
        let when = format!("round {round} after kill -9");
        // Last seen first: every check below opens sessions (of other users).
        let seen = verify_last_seen(&daemon, &cast, &mut changes, killed_at, &when);
        let survived = verify(&daemon, &cast.convs, &mut model, &when);
        let reactions = verify_reactions(&daemon, &cast, &mut changes, &when);
        let cursors = verify_cursors(&daemon, &cast, &model, &mut changes, &when);
        let members = verify_members(&daemon, &cast, &mut changes, &when);
        // The direct conversations are where they were, under the same id.
        for conv in cast.convs.iter().filter(|c| c.id.starts_with("d-")) {
            let mut other = session(&daemon, &conv.senders[1], "setup");
            let again = ok(
                &mut other,
                "conv.create",
                json!({"kind": "direct", "members": [&conv.senders[0]]}),
            );
            assert_eq!(again["conv"], conv.id.as_str(), "{when}: {again}");
            assert_eq!(again["created"], false, "{when}: {again}");
        }
        let (retried, _) = resend(&daemon, &mut model, &when);
        assert_eq!(survived + retried, sends_unanswered, "{when}");
        verify(
            &daemon,
            &cast.convs,
            &mut model,
            &format!("{when}, after resends"),
        );
        eprintln!(
            "round {round}: answered {:?}; unanswered at the kill {:?}; took effect unanswered: \
             {survived} sends, {reactions} reactions, {cursors} cursors, {members} memberships, \
             {seen} last seen; killed at {loaded:?}, restarted at {restarted:?}, verified at {:?}",
            changes.answered,
            changes.unanswered,
            started.elapsed()
        );
    }
    restarts
}
