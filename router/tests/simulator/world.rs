//! One simulated `parleyd` node: its shards' cores, their rings and disks, the session
//! state machines and the transport glue between them (what `gateway/src/runtime.rs`
//! does with real sockets), and the clients. Each step advances virtual time and does
//! one thing chosen by the seed; faults are drawn from the same seed.
//!
//! A crash takes the whole node, as it does in `parleyd` (the shards are threads of one
//! process, and a shard whose log fails stops the process): every session and every
//! entry on a ring is lost, and each shard's disk keeps what it keeps.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::auth::{Claims, JwtKey};
use parley_router::clock::Now;
use parley_router::limits::ChatLimits;
use parley_router::session::{Action, Session, SessionConfig, SessionLimits};
use parley_router::shard::{MeshEntry, ShardCore};

use crate::client::{Client, Phase};
use crate::disk::{Disk, DiskProfile, IoDone, SimLog};
use crate::oracle::{Oracle, Violation};
use crate::rng::Rng;

const T0_UNIX_MS: u64 = 1_800_000_000_000;
/// Frames a socket holds toward a client before the server stops writing to it.
const SOCKET_FRAMES: usize = 4;
const BATCH_BYTES: usize = 16 * 1024;
/// Trace lines kept for a failure report.
const TRACE_KEEP: usize = 80;

/// The shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shards: usize,
    pub users: usize,
    pub devices: Vec<usize>,
    pub steps: u64,
    pub crash_per_10k: u64,
    pub disk: DiskProfile,
    pub snapshot_every: u64,
    pub ring_entries: usize,
    pub limits: ChatLimits,
    pub outbound_queue_len: usize,
}

impl Plan {
    pub fn from_seed(rng: &mut Rng, steps: u64) -> Self {
        let users = rng.between(3, 6) as usize;
        let limits = ChatLimits {
            sync_max_messages: rng.between(4, 40) as usize,
            sync_max_convs: 32,
            message_cache_per_conv: rng.between(0, 16) as usize,
            history_page_max: 30,
            max_group_members: 8,
            ..ChatLimits::default()
        };
        let outbound_queue_len = 34 + rng.between(0, 64) as usize;
        Self {
            shards: rng.between(2, 4) as usize,
            users,
            devices: (0..users).map(|_| rng.between(1, 2) as usize).collect(),
            steps,
            crash_per_10k: rng.between(2, 20),
            disk: DiskProfile {
                io_us: (rng.between(20, 200), rng.between(200, 3000)),
                slow_io_per_mille: rng.between(0, 20),
                fsync_fail_per_mille: rng.between(0, 4),
                buffer_records: rng.between(4, 256),
                lies_about_fsync: false,
            },
            snapshot_every: if rng.chance(300) {
                0
            } else {
                rng.between(5, 60)
            },
            ring_entries: rng.between(2, 64) as usize,
            limits,
            outbound_queue_len,
        }
    }
}

enum ToServer {
    Text(String),
    Pong,
}

enum ToClient {
    Text(String),
    Ping,
    Close(u16),
}

/// A connection, server side and in flight both ways.
struct Conn {
    shard: usize,
    /// The client at the other end; `None` once it vanished without closing.
    client: Option<usize>,
    session: Session,
    /// Joined the shard's core (after its first hello or chat command).
    opened: bool,
    /// The server closed it; what is in flight still reaches the client.
    server_closed: bool,
    to_server: VecDeque<ToServer>,
    to_client: VecDeque<ToClient>,
    stalled_until: u64,
}

