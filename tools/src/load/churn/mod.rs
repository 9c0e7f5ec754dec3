//! The mixed scenario's churn sessions of their own: floods, garbage and half-open
//! connections. Each acts once per `--churn-every` (an episode), on its own socket and
//! with a raw WebSocket (`raw`), and each episode is checked against what the protocol
//! says the server does with it (`judge`). The chat clients' churn (reconnect storms,
//! slow readers) lives in `client.rs`, where their resumes are verified with the chat.

pub mod judge;
pub mod raw;

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::client::{Ctx, Timer};
use super::report::Verification;
use super::scenario::{ChurnKind, Plan};
use super::stats::{ChurnStats, Live};
use judge::{Case, Episode, Seen, Verdict, GARBAGE, HALF_OPEN};
use raw::{Read, Reader, Shape, OP_BINARY, OP_PING, OP_PONG, OP_TEXT};

/// Pings in a flood's one frame: past the default burst (200) and abuse strikes (50)
/// together, so the frame ends in 4008, and no more (all of one frame is handled in one
/// turn of the server's shard: the soak's debug build feels every document of it).
const FLOOD_PINGS: u64 = 300;
/// A text frame over the default `max_frame_bytes` (64 KiB), under `max_frame_hard_bytes`.
const TOO_LARGE_BYTES: usize = 100 * 1024;
/// The length a frame over the default `max_frame_hard_bytes` (1 MiB) announces.
const OVER_HARD_LIMIT_BYTES: u64 = 2 << 20;
/// Tokens stay valid for the whole run.
const TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// A churn session: its socket (between episodes too, for garbage the server survives)
/// and the episode under way.
pub struct ChurnClient {
    index: u32,
    /// Its token in the worker's poll, and its slot in the worker's timers.
    slot: u32,
    kind: ChurnKind,
    /// Its place among the sessions of its kind: (rank, how many).
    rank: (usize, usize),
    token: String,
    conn: Option<TcpStream>,
    /// The TCP connect finished (the first writable event).
    connected: bool,
    reader: Reader,
    /// Bytes waiting for the socket.
    out: Vec<u8>,
    /// What the case sends once the upgrade is answered.
    after_upgrade: Vec<u8>,
    episode: Option<Episode>,
    /// When the episode under way gives up waiting.
    deadline: u64,
    episodes: u32,
    next_id: u64,
}

