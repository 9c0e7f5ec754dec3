//! The admin listener: `/healthz`, `/readyz`, `/metrics`. A plain blocking HTTP/1.1
//! server on its own thread, off the shards, so it answers even when they are busy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::kernel_tcp::KernelTcpMetrics;
use crate::metrics::{render, ShardMetrics};

/// Largest request head read; admin requests are one short line and a few headers.
const MAX_REQUEST_HEAD_BYTES: u64 = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminState {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub draining: Arc<AtomicBool>,
    pub kernel_tcp: Arc<KernelTcpMetrics>,
}

impl AdminState {
    fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.shards.iter().all(|s| s.ready.load(Ordering::Acquire))
    }
}

pub fn spawn(listener: TcpListener, state: AdminState) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("parley-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = handle(stream, &state) {
                            tracing::debug!(%error, "admin request failed");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

fn handle(stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    respond(&stream, &stream, state)
}

/// Read one request from `input` and write its response to `output`. Apart from the
/// socket's timeouts this is all of the admin request handling, and the entry the fuzz
/// target `admin` drives with arbitrary request bytes.
pub fn respond(
    input: impl Read,
    mut output: impl Write,
    state: &AdminState,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(input.take(MAX_REQUEST_HEAD_BYTES));
    // Bytes, not text: a request that is not UTF-8 (a header may carry any octet) still
    // gets an answer, where reading lines as text refused it with no response at all.
    let mut request_line = Vec::new();
    reader.read_until(b'\n', &mut request_line)?;
    let request_line = String::from_utf8_lossy(&request_line);
    // Consume the headers so the client sees an orderly close.
    let mut header = Vec::new();
    while reader.read_until(b'\n', &mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") if state.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_string(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(
                &state.shards,
                state.draining.load(Ordering::Acquire),
                &state.kernel_tcp,
            ),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    write!(
        output,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    output.flush()
}