#[derive(Default)]
struct SnapshotState {
    last: u64,
    pending: Option<(u64, Vec<u8>)>,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub crashes: u64,
    pub fsync_failures: u64,
    pub torn_bytes_cut: u64,
    pub snapshots_loaded: u64,
    pub connections: u64,
    pub records_checked: u64,
    pub sends_acknowledged: u64,
    pub messages_seen: u64,
    pub duplicates_received: u64,
    pub virtual_ms: u64,
    /// Cursor, reaction and last-seen records the oracle checked, and what clients were
    /// told about cursors, reactions and presence that it checked against the log.
    pub cursor_records: u64,
    pub reaction_records: u64,
    pub last_seen_records: u64,
    pub cursors_checked: u64,
    pub reactions_checked: u64,
    pub presence_checked: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.crashes += other.crashes;
        self.fsync_failures += other.fsync_failures;
        self.torn_bytes_cut += other.torn_bytes_cut;
        self.snapshots_loaded += other.snapshots_loaded;
        self.connections += other.connections;
        self.records_checked += other.records_checked;
        self.sends_acknowledged += other.sends_acknowledged;
        self.messages_seen += other.messages_seen;
        self.duplicates_received += other.duplicates_received;
        self.virtual_ms += other.virtual_ms;
        self.cursor_records += other.cursor_records;
        self.reaction_records += other.reaction_records;
        self.last_seen_records += other.last_seen_records;
        self.cursors_checked += other.cursors_checked;
        self.reactions_checked += other.reactions_checked;
        self.presence_checked += other.presence_checked;
    }
}

pub struct World {
    rng: Rng,
    plan: Plan,
    now_us: u64,
    t0: Instant,
    limits: Arc<ChatLimits>,
    sessions: Arc<SessionConfig>,
    disks: Vec<Rc<RefCell<Disk>>>,
    /// `None` while the node is down.
    cores: Option<Vec<ShardCore>>,
    down_until: u64,
    /// Records of each shard's log already shown to the oracle.
    logged: Vec<u64>,
    snapshots: Vec<SnapshotState>,
    /// Entries on the ring from one shard to another.
    rings: BTreeMap<(usize, usize), VecDeque<MeshEntry>>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    clients: Vec<Client>,
    client_conn: Vec<Option<u64>>,
    tokens: Vec<String>,
    users: Vec<String>,
    pub oracle: Oracle,
    faults: bool,
    trace: VecDeque<String>,
    /// A digest of the whole trace: equal runs have equal digests.
    pub digest: u64,
    pub stats: Stats,
    pub verbose: bool,
}

impl World {
    pub fn new(seed: u64, steps: u64) -> Self {
        let mut rng = Rng::new(seed);
        let plan = Plan::from_seed(&mut rng, steps);
        let limits = Arc::new(plan.limits.clone());
        let jwt = JwtKey::new(b"simulator");
        let sessions = Arc::new(SessionConfig {
            limits: SessionLimits {
                outbound_queue_len: plan.outbound_queue_len,
                rate_per_sec: 1_000_000,
                rate_burst: 1_000_000,
                ..SessionLimits::default()
            },
            chat: plan.limits.clone(),
            jwt: jwt.clone(),
            node: "sim".into(),
        });
        let users: Vec<String> = (0..plan.users).map(|i| format!("u{i}")).collect();
        let mut clients = Vec::new();
        let mut tokens = Vec::new();
        for (i, user) in users.iter().enumerate() {
            for d in 0..plan.devices[i] {
                clients.push(Client::new(user, &format!("d{d}")));
                tokens.push(jwt.sign(&Claims {
                    sub: user.clone(),
                    exp: T0_UNIX_MS / 1000 + 30 * 86_400,
                    dev: None,
                }));
            }
        }
        let disks = (0..plan.shards)
            .map(|_| Rc::new(RefCell::new(Disk::new(plan.disk))))
            .collect();
        let mut world = Self {
            rng,
            now_us: 0,
            t0: Instant::now(),
            limits,
            sessions,
            disks,
            cores: None,
            down_until: 0,
            logged: vec![0; plan.shards],
            snapshots: (0..plan.shards).map(|_| SnapshotState::default()).collect(),
            rings: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            client_conn: vec![None; clients.len()],
            clients,
            tokens,
            users,
            oracle: Oracle::new(plan.shards),
            faults: true,
            trace: VecDeque::new(),
            digest: 0xcbf2_9ce4_8422_2325,
            stats: Stats::default(),
            verbose: false,
            plan,
        };
        world.note(format!("plan: {:?}", world.plan));
        world
    }

