//! A simulated client: one device of one user speaking the protocol as real clients do.
//! It sends, resends with the same `cmid` when an answer is lost, acks and reads what it
//! received, types, manages groups, pages history, syncs, and resumes after reconnecting.
//! Everything it is told goes through the oracle.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::oracle::{CursorKey, Fact, Oracle, Violation};
use crate::rng::Rng;

/// Requests one client keeps in flight at most.
const MAX_PENDING: usize = 8;
/// Conversations one `sync` or `hello` resume names at most (within `sync_max_convs`, 32
/// in every run); the rest wait for a later sync.
const MAX_CURSORS: usize = 16;

/// A message this client sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    conv: String,
    cmid: String,
    body: String,
}

#[derive(Debug)]
enum Pending {
    Hello,
    Send {
        send: Outgoing,
        /// The seq an earlier `ok` gave this cmid: the answer must be a duplicate.
        ok_before: Option<u64>,
    },
    Ack {
        conv: String,
        seq: u64,
    },
    Read {
        conv: String,
        seq: u64,
    },
    List {
        asked_at: u64,
    },
    React {
        conv: String,
        seq: u64,
        emoji: String,
        on: bool,
        /// The home's last LSN when the request was sent.
        asked_lsn: u64,
    },
    Presence {
        /// (user, their home's last LSN when the request was sent).
        asked: Vec<(String, u64)>,
    },
    Create {
        group: bool,
    },
    Admin,
    Leave {
        conv: String,
    },
    History {
        conv: String,
        asked_lsn: u64,
    },
    Sync,
}

#[derive(Debug, Default)]
pub struct ConvView {
    received: BTreeSet<u64>,
    /// Every seq up to this one is held.
    pub contiguous: u64,
    admin: bool,
    member: bool,
    /// The conversation's last seq, as the last `conv.list` said.
    listed_last: u64,
}

