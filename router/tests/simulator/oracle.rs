//! The invariants. The oracle reads two sources of truth: every shard's log as the
//! sequencer wrote it (record by record, as appended and again after each recovery),
//! and everything the clients were told. A violation is a `String` saying what broke.

use std::collections::{BTreeMap, BTreeSet};

use parley_router::ownership::{conversation_home, user_home};
use parley_router::record::{ChatRecord, MemberChange};

pub type Violation = String;

/// A message as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub from: String,
    pub cmid: String,
    pub body: String,
}

/// (LSN, value) of each logged change of one cursor or one reaction, in log order.
type Changes<T> = Vec<(u64, T)>;

/// One conversation as its home's log tells it.
#[derive(Debug, Default)]
struct ConvLog {
    /// Index `seq - 1`: the message and the LSN of its record.
    messages: Vec<(Fact, u64)>,
    /// (last seq before the change, members from then on).
    members: Vec<(u64, BTreeSet<String>)>,
    /// The LSN of each entry of `members` (0 for none: the conversation's creation is
    /// its first record, so its LSN is there).
    members_lsn: Vec<u64>,
    cmids: BTreeMap<(String, String), u64>,
    /// (user, device or `None` for the read cursor) -> (LSN, seq) of each logged advance.
    cursors: BTreeMap<(String, Option<String>), Changes<u64>>,
    /// (seq, emoji, user) -> (LSN, on) of each logged reaction change.
    reactions: BTreeMap<(u64, String, String), Changes<bool>>,
}

impl ConvLog {
    /// Members when message `seq` was sequenced.
    fn members_at(&self, seq: u64) -> Option<&BTreeSet<String>> {
        self.members
            .iter()
            .rev()
            .find(|(before, _)| *before < seq)
            .map(|(_, members)| members)
    }

    /// Whether `user` was a member at `seq` or at any time after it (a member may page
    /// back through history older than their joining).
    fn member_at_or_after(&self, seq: u64, user: &str) -> bool {
        let first = self
            .members
            .iter()
            .rposition(|(before, _)| *before < seq)
            .unwrap_or(0);
        self.members[first..].iter().any(|(_, m)| m.contains(user))
    }

    /// Whether `user` was a member at some time after the record at `lsn` (in the state
    /// that record left, or in one logged since).
    fn member_since_lsn(&self, lsn: u64, user: &str) -> bool {
        let first = self
            .members_lsn
            .iter()
            .rposition(|at| *at <= lsn)
            .unwrap_or(0);
        self.members[first..].iter().any(|(_, m)| m.contains(user))
    }

    fn members_now(&self) -> Option<&BTreeSet<String>> {
        self.members.last().map(|(_, m)| m)
    }

    /// A cursor as the log holds it up to `lsn`.
    fn cursor_at(&self, user: &str, device: Option<&str>, lsn: u64) -> u64 {
        self.cursors
            .get(&(user.to_string(), device.map(str::to_string)))
            .and_then(|advances| advances.iter().rev().find(|(at, _)| *at <= lsn))
            .map_or(0, |(_, seq)| *seq)
    }

    /// The highest delivered cursor of any device of `user`, as the log holds it up to `lsn`.
    fn delivered_at(&self, user: &str, lsn: u64) -> u64 {
        self.cursors
            .iter()
            .filter(|((u, device), _)| u == user && device.is_some())
            .filter_map(|(_, advances)| advances.iter().rev().find(|(at, _)| *at <= lsn))
            .map(|(_, seq)| *seq)
            .max()
            .unwrap_or(0)
    }

    fn reaction_at(&self, seq: u64, emoji: &str, user: &str, lsn: u64) -> bool {
        self.reactions
            .get(&(seq, emoji.to_string(), user.to_string()))
            .and_then(|changes| changes.iter().rev().find(|(at, _)| *at <= lsn))
            .is_some_and(|(_, on)| *on)
    }

