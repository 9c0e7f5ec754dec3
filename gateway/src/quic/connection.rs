//! One QUIC connection carrying one Parley session (PROTOCOL.md section 1): the client's
//! first bidirectional stream holds the session, each document a 4-byte big-endian
//! length then that many bytes of JSON; `typing` may also travel as a DATAGRAM frame.
//!
//! Sans-IO like the WebSocket driver: the endpoint hands it packets already fed to quiche
//! and the clock; it moves documents between quiche's stream and the same [`Session`]
//! state machine WebSocket uses, so nothing about chat exists twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_router::clock::Now;
use parley_router::framing::{DocumentReader, Frame};
use parley_router::protocol::{CloseCode, Doc};
use parley_router::session::{Action, ChatRequest, Note, Session, SessionConfig};

use crate::metrics::{dec, inc, ShardMetrics};

/// The session runs on the client's first bidirectional stream.
pub const SESSION_STREAM: u64 = 0;
/// Output capacity kept between writes; more is released so idle connections stay small.
const RETAINED_BYTES: usize = 256;
/// Bounds on how long a closing session waits for its last documents to be delivered
/// before the CONNECTION_CLOSE (which ends all stream data) is sent.
const CLOSE_LINGER_MIN: Duration = Duration::from_millis(20);
const CLOSE_LINGER_RTTS: u32 = 4;

/// Is this server event a `typing` event (the one kind that may go as a DATAGRAM)?
fn is_typing_event(document: &str) -> bool {
    document.starts_with(r#"{"ev":"typing""#)
}

/// Is this client document a `typing` command (the one kind accepted as a DATAGRAM)?
fn is_typing_command(document: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Op<'a> {
        #[serde(borrow)]
        op: Option<&'a str>,
    }
    serde_json::from_slice::<Op>(document).is_ok_and(|parsed| parsed.op == Some("typing"))
}

/// A QUIC connection and the session it carries.
pub struct QuicConnection {
    pub conn: quiche::Connection,
    session: Session,
    reader: DocumentReader,
    /// Framed documents quiche's stream did not take yet (flow control).
    pending: Vec<u8>,
    write_batch_bytes: usize,
    metrics: Arc<ShardMetrics>,
    authenticated: bool,
    /// The session closed: CONNECTION_CLOSE goes out at this instant, after its last
    /// documents had a few round trips to arrive.
    close_at: Option<(Instant, u16, &'static str)>,
    /// The core knows this session (said hello or sent a chat command).
    pub opened: bool,
    /// Stream data left unread because the shard is under backpressure.
    pub unread: bool,
}

impl QuicConnection {
    pub fn new(
        conn: quiche::Connection,
        config: Arc<SessionConfig>,
        session_id: String,
        write_batch_bytes: usize,
        metrics: Arc<ShardMetrics>,
        now: Now,
    ) -> Self {
        Self {
            conn,
            session: Session::new(config, session_id, None, now),
            reader: DocumentReader::default(),
            pending: Vec::new(),
            write_batch_bytes,
            metrics,
            authenticated: false,
            close_at: None,
            opened: false,
            unread: false,
        }
    }

    /// quiche accepted a packet of this connection.
    pub fn on_packet(&mut self, now: Now) {
        self.session.on_inbound(now);
    }

    /// After quiche took packets: read the session stream (unless `may_read` is false
    /// because the shard is under backpressure) and datagrams, and answer.
    pub fn after_input(&mut self, now: Now, scratch: &mut [u8], may_read: bool) {
        if self.conn.is_closed() {
            self.session.on_peer_closed();
            return;
        }
        // Path events (a new client address, a migration) need no action: quiche validates
        // and migrates by itself. Drained so they do not accumulate.
        while self.conn.path_event_next().is_some() {}
        if self.conn.is_established() || self.conn.is_in_early_data() {
            self.read_datagrams(now, scratch);
            if may_read {
                self.read_streams(now, scratch);
            } else {
                self.unread = self.conn.readable().next().is_some();
            }
        }
        self.pump(now);
    }

