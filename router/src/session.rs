//! The client session protocol (PROTOCOL.md sections 2-3) as a sans-IO state machine.
//!
//! The transport feeds it text frames and clock ticks with `now` passed in; it answers
//! with documents to send (a bounded outbound queue) and actions (heartbeat ping, close).
//! It owns authentication, the envelope, the per-session rate limit and the abuse
//! policy; it never touches a socket, so WebSocket and QUIC drivers share it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{is_valid_id, AuthError, Claims, JwtKey};
use crate::clock::Now;
use crate::command::{self, ChatCommand, Cursor, CHAT_OPS};
use crate::limits::ChatLimits;
use crate::protocol::{encode_err, encode_ok, CloseCode, Doc, ErrorCode};
use crate::rate::TokenBucket;

/// Device id used when neither the token nor `hello` names one.
pub const DEFAULT_DEVICE: &str = "default";

/// The limits of one session. Every field is a named, documented setting of `parleyd`.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// A connection must authenticate within this time (close 4002).
    pub auth_timeout: Duration,
    /// With no inbound traffic for this long, the transport sends a heartbeat ping.
    pub heartbeat_interval: Duration,
    /// With no inbound traffic for this long, the session is closed (1001).
    pub idle_timeout: Duration,
    /// A text frame longer than this gets `too_large`; the session stays open.
    pub max_frame_bytes: usize,
    /// Sustained inbound documents per second.
    pub rate_per_sec: u32,
    /// Inbound documents allowed in a burst above the sustained rate.
    pub rate_burst: u32,
    /// Consecutive rejected documents (rate-limited, malformed, unknown op, oversized or
    /// binary frame) before close 4008.
    pub abuse_strikes: u32,
    /// Documents waiting for the socket before the session is closed with 4009.
    pub outbound_queue_len: usize,
    /// Bytes waiting for the socket before the session is closed with 4009.
    pub outbound_queue_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            auth_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_frame_bytes: 64 * 1024,
            rate_per_sec: 100,
            rate_burst: 200,
            abuse_strikes: 50,
            outbound_queue_len: 1024,
            outbound_queue_bytes: 1024 * 1024,
        }
    }
}

/// What every session of a process shares.
#[derive(Debug)]
pub struct SessionConfig {
    pub limits: SessionLimits,
    pub chat: ChatLimits,
    pub jwt: JwtKey,
    /// This node's name, reported in `welcome`.
    pub node: String,
}

/// What the transport must do besides sending queued documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a transport-level heartbeat (a WebSocket ping).
    Ping,
    /// Send the close frame, then shut the connection. Queued documents were sent first.
    Close {
        code: CloseCode,
        reason: &'static str,
    },
}

/// Things that happened, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    ErrorSent(ErrorCode),
    Authenticated,
}

#[derive(Debug)]
enum Phase {
    AwaitingAuth {
        deadline: Instant,
    },
    Active(Identity),
    /// Closing: nothing more is read; queued documents go out, then the close frame.
    Closing {
        code: CloseCode,
        reason: &'static str,
    },
}

/// Liveness of a quiet peer: one ping per silence, then the idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heartbeat {
    Quiet,
    PingDue,
    PingSent,
}

#[derive(Debug)]
struct Identity {
    user: String,
    device: String,
    /// Device came from the token, so `hello` may not change it.
    device_from_token: bool,
    said_hello: bool,
}

/// One client session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    id: String,
    phase: Phase,
    last_inbound: Instant,
    heartbeat: Heartbeat,
    rate: TokenBucket,
    strikes: u32,
    outbound: VecDeque<Doc>,
    outbound_bytes: usize,
    close_sent: bool,
    notes: Vec<Note>,
    /// Chat commands parsed from the last frame, for the transport to hand to the shard.
    requests: Vec<ChatRequest>,
}

/// A chat command for the shard's core, with the id its reply answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub re: u64,
    pub command: ChatCommand,
}

/// A document was refused because the outbound queue is full; the session is closing (4009).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOverflow;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct HelloArgs {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    resume: Option<Vec<Cursor>>,
}

#[derive(Serialize)]
struct Welcome<'a> {
    user: &'a str,
    device: &'a str,
    session: &'a str,
    node: &'a str,
    heartbeat_ms: u64,
    server_ts: u64,
}

#[derive(Serialize)]
struct Pong {
    server_ts: u64,
}