    /// Give every shard a disk whose fdatasync lies (the simulator's self-test).
    pub fn lying_disks(&mut self) {
        for disk in &self.disks {
            disk.borrow_mut().lie_about_fsync();
        }
    }

    fn now(&self) -> Now {
        Now {
            instant: self.t0 + Duration::from_micros(self.now_us),
            unix_ms: T0_UNIX_MS + self.now_us / 1000,
        }
    }

    fn note(&mut self, line: String) {
        for byte in line.bytes() {
            self.digest = (self.digest ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
        if self.verbose {
            eprintln!("[{:>10}us] {line}", self.now_us);
        }
        if self.trace.len() == TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("[{:>10}us] {line}", self.now_us));
    }

    pub fn trace(&self) -> impl Iterator<Item = &String> {
        self.trace.iter()
    }

    /// The whole run: the faulty phase, then the faults stop and every client must catch
    /// up with everything.
    pub fn run(&mut self) -> Result<(), Violation> {
        self.restart()?;
        for _ in 0..self.plan.steps {
            self.step()?;
        }
        self.converge()
    }

    fn step(&mut self) -> Result<(), Violation> {
        self.stats.steps += 1;
        self.advance_time();
        if self.cores.is_none() {
            if self.now_us >= self.down_until {
                self.restart()?;
            }
            return Ok(());
        }
        self.poll_disks();
        if self.faults && self.rng.below(10_000) < self.plan.crash_per_10k {
            self.note("the node crashes".into());
            self.crash();
        }
        if self.cores.is_none() {
            return Ok(());
        }
        match self.rng.below(200) {
            0..=49 => self.client_acts(),
            50..=79 => self.deliver_to_server(),
            80..=109 => self.deliver_to_client()?,
            110..=133 => {
                let shard = self.rng.index(self.plan.shards);
                self.pump(shard);
            }
            134..=159 => self.deliver_ring(),
            160..=186 => self.write_to_socket(),
            187..=197 => self.tick(),
            _ => self.client_fault(),
        }
        self.collect_records()
    }

    fn advance_time(&mut self) {
        self.now_us += self.rng.below(300);
        if self.faults && self.rng.chance(3) {
            let jump = self.rng.between(1_000_000, 35_000_000);
            self.now_us += jump;
            self.note(format!("time jumps {} ms", jump / 1000));
        }
        self.stats.virtual_ms = self.now_us / 1000;
    }

    /// Show the oracle every record appended since the last look (it checks each one).
    fn collect_records(&mut self) -> Result<(), Violation> {
        for shard in 0..self.plan.shards {
            let refused = self.disks[shard].borrow_mut().take_refused();
            for payload in refused {
                self.oracle.on_refused(shard, &payload)?;
            }
            let disk = self.disks[shard].borrow();
            while self.logged[shard] < disk.last_lsn() {
                self.logged[shard] += 1;
                let lsn = self.logged[shard];
                let payload = disk.payload(lsn).expect("appended");
                self.oracle.on_record(shard, lsn, payload)?;
            }
        }
        Ok(())
    }

    fn poll_disks(&mut self) {
        for shard in 0..self.plan.shards {
            let done = self.disks[shard]
                .borrow_mut()
                .poll(self.now_us, &mut self.rng);
            for event in done {
                match event {
                    IoDone::Durable(lsn) => {
                        self.oracle.on_durable(shard, lsn);
                        if let Some(cores) = &mut self.cores {
                            cores[shard].on_durable(lsn);
                        }
                    }
                    IoDone::SnapshotSaved(lsn) => {
                        self.note(format!("shard {shard}: snapshot at LSN {lsn} saved"));
                    }
                    IoDone::FsyncFailed => {
                        self.stats.fsync_failures += 1;
                        self.note(format!("shard {shard}: fdatasync failed: fail-stop"));
                        self.crash();
                        return;
                    }
                }
            }
        }
    }

    fn cores(&mut self) -> &mut Vec<ShardCore> {
        self.cores.as_mut().expect("the node is up")
    }

    /// A client does something: connect when offline, else a command of its choosing.
    fn client_acts(&mut self) {
        let index = self.rng.index(self.clients.len());
        match self.clients[index].phase {
            Phase::Offline if self.clients[index].retry_at <= self.now_us => self.connect(index),
            Phase::Offline | Phase::Hello => {}
            Phase::Ready => {
                let Some(conn) = self.client_conn[index] else {
                    return;
                };
                let frame = self.clients[index].act(&mut self.rng, &self.users, &mut self.oracle);
                if let Some(frame) = frame {
                    self.note(format!("c{index} -> {frame}"));
                    let conn = self.conns.get_mut(&conn).expect("client's connection");
                    conn.to_server.push_back(ToServer::Text(frame));
                }
            }
        }
    }

    fn connect(&mut self, index: usize) {
        self.next_conn += 1;
        self.stats.connections += 1;
        let id = self.next_conn;
        let shard = self.rng.index(self.plan.shards);
        let session = Session::new(self.sessions.clone(), format!("s{id}"), None, self.now());
        let hello = self.clients[index].hello(&self.tokens[index]);
        self.note(format!(
            "c{index} connects as conn {id} on shard {shard}: {hello}"
        ));
        let mut to_server = VecDeque::new();
        to_server.push_back(ToServer::Text(hello));
        self.conns.insert(
            id,
            Conn {
                shard,
                client: Some(index),
                session,
                opened: false,
                server_closed: false,
                to_server,
                to_client: VecDeque::new(),
                stalled_until: 0,
            },
        );
        self.client_conn[index] = Some(id);
    }

    /// A random connection among those `ready` accepts.
    fn pick_conn(&mut self, ready: impl Fn(&Conn) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| ready(c))
            .map(|(id, _)| *id)
            .collect();
        self.rng.pick(&ids).copied()
    }

