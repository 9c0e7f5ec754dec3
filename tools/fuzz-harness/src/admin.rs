//! Target `admin`: one request on the admin listener (gateway/src/admin.rs `respond`).
//! The media and fallback HTTP transports that issue 24 also names do not exist yet;
//! when they do, their request handling gets a target beside this one.
//!
//! Input: one option byte (bit 0: the shard is ready; bit 1: the process drains), then
//! the request bytes.
//!
//! Invariants:
//! - every request is answered with one whole response, whatever its bytes;
//! - the response is `HTTP/1.1` with one of the statuses the listener gives, its
//!   `Content-Length` the length of its body, `Connection: close`;
//! - `/readyz` says 200 exactly when the shard is ready and the process is not
//!   draining; what is read stays within the head limit.

use std::io::{Cursor, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parley_gateway::admin::{respond, AdminState};
use parley_gateway::kernel_tcp::KernelTcpMetrics;
use parley_gateway::metrics::ShardMetrics;

const STATUSES: [&str; 4] = [
    "200 OK",
    "404 Not Found",
    "405 Method Not Allowed",
    "503 Service Unavailable",
];

pub fn admin(data: &[u8]) {
    let Some((&options, request)) = data.split_first() else {
        return;
    };
    let shard = Arc::new(ShardMetrics::default());
    let ready = options & 1 != 0;
    let draining = options & 2 != 0;
    shard.ready.store(ready, Ordering::Release);
    let state = AdminState {
        shards: vec![shard],
        draining: Arc::new(AtomicBool::new(draining)),
        kernel_tcp: Arc::new(KernelTcpMetrics::default()),
    };
    let mut input = Counted(Cursor::new(request), 0);
    let mut output = Vec::new();
    let answered = respond(&mut input, &mut output, &state);
    assert!(
        input.1 <= 8 * 1024,
        "read {} bytes of a request head",
        input.1
    );
    if let Err(error) = answered {
        panic!("a request got no response: {error}");
    }
    let text = String::from_utf8(output).expect("a response is text");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response has a head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .expect("an HTTP/1.1 status line");
    assert!(STATUSES.contains(&status), "status {status}");
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (key, value) = line.split_once(": ").expect("a header line");
            (key.to_ascii_lowercase(), value.to_string())
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(header("connection"), Some("close"));
    let first_line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = first_line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let (method, target) = (words.next(), words.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    if method == Some(b"GET") && path == Some(b"/readyz") {
        let expect = if ready && !draining {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        assert_eq!(status, expect);
    }
}

/// A reader that counts what was taken from it.
struct Counted<R>(R, usize);

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n;
        Ok(n)
    }
}
