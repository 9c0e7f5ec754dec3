//! One simulated user: its socket, its WebSocket or QUIC session, the commands it has in
//! flight and what it has received. Driven by its worker's event loop; never blocks.
//!
//! A client reconnects by itself whenever its session ends (a storm drop, a close from
//! the server, a connect failure), with jittered exponential backoff, and resumes its
//! conversation from the last message it holds, resending its unanswered sends with
//! the same `cmid`s so that nothing is sent twice.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::nats::{self, ServerOp};
use super::scenario::{Kind, MixedOp, Plan, Protocol, Role};
use super::stats::{Live, Stats, PING_SKIPPED};
use super::wire::{self, Incoming, Stamp};
use crate::quic::{QuicOptions, QuicSession, Trust, MAX_UDP_PAYLOAD};

/// Timers a worker keeps: (due, client slot, what).
pub type Timers = BinaryHeap<Reverse<(u64, u32, Timer)>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// Open (or reopen) the connection.
    Connect,
    /// The next scheduled send or mixed operation.
    Send,
    /// The reconnect storm drops this session.
    Drop,
    /// A ping, for the idle scenario's latency round.
    Ping,
    /// quiche's timer (loss recovery, idle) of a QUIC session.
    Quic,
    /// The churn's period came round for this chat client (reconnect storm, slow reader),
    /// or for this churn session (its next episode).
    ChurnTick,
    /// A slow reader reads again.
    StallEnd,
    /// A churn session's episode waited long enough for the server's answer.
    ChurnDeadline,
}

/// The run's clock and windows, in nanoseconds since the run's epoch.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Sends are scheduled from here (the warm-up starts).
    pub send_from: u64,
    /// Latencies of sends scheduled from here on are measured.
    pub measure_from: u64,
    /// No send is scheduled at or after this.
    pub send_until: u64,
}

impl Window {
    /// Latencies are kept for sends scheduled in the window; rates count what happened
    /// in it (so under overload they show what the server got through, not the offer).
    pub fn measures(&self, ns: u64) -> bool {
        (self.measure_from..self.send_until).contains(&ns)
    }
}

/// What a handler needs from its worker.
pub struct Ctx<'a> {
    pub now: u64,
    pub plan: &'a Plan,
    pub window: Option<Window>,
    pub stats: &'a mut Stats,
    pub live: &'a Live,
    pub timers: &'a mut Timers,
    pub registry: &'a Registry,
    /// Slots with unflushed writes.
    pub dirty: &'a mut Vec<u32>,
    /// The worker's quiche client configuration, when the run speaks QUIC.
    pub quic: Option<&'a mut quiche::Config>,
}

impl Ctx<'_> {
    /// The timeline second of `now`, if sending has started.
    fn second(&mut self) -> Option<&mut super::stats::SecondStats> {
        let window = self.window?;
        let since = self.now.checked_sub(window.send_from)?;
        Some(self.stats.second(since / 1_000_000_000))
    }
}

enum Conn {
    Closed,
    Connecting(TcpStream),
    Handshaking(MidHandshake<ClientHandshake<TcpStream>>),
    Open(WebSocket<TcpStream>),
    Quic(Box<QuicLink>),
}

/// A QUIC session and its own UDP socket.
struct QuicLink {
    socket: UdpSocket,
    session: QuicSession,
    local: SocketAddr,
    /// The handshake completed and `opened` ran.
    open: bool,
    /// The instant (run ns) quiche's timer is queued for.
    timer_at: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    /// `conv.list`: joins the chat, so live delivery to this session is certain.
    Join,
    Setup,
    Ping,
    Hello,
    Sync,
    Send {
        counter: u64,
    },
    Op(MixedOp),
    /// One of a slow reader's history pages, asked for just before it stops reading.
    Burst,
}

struct Pending {
    id: u64,
    command: Command,
    /// When the command was due (a send's scheduled time), for its latency.
    since: u64,
}

/// A send scheduled and not yet acknowledged.
#[derive(Clone, Copy)]
struct Queued {
    counter: u64,
    scheduled_ns: u64,
}

/// What this client holds of its conversation.
#[derive(Default)]
struct Received {
    /// Every seq in 1..=contiguous has arrived.
    contiguous: u64,
    /// Seqs above `contiguous` that arrived before the gap below them closed.
    above: BTreeSet<u64>,
    max: u64,
    /// New messages per sending client (the count the verification compares).
    from: HashMap<u32, u64>,
    duplicates: u64,
    out_of_order: u64,
}

impl Received {
    /// Record `seq`; false when it was already held.
    fn insert(&mut self, seq: u64, replaying: bool) -> bool {
        if seq <= self.contiguous || self.above.contains(&seq) {
            self.duplicates += 1;
            return false;
        }
        if seq < self.max && !replaying {
            self.out_of_order += 1;
        }
        self.max = self.max.max(seq);
        if seq == self.contiguous + 1 {
            self.contiguous = seq;
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.above.insert(seq);
        }
        true
    }
}

/// Where a resume stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    /// Nothing to resume.
    None,
    /// The session ended at `since`; the next connection resumes.
    Needed { since: u64, storm: bool },
    /// `hello` with `resume` (or a follow-up `sync`) sent; waiting for the last `synced`.
    Running { since: u64, storm: bool },
}

/// What the verification needs from one client at the end.
pub struct Outcome {
    pub client: u32,
    pub acked: u64,
    pub from: HashMap<u32, u64>,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub ready: bool,
}

