//! Just enough WebSocket to misbehave with: the upgrade request, client frames of any
//! shape (unmasked, reserved bits set, any opcode, a length with no payload behind it),
//! and a reader of the server's frames. tungstenite will not write most of these, and a
//! silent session must not have a library answer pings for it.

/// Frame opcodes (RFC 6455 5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame the reader takes: the server's own batches are far below it.
const MAX_SERVER_FRAME_BYTES: u64 = 16 << 20;
/// Longest HTTP response head the reader waits for.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;

/// The upgrade request for `/v1/ws`, with the token in the header when there is one.
pub fn upgrade_request(host: &str, token: Option<&str>) -> Vec<u8> {
    let mut request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// How a client frame is shaped; only `Normal` is valid from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Normal,
    /// RSV1 set, with no extension negotiated (RFC 6455 5.2: fail the connection).
    Reserved,
    /// Not masked (RFC 6455 5.1: a server must close on it).
    Unmasked,
}

/// The client's masking key; any value is valid, so a fixed one keeps runs repeatable.
const MASK: [u8; 4] = [0x5a, 0x3c, 0x96, 0x0f];

/// Append one final frame with `payload`.
pub fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], shape: Shape) {
    let rsv1 = if shape == Shape::Reserved { 0x40 } else { 0 };
    header(
        out,
        0x80 | rsv1 | opcode,
        payload.len() as u64,
        shape != Shape::Unmasked,
    );
    match shape {
        Shape::Unmasked => out.extend_from_slice(payload),
        _ => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4])),
    }
}

/// Append the header of a masked frame that says `declared` payload bytes follow, and
/// none of them: what a peer announcing a huge frame sends first.
pub fn header_only(out: &mut Vec<u8>, opcode: u8, declared: u64) {
    header(out, 0x80 | opcode, declared, true);
}

fn header(out: &mut Vec<u8>, first: u8, len: u64, masked: bool) {
    let mask_bit = if masked { 0x80 } else { 0 };
    out.push(first);
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
    }
}

/// A close frame's payload: the code and a reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// One whole message from the server (continuations joined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// A close frame's code (1005, "no status", when it carries none).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE).then(|| match self.payload.as_slice() {
            [high, low, ..] => u16::from_be_bytes([*high, *low]),
            _ => 1005,
        })
    }
}

/// What the server sent, read incrementally: first the HTTP response head, then frames.
#[derive(Default)]
pub struct Reader {
    buffer: Vec<u8>,
    /// The response's status once its head is whole.
    pub status: Option<u16>,
    /// A fragmented message being joined: its opcode and the payload so far.
    partial: Option<(u8, Vec<u8>)>,
}

/// What the reader found in the bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The response head is whole: its status code.
    Response(u16),
    Frame(ServerFrame),
}

impl Reader {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received and not yet taken.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The next response head or whole frame, if the bytes hold one; an error for bytes
    /// that are neither.
    pub fn next_read(&mut self) -> Result<Option<Read>, String> {
        if self.status.is_none() {
            return self.response_head();
        }
        loop {
            let Some((fin, opcode, payload)) = self.take_frame()? else {
                return Ok(None);
            };
            if opcode >= OP_CLOSE {
                return Ok(Some(Read::Frame(ServerFrame { opcode, payload })));
            }
            let (opcode, payload) = match (opcode, self.partial.take()) {
                (OP_CONTINUATION, Some((first, mut joined))) => {
                    joined.extend_from_slice(&payload);
                    (first, joined)
                }
                (OP_CONTINUATION, None) => return Err("a continuation with no message".into()),
                (_, Some(_)) => return Err("a new message inside a fragmented one".into()),
                (opcode, None) => (opcode, payload),
            };
            if fin {
                return Ok(Some(Read::Frame(ServerFrame { opcode, payload })));
            }
            self.partial = Some((opcode, payload));
        }
    }

    fn response_head(&mut self) -> Result<Option<Read>, String> {
        let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.buffer.len() > MAX_RESPONSE_HEAD_BYTES {
                return Err("a response head without an end".into());
            }
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
        self.buffer.drain(..end + 4);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
        self.status = Some(status);
        Ok(Some(Read::Response(status)))
    }

    /// (fin, opcode, payload) of the frame at the front, if whole.
    fn take_frame(&mut self) -> Result<Option<(bool, u8, Vec<u8>)>, String> {
        let buffer = &self.buffer;
        let [first, second, ..] = buffer[..] else {
            return Ok(None);
        };
        let masked = second & 0x80 != 0;
        let (len, mut at) = match second & 0x7F {
            126 if buffer.len() >= 4 => (u64::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4),
            127 if buffer.len() >= 10 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&buffer[2..10]);
                (u64::from_be_bytes(bytes), 10)
            }
            126 | 127 => return Ok(None),
            short => (u64::from(short), 2),
        };
        if len > MAX_SERVER_FRAME_BYTES {
            return Err(format!("a server frame of {len} bytes"));
        }
        let mask = if masked {
            let Some(key) = buffer.get(at..at + 4) else {
                return Ok(None);
            };
            at += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        let end = at + len as usize;
        if buffer.len() < end {
            return Ok(None);
        }
        let mut payload = buffer[at..end].to_vec();
        if let Some(mask) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= mask[i % 4]);
        }
        self.buffer.drain(..end);
        Ok(Some((first & 0x80 != 0, first & 0x0F, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_shaped_as_asked() {
        let mut out = Vec::new();
        frame(&mut out, OP_TEXT, b"hi", Shape::Normal);
        assert_eq!(out[..2], [0x81, 0x82]);
        assert_eq!(out[6] ^ MASK[0], b'h');
        out.clear();
        frame(&mut out, OP_TEXT, b"hi", Shape::Unmasked);
        assert_eq!(out, [0x81, 0x02, b'h', b'i']);
        out.clear();
        frame(&mut out, OP_BINARY, &[0; 200], Shape::Reserved);
        assert_eq!(out[..4], [0xC2, 0x80 | 126, 0, 200]);
        out.clear();
        header_only(&mut out, OP_TEXT, 2 << 20);
        assert_eq!(out.len(), 2 + 8 + 4);
        assert_eq!(out[..2], [0x81, 0x80 | 127]);
    }

    #[test]
    fn the_reader_takes_the_head_then_whole_frames() {
        let mut reader = Reader::default();
        reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x03ab");
        assert_eq!(reader.next_read(), Ok(Some(Read::Response(101))));
        assert_eq!(reader.next_read(), Ok(None), "the text frame is not whole");
        // A fragmented text, a ping between its parts, then a close.
        reader.feed(b"c");
        let text = reader.next_read().unwrap();
        assert_eq!(
            text,
            Some(Read::Frame(ServerFrame {
                opcode: OP_TEXT,
                payload: b"abc".to_vec()
            }))
        );
        reader.feed(b"\x01\x01x\x89\x00\x80\x01y\x88\x02\x03\xe9");
        let ping = reader.next_read().unwrap();
        assert!(matches!(
            ping,
            Some(Read::Frame(ServerFrame {
                opcode: OP_PING,
                ..
            }))
        ));
        let joined = reader.next_read().unwrap();
        assert!(matches!(joined, Some(Read::Frame(f)) if f.payload == b"xy"));
        let Some(Read::Frame(close)) = reader.next_read().unwrap() else {
            panic!("no close frame");
        };
        assert_eq!(close.close_code(), Some(1001));
        assert!(reader.is_empty());
        let mut reader = Reader::default();
        reader.feed(b"SSH-2.0\r\n\r\n");
        assert!(reader.next_read().is_err());
    }
}
