//! A shard's QUIC endpoint, sans-IO: the runtime hands it datagrams (with the clock) and
//! takes back datagrams to send and session updates for the shard's core.
//!
//! - **Connection ids encode the owning shard** (first byte), so a packet the kernel's
//!   SO_REUSEPORT hash delivers elsewhere (after a NAT rebinding or a migration changed
//!   the client's address) is recognised and forwarded to its owner over a ring.
//! - **Stateless retry** (on by default): a new client first proves its address by echoing
//!   a token bound to that address; nothing is allocated for a spoofed Initial.
//! - **Bounded**: unknown connection ids and malformed packets are dropped without
//!   allocating; connections per shard are capped (`quic_max_connections_per_shard`).
//! - **Pacing**: each datagram carries quiche's `send_info.at`; the runtime sends it then.
//! - **GSO**: runs of equal-size packets to one peer leave as one buffer the kernel splits
//!   (`UDP_SEGMENT`), when the socket supports it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use parley_router::clock::Now;
use parley_router::protocol::Doc;
use parley_router::session::{ChatRequest, SessionConfig};
use sha2::Sha256;

use crate::metrics::{dec, inc, ShardMetrics};
use crate::quic_conn::QuicConnection;

/// Length of the connection ids this server issues: one byte of shard, fifteen random.
pub const CID_LEN: usize = 16;
/// The smallest datagram that may carry a client's first Initial (RFC 9000 section 14.1).
const MIN_INITIAL_BYTES: usize = 1200;
/// A retry token is honoured this long after it was issued.
const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const RETRY_TOKEN_MAGIC: &[u8; 4] = b"prt1";
const RETRY_MAC_BYTES: usize = 16;
/// Spare connection ids offered to each client, so it can migrate to a new path.
const SPARE_CIDS: usize = 2;

/// Most segments the kernel accepts in one GSO send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (a UDP datagram's payload limit).
const GSO_MAX_BYTES: usize = 65_000;
/// Ids of QUIC sessions have the top bit set, so they never meet a TCP session's id.
pub const QUIC_SESSION_ID_BIT: u64 = 1 << 63;

/// The QUIC settings of a shard (each a named setting of `parleyd`).
#[derive(Debug, Clone)]
pub struct QuicSettings {
    pub idle_timeout: Duration,
    pub max_streams_bidi: u64,
    pub stream_window_bytes: u64,
    pub connection_window_bytes: u64,
    pub max_connections: usize,
    pub retry: bool,
    pub max_udp_payload_bytes: usize,
    pub datagram_queue_len: usize,
    pub write_batch_bytes: usize,
    pub max_client_addresses: u64,
}

/// One datagram (or, with GSO, a run of equal-size datagrams) to send.
#[derive(Debug)]
pub struct Transmit {
    pub to: SocketAddr,
    /// When to send it (pacing).
    pub at: Instant,
    /// Size of each datagram in `data` but the last, for GSO; `data.len()` for one.
    pub segment: usize,
    pub data: Vec<u8>,
}

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

/// Paced datagrams, earliest first.
struct Paced(Instant, u64, Transmit);

impl PartialEq for Paced {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Paced {}
impl PartialOrd for Paced {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Paced {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

pub struct QuicEndpoint {
    shard: usize,
    shards: usize,
    local: SocketAddr,
    config: quiche::Config,
    settings: QuicSettings,
    session_config: Arc<SessionConfig>,
    metrics: Arc<ShardMetrics>,
    retry_key: [u8; 32],
    /// GSO segment size, when the socket sends with UDP_SEGMENT.
    gso: Option<usize>,
    connections: HashMap<u64, Entry>,
    by_cid: HashMap<Vec<u8>, u64>,
    next_id: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    dirty: Vec<u64>,
    updates: Vec<SessionUpdate>,
    ready: VecDeque<Transmit>,
    paced: BinaryHeap<Reverse<Paced>>,
    paced_seq: u64,
    /// One packet being built, and stream/datagram reads.
    scratch: Box<[u8]>,
    out: Box<[u8]>,
}

/// Keys shared by every shard of the process.
#[derive(Clone)]
pub struct QuicKeys {
    /// Authenticates retry tokens, so any shard can check one another minted.
    pub retry: [u8; 32],
    /// Encrypts TLS session tickets, so a resumption (0-RTT) works on any shard.
    pub tickets: [u8; 48],
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
            retry_key: keys.retry,
            gso,
            connections: HashMap::new(),
            by_cid: HashMap::new(),
            next_id: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            updates: Vec::new(),
            ready: VecDeque::new(),
            paced: BinaryHeap::new(),
            paced_seq: 0,
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
            produce(
                &mut entry.connection.conn,
                &mut self.out,
                self.gso,
                &mut self.ready,
                &mut self.paced,
                &mut self.paced_seq,
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
        if let Some(Reverse(Paced(at, _, _))) = self.paced.peek() {
            if *at <= now {
                return self
                    .paced
                    .pop()
                    .map(|Reverse(Paced(_, _, transmit))| transmit);
            }
        }
        self.ready.pop_front()
    }

