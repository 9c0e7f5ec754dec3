//! The WebSocket transport as a sans-IO driver: the runtime feeds it the bytes it read
//! and the clock; it hands back the bytes to write. tungstenite does the handshake and
//! the framing over an in-memory [`MemoryPipe`], never over a socket, so the same driver serves
//! any socket engine (glommio streams today, io_uring provided buffers later).

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::clock::Now;
use parley_router::memory_pipe::MemoryPipe;
use parley_router::protocol::CloseCode;
use parley_router::protocol::Doc;
use parley_router::session::{Action, ChatRequest, Note, Session, SessionConfig};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use crate::metrics::{dec, inc, ShardMetrics};

/// The upgrade path of PROTOCOL.md section 1.
pub const WS_PATH: &str = "/v1/ws";
/// The sub-protocol a client may ask for.
pub const SUBPROTOCOL: &str = "parley.v1";

/// Input capacity kept between reads; more is released so idle connections stay small.
const RETAINED_INPUT_BYTES: usize = 256;

/// Transport limits, shared by every connection of a shard.
#[derive(Debug, Clone)]
pub struct WsLimits {
    pub max_frame_hard_bytes: usize,
    pub max_handshake_bytes: usize,
    pub write_batch_bytes: usize,
    pub read_buffer_bytes: usize,
    pub close_linger: Duration,
}

impl WsLimits {
    fn tungstenite_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            // Frames go straight into the pipe; batching happens above, per session.
            .write_buffer_size(0)
            .max_write_buffer_size(self.write_batch_bytes.saturating_mul(2).max(1 << 16))
            .max_message_size(Some(self.max_frame_hard_bytes))
            .max_frame_size(Some(self.max_frame_hard_bytes))
    }
}

/// What the upgrade request told us, captured by the handshake callback.
#[derive(Debug, Default)]
struct UpgradeInfo {
    token: Option<String>,
}

struct UpgradeCallback(Rc<RefCell<UpgradeInfo>>);

impl Callback for UpgradeCallback {
    fn on_request(
        self,
        request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            let mut error =
                ErrorResponse::new(Some(format!("no WebSocket at this path; use {WS_PATH}\n")));
            *error.status_mut() = StatusCode::NOT_FOUND;
            return Err(error);
        }
        let offers_subprotocol = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|offered| offered.trim() == SUBPROTOCOL);
        if offers_subprotocol {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        self.0.borrow_mut().token = bearer_token(request).or_else(|| query_token(request));
        Ok(response)
    }
}

fn bearer_token(request: &Request) -> Option<String> {
    let value = request.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn query_token(request: &Request) -> Option<String> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(percent_decode)
}

/// Undo URL percent-encoding; `None` for a malformed escape or non-UTF-8 result.
/// (JWTs need no escaping, but a client's URL builder may escape them anyway.)
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

type Handshake = MidHandshake<ServerHandshake<MemoryPipe, UpgradeCallback>>;

enum State {
    Handshaking {
        handshake: Option<Handshake>,
        upgrade: Rc<RefCell<UpgradeInfo>>,
        received: usize,
    },
    Open {
        ws: Box<WebSocket<MemoryPipe>>,
        session: Session,
    },
    /// Only leftover output remains (an HTTP error response, a close frame).
    Finished { output: Vec<u8> },
}

/// One WebSocket connection, from the first byte to the close frame.
pub struct WsConnection {
    state: State,
    limits: Rc<WsLimits>,
    session_config: Arc<SessionConfig>,
    metrics: Arc<ShardMetrics>,
    session_id: String,
    accepted: Instant,
    /// When a closing connection is dropped even if its peer does not read.
    linger_deadline: Option<Instant>,
    authenticated: bool,
}

impl WsConnection {
    pub fn new(
        limits: Rc<WsLimits>,
        session_config: Arc<SessionConfig>,
        metrics: Arc<ShardMetrics>,
        session_id: String,
        now: Now,
    ) -> Self {
        let upgrade = Rc::new(RefCell::new(UpgradeInfo::default()));
        let handshake = ServerHandshake::start(
            MemoryPipe::default(),
            UpgradeCallback(upgrade.clone()),
            Some(limits.tungstenite_config()),
        );
        Self {
            state: State::Handshaking {
                handshake: Some(handshake),
                upgrade,
                received: 0,
            },
            limits,
            session_config,
            metrics,
            session_id,
            accepted: now.instant,
            linger_deadline: None,
            authenticated: false,
        }
    }

    /// Bytes read from the socket.
    pub fn on_bytes(&mut self, now: Now, data: &[u8]) {
        match &mut self.state {
            State::Handshaking { .. } => self.on_handshake_bytes(now, data),
            State::Open { ws, session } => {
                ws.get_mut().push_input(data);
                read_messages(ws, session, &self.metrics, now);
                ws.get_mut().compact(RETAINED_INPUT_BYTES);
                self.pump(now);
            }
            State::Finished { .. } => {}
        }
    }

    /// The peer closed its side (EOF) or the socket failed: nothing more can be said.
    pub fn on_peer_gone(&mut self) {
        self.state = State::Finished { output: Vec::new() };
    }

