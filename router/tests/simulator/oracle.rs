//! The invariants. The oracle reads two sources of truth: every shard's log as the
//! sequencer wrote it (record by record, as appended and again after each recovery),
//! and everything the clients were told. A violation is a `String` saying what broke.

use std::collections::{BTreeMap, BTreeSet};

use parley_router::ownership::conversation_home;
use parley_router::record::{ChatRecord, MemberChange};

pub type Violation = String;

/// A message as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub from: String,
    pub cmid: String,
    pub body: String,
}

/// One conversation as its home's log tells it.
#[derive(Debug, Default)]
struct ConvLog {
    /// Index `seq - 1`: the message and the LSN of its record.
    messages: Vec<(Fact, u64)>,
    /// (last seq before the change, members from then on).
    members: Vec<(u64, BTreeSet<String>)>,
    cmids: BTreeMap<(String, String), u64>,
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
    pub records_checked: u64,
    pub messages_seen: u64,
}

impl Oracle {
    pub fn new(shards: usize) -> Self {
        Self {
            shards,
            ..Self::default()
        }
    }

    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn home(&self, conv: &str) -> usize {
        conversation_home(conv, self.shards as u32) as usize
    }

    /// A record the sequencer of `shard` appended (or recovery replayed) at `lsn`.
    pub fn on_record(&mut self, shard: usize, lsn: u64, payload: &[u8]) -> Result<(), Violation> {
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
            ChatRecord::Cursors(_) | ChatRecord::Reaction { .. } | ChatRecord::LastSeen { .. } => {}
        }
        Ok(())
    }

    /// Shard `shard` restarted: forget what its log said before, relearn it from what
    /// survived, and check that everything any client was told is still there.
    pub fn on_recovered(&mut self, shard: usize, payloads: &[Vec<u8>]) -> Result<(), Violation> {
        let shards = self.shards;
        self.convs
            .retain(|conv, _| conversation_home(conv, shards as u32) as usize != shard);
        for (i, payload) in payloads.iter().enumerate() {
            self.on_record(shard, i as u64 + 1, payload)?;
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