    /// A frame reaches the server: the session reads it, and its commands go to the core
    /// (as `forward_to_core` does in the gateway).
    fn deliver_to_server(&mut self) {
        let Some(id) = self.pick_conn(|c| !c.server_closed && !c.to_server.is_empty()) else {
            return;
        };
        let now = self.now();
        let conn = self.conns.get_mut(&id).expect("picked");
        match conn.to_server.pop_front().expect("non-empty") {
            ToServer::Pong => conn.session.on_inbound(now),
            ToServer::Text(frame) => conn.session.on_text(now, &frame),
        }
        let requests: Vec<_> = conn.session.take_requests().collect();
        if !conn.opened && requests.is_empty() && !conn.session.said_hello() {
            return;
        }
        let (Some(user), Some(device)) = (conn.session.user(), conn.session.device()) else {
            return;
        };
        let (user, device, shard) = (user.to_string(), device.to_string(), conn.shard);
        let open = !conn.opened;
        conn.opened = true;
        let core = &mut self.cores.as_mut().expect("the node is up")[shard];
        if open {
            core.session_opened(id, &user, now);
        }
        for request in requests {
            core.on_request(id, request.re, &user, &device, request.command, now);
        }
    }

    /// A frame reaches its client.
    fn deliver_to_client(&mut self) -> Result<(), Violation> {
        let now_us = self.now_us;
        let Some(id) = self.pick_conn(|c| !c.to_client.is_empty() && c.stalled_until <= now_us)
        else {
            return Ok(());
        };
        let conn = self.conns.get_mut(&id).expect("picked");
        let frame = conn.to_client.pop_front().expect("non-empty");
        let Some(index) = conn.client else {
            return Ok(());
        };
        match frame {
            ToClient::Ping => conn.to_server.push_back(ToServer::Pong),
            ToClient::Close(code) => {
                self.note(format!("c{index}: conn {id} closed by the server ({code})"));
                self.conns.remove(&id);
                self.client_gone(index);
            }
            ToClient::Text(text) => {
                self.note(format!("c{index} <- {}", text.replace('\n', " | ")));
                let disks = &self.disks;
                let shards = self.plan.shards as u32;
                let durable = |conv: &str| {
                    let home = parley_router::ownership::conversation_home(conv, shards);
                    Some(disks[home as usize].borrow().durable_lsn())
                };
                let replies = self.clients[index].on_frame(&text, &mut self.oracle, &durable)?;
                let conn = self.conns.get_mut(&id).expect("still here");
                for reply in replies {
                    conn.to_server.push_back(ToServer::Text(reply));
                }
            }
        }
        Ok(())
    }