impl ChurnClient {
    pub fn new(plan: &Plan, index: u32, slot: u32) -> Self {
        let kind = plan
            .churn
            .map_or(ChurnKind::Flood, |churn| churn.kind(index));
        let same: Vec<u32> = (0..plan.churn.map_or(0, |churn| churn.sessions()))
            .filter(|&other| plan.churn.is_some_and(|churn| churn.kind(other) == kind))
            .collect();
        let rank = same.iter().position(|&other| other == index).unwrap_or(0);
        ChurnClient {
            index,
            slot,
            kind,
            rank: (rank, same.len()),
            token: crate::mint_token(&plan.secret, &plan.churn_user(index), None, TOKEN_TTL),
            conn: None,
            connected: false,
            reader: Reader::default(),
            out: Vec::new(),
            after_upgrade: Vec::new(),
            episode: None,
            deadline: 0,
            episodes: 0,
            next_id: 1,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The session's period came round: start the next episode, unless one is still
    /// under way (a half-open connection the server has not timed out yet).
    pub fn tick(&mut self, ctx: &mut Ctx) {
        if self.episode.is_some() {
            return ctx.stats.churn.count("episode_still_running");
        }
        // The sessions of a kind start spread over its cases, so a short run still sees
        // every case.
        let (rank, of) = self.rank;
        let turn = |cases: usize| (self.episodes as usize + rank * cases / of.max(1)) % cases;
        let case = match self.kind {
            ChurnKind::Flood => Case::Flood,
            ChurnKind::Garbage => GARBAGE[turn(GARBAGE.len())],
            ChurnKind::HalfOpen => HALF_OPEN[turn(HALF_OPEN.len())],
        };
        self.episodes += 1;
        let (garbage_id, ping_id) = (self.id(), self.id());
        let mut bytes = Vec::new();
        write_case(&mut bytes, case, garbage_id, ping_id);
        self.episode = Some(Episode::new(case, garbage_id, ping_id));
        Live::add(&ctx.live.churning, 1);
        self.deadline = ctx.now + ctx.plan.churn.map_or(0, |churn| churn.wait_ns);
        ctx.timers
            .push(Reverse((self.deadline, self.slot, Timer::ChurnDeadline)));
        let reusable = self.conn.is_some() && self.reader.status == Some(101);
        if case.needs_session() && reusable {
            self.out.extend_from_slice(&bytes);
            return self.write();
        }
        self.disconnect(ctx);
        let host = ctx.plan.target.to_string();
        match case {
            Case::StopMidUpgrade => {
                // The request line and one header, and never the blank line that ends it.
                self.out = format!("GET /v1/ws HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
            }
            _ => {
                self.out = raw::upgrade_request(&host, Some(&self.token));
                self.after_upgrade = bytes;
            }
        }
        if let Err(why) = self.connect(ctx) {
            self.judged(
                ctx,
                Verdict::Failed(format!("{}: connect: {why}", case.event())),
            );
        }
    }

    fn connect(&mut self, ctx: &mut Ctx) -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        let source = ctx.plan.source(self.index);
        socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
        match socket.connect(&ctx.plan.target.into()) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(error) => return Err(error),
        }
        let mut stream = TcpStream::from_std(socket.into());
        ctx.registry.register(
            &mut stream,
            Token(self.slot as usize),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.conn = Some(stream);
        self.connected = false;
        self.reader = Reader::default();
        Ok(())
    }

    fn disconnect(&mut self, ctx: &mut Ctx) {
        if let Some(mut stream) = self.conn.take() {
            let _ = ctx.registry.deregister(&mut stream);
        }
        self.out.clear();
        self.after_upgrade.clear();
        self.reader = Reader::default();
    }

    /// The episode's wait is over (if `due` is still its deadline).
    pub fn deadline(&mut self, ctx: &mut Ctx, due: u64) {
        if due != self.deadline {
            return;
        }
        if let Some(episode) = &self.episode {
            let why = format!("{}: no answer within --churn-wait", episode.case().event());
            self.judged(ctx, Verdict::Failed(why));
        }
    }

    /// The socket is readable or writable.
    pub fn on_event(&mut self, ctx: &mut Ctx) {
        let Some(stream) = self.conn.as_mut() else {
            return;
        };
        if !self.connected {
            match (stream.take_error(), stream.peer_addr()) {
                (Ok(None), Ok(_)) => self.connected = true,
                (Ok(None), Err(error)) if error.kind() == ErrorKind::NotConnected => return,
                (Ok(Some(error)) | Err(error), _) | (_, Err(error)) => {
                    return self.ended(ctx, Some(format!("connect: {:?}", error.kind())));
                }
            }
        }
        self.write();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let Some(stream) = self.conn.as_mut() else {
                return;
            };
            match stream.read(&mut buffer) {
                Ok(0) => return self.ended(ctx, None),
                Ok(n) => {
                    self.reader.feed(&buffer[..n]);
                    self.take_reads(ctx);
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return self.ended(ctx, Some(format!("{:?}", error.kind()))),
            }
        }
    }

    fn write(&mut self) {
        let Some(stream) = self.conn.as_mut() else {
            return;
        };
        if !self.connected {
            return;
        }
        while !self.out.is_empty() {
            match stream.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                // The server closed first: what it sent says why; the read side sees it.
                Err(_) => {
                    self.out.clear();
                    return;
                }
            }
        }
    }

    /// Hand what the server sent to the episode's check.
    fn take_reads(&mut self, ctx: &mut Ctx) {
        loop {
            let read = match self.reader.next_read() {
                Ok(Some(read)) => read,
                Ok(None) => return,
                Err(why) => {
                    let case = self
                        .episode
                        .as_ref()
                        .map_or("between episodes", |e| e.case().event());
                    ctx.stats.churn.violation(format!("{case}: {why}"));
                    return self.ended_quietly(ctx);
                }
            };
            let seen = match &read {
                Read::Response(status) => {
                    if *status == 101 {
                        let bytes = std::mem::take(&mut self.after_upgrade);
                        self.out.extend_from_slice(&bytes);
                        self.write();
                    }
                    Seen::Response(*status)
                }
                Read::Frame(frame) => {
                    let silent = self
                        .episode
                        .as_ref()
                        .is_some_and(|e| e.case() == Case::SilentAfterUpgrade);
                    if frame.opcode == OP_PING && !silent {
                        // A live session answers the heartbeat, so only a silent one
                        // is timed out.
                        raw::frame(&mut self.out, OP_PONG, &frame.payload, Shape::Normal);
                        self.write();
                    }
                    Seen::Frame(frame)
                }
            };
            let Some(episode) = self.episode.as_mut() else {
                // Between episodes the session only answers pings; a close (or a document)
                // then is not what the protocol has for a session that behaves.
                if let Read::Frame(frame) = &read {
                    if let Some(code) = frame.close_code() {
                        ctx.stats
                            .churn
                            .violation(format!("a behaving churn session was closed {code}"));
                        return self.ended_quietly(ctx);
                    }
                }
                continue;
            };
            let verdict = episode.see(seen);
            if verdict != Verdict::Open {
                self.judged(ctx, verdict);
            }
        }
    }

    /// The server ended the connection: EOF, or the error `why`.
    fn ended(&mut self, ctx: &mut Ctx, why: Option<String>) {
        match (&mut self.episode, why) {
            (Some(episode), None) => {
                let verdict = episode.see(Seen::Ended);
                self.judged(ctx, verdict);
            }
            (Some(episode), Some(why)) => {
                // A reset ends a mid-upgrade connection as well as a FIN does.
                let verdict = match episode.case() {
                    Case::StopMidUpgrade => episode.see(Seen::Ended),
                    case => Verdict::Failed(format!("{}: {why}", case.event())),
                };
                self.judged(ctx, verdict);
            }
            (None, why) => {
                if self.reader.status == Some(101) {
                    let why = why.unwrap_or_else(|| "EOF".into());
                    ctx.stats
                        .churn
                        .violation(format!("a behaving churn session was dropped: {why}"));
                }
            }
        }
        self.disconnect(ctx);
    }

    fn ended_quietly(&mut self, ctx: &mut Ctx) {
        if self.episode.is_some() {
            self.episode = None;
            Live::sub(&ctx.live.churning, 1);
        }
        self.disconnect(ctx);
    }

    /// The episode is over: count it, and close the connection unless the case keeps it.
    fn judged(&mut self, ctx: &mut Ctx, verdict: Verdict) {
        let Some(episode) = self.episode.take() else {
            return;
        };
        Live::sub(&ctx.live.churning, 1);
        let churn = &mut ctx.stats.churn;
        let keep = match verdict {
            Verdict::Open => unreachable!("only a closed verdict is judged"),
            Verdict::Passed(event) => {
                churn.count(event);
                if episode.case() == Case::Flood {
                    *churn.events.entry("flood_rate_limited").or_default() += episode.rate_limited;
                    *churn.events.entry("flood_accepted").or_default() += episode.accepted;
                }
                // The surviving garbage cases keep their session for the next episode.
                matches!(
                    episode.case(),
                    Case::NotJson
                        | Case::NotAnObject
                        | Case::NoOp
                        | Case::UnknownOp
                        | Case::Binary
                        | Case::TooLarge
                )
            }
            Verdict::Failed(why) => {
                churn.violation(why);
                false
            }
        };
        if !keep {
            self.disconnect(ctx);
        }
    }
}

/// The bytes of `case` once the session is upgraded: the garbage (with `garbage_id` where
/// it has an id), then for surviving cases a ping `ping_id`. A flood, on a connection of
/// its own, numbers its pings from 1.
fn write_case(out: &mut Vec<u8>, case: Case, garbage_id: u64, ping_id: u64) {
    let text =
        |out: &mut Vec<u8>, doc: &str| raw::frame(out, OP_TEXT, doc.as_bytes(), Shape::Normal);
    let ping = format!(r#"{{"id":{ping_id},"op":"ping"}}"#);
    match case {
        Case::Flood => {
            let lines: Vec<String> = (1..=FLOOD_PINGS)
                .map(|id| format!(r#"{{"id":{id},"op":"ping"}}"#))
                .collect();
            text(out, &lines.join("\n"));
            return;
        }
        Case::NotJson => text(out, &format!(r#"{{"id":{garbage_id},"op":"#)),
        Case::NotAnObject => text(out, "[1,2,3]"),
        Case::NoOp => text(out, &format!(r#"{{"id":{garbage_id}}}"#)),
        Case::UnknownOp => text(out, &format!(r#"{{"id":{garbage_id},"op":"frobnicate"}}"#)),
        Case::Binary => raw::frame(out, OP_BINARY, &[0, 1, 2, 3], Shape::Normal),
        Case::TooLarge => text(out, &"x".repeat(TOO_LARGE_BYTES)),
        Case::NotUtf8 => raw::frame(out, OP_TEXT, &[0xff, 0xfe, 0xfd], Shape::Normal),
        Case::ReservedBits => raw::frame(out, OP_TEXT, ping.as_bytes(), Shape::Reserved),
        Case::Unmasked => raw::frame(out, OP_TEXT, ping.as_bytes(), Shape::Unmasked),
        Case::OverHardLimit => raw::header_only(out, OP_TEXT, OVER_HARD_LIMIT_BYTES),
        Case::StopMidUpgrade | Case::SilentAfterUpgrade => return,
    }
    if matches!(
        case,
        Case::NotJson
            | Case::NotAnObject
            | Case::NoOp
            | Case::UnknownOp
            | Case::Binary
            | Case::TooLarge
    ) {
        text(out, &ping);
    }
}

/// The churn's part of the report: each event under `churn_<event>` in `extra`, the
/// violations in the verification (which they fail).
pub fn report(
    churn: &ChurnStats,
    extra: &mut BTreeMap<String, f64>,
    verification: &mut Verification,
) {
    for (event, count) in &churn.events {
        extra.insert(format!("churn_{event}"), *count as f64);
    }
    let violations: u64 = churn.violations.values().sum();
    extra.insert("churn_violations".into(), violations as f64);
    for (what, count) in &churn.violations {
        if verification.detail.len() < 40 {
            verification.detail.push(format!("churn: {count} x {what}"));
        }
    }
    if violations > 0 {
        verification.ok = false;
    }
}