    /// Datagrams wait to be sent (now or paced).
    pub fn has_output(&self) -> bool {
        !self.ready.is_empty() || !self.paced.is_empty()
    }

    /// A datagram is due by `now`.
    pub fn has_due(&self, now: Instant) -> bool {
        !self.ready.is_empty() || self.next_paced().is_some_and(|at| at <= now)
    }

    /// When the next paced datagram is due, if any waits.
    pub fn next_paced(&self) -> Option<Instant> {
        self.paced.peek().map(|Reverse(Paced(at, _, _))| *at)
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
            let mut out = vec![0; MIN_INITIAL_BYTES];
            if let Ok(len) = quiche::negotiate_version(&header.scid, &header.dcid, &mut out) {
                out.truncate(len);
                self.send_now(now, from, out);
            }
            return None;
        }
        if self.connections.len() >= self.settings.max_connections {
            inc(&self.metrics.connections_refused);
            return None;
        }
        let (scid, odcid) = if self.settings.retry {
            if token.is_empty() {
                let retry_scid = self.new_cid();
                let token = self.mint_token(now, from, &header.dcid, &retry_scid);
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
            let Some(odcid) = self.validate_token(now, from, token, &header.dcid) else {
                inc(&self.metrics.quic_bad_tokens);
                return None;
            };
            // The retry's source id (ours, with our shard byte) becomes the connection's.
            (header.dcid.to_vec(), Some(odcid))
        } else {
            (self.new_cid(), None)
        };
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
        self.connections.insert(
            id,
            Entry {
                connection: Box::new(connection),
                cids,
                armed: None,
                dirty: false,
                reported_closed: false,
            },
        );
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
        self.ready.push_back(Transmit {
            to,
            at: now.instant,
            segment: data.len(),
            data,
        });
    }

    fn new_cid(&self) -> Vec<u8> {
        let mut cid = vec![0u8; CID_LEN];
        random(&mut cid[1..]);
        cid[0] = self.shard as u8;
        cid
    }

    /// `magic | issued (unix s, u64) | odcid len | odcid | mac`, the MAC binding the
    /// client's address, the time, the original id and the retry's source id.
    fn mint_token(&self, now: Now, from: SocketAddr, odcid: &[u8], retry_scid: &[u8]) -> Vec<u8> {
        let issued = now.unix_ms / 1000;
        let mut token = Vec::with_capacity(4 + 8 + 1 + odcid.len() + RETRY_MAC_BYTES);
        token.extend_from_slice(RETRY_TOKEN_MAGIC);
        token.extend_from_slice(&issued.to_be_bytes());
        token.push(odcid.len() as u8);
        token.extend_from_slice(odcid);
        let mac = self.token_mac(from, issued, odcid, retry_scid);
        token.extend_from_slice(&mac);
        token
    }

    /// The original destination id a valid token carries.
    fn validate_token(
        &self,
        now: Now,
        from: SocketAddr,
        token: &[u8],
        retry_scid: &[u8],
    ) -> Option<Vec<u8>> {
        let rest = token.strip_prefix(RETRY_TOKEN_MAGIC)?;
        let issued = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let odcid_len = usize::from(*rest.get(8)?);
        let odcid = rest.get(9..9 + odcid_len)?;
        let mac = rest.get(9 + odcid_len..)?;
        let age = (now.unix_ms / 1000).checked_sub(issued)?;
        if age > RETRY_TOKEN_LIFETIME.as_secs() || mac.len() != RETRY_MAC_BYTES {
            return None;
        }
        let expected = self.token_mac(from, issued, odcid, retry_scid);
        // Constant time: the MAC is a secret-derived value.
        let differs = expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (differs == 0).then(|| odcid.to_vec())
    }

