//! One conversation's state on its home shard: members and roles, the sequence, the
//! dedupe window, cursors, reactions, the seq -> log position index and a cache of the
//! newest encoded messages. It changes only by applying records (see `record.rs`).

use crate::seeded_map::FastMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::record::ConvKind;
use crate::record::StoredMessage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Member {
    pub role: Role,
    /// Join order, to pick the next admin when the last one leaves.
    pub joined: u64,
}

/// (sender, cmid).
type SendKey = (Arc<str>, Box<str>);
/// (seq, ts) of a sequenced send.
type Original = (u64, u64);

/// Recognises resent `(sender, cmid)` pairs. An entry goes once it is both older than the
/// window's age and beyond its count (PROTOCOL.md 7.2: "whichever is larger").
/// In a snapshot only `order` is kept; the index is rebuilt from it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Dedupe {
    /// sender -> cmid -> the original.
    #[serde(skip)]
    by_sender: FastMap<Arc<str>, FastMap<Box<str>, Original>>,
    /// (ts, seq, key), oldest first.
    order: VecDeque<(u64, u64, SendKey)>,
}

impl Dedupe {
    /// The original's (seq, ts), if this is a resend within the window.
    pub fn get(&self, sender: &str, cmid: &str) -> Option<(u64, u64)> {
        self.by_sender.get(sender)?.get(cmid).copied()
    }

    pub fn insert(&mut self, sender: Arc<str>, cmid: &str, seq: u64, ts: u64, window: Window) {
        let key = (sender, Box::<str>::from(cmid));
        self.index(&key, seq, ts);
        self.order.push_back((ts, seq, key));
        while self.order.len() > window.sends {
            let Some((oldest_ts, _, _)) = self.order.front() else {
                break;
            };
            if ts.saturating_sub(*oldest_ts) <= window.age_ms {
                break;
            }
            if let Some((_, _, (sender, cmid))) = self.order.pop_front() {
                if let Some(cmids) = self.by_sender.get_mut(&sender) {
                    cmids.remove(&cmid);
                    if cmids.is_empty() {
                        self.by_sender.remove(&sender);
                    }
                }
            }
        }
    }

    fn index(&mut self, (sender, cmid): &SendKey, seq: u64, ts: u64) {
        self.by_sender
            .entry(sender.clone())
            .or_default()
            .insert(cmid.clone(), (seq, ts));
    }

    /// Rebuild the index from the order after a snapshot was loaded.
    fn reindex(&mut self) {
        self.by_sender.clear();
        let order = std::mem::take(&mut self.order);
        for (ts, seq, key) in &order {
            self.index(key, *seq, *ts);
        }
        self.order = order;
    }
}

/// What a conversation keeps of its messages as they come: the dedupe window, and a
/// cache of the newest `cache` encoded events, plus any not yet durable (the log serves
/// only durable records).
#[derive(Debug, Clone, Copy)]
pub struct MessageKeep {
    pub dedupe: Window,
    pub cache: usize,
    /// Everything up to here is durable.
    pub durable_lsn: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub age_ms: u64,
    pub sends: usize,
}

impl Window {
    pub fn new(age: Duration, sends: usize) -> Self {
        Self {
            age_ms: age.as_millis() as u64,
            sends,
        }
    }
}

/// A snapshot keeps everything but the derived fields (`members_shared`, the cache and
/// the dedupe index), which [`Conversation::restored`] rebuilds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Conversation {
    pub id: Arc<str>,
    pub kind: ConvKind,
    pub title: Option<String>,
    pub members: BTreeMap<Arc<str>, Member>,
    /// The member list as shared for fan-out; rebuilt when membership changes.
    #[serde(skip, default = "no_members")]
    members_shared: Arc<[Arc<str>]>,
    next_join: u64,
    pub last_seq: u64,
    pub last_ts: u64,
    /// Log position of each message: `lsn_by_seq[seq - 1]`.
    lsn_by_seq: Vec<u64>,
    /// The newest messages' encoded `msg` events, ending at `last_seq`.
    #[serde(skip)]
    recent: VecDeque<Arc<str>>,
    pub dedupe: Dedupe,
    /// Delivered cursor per user, per device.
    pub delivered: FastMap<Arc<str>, FastMap<Arc<str>, u64>>,
    /// Per user: the highest delivered cursor of any of their devices.
    pub user_delivered: FastMap<Arc<str>, u64>,
    pub read: FastMap<Arc<str>, u64>,
    /// seq -> emoji -> users.
    pub reactions: FastMap<u64, BTreeMap<String, BTreeSet<Arc<str>>>>,
}