    fn read_streams(&mut self, now: Now, scratch: &mut [u8]) {
        self.unread = false;
        let max_document = self.session.limits().max_frame_bytes;
        for stream in self.conn.readable() {
            if stream != SESSION_STREAM {
                // Only the first bidirectional stream carries the session.
                let _gone = self.conn.stream_shutdown(
                    stream,
                    quiche::Shutdown::Read,
                    u64::from(CloseCode::ProtocolViolation.code()),
                );
                continue;
            }
            loop {
                match self.conn.stream_recv(stream, scratch) {
                    Ok((n, fin)) => {
                        let session = &mut self.session;
                        let metrics = &self.metrics;
                        self.reader.push(&scratch[..n], max_document, |frame| {
                            inc(&metrics.frames_in);
                            match frame {
                                Frame::Document(bytes) => {
                                    session.on_document_frame(now, &String::from_utf8_lossy(bytes))
                                }
                                Frame::Oversized(len) => session.on_oversized_frame(now, len),
                            }
                        });
                        if fin {
                            self.session.on_peer_closed();
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(_) => {
                        // Reset by the peer: the session is over.
                        self.session.on_peer_closed();
                        break;
                    }
                }
            }
        }
    }

    fn read_datagrams(&mut self, now: Now, scratch: &mut [u8]) {
        while let Ok(n) = self.conn.dgram_recv(scratch) {
            inc(&self.metrics.frames_in);
            // Only typing may skip the stream's ordering (PROTOCOL.md section 1); any other
            // DATAGRAM is discarded (docs/protocol.md says so).
            if is_typing_command(&scratch[..n]) {
                self.session
                    .on_document_frame(now, &String::from_utf8_lossy(&scratch[..n]));
            }
        }
    }

    /// Timers: quiche's (loss recovery, idle) and the session's (auth, heartbeat).
    pub fn on_tick(&mut self, now: Now) {
        if self
            .conn
            .timeout_instant()
            .is_some_and(|at| at <= now.instant)
        {
            self.conn.on_timeout();
        }
        if self.conn.is_closed() {
            self.session.on_peer_closed();
            return;
        }
        if let Some((at, code, reason)) = self.close_at {
            if at <= now.instant {
                let _already = self.conn.close(true, u64::from(code), reason.as_bytes());
                self.close_at = None;
            }
        }
        self.session.on_tick(now);
        self.pump(now);
    }

    /// The earliest instant [`on_tick`](Self::on_tick) has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.conn.timeout_instant(),
            self.session.next_deadline(),
            self.close_at.map(|(at, _, _)| at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Replies and events from the shard's core.
    pub fn push_documents(&mut self, now: Now, documents: impl Iterator<Item = (Doc, bool)>) {
        for (document, ephemeral) in documents {
            if ephemeral && is_typing_event(document.as_str()) && self.send_datagram(&document) {
                continue;
            }
            if self.session.push_event(document, ephemeral).is_err() {
                break; // overflow: the session is closing with 4009
            }
        }
        self.pump(now);
    }

    /// Typing as a DATAGRAM when the peer enabled them and it fits; false to use the stream.
    fn send_datagram(&mut self, document: &Doc) -> bool {
        let fits = self
            .conn
            .dgram_max_writable_len()
            .is_some_and(|max| document.len() <= max);
        fits && self.conn.dgram_send(document.as_str().as_bytes()).is_ok() && {
            inc(&self.metrics.frames_out);
            true
        }
    }

    /// The server drains: close with 1001 once queued replies are out.
    pub fn drain(&mut self, now: Now) {
        self.session.drain();
        self.pump(now);
    }

    /// The authenticated (user, device), once there is one.
    pub fn identity(&self) -> Option<(&str, &str)> {
        self.session.user().zip(self.session.device())
    }

    pub fn said_hello(&self) -> bool {
        self.session.said_hello()
    }

    pub fn take_requests(&mut self) -> Vec<ChatRequest> {
        self.session.take_requests().collect()
    }

    /// quiche is done with the connection (closed, drained or timed out).
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Move queued documents onto the stream while the write batch has room, then take
    /// the session's actions (heartbeat, close).
    fn pump(&mut self, now: Now) {
        if self.conn.is_closed() || self.conn.local_error().is_some() {
            return;
        }
        loop {
            self.write_pending();
            while self.pending.len() < self.write_batch_bytes {
                let Some(document) = self.session.pop_outbound() else {
                    break;
                };
                parley_router::framing::frame_document(
                    &mut self.pending,
                    document.as_str().as_bytes(),
                );
                inc(&self.metrics.frames_out);
            }
            self.write_pending();
            match self.session.poll_action() {
                Some(Action::Ping) => {
                    let _closing_already = self.conn.send_ack_eliciting();
                }
                Some(Action::Close { code, reason }) => {
                    self.metrics.close_sent(code);
                    let _stream_gone = self.conn.stream_send(SESSION_STREAM, &[], true);
                    let rtt = self
                        .conn
                        .path_stats()
                        .next()
                        .map_or(Duration::ZERO, |path| path.rtt);
                    let linger = (rtt * CLOSE_LINGER_RTTS).max(CLOSE_LINGER_MIN);
                    self.close_at = Some((now.instant + linger, code.code(), reason));
                }
                None => break,
            }
            if self.pending.len() >= self.write_batch_bytes || self.session.outbound_len() == 0 {
                break;
            }
        }
        for note in self.session.take_notes() {
            match note {
                Note::ErrorSent(code) => self.metrics.error_sent(code),
                Note::Authenticated => {
                    self.authenticated = true;
                    inc(&self.metrics.sessions_authenticated);
                }
            }
        }
        // A session the peer ended (it finished or reset the session stream) takes no
        // close action, so nothing above closes the connection: close it here, or it
        // stays until the idle timeout (for ever, if the peer keeps it alive) with its
        // session still known to the core.
        if self.session.is_finished() && self.close_at.is_none() {
            let code = u64::from(CloseCode::GoingAway.code());
            let _closed_already = self.conn.close(true, code, b"peer closed");
        }
    }

    /// Hand framed bytes to quiche as far as flow control allows.
    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.conn.stream_send(SESSION_STREAM, &self.pending, false) {
            Ok(n) => {
                self.pending.drain(..n);
                if self.pending.is_empty() && self.pending.capacity() > RETAINED_BYTES {
                    self.pending = Vec::new();
                }
            }
            Err(quiche::Error::Done) => {}
            Err(_) => {
                // The client stopped or reset the stream: nothing more can be said.
                self.pending = Vec::new();
                self.session.on_peer_closed();
            }
        }
    }
}

impl Drop for QuicConnection {
    fn drop(&mut self) {
        if self.authenticated {
            dec(&self.metrics.sessions_authenticated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_typing_may_travel_as_a_datagram() {
        assert!(is_typing_command(
            br#"{"id":3,"op":"typing","conv":"c","on":true}"#
        ));
        assert!(!is_typing_command(br#"{"id":3,"op":"send"}"#));
        assert!(!is_typing_command(b"\xff garbage"));
        assert!(is_typing_event(r#"{"ev":"typing","conv":"c"}"#));
        assert!(!is_typing_event(r#"{"ev":"msg"}"#));
    }
}