    fn client_gone(&mut self, index: usize) {
        let retry = self.now_us + self.rng.between(0, 200_000);
        self.clients[index].on_disconnect(retry);
        self.client_conn[index] = None;
    }

    /// The router turn of one shard: documents into session queues, entries onto rings.
    fn pump(&mut self, shard: usize) {
        let local: Vec<_> = self.cores()[shard].take_local().collect();
        for (id, doc, ephemeral) in local {
            if let Some(conn) = self.conns.get_mut(&id) {
                if conn.shard == shard && !conn.server_closed {
                    let _closing_on_overflow = conn.session.push_event(doc, ephemeral);
                }
            }
        }
        for to in 0..self.plan.shards {
            if to == shard {
                continue;
            }
            let room =
                self.plan.ring_entries - self.rings.get(&(shard, to)).map_or(0, VecDeque::len);
            let outgoing = self.cores()[shard].outgoing(to);
            let moving: Vec<MeshEntry> = outgoing.drain(..room.min(outgoing.len())).collect();
            if !moving.is_empty() {
                self.rings.entry((shard, to)).or_default().extend(moving);
            }
        }
        self.snapshot_step(shard);
    }

    /// As the gateway's `Snapshots::step`: take a snapshot every so many records, save it
    /// once the log is durable up to it.
    fn snapshot_step(&mut self, shard: usize) {
        let every = self.plan.snapshot_every;
        if every == 0 || self.disks[shard].borrow().saving_snapshot() {
            return;
        }
        let state = &mut self.snapshots[shard];
        let core = &self.cores.as_ref().expect("the node is up")[shard];
        if state.pending.is_none() && core.last_appended() >= state.last + every {
            state.pending = core.snapshot();
        }
        let Some((lsn, _)) = &state.pending else {
            return;
        };
        if *lsn > core.durable_lsn() {
            return;
        }
        let (lsn, bytes) = state.pending.take().expect("checked");
        state.last = lsn;
        self.disks[shard]
            .borrow_mut()
            .save_snapshot(lsn, bytes, self.now_us, &mut self.rng);
    }

    /// Some entries of one ring reach their shard, in order.
    fn deliver_ring(&mut self) {
        let busy: Vec<(usize, usize)> = self
            .rings
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let Some(&(from, to)) = self.rng.pick(&busy) else {
            return;
        };
        let ring = self.rings.get_mut(&(from, to)).expect("picked");
        let count = 1 + self.rng.index(ring.len());
        let entries: Vec<(usize, MeshEntry)> = ring.drain(..count).map(|e| (from, e)).collect();
        let now = self.now();
        self.cores()[to].on_entries(entries, now);
    }