impl Conversation {
    pub fn new(id: Arc<str>, kind: ConvKind, title: Option<String>) -> Self {
        Self {
            id,
            kind,
            title,
            members: BTreeMap::new(),
            members_shared: Arc::from(Vec::new()),
            next_join: 0,
            last_seq: 0,
            last_ts: 0,
            lsn_by_seq: Vec::new(),
            recent: VecDeque::new(),
            dedupe: Dedupe::default(),
            delivered: FastMap::default(),
            user_delivered: FastMap::default(),
            read: FastMap::default(),
            reactions: FastMap::default(),
        }
    }

    /// Rebuild what a snapshot does not hold. The cache starts empty: older messages are
    /// read from the log.
    pub fn restored(&mut self) {
        self.members_changed();
        self.dedupe.reindex();
    }

    pub fn is_member(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.members
            .get(user)
            .is_some_and(|member| member.role == Role::Admin)
    }

    pub fn members_shared(&self) -> Arc<[Arc<str>]> {
        self.members_shared.clone()
    }

    pub fn member_ids(&self) -> Vec<&str> {
        self.members.keys().map(|user| &**user).collect()
    }

    pub fn add_member(&mut self, user: Arc<str>, role: Role) {
        if self.members.contains_key(&user) {
            return;
        }
        let joined = self.next_join;
        self.next_join += 1;
        self.members.insert(user, Member { role, joined });
        self.members_changed();
    }

    /// Remove a member; a group never stays without an admin while it has members: the
    /// longest-standing member is promoted.
    pub fn remove_member(&mut self, user: &str) {
        if self.members.remove(user).is_none() {
            return;
        }
        if self.kind == ConvKind::Group && !self.members.values().any(|m| m.role == Role::Admin) {
            if let Some(next) = self.members.values_mut().min_by_key(|m| m.joined) {
                next.role = Role::Admin;
            }
        }
        self.members_changed();
    }

    fn members_changed(&mut self) {
        self.members_shared = self.members.keys().cloned().collect();
    }

    /// Record a new message: its log position and its encoded event, kept as `keep` says.
    pub fn push_message(
        &mut self,
        message: &StoredMessage,
        lsn: u64,
        event: Arc<str>,
        keep: MessageKeep,
    ) {
        debug_assert_eq!(message.seq, self.last_seq + 1, "seq is gapless");
        self.last_seq = message.seq;
        self.last_ts = self.last_ts.max(message.ts);
        self.lsn_by_seq.push(lsn);
        self.recent.push_back(event);
        while self.recent.len() > keep.cache {
            let oldest_seq = self.last_seq + 1 - self.recent.len() as u64;
            if self
                .lsn_of(oldest_seq)
                .is_none_or(|lsn| lsn > keep.durable_lsn)
            {
                break;
            }
            self.recent.pop_front();
        }
        // The member's own key, shared, rather than a new allocation per message.
        let sender = self
            .members
            .get_key_value(message.from.as_str())
            .map_or_else(|| Arc::from(message.from.as_str()), |(k, _)| k.clone());
        self.dedupe
            .insert(sender, &message.cmid, message.seq, message.ts, keep.dedupe);
    }

    /// The cached encoded event of `seq`, if it is recent enough.
    pub fn cached(&self, seq: u64) -> Option<&Arc<str>> {
        if seq == 0 || seq > self.last_seq {
            return None;
        }
        let from_end = (self.last_seq - seq) as usize;
        let len = self.recent.len();
        (from_end < len).then(|| &self.recent[len - 1 - from_end])
    }

    /// Whether a conversation read from a snapshot taken at `at_lsn` keeps the positions
    /// the sequencer relies on: one per message, increasing, none past the snapshot.
    pub fn check_log_positions(&self, at_lsn: u64) -> Result<(), String> {
        if self.lsn_by_seq.len() as u64 != self.last_seq {
            return Err(format!(
                "conversation {} has {} log positions for {} messages",
                self.id,
                self.lsn_by_seq.len(),
                self.last_seq
            ));
        }
        let increasing = self.lsn_by_seq.windows(2).all(|pair| pair[0] < pair[1]);
        let last = self.lsn_by_seq.last().copied().unwrap_or(0);
        if !increasing || last > at_lsn {
            return Err(format!(
                "conversation {}'s log positions are not increasing up to LSN {at_lsn}",
                self.id
            ));
        }
        Ok(())
    }

    pub fn lsn_of(&self, seq: u64) -> Option<u64> {
        seq.checked_sub(1)
            .and_then(|i| self.lsn_by_seq.get(i as usize))
            .copied()
    }