    /// The server drains: close with 1001 once queued replies are out.
    pub fn drain(&mut self, now: Now) {
        match &mut self.state {
            State::Open { session, .. } => {
                session.drain();
                self.pump(now);
            }
            State::Handshaking { .. } => self.fail_handshake(StatusCode::SERVICE_UNAVAILABLE),
            State::Finished { .. } => {}
        }
    }

    /// Timers: auth, heartbeat, idle, linger.
    pub fn on_tick(&mut self, now: Now) {
        if self
            .linger_deadline
            .is_some_and(|deadline| now.instant >= deadline)
        {
            self.on_peer_gone();
            return;
        }
        match &mut self.state {
            State::Handshaking { .. } => {
                if now.instant >= self.accepted + self.session_config.limits.auth_timeout {
                    // No WebSocket yet, so no close code: just drop the connection.
                    inc(&self.metrics.handshake_failures);
                    self.on_peer_gone();
                }
            }
            State::Open { session, .. } => {
                session.on_tick(now);
                self.pump(now);
            }
            State::Finished { .. } => {}
        }
    }

    /// The earliest instant `on_tick` should run.
    pub fn next_deadline(&self) -> Option<Instant> {
        let state_deadline = match &self.state {
            State::Handshaking { .. } => {
                Some(self.accepted + self.session_config.limits.auth_timeout)
            }
            State::Open { session, .. } => session.next_deadline(),
            State::Finished { .. } => None,
        };
        match (state_deadline, self.linger_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the runtime should read from the socket.
    pub fn wants_input(&self) -> bool {
        match &self.state {
            State::Handshaking { .. } => true,
            State::Open { session, .. } => !session.is_closing(),
            State::Finished { .. } => false,
        }
    }

    /// Bytes waiting for the socket.
    pub fn output(&self) -> &[u8] {
        match &self.state {
            State::Handshaking { handshake, .. } => handshake
                .as_ref()
                .map_or(&[][..], |h| &h.get_ref().get_ref().output),
            State::Open { ws, .. } => &ws.get_ref().output,
            State::Finished { output } => output,
        }
    }

    /// The socket took `n` bytes of [`output`](Self::output).
    pub fn consume_output(&mut self, n: usize, now: Now) {
        let output = match &mut self.state {
            State::Handshaking { handshake, .. } => match handshake.as_mut() {
                Some(h) => &mut h.get_mut().get_mut().output,
                None => return,
            },
            State::Open { ws, .. } => &mut ws.get_mut().output,
            State::Finished { output } => output,
        };
        output.drain(..n);
        if output.is_empty() && output.capacity() > RETAINED_INPUT_BYTES {
            *output = Vec::new();
        }
        // Room in the write batch: move more queued documents.
        self.pump(now);
    }

    /// True when the connection has nothing left to do once its output is written.
    /// The authenticated (user, device), once the session has one.
    pub fn identity(&self) -> Option<(&str, &str)> {
        match &self.state {
            State::Open { session, .. } => session.user().zip(session.device()),
            _ => None,
        }
    }

    /// True once the session said `hello`.
    pub fn said_hello(&self) -> bool {
        match &self.state {
            State::Open { session, .. } => session.said_hello(),
            _ => false,
        }
    }

    /// Chat commands the session accepted since the last call.
    pub fn take_requests(&mut self) -> Vec<ChatRequest> {
        match &mut self.state {
            State::Open { session, .. } => session.take_requests().collect(),
            _ => Vec::new(),
        }
    }

    /// Replies and events from the shard's core, for this session.
    pub fn push_documents(&mut self, now: Now, documents: impl Iterator<Item = (Doc, bool)>) {
        let State::Open { session, .. } = &mut self.state else {
            return;
        };
        for (document, ephemeral) in documents {
            if session.push_event(document, ephemeral).is_err() {
                break; // overflow: the session is closing with 4009
            }
        }
        self.pump(now);
    }

    pub fn is_finished(&self) -> bool {
        match &self.state {
            State::Finished { .. } => true,
            State::Open { session, .. } => session.is_finished(),
            State::Handshaking { .. } => false,
        }
    }

    fn on_handshake_bytes(&mut self, now: Now, data: &[u8]) {
        let State::Handshaking {
            handshake,
            upgrade,
            received,
        } = &mut self.state
        else {
            return;
        };
        *received += data.len();
        if *received > self.limits.max_handshake_bytes {
            return self.fail_handshake(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        let Some(mut mid) = handshake.take() else {
            return;
        };
        let pipe = mid.get_mut().get_mut();
        pipe.push_input(data);
        match mid.handshake() {
            Ok(mut ws) => {
                let pipe = ws.get_mut();
                pipe.end_head();
                let token = upgrade.borrow_mut().token.take();
                // The auth window runs from accept, not from the end of the handshake.
                let created = Now {
                    instant: self.accepted,
                    unix_ms: now.unix_ms,
                };
                let session = Session::new(
                    self.session_config.clone(),
                    std::mem::take(&mut self.session_id),
                    token.as_deref(),
                    created,
                );
                let mut ws = Box::new(ws);
                let mut session = session;
                // Frames pipelined behind the request head are already here.
                read_messages(&mut ws, &mut session, &self.metrics, now);
                ws.get_mut().compact(RETAINED_INPUT_BYTES);
                self.state = State::Open { ws, session };
                self.pump(now);
            }
            Err(HandshakeError::Interrupted(mid)) => *handshake = Some(mid),
            Err(HandshakeError::Failure(WsError::Http(response))) => {
                self.fail_handshake(response.status())
            }
            Err(HandshakeError::Failure(_)) => self.fail_handshake(StatusCode::BAD_REQUEST),
        }
    }

    fn fail_handshake(&mut self, status: StatusCode) {
        inc(&self.metrics.handshake_failures);
        let reason = status.canonical_reason().unwrap_or("Error");
        let body = if status == StatusCode::NOT_FOUND {
            format!("no WebSocket at this path; use {WS_PATH}\n")
        } else {
            format!("{reason}\n")
        };
        self.state = State::Finished {
            output: http_error(status, &body),
        };
    }

    /// The connection was refused at accept (the shard holds `max_connections_per_shard`,
    /// or drains): answer 503 at once, before the request is read, and nothing else.
    pub fn refuse_unavailable(&mut self, draining: bool) {
        self.state = State::Finished {
            output: refusal(draining),
        };
    }

    /// Move queued documents into frames while the write batch has room, then take the
    /// session's actions (heartbeat ping, close).
    fn pump(&mut self, now: Now) {
        let State::Open { ws, session } = &mut self.state else {
            return;
        };
        let batch_bytes = self.limits.write_batch_bytes;
        loop {
            while ws.get_ref().output.len() < batch_bytes && !session.is_finished() {
                let budget = batch_bytes - ws.get_ref().output.len();
                let Some(batch) = session.take_outbound_batch(budget) else {
                    break;
                };
                if ws.write(Message::text(batch)).is_err() {
                    // tungstenite refuses writes only once the connection is closed.
                    break;
                }
                inc(&self.metrics.frames_out);
            }
            match session.poll_action() {
                Some(Action::Ping) => {
                    let _closed_already = ws.write(Message::Ping(Default::default()));
                }
                Some(Action::Close { code, reason }) => {
                    let frame = CloseFrame {
                        code: WsCloseCode::from(code.code()),
                        reason: reason.into(),
                    };
                    let _closed_already = ws.close(Some(frame));
                    self.metrics.close_sent(code);
                }
                None => break,
            }
        }
        // Writes queued by tungstenite itself (pong replies, close replies).
        let _closed_already = ws.flush();
        for note in session.take_notes() {
            match note {
                Note::ErrorSent(code) => self.metrics.error_sent(code),
                Note::Authenticated => {
                    self.authenticated = true;
                    inc(&self.metrics.sessions_authenticated);
                }
            }
        }
        if session.is_closing() && self.linger_deadline.is_none() {
            self.linger_deadline = Some(now.instant + self.limits.close_linger);
        }
    }
}

/// An HTTP error response that ends the connection.
fn http_error(status: StatusCode, body: &str) -> Vec<u8> {
    let reason = status.canonical_reason().unwrap_or("Error");
    format!(
        "HTTP/1.1 {} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    )
    .into_bytes()
}

/// The answer to a connection refused at accept (docs/protocol.md 9.1): 503, with a body
/// saying why.
pub fn refusal(draining: bool) -> Vec<u8> {
    let body = match draining {
        true => "Service Unavailable: the server is draining\n",
        false => "Service Unavailable: the server is at its connection limit\n",
    };
    http_error(StatusCode::SERVICE_UNAVAILABLE, body)
}

impl Drop for WsConnection {
    fn drop(&mut self) {
        if self.authenticated {
            dec(&self.metrics.sessions_authenticated);
        }
    }
}

/// Read every complete message the pipe holds and hand it to the session.
fn read_messages(
    ws: &mut WebSocket<MemoryPipe>,
    session: &mut Session,
    metrics: &ShardMetrics,
    now: Now,
) {
    while !session.is_closing() {
        match ws.read() {
            Ok(Message::Text(text)) => {
                inc(&metrics.frames_in);
                session.on_text(now, text.as_str());
            }
            Ok(Message::Binary(_)) => {
                inc(&metrics.frames_in);
                session.on_binary(now);
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => session.on_inbound(now),
            Ok(Message::Close(_)) => {
                // tungstenite queued the close reply; the session ends once it is written.
                session.on_peer_closed();
            }
            Err(WsError::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(WsError::Capacity(_)) => session.protocol_violation(
                CloseCode::MessageTooBig,
                "frame exceeds max_frame_hard_bytes",
            ),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => session.on_peer_closed(),
            Err(_) => session
                .protocol_violation(CloseCode::ProtocolViolation, "WebSocket protocol violation"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a.b_c-d").as_deref(), Some("a.b_c-d"));
        assert_eq!(percent_decode("a%2Eb%2e").as_deref(), Some("a.b."));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
