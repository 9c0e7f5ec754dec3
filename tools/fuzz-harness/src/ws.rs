//! Target `ws`: bytes from a TCP peer into one [`WsConnection`] (gateway/src/ws.rs:
//! tungstenite over router's MemoryPipe), from the HTTP upgrade request to the frames
//! after it.
//!
//! Input: one option byte (unused, kept for later options), then chunks. Chunk kinds:
//! 0-4 raw bytes from the peer; 5 one client frame made here (first byte: FIN, RSV and
//! opcode; the rest its payload, masked as a client must); 6 the clock moves on; 7 the
//! server drains; larger kinds wrap around.
//!
//! Invariants, on what the server writes (decoded here, apart from tungstenite):
//! - first an HTTP response: `101` with `Sec-WebSocket-Accept`, or an error status whose
//!   `Content-Length` is its body's length (all of it written by the time the connection
//!   is finished), after which nothing more is written and the connection is finished;
//! - after the 101, only whole, unmasked, unfragmented text, ping, pong and close frames:
//!   never binary, each text frame UTF-8 lines of JSON objects, at most one close frame
//!   with a valid close code, and nothing after it;
//! - a finished connection wants no input; dropping the connection leaves the shard's
//!   gauge of authenticated sessions at zero.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parley_gateway::metrics::ShardMetrics;
use parley_gateway::ws::{WsConnection, WsLimits};

use crate::fixture::{self, later};
use crate::input::Input;

/// The mask of every client frame this target makes.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

pub fn limits() -> WsLimits {
    WsLimits {
        max_frame_hard_bytes: 8192,
        max_handshake_bytes: 4096,
        write_batch_bytes: 4096,
        read_buffer_bytes: 128,
        close_linger: Duration::from_secs(5),
    }
}

pub fn ws(data: &[u8]) {
    let mut input = Input::new(data);
    let _options = input.byte();
    let metrics = Arc::new(ShardMetrics::default());
    let mut now = fixture::start();
    let mut conn = WsConnection::new(
        Rc::new(limits()),
        fixture::session_config(),
        metrics.clone(),
        "fuzz.1".into(),
        now,
    );
    let mut peer = PeerView::default();
    while let Some((kind, bytes)) = input.chunk() {
        match kind % 8 {
            0..=4 => conn.on_bytes(now, bytes),
            5 => conn.on_bytes(now, &client_frame(bytes)),
            6 => {
                let step = bytes
                    .iter()
                    .take(3)
                    .fold(0u64, |n, &b| n << 8 | u64::from(b));
                now = later(now, step);
                conn.on_tick(now);
            }
            _ => conn.drain(now),
        }
        let written = conn.output().to_vec();
        conn.consume_output(written.len(), now);
        peer.read(&written);
        if conn.is_finished() {
            assert!(!conn.wants_input(), "a finished connection wants input");
            peer.check_complete();
        }
        if peer.refused() {
            assert!(
                conn.is_finished(),
                "an upgrade was refused, and the connection goes on"
            );
        }
    }
    drop(conn);
    assert_eq!(metrics.sessions_authenticated.load(Ordering::Relaxed), 0);
}

/// A client frame: `first` is its first byte (FIN, RSV, opcode), `payload` masked.
pub fn client_frame(bytes: &[u8]) -> Vec<u8> {
    let (first, payload) = bytes
        .split_first()
        .map_or((0x81, &[][..]), |(&f, p)| (f, p));
    let mut frame = vec![first];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// What a client reads from the server, checked as it arrives.
#[derive(Default)]
struct PeerView {
    buffer: Vec<u8>,
    state: PeerState,
}

#[derive(Default, PartialEq)]
enum PeerState {
    #[default]
    Head,
    Frames,
    /// An error response of this many body bytes (still to come, counted down).
    ErrorBody(usize),
    Refused,
    Closed,
}

impl PeerView {
    fn refused(&self) -> bool {
        matches!(self.state, PeerState::Refused | PeerState::ErrorBody(_))
    }

    /// The connection is over: what it wrote is whole (no half head, no body shorter
    /// than its Content-Length).
    fn check_complete(&self) {
        match self.state {
            PeerState::ErrorBody(left) => {
                panic!("an error response {left} bytes short of its Content-Length")
            }
            PeerState::Head => assert!(self.buffer.is_empty(), "half a response head"),
            _ => {}
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        loop {
            match self.state {
                PeerState::Head => {
                    let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                        assert!(self.buffer.len() < 16 * 1024, "an endless response head");
                        return;
                    };
                    let head = String::from_utf8(self.buffer[..end].to_vec())
                        .expect("the response head is text");
                    self.buffer.drain(..end + 4);
                    self.state = response(&head);
                }
                PeerState::ErrorBody(left) => {
                    let take = left.min(self.buffer.len());
                    self.buffer.drain(..take);
                    self.state = match left - take {
                        0 => PeerState::Refused,
                        left => PeerState::ErrorBody(left),
                    };
                    if take == 0 {
                        return;
                    }
                }
                PeerState::Refused | PeerState::Closed => {
                    assert!(
                        self.buffer.is_empty(),
                        "bytes after the end: {:?}",
                        self.buffer
                    );
                    return;
                }
                PeerState::Frames => match server_frame(&self.buffer) {
                    Some((len, closes)) => {
                        self.buffer.drain(..len);
                        if closes {
                            self.state = PeerState::Closed;
                        }
                    }
                    None => return,
                },
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The state after a response head.
fn response(head: &str) -> PeerState {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    if status == 101 {
        assert!(header("sec-websocket-accept").is_some(), "{head}");
        return PeerState::Frames;
    }
    assert!((400..600).contains(&status), "status {status}: {head}");
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("an error response without Content-Length: {head}"));
    PeerState::ErrorBody(length)
}

/// One whole frame at the start of `bytes`: (its length, whether it is a close), or
/// `None` until it is all there. Panics on a frame the server must not send.
fn server_frame(bytes: &[u8]) -> Option<(usize, bool)> {
    let (&first, rest) = bytes.split_first()?;
    let (&second, rest) = rest.split_first()?;
    assert_eq!(first & 0xf0, 0x80, "fragmented or RSV bits: {first:#x}");
    assert_eq!(second & 0x80, 0, "a masked server frame");
    let (len, header) = match second & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?,
            10,
        ),
        len => (usize::from(len), 2),
    };
    let payload = bytes.get(header..header + len)?;
    match first & 0x0f {
        0x1 => {
            let text = std::str::from_utf8(payload).expect("a text frame is UTF-8");
            for document in text.split('\n') {
                let value: serde_json::Value = serde_json::from_str(document)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {document}"));
                assert!(value.is_object(), "{document}");
            }
        }
        0x8 => {
            if !payload.is_empty() {
                let code = u16::from_be_bytes(payload.get(..2).expect("a code").try_into().ok()?);
                assert!(valid_close_code(code), "close code {code}");
                std::str::from_utf8(&payload[2..]).expect("a close reason is UTF-8");
            }
            return Some((header + len, true));
        }
        0x9 | 0xa => assert!(len <= 125, "a control frame of {len} bytes"),
        opcode => panic!("the server sent opcode {opcode:#x}"),
    }
    Some((header + len, false))
}

/// RFC 6455 section 7.4: the codes a close frame may carry.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}