    /// Advance a device's delivered cursor. Returns the user's new delivered seq when it
    /// moved (a `delivered` receipt is due).
    pub fn advance_delivered(
        &mut self,
        user: &Arc<str>,
        device: &Arc<str>,
        seq: u64,
    ) -> Option<u64> {
        let cursor = self
            .delivered
            .entry(user.clone())
            .or_default()
            .entry(device.clone())
            .or_insert(0);
        if seq <= *cursor {
            return None;
        }
        *cursor = seq;
        let best = self.user_delivered.entry(user.clone()).or_insert(0);
        if seq > *best {
            *best = seq;
            Some(seq)
        } else {
            None
        }
    }

    /// Advance a user's read cursor. Returns true when it moved.
    pub fn advance_read(&mut self, user: &Arc<str>, seq: u64) -> bool {
        let cursor = self.read.entry(user.clone()).or_insert(0);
        if seq <= *cursor {
            return false;
        }
        *cursor = seq;
        true
    }

    pub fn read_seq(&self, user: &str) -> u64 {
        self.read.get(user).copied().unwrap_or(0)
    }

    pub fn delivered_seq(&self, user: &str, device: &str) -> u64 {
        self.delivered
            .get(user)
            .and_then(|devices| devices.get(device))
            .copied()
            .unwrap_or(0)
    }

    /// Set or clear one reaction; true when that changed anything.
    pub fn set_reaction(&mut self, seq: u64, user: Arc<str>, emoji: &str, on: bool) -> bool {
        let by_emoji = self.reactions.entry(seq).or_default();
        let changed = if on {
            by_emoji.entry(emoji.to_string()).or_default().insert(user)
        } else {
            let removed = by_emoji
                .get_mut(emoji)
                .is_some_and(|users| users.remove(&*user));
            if by_emoji.get(emoji).is_some_and(BTreeSet::is_empty) {
                by_emoji.remove(emoji);
            }
            removed
        };
        if by_emoji.is_empty() {
            self.reactions.remove(&seq);
        }
        changed
    }

    pub fn has_reaction(&self, seq: u64, user: &str, emoji: &str) -> bool {
        self.reactions
            .get(&seq)
            .and_then(|by_emoji| by_emoji.get(emoji))
            .is_some_and(|users| users.contains(user))
    }
}

fn no_members() -> Arc<[Arc<str>]> {
    Arc::from(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_keeps_the_larger_of_age_and_count() {
        let window = Window {
            age_ms: 1_000,
            sends: 2,
        };
        let mut dedupe = Dedupe::default();
        let alice: Arc<str> = Arc::from("alice");
        for (seq, ts) in [(1, 0), (2, 10), (3, 20)] {
            dedupe.insert(alice.clone(), &format!("c{seq}"), seq, ts, window);
        }
        // Beyond the count but young: kept.
        assert_eq!(dedupe.get("alice", "c1"), Some((1, 0)));
        dedupe.insert(alice.clone(), "c4", 4, 2_000, window);
        // Old and beyond the count: gone; the last two stay however old.
        assert_eq!(dedupe.get("alice", "c1"), None);
        assert_eq!(dedupe.get("alice", "c2"), None);
        assert_eq!(dedupe.get("alice", "c3"), Some((3, 20)));
        assert_eq!(dedupe.get("alice", "c4"), Some((4, 2_000)));
        assert_eq!(dedupe.get("bob", "c4"), None);
    }

    #[test]
    fn last_admin_leaving_promotes_the_longest_member() {
        let mut conv = Conversation::new(Arc::from("g"), ConvKind::Group, None);
        conv.add_member(Arc::from("zed"), Role::Admin);
        conv.add_member(Arc::from("bob"), Role::Member);
        conv.add_member(Arc::from("amy"), Role::Member);
        conv.remove_member("zed");
        assert!(conv.is_admin("bob"));
        assert!(!conv.is_admin("amy"));
    }

    #[test]
    fn cursors_never_go_back() {
        let mut conv = Conversation::new(Arc::from("g"), ConvKind::Group, None);
        let (u, phone, laptop): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("u"), Arc::from("phone"), Arc::from("laptop"));
        assert_eq!(conv.advance_delivered(&u, &phone, 5), Some(5));
        assert_eq!(conv.advance_delivered(&u, &phone, 3), None);
        // Another device catching up does not move the user's receipt.
        assert_eq!(conv.advance_delivered(&u, &laptop, 4), None);
        assert_eq!(conv.advance_delivered(&u, &laptop, 6), Some(6));
        assert!(conv.advance_read(&u, 2));
        assert!(!conv.advance_read(&u, 1));
        assert_eq!(conv.delivered_seq("u", "phone"), 5);
    }
}