    /// The server writes queued documents (or a ping, or the close) to one socket.
    fn write_to_socket(&mut self) {
        let Some(id) = self.pick_conn(|c| !c.server_closed && c.to_client.len() < SOCKET_FRAMES)
        else {
            return;
        };
        let conn = self.conns.get_mut(&id).expect("picked");
        if let Some(batch) = conn.session.take_outbound_batch(BATCH_BYTES) {
            conn.to_client.push_back(ToClient::Text(batch));
            return;
        }
        match conn.session.poll_action() {
            Some(Action::Ping) => conn.to_client.push_back(ToClient::Ping),
            Some(Action::Close { code, reason }) => {
                let code = code.code();
                conn.to_client.push_back(ToClient::Close(code));
                conn.server_closed = true;
                let (opened, shard) = (conn.opened, conn.shard);
                let orphan = conn.client.is_none();
                self.note(format!("server closes conn {id} ({code} {reason})"));
                if orphan {
                    self.conns.remove(&id);
                }
                if opened {
                    let now = self.now();
                    self.cores()[shard].session_closed(id, now);
                }
            }
            None => {}
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        for core in self.cores() {
            core.on_tick(now);
        }
        for conn in self.conns.values_mut() {
            if !conn.server_closed {
                conn.session.on_tick(now);
            }
        }
    }

    /// A client leaves, vanishes (a half-open connection), or stops reading for a while.
    fn client_fault(&mut self) {
        if !self.faults {
            return;
        }
        let Some(id) = self.pick_conn(|c| !c.server_closed && c.client.is_some()) else {
            return;
        };
        let index = self.conns[&id].client.expect("picked with a client");
        match self.rng.below(3) {
            0 => {
                self.note(format!("c{index} closes conn {id}"));
                let conn = self.conns.remove(&id).expect("picked");
                if conn.opened {
                    let now = self.now();
                    self.cores()[conn.shard].session_closed(id, now);
                }
                self.client_gone(index);
            }
            1 => {
                self.note(format!("c{index} vanishes from conn {id} (half-open)"));
                self.conns.get_mut(&id).expect("picked").client = None;
                self.client_gone(index);
            }
            _ => {
                let until = self.now_us + self.rng.between(1_000, 2_000_000);
                self.note(format!("c{index} stops reading conn {id} until {until}us"));
                self.conns.get_mut(&id).expect("picked").stalled_until = until;
            }
        }
    }

    /// The process dies: sessions and rings are gone; each disk keeps what it keeps.
    fn crash(&mut self) {
        self.stats.crashes += 1;
        self.cores = None;
        self.rings.clear();
        self.conns.clear();
        for index in 0..self.clients.len() {
            if self.client_conn[index].is_some() || self.clients[index].phase != Phase::Offline {
                self.client_gone(index);
            }
        }
        for shard in 0..self.plan.shards {
            let what = self.disks[shard].borrow_mut().crash(&mut self.rng);
            self.note(format!("shard {shard} disk at the crash: {what}"));
        }
        self.down_until = self.now_us + self.rng.between(1_000, 500_000);
    }

    /// Start the node: every shard recovers from its disk (snapshot, then the log's tail).
    fn restart(&mut self) -> Result<(), Violation> {
        let mut cores = Vec::new();
        for shard in 0..self.plan.shards {
            let recovered = self.disks[shard]
                .borrow_mut()
                .recover()
                .map_err(|e| format!("shard {shard} cannot recover: {e}"))?;
            self.stats.torn_bytes_cut += recovered.torn_bytes_cut as u64;
            let log = Box::new(SimLog(self.disks[shard].clone()));
            let mut core = ShardCore::new(shard, self.plan.shards, self.limits.clone(), log);
            let mut first = 1;
            self.snapshots[shard] = SnapshotState::default();
            if let Some((lsn, bytes)) = &recovered.snapshot {
                core.restore(*lsn, bytes)
                    .map_err(|e| format!("shard {shard}: snapshot at LSN {lsn}: {e}"))?;
                self.stats.snapshots_loaded += 1;
                self.snapshots[shard].last = *lsn;
                first = lsn + 1;
            }
            let disk = self.disks[shard].borrow();
            // The oracle first: what recovery read is checked against what was appended.
            self.oracle.on_recovered(shard, disk.payloads())?;
            for (i, payload) in disk.payloads().iter().enumerate().skip(first as usize - 1) {
                core.replay(i as u64 + 1, payload)
                    .map_err(|e| format!("shard {shard}: replay of LSN {}: {e}", i + 1))?;
            }
            drop(disk);
            self.logged[shard] = recovered.records;
            self.note(format!(
                "shard {shard} recovered {} records (snapshot {:?}, {} torn bytes cut)",
                recovered.records,
                recovered.snapshot.as_ref().map(|s| s.0),
                recovered.torn_bytes_cut
            ));
            cores.push(core);
        }
        self.cores = Some(cores);
        Ok(())
    }

    /// The faults stop. Every client reconnects and must end up holding every message of
    /// every conversation it belongs to, with every send answered.
    fn converge(&mut self) -> Result<(), Violation> {
        self.faults = false;
        self.note("faults stop; every client must converge".into());
        for disk in &self.disks {
            disk.borrow_mut().stop_faults();
        }
        if self.cores.is_none() {
            self.restart()?;
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let conn = self.conns.remove(&id).expect("listed");
            if conn.opened && !conn.server_closed {
                let now = self.now();
                self.cores()[conn.shard].session_closed(id, now);
            }
            if let Some(index) = conn.client {
                self.client_gone(index);
            }
        }
        for client in &mut self.clients {
            client.converging = true;
        }
        const MAX_STEPS: u64 = 200_000;
        for _ in 0..MAX_STEPS {
            self.step()?;
            if self.converged() {
                return self.check_final();
            }
            for index in 0..self.clients.len() {
                let behind = self.behind(index);
                let client = &mut self.clients[index];
                if client.settled() && behind.is_some() {
                    client.relist();
                }
            }
        }
        let stuck: Vec<String> = (0..self.clients.len())
            .filter(|&i| !self.clients[i].settled() || self.behind(i).is_some())
            .map(|i| {
                format!(
                    "c{i} ({:?}, behind: {:?})",
                    self.clients[i].phase,
                    self.behind(i)
                )
            })
            .collect();
        Err(format!(
            "no convergence {MAX_STEPS} steps after the faults stopped: {}",
            stuck.join(", ")
        ))
    }

    /// A conversation the client belongs to whose log it does not fully hold.
    fn behind(&self, index: usize) -> Option<(String, u64, u64)> {
        let client = &self.clients[index];
        self.oracle
            .conversations()
            .filter(|conv| self.oracle.is_member_now(conv, &client.user))
            .find_map(|conv| {
                let last = self.oracle.last_seq(conv).unwrap_or(0);
                let held = client.convs.get(conv).map_or(0, |v| v.contiguous);
                (held < last).then(|| (conv.clone(), held, last))
            })
    }

    fn converged(&self) -> bool {
        self.rings.values().all(VecDeque::is_empty)
            && self
                .conns
                .values()
                .all(|c| c.to_server.is_empty() && c.to_client.is_empty())
            && (0..self.clients.len())
                .all(|i| self.clients[i].settled() && self.behind(i).is_none())
    }

    fn check_final(&mut self) -> Result<(), Violation> {
        for (index, client) in self.clients.iter().enumerate() {
            if !client.outbox.is_empty() {
                return Err(format!(
                    "c{index}: sends never answered: {:?}",
                    client.outbox
                ));
            }
            self.stats.sends_acknowledged += client.sends_acknowledged;
            self.stats.duplicates_received += client.duplicates_received;
        }
        self.stats.records_checked = self.oracle.records_checked;
        self.stats.messages_seen = self.oracle.messages_seen;
        self.stats.cursor_records = self.oracle.cursor_records;
        self.stats.reaction_records = self.oracle.reaction_records;
        self.stats.last_seen_records = self.oracle.last_seen_records;
        self.stats.cursors_checked = self.oracle.cursors_checked;
        self.stats.reactions_checked = self.oracle.reactions_checked;
        self.stats.presence_checked = self.oracle.presence_checked;
        self.note(format!("converged: {:?}", self.stats));
        Ok(())
    }
}
