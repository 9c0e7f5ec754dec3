//! A shard's QUIC endpoint, sans-IO: the runtime hands it datagrams (with the clock) and
//! takes back datagrams to send and session updates for the shard's core. What the
//! endpoint does is listed in the module above ([`crate::quic`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use parley_router::clock::Now;
use parley_router::protocol::Doc;
use parley_router::session::{ChatRequest, SessionConfig};

use super::connection::QuicConnection;
use super::retry::RetryTokens;
use super::transmit::{Outbox, Transmit};
use super::{random, QuicKeys, QuicSettings, SPARE_CIDS};
use crate::metrics::{dec, inc, ShardMetrics};

/// Length of the connection ids this server issues: one byte of shard, fifteen random.
pub const CID_LEN: usize = 16;
/// The smallest datagram that may carry a client's first Initial (RFC 9000 section 14.1).
const MIN_INITIAL_BYTES: usize = 1200;

/// Ids of QUIC sessions have the top bit set, so they never meet a TCP session's id.
pub const QUIC_SESSION_ID_BIT: u64 = 1 << 63;

/// Where a datagram belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Forward(usize),
    /// Not QUIC, or not a connection any shard could own: dropped.
    Drop,
}

/// What the runtime must tell the shard's core about a session.
#[derive(Debug)]
pub enum SessionUpdate {
    /// Said hello or sent chat commands; `first` when the core hears of it the first time.
    Chat {
        id: u64,
        first: bool,
        user: String,
        device: String,
        requests: Vec<ChatRequest>,
    },
    /// The connection is gone; `opened` says whether the core knew its session.
    Closed { id: u64, opened: bool },
}

struct Entry {
    /// Boxed: quiche's connection is about 8 KiB inline, and the map's spare capacity
    /// would otherwise hold that much per empty slot.
    connection: Box<QuicConnection>,
    /// Connection ids (ours) that route to this connection.
    cids: Vec<Vec<u8>>,
    /// The instant a timer entry for this connection is queued for, if any.
    armed: Option<Instant>,
    dirty: bool,
    /// The runtime was told the session is over (at its close, before quiche's draining
    /// period ends and the entry goes).
    reported_closed: bool,
}

pub struct QuicEndpoint {
    shard: usize,
    shards: usize,
    local: SocketAddr,
    config: quiche::Config,
    settings: QuicSettings,
    session_config: Arc<SessionConfig>,
    metrics: Arc<ShardMetrics>,
    retry_tokens: RetryTokens,
    /// GSO segment size, when the socket sends with UDP_SEGMENT.
    gso: Option<usize>,
    connections: HashMap<u64, Entry>,
    by_cid: HashMap<Vec<u8>, u64>,
    next_id: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    dirty: Vec<u64>,
    updates: Vec<SessionUpdate>,
    outbox: Outbox,
    /// One packet being built, and stream/datagram reads.
    scratch: Box<[u8]>,
    out: Box<[u8]>,
}

