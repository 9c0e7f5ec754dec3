//! An in-memory byte stream for driving tungstenite without a socket: what it reads comes
//! from bytes pushed in, what it writes collects in `output`. The gateway's WebSocket
//! transport and the load generator's upgrade check both run tungstenite over it.
//!
//! While an HTTP upgrade is in flight, reads stop at the end of the HTTP head
//! (`\r\n\r\n`), so bytes a peer pipelined behind it (WebSocket frames) stay here instead
//! of vanishing into tungstenite's handshake buffer.

use std::io::{self, Read, Write};

const HEAD_END: &[u8; 4] = b"\r\n\r\n";

#[derive(Debug)]
pub struct MemoryPipe {
    input: Vec<u8>,
    /// Bytes of `input` already read.
    read_pos: usize,
    /// Reads stop at the end of the HTTP head (set until [`Self::end_head`]).
    head_only: bool,
    /// The head's end was read: reads return nothing more while `head_only`.
    head_read: bool,
    pub output: Vec<u8>,
}

impl Default for MemoryPipe {
    fn default() -> Self {
        Self::with_input(Vec::new())
    }
}

impl MemoryPipe {
    /// A pipe for an upgrade whose bytes so far are `input`.
    pub fn with_input(input: Vec<u8>) -> Self {
        Self {
            input,
            read_pos: 0,
            head_only: true,
            head_read: false,
            output: Vec::new(),
        }
    }

    pub fn push_input(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
    }

    /// What was pushed and not read yet.
    pub fn unread(&self) -> &[u8] {
        &self.input[self.read_pos..]
    }

    /// The upgrade is done: reads take everything from now on.
    pub fn end_head(&mut self) {
        self.head_only = false;
    }

    /// Drop what was read; an emptied buffer larger than `retain_bytes` is released, so
    /// an idle connection keeps little.
    pub fn compact(&mut self, retain_bytes: usize) {
        debug_assert!(
            !self.head_only,
            "compacting would lose a head split across pushes"
        );
        self.input.drain(..self.read_pos);
        self.read_pos = 0;
        if self.input.is_empty() && self.input.capacity() > retain_bytes {
            self.input = Vec::new();
        }
    }

    /// Where the next read must stop: the end of the head when it is in `input` (a
    /// terminator may straddle what was read and what was pushed since), else the end
    /// of the input.
    fn read_end(&self) -> usize {
        if !self.head_only {
            return self.input.len();
        }
        if self.head_read {
            return self.read_pos;
        }
        let from = self.read_pos.saturating_sub(HEAD_END.len() - 1);
        self.input[from..]
            .windows(HEAD_END.len())
            .position(|window| window == HEAD_END)
            .map_or(self.input.len(), |at| from + at + HEAD_END.len())
    }
}

impl Read for MemoryPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.read_end();
        let available = &self.input[self.read_pos..end];
        if available.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.read_pos += n;
        if self.head_only && self.read_pos >= HEAD_END.len() {
            self.head_read = self.input[..self.read_pos].ends_with(HEAD_END);
        }
        Ok(n)
    }
}

impl Write for MemoryPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(pipe: &mut MemoryPipe) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 5];
        while let Ok(n) = pipe.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn reads_stop_at_the_head_even_when_its_end_arrives_in_pieces() {
        let mut pipe = MemoryPipe::with_input(b"HTTP/1.1 101 OK\r\nA: b\r\n\r".to_vec());
        assert_eq!(read_all(&mut pipe), b"HTTP/1.1 101 OK\r\nA: b\r\n\r");
        pipe.push_input(b"\n\x81\x02hi");
        assert_eq!(read_all(&mut pipe), b"\n");
        assert_eq!(pipe.unread(), b"\x81\x02hi");
        // Frame bytes that look like a head's end are not read while the head is.
        pipe.push_input(b"\r\n\r\n");
        assert!(pipe.read(&mut [0u8; 8]).is_err());
        pipe.end_head();
        assert_eq!(read_all(&mut pipe), b"\x81\x02hi\r\n\r\n");
    }

    #[test]
    fn a_bare_cr_or_lf_does_not_end_the_head() {
        let mut pipe = MemoryPipe::with_input(b"a\r\r\nb\n\n\r\nc\r\n\r\nrest".to_vec());
        assert_eq!(read_all(&mut pipe), b"a\r\r\nb\n\n\r\nc\r\n\r\n");
        assert_eq!(pipe.unread(), b"rest");
    }

    #[test]
    fn compaction_keeps_the_unread_and_releases_a_large_empty_buffer() {
        let mut pipe = MemoryPipe::default();
        pipe.end_head();
        pipe.push_input(&[7; 1000]);
        let mut buf = [0u8; 600];
        assert_eq!(pipe.read(&mut buf).unwrap(), 600);
        pipe.compact(256);
        assert_eq!(pipe.unread(), &[7; 400][..]);
        assert_eq!(read_all(&mut pipe).len(), 400);
        pipe.compact(256);
        assert_eq!(pipe.input.capacity(), 0);
        pipe.write_all(b"out").unwrap();
        assert_eq!(pipe.output, b"out");
    }
}