    fn token_mac(
        &self,
        from: SocketAddr,
        issued: u64,
        odcid: &[u8],
        retry_scid: &[u8],
    ) -> [u8; RETRY_MAC_BYTES] {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.retry_key)
            .expect("HMAC takes a key of any length");
        match from {
            SocketAddr::V4(addr) => mac.update(&addr.ip().octets()),
            SocketAddr::V6(addr) => mac.update(&addr.ip().octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(&issued.to_be_bytes());
        mac.update(&[odcid.len() as u8]);
        mac.update(odcid);
        mac.update(retry_scid);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; RETRY_MAC_BYTES];
        out.copy_from_slice(&full[..RETRY_MAC_BYTES]);
        out
    }
}

fn mark_dirty(dirty: &mut Vec<u64>, id: u64, entry: &mut Entry) {
    if !entry.dirty {
        entry.dirty = true;
        dirty.push(id);
    }
}

/// Everything quiche has to send for one connection, as transmits: equal-size packets to
/// one peer are joined for GSO; a packet due later (pacing) waits in `paced`.
fn produce(
    conn: &mut quiche::Connection,
    out: &mut [u8],
    gso: Option<usize>,
    ready: &mut VecDeque<Transmit>,
    paced: &mut BinaryHeap<Reverse<Paced>>,
    paced_seq: &mut u64,
    now: Instant,
) {
    let mut batch: Option<Transmit> = None;
    let mut finish = |batch: Option<Transmit>| {
        if let Some(transmit) = batch {
            if transmit.at > now {
                *paced_seq += 1;
                paced.push(Reverse(Paced(transmit.at, *paced_seq, transmit)));
            } else {
                ready.push_back(transmit);
            }
        }
    };
    loop {
        let (len, info) = match conn.send(out) {
            Ok(sent) => sent,
            Err(quiche::Error::Done) => break,
            Err(_) => {
                let _closing = conn.close(false, 0x1, b"internal error");
                break;
            }
        };
        let packet = &out[..len];
        if let Some(current) = batch.as_mut() {
            let joins = gso == Some(current.segment)
                && current.to == info.to
                && current.data.len() % current.segment == 0
                && len <= current.segment
                && current.data.len() / current.segment < GSO_MAX_SEGMENTS
                && current.data.len() + len <= GSO_MAX_BYTES
                && info.at <= current.at;
            if joins {
                current.data.extend_from_slice(packet);
                continue;
            }
        }
        finish(batch.take());
        batch = Some(Transmit {
            to: info.to,
            at: info.at,
            segment: len,
            data: packet.to_vec(),
        });
    }
    finish(batch);
}

/// Fill `bytes` from the operating system's CSPRNG (BoringSSL's).
pub fn random(bytes: &mut [u8]) {
    if boring::rand::rand_bytes(bytes).is_err() {
        // BoringSSL's RNG aborts rather than fail; this is unreachable in practice.
        for byte in bytes.iter_mut() {
            *byte = 0;
        }
    }
}

/// quiche's configuration for a shard's endpoint: TLS from `tls`, ALPN `parley/1`, the
/// named limits, DATAGRAM frames, 0-RTT, and the process-wide ticket key.
pub fn server_config(
    settings: &QuicSettings,
    tls: &crate::quic_cert::TlsFiles,
    keys: &QuicKeys,
) -> Result<quiche::Config, String> {
    let path = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: not UTF-8", p.display()))
    };
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
    config
        .load_cert_chain_from_pem_file(&path(&tls.cert)?)
        .map_err(|error| format!("certificate {}: {error}", tls.cert.display()))?;
    config
        .load_priv_key_from_pem_file(&path(&tls.key)?)
        .map_err(|error| format!("key {}: {error}", tls.key.display()))?;
    config
        .set_application_protos(&[ALPN])
        .map_err(|e| e.to_string())?;
    config
        .set_ticket_key(&keys.tickets)
        .map_err(|e| format!("ticket key: {e}"))?;
    config.enable_early_data();
    config.set_max_idle_timeout(settings.idle_timeout.as_millis() as u64);
    config.set_max_recv_udp_payload_size(settings.max_udp_payload_bytes);
    config.set_max_send_udp_payload_size(settings.max_udp_payload_bytes);
    config.set_initial_max_data(settings.connection_window_bytes);
    config.set_initial_max_stream_data_bidi_remote(settings.stream_window_bytes);
    config.set_initial_max_stream_data_bidi_local(settings.stream_window_bytes);
    config.set_initial_max_streams_bidi(settings.max_streams_bidi);
    config.set_initial_max_streams_uni(0);
    config.set_max_connection_window(settings.connection_window_bytes);
    config.set_max_stream_window(settings.stream_window_bytes);
    // quiche keeps a path per client address while the client reuses its connection id (a
    // NAT rebinding does), and sizes its path table by this limit.
    config.set_active_connection_id_limit(settings.max_client_addresses.max(SPARE_CIDS as u64 + 1));
    config.set_disable_active_migration(false);
    config.enable_dgram(
        true,
        settings.datagram_queue_len,
        settings.datagram_queue_len,
    );
    config.enable_pacing(true);
    Ok(config)
}

/// The ALPN of the Parley protocol over QUIC (PROTOCOL.md section 1).
pub const ALPN: &[u8] = b"parley/1";