pub struct Client {
    pub index: u32,
    slot: u32,
    role: Role,
    token: String,
    conn: Conn,
    /// Scheduled time of the current connection attempt.
    connect_due: u64,
    attempts: u32,
    conv: Option<String>,
    ready: bool,
    next_id: u64,
    pending: VecDeque<Pending>,
    /// Sends scheduled and not yet written.
    backlog: VecDeque<Queued>,
    /// Sends written and not yet answered (also in `pending`).
    unanswered: VecDeque<Queued>,
    counter: u64,
    acked: u64,
    received: Received,
    resume: Resume,
    dirty: bool,
    rng: u64,
    out: String,
    /// Partial NATS input, when the run speaks NATS.
    nats: Option<nats::Input>,
    user: String,
    partner: Option<String>,
    /// One of the churn's slow readers.
    slow: bool,
    /// A slow reader that stopped reading (until its StallEnd).
    stalled: bool,
    /// The stall's outcome is not known yet: the burst's replies all arrived (it caught
    /// up) or the server closed the session (4009, the only close it may give).
    stall_pending: bool,
    /// Burst replies still to come.
    burst_left: u64,
}

/// History pages a slow reader asks for in one frame before it stops reading, and their
/// size: with a conversation of a few hundred messages, several MiB of replies, past the
/// default `outbound_queue_bytes` (1 MiB) and the socket buffers; within the default
/// burst (200), so none is rate-limited.
const SLOW_BURST_PAGES: u64 = 150;
const SLOW_BURST_PAGE_SIZE: u32 = 50;
/// A slow reader's socket receive buffer: small, so what it does not read stays with the
/// server (the kernel's autotuned loopback buffers would otherwise take megabytes).
const SLOW_READER_RCVBUF_BYTES: usize = 4096;

/// Longest backoff between reconnect attempts.
const BACKOFF_MAX_NS: u64 = 5_000_000_000;
const BACKOFF_FIRST_NS: u64 = 50_000_000;
/// Messages and frames the generator accepts from the server (above its own limits).
const READ_BUFFER_BYTES: usize = 4096;
const WRITE_BUFFER_LIMIT_BYTES: usize = 16 << 20;
/// Sessions stay valid for the whole run.
const TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

