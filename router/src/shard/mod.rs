//! One shard's chat core, sans-IO: the sessions it holds, the conversations and users
//! homed on it, and everything that crosses the mesh.
//!
//! The driver feeds it client commands, mesh entries, clock ticks and the log's durable
//! LSN, and collects what it produced: entries for other shards (`outgoing`) and
//! documents for local sessions (`take_local`). Every input ends a *turn*: cursor
//! advances of the turn are written together (one record, or as many as the log's
//! record limit needs), and the turn's replies and events are
//! held until the log is durable up to the last record written so far, so nothing is
//! acknowledged or delivered before it is durable (PROTOCOL.md 7.1), and outputs leave
//! in the order they were made.
//!
//! - `gather`: questions every shard answers (`conv.list`, `sync`, `resume`,
//!   `presence.get`), scattered and gathered.
//! - `presence`: which shards hold whose sessions, and online/offline announcements.
//! - `outputs`: the end of a turn, outputs held for durability, and their routing.
//! - `tracked_log`: the log as the core holds it, remembering the last LSN appended.

mod gather;
mod outputs;
mod presence;
mod tracked_log;

use crate::seeded_map::{FastMap, Seeds};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::chat_log::{ChatLog, LogError, MIN_RECORD_BYTES};
use crate::clock::Now;
use crate::command::{self, ChatCommand};
use crate::directory::{Directory, MAX_SHARDS};
use crate::limits::ChatLimits;
use crate::output::{Caller, Delivery, Origin, Output, Part};
use crate::ownership::conversation_home;
use crate::protocol::Doc;
use crate::record::ConvKind;
use crate::search::SearchRequest;
use crate::sequencer::{ApplyError, HomeCommand, Sequencer};

use gather::{Gather, GatherKind, Replaying};
pub use gather::{Query, Scatter, REPLAY_HOLD_MAX};
pub use outputs::SHED_EPHEMERAL_BACKLOG;
use tracked_log::TrackedLog;

/// What crosses a ring between shards.
#[derive(Debug)]
pub enum MeshEntry {
    /// A command for a conversation homed on the receiver.
    Command(Box<HomeCommand>),
    /// A question every (or some) shard answers with a [`Part`].
    Scatter(Box<Scatter>),
    /// A reply or replayed message for one session on the receiver.
    ToSession { conn: u64, doc: Doc },
    /// An event for the receiver's live sessions of some users.
    Deliver(Arc<Delivery>),
    /// A part of an answer the receiver is gathering.
    Part { gather: u64, part: Box<Part> },
    /// The sender now holds (or no longer holds) live sessions of `user`.
    Directory { user: Arc<str>, present: bool },
    /// `user` came online or went offline: tell their co-members homed on the receiver.
    Presence {
        user: Arc<str>,
        online: bool,
        last_seen: Option<u64>,
    },
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardCoreStats {
    pub shed_ephemeral: u64,
}

pub struct ShardCore {
    shard: usize,
    shards: usize,
    limits: Arc<ChatLimits>,
    sequencer: Sequencer,
    directory: Directory,
    log: TrackedLog,
    durable_lsn: u64,
    /// conn -> user, for the sessions of this shard.
    sessions: FastMap<u64, Arc<str>>,
    /// user -> their sessions on this shard.
    sessions_of: FastMap<Arc<str>, Vec<u64>>,
    gathers: FastMap<u64, Gather>,
    next_gather: u64,
    /// Sessions with a sync or resume replay under way: live events for them wait here,
    /// so a replay is never overtaken by a newer live message (PROTOCOL.md 7.3).
    replaying: FastMap<u64, Replaying>,
    ids: Seeds,
    next_id: u64,
    /// The sequencer's outputs of the current turn.
    turn: Vec<Output>,
    /// Outputs waiting for the log: (LSN they need durable, output), in order.
    held: VecDeque<(u64, Output)>,
    outgoing: Vec<VecDeque<MeshEntry>>,
    /// (conn, document, ephemeral) for local sessions.
    local: Vec<(u64, Doc, bool)>,
    /// Searches whose conversations are gathered, for the driver's search service.
    searches: Vec<SearchRequest>,
    failed: Option<LogError>,
    pub stats: ShardCoreStats,
}

impl ShardCore {
    pub fn new(
        shard: usize,
        shards: usize,
        limits: Arc<ChatLimits>,
        log: Box<dyn ChatLog>,
    ) -> Self {
        assert!(
            shards <= MAX_SHARDS && shard < shards,
            "shard {shard} of {shards}"
        );
        assert!(
            log.max_record_bytes() >= MIN_RECORD_BYTES,
            "a log that takes records of {} bytes at most",
            log.max_record_bytes()
        );
        Self {
            shard,
            shards,
            sequencer: Sequencer::new(limits.clone()),
            limits,
            directory: Directory::default(),
            log: TrackedLog {
                inner: log,
                last_appended: 0,
            },
            durable_lsn: 0,
            sessions: FastMap::default(),
            sessions_of: FastMap::default(),
            gathers: FastMap::default(),
            next_gather: 0,
            replaying: FastMap::default(),
            ids: Seeds::default(),
            next_id: 0,
            turn: Vec::new(),
            held: VecDeque::new(),
            outgoing: (0..shards).map(|_| VecDeque::new()).collect(),
            local: Vec::new(),
            searches: Vec::new(),
            failed: None,
            stats: ShardCoreStats::default(),
        }
    }