    /// Whether message `seq`'s reactions (emoji, user) were exactly `shown` at some LSN
    /// in `from..=to`.
    fn reactions_were(
        &self,
        seq: u64,
        shown: &BTreeSet<(String, String)>,
        from: u64,
        to: u64,
    ) -> bool {
        let keys = self
            .reactions
            .range((seq, String::new(), String::new())..)
            .take_while(|((s, _, _), _)| *s == seq);
        let mut at_from = BTreeSet::new();
        // (LSN, key, on) of the changes within the window, in log order.
        let mut later = Vec::new();
        for ((_, emoji, user), changes) in keys {
            let key = (emoji.clone(), user.clone());
            if changes
                .iter()
                .rev()
                .find(|(at, _)| *at <= from)
                .is_some_and(|(_, on)| *on)
            {
                at_from.insert(key.clone());
            }
            for (at, on) in changes {
                if *at > from && *at <= to {
                    later.push((*at, key.clone(), *on));
                }
            }
        }
        later.sort();
        let mut state = at_from;
        if &state == shown {
            return true;
        }
        for (_, key, on) in later {
            if on {
                state.insert(key);
            } else {
                state.remove(&key);
            }
            if &state == shown {
                return true;
            }
        }
        false
    }
}

/// What a cursor means: a user's read position, or one device's delivered position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CursorKey {
    Read {
        conv: String,
        user: String,
    },
    Delivered {
        conv: String,
        user: String,
        device: String,
    },
}

#[derive(Debug, Default)]
pub struct Oracle {
    shards: usize,
    convs: BTreeMap<String, ConvLog>,
    /// Every message a client was told of (an `ok`, an event, a history page).
    observed: BTreeMap<(String, u64), Fact>,
    /// Cursor positions the system promised or showed: (when, highest up to then).
    cursors: BTreeMap<CursorKey, Vec<(u64, u64)>>,
    /// (user, conv) -> the highest seq some client of that user holds.
    known: BTreeMap<(String, String), u64>,
    /// A logical clock: each observation and request takes the next tick.
    clock: u64,
    /// Per shard: every payload appended since its last recovery (LSN 1 first), to check
    /// that recovery gives back what was appended, and its durable LSN.
    appended: Vec<Vec<Vec<u8>>>,
    durable: Vec<u64>,
    /// Per shard: the LSN of the last cursor record in its log (0: none).
    last_cursors_lsn: Vec<u64>,
    /// user -> (LSN, ts) of each last seen in their home's log.
    last_seen: BTreeMap<String, Vec<(u64, u64)>>,
    /// user -> last seen times the home kept in memory only (its log was full) since it
    /// last recovered.
    last_seen_in_memory: BTreeMap<String, BTreeSet<u64>>,
    /// Every (user, last seen) ever written or kept in memory, and each user's latest.
    last_seen_ever: BTreeSet<(String, u64)>,
    last_seen_latest: BTreeMap<String, u64>,
    pub records_checked: u64,
    pub messages_seen: u64,
    /// What the checks of cursors, reactions and last seen looked at.
    pub cursor_records: u64,
    pub reaction_records: u64,
    pub last_seen_records: u64,
    pub cursors_checked: u64,
    pub reactions_checked: u64,
    pub presence_checked: u64,
}

impl Oracle {
    pub fn new(shards: usize) -> Self {
        Self {
            shards,
            appended: vec![Vec::new(); shards],
            durable: vec![0; shards],
            last_cursors_lsn: vec![0; shards],
            ..Self::default()
        }
    }

    /// The last LSN `shard` appended (the oracle has seen every append so far).
    pub fn last_lsn(&self, shard: usize) -> u64 {
        self.appended[shard].len() as u64
    }

    /// `shard`'s log is durable up to `lsn`.
    pub fn on_durable(&mut self, shard: usize, lsn: u64) {
        self.durable[shard] = self.durable[shard].max(lsn);
    }