impl ConvView {
    fn hold(&mut self, seq: u64) {
        self.received.insert(seq);
        while self.received.contains(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Offline,
    Hello,
    Ready,
}

pub struct Client {
    pub user: String,
    pub device: String,
    pub phase: Phase,
    /// Virtual µs before which an offline client does not reconnect.
    pub retry_at: u64,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    typing_ids: BTreeSet<u64>,
    pub convs: BTreeMap<String, ConvView>,
    /// Sends with no `ok` yet: resent with the same cmid until one comes.
    pub outbox: Vec<Outgoing>,
    /// Sends that got an `ok`: (send, seq), for a deliberate duplicate now and then.
    sent: Vec<(Outgoing, u64)>,
    sends: u64,
    // Per session.
    /// Per conversation, the last message new to this device received in this session.
    session_last: BTreeMap<String, u64>,
    receipts: BTreeMap<(String, String, String), u64>,
    replays: u32,
    /// Conversations named by a `sync` of this session while replays are under way.
    syncing: BTreeSet<String>,
    /// After the faults: fetch everything, then stop.
    pub converging: bool,
    listed: bool,
    /// A new session's first act: `presence.get` of everyone (after a crash, every user's
    /// last seen comes from the recovered state).
    ask_presence: bool,
    pub duplicates_received: u64,
    pub sends_acknowledged: u64,
}

impl Client {
    pub fn new(user: &str, device: &str) -> Self {
        Self {
            user: user.into(),
            device: device.into(),
            phase: Phase::Offline,
            retry_at: 0,
            next_id: 0,
            pending: BTreeMap::new(),
            typing_ids: BTreeSet::new(),
            convs: BTreeMap::new(),
            outbox: Vec::new(),
            sent: Vec::new(),
            sends: 0,
            session_last: BTreeMap::new(),
            receipts: BTreeMap::new(),
            replays: 0,
            syncing: BTreeSet::new(),
            converging: false,
            listed: false,
            ask_presence: false,
            duplicates_received: 0,
            sends_acknowledged: 0,
        }
    }

    fn command(&mut self, op: &str, mut fields: Value, pending: Pending) -> String {
        self.next_id += 1;
        fields["id"] = json!(self.next_id);
        fields["op"] = json!(op);
        self.pending.insert(self.next_id, pending);
        fields.to_string()
    }

    /// A new connection: `hello` with the token, resuming every known conversation.
    pub fn hello(&mut self, token: &str) -> String {
        self.phase = Phase::Hello;
        self.session_last.clear();
        self.syncing.clear();
        self.receipts.clear();
        self.listed = false;
        let resume: Vec<Value> = self
            .convs
            .iter()
            .filter(|(_, view)| view.member)
            .take(MAX_CURSORS)
            .map(|(conv, view)| json!({"conv": conv, "after": view.contiguous}))
            .collect();
        let mut fields = json!({"token": token, "device": self.device});
        if !resume.is_empty() {
            fields["resume"] = json!(resume);
            self.replays = 1;
        } else {
            self.replays = 0;
        }
        self.command("hello", fields, Pending::Hello)
    }

    /// The connection is gone (closed, reset, or the node crashed). Unanswered sends
    /// stay in the outbox: their outcome is unknown, so they are resent.
    pub fn on_disconnect(&mut self, retry_at: u64) {
        self.phase = Phase::Offline;
        self.retry_at = retry_at;
        self.pending.clear();
        self.typing_ids.clear();
        self.replays = 0;
    }

    /// Nothing left to do after the faults stopped: everything answered, everything held.
    pub fn settled(&self) -> bool {
        self.phase == Phase::Ready
            && self.listed
            && self.pending.is_empty()
            && self.outbox.is_empty()
            && self
                .convs
                .values()
                .filter(|v| v.member)
                .all(|v| v.contiguous >= v.listed_last)
    }

    /// Ask for the list again: conversations moved on since the last one.
    pub fn relist(&mut self) {
        self.listed = false;
    }

    /// One thing this client decides to do now, as a frame to send.
    pub fn act(&mut self, rng: &mut Rng, users: &[String], oracle: &mut Oracle) -> Option<String> {
        if self.phase != Phase::Ready || self.pending.len() >= MAX_PENDING {
            return None;
        }
        if self.converging {
            return self.act_to_converge(oracle);
        }
        if std::mem::take(&mut self.ask_presence) {
            return Some(self.presence_get(users.to_vec(), oracle));
        }
        let member_convs: Vec<String> = self
            .convs
            .iter()
            .filter(|(_, v)| v.member)
            .map(|(c, _)| c.clone())
            .collect();
        let conv = rng.pick(&member_convs).cloned();
        let other = rng.pick(users).filter(|u| **u != self.user).cloned();
        match rng.below(100) {
            0..=29 => {
                let conv = conv?;
                self.sends += 1;
                let send = Outgoing {
                    cmid: format!("{}-{}", self.device, self.sends),
                    body: format!("{}/{} #{}", self.user, self.device, self.sends),
                    conv,
                };
                self.outbox.push(send.clone());
                Some(self.send(send, None))
            }
            30..=39 => {
                let send = rng.pick(&self.outbox)?.clone();
                Some(self.send(send, None))
            }
            40..=42 => {
                let (send, seq) = rng.pick(&self.sent)?.clone();
                Some(self.send(send, Some(seq)))
            }
            43..=52 => {
                let conv = conv?;
                let seq = self.convs[&conv].contiguous;
                (seq > 0).then(|| {
                    let fields = json!({"conv": conv, "seq": seq});
                    self.command("ack", fields, Pending::Ack { conv, seq })
                })
            }
            53..=59 => {
                let conv = conv?;
                let held = self.convs[&conv].contiguous;
                (held > 0).then(|| {
                    let seq = rng.between(1, held);
                    let fields = json!({"conv": conv, "seq": seq});
                    self.command("read", fields, Pending::Read { conv, seq })
                })
            }
            60..=64 => {
                let conv = conv?;
                self.next_id += 1;
                self.typing_ids.insert(self.next_id);
                let doc = json!({"id": self.next_id, "op": "typing", "conv": conv, "on": rng.chance(700)});
                Some(doc.to_string())
            }
            65..=70 => {
                let asked_at = oracle.tick();
                Some(self.command("conv.list", json!({}), Pending::List { asked_at }))
            }
            71..=73 => {
                let other = other?;
                let fields = json!({"kind": "direct", "members": [other]});
                Some(self.command("conv.create", fields, Pending::Create { group: false }))
            }
            74..=75 => {
                let mut members: Vec<String> = users
                    .iter()
                    .filter(|u| **u != self.user && rng.chance(500))
                    .cloned()
                    .collect();
                members.dedup();
                let fields = json!({"kind": "group", "members": members, "title": "sim"});
                Some(self.command("conv.create", fields, Pending::Create { group: true }))
            }
            76..=80 => {
                let admin_of: Vec<String> = self
                    .convs
                    .iter()
                    .filter(|(_, v)| v.admin && v.member)
                    .map(|(c, _)| c.clone())
                    .collect();
                let conv = rng.pick(&admin_of)?.clone();
                let op = if rng.chance(600) {
                    "member.add"
                } else {
                    "member.remove"
                };
                let fields = json!({"conv": conv, "users": [other?]});
                Some(self.command(op, fields, Pending::Admin))
            }
            81 => {
                let conv = conv?;
                Some(self.command("conv.leave", json!({"conv": conv}), Pending::Leave { conv }))
            }
            82..=85 => {
                let conv = conv?;
                let held = self.convs[&conv].contiguous;
                let fields = if rng.chance(500) {
                    json!({"conv": conv, "after": rng.below(held + 1), "limit": rng.between(1, 30)})
                } else {
                    json!({"conv": conv, "before": rng.between(1, held + 2), "limit": rng.between(1, 30)})
                };
                let asked_lsn = oracle.last_lsn(oracle.conv_home(&conv));
                Some(self.command("history", fields, Pending::History { conv, asked_lsn }))
            }
            86..=89 => self.sync(&member_convs),
            90..=91 => Some(self.presence_get(vec![other?, self.user.clone()], oracle)),
            _ => {
                let conv = conv?;
                let held = self.convs[&conv].contiguous;
                (held > 0).then(|| {
                    let emoji = rng
                        .pick(&["+1", "heart", "eyes"])
                        .expect("non-empty")
                        .to_string();
                    let seq = rng.between(1, held);
                    let on = rng.chance(700);
                    let fields = json!({"conv": conv, "seq": seq, "emoji": emoji, "on": on});
                    let asked_lsn = oracle.last_lsn(oracle.conv_home(&conv));
                    let pending = Pending::React {
                        conv,
                        seq,
                        emoji,
                        on,
                        asked_lsn,
                    };
                    self.command("react", fields, pending)
                })
            }
        }
    }

    fn act_to_converge(&mut self, oracle: &mut Oracle) -> Option<String> {
        if !self.pending.is_empty() {
            return None;
        }
        if let Some(send) = self.outbox.first().cloned() {
            return Some(self.send(send, None));
        }
        if !self.listed {
            let asked_at = oracle.tick();
            return Some(self.command("conv.list", json!({}), Pending::List { asked_at }));
        }
        let behind: Vec<String> = self
            .convs
            .iter()
            .filter(|(_, v)| v.member && v.contiguous < v.listed_last)
            .map(|(c, _)| c.clone())
            .collect();
        if behind.is_empty() {
            return None;
        }
        self.sync(&behind)
    }

    /// `presence.get` of `users`, noting where each one's home's log ended when asked.
    fn presence_get(&mut self, users: Vec<String>, oracle: &Oracle) -> String {
        let asked = users
            .iter()
            .map(|user| (user.clone(), oracle.last_lsn(oracle.user_home(user))))
            .collect();
        let fields = json!({ "users": users });
        self.command("presence.get", fields, Pending::Presence { asked })
    }

    fn send(&mut self, send: Outgoing, ok_before: Option<u64>) -> String {
        let fields = json!({"conv": send.conv, "cmid": send.cmid, "body": send.body});
        self.command("send", fields, Pending::Send { send, ok_before })
    }

    /// `sync` from the first message this client lacks in each conversation.
    fn sync(&mut self, convs: &[String]) -> Option<String> {
        if convs.is_empty() {
            return None;
        }
        let cursors: Vec<Value> = convs
            .iter()
            .take(MAX_CURSORS)
            .map(|conv| {
                let after = self.convs.get(conv).map_or(0, |v| v.contiguous);
                json!({"conv": conv, "after": after})
            })
            .collect();
        self.replays += 1;
        self.syncing.extend(convs.iter().take(MAX_CURSORS).cloned());
        Some(self.command("sync", json!({"cursors": cursors}), Pending::Sync))
    }

    /// A frame from the server: one or more documents. Returns frames to send back.
    pub fn on_frame(
        &mut self,
        frame: &str,
        oracle: &mut Oracle,
        durable: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<Vec<String>, Violation> {
        let mut replies = Vec::new();
        for line in frame.split('\n') {
            let doc: Value = serde_json::from_str(line)
                .map_err(|e| format!("{}: undecodable document {line:?}: {e}", self.user))?;
            if let Some(ev) = doc["ev"].as_str() {
                self.on_event(ev, &doc, oracle, durable, &mut replies)?;
            } else {
                self.on_reply(&doc, oracle, durable)?;
            }
        }
        Ok(replies)
    }

    fn on_reply(
        &mut self,
        doc: &Value,
        oracle: &mut Oracle,
        durable: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<(), Violation> {
        let who = format!("{}/{}", self.user, self.device);
        let Some(id) = doc["re"].as_u64() else {
            return Err(format!("{who}: reply without an id: {doc}"));
        };
        if self.typing_ids.remove(&id) {
            return Ok(());
        }
        let pending = self
            .pending
            .remove(&id)
            .ok_or_else(|| format!("{who}: reply to {id}, which is not waiting: {doc}"))?;
        let ok = &doc["ok"];
        let code = doc["err"]["code"].as_str();
        if code == Some("internal") || code == Some("rate_limited") {
            return Err(format!("{who}: {pending:?} answered {doc}"));
        }
        match pending {
            Pending::Hello => {
                if code.is_some() {
                    return Err(format!("{who}: hello refused: {doc}"));
                }
                self.phase = Phase::Ready;
                self.ask_presence = true;
            }
            Pending::Send { send, ok_before } => match code {
                None => {
                    let seq = ok["seq"].as_u64().ok_or("send ok without seq")?;
                    let mid = ok["mid"].as_str().unwrap_or_default();
                    if ok["conv"] != json!(send.conv) {
                        return Err(format!("{who}: send to {} answered {doc}", send.conv));
                    }
                    if let Some(first) = ok_before {
                        if seq != first || ok["dup"] != json!(true) {
                            return Err(format!(
                                "{who}: resent cmid {} (first seq {first}) answered {doc}",
                                send.cmid
                            ));
                        }
                    }
                    let fact = Fact {
                        from: self.user.clone(),
                        cmid: send.cmid.clone(),
                        body: send.body.clone(),
                    };
                    let home_durable = durable(&send.conv);
                    oracle.on_message_seen(
                        &self.user,
                        &send.conv,
                        seq,
                        mid,
                        fact,
                        false,
                        home_durable,
                    )?;
                    self.convs.entry(send.conv.clone()).or_default().hold(seq);
                    self.outbox.retain(|s| s.cmid != send.cmid);
                    self.sends_acknowledged += 1;
                    if ok_before.is_none() {
                        self.sent.push((send, seq));
                    }
                }
                Some("unavailable") => {}
                Some("forbidden" | "not_found") => {
                    self.outbox.retain(|s| s.cmid != send.cmid);
                }
                Some(_) => return Err(format!("{who}: send answered {doc}")),
            },
            Pending::Ack { conv, seq } if code.is_none() => {
                oracle.on_cursor_acked(&conv, &self.user, Some(&self.device), seq)?;
                let key = CursorKey::Delivered {
                    conv,
                    user: self.user.clone(),
                    device: self.device.clone(),
                };
                oracle.on_cursor_promised(key, seq);
            }
            Pending::Read { conv, seq } if code.is_none() => {
                oracle.on_cursor_acked(&conv, &self.user, None, seq)?;
                oracle.on_cursor_acked(&conv, &self.user, Some(&self.device), seq)?;
                let user = self.user.clone();
                let device = self.device.clone();
                oracle.on_cursor_promised(
                    CursorKey::Read {
                        conv: conv.clone(),
                        user: user.clone(),
                    },
                    seq,
                );
                oracle.on_cursor_promised(CursorKey::Delivered { conv, user, device }, seq);
            }
            Pending::List { asked_at } if code.is_none() => {
                self.on_list(ok, asked_at, oracle)?;
                self.listed = true;
            }
            Pending::Create { group } if code.is_none() => {
                let conv = ok["conv"].as_str().ok_or("create ok without conv")?;
                let view = self.convs.entry(conv.to_string()).or_default();
                view.member = true;
                view.admin |= group;
            }
            Pending::Leave { conv } if code.is_none() => {
                if let Some(view) = self.convs.get_mut(&conv) {
                    view.member = false;
                    view.admin = false;
                }
            }
            Pending::History { conv, asked_lsn } if code.is_none() => {
                let msgs = ok["msgs"].as_array().ok_or("history ok without msgs")?;
                let mut last = 0;
                for msg in msgs {
                    let seq = msg["seq"].as_u64().unwrap_or(0);
                    if seq <= last {
                        return Err(format!("{who}: history not ascending: {doc}"));
                    }
                    last = seq;
                    if msg["conv"] != json!(conv) {
                        return Err(format!("{who}: history of {conv} holds {msg}"));
                    }
                    self.on_msg(msg, false, oracle, durable)?;
                    // Each message's reactions (9.16), as the log had them then.
                    let mut shown = BTreeSet::new();
                    if let Some(reactions) = msg.get("reactions") {
                        let reactions = reactions
                            .as_object()
                            .ok_or_else(|| format!("{who}: reactions not an object: {msg}"))?;
                        for (emoji, users) in reactions {
                            let users = users
                                .as_array()
                                .filter(|users| !users.is_empty())
                                .ok_or_else(|| format!("{who}: bad reactions: {msg}"))?;
                            for user in users {
                                let user = user.as_str().ok_or("reaction user not a string")?;
                                shown.insert((emoji.clone(), user.to_string()));
                            }
                        }
                    }
                    oracle.on_reactions_shown(&conv, seq, &shown, asked_lsn)?;
                }
            }
            Pending::React {
                conv,
                seq,
                emoji,
                on,
                asked_lsn,
            } if code.is_none() => {
                oracle.on_reaction_acked(&conv, seq, &emoji, &self.user, on, asked_lsn)?;
            }
            Pending::Presence { asked } if code.is_none() => {
                let users = ok["users"]
                    .as_array()
                    .ok_or("presence.get ok without users")?;
                if users.len() != asked.len() {
                    return Err(format!("{who}: presence.get of {asked:?} answered {doc}"));
                }
                for (entry, (user, asked_lsn)) in users.iter().zip(&asked) {
                    if entry["user"] != json!(user) {
                        return Err(format!("{who}: presence.get of {asked:?} answered {doc}"));
                    }
                    let status = entry["status"].as_str().unwrap_or_default();
                    let last_seen = entry["last_seen"].as_u64();
                    oracle
                        .on_presence_shown(user, status, last_seen, *asked_lsn)
                        .map_err(|e| format!("{who}: {e}"))?;
                }
            }
            Pending::Sync if code.is_none() => {
                if let Some(convs) = ok["convs"].as_array() {
                    for summary in convs {
                        self.on_summary(summary, None, oracle)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_list(&mut self, ok: &Value, asked_at: u64, oracle: &mut Oracle) -> Result<(), Violation> {
        let convs = ok["convs"].as_array().ok_or("conv.list ok without convs")?;
        let listed: BTreeSet<&str> = convs.iter().filter_map(|c| c["conv"].as_str()).collect();
        for (conv, view) in &mut self.convs {
            if !listed.contains(conv.as_str()) {
                view.member = false;
            }
        }
        for summary in convs {
            self.on_summary(summary, Some(asked_at), oracle)?;
        }
        Ok(())
    }

    /// One conversation of a list. With `asked_at`, its cursors are checked as shown.
    fn on_summary(
        &mut self,
        summary: &Value,
        asked_at: Option<u64>,
        oracle: &mut Oracle,
    ) -> Result<(), Violation> {
        let conv = summary["conv"].as_str().ok_or("summary without conv")?;
        let last = summary["last_seq"].as_u64().unwrap_or(0);
        let read = summary["read_seq"].as_u64().unwrap_or(0);
        let delivered = summary["delivered_seq"].as_u64().unwrap_or(0);
        if read > last || delivered > last {
            return Err(format!("{}: cursors beyond last_seq: {summary}", self.user));
        }
        if oracle.last_seq(conv).is_none_or(|in_log| last > in_log) {
            return Err(format!("{}: listed beyond the log: {summary}", self.user));
        }
        oracle.on_cursor_listed(conv, &self.user, None, read)?;
        oracle.on_cursor_listed(conv, &self.user, Some(&self.device), delivered)?;
        let known = oracle.known(&self.user, conv);
        if read > known {
            return Err(format!(
                "{}: read_seq {read} of {conv} beyond anything delivered to the user ({known})",
                self.user
            ));
        }
        let view = self.convs.entry(conv.to_string()).or_default();
        view.member = true;
        view.listed_last = view.listed_last.max(last);
        if let Some(asked_at) = asked_at {
            let user = self.user.clone();
            let read_key = CursorKey::Read {
                conv: conv.to_string(),
                user: user.clone(),
            };
            oracle.on_cursor_shown(read_key, read, asked_at)?;
            let device = self.device.clone();
            let delivered_key = CursorKey::Delivered {
                conv: conv.to_string(),
                user,
                device,
            };
            oracle.on_cursor_shown(delivered_key, delivered, asked_at)?;
        }
        Ok(())
    }

    fn on_msg(
        &mut self,
        msg: &Value,
        live: bool,
        oracle: &mut Oracle,
        durable: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<(), Violation> {
        let conv = msg["conv"].as_str().ok_or("msg without conv")?;
        let seq = msg["seq"].as_u64().ok_or("msg without seq")?;
        let fact = Fact {
            from: msg["from"].as_str().unwrap_or_default().into(),
            cmid: msg["cmid"].as_str().unwrap_or_default().into(),
            body: msg["body"].as_str().unwrap_or_default().into(),
        };
        let mid = msg["mid"].as_str().unwrap_or_default();
        oracle.on_message_seen(&self.user, conv, seq, mid, fact, live, durable(conv))?;
        let view = self.convs.entry(conv.to_string()).or_default();
        if view.received.contains(&seq) {
            self.duplicates_received += 1;
        }
        view.hold(seq);
        Ok(())
    }

    fn on_event(
        &mut self,
        ev: &str,
        doc: &Value,
        oracle: &mut Oracle,
        durable: &dyn Fn(&str) -> Option<u64>,
        replies: &mut Vec<String>,
    ) -> Result<(), Violation> {
        let who = format!("{}/{}", self.user, self.device);
        match ev {
            "msg" => {
                // Order (PROTOCOL.md 7.3): in a session, no message this device lacked
                // arrives after a later one. Repeats of what the device holds are
                // harmless duplicates. A `sync` the client sent may cross a live message
                // and then replay older ones: its conversations are exempt while it runs.
                let conv = doc["conv"].as_str().unwrap_or_default().to_string();
                let seq = doc["seq"].as_u64().unwrap_or(0);
                let held = self
                    .convs
                    .get(&conv)
                    .is_some_and(|v| v.received.contains(&seq));
                if !held {
                    let last = self.session_last.entry(conv.clone()).or_default();
                    if seq < *last && !self.syncing.contains(&conv) {
                        return Err(format!(
                            "{who}: {conv} seq {seq} arrived after seq {last} in the same session"
                        ));
                    }
                    *last = seq;
                }
                self.on_msg(doc, self.replays == 0, oracle, durable)?;
            }
            "synced" => {
                if self.replays == 0 {
                    return Err(format!("{who}: synced with no replay under way"));
                }
                self.replays -= 1;
                if self.replays == 0 {
                    self.syncing.clear();
                }
                let more: Vec<String> = doc["more"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["conv"].as_str().map(String::from))
                    .collect();
                if let Some(frame) = self.sync(&more) {
                    replies.push(frame);
                }
            }
            "receipt" => {
                let conv = doc["conv"].as_str().unwrap_or_default().to_string();
                let user = doc["user"].as_str().unwrap_or_default().to_string();
                let kind = doc["kind"].as_str().unwrap_or_default().to_string();
                let seq = doc["seq"].as_u64().unwrap_or(0);
                let known = oracle.known(&user, &conv);
                if seq > known {
                    return Err(format!(
                        "{who}: {kind} receipt of {user} at {conv} seq {seq}, beyond what was delivered to them ({known})"
                    ));
                }
                oracle
                    .on_receipt(&conv, &user, &kind, seq)
                    .map_err(|e| format!("{who}: {e}"))?;
                let last = self.receipts.entry((conv.clone(), user, kind)).or_default();
                if seq < *last {
                    return Err(format!("{who}: receipt went backwards: {doc}"));
                }
                *last = seq;
            }
            "conv" => {
                let conv = doc["conv"].as_str().unwrap_or_default().to_string();
                self.convs.entry(conv).or_default().member = true;
            }
            "member" => {
                if doc["user"] == json!(self.user) {
                    let conv = doc["conv"].as_str().unwrap_or_default().to_string();
                    let view = self.convs.entry(conv).or_default();
                    view.member = doc["change"] == json!("added");
                    if !view.member {
                        view.admin = false;
                    }
                }
            }
            "presence" => {
                let user = doc["user"].as_str().unwrap_or_default();
                let status = doc["status"].as_str().unwrap_or_default();
                oracle
                    .on_presence_event(user, status, doc["last_seen"].as_u64())
                    .map_err(|e| format!("{who}: {e}"))?;
            }
            "reaction" => {
                let conv = doc["conv"].as_str().unwrap_or_default();
                let seq = doc["seq"].as_u64().unwrap_or(0);
                let user = doc["user"].as_str().unwrap_or_default();
                let emoji = doc["emoji"].as_str().unwrap_or_default();
                let on = doc["on"].as_bool().ok_or("reaction without on")?;
                oracle
                    .on_reaction_event(conv, seq, emoji, user, on)
                    .map_err(|e| format!("{who}: {e}"))?;
            }
            "typing" => {}
            other => return Err(format!("{who}: unknown event {other}: {doc}")),
        }
        Ok(())
    }
}