impl QuicEndpoint {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: usize,
        shards: usize,
        local: SocketAddr,
        config: quiche::Config,
        settings: QuicSettings,
        session_config: Arc<SessionConfig>,
        metrics: Arc<ShardMetrics>,
        keys: &QuicKeys,
        gso: bool,
    ) -> Self {
        let gso = gso.then_some(settings.max_udp_payload_bytes);
        Self {
            shard,
            shards,
            local,
            config,
            session_config,
            metrics,
            retry_tokens: RetryTokens::new(keys.retry),
            gso,
            connections: HashMap::new(),
            by_cid: HashMap::new(),
            next_id: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            updates: Vec::new(),
            outbox: Outbox::default(),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            out: vec![0; settings.max_udp_payload_bytes.max(MIN_INITIAL_BYTES)].into_boxed_slice(),
            settings,
        }
    }

    /// Open connections, including those still handshaking or closing.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Which shard owns this datagram. Initial and 0-RTT packets belong where they land
    /// (a new connection's packets share one address, so the kernel keeps them on one
    /// shard); every later packet names its owner in the connection id this server chose.
    pub fn route(&self, packet: &mut [u8]) -> Route {
        let Ok(header) = quiche::Header::from_slice(packet, CID_LEN) else {
            return Route::Drop;
        };
        if matches!(header.ty, quiche::Type::Initial | quiche::Type::ZeroRTT) {
            return Route::Local;
        }
        match header.dcid.first() {
            Some(&owner) if header.dcid.len() == CID_LEN && usize::from(owner) < self.shards => {
                if usize::from(owner) == self.shard {
                    Route::Local
                } else {
                    Route::Forward(usize::from(owner))
                }
            }
            _ => Route::Drop,
        }
    }

    /// A datagram for this shard (read from the socket, or forwarded by another shard).
    /// `may_read` is false while the shard's rings are full: stream data then waits in
    /// quiche, whose flow control stops the client.
    pub fn on_datagram(&mut self, now: Now, packet: &mut [u8], from: SocketAddr, may_read: bool) {
        let Ok(header) = quiche::Header::from_slice(packet, CID_LEN) else {
            inc(&self.metrics.quic_dropped);
            return;
        };
        let id = match self.by_cid.get(header.dcid.as_ref()) {
            Some(&id) => id,
            None if header.ty == quiche::Type::Initial => {
                let token = header.token.clone().unwrap_or_default();
                match self.accept(now, &header, &token, packet.len(), from) {
                    Some(id) => id,
                    None => return,
                }
            }
            None => {
                // Unknown connection (gone, never ours, or garbage): no state, no reply.
                inc(&self.metrics.quic_dropped);
                return;
            }
        };
        let Some(entry) = self.connections.get_mut(&id) else {
            return;
        };
        let info = quiche::RecvInfo {
            from,
            to: self.local,
        };
        match entry.connection.conn.recv(packet, info) {
            // Any packet of the connection (an ack of a heartbeat too) proves the peer alive.
            Ok(_) => entry.connection.on_packet(now),
            // quiche dropped it or closed the connection; its state says what comes next.
            Err(_) => inc(&self.metrics.quic_dropped),
        }
        entry
            .connection
            .after_input(now, &mut self.scratch, may_read);
        mark_dirty(&mut self.dirty, id, entry);
    }

    /// Run every timer that is due.
    pub fn on_timers(&mut self, now: Now) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now.instant {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.connections.get_mut(&id) else {
                continue;
            };
            if entry.armed != Some(at) {
                continue; // superseded by an earlier timer
            }
            entry.armed = None;
            entry.connection.on_tick(now);
            mark_dirty(&mut self.dirty, id, entry);
        }
    }

    /// The earliest instant [`on_timers`](Self::on_timers) has work.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Replies and events from the core for one session.
    pub fn push_documents(
        &mut self,
        now: Now,
        id: u64,
        documents: impl Iterator<Item = (Doc, bool)>,
    ) {
        if let Some(entry) = self.connections.get_mut(&id) {
            entry.connection.push_documents(now, documents);
            mark_dirty(&mut self.dirty, id, entry);
        }
    }

    /// The shard drains: every session closes with 1001.
    pub fn drain(&mut self, now: Now) {
        for (&id, entry) in &mut self.connections {
            entry.connection.drain(now);
            mark_dirty(&mut self.dirty, id, entry);
        }
    }

    /// Backpressure cleared: read what was left in quiche's streams.
    pub fn resume_reading(&mut self, now: Now) {
        for (&id, entry) in &mut self.connections {
            if entry.connection.unread {
                entry.connection.after_input(now, &mut self.scratch, true);
                mark_dirty(&mut self.dirty, id, entry);
            }
        }
    }

    /// After a batch of inputs: produce the datagrams of every connection that changed,
    /// arm its timer, and collect its session updates (see [`take_updates`]).
    ///
    /// [`take_updates`]: Self::take_updates
    pub fn flush(&mut self, now: Now) {
        for id in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.connections.get_mut(&id) else {
                continue;
            };
            entry.dirty = false;
            self.issue_spare_cids(id);
            let Some(entry) = self.connections.get_mut(&id) else {
                continue;
            };
            self.outbox.produce(
                &mut entry.connection.conn,
                &mut self.out,
                self.gso,
                now.instant,
            );
            let requests = entry.connection.take_requests();
            let opens =
                !entry.connection.opened && (!requests.is_empty() || entry.connection.said_hello());
            if opens || (entry.connection.opened && !requests.is_empty()) {
                if let Some((user, device)) = entry.connection.identity() {
                    let (user, device) = (user.to_string(), device.to_string());
                    entry.connection.opened = true;
                    self.updates.push(SessionUpdate::Chat {
                        id,
                        first: opens,
                        user,
                        device,
                        requests,
                    });
                }
            }
            while let Some(retired) = entry.connection.conn.retired_scid_next() {
                self.by_cid.remove(retired.as_ref());
            }
            let over =
                entry.connection.is_closed() || entry.connection.conn.local_error().is_some();
            if over && !entry.reported_closed {
                entry.reported_closed = true;
                self.updates.push(SessionUpdate::Closed {
                    id,
                    opened: entry.connection.opened,
                });
            }
            if entry.connection.is_closed() {
                self.remove(id);
                continue;
            }
            if let Some(deadline) = entry.connection.next_deadline() {
                if entry.armed.is_none_or(|armed| deadline < armed) {
                    entry.armed = Some(deadline);
                    self.timers.push(Reverse((deadline, id)));
                }
            }
        }
    }

    /// What the core must hear since the last call.
    pub fn take_updates(&mut self) -> std::vec::Drain<'_, SessionUpdate> {
        self.updates.drain(..)
    }

    /// Datagrams due by `now`, in order.
    pub fn take_due(&mut self, now: Instant) -> Option<Transmit> {
        self.outbox.take_due(now)
    }

    /// Datagrams wait to be sent (now or paced).
    pub fn has_output(&self) -> bool {
        self.outbox.has_output()
    }

    /// A datagram is due by `now`.
    pub fn has_due(&self, now: Instant) -> bool {
        self.outbox.has_due(now)
    }

    /// When the next paced datagram is due, if any waits.
    pub fn next_paced(&self) -> Option<Instant> {
        self.outbox.next_paced()
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.connections.remove(&id) else {
            return;
        };
        for cid in &entry.cids {
            self.by_cid.remove(cid);
        }
        for cid in entry.connection.conn.source_ids() {
            self.by_cid.remove(cid.as_ref());
        }
        dec(&self.metrics.quic_connections_open);
        if !entry.reported_closed {
            self.updates.push(SessionUpdate::Closed {
                id,
                opened: entry.connection.opened,
            });
        }
    }

    /// A new client's Initial: version negotiation, retry, or a new connection.
    fn accept(
        &mut self,
        now: Now,
        header: &quiche::Header,
        token: &[u8],
        datagram_len: usize,
        from: SocketAddr,
    ) -> Option<u64> {
        if datagram_len < MIN_INITIAL_BYTES {
            inc(&self.metrics.quic_dropped);
            return None;
        }
        if !quiche::version_is_supported(header.version) {
            self.negotiate_version(now, header, from);
            return None;
        }
        if self.connections.len() >= self.settings.max_connections {
            inc(&self.metrics.connections_refused);
            return None;
        }
        let (scid, odcid) = if self.settings.retry {
            self.address_proven(now, header, token, from)?
        } else {
            (self.new_cid(), None)
        };
        self.open_connection(now, header, scid, odcid, from)
    }

    /// Tell a client of an unknown version which one this server speaks.
    fn negotiate_version(&mut self, now: Now, header: &quiche::Header, from: SocketAddr) {
        let mut out = vec![0; MIN_INITIAL_BYTES];
        if let Ok(len) = quiche::negotiate_version(&header.scid, &header.dcid, &mut out) {
            out.truncate(len);
            self.send_now(now, from, out);
        }
    }

    /// Stateless retry: an Initial without a token gets a retry (and `None`); one with a
    /// valid token gets the connection's ids, ours (from the retry) and the original.
    fn address_proven(
        &mut self,
        now: Now,
        header: &quiche::Header,
        token: &[u8],
        from: SocketAddr,
    ) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        if token.is_empty() {
            let retry_scid = self.new_cid();
            let token = self.retry_tokens.mint(now, from, &header.dcid, &retry_scid);
            let mut out = vec![0; MIN_INITIAL_BYTES];
            let scid = quiche::ConnectionId::from_ref(&retry_scid);
            if let Ok(len) = quiche::retry(
                &header.scid,
                &header.dcid,
                &scid,
                &token,
                header.version,
                &mut out,
            ) {
                out.truncate(len);
                inc(&self.metrics.quic_retries);
                self.send_now(now, from, out);
            }
            return None;
        }
        let Some(odcid) = self.retry_tokens.validate(now, from, token, &header.dcid) else {
            inc(&self.metrics.quic_bad_tokens);
            return None;
        };
        // The retry's source id (ours, with our shard byte) becomes the connection's.
        Some((header.dcid.to_vec(), Some(odcid)))
    }

    /// quiche accepts the connection; it routes by `scid` (and, without a retry, by the
    /// client's first id too).
    fn open_connection(
        &mut self,
        now: Now,
        header: &quiche::Header,
        scid: Vec<u8>,
        odcid: Option<Vec<u8>>,
        from: SocketAddr,
    ) -> Option<u64> {
        // Ours: minted here, or bound by a retry token's MAC to an id we minted.
        debug_assert_eq!(scid.len(), CID_LEN);
        let scid_ref = quiche::ConnectionId::from_ref(&scid);
        let odcid = odcid.map(quiche::ConnectionId::from_vec);
        let conn = match quiche::accept(
            &scid_ref,
            odcid.as_ref(),
            self.local,
            from,
            &mut self.config,
        ) {
            Ok(conn) => conn,
            Err(_) => {
                inc(&self.metrics.quic_dropped);
                return None;
            }
        };
        let id = QUIC_SESSION_ID_BIT | self.next_id;
        self.next_id += 1;
        let connection = QuicConnection::new(
            conn,
            self.session_config.clone(),
            format!("{}.q{}", self.shard, id & !QUIC_SESSION_ID_BIT),
            self.settings.write_batch_bytes,
            self.metrics.clone(),
            now,
        );
        // Without a retry the client's own first id still routes here until it learns ours.
        let mut cids = vec![scid.clone()];
        if !self.settings.retry {
            cids.push(header.dcid.to_vec());
        }
        for cid in &cids {
            self.by_cid.insert(cid.clone(), id);
        }
        let entry = Entry {
            connection: Box::new(connection),
            cids,
            armed: None,
            dirty: false,
            reported_closed: false,
        };
        let replaced = self.connections.insert(id, entry);
        assert!(replaced.is_none(), "QUIC session id {id} issued twice");
        inc(&self.metrics.quic_handshakes);
        inc(&self.metrics.quic_connections_open);
        Some(id)
    }

    /// Offer spare connection ids once the handshake is done, for migration.
    fn issue_spare_cids(&mut self, id: u64) {
        let Some(entry) = self.connections.get(&id) else {
            return;
        };
        let conn = &entry.connection.conn;
        if !conn.is_established() || conn.active_scids() > SPARE_CIDS || conn.scids_left() == 0 {
            return;
        }
        let cid = self.new_cid();
        let mut reset = [0u8; 16];
        random(&mut reset);
        let Some(entry) = self.connections.get_mut(&id) else {
            return;
        };
        if entry
            .connection
            .conn
            .new_scid(
                &quiche::ConnectionId::from_ref(&cid),
                u128::from_be_bytes(reset),
                false,
            )
            .is_ok()
        {
            self.by_cid.insert(cid.clone(), id);
            entry.cids.push(cid);
        }
    }

    fn send_now(&mut self, now: Now, to: SocketAddr, data: Vec<u8>) {
        let transmit = Transmit {
            to,
            at: now.instant,
            segment: data.len(),
            data,
        };
        self.outbox.push(transmit, now.instant);
    }

    fn new_cid(&self) -> Vec<u8> {
        let mut cid = vec![0u8; CID_LEN];
        random(&mut cid[1..]);
        cid[0] = self.shard as u8;
        cid
    }
}

fn mark_dirty(dirty: &mut Vec<u64>, id: u64, entry: &mut Entry) {
    if !entry.dirty {
        entry.dirty = true;
        dirty.push(id);
    }
}
