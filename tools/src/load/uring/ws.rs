//! The WebSocket client side without a socket: tungstenite's client handshake driven over
//! an in-memory pipe (`MemoryPipe`), and tungstenite's frame header codec over the engine's receive
//! buffers. Nothing of tungstenite stays per session: while the upgrade is in flight a
//! session keeps only its key (24 bytes) and, if the answer arrives in pieces, the
//! pieces; the handshake machine runs once, over the whole response head.

use std::io::Cursor;
use std::net::SocketAddr;

use parley_router::memory_pipe::MemoryPipe;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::{generate_request, Request};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};
use tungstenite::protocol::WebSocketConfig;

/// Longest response head accepted.
pub const MAX_HEAD: usize = 8192;

/// The upgrade request for Parley's WebSocket endpoint (as the epoll clients build it),
/// authenticated with `token` when there is one.
pub fn upgrade_request(target: SocketAddr, token: Option<&str>) -> Result<Request, String> {
    let mut request = format!("ws://{target}/v1/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(token) = token {
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| "token is not a header value".to_string())?;
        request.headers_mut().insert("authorization", bearer);
    }
    Ok(request)
}

/// The upgrade request's bytes, and its `Sec-WebSocket-Key` (to check the answer with).
pub fn start_upgrade(target: SocketAddr, token: &str) -> Result<(Vec<u8>, String), String> {
    generate_request(upgrade_request(target, Some(token))?).map_err(|e| e.to_string())
}

/// Where the response head ends in `bytes` (just past its blank line), once it is all
/// there.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Check a complete response `head` against the request sent with `key`: tungstenite's
/// client handshake, run over a pipe holding the head (the request it writes again
/// differs from the one sent only in its token, which the answer does not depend on).
pub fn finish_upgrade(target: SocketAddr, key: &str, head: &[u8]) -> Result<(), String> {
    let mut request = upgrade_request(target, None)?;
    let key = key.parse().map_err(|_| "bad key".to_string())?;
    request.headers_mut().insert("Sec-WebSocket-Key", key);
    // Reads stop at the end of the head, so nothing behind it is taken for the head.
    let pipe = MemoryPipe::with_input(head.to_vec());
    // The WebSocket tungstenite returns is dropped at once: keep its buffers small.
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0);
    match tungstenite::client::client_with_config(request, pipe, Some(config)) {
        Ok(_) => Ok(()),
        Err(HandshakeError::Interrupted(_)) => Err("incomplete response head".into()),
        Err(HandshakeError::Failure(error)) => Err(error.to_string()),
    }
}

/// Append a masked client frame (`Text`, `Pong` ...) carrying `payload`.
pub fn frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
    let header = FrameHeader {
        is_final: true,
        opcode,
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let frame = Frame::from_payload(header, payload.to_vec().into());
    // Writing into a Vec cannot fail.
    let _ = frame.format(out);
}

/// Append a masked text frame.
pub fn text(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    frame(out, OpCode::Data(Data::Text), payload, mask);
}

/// A frame's header and where its payload lies in the buffer it was read from.
pub struct Parsed {
    pub header: FrameHeader,
    pub payload: std::ops::Range<usize>,
}

/// The frame at the start of `bytes[at..]`: `Ok(None)` when it is not complete yet.
pub fn parse(bytes: &[u8], at: usize, max_payload: u64) -> Result<Option<Parsed>, String> {
    let mut cursor = Cursor::new(&bytes[at..]);
    match FrameHeader::parse(&mut cursor) {
        Ok(None) => Ok(None),
        Err(error) => Err(error.to_string()),
        Ok(Some((header, length))) => {
            if length > max_payload {
                return Err(format!("a frame of {length} bytes (limit {max_payload})"));
            }
            let start = at + cursor.position() as usize;
            let end = start + length as usize;
            if end > bytes.len() {
                return Ok(None);
            }
            Ok(Some(Parsed {
                header,
                payload: start..end,
            }))
        }
    }
}

/// Undo a frame mask in place (servers do not mask; a masked frame is still read right).
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::Control;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut out = Vec::new();
        text(&mut out, br#"{"id":1,"op":"ping"}"#, [1, 2, 3, 4]);
        frame(
            &mut out,
            OpCode::Control(Control::Ping),
            b"hb",
            [9, 9, 9, 9],
        );
        for cut in 0..out.len() {
            let part = &out[..cut];
            let first = parse(part, 0, 1 << 20).unwrap();
            assert!(first.is_none() || cut >= 26, "cut {cut}");
        }
        let first = parse(&out, 0, 1 << 20).unwrap().unwrap();
        assert_eq!(first.header.opcode, OpCode::Data(Data::Text));
        let mut payload = out[first.payload.clone()].to_vec();
        unmask(&mut payload, first.header.mask.unwrap());
        assert_eq!(payload, br#"{"id":1,"op":"ping"}"#);
        let second = parse(&out, first.payload.end, 1 << 20).unwrap().unwrap();
        assert_eq!(second.header.opcode, OpCode::Control(Control::Ping));
        assert_eq!(second.payload.end, out.len());
        assert!(parse(&out, 0, 4).is_err());
    }

    #[test]
    fn the_request_carries_the_token_and_the_handshake_checks_the_answer() {
        let target: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let (request, key) = start_upgrade(target, "abc").unwrap();
        let text = String::from_utf8(request).unwrap();
        assert!(text.starts_with("GET /v1/ws HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("authorization: Bearer abc\r\n"), "{text}");
        assert!(
            text.contains(&format!("Sec-WebSocket-Key: {key}\r\n")),
            "{text}"
        );
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let mut response = head.clone().into_bytes();
        response.extend_from_slice(b"\x81\x02ok");
        assert_eq!(head_end(&response[..40]), None);
        assert_eq!(head_end(&response), Some(head.len()));
        assert_eq!(finish_upgrade(target, &key, head.as_bytes()), Ok(()));
        let (_, other_key) = start_upgrade(target, "abc").unwrap();
        assert!(finish_upgrade(target, &other_key, head.as_bytes()).is_err());
        let refused = finish_upgrade(target, &key, b"HTTP/1.1 401 Unauthorized\r\n\r\n");
        assert!(refused.is_err_and(|why| why.contains("401")));
    }
}