impl Client {
    pub fn new(plan: &Plan, index: u32, slot: u32) -> Self {
        let token = crate::mint_token(&plan.secret, &plan.user(index), None, TOKEN_TTL);
        Client {
            index,
            slot,
            role: plan.role(index),
            token,
            conn: Conn::Closed,
            connect_due: 0,
            attempts: 0,
            conv: None,
            ready: false,
            next_id: 1,
            pending: VecDeque::new(),
            backlog: VecDeque::new(),
            unanswered: VecDeque::new(),
            counter: 0,
            acked: 0,
            received: Received::default(),
            resume: Resume::None,
            dirty: false,
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(index).wrapping_mul(0xD1B5_4A32_D192_ED03),
            out: String::new(),
            nats: (plan.protocol == Protocol::Nats).then(nats::Input::default),
            user: plan.user(index),
            partner: match plan.role(index) {
                Role::Pair { partner } => Some(plan.user(partner)),
                _ => None,
            },
            slow: plan.is_slow_reader(index),
            stalled: false,
            stall_pending: false,
            burst_left: 0,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// A session is up: a WebSocket after its upgrade, QUIC after its handshake.
    fn is_open(&self) -> bool {
        match &self.conn {
            Conn::Open(_) => true,
            Conn::Quic(link) => link.open,
            _ => false,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: cheap, and per client so runs are repeatable.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Start a connection attempt that was due at `due`.
    pub fn connect(&mut self, ctx: &mut Ctx, due: u64) {
        if !matches!(self.conn, Conn::Closed) {
            return;
        }
        self.connect_due = due;
        if ctx.plan.protocol == Protocol::Quic {
            return self.connect_quic(ctx);
        }
        match open_socket(ctx.plan, self.index, self.slow) {
            Ok(mut stream) => {
                match ctx.registry.register(
                    &mut stream,
                    Token(self.slot as usize),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => self.conn = Conn::Connecting(stream),
                    Err(error) => self.connect_failed(ctx, &error.to_string()),
                }
            }
            Err(error) => self.connect_failed(ctx, &format!("{:?}", error.kind())),
        }
    }

    fn connect_failed(&mut self, ctx: &mut Ctx, why: &str) {
        ctx.stats.failed_connects += 1;
        ctx.stats.error(&format!("connect: {why}"));
        self.conn = Conn::Closed;
        self.attempts = self.attempts.saturating_add(1);
        let backoff = BACKOFF_FIRST_NS
            .saturating_mul(1 << self.attempts.min(10))
            .min(BACKOFF_MAX_NS);
        let at = ctx.now + backoff / 2 + self.random() % backoff.max(1);
        ctx.timers.push(Reverse((at, self.slot, Timer::Connect)));
    }

    /// The socket is readable or writable.
    pub fn on_event(&mut self, ctx: &mut Ctx) {
        loop {
            match std::mem::replace(&mut self.conn, Conn::Closed) {
                Conn::Closed => return,
                Conn::Connecting(stream) => {
                    match stream.take_error() {
                        Ok(None) => {}
                        Ok(Some(error)) | Err(error) => {
                            return self.lost(ctx, stream, &format!("{:?}", error.kind()))
                        }
                    }
                    match stream.peer_addr() {
                        Ok(_) => {}
                        Err(error) if error.kind() == ErrorKind::NotConnected => {
                            self.conn = Conn::Connecting(stream);
                            return;
                        }
                        Err(error) => {
                            return self.lost(ctx, stream, &format!("{:?}", error.kind()))
                        }
                    }
                    let request = match self.upgrade_request(ctx.plan) {
                        Ok(request) => request,
                        Err(error) => return self.lost(ctx, stream, &error),
                    };
                    let config = WebSocketConfig::default()
                        .read_buffer_size(READ_BUFFER_BYTES)
                        .max_write_buffer_size(WRITE_BUFFER_LIMIT_BYTES);
                    self.handshake_step(
                        ctx,
                        tungstenite::client::client_with_config(request, stream, Some(config)),
                    );
                }
                Conn::Handshaking(mid) => self.handshake_step(ctx, mid.handshake()),
                Conn::Open(ws) => {
                    self.conn = Conn::Open(ws);
                    if self.stalled {
                        // Not reading: only what is buffered goes out.
                        return self.flush(ctx);
                    }
                    self.read_all(ctx);
                    // Writable again, or replies were written: push out what is buffered.
                    self.flush(ctx);
                    return;
                }
                Conn::Quic(link) => {
                    self.conn = Conn::Quic(link);
                    return self.quic_input(ctx);
                }
            }
            if !matches!(self.conn, Conn::Open(_)) {
                return;
            }
            // Just opened: the server may already have sent something; read on.
        }
    }

    fn upgrade_request(
        &self,
        plan: &Plan,
    ) -> Result<tungstenite::handshake::client::Request, String> {
        let target = plan.target;
        if plan.protocol == Protocol::Nats {
            return format!("ws://{target}/")
                .into_client_request()
                .map_err(|e| e.to_string());
        }
        let mut request = format!("ws://{target}/v1/ws")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| "token is not a header value".to_string())?;
        request.headers_mut().insert("authorization", bearer);
        Ok(request)
    }

    fn handshake_step(
        &mut self,
        ctx: &mut Ctx,
        step: Result<
            (
                WebSocket<TcpStream>,
                tungstenite::handshake::client::Response,
            ),
            HandshakeError<ClientHandshake<TcpStream>>,
        >,
    ) {
        match step {
            Ok((ws, _response)) => {
                self.conn = Conn::Open(ws);
                self.opened(ctx);
            }
            Err(HandshakeError::Interrupted(mid)) => self.conn = Conn::Handshaking(mid),
            Err(HandshakeError::Failure(error)) => {
                ctx.stats.failed_connects += 1;
                ctx.stats.error(&format!("upgrade: {error}"));
                self.reconnect_later(ctx, None);
            }
        }
    }

    /// A connect attempt failed before the upgrade.
    fn lost(&mut self, ctx: &mut Ctx, mut stream: TcpStream, why: &str) {
        let _ = ctx.registry.deregister(&mut stream);
        drop(stream);
        self.connect_failed(ctx, why);
    }

    fn opened(&mut self, ctx: &mut Ctx) {
        if self.nats.is_some() {
            return self.nats_opened(ctx);
        }
        // Over QUIC the token travels in the first document, which must be hello.
        let token = match self.conn {
            Conn::Quic(_) => format!(r#""token":"{}""#, self.token),
            _ => String::new(),
        };
        match self.resume {
            Resume::Needed { since, storm } => {
                let conv = self.conv.clone().unwrap_or_default();
                let mut fields = wire::cursors("resume", &[(&conv, self.received.contiguous)]);
                if !token.is_empty() {
                    fields = format!("{token},{fields}");
                }
                self.command(ctx, Command::Hello, "hello", &fields);
                self.resume = Resume::Running { since, storm };
            }
            _ => {
                if !token.is_empty() {
                    self.command(ctx, Command::Hello, "hello", &token);
                }
                let latency = ctx.now.saturating_sub(self.connect_due);
                ctx.stats.record("connect", latency);
            }
        }
        if self.conv.is_some() || self.ready {
            // Back after a drop: sends that were never answered go first, same cmids.
            while let Some(queued) = self.unanswered.pop_back() {
                self.backlog.push_front(queued);
            }
            self.pending.retain(|p| matches!(p.command, Command::Hello));
            self.pump(ctx);
        } else {
            self.setup(ctx);
        }
    }

    /// The scenario's first command: join the chat (idle sessions only ping).
    fn setup(&mut self, ctx: &mut Ctx) {
        match self.role {
            Role::Idle => self.command(ctx, Command::Setup, "ping", ""),
            _ => self.command(ctx, Command::Join, "conv.list", ""),
        }
    }

    /// Joined: create the conversation, if this client is the one that does.
    fn create(&mut self, ctx: &mut Ctx) {
        match self.role {
            Role::Pair { partner } => {
                let fields = format!(
                    r#""kind":"direct","members":["{}"]"#,
                    ctx.plan.user(partner)
                );
                self.command(ctx, Command::Setup, "conv.create", &fields);
            }
            Role::Group { first, size } if first == self.index => {
                let mut fields = String::from(r#""kind":"group","members":["#);
                for member in first..first + size {
                    if member != first {
                        fields.push(',');
                    }
                    fields.push('"');
                    fields.push_str(&ctx.plan.user(member));
                    fields.push('"');
                }
                fields.push(']');
                self.command(ctx, Command::Setup, "conv.create", &fields);
            }
            Role::Group { .. } | Role::Idle => self.set_up(ctx),
        }
    }

    fn set_up(&mut self, ctx: &mut Ctx) {
        // Backoff resets only once a session proved usable: a server that upgrades and
        // then refuses (4001) keeps growing it.
        self.attempts = 0;
        self.ready = true;
        Live::add(&ctx.live.ready, 1);
        self.pump(ctx);
    }

    /// Write one command document now.
    fn command(&mut self, ctx: &mut Ctx, command: Command, op: &str, fields: &str) {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        wire::command(&mut self.out, id, op, fields);
        if op != "typing" {
            Live::add(&ctx.live.outstanding, 1);
            self.pending.push_back(Pending {
                id,
                command,
                since: ctx.now,
            });
        }
        self.write_out(ctx);
    }

    fn write_out(&mut self, ctx: &mut Ctx) {
        if let Conn::Quic(link) = &mut self.conn {
            link.session.send_document(&self.out);
            self.out.clear();
            if !self.dirty {
                self.dirty = true;
                ctx.dirty.push(self.slot);
            }
            return;
        }
        let Conn::Open(ws) = &mut self.conn else {
            return;
        };
        let text = std::mem::take(&mut self.out);
        let message = if self.nats.is_some() {
            Message::binary(text.into_bytes())
        } else {
            Message::text(text)
        };
        match ws.write(message) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(error)) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) => return self.closed(ctx, &format!("write: {error}")),
        }
        if !self.dirty {
            self.dirty = true;
            ctx.dirty.push(self.slot);
        }
    }

    /// Write out what is buffered; called once per loop turn for each dirty client.
    pub fn flush(&mut self, ctx: &mut Ctx) {
        self.dirty = false;
        if let Conn::Quic(_) = self.conn {
            return self.quic_output(ctx);
        }
        let Conn::Open(ws) = &mut self.conn else {
            return;
        };
        match ws.flush() {
            Ok(()) => {}
            // The writable event will call back.
            Err(tungstenite::Error::Io(error)) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) => self.closed(ctx, &format!("write: {error}")),
        }
    }

    fn read_all(&mut self, ctx: &mut Ctx) {
        loop {
            let Conn::Open(ws) = &mut self.conn else {
                return;
            };
            match ws.read() {
                Ok(Message::Text(text)) if self.nats.is_some() => {
                    self.nats_input(ctx, text.as_bytes())
                }
                Ok(Message::Binary(bytes)) if self.nats.is_some() => self.nats_input(ctx, &bytes),
                Ok(Message::Text(text)) => {
                    for line in text.as_str().split('\n') {
                        if !line.is_empty() {
                            self.document(ctx, line);
                        }
                    }
                }
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return self.closed(ctx, &format!("close: {code}"));
                }
                Ok(_) => {
                    // Pings are answered by tungstenite on the next flush.
                    if !self.dirty {
                        self.dirty = true;
                        ctx.dirty.push(self.slot);
                    }
                }
                Err(tungstenite::Error::Io(error)) if error.kind() == ErrorKind::WouldBlock => {
                    return
                }
                Err(error) => return self.closed(ctx, &format!("read: {error}")),
            }
        }
    }