    pub fn conv_home(&self, conv: &str) -> usize {
        self.home(conv)
    }

    pub fn user_home(&self, user: &str) -> usize {
        user_home(user, self.shards as u32) as usize
    }

    /// `shard`'s log refused a record (it was full). A last seen is then kept in memory
    /// only (docs/protocol.md 9.15); anything else is retried or answered `unavailable`.
    pub fn on_refused(&mut self, shard: usize, payload: &[u8]) -> Result<(), Violation> {
        let record = ChatRecord::decode(payload)
            .map_err(|e| format!("shard {shard}: undecodable refused record: {e}"))?;
        if let ChatRecord::LastSeen { user, ts } = record {
            self.last_seen_moves(shard, &user, ts)?;
            self.last_seen_in_memory.entry(user).or_default().insert(ts);
        }
        Ok(())
    }

    /// A new last seen of `user` (written or kept in memory): on their home, and never
    /// older than one before (time only moves forward, across crashes too).
    fn last_seen_moves(&mut self, shard: usize, user: &str, ts: u64) -> Result<(), Violation> {
        if self.user_home(user) != shard {
            return Err(format!(
                "shard {shard} recorded the last seen of {user}, whose home is shard {}",
                self.user_home(user)
            ));
        }
        if let Some(latest) = self.last_seen_latest.get(user) {
            if ts < *latest {
                return Err(format!(
                    "last seen of {user} went backwards: {ts} after {latest}"
                ));
            }
        }
        self.last_seen_latest.insert(user.to_string(), ts);
        self.last_seen_ever.insert((user.to_string(), ts));
        Ok(())
    }

    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn home(&self, conv: &str) -> usize {
        conversation_home(conv, self.shards as u32) as usize
    }

    /// A record the sequencer of `shard` appended at `lsn`.
    pub fn on_record(&mut self, shard: usize, lsn: u64, payload: &[u8]) -> Result<(), Violation> {
        if lsn != self.last_lsn(shard) + 1 {
            return Err(format!(
                "shard {shard} appended LSN {lsn} after LSN {}",
                self.last_lsn(shard)
            ));
        }
        self.appended[shard].push(payload.to_vec());
        self.apply(shard, lsn, payload, true)
    }