    pub fn sequencer(&self) -> &Sequencer {
        &self.sequencer
    }

    /// Rebuild state from one record of the log (recovery, before serving).
    pub fn replay(&mut self, lsn: u64, payload: &[u8]) -> Result<(), ApplyError> {
        self.sequencer.replay(lsn, payload)?;
        self.log.last_appended = lsn;
        self.durable_lsn = lsn;
        Ok(())
    }

    /// A snapshot of the durable state: (the LSN it reflects, its bytes). Save it only
    /// once the log is durable up to that LSN. `None` when the state is ahead of the log.
    pub fn snapshot(&self) -> Option<(u64, Vec<u8>)> {
        Some((self.log.last_appended, self.sequencer.snapshot()?))
    }

    /// Start from a snapshot taken at `lsn` (recovery, before replaying what follows it).
    pub fn restore(&mut self, lsn: u64, bytes: &[u8]) -> Result<(), ApplyError> {
        self.sequencer.restore(lsn, bytes)?;
        self.log.last_appended = lsn;
        self.durable_lsn = lsn;
        Ok(())
    }

    /// The log failed: the shard must stop (nothing after it can be acknowledged).
    pub fn failed(&self) -> Option<&LogError> {
        self.failed.as_ref()
    }

    /// Everything up to this LSN is known durable.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    /// The highest LSN written so far; the driver waits for it to become durable.
    pub fn last_appended(&self) -> u64 {
        self.log.last_appended
    }

    /// Entries queued for other shards and not yet on a ring.
    pub fn backlog(&self) -> usize {
        self.outgoing.iter().map(VecDeque::len).sum()
    }

    pub fn outgoing(&mut self, to: usize) -> &mut VecDeque<MeshEntry> {
        &mut self.outgoing[to]
    }

    /// Documents for local sessions: (conn, document, ephemeral).
    pub fn take_local(&mut self) -> std::vec::Drain<'_, (u64, Doc, bool)> {
        self.local.drain(..)
    }

