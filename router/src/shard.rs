//! One shard's chat core, sans-IO: the sessions it holds, the conversations and users
//! homed on it, and everything that crosses the mesh.
//!
//! The driver feeds it client commands, mesh entries, clock ticks and the log's durable
//! LSN, and collects what it produced: entries for other shards (`take_outgoing`) and
//! documents for local sessions (`take_local`). Every input ends a *turn*: cursor
//! advances of the turn are written as one record, and the turn's replies and events are
//! held until the log is durable up to the last record written so far, so nothing is
//! acknowledged or delivered before it is durable (PROTOCOL.md 7.1), and outputs leave
//! in the order they were made.

use crate::seeded_map::{FastMap, FastSet, Seeds};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chat_log::{ChatLog, LogError, MIN_RECORD_BYTES};
use crate::clock::Now;
use crate::command::{self, ChatCommand, Cursor};
use crate::directory::{shards_in, Directory, PresenceChange, MAX_SHARDS};
use crate::event::{self, MoreAfter};
use crate::limits::ChatLimits;
use crate::output::{Caller, ConvSummary, Delivery, Origin, Output, Part, PresenceInfo};
use crate::ownership::{conversation_home, user_home};
use crate::protocol::{encode_ok, Doc};
use crate::record::ConvKind;
use crate::sequencer::{ApplyError, HomeCommand, Sequencer, SyncShare};

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

#[derive(Debug)]
pub struct Scatter {
    pub gather: u64,
    pub origin: Origin,
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub query: Query,
}

#[derive(Debug)]
pub enum Query {
    /// The user's conversations homed on the receiver.
    List,
    /// Replay after the cursors (those homed on the receiver), and list the rest.
    Sync {
        cursors: Vec<Cursor>,
        list_unnamed: bool,
        /// Messages to replay per named conversation at most.
        per_conv: usize,
    },
    /// Presence of these users (homed on the receiver).
    Presence { users: Vec<String> },
}

#[derive(Debug)]
enum GatherKind {
    List,
    Sync,
    Resume,
    Presence { order: Vec<String> },
}

#[derive(Debug)]
struct Gather {
    conn: u64,
    re: u64,
    waiting: usize,
    kind: GatherKind,
    convs: Vec<ConvSummary>,
    more: Vec<MoreAfter>,
    presence: Vec<PresenceInfo>,
}

/// Live events held for a session while its replays run.
#[derive(Debug, Default)]
struct Replaying {
    /// Replays (gathers) of this session still running.
    running: usize,
    held: Vec<(Doc, bool)>,
}

/// Live events held per replaying session at most; beyond it they go out as they come
/// (a session that far behind is about to overflow its queue and be closed with 4009).
pub const REPLAY_HOLD_MAX: usize = 4096;

/// A log that remembers the last LSN it handed out.
struct TrackedLog {
    inner: Box<dyn ChatLog>,
    last_appended: u64,
}

impl ChatLog for TrackedLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        let lsn = self.inner.append(timestamp, payload)?;
        // The log hands out LSNs in order, one per record, after those recovered.
        assert!(
            lsn > self.last_appended,
            "the log handed out LSN {lsn} after {}",
            self.last_appended
        );
        self.last_appended = lsn;
        Ok(lsn)
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        self.inner.read(lsn)
    }

    fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes()
    }
}

/// Entries waiting for one destination's ring beyond which typing and presence for it
/// are dropped instead of queued (the driver stops reading sockets at about this backlog).
pub const SHED_EPHEMERAL_BACKLOG: usize = 1024;

