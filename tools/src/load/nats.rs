//! Just enough of the NATS client protocol to run `chat-1to1` and `idle` against
//! nats-server's WebSocket listener, for a side-by-side figure from an independent
//! server. Core NATS only: no acknowledgements and no persistence (at most once), so
//! a NATS "ack" in a report is the moment the publish was written.
//!
//! Sans-IO: bytes in, parsed operations out.

/// One server operation.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOp {
    Info,
    Ping,
    Pong,
    Ok,
    Err(String),
    /// A delivered message's payload.
    Msg(Vec<u8>),
}

/// Longest buffered input before the connection is considered broken.
const INPUT_MAX_BYTES: usize = 8 << 20;

/// Reassembles server operations from WebSocket frames (an operation may span frames).
#[derive(Default)]
pub struct Input {
    buffer: Vec<u8>,
    start: usize,
}

impl Input {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        if self.buffer.len() - self.start + bytes.len() > INPUT_MAX_BYTES {
            return Err("NATS input over 8 MiB without a complete operation".into());
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete operation, if one has arrived.
    pub fn next_op(&mut self) -> Result<Option<ServerOp>, String> {
        let pending = &self.buffer[self.start..];
        let Some(line_end) = pending.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&pending[..line_end])
            .map_err(|_| "NATS control line is not UTF-8".to_string())?;
        let mut words = line.split_ascii_whitespace();
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let op = match verb.as_str() {
            "MSG" => {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let size: usize = line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad MSG line {line:?}"))?;
                let payload_start = line_end + 2;
                if pending.len() < payload_start + size + 2 {
                    return Ok(None);
                }
                let payload = pending[payload_start..payload_start + size].to_vec();
                self.start += payload_start + size + 2;
                return Ok(Some(ServerOp::Msg(payload)));
            }
            "INFO" => ServerOp::Info,
            "PING" => ServerOp::Ping,
            "PONG" => ServerOp::Pong,
            "+OK" => ServerOp::Ok,
            "-ERR" => ServerOp::Err(line[4..].trim().to_string()),
            _ => return Err(format!("unknown NATS operation {line:?}")),
        };
        self.start += line_end + 2;
        Ok(Some(op))
    }
}

/// The subject a client receives on.
pub fn subject(user: &str) -> String {
    format!("parley.{user}")
}

/// The first frame: connect quietly, subscribe, and ask for a PONG that confirms both.
pub fn hello(user: &str) -> String {
    format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false}}\r\nSUB {} 1\r\nPING\r\n",
        subject(user)
    )
}

pub fn publish(out: &mut String, to_user: &str, payload: &str) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "PUB {} {}\r\n{payload}\r\n",
        subject(to_user),
        payload.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_reassemble_across_frames() {
        let mut input = Input::default();
        input.feed(b"INFO {\"server_id\":\"x\"}\r\nPI").unwrap();
        assert_eq!(input.next_op(), Ok(Some(ServerOp::Info)));
        assert_eq!(input.next_op(), Ok(None));
        input.feed(b"NG\r\nMSG parley.a 1 5\r\nhel").unwrap();
        assert_eq!(input.next_op(), Ok(Some(ServerOp::Ping)));
        assert_eq!(input.next_op(), Ok(None));
        input
            .feed(b"lo\r\n-ERR 'Authorization Violation'\r\n")
            .unwrap();
        assert_eq!(input.next_op(), Ok(Some(ServerOp::Msg(b"hello".to_vec()))));
        assert_eq!(
            input.next_op(),
            Ok(Some(ServerOp::Err("'Authorization Violation'".into())))
        );
        assert_eq!(input.next_op(), Ok(None));
        input.feed(b"BOGUS\r\n").unwrap();
        assert!(input.next_op().is_err());
        let mut out = String::new();
        publish(&mut out, "b", "hi");
        assert_eq!(out, "PUB parley.b 2\r\nhi\r\n");
    }
}