    fn document(&mut self, ctx: &mut Ctx, line: &str) {
        let doc: Incoming = match serde_json::from_str(line) {
            Ok(doc) => doc,
            Err(_) => return ctx.stats.error("unparsed document"),
        };
        if let Some(ev) = doc.ev {
            return self.event(ctx, ev, &doc);
        }
        let Some(id) = doc.re else {
            if let Some(err) = &doc.err {
                ctx.stats.error(&format!("{} (re: null)", err.code));
            }
            return;
        };
        let Some(position) = self.pending.iter().position(|p| p.id == id) else {
            return ctx.stats.error("reply to no command");
        };
        let Some(pending) = self.pending.remove(position) else {
            return;
        };
        if ctx.window.is_some_and(|w| w.measures(ctx.now)) {
            ctx.stats.replies += 1;
        }
        Live::sub(&ctx.live.outstanding, 1);
        if pending.command == Command::Burst {
            if let Some(err) = &doc.err {
                ctx.stats.churn.violation(format!(
                    "a slow reader's history page answered {}",
                    err.code
                ));
            }
            return self.burst_reply(ctx);
        }
        if let Some(err) = &doc.err {
            return self.failed(ctx, pending, &err.code);
        }
        let latency = ctx.now.saturating_sub(pending.since);
        match pending.command {
            Command::Join => self.create(ctx),
            Command::Setup => {
                if let Some(conv) = doc.ok.as_ref().and_then(|ok| ok.conv) {
                    self.conv = Some(conv.to_string());
                }
                ctx.stats.record("setup", latency);
                self.set_up(ctx);
            }
            Command::Ping => ctx.stats.record("ping", latency),
            Command::Hello | Command::Sync | Command::Burst => {}
            Command::Send { counter } => {
                if let Some(position) = self.unanswered.iter().position(|q| q.counter == counter) {
                    self.unanswered.remove(position);
                }
                self.acked += 1;
                Live::add(&ctx.live.acked, 1);
                Live::add(&ctx.live.owed, ctx.plan.recipients_per_message());
                if ctx.window.is_some_and(|w| w.measures(ctx.now)) {
                    ctx.stats.acked += 1;
                }
                if ctx.window.is_some_and(|w| w.measures(pending.since)) {
                    ctx.stats.record("ack", latency);
                    ctx.stats.done += 1;
                }
                if let Some(second) = ctx.second() {
                    second.acked += 1;
                }
                self.pump(ctx);
            }
            Command::Op(op) => {
                if ctx.window.is_some_and(|w| w.measures(pending.since)) {
                    ctx.stats.record(op_name(op), latency);
                    ctx.stats.done += 1;
                }
            }
        }
    }

    fn failed(&mut self, ctx: &mut Ctx, pending: Pending, code: &str) {
        ctx.stats.error(code);
        Live::add(&ctx.live.errors, 1);
        if let Some(second) = ctx.second() {
            second.errors += 1;
        }
        if let Command::Send { counter } = pending.command {
            let position = self.unanswered.iter().position(|q| q.counter == counter);
            let queued = position.and_then(|p| self.unanswered.remove(p));
            match queued {
                // Nothing changed on the server: send the same cmid again.
                Some(queued) if code == "unavailable" => {
                    self.backlog.push_front(queued);
                    Live::add(&ctx.live.outstanding, 1);
                    self.pump(ctx);
                }
                _ => {}
            }
        }
    }