    /// Searches ready to run: the driver hands each to the search service, which
    /// answers the session itself (the index is not the core's).
    pub fn take_searches(&mut self) -> std::vec::Drain<'_, SearchRequest> {
        self.searches.drain(..)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.sequencer.next_deadline()
    }

    /// A session of `user` on this shard authenticated.
    pub fn session_opened(&mut self, conn: u64, user: &str, now: Now) {
        let user = self.intern(user);
        self.sessions.insert(conn, user.clone());
        let conns = self.sessions_of.entry(user.clone()).or_default();
        conns.push(conn);
        if conns.len() == 1 {
            self.announce(user, true, now);
        }
        self.end_turn(now);
    }

    /// A session on this shard ended.
    pub fn session_closed(&mut self, conn: u64, now: Now) {
        self.replaying.remove(&conn);
        let Some(user) = self.sessions.remove(&conn) else {
            return;
        };
        let Some(conns) = self.sessions_of.get_mut(&user) else {
            return;
        };
        conns.retain(|c| *c != conn);
        if conns.is_empty() {
            self.sessions_of.remove(&user);
            self.announce(user, false, now);
        }
        self.end_turn(now);
    }

    /// A command from a local session. `user` and `device` are the session's identity.
    pub fn on_request(
        &mut self,
        conn: u64,
        re: u64,
        user: &str,
        device: &str,
        command: ChatCommand,
        now: Now,
    ) {
        // The session layer hands over commands of sessions opened here, as they
        // authenticated, and only commands within the limits (`command::parse`).
        debug_assert_eq!(
            self.sessions.get(&conn).map(|u| &**u),
            Some(user),
            "a request of connection {conn}, which is not {user}'s session here"
        );
        debug_assert!(
            command::check(&command, &self.limits).is_ok(),
            "an unchecked command: {command:?}"
        );
        let caller = Caller {
            origin: Origin {
                shard: self.shard,
                conn,
            },
            re,
            user: self.intern(user),
            device: Arc::from(device),
        };
        match command {
            ChatCommand::ConvList => {
                let shards: Vec<usize> = (0..self.shards).collect();
                self.scatter(&caller, GatherKind::List, &shards, |_| Query::List, now);
            }
            ChatCommand::Sync { cursors } => {
                self.start_replay(&caller, GatherKind::Sync, &cursors, now)
            }
            ChatCommand::Resume { cursors } => {
                self.start_replay(&caller, GatherKind::Resume, &cursors, now)
            }
            ChatCommand::PresenceGet { users } => self.presence_get(&caller, users, now),
            ChatCommand::Search(query) => {
                // The user's conversations first, from every shard, as for `conv.list`.
                let shards: Vec<usize> = (0..self.shards).collect();
                let kind = GatherKind::Search(query);
                self.scatter(&caller, kind, &shards, |_| Query::List, now);
            }
            command => self.send_home(caller, command, now),
        }
        self.end_turn(now);
    }

    /// A command of one conversation goes to its home shard (here, or over a ring).
    fn send_home(&mut self, caller: Caller, command: ChatCommand, now: Now) {
        let conv = self.conv_of(&caller.user, &command, now);
        let home = conversation_home(&conv, self.shards as u32) as usize;
        let command = HomeCommand {
            caller,
            conv,
            command,
        };
        if home == self.shard {
            self.handle_home(command, now);
        } else {
            self.outgoing[home].push_back(MeshEntry::Command(Box::new(command)));
        }
    }

    /// The conversation a command is about; a `conv.create` names none, so its id is
    /// derived (direct: from the two users) or drawn (group) here.
    fn conv_of(&mut self, user: &str, command: &ChatCommand, now: Now) -> Arc<str> {
        match (command, command.conv()) {
            (_, Some(conv)) => Arc::from(conv),
            (
                ChatCommand::ConvCreate {
                    kind: ConvKind::Direct,
                    members,
                    ..
                },
                None,
            ) => Arc::from(direct_conv_id(user, &members[0])),
            _ => Arc::from(self.group_conv_id(now)),
        }
    }

    /// An entry from shard `from`'s ring.
    pub fn on_entry(&mut self, from: usize, entry: MeshEntry, now: Now) {
        self.apply_entry(from, entry, now);
        self.end_turn(now);
    }

    /// Several entries in one turn (one cursor record, one durability wait for all).
    pub fn on_entries(&mut self, entries: impl IntoIterator<Item = (usize, MeshEntry)>, now: Now) {
        for (from, entry) in entries {
            self.apply_entry(from, entry, now);
        }
        self.end_turn(now);
    }

    /// The log is durable up to `lsn`: release what waited for it.
    pub fn on_durable(&mut self, lsn: u64) {
        // Only what was appended can be durable.
        assert!(
            lsn <= self.log.last_appended,
            "durable LSN {lsn} is past the last appended, {}",
            self.log.last_appended
        );
        if lsn <= self.durable_lsn {
            return;
        }
        self.durable_lsn = lsn;
        self.sequencer.set_durable(lsn);
        while let Some((needed, _)) = self.held.front() {
            if *needed > lsn {
                break;
            }
            if let Some((_, output)) = self.held.pop_front() {
                self.route(output);
            }
        }
    }

    /// Timers: typing expiry, and a retry of a cursor record the log had no room for.
    pub fn on_tick(&mut self, now: Now) {
        self.sequencer.on_tick(now, &mut self.turn);
        self.end_turn(now);
    }

    /// True when a cursor record waits for room in the log (the driver ticks soon).
    pub fn flush_pending(&self) -> bool {
        self.sequencer.has_dirty_cursors()
    }

    fn apply_entry(&mut self, from: usize, entry: MeshEntry, now: Now) {
        match entry {
            MeshEntry::Command(command) => self.handle_home(*command, now),
            MeshEntry::Scatter(scatter) => self.answer(*scatter, now),
            MeshEntry::ToSession { conn, doc } => self.local.push((conn, doc, false)),
            MeshEntry::Deliver(delivery) => self.deliver_local(&delivery),
            MeshEntry::Part { gather, part } => self.gathered(gather, *part),
            MeshEntry::Directory { user, present } => self.on_directory(from, user, present, now),
            MeshEntry::Presence {
                user,
                online,
                last_seen,
            } => self.tell_co_members(&user, online, last_seen),
        }
    }

    fn handle_home(&mut self, command: HomeCommand, now: Now) {
        if let Err(error) = self
            .sequencer
            .handle(command, now, &mut self.log, &mut self.turn)
        {
            self.failed.get_or_insert(error);
        }
    }

    fn intern(&self, user: &str) -> Arc<str> {
        self.sessions_of
            .get_key_value(user)
            .map_or_else(|| Arc::from(user), |(key, _)| key.clone())
    }

    fn group_conv_id(&mut self, now: Now) -> String {
        self.next_id += 1;
        let high = self
            .ids
            .hash_one((self.shard, self.next_id, now.unix_ms, 1u8));
        let low = self
            .ids
            .hash_one((self.shard, self.next_id, now.unix_ms, 2u8));
        format!("g-{high:016x}{low:016x}")
    }

    pub fn limits(&self) -> &ChatLimits {
        &self.limits
    }
}

/// The id of the direct conversation between two users: the same whoever creates it.
pub fn direct_conv_id(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut hasher = Sha256::new();
    hasher.update(first.as_bytes());
    hasher.update([0u8]);
    hasher.update(second.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("d-{hex}")
}