/// Held outputs waiting for a cursor record that could not be written yet.
const AWAITING_FLUSH: u64 = u64::MAX;

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
            command => self.send_home(caller, command, now),
        }
        self.end_turn(now);
    }

    /// Ask the home shards of `users` for their presence.
    fn presence_get(&mut self, caller: &Caller, users: Vec<String>, now: Now) {
        let mut by_home: FastMap<usize, Vec<String>> = FastMap::default();
        for user in &users {
            by_home
                .entry(user_home(user, self.shards as u32) as usize)
                .or_default()
                .push(user.clone());
        }
        let mut shards: Vec<usize> = by_home.keys().copied().collect();
        shards.sort_unstable();
        let kind = GatherKind::Presence { order: users };
        let query = |shard| Query::Presence {
            users: by_home.remove(&shard).unwrap_or_default(),
        };
        self.scatter(caller, kind, &shards, query, now);
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

    fn answer(&mut self, scatter: Scatter, _now: Now) {
        let Scatter {
            gather,
            origin,
            user,
            device,
            query,
        } = scatter;
        let part = match query {
            Query::List => Part::Convs(self.sequencer.summaries(
                &user,
                &device,
                &FastSet::default(),
            )),
            Query::Sync {
                cursors,
                list_unnamed,
                per_conv,
            } => {
                let share = SyncShare {
                    to: origin,
                    gather,
                    user: &user,
                    device: &device,
                    cursors: &cursors,
                    list_unnamed,
                    per_conv,
                };
                let result = self.sequencer.sync(&share, &mut self.log, &mut self.turn);
                if let Err(error) = result {
                    self.failed.get_or_insert(error);
                }
                return;
            }
            Query::Presence { users } => Part::Presence(
                users
                    .into_iter()
                    .map(|user| {
                        let online = self.directory.is_online(&user);
                        PresenceInfo {
                            last_seen: if online {
                                None
                            } else {
                                self.sequencer.last_seen(&user)
                            },
                            user,
                            status: if online { "online" } else { "offline" },
                        }
                    })
                    .collect(),
            ),
        };
        self.turn.push(Output::Part {
            shard: origin.shard,
            gather,
            part,
        });
    }

    /// A `sync` or `resume`: every shard replays what it homes of `cursors` (and, for a
    /// sync, lists the rest). Every shard answers, even with nothing to replay: its answer
    /// comes after this shard's directory announcement, so live delivery from every shard
    /// is certain once `synced` arrives.
    fn start_replay(&mut self, caller: &Caller, kind: GatherKind, cursors: &[Cursor], now: Now) {
        let per_conv = self.replay_share(cursors.len());
        let list_unnamed = matches!(kind, GatherKind::Sync);
        let by_home = self.cursors_by_home(cursors);
        let shards: Vec<usize> = (0..self.shards).collect();
        let query = |shard| Query::Sync {
            cursors: by_home.get(&shard).cloned().unwrap_or_default(),
            list_unnamed,
            per_conv,
        };
        self.scatter(caller, kind, &shards, query, now);
    }

    /// Ask `shards` and answer the session once all have.
    fn scatter(
        &mut self,
        caller: &Caller,
        kind: GatherKind,
        shards: &[usize],
        mut query: impl FnMut(usize) -> Query,
        now: Now,
    ) {
        let gather = self.next_gather;
        self.next_gather += 1;
        let origin = caller.origin;
        if matches!(kind, GatherKind::Sync | GatherKind::Resume) {
            self.replaying.entry(origin.conn).or_default().running += 1;
        }
        self.gathers.insert(
            gather,
            Gather {
                conn: origin.conn,
                re: caller.re,
                waiting: shards.len(),
                kind,
                convs: Vec::new(),
                more: Vec::new(),
                presence: Vec::new(),
            },
        );
        if shards.is_empty() {
            self.complete(gather);
            return;
        }
        for &shard in shards {
            let scatter = Scatter {
                gather,
                origin,
                user: caller.user.clone(),
                device: caller.device.clone(),
                query: query(shard),
            };
            if shard == self.shard {
                self.answer(scatter, now);
            } else {
                self.outgoing[shard].push_back(MeshEntry::Scatter(Box::new(scatter)));
            }
        }
    }

    fn gathered(&mut self, gather: u64, part: Part) {
        let Some(pending) = self.gathers.get_mut(&gather) else {
            return;
        };
        match part {
            Part::Convs(convs) => pending.convs.extend(convs),
            Part::Synced { convs, more } => {
                pending.convs.extend(convs);
                pending.more.extend(more);
            }
            Part::Presence(users) => pending.presence.extend(users),
        }
        pending.waiting -= 1;
        if pending.waiting == 0 {
            self.complete(gather);
        }
    }

    fn complete(&mut self, gather: u64) {
        #[derive(Serialize)]
        struct ConvList<'a> {
            convs: &'a [ConvSummary],
        }
        #[derive(Serialize)]
        struct PresenceList<'a> {
            users: Vec<&'a PresenceInfo>,
        }
        let Some(mut done) = self.gathers.remove(&gather) else {
            return;
        };
        done.convs
            .sort_by(|a, b| b.last_ts.cmp(&a.last_ts).then_with(|| a.conv.cmp(&b.conv)));
        done.more.sort_by(|a, b| a.conv.cmp(&b.conv));
        let conn = done.conn;
        match &done.kind {
            GatherKind::List => {
                let doc = encode_ok(done.re, &ConvList { convs: &done.convs });
                self.local.push((conn, Doc::Owned(doc), false));
            }
            GatherKind::Sync => {
                let doc = encode_ok(done.re, &ConvList { convs: &done.convs });
                self.local.push((conn, Doc::Owned(doc), false));
                self.replay_done(conn);
                let synced = Doc::Owned(event::synced(&done.more));
                self.local.push((conn, synced, false));
            }
            GatherKind::Resume => {
                self.replay_done(conn);
                let synced = Doc::Owned(event::synced(&done.more));
                self.local.push((conn, synced, false));
            }
            GatherKind::Presence { order } => {
                let by_user: FastMap<&str, &PresenceInfo> =
                    done.presence.iter().map(|p| (p.user.as_str(), p)).collect();
                let users = order
                    .iter()
                    .filter_map(|u| by_user.get(u.as_str()).copied())
                    .collect();
                let doc = encode_ok(done.re, &PresenceList { users });
                self.local.push((conn, Doc::Owned(doc), false));
            }
        }
    }

    /// Each named conversation's share of one replay's `sync_max_messages`.
    fn replay_share(&self, named: usize) -> usize {
        (self.limits.sync_max_messages / named.max(1)).max(1)
    }

    /// A replay of `conn` finished: once none runs, what was held goes out (after the
    /// replayed messages, so the session sees each conversation in seq order; a message
    /// both replayed and held arrives twice, which the protocol allows).
    fn replay_done(&mut self, conn: u64) {
        let Some(replaying) = self.replaying.get_mut(&conn) else {
            return;
        };
        replaying.running -= 1;
        if replaying.running == 0 {
            if let Some(replaying) = self.replaying.remove(&conn) {
                self.local.extend(
                    replaying
                        .held
                        .into_iter()
                        .map(|(doc, eph)| (conn, doc, eph)),
                );
            }
        }
    }

    fn cursors_by_home(&self, cursors: &[Cursor]) -> FastMap<usize, Vec<Cursor>> {
        let mut by_home: FastMap<usize, Vec<Cursor>> = FastMap::default();
        for cursor in cursors {
            let home = conversation_home(&cursor.conv, self.shards as u32) as usize;
            by_home.entry(home).or_default().push(cursor.clone());
        }
        by_home
    }

    /// Tell every shard (this one included) that this shard now holds, or no longer
    /// holds, sessions of `user`.
    fn announce(&mut self, user: Arc<str>, present: bool, now: Now) {
        for shard in 0..self.shards {
            if shard != self.shard {
                self.outgoing[shard].push_back(MeshEntry::Directory {
                    user: user.clone(),
                    present,
                });
            }
        }
        self.on_directory(self.shard, user, present, now);
    }

    fn on_directory(&mut self, from: usize, user: Arc<str>, present: bool, now: Now) {
        let change = self.directory.update(&user, from, present);
        let Some(change) = change else {
            return;
        };
        if user_home(&user, self.shards as u32) as usize != self.shard {
            return;
        }
        let last_seen = match change {
            PresenceChange::Online => None,
            PresenceChange::Offline => {
                if let Err(error) =
                    self.sequencer
                        .record_last_seen(&user, now.unix_ms, &mut self.log)
                {
                    self.failed.get_or_insert(error);
                }
                Some(now.unix_ms)
            }
        };
        let online = change == PresenceChange::Online;
        for shard in 0..self.shards {
            if shard != self.shard {
                self.outgoing[shard].push_back(MeshEntry::Presence {
                    user: user.clone(),
                    online,
                    last_seen,
                });
            }
        }
        self.tell_co_members(&user, online, last_seen);
    }

    fn tell_co_members(&mut self, user: &str, online: bool, last_seen: Option<u64>) {
        let co_members = self.sequencer.co_members(user);
        if co_members.is_empty() {
            return;
        }
        let users: Arc<[Arc<str>]> = co_members.into_iter().collect();
        let delivery = Delivery {
            users,
            except: None,
            doc: event::presence(user, online, last_seen),
            ephemeral: true,
        };
        self.route(Output::Deliver(Arc::new(delivery)));
    }

    /// End of a turn: write the turn's cursor advances, then hold or send its outputs.
    fn end_turn(&mut self, now: Now) {
        let flushed = match self.sequencer.flush_cursors(now, &mut self.log) {
            Ok(_) => true,
            Err(LogError::Full) => false,
            // Cursor records are split to fit the log's limit, so a `TooLarge` here is
            // the log breaking its word: as failed as any other error.
            Err(error) => {
                self.failed.get_or_insert(error);
                false
            }
        };
        if flushed {
            let last = self.log.last_appended;
            for (needed, _) in self.held.iter_mut().rev() {
                if *needed != AWAITING_FLUSH {
                    break;
                }
                *needed = last;
            }
        }
        let needed = if flushed {
            self.log.last_appended
        } else {
            AWAITING_FLUSH
        };
        let mut turn = std::mem::take(&mut self.turn);
        for output in turn.drain(..) {
            let ephemeral = matches!(&output, Output::Deliver(d) if d.ephemeral);
            if ephemeral || (self.held.is_empty() && needed <= self.durable_lsn) {
                self.route(output);
            } else {
                self.held.push_back((needed, output));
            }
        }
        self.turn = turn;
        debug_assert!(self.held_in_log_order(), "held outputs leave in order");
    }

    /// Held outputs wait for LSNs that never decrease along the queue and were all
    /// appended (or for the cursor record not written yet, at the tail).
    fn held_in_log_order(&self) -> bool {
        let needs = self.held.iter().map(|(needed, _)| *needed);
        needs.clone().zip(needs.skip(1)).all(|(a, b)| a <= b)
            && self
                .held
                .iter()
                .all(|(needed, _)| *needed == AWAITING_FLUSH || *needed <= self.log.last_appended)
    }

    fn route(&mut self, output: Output) {
        match output {
            Output::ToSession { to, doc } => {
                if to.shard == self.shard {
                    self.local.push((to.conn, doc, false));
                } else {
                    self.outgoing[to.shard].push_back(MeshEntry::ToSession { conn: to.conn, doc });
                }
            }
            Output::Part {
                shard,
                gather,
                part,
            } => {
                if shard == self.shard {
                    self.gathered(gather, part);
                } else {
                    self.outgoing[shard].push_back(MeshEntry::Part {
                        gather,
                        part: Box::new(part),
                    });
                }
            }
            Output::Deliver(delivery) => {
                let mut mask = 0u64;
                for user in delivery.users.iter() {
                    if delivery.except.as_ref() != Some(user) {
                        mask |= self.directory.mask(user);
                    }
                }
                for shard in shards_in(mask) {
                    if shard == self.shard {
                        self.deliver_local(&delivery);
                    } else if delivery.ephemeral
                        && self.outgoing[shard].len() >= SHED_EPHEMERAL_BACKLOG
                    {
                        // That ring is backed up: typing and presence are shed first.
                        self.stats.shed_ephemeral += 1;
                    } else {
                        self.outgoing[shard].push_back(MeshEntry::Deliver(delivery.clone()));
                    }
                }
            }
        }
    }

    fn deliver_local(&mut self, delivery: &Delivery) {
        for user in delivery.users.iter() {
            if delivery.except.as_ref() == Some(user) {
                continue;
            }
            if let Some(conns) = self.sessions_of.get(user) {
                for conn in conns {
                    let doc = Doc::Shared(delivery.doc.clone());
                    match self.replaying.get_mut(conn) {
                        Some(replaying) if replaying.held.len() < REPLAY_HOLD_MAX => {
                            replaying.held.push((doc, delivery.ephemeral));
                        }
                        _ => self.local.push((*conn, doc, delivery.ephemeral)),
                    }
                }
            }
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