    /// A record of `shard`'s log at `lsn`: appended now (`fresh`) or replayed by recovery.
    fn apply(
        &mut self,
        shard: usize,
        lsn: u64,
        payload: &[u8],
        fresh: bool,
    ) -> Result<(), Violation> {
        self.records_checked += 1;
        let record = ChatRecord::decode(payload)
            .map_err(|e| format!("shard {shard} LSN {lsn}: undecodable record: {e}"))?;
        match record {
            ChatRecord::ConvCreated { conv, members, .. } => {
                if self.home(&conv) != shard {
                    return Err(format!("{conv} created on shard {shard}, not its home"));
                }
                if self.convs.contains_key(&conv) {
                    return Err(format!("{conv} created twice (LSN {lsn})"));
                }
                let log = ConvLog {
                    members: vec![(0, members.into_iter().collect())],
                    members_lsn: vec![lsn],
                    ..ConvLog::default()
                };
                self.convs.insert(conv, log);
            }
            ChatRecord::Members {
                conv,
                change,
                users,
                ..
            } => {
                let log = self
                    .convs
                    .get_mut(&conv)
                    .ok_or_else(|| format!("members of unknown {conv} (LSN {lsn})"))?;
                let mut members = log.members.last().map(|m| m.1.clone()).unwrap_or_default();
                for user in users {
                    match change {
                        MemberChange::Added => members.insert(user),
                        MemberChange::Removed | MemberChange::Left => members.remove(&user),
                    };
                }
                let last_seq = log.messages.len() as u64;
                log.members.push((last_seq, members));
                log.members_lsn.push(lsn);
            }
            ChatRecord::Message(message) => {
                let conv = message.conv.clone();
                let log = self
                    .convs
                    .get_mut(&conv)
                    .ok_or_else(|| format!("message to unknown {conv} (LSN {lsn})"))?;
                let expected = log.messages.len() as u64 + 1;
                if message.seq != expected {
                    return Err(format!(
                        "{conv}: seq {} sequenced where {expected} was next (a gap or a repeat)",
                        message.seq
                    ));
                }
                let key = (message.from.clone(), message.cmid.clone());
                if let Some(first) = log.cmids.get(&key) {
                    return Err(format!(
                        "{conv}: cmid {} of {} sequenced twice, as seq {first} and {}",
                        message.cmid, message.from, message.seq
                    ));
                }
                let members = log.members_at(message.seq);
                if !members.is_some_and(|m| m.contains(&message.from)) {
                    return Err(format!(
                        "{conv}: seq {} sequenced from {}, who is not a member",
                        message.seq, message.from
                    ));
                }
                log.cmids.insert(key, message.seq);
                log.messages.push((
                    Fact {
                        from: message.from,
                        cmid: message.cmid,
                        body: message.body,
                    },
                    lsn,
                ));
            }
            ChatRecord::Cursors(advances) => {
                self.cursor_records += 1;
                let since = self.last_cursors_lsn[shard];
                self.last_cursors_lsn[shard] = lsn;
                for advance in &advances {
                    let conv = &advance.conv;
                    let what = format!("LSN {lsn}: cursor {advance:?}");
                    if self.home(conv) != shard {
                        return Err(format!("{what} written on shard {shard}, not its home"));
                    }
                    let log = self
                        .convs
                        .get_mut(conv)
                        .ok_or_else(|| format!("{what}: no log has {conv}"))?;
                    let last_seq = log.messages.len() as u64;
                    if advance.seq == 0 || advance.seq > last_seq {
                        return Err(format!("{what}: beyond {conv}'s last seq {last_seq}"));
                    }
                    // The advances were made since the previous cursor record (they are
                    // written at the end of the turn that made them, or retried until
                    // one is written), by a member.
                    if !log.member_since_lsn(since, &advance.user) {
                        return Err(format!(
                            "{what}: {} was no member of {conv} since LSN {since}",
                            advance.user
                        ));
                    }
                    let key = (advance.user.clone(), advance.device.clone());
                    let advances = log.cursors.entry(key).or_default();
                    if let Some((at, before)) = advances.last() {
                        if advance.seq <= *before {
                            return Err(format!(
                                "{what}: the cursor was {before} (LSN {at}): a cursor record must move it forward"
                            ));
                        }
                    }
                    advances.push((lsn, advance.seq));
                }
                // Reading implies receiving (9.14): a read cursor never runs ahead of
                // the user's delivered position.
                for advance in advances.iter().filter(|a| a.device.is_none()) {
                    let log = &self.convs[&advance.conv];
                    let delivered = log.delivered_at(&advance.user, lsn);
                    if delivered < advance.seq {
                        return Err(format!(
                            "LSN {lsn}: {} read {} up to {} but was delivered only up to {delivered}",
                            advance.user, advance.conv, advance.seq
                        ));
                    }
                }
            }
            ChatRecord::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            } => {
                self.reaction_records += 1;
                let what =
                    format!("LSN {lsn}: {user}'s reaction {emoji:?} on {conv} seq {seq} set {on}");
                if self.home(&conv) != shard {
                    return Err(format!("{what} written on shard {shard}, not its home"));
                }
                let log = self
                    .convs
                    .get_mut(&conv)
                    .ok_or_else(|| format!("{what}: no log has {conv}"))?;
                if seq == 0 || seq > log.messages.len() as u64 {
                    return Err(format!(
                        "{what}: no such message (last seq {})",
                        log.messages.len()
                    ));
                }
                if !log.members_now().is_some_and(|m| m.contains(&user)) {
                    return Err(format!("{what}: {user} is no member"));
                }
                if log.reaction_at(seq, &emoji, &user, lsn) == on {
                    return Err(format!("{what}: it was already (only changes are logged)"));
                }
                log.reactions
                    .entry((seq, emoji, user))
                    .or_default()
                    .push((lsn, on));
            }
            ChatRecord::LastSeen { user, ts } => {
                self.last_seen_records += 1;
                if fresh {
                    self.last_seen_moves(shard, &user, ts)?;
                } else if self.user_home(&user) != shard {
                    return Err(format!(
                        "LSN {lsn}: last seen of {user} replayed on shard {shard}, not its home"
                    ));
                }
                let logged = self.last_seen.entry(user.clone()).or_default();
                if let Some((at, before)) = logged.last() {
                    if ts < *before {
                        return Err(format!(
                            "LSN {lsn}: last seen of {user} is {ts}, older than {before} (LSN {at})"
                        ));
                    }
                }
                logged.push((lsn, ts));
            }
        }
        Ok(())
    }

    /// Shard `shard` restarted: forget what its log said before, relearn it from what
    /// survived, and check that everything any client was told is still there.
    pub fn on_recovered(&mut self, shard: usize, payloads: &[Vec<u8>]) -> Result<(), Violation> {
        // Recovery gives back what was appended: every durable record, unchanged (and
        // perhaps some appended after them), nothing else.
        let appended = std::mem::take(&mut self.appended[shard]);
        let durable = self.durable[shard];
        if (payloads.len() as u64) < durable {
            return Err(format!(
                "after the crash shard {shard}'s log ends at LSN {}: LSN {}..={durable}, durable, is gone",
                payloads.len(),
                payloads.len() + 1
            ));
        }
        if payloads.len() > appended.len() {
            return Err(format!(
                "after the crash shard {shard}'s log has {} records; only {} were appended",
                payloads.len(),
                appended.len()
            ));
        }
        if let Some(i) = (0..payloads.len()).find(|&i| payloads[i] != appended[i]) {
            return Err(format!(
                "after the crash shard {shard}'s LSN {} is not the record appended there",
                i + 1
            ));
        }
        self.appended[shard] = payloads.to_vec();
        self.durable[shard] = payloads.len() as u64;
        self.last_cursors_lsn[shard] = 0;
        let shards = self.shards;
        self.convs
            .retain(|conv, _| conversation_home(conv, shards as u32) as usize != shard);
        self.last_seen
            .retain(|user, _| user_home(user, shards as u32) as usize != shard);
        self.last_seen_in_memory
            .retain(|user, _| user_home(user, shards as u32) as usize != shard);
        for (i, payload) in payloads.iter().enumerate() {
            self.apply(shard, i as u64 + 1, payload, false)?;
        }
        for ((conv, seq), fact) in &self.observed {
            if self.home(conv) != shard {
                continue;
            }
            let found = self
                .convs
                .get(conv)
                .and_then(|log| log.messages.get(*seq as usize - 1));
            match found {
                Some((stored, _)) if stored == fact => {}
                Some((stored, _)) => {
                    return Err(format!(
                        "after the crash {conv} seq {seq} is {stored:?}; clients were told {fact:?}"
                    ))
                }
                None => {
                    return Err(format!(
                        "after the crash {conv} seq {seq} is gone; clients were told {fact:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    /// A client was told of message `(conv, seq)`: it must be durable on the home's log
    /// (`durable_lsn` of the home), with this content, and `user` must be allowed it.
    #[allow(clippy::too_many_arguments)]
    pub fn on_message_seen(
        &mut self,
        user: &str,
        conv: &str,
        seq: u64,
        mid: &str,
        fact: Fact,
        live: bool,
        home_durable_lsn: Option<u64>,
    ) -> Result<(), Violation> {
        let log = self
            .convs
            .get(conv)
            .ok_or_else(|| format!("{user} was told of {conv} seq {seq}; no log has {conv}"))?;
        let (stored, lsn) = log
            .messages
            .get((seq as usize).wrapping_sub(1))
            .ok_or_else(|| {
                format!(
                    "{user} was told of {conv} seq {seq}; the log has {} messages",
                    log.messages.len()
                )
            })?;
        if stored != &fact {
            return Err(format!(
                "{user} was told {conv} seq {seq} is {fact:?}; the log says {stored:?}"
            ));
        }
        if mid != format!("{conv}#{seq}") {
            return Err(format!("{conv} seq {seq} carries mid {mid}"));
        }
        if let Some(durable) = home_durable_lsn {
            if *lsn > durable {
                return Err(format!(
                    "{user} was told of {conv} seq {seq} (LSN {lsn}) before it was durable (durable LSN {durable})"
                ));
            }
        }
        let allowed = if live {
            log.members_at(seq).is_some_and(|m| m.contains(user))
        } else {
            log.member_at_or_after(seq, user)
        };
        if !allowed {
            let how = if live { "live" } else { "in a replay" };
            return Err(format!(
                "{user} received {conv} seq {seq} {how} without being a member"
            ));
        }
        self.messages_seen += 1;
        self.observed.insert((conv.to_string(), seq), fact);
        let known = self
            .known
            .entry((user.to_string(), conv.to_string()))
            .or_default();
        *known = (*known).max(seq);
        Ok(())
    }

    fn conv_log(&self, conv: &str, what: &dyn Fn() -> String) -> Result<&ConvLog, Violation> {
        self.convs
            .get(conv)
            .ok_or_else(|| format!("{}: no log has {conv}", what()))
    }

    /// An `ack` (`device` given) or a `read` (`None`) of `user` was answered `ok`: the
    /// answer leaves once the cursor record is durable (9.14), so the home's durable log
    /// holds that cursor at `seq` or beyond.
    pub fn on_cursor_acked(
        &mut self,
        conv: &str,
        user: &str,
        device: Option<&str>,
        seq: u64,
    ) -> Result<(), Violation> {
        self.cursors_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || {
            format!(
                "{user}'s {} of {conv} up to {seq} was answered ok",
                if device.is_some() { "ack" } else { "read" }
            )
        };
        let logged = self.conv_log(conv, &what)?.cursor_at(user, device, durable);
        if logged < seq {
            return Err(format!(
                "{}, yet the durable log (LSN ..={durable}) holds that cursor at {logged}",
                what()
            ));
        }
        Ok(())
    }

    /// A `receipt` event (not ephemeral: it waits for the log) says that `user`'s
    /// delivered position or read cursor reached `seq`: the durable log must say so too.
    pub fn on_receipt(
        &mut self,
        conv: &str,
        user: &str,
        kind: &str,
        seq: u64,
    ) -> Result<(), Violation> {
        self.cursors_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || format!("a {kind} receipt of {user} in {conv} at {seq}");
        let log = self.conv_log(conv, &what)?;
        let logged = match kind {
            "delivered" => log.delivered_at(user, durable),
            "read" => log.cursor_at(user, None, durable),
            _ => return Err(format!("{}: unknown kind", what())),
        };
        if logged < seq {
            return Err(format!(
                "{}, yet the durable log (LSN ..={durable}) holds it at {logged}",
                what()
            ));
        }
        Ok(())
    }

    /// A cursor a `conv.list` or `sync` answer shows: the answer leaves once the log is
    /// durable up to everything the home had appended, so it is never beyond the durable
    /// log's cursor.
    pub fn on_cursor_listed(
        &mut self,
        conv: &str,
        user: &str,
        device: Option<&str>,
        seq: u64,
    ) -> Result<(), Violation> {
        self.cursors_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || format!("{user} was shown {conv}'s cursor {device:?} at {seq}");
        let logged = self.conv_log(conv, &what)?.cursor_at(user, device, durable);
        if seq > logged {
            return Err(format!(
                "{}, beyond the durable log's {logged} (LSN ..={durable})",
                what()
            ));
        }
        Ok(())
    }

    /// A `react` was answered `ok`: at some point between the request (when the home's
    /// log ended at `asked_lsn`) and now, the durable log had the reaction as asked.
    #[allow(clippy::too_many_arguments)]
    pub fn on_reaction_acked(
        &mut self,
        conv: &str,
        seq: u64,
        emoji: &str,
        user: &str,
        on: bool,
        asked_lsn: u64,
    ) -> Result<(), Violation> {
        self.reactions_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || format!("{user}'s react {emoji:?} on {conv} seq {seq} set {on}, answered ok");
        if durable < asked_lsn {
            return Err(format!("{} before its home's log was durable up to the request's LSN {asked_lsn} (durable {durable})", what()));
        }
        let log = self.conv_log(conv, &what)?;
        let held = log.reaction_at(seq, emoji, user, asked_lsn) == on
            || log
                .reactions
                .get(&(seq, emoji.to_string(), user.to_string()))
                .is_some_and(|changes| {
                    changes
                        .iter()
                        .any(|(at, value)| *at > asked_lsn && *at <= durable && *value == on)
                });
        if !held {
            return Err(format!(
                "{}, yet the durable log never had it so in LSN {asked_lsn}..={durable}",
                what()
            ));
        }
        Ok(())
    }

    /// A `reaction` event (it waits for the log): its change is a durable record.
    pub fn on_reaction_event(
        &mut self,
        conv: &str,
        seq: u64,
        emoji: &str,
        user: &str,
        on: bool,
    ) -> Result<(), Violation> {
        self.reactions_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || format!("a reaction event: {user} set {emoji:?} on {conv} seq {seq} {on}");
        let logged = self
            .conv_log(conv, &what)?
            .reactions
            .get(&(seq, emoji.to_string(), user.to_string()))
            .is_some_and(|changes| {
                changes
                    .iter()
                    .any(|(at, value)| *at <= durable && *value == on)
            });
        if !logged {
            return Err(format!(
                "{}: no such durable record (LSN ..={durable})",
                what()
            ));
        }
        Ok(())
    }

    /// A history page showed message `seq`'s reactions as `shown` (emoji, user): they
    /// were exactly that in the home's log at some LSN from the request (`asked_lsn`) to
    /// the durable LSN now.
    pub fn on_reactions_shown(
        &mut self,
        conv: &str,
        seq: u64,
        shown: &BTreeSet<(String, String)>,
        asked_lsn: u64,
    ) -> Result<(), Violation> {
        self.reactions_checked += 1;
        let durable = self.durable[self.home(conv)];
        let what = || format!("history showed {conv} seq {seq} with reactions {shown:?}");
        if durable < asked_lsn {
            return Err(format!("{} before its home's log was durable up to the request's LSN {asked_lsn} (durable {durable})", what()));
        }
        let log = self.conv_log(conv, &what)?;
        if !log.reactions_were(seq, shown, asked_lsn, durable) {
            let logged: Vec<_> = log
                .reactions
                .range((seq, String::new(), String::new())..)
                .take_while(|((s, _, _), _)| *s == seq)
                .collect();
            return Err(format!(
                "{}; the log never had them so in LSN {asked_lsn}..={durable}: {logged:?}",
                what()
            ));
        }
        Ok(())
    }

    /// `presence.get` showed `user` (asked when their home's log ended at `asked_lsn`).
    /// Its answer waits for the log: an offline user's `last_seen` is one their home
    /// wrote durably (or kept in memory while its log was full, 9.15), never older than
    /// one logged before the request, and not missing if one was; an online user has none.
    pub fn on_presence_shown(
        &mut self,
        user: &str,
        status: &str,
        last_seen: Option<u64>,
        asked_lsn: u64,
    ) -> Result<(), Violation> {
        let home = self.user_home(user);
        let durable = self.durable[home];
        let logged = self
            .last_seen
            .get(user)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let what = format!("presence.get showed {user} {status} with last seen {last_seen:?}");
        match status {
            "online" if last_seen.is_none() => return Ok(()),
            "offline" => {}
            _ => return Err(what),
        }
        self.presence_checked += 1;
        let floor = logged.iter().rev().find(|(at, _)| *at <= asked_lsn);
        if let Some((at, floor)) = floor {
            if last_seen.is_none_or(|ts| ts < *floor) {
                return Err(format!(
                    "{what}; its home logged {floor} (LSN {at}) before the request"
                ));
            }
        }
        if let Some(ts) = last_seen {
            let written = logged.iter().any(|(at, t)| *t == ts && *at <= durable);
            let in_memory = self
                .last_seen_in_memory
                .get(user)
                .is_some_and(|times| times.contains(&ts));
            if !written && !in_memory {
                return Err(format!(
                    "{what}; its home never wrote that durably (LSN ..={durable}: {logged:?}) nor kept it in memory"
                ));
            }
        }
        Ok(())
    }

    /// A `presence` event (ephemeral: it does not wait for the log): an offline one
    /// carries a last seen the user's home recorded (logged or kept in memory).
    pub fn on_presence_event(
        &mut self,
        user: &str,
        status: &str,
        last_seen: Option<u64>,
    ) -> Result<(), Violation> {
        let what = format!("a presence event: {user} {status}, last seen {last_seen:?}");
        match (status, last_seen) {
            ("online", None) => Ok(()),
            ("offline", Some(ts)) => {
                self.presence_checked += 1;
                if self.last_seen_ever.contains(&(user.to_string(), ts)) {
                    Ok(())
                } else {
                    Err(format!("{what}: the home never recorded that last seen"))
                }
            }
            _ => Err(what),
        }
    }

    /// The highest seq some client of `user` holds in `conv`.
    pub fn known(&self, user: &str, conv: &str) -> u64 {
        self.known
            .get(&(user.to_string(), conv.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Messages the home's log holds for `conv` (for a final comparison).
    pub fn last_seq(&self, conv: &str) -> Option<u64> {
        self.convs.get(conv).map(|log| log.messages.len() as u64)
    }

    pub fn is_member_now(&self, conv: &str, user: &str) -> bool {
        self.convs
            .get(conv)
            .and_then(|log| log.members.last())
            .is_some_and(|(_, m)| m.contains(user))
    }

    pub fn conversations(&self) -> impl Iterator<Item = &String> {
        self.convs.keys()
    }

    /// The system promised (an `ok`) or showed (a list, a receipt) cursor `key` at
    /// `value`. Anything shown for a request sent after this must not be lower.
    pub fn on_cursor_promised(&mut self, key: CursorKey, value: u64) {
        let at = self.tick();
        let history = self.cursors.entry(key).or_default();
        let highest = history.last().map_or(value, |(_, max)| value.max(*max));
        history.push((at, highest));
    }

    /// A cursor shown in answer to a request sent at `asked_at`.
    pub fn on_cursor_shown(
        &mut self,
        key: CursorKey,
        value: u64,
        asked_at: u64,
    ) -> Result<(), Violation> {
        // (when, highest so far): ticks only grow, so the floor is one binary search away.
        let history = self
            .cursors
            .get(&key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let before = history.partition_point(|(at, _)| *at < asked_at);
        let floor = before.checked_sub(1).map_or(0, |i| history[i].1);
        if value < floor {
            return Err(format!(
                "cursor {key:?} went backwards: shown {value} after {floor} was promised or shown"
            ));
        }
        self.on_cursor_promised(key, value);
        Ok(())
    }
}