    fn event(&mut self, ctx: &mut Ctx, ev: &str, doc: &Incoming) {
        match ev {
            "msg" => {
                let Some(seq) = doc.seq else { return };
                if self.conv.is_none() {
                    self.conv = doc.conv.map(str::to_string);
                }
                let replaying = matches!(self.resume, Resume::Running { .. });
                if !self.received.insert(seq, replaying) {
                    return;
                }
                let Some(stamp) = doc.body.and_then(Stamp::parse) else {
                    return;
                };
                if stamp.sender != self.index {
                    self.delivered(ctx, stamp);
                }
            }
            "conv" if self.conv.is_none() => {
                self.conv = doc.conv.map(str::to_string);
            }
            "synced" => {
                let Resume::Running { since, storm } = self.resume else {
                    return;
                };
                match &doc.more {
                    Some(more) if !more.is_empty() => {
                        let cursors: Vec<(&str, u64)> =
                            more.iter().map(|c| (c.conv.as_str(), c.after)).collect();
                        let fields = wire::cursors("cursors", &cursors);
                        self.command(ctx, Command::Sync, "sync", &fields);
                    }
                    _ => {
                        self.resume = Resume::None;
                        self.attempts = 0;
                        if storm && ctx.plan.churn.is_some() {
                            ctx.stats.churn.count("reconnect_resumed");
                        }
                        let name = if storm { "storm_resume" } else { "resume" };
                        ctx.stats.record(name, ctx.now.saturating_sub(since));
                        if storm {
                            Live::sub(&ctx.live.resuming, 1);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The session ended: count it, keep what must be resent, and come back later.
    fn closed(&mut self, ctx: &mut Ctx, why: &str) {
        if !self.ready {
            // Ended before it was set up (a refused token, say): a failed attempt.
            ctx.stats.failed_connects += 1;
        }
        if self.slow {
            return self.slow_reader_closed(ctx, why);
        }
        ctx.stats.error(why);
        Live::add(&ctx.live.errors, 1);
        self.reconnect_later(ctx, None);
    }

    /// Drop the connection and schedule the next attempt at `at` (or after backoff).
    fn reconnect_later(&mut self, ctx: &mut Ctx, at: Option<u64>) {
        match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Closed => {}
            Conn::Connecting(mut stream) => {
                let _ = ctx.registry.deregister(&mut stream);
            }
            Conn::Handshaking(mut mid) => {
                let _ = ctx.registry.deregister(mid.get_mut().get_mut());
            }
            Conn::Open(mut ws) => {
                let _ = ctx.registry.deregister(ws.get_mut());
            }
            Conn::Quic(mut link) => {
                let _ = ctx.registry.deregister(&mut link.socket);
            }
        }
        // Commands other than sends are not resent: they stop being outstanding.
        let lost = self
            .pending
            .iter()
            .filter(|p| !matches!(p.command, Command::Send { .. }))
            .count();
        Live::sub(&ctx.live.outstanding, lost as u64);
        self.pending
            .retain(|p| matches!(p.command, Command::Send { .. }));
        self.resume = match self.resume {
            Resume::None if self.conv.is_some() => Resume::Needed {
                since: ctx.now,
                storm: false,
            },
            // Lost again mid-resume: the next connection resumes from scratch.
            Resume::Running { since, storm } => Resume::Needed { since, storm },
            other => other,
        };
        if !self.ready {
            // Not set up yet: start over.
            self.pending.clear();
        }
        let at = at.unwrap_or_else(|| {
            self.attempts = self.attempts.saturating_add(1);
            let backoff = BACKOFF_FIRST_NS
                .saturating_mul(1 << self.attempts.min(10))
                .min(BACKOFF_MAX_NS);
            ctx.now + backoff / 2 + self.random() % backoff.max(1)
        });
        ctx.timers.push(Reverse((at, self.slot, Timer::Connect)));
    }

    /// The reconnect storm: vanish now, come back after a jittered delay, resume. False
    /// when the session was not there to drop (offline, or still back from the last one).
    pub fn storm_drop(&mut self, ctx: &mut Ctx, jitter_ns: u64) -> bool {
        if !self.is_open() || self.conv.is_none() {
            return false;
        }
        if let Resume::Running { storm: true, .. } | Resume::Needed { storm: true, .. } =
            self.resume
        {
            return false;
        }
        Live::add(&ctx.live.resuming, 1);
        ctx.stats.storm_dropped += 1;
        self.resume = Resume::Needed {
            since: ctx.now,
            storm: true,
        };
        let at = ctx.now + self.random() % jitter_ns.max(1);
        self.reconnect_later(ctx, Some(at));
        true
    }

    /// The churn's period `round` came round: drop and resume if this round's storm
    /// picks this session, or stop reading for a while if it is a slow reader.
    pub fn churn_tick(&mut self, ctx: &mut Ctx, round: u64) {
        let Some(churn) = ctx.plan.churn else {
            return;
        };
        if ctx.plan.churn_drops(self.index, round)
            && self.storm_drop(ctx, churn.reconnect_jitter_ns)
        {
            ctx.stats.churn.count("reconnect_dropped");
        }
        if self.slow {
            self.stall(ctx, churn.slow_for_ns);
        }
    }

    /// A slow reader asks for a burst of history pages in one frame, then reads nothing
    /// for `slow_for_ns` (and writes nothing: its sends wait, its other operations are
    /// skipped), so the replies pile up at the server.
    fn stall(&mut self, ctx: &mut Ctx, slow_for_ns: u64) {
        let usable = self.is_open() && self.ready && self.resume == Resume::None;
        let Some(conv) = self.conv.clone().filter(|_| usable && !self.stall_pending) else {
            return ctx.stats.churn.count("slow_stall_skipped");
        };
        let fields = format!(r#""conv":"{conv}","limit":{SLOW_BURST_PAGE_SIZE}"#);
        let mut frame = String::new();
        for _ in 0..SLOW_BURST_PAGES {
            let id = self.next_id;
            self.next_id += 1;
            if !frame.is_empty() {
                frame.push('\n');
            }
            wire::command(&mut frame, id, "history", &fields);
            self.pending.push_back(Pending {
                id,
                command: Command::Burst,
                since: ctx.now,
            });
        }
        Live::add(&ctx.live.outstanding, SLOW_BURST_PAGES);
        Live::add(&ctx.live.churning, 1);
        ctx.stats.churn.count("slow_stalls");
        self.burst_left = SLOW_BURST_PAGES;
        self.stall_pending = true;
        self.out = frame;
        self.write_out(ctx);
        self.stalled = true;
        let at = ctx.now + slow_for_ns;
        ctx.timers.push(Reverse((at, self.slot, Timer::StallEnd)));
    }

    /// The slow reader reads again: what the server kept for it, or its close.
    pub fn stall_end(&mut self, ctx: &mut Ctx) {
        if !std::mem::replace(&mut self.stalled, false) {
            return;
        }
        if self.is_open() {
            self.read_all(ctx);
            self.flush(ctx);
            self.pump(ctx);
        }
    }

    fn burst_reply(&mut self, ctx: &mut Ctx) {
        self.burst_left = self.burst_left.saturating_sub(1);
        if self.burst_left == 0 && self.stall_pending {
            self.stall_pending = false;
            Live::sub(&ctx.live.churning, 1);
            ctx.stats.churn.count("slow_caught_up");
        }
    }

    /// A slow reader's session ended: 4009 is the close the protocol has for it (9.7);
    /// it resumes like any other session.
    fn slow_reader_closed(&mut self, ctx: &mut Ctx, why: &str) {
        self.stalled = false;
        if why == "close: 4009" {
            ctx.stats.churn.count("slow_closed_4009");
        } else {
            ctx.stats.churn.violation(format!(
                "a slow reader's session ended ({why}), not with 4009"
            ));
        }
        if std::mem::replace(&mut self.stall_pending, false) {
            Live::sub(&ctx.live.churning, 1);
        }
        // Its burst's replies were dropped with the queue.
        self.burst_left = 0;
        Live::add(&ctx.live.errors, 1);
        self.reconnect_later(ctx, None);
    }

    /// A send (or mixed operation) is due at `scheduled`.
    pub fn scheduled(&mut self, ctx: &mut Ctx, scheduled: u64) {
        let measured = ctx.window.is_some_and(|w| w.measures(scheduled));
        if measured {
            ctx.stats.scheduled += 1;
        }
        let op = match ctx.plan.kind {
            Kind::Mixed => {
                let total = ctx.plan.mix.total();
                let draw = (self.random() % u64::from(total)) as u32;
                ctx.plan.mix.pick(draw)
            }
            _ => MixedOp::Send,
        };
        let seq = self.received.contiguous;
        let conv = match &self.conv {
            Some(conv) => conv.clone(),
            // NATS sessions publish to their partner's subject: no conversation.
            None if self.nats.is_some() => String::new(),
            None => return,
        };
        let usable = self.is_open() && self.resume == Resume::None && !self.stalled;
        match op {
            MixedOp::Send => {
                self.counter += 1;
                self.backlog.push_back(Queued {
                    counter: self.counter,
                    scheduled_ns: scheduled,
                });
                Live::add(&ctx.live.outstanding, 1);
                self.pump(ctx);
            }
            // Other operations are not worth doing late or offline: skip them then.
            _ if !usable || self.pending.len() >= ctx.plan.max_inflight => {
                ctx.stats.skipped += u64::from(measured);
                ctx.stats
                    .error("mixed op skipped (session busy or offline)");
            }
            MixedOp::Ack | MixedOp::Read if seq == 0 => ctx.stats.skipped += u64::from(measured),
            MixedOp::Ack | MixedOp::Read => {
                let name = if op == MixedOp::Ack { "ack" } else { "read" };
                let fields = format!(r#""conv":"{conv}","seq":{seq}"#);
                self.op(ctx, op, name, &fields, scheduled);
            }
            MixedOp::Typing => {
                let fields = format!(r#""conv":"{conv}","on":true"#);
                self.command(ctx, Command::Op(op), "typing", &fields);
                if measured {
                    // Typing has no reply: count it as done once written.
                    ctx.stats.replies += 1;
                    ctx.stats.done += 1;
                }
            }
            MixedOp::History => {
                let fields = format!(r#""conv":"{conv}","limit":20"#);
                self.op(ctx, op, "history", &fields, scheduled);
            }
        }
    }

    fn op(&mut self, ctx: &mut Ctx, op: MixedOp, name: &str, fields: &str, scheduled: u64) {
        self.command(ctx, Command::Op(op), name, fields);
        if let Some(last) = self.pending.back_mut() {
            last.since = scheduled;
        }
    }

    /// Idle scenario: one ping now.
    pub fn ping(&mut self, ctx: &mut Ctx) {
        Live::add(&ctx.live.pinged, 1);
        if !self.is_open() || !self.ready {
            return ctx.stats.error(PING_SKIPPED);
        }
        if self.nats.is_some() {
            self.nats_command(ctx, Command::Ping, "PING\r\n".into());
        } else {
            self.command(ctx, Command::Ping, "ping", "");
        }
    }

    /// NATS: connect, subscribe to our subject, and PING; the PONG means both are done.
    fn nats_opened(&mut self, ctx: &mut Ctx) {
        let latency = ctx.now.saturating_sub(self.connect_due);
        ctx.stats.record("connect", latency);
        self.pending.clear();
        self.nats_command(ctx, Command::Setup, nats::hello(&self.user));
    }

    /// Write a NATS frame; a PING-carrying one is answered by a PONG, in order.
    fn nats_command(&mut self, ctx: &mut Ctx, command: Command, frame: String) {
        Live::add(&ctx.live.outstanding, 1);
        self.pending.push_back(Pending {
            id: 0,
            command,
            since: ctx.now,
        });
        self.out = frame;
        self.write_out(ctx);
    }

    fn nats_input(&mut self, ctx: &mut Ctx, bytes: &[u8]) {
        let Some(input) = self.nats.as_mut() else {
            return;
        };
        if let Err(error) = input.feed(bytes) {
            return self.closed(ctx, &error);
        }
        loop {
            let Some(input) = self.nats.as_mut() else {
                return;
            };
            match input.next_op() {
                Ok(None) => return,
                Ok(Some(op)) => self.nats_op(ctx, op),
                Err(error) => return self.closed(ctx, &error),
            }
        }
    }

    fn nats_op(&mut self, ctx: &mut Ctx, op: ServerOp) {
        match op {
            ServerOp::Info | ServerOp::Ok => {}
            ServerOp::Ping => {
                self.out = "PONG\r\n".into();
                self.write_out(ctx);
            }
            ServerOp::Err(text) => ctx.stats.error(&format!("nats: {text}")),
            ServerOp::Pong => {
                let Some(pending) = self.pending.pop_front() else {
                    return;
                };
                Live::sub(&ctx.live.outstanding, 1);
                let latency = ctx.now.saturating_sub(pending.since);
                match pending.command {
                    Command::Setup => {
                        ctx.stats.record("setup", latency);
                        self.set_up(ctx);
                    }
                    _ => ctx.stats.record("ping", latency),
                }
            }
            ServerOp::Msg(payload) => {
                let Some(stamp) = std::str::from_utf8(&payload).ok().and_then(Stamp::parse) else {
                    return ctx.stats.error("nats: payload without a stamp");
                };
                // One publisher per subject: its counter is the order it published in.
                if !self.received.insert(stamp.counter, false) {
                    return;
                }
                self.delivered(ctx, stamp);
            }
        }
    }

    /// A new message from another client arrived: count it and its latency.
    fn delivered(&mut self, ctx: &mut Ctx, stamp: Stamp) {
        *self.received.from.entry(stamp.sender).or_default() += 1;
        Live::add(&ctx.live.delivered, 1);
        let latency = ctx.now.saturating_sub(stamp.scheduled_ns);
        if ctx.window.is_some_and(|w| w.measures(ctx.now)) {
            ctx.stats.delivered += 1;
        }
        if ctx.window.is_some_and(|w| w.measures(stamp.scheduled_ns)) {
            ctx.stats.record("e2e", latency);
        }
        if let Some(second) = ctx.second() {
            second.delivered += 1;
            second.latency.saturating_record(latency.max(1));
        }
    }

    /// NATS has no acknowledgement: a publish counts as done once written.
    fn nats_publish(&mut self, ctx: &mut Ctx, queued: Queued) {
        let Some(partner) = self.partner.clone() else {
            return;
        };
        let stamp = Stamp {
            scheduled_ns: queued.scheduled_ns,
            sender: self.index,
            counter: queued.counter,
        };
        let mut body = String::new();
        stamp.write_body(ctx.plan.message_size, &mut body);
        self.out.clear();
        nats::publish(&mut self.out, &partner, &body);
        self.acked += 1;
        Live::add(&ctx.live.sent, 1);
        Live::add(&ctx.live.acked, 1);
        Live::add(&ctx.live.owed, 1);
        Live::sub(&ctx.live.outstanding, 1);
        if ctx.window.is_some_and(|w| w.measures(ctx.now)) {
            ctx.stats.sent += 1;
            ctx.stats.acked += 1;
        }
        if ctx.window.is_some_and(|w| w.measures(queued.scheduled_ns)) {
            ctx.stats.done += 1;
        }
        if let Some(second) = ctx.second() {
            second.sent += 1;
            second.acked += 1;
        }
        self.write_out(ctx);
    }

    /// Write queued sends while the in-flight cap allows.
    fn pump(&mut self, ctx: &mut Ctx) {
        let resume_sent = !matches!(self.resume, Resume::Needed { .. });
        if !self.is_open() || !self.ready || !resume_sent || self.stalled {
            return;
        }
        if self.nats.is_some() {
            while let Some(queued) = self.backlog.pop_front() {
                self.nats_publish(ctx, queued);
                if !matches!(self.conn, Conn::Open(_)) {
                    return;
                }
            }
            return;
        }
        let Some(conv) = self.conv.clone() else {
            return;
        };
        while self.unanswered.len() < ctx.plan.max_inflight {
            let Some(queued) = self.backlog.pop_front() else {
                return;
            };
            let id = self.next_id;
            self.next_id += 1;
            self.out.clear();
            let stamp = Stamp {
                scheduled_ns: queued.scheduled_ns,
                sender: self.index,
                counter: queued.counter,
            };
            wire::send(&mut self.out, id, &conv, &stamp, ctx.plan.message_size);
            self.pending.push_back(Pending {
                id,
                command: Command::Send {
                    counter: queued.counter,
                },
                since: queued.scheduled_ns,
            });
            self.unanswered.push_back(queued);
            Live::add(&ctx.live.sent, 1);
            if ctx.window.is_some_and(|w| w.measures(ctx.now)) {
                ctx.stats.sent += 1;
            }
            if let Some(second) = ctx.second() {
                second.sent += 1;
            }
            self.write_out(ctx);
            if !self.is_open() {
                return;
            }
        }
    }

    /// Open a QUIC session on its own UDP socket from this client's source address.
    fn connect_quic(&mut self, ctx: &mut Ctx) {
        let Some(config) = ctx.quic.as_deref_mut() else {
            return self.connect_failed(ctx, "no QUIC configuration");
        };
        let bound =
            std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ctx.plan.source(self.index)), 0))
                .and_then(|socket| {
                    socket.set_nonblocking(true)?;
                    socket.connect(ctx.plan.target)?;
                    let local = socket.local_addr()?;
                    Ok((UdpSocket::from_std(socket), local))
                });
        let (mut socket, local) = match bound {
            Ok(bound) => bound,
            Err(error) => return self.connect_failed(ctx, &format!("{:?}", error.kind())),
        };
        let options = QuicOptions {
            trust: Trust::Insecure,
            server_name: "localhost".into(),
            datagrams: true,
        };
        let session = match QuicSession::connect(config, &options, local, ctx.plan.target) {
            Ok(session) => session,
            Err(error) => return self.connect_failed(ctx, &error.to_string()),
        };
        if let Err(error) =
            ctx.registry
                .register(&mut socket, Token(self.slot as usize), Interest::READABLE)
        {
            return self.connect_failed(ctx, &error.to_string());
        }
        self.conn = Conn::Quic(Box::new(QuicLink {
            socket,
            session,
            local,
            open: false,
            timer_at: None,
        }));
        self.quic_output(ctx);
    }

    /// The run is over: close a QUIC session (application code 1000) and send the close.
    pub fn end_quic_session(&mut self) {
        let Conn::Quic(link) = &mut self.conn else {
            return;
        };
        link.session.close(1000, "run over");
        let mut out = [0u8; MAX_UDP_PAYLOAD];
        while let Some((len, to)) = link.session.poll_transmit(&mut out) {
            let _lost = link.socket.send_to(&out[..len], to);
        }
    }

    /// Datagrams arrived: feed them to quiche, then handle what the session has.
    fn quic_input(&mut self, ctx: &mut Ctx) {
        let Conn::Quic(link) = &mut self.conn else {
            return;
        };
        let mut buffer = [0u8; 2048];
        loop {
            match link.socket.recv_from(&mut buffer) {
                Ok((len, from)) => link
                    .session
                    .on_datagram(&mut buffer[..len], from, link.local),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                // An ICMP error from an earlier send; the session's timers decide.
                Err(_) => break,
            }
        }
        self.quic_progress(ctx);
    }

    /// quiche's timer fired (if `due` is still the one queued).
    pub fn quic_timer(&mut self, ctx: &mut Ctx, due: u64) {
        let Conn::Quic(link) = &mut self.conn else {
            return;
        };
        if link.timer_at != Some(due) {
            return;
        }
        link.timer_at = None;
        link.session.on_timeout();
        self.quic_progress(ctx);
    }

    /// Open the session once the handshake is done, read its documents, notice its end.
    fn quic_progress(&mut self, ctx: &mut Ctx) {
        let Conn::Quic(link) = &mut self.conn else {
            return;
        };
        match link.session.is_ready() {
            Ok(true) if !link.open => {
                link.open = true;
                self.opened(ctx);
            }
            Ok(_) => {}
            Err(error) => {
                let why = match error {
                    crate::quic::QuicClientError::Closed { code, .. } => format!("close: {code}"),
                    other => other.to_string(),
                };
                return self.closed(ctx, &why);
            }
        }
        loop {
            let Conn::Quic(link) = &mut self.conn else {
                return;
            };
            let Some(document) = link.session.next_document() else {
                break;
            };
            self.document(ctx, &document);
        }
        self.quic_output(ctx);
    }

    /// Send what quiche has and queue its timer.
    fn quic_output(&mut self, ctx: &mut Ctx) {
        let Conn::Quic(link) = &mut self.conn else {
            return;
        };
        let mut out = [0u8; MAX_UDP_PAYLOAD];
        while let Some((len, to)) = link.session.poll_transmit(&mut out) {
            // A full socket buffer loses the datagram; quiche's recovery resends it.
            let _lost = link.socket.send_to(&out[..len], to);
        }
        if let Some(wait) = link.session.timeout() {
            let at = ctx.now + wait.as_nanos() as u64;
            if link.timer_at.is_none_or(|armed| at < armed) {
                link.timer_at = Some(at);
                ctx.timers.push(Reverse((at, self.slot, Timer::Quic)));
            }
        }
    }

    pub fn outcome(&self) -> Outcome {
        Outcome {
            client: self.index,
            acked: self.acked,
            from: self.received.from.clone(),
            gaps: self.received.above.len() as u64,
            duplicates: self.received.duplicates,
            out_of_order: self.received.out_of_order,
            ready: self.ready,
        }
    }
}

/// Latency names of the mixed operations (`ack` alone is a send's durable `ok`).
pub fn op_name(op: MixedOp) -> &'static str {
    match op {
        MixedOp::Send => "op_send",
        MixedOp::Ack => "op_ack",
        MixedOp::Read => "op_read",
        MixedOp::Typing => "op_typing",
        MixedOp::History => "op_history",
    }
}

/// A non-blocking TCP socket bound to the client's source address, connecting.
fn open_socket(plan: &Plan, client: u32, slow: bool) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if slow {
        // Before connecting, so the window it offers is small from the start.
        socket.set_recv_buffer_size(SLOW_READER_RCVBUF_BYTES)?;
    }
    socket.bind(&SocketAddr::new(IpAddr::V4(plan.source(client)), 0).into())?;
    match socket.connect(&plan.target.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    Ok(TcpStream::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_tracks_gaps_duplicates_and_order() {
        let mut received = Received::default();
        assert!(received.insert(1, false));
        assert!(received.insert(3, false));
        assert_eq!((received.contiguous, received.above.len()), (1, 1));
        assert!(received.insert(2, false));
        assert_eq!(received.out_of_order, 1);
        assert_eq!((received.contiguous, received.above.len()), (3, 0));
        assert!(!received.insert(2, false));
        assert_eq!(received.duplicates, 1);
        assert!(received.insert(5, true));
        assert!(received.insert(4, true));
        assert_eq!(received.out_of_order, 1);
        assert_eq!(received.contiguous, 5);
    }
}