impl Session {
    /// A new connection. `upgrade_token` is the token the transport found at connect time
    /// (a WebSocket `Authorization` header or `?token=`), if any.
    pub fn new(
        config: Arc<SessionConfig>,
        id: String,
        upgrade_token: Option<&str>,
        now: Now,
    ) -> Self {
        let rate = TokenBucket::new(
            config.limits.rate_per_sec,
            config.limits.rate_burst,
            now.instant,
        );
        let deadline = now.instant + config.limits.auth_timeout;
        let mut session = Self {
            config,
            id,
            phase: Phase::AwaitingAuth { deadline },
            last_inbound: now.instant,
            heartbeat: Heartbeat::Quiet,
            rate,
            strikes: 0,
            outbound: VecDeque::new(),
            outbound_bytes: 0,
            close_sent: false,
            notes: Vec::new(),
            requests: Vec::new(),
        };
        if let Some(token) = upgrade_token {
            match session.config.jwt.verify(token, now.unix_ms / 1000) {
                Ok(claims) => session.activate(claims, None, false),
                Err(_) => session.close(CloseCode::Unauthorized, "invalid token"),
            }
        }
        session
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The authenticated user, once there is one.
    pub fn user(&self) -> Option<&str> {
        match &self.phase {
            Phase::Active(identity) => Some(&identity.user),
            _ => None,
        }
    }

    /// The authenticated user's device.
    pub fn device(&self) -> Option<&str> {
        match &self.phase {
            Phase::Active(identity) => Some(&identity.device),
            _ => None,
        }
    }

    /// True once the session said `hello` (with or without a token).
    pub fn said_hello(&self) -> bool {
        matches!(&self.phase, Phase::Active(identity) if identity.said_hello)
    }

    /// Chat commands accepted since the last call, in order.
    pub fn take_requests(&mut self) -> std::vec::Drain<'_, ChatRequest> {
        self.requests.drain(..)
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.phase, Phase::Active(_))
    }

    /// True once the session has decided to close; the transport stops reading.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// True once the close action was taken: the transport may drop the connection.
    pub fn is_finished(&self) -> bool {
        self.close_sent
    }

    /// Any inbound frame (data, ping or pong) proves the peer alive.
    pub fn on_inbound(&mut self, now: Now) {
        self.last_inbound = now.instant;
        self.heartbeat = Heartbeat::Quiet;
    }

    /// A text frame: one or more JSON documents separated by `\n`.
    pub fn on_text(&mut self, now: Now, frame: &str) {
        self.on_inbound(now);
        if self.is_closing() {
            return;
        }
        if frame.len() > self.config.limits.max_frame_bytes {
            self.on_oversized_frame(now, frame.len());
            return;
        }
        for document in frame.split('\n') {
            if self.is_closing() {
                return;
            }
            if !document.trim().is_empty() {
                self.on_document(now, document);
            }
        }
    }

    /// Exactly one JSON document, from a transport that frames documents itself (QUIC's
    /// length prefix): unlike [`on_text`](Self::on_text) it is not split at `\n`, so a
    /// pretty-printed document stays whole.
    pub fn on_document_frame(&mut self, now: Now, document: &str) {
        self.on_inbound(now);
        if self.is_closing() {
            return;
        }
        if document.len() > self.config.limits.max_frame_bytes {
            self.on_oversized_frame(now, document.len());
            return;
        }
        if !document.trim().is_empty() {
            self.on_document(now, document);
        }
    }

    /// A frame the transport discarded unread because it exceeded `max_frame_bytes`.
    pub fn on_oversized_frame(&mut self, now: Now, len: usize) {
        self.on_inbound(now);
        if self.is_closing() || !self.take_rate_token(now, None) {
            return;
        }
        let msg = format!(
            "frame of {len} bytes exceeds max_frame_bytes ({})",
            self.config.limits.max_frame_bytes
        );
        self.reject(None, ErrorCode::TooLarge, &msg);
    }

    /// A binary frame: the protocol uses text frames only.
    pub fn on_binary(&mut self, now: Now) {
        self.on_inbound(now);
        if self.is_closing() || !self.take_rate_token(now, None) {
            return;
        }
        self.reject(
            None,
            ErrorCode::BadRequest,
            "binary frames are not supported; send text",
        );
    }

    /// The earliest instant at which `on_tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitingAuth { deadline } => Some(*deadline),
            Phase::Active(_) if self.heartbeat == Heartbeat::Quiet => {
                Some(self.last_inbound + self.config.limits.heartbeat_interval)
            }
            Phase::Active(_) => Some(self.last_inbound + self.config.limits.idle_timeout),
            Phase::Closing { .. } => None,
        }
    }

    /// Timers: the auth deadline, heartbeats and the idle timeout.
    pub fn on_tick(&mut self, now: Now) {
        match &self.phase {
            Phase::AwaitingAuth { deadline } if now.instant >= *deadline => {
                self.close(CloseCode::AuthTimeout, "no valid token in time");
            }
            Phase::Active(_) => {
                let silent = now.instant.saturating_duration_since(self.last_inbound);
                if silent >= self.config.limits.idle_timeout {
                    self.close(CloseCode::GoingAway, "idle timeout");
                } else if silent >= self.config.limits.heartbeat_interval
                    && self.heartbeat == Heartbeat::Quiet
                {
                    self.heartbeat = Heartbeat::PingDue;
                }
            }
            _ => {}
        }
    }

    /// The server is draining: tell the client to reconnect elsewhere.
    pub fn drain(&mut self) {
        self.close(CloseCode::GoingAway, "server shutting down");
    }

    /// A fatal transport-level violation found by the driver (bad framing, say).
    pub fn protocol_violation(&mut self, code: CloseCode, reason: &'static str) {
        self.close(code, reason);
    }

    /// The peer closed the session (its close frame, or the transport ended): nothing
    /// more is read or sent.
    pub fn on_peer_closed(&mut self) {
        self.close(CloseCode::GoingAway, "peer closed");
        self.outbound.clear();
        self.outbound_bytes = 0;
        self.close_sent = true;
    }

    /// Queue a server event or a reply from the shard. On overflow the queue is dropped
    /// and the session closes with 4009 (the client reconnects and syncs; nothing
    /// committed is lost). An ephemeral event (typing, presence) is shed instead once the
    /// queue is half full.
    pub fn push_event(&mut self, document: Doc, ephemeral: bool) -> Result<(), QueueOverflow> {
        if ephemeral && self.outbound.len() * 2 >= self.config.limits.outbound_queue_len {
            return Ok(());
        }
        self.enqueue(document)
    }

    /// Documents waiting for the socket.
    pub fn outbound_len(&self) -> usize {
        self.outbound.len()
    }

    /// Up to `max_bytes` of queued documents joined by `\n` as one frame (always at least
    /// one document when any is queued, so an oversized event cannot wedge the queue).
    pub fn take_outbound_batch(&mut self, max_bytes: usize) -> Option<String> {
        let first = self.outbound.pop_front()?;
        self.outbound_bytes -= first.len();
        let mut batch = match first {
            Doc::Owned(text) => text,
            Doc::Shared(text) => text.to_string(),
        };
        while let Some(next) = self.outbound.front() {
            if batch.len() + 1 + next.len() > max_bytes {
                break;
            }
            let next = self.outbound.pop_front().expect("front exists");
            self.outbound_bytes -= next.len();
            batch.push('\n');
            batch.push_str(next.as_str());
        }
        Some(batch)
    }

    /// The limits this session runs under.
    pub fn limits(&self) -> &SessionLimits {
        &self.config.limits
    }

    /// The oldest queued document, for a transport that frames each one itself.
    pub fn pop_outbound(&mut self) -> Option<Doc> {
        let document = self.outbound.pop_front()?;
        self.outbound_bytes -= document.len();
        Some(document)
    }

    /// The next action for the transport. A close waits until the queue is empty so that
    /// replies sent before it (such as the `unauthorized` error) reach the client.
    pub fn poll_action(&mut self) -> Option<Action> {
        match self.phase {
            Phase::Closing { code, reason } if !self.close_sent && self.outbound.is_empty() => {
                self.close_sent = true;
                Some(Action::Close { code, reason })
            }
            Phase::Active(_) if self.heartbeat == Heartbeat::PingDue => {
                self.heartbeat = Heartbeat::PingSent;
                Some(Action::Ping)
            }
            _ => None,
        }
    }

    /// Metric notes since the last call.
    pub fn take_notes(&mut self) -> std::vec::Drain<'_, Note> {
        self.notes.drain(..)
    }

    fn on_document(&mut self, now: Now, document: &str) {
        // The envelope is parsed before the rate check (it is cheap next to any command)
        // so that even a rate-limited command gets its reply by id.
        let envelope = serde_json::from_str::<Envelope>(document);
        let re = envelope.as_ref().ok().and_then(|envelope| envelope.id);
        if !self.take_rate_token(now, re) {
            return;
        }
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err(error) => {
                let msg = format!("malformed command: {error}");
                return self.reject(None, ErrorCode::BadRequest, &msg);
            }
        };
        let (Some(op), Some(id)) = (envelope.op.as_deref(), envelope.id) else {
            let msg = if envelope.op.is_none() {
                "command has no \"op\""
            } else {
                "command has no \"id\""
            };
            return self.reject(None, ErrorCode::BadRequest, msg);
        };
        match (&self.phase, op) {
            (_, "hello") => self.on_hello(now, id, document),
            (Phase::AwaitingAuth { .. }, _) => {
                self.reply_err(
                    id,
                    ErrorCode::Unauthorized,
                    "authenticate first: send hello with a token",
                );
                self.close(CloseCode::Unauthorized, "command before authentication");
            }
            (_, "ping") => {
                self.strikes = 0;
                self.reply_ok(
                    id,
                    &Pong {
                        server_ts: now.unix_ms,
                    },
                );
            }
            (_, op) if CHAT_OPS.contains(&op) => {
                match command::parse(op, document, &self.config.chat) {
                    Ok(command) => {
                        self.strikes = 0;
                        self.requests.push(ChatRequest { re: id, command });
                    }
                    Err(refusal) => self.reject(Some(id), refusal.code, &refusal.msg),
                }
            }
            (_, op) => {
                let msg = format!("unknown op '{}'", truncate(op, 64));
                self.reject(Some(id), ErrorCode::BadRequest, &msg);
            }
        }
    }

    fn on_hello(&mut self, now: Now, id: u64, document: &str) {
        let Some((args, resume)) = self.hello_args(id, document) else {
            return;
        };
        let verified = args
            .token
            .as_deref()
            .map(|token| self.config.jwt.verify(token, now.unix_ms / 1000));
        let said = match &self.phase {
            Phase::AwaitingAuth { .. } => self.hello_authenticates(id, verified, args.device),
            Phase::Active(_) => self.hello_after_upgrade(id, verified, args.device),
            Phase::Closing { .. } => false,
        };
        if said {
            self.welcome(now, id, resume);
        }
    }

    /// `hello`'s fields and its `resume` command, or its one reply (an error) is sent.
    /// Checked before anything is answered: a hello gets exactly one reply.
    fn hello_args(&mut self, id: u64, document: &str) -> Option<(HelloArgs, Option<ChatCommand>)> {
        let mut args: HelloArgs = match serde_json::from_str(document) {
            Ok(args) => args,
            Err(error) => {
                let msg = format!("malformed hello: {error}");
                self.reject(Some(id), ErrorCode::BadRequest, &msg);
                return None;
            }
        };
        if args
            .device
            .as_deref()
            .is_some_and(|device| !is_valid_id(device))
        {
            let msg = "device must be 1-64 bytes of [A-Za-z0-9._@-]";
            self.reject(Some(id), ErrorCode::BadRequest, msg);
            return None;
        }
        let resume = match args
            .resume
            .take()
            .map(|cursors| command::resume(cursors, &self.config.chat))
        {
            Some(Err(refusal)) => {
                self.reject(Some(id), refusal.code, &refusal.msg);
                return None;
            }
            Some(Ok(command)) => Some(command),
            None => None,
        };
        Some((args, resume))
    }

    /// The `hello` of a session that is not authenticated yet: its token must verify.
    /// True once the session is active.
    fn hello_authenticates(
        &mut self,
        id: u64,
        verified: Option<Result<Claims, AuthError>>,
        device: Option<String>,
    ) -> bool {
        match verified {
            Some(Ok(claims)) => {
                self.activate(claims, device, true);
                true
            }
            failure => {
                let msg = match failure {
                    Some(Err(error)) => error.to_string(),
                    _ => "hello needs a token when the upgrade carried none".to_string(),
                };
                self.reply_err(id, ErrorCode::Unauthorized, &msg);
                self.close(CloseCode::Unauthorized, "invalid token");
                false
            }
        }
    }

    /// The `hello` of a session the upgrade authenticated: once only, a token (if any)
    /// for the same user, which may name the device. True when it is accepted.
    fn hello_after_upgrade(
        &mut self,
        id: u64,
        verified: Option<Result<Claims, AuthError>>,
        device: Option<String>,
    ) -> bool {
        let Phase::Active(identity) = &mut self.phase else {
            return false;
        };
        if identity.said_hello {
            self.reply_err(id, ErrorCode::Conflict, "hello was already said");
            return false;
        }
        match verified {
            Some(Ok(claims)) if claims.sub != identity.user => {
                self.reply_err(
                    id,
                    ErrorCode::Unauthorized,
                    "hello token names another user",
                );
                self.close(CloseCode::Unauthorized, "token user mismatch");
                return false;
            }
            Some(Ok(Claims { dev: Some(dev), .. })) => {
                identity.device = dev;
                identity.device_from_token = true;
            }
            Some(Err(error)) => {
                self.reply_err(id, ErrorCode::Unauthorized, &error.to_string());
                self.close(CloseCode::Unauthorized, "invalid token");
                return false;
            }
            _ => {}
        }
        identity.said_hello = true;
        if let (false, Some(device)) = (identity.device_from_token, device) {
            identity.device = device;
        }
        true
    }

    /// `hello`'s `ok`, then its resume (which replays missed messages before `synced`).
    fn welcome(&mut self, now: Now, id: u64, resume: Option<ChatCommand>) {
        self.strikes = 0;
        let Phase::Active(identity) = &self.phase else {
            return;
        };
        let welcome = Welcome {
            user: &identity.user,
            device: &identity.device,
            session: &self.id,
            node: &self.config.node,
            heartbeat_ms: self.config.limits.heartbeat_interval.as_millis() as u64,
            server_ts: now.unix_ms,
        };
        let reply = encode_ok(id, &welcome);
        if self.enqueue(reply).is_err() {
            return;
        }
        if let Some(command) = resume {
            self.requests.push(ChatRequest { re: id, command });
        }
    }

    fn activate(&mut self, claims: Claims, hello_device: Option<String>, said_hello: bool) {
        let device_from_token = claims.dev.is_some();
        let device = claims
            .dev
            .or(hello_device)
            .unwrap_or_else(|| DEFAULT_DEVICE.to_string());
        self.phase = Phase::Active(Identity {
            user: claims.sub,
            device,
            device_from_token,
            said_hello,
        });
        self.notes.push(Note::Authenticated);
    }

    fn take_rate_token(&mut self, now: Now, re: Option<u64>) -> bool {
        if self.rate.try_take(now.instant) {
            return true;
        }
        self.reject(
            re,
            ErrorCode::RateLimited,
            "slow down: per-session rate limit",
        );
        false
    }

    /// An error caused by bad input: it counts toward the abuse policy (close 4008,
    /// sent after this reply).
    fn reject(&mut self, re: Option<u64>, code: ErrorCode, msg: &str) {
        self.strikes += 1;
        self.notes.push(Note::ErrorSent(code));
        let _overflow_closes_the_session = self.enqueue(encode_err(re, code, msg));
        if self.strikes >= self.config.limits.abuse_strikes {
            self.close(CloseCode::Policy, "too many rejected commands");
        }
    }

    fn reply_err(&mut self, id: u64, code: ErrorCode, msg: &str) {
        self.notes.push(Note::ErrorSent(code));
        let _overflow_closes_the_session = self.enqueue(encode_err(Some(id), code, msg));
    }

    fn reply_ok<T: Serialize>(&mut self, id: u64, body: &T) {
        let _overflow_closes_the_session = self.enqueue(encode_ok(id, body));
    }

    fn enqueue(&mut self, document: impl Into<Doc>) -> Result<(), QueueOverflow> {
        let document = document.into();
        if self.is_closing() && self.close_sent {
            return Err(QueueOverflow);
        }
        let limits = &self.config.limits;
        if self.outbound.len() >= limits.outbound_queue_len
            || self.outbound_bytes + document.len() > limits.outbound_queue_bytes
        {
            self.outbound.clear();
            self.outbound_bytes = 0;
            self.close(
                CloseCode::TooSlow,
                "outbound queue overflow: reconnect and sync",
            );
            return Err(QueueOverflow);
        }
        self.outbound_bytes += document.len();
        self.outbound.push_back(document);
        debug_assert!(
            self.outbound.len() <= limits.outbound_queue_len
                && self.outbound_bytes <= limits.outbound_queue_bytes,
            "the outbound queue stays within its bounds"
        );
        Ok(())
    }

    /// Enter `Closing`; the first reason wins, except that overflow (4009) overrides
    /// since the queued replies it would wait for were dropped.
    fn close(&mut self, code: CloseCode, reason: &'static str) {
        match self.phase {
            Phase::Closing { .. } if code != CloseCode::TooSlow => {}
            _ => self.phase = Phase::Closing { code, reason },
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"test-secret";
    const T0_UNIX_MS: u64 = 1_800_000_000_000;

    struct Harness {
        session: Session,
        t0: Instant,
    }

    fn limits() -> SessionLimits {
        SessionLimits {
            auth_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_frame_bytes: 1024,
            rate_per_sec: 10,
            rate_burst: 20,
            abuse_strikes: 5,
            outbound_queue_len: 8,
            outbound_queue_bytes: 4096,
        }
    }

    fn token(sub: &str, dev: Option<&str>) -> String {
        JwtKey::new(SECRET).sign(&Claims {
            sub: sub.into(),
            exp: T0_UNIX_MS / 1000 + 3600,
            dev: dev.map(Into::into),
        })
    }

    impl Harness {
        fn new(limits: SessionLimits, upgrade_token: Option<&str>) -> Self {
            let config = Arc::new(SessionConfig {
                limits,
                chat: ChatLimits::default(),
                jwt: JwtKey::new(SECRET),
                node: "n1".into(),
            });
            let t0 = Instant::now();
            let now = Now {
                instant: t0,
                unix_ms: T0_UNIX_MS,
            };
            Self {
                session: Session::new(config, "s1".into(), upgrade_token, now),
                t0,
            }
        }

        fn at(&self, ms: u64) -> Now {
            Now {
                instant: self.t0 + Duration::from_millis(ms),
                unix_ms: T0_UNIX_MS + ms,
            }
        }

        fn send(&mut self, ms: u64, frame: &str) {
            let now = self.at(ms);
            self.session.on_text(now, frame);
        }

        fn replies(&mut self) -> Vec<Value> {
            let mut out = Vec::new();
            while let Some(batch) = self.session.take_outbound_batch(usize::MAX) {
                for doc in batch.split('\n') {
                    out.push(serde_json::from_str(doc).expect("server sends valid JSON"));
                }
            }
            out
        }

        fn authed() -> Self {
            Self::new(limits(), Some(&token("alice", None)))
        }
    }

    #[test]
    fn upgrade_token_authenticates_and_hello_sets_device() {
        let mut h = Harness::authed();
        assert_eq!(h.session.user(), Some("alice"));
        h.send(1, r#"{"id":1,"op":"hello","device":"laptop"}"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0]["re"], 1);
        assert_eq!(replies[0]["ok"]["user"], "alice");
        assert_eq!(replies[0]["ok"]["device"], "laptop");
        assert_eq!(replies[0]["ok"]["session"], "s1");
        assert_eq!(replies[0]["ok"]["node"], "n1");
        assert_eq!(replies[0]["ok"]["heartbeat_ms"], 30_000);
        assert_eq!(replies[0]["ok"]["server_ts"], T0_UNIX_MS + 1);
        h.send(2, r#"{"id":2,"op":"hello"}"#);
        assert_eq!(h.replies()[0]["err"]["code"], "conflict");
    }

    #[test]
    fn token_device_wins_over_hello_device() {
        let mut h = Harness::new(limits(), Some(&token("alice", Some("phone"))));
        h.send(1, r#"{"id":1,"op":"hello","device":"laptop"}"#);
        assert_eq!(h.replies()[0]["ok"]["device"], "phone");
    }

    #[test]
    fn hello_token_device_applies_after_upgrade_auth() {
        let mut h = Harness::authed();
        let hello = json!({"id": 1, "op": "hello", "token": token("alice", Some("phone")), "device": "laptop"});
        h.send(1, &hello.to_string());
        assert_eq!(h.replies()[0]["ok"]["device"], "phone");
    }

    #[test]
    fn hello_token_authenticates() {
        let mut h = Harness::new(limits(), None);
        assert!(!h.session.is_authenticated());
        let hello = json!({"id": 7, "op": "hello", "token": token("bob", None)}).to_string();
        h.send(1, &hello);
        assert_eq!(h.session.user(), Some("bob"));
        let replies = h.replies();
        assert_eq!(replies[0]["ok"]["device"], DEFAULT_DEVICE);
        let notes: Vec<Note> = h.session.take_notes().collect();
        assert_eq!(notes, vec![Note::Authenticated]);
    }

    #[test]
    fn hello_with_resume_hands_the_cursors_to_the_shard() {
        let mut h = Harness::authed();
        h.send(
            1,
            r#"{"id":1,"op":"hello","resume":[{"conv":"c1","after":3}]}"#,
        );
        assert_eq!(h.replies()[0]["re"], 1);
        let requests: Vec<ChatRequest> = h.session.take_requests().collect();
        assert_eq!(
            requests,
            vec![ChatRequest {
                re: 1,
                command: ChatCommand::Resume {
                    cursors: vec![Cursor {
                        conv: "c1".into(),
                        after: 3
                    }]
                }
            }]
        );
    }

    #[test]
    fn a_bad_resume_gets_one_reply_and_no_welcome() {
        let mut h = Harness::authed();
        h.send(
            1,
            r#"{"id":1,"op":"hello","resume":[{"conv":"","after":3}]}"#,
        );
        let replies = h.replies();
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0]["err"]["code"], "bad_request");
        assert_eq!(h.session.take_requests().count(), 0);
        h.send(2, r#"{"id":2,"op":"hello"}"#);
        assert_eq!(
            h.replies()[0]["ok"]["user"],
            "alice",
            "hello can be said again"
        );
    }

    #[test]
    fn bad_upgrade_token_closes_4001_without_reply() {
        let mut h = Harness::new(limits(), Some("not.a.token"));
        assert!(h.session.replies_empty());
        assert_eq!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::Unauthorized,
                reason: "invalid token"
            })
        );
        assert!(h.session.is_finished());
    }

    #[test]
    fn bad_hello_token_replies_then_closes_4001() {
        let mut h = Harness::new(limits(), None);
        let wrong = JwtKey::new(b"other").sign(&Claims {
            sub: "eve".into(),
            exp: u64::MAX,
            dev: None,
        });
        h.send(
            1,
            &json!({"id": 1, "op": "hello", "token": wrong}).to_string(),
        );
        // The close waits for the queued error reply.
        assert_eq!(h.session.poll_action(), None);
        let replies = h.replies();
        assert_eq!(replies[0]["re"], 1);
        assert_eq!(replies[0]["err"]["code"], "unauthorized");
        assert!(matches!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::Unauthorized,
                ..
            })
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let expired = JwtKey::new(SECRET).sign(&Claims {
            sub: "alice".into(),
            exp: T0_UNIX_MS / 1000,
            dev: None,
        });
        let h = Harness::new(limits(), Some(&expired));
        assert!(!h.session.is_authenticated());
        assert!(h.session.is_closing());
    }

    #[test]
    fn command_before_auth_closes_4001() {
        let mut h = Harness::new(limits(), None);
        h.send(1, r#"{"id":1,"op":"ping"}"#);
        assert_eq!(h.replies()[0]["err"]["code"], "unauthorized");
        assert!(matches!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::Unauthorized,
                ..
            })
        ));
    }

    #[test]
    fn auth_timeout_closes_4002() {
        let mut h = Harness::new(limits(), None);
        let deadline = h.session.next_deadline().expect("auth deadline");
        assert_eq!(deadline, h.t0 + Duration::from_secs(10));
        h.session.on_tick(h.at(9_999));
        assert_eq!(h.session.poll_action(), None);
        h.session.on_tick(h.at(10_000));
        assert!(matches!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::AuthTimeout,
                ..
            })
        ));
    }

    #[test]
    fn ping_replies_with_server_time() {
        let mut h = Harness::authed();
        h.send(5, r#"{"id":42,"op":"ping","extra":"ignored"}"#);
        assert_eq!(
            h.replies(),
            vec![json!({"re": 42, "ok": {"server_ts": T0_UNIX_MS + 5}})]
        );
    }

    #[test]
    fn batched_frame_gets_one_reply_per_document() {
        let mut h = Harness::authed();
        h.send(
            1,
            "{\"id\":1,\"op\":\"ping\"}\n{\"id\":2,\"op\":\"ping\"}\n",
        );
        let ids: Vec<Value> = h.replies().iter().map(|r| r["re"].clone()).collect();
        assert_eq!(ids, vec![json!(1), json!(2)]);
    }

    #[test]
    fn malformed_unknown_and_missing_op_keep_the_session_open() {
        let mut limits = limits();
        limits.abuse_strikes = 6;
        let mut h = Harness::new(limits, Some(&token("alice", None)));
        h.send(1, "{not json");
        h.send(2, r#"{"id":3}"#);
        h.send(3, r#"{"id":4,"op":"frobnicate"}"#);
        h.send(4, r#"{"op":"ping"}"#);
        h.send(5, r#"{"id":"x","op":"ping"}"#);
        h.send(6, r#"{"id":9,"op":"ping"}"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 6);
        for (reply, re) in replies[..5].iter().zip([None, None, Some(4), None, None]) {
            assert_eq!(reply["err"]["code"], "bad_request", "{reply}");
            assert_eq!(reply["re"], json!(re), "{reply}");
        }
        assert_eq!(replies[5]["re"], 9);
        assert!(!h.session.is_closing());
    }

    #[test]
    fn chat_ops_go_to_the_shard_and_bad_ones_are_answered() {
        let mut h = Harness::authed();
        h.send(
            1,
            r#"{"id":1,"op":"send","conv":"c","cmid":"m","body":"hi"}"#,
        );
        assert!(h.replies().is_empty());
        let requests: Vec<ChatRequest> = h.session.take_requests().collect();
        assert_eq!(requests.len(), 1);
        assert!(matches!(requests[0].command, ChatCommand::Send(_)));
        h.send(2, r#"{"id":2,"op":"send","conv":"c"}"#);
        let reply = &h.replies()[0];
        assert_eq!(reply["re"], 2);
        assert_eq!(reply["err"]["code"], "bad_request");
        assert_eq!(h.session.take_requests().count(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_and_session_stays_usable() {
        let mut h = Harness::authed();
        let big = format!(r#"{{"id":1,"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
        h.send(1, &big);
        h.send(2, r#"{"id":2,"op":"ping"}"#);
        let replies = h.replies();
        assert_eq!(replies[0]["err"]["code"], "too_large");
        assert_eq!(replies[1]["re"], 2);
    }

    #[test]
    fn rate_limit_replies_then_closes_4008() {
        let mut limits = limits();
        limits.rate_burst = 2;
        limits.rate_per_sec = 1;
        let mut h = Harness::new(limits, Some(&token("alice", None)));
        h.send(0, r#"{"id":1,"op":"ping"}"#);
        h.send(0, r#"{"id":2,"op":"ping"}"#);
        h.send(0, r#"{"id":3,"op":"ping"}"#);
        let replies = h.replies();
        assert_eq!(replies[2]["err"]["code"], "rate_limited");
        assert_eq!(
            replies[2]["re"], 3,
            "a rate-limited command is answered by id"
        );
        assert!(!h.session.is_closing());
        // One token per second: a second later the session is usable again.
        h.send(1000, r#"{"id":4,"op":"ping"}"#);
        assert_eq!(h.replies()[0]["re"], 4);
        for id in 5..20 {
            h.send(1000, &format!(r#"{{"id":{id},"op":"ping"}}"#));
        }
        h.replies();
        assert_eq!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::Policy,
                reason: "too many rejected commands"
            })
        );
    }

    #[test]
    fn outbound_overflow_closes_4009_and_drops_the_queue() {
        let mut h = Harness::authed();
        for id in 0..8 {
            h.send(0, &format!(r#"{{"id":{id},"op":"ping"}}"#));
        }
        assert_eq!(h.session.outbound_len(), 8);
        assert!(!h.session.is_closing());
        h.send(0, r#"{"id":8,"op":"ping"}"#);
        assert_eq!(h.session.outbound_len(), 0);
        assert_eq!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::TooSlow,
                reason: "outbound queue overflow: reconnect and sync"
            })
        );
        assert_eq!(
            h.session.push_event(Doc::Owned("{}".into()), false),
            Err(QueueOverflow)
        );
    }

    #[test]
    fn outbound_byte_limit_also_overflows() {
        let mut h = Harness::authed();
        let big = format!(r#"{{"ev":"x","pad":"{}"}}"#, "y".repeat(3000));
        assert_eq!(h.session.push_event(Doc::Owned(big.clone()), false), Ok(()));
        assert_eq!(
            h.session.push_event(Doc::Owned(big), false),
            Err(QueueOverflow)
        );
        assert!(h.session.is_closing());
    }

    #[test]
    fn batches_respect_the_byte_budget() {
        let mut h = Harness::authed();
        for id in 0..4 {
            h.send(0, &format!(r#"{{"id":{id},"op":"ping"}}"#));
        }
        let first = h
            .session
            .take_outbound_batch(1)
            .expect("one document at least");
        assert_eq!(first.split('\n').count(), 1);
        let rest = h.session.take_outbound_batch(usize::MAX).expect("rest");
        assert_eq!(rest.split('\n').count(), 3);
        assert_eq!(h.session.take_outbound_batch(usize::MAX), None);
    }

    #[test]
    fn heartbeat_pings_once_then_idle_closes_1001() {
        let mut h = Harness::authed();
        assert_eq!(
            h.session.next_deadline(),
            Some(h.t0 + Duration::from_secs(30))
        );
        h.session.on_tick(h.at(29_999));
        assert_eq!(h.session.poll_action(), None);
        h.session.on_tick(h.at(30_000));
        assert_eq!(h.session.poll_action(), Some(Action::Ping));
        assert_eq!(h.session.poll_action(), None);
        assert_eq!(
            h.session.next_deadline(),
            Some(h.t0 + Duration::from_secs(75))
        );
        h.session.on_tick(h.at(40_000));
        assert_eq!(h.session.poll_action(), None, "one ping per silence");
        h.session.on_tick(h.at(75_000));
        assert_eq!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::GoingAway,
                reason: "idle timeout"
            })
        );
    }

    #[test]
    fn inbound_traffic_resets_the_heartbeat() {
        let mut h = Harness::authed();
        h.session.on_tick(h.at(30_000));
        assert_eq!(h.session.poll_action(), Some(Action::Ping));
        h.session.on_inbound(h.at(31_000)); // the pong
        h.session.on_tick(h.at(60_000));
        assert_eq!(h.session.poll_action(), None);
        assert_eq!(
            h.session.next_deadline(),
            Some(h.t0 + Duration::from_secs(61))
        );
    }

    #[test]
    fn drain_flushes_replies_then_closes_1001() {
        let mut h = Harness::authed();
        h.send(0, r#"{"id":1,"op":"ping"}"#);
        h.session.drain();
        assert_eq!(h.session.poll_action(), None);
        h.send(1, r#"{"id":2,"op":"ping"}"#); // ignored: closing
        assert_eq!(h.replies().len(), 1);
        assert!(matches!(
            h.session.poll_action(),
            Some(Action::Close {
                code: CloseCode::GoingAway,
                ..
            })
        ));
        assert_eq!(h.session.poll_action(), None);
    }

    #[test]
    fn binary_frames_get_bad_request() {
        let mut h = Harness::authed();
        h.session.on_binary(h.at(0));
        assert_eq!(h.replies()[0]["err"]["code"], "bad_request");
    }

    impl Session {
        fn replies_empty(&self) -> bool {
            self.outbound.is_empty()
        }
    }
}
