//! QUIC's document framing (PROTOCOL.md section 1): each JSON document on the session
//! stream is a 4-byte big-endian length, then that many bytes. Shared by the gateway
//! and the tools' clients.

/// Length prefix of each document on the stream.
pub const PREFIX_BYTES: usize = 4;
/// Input capacity kept between documents; more is released so idle connections stay small.
const RETAINED_BYTES: usize = 256;

/// Reassembles length-prefixed documents from stream bytes. A document longer than the
/// `max_document` is skipped as it arrives, never buffered.
#[derive(Debug, Default)]
pub struct DocumentReader {
    prefix: [u8; PREFIX_BYTES],
    prefix_len: usize,
    /// Bytes of the current document still to come, once its prefix is complete.
    remaining: usize,
    skipping: bool,
    body: Vec<u8>,
}

/// What the reader found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Document(&'a [u8]),
    /// A document over the limit, discarded; its declared length.
    Oversized(usize),
}

impl DocumentReader {
    /// Feed stream bytes; `on_frame` sees every document they complete.
    pub fn push(&mut self, mut data: &[u8], max_document: usize, mut on_frame: impl FnMut(Frame)) {
        while !data.is_empty() {
            if self.prefix_len < PREFIX_BYTES {
                let take = (PREFIX_BYTES - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                data = &data[take..];
                if self.prefix_len < PREFIX_BYTES {
                    return;
                }
                self.remaining = u32::from_be_bytes(self.prefix) as usize;
                self.skipping = self.remaining > max_document;
                if self.skipping {
                    on_frame(Frame::Oversized(self.remaining));
                }
            }
            let take = self.remaining.min(data.len());
            if !self.skipping {
                self.body.extend_from_slice(&data[..take]);
            }
            self.remaining -= take;
            data = &data[take..];
            if self.remaining == 0 {
                if !self.skipping {
                    on_frame(Frame::Document(&self.body));
                }
                self.body.clear();
                if self.body.capacity() > RETAINED_BYTES {
                    self.body = Vec::new();
                }
                self.prefix_len = 0;
                self.skipping = false;
            }
        }
    }
}

/// Append one document with its length prefix.
pub fn frame_document(out: &mut Vec<u8>, document: &[u8]) {
    let len = u32::try_from(document.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(document);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(reader: &mut DocumentReader, data: &[u8], max: usize) -> Vec<String> {
        let mut seen = Vec::new();
        reader.push(data, max, |frame| {
            seen.push(match frame {
                Frame::Document(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Frame::Oversized(len) => format!("oversized {len}"),
            })
        });
        seen
    }

    #[test]
    fn documents_split_anywhere_are_reassembled() {
        let mut wire = Vec::new();
        frame_document(&mut wire, br#"{"id":1,"op":"ping"}"#);
        frame_document(&mut wire, b"{\n\"id\":2,\n\"op\":\"ping\"}");
        for split in 0..wire.len() {
            let mut reader = DocumentReader::default();
            let mut seen = frames(&mut reader, &wire[..split], 1024);
            seen.extend(frames(&mut reader, &wire[split..], 1024));
            assert_eq!(seen.len(), 2, "split at {split}");
            assert_eq!(seen[1], "{\n\"id\":2,\n\"op\":\"ping\"}");
        }
    }

    #[test]
    fn an_oversized_document_is_skipped_not_buffered() {
        let mut reader = DocumentReader::default();
        let mut wire = Vec::new();
        frame_document(&mut wire, &[b'x'; 100]);
        frame_document(&mut wire, b"{}");
        assert_eq!(frames(&mut reader, &wire[..50], 10), ["oversized 100"]);
        assert!(reader.body.is_empty());
        assert_eq!(frames(&mut reader, &wire[50..], 10), ["{}"]);
    }

    #[test]
    fn a_huge_declared_length_costs_nothing() {
        let mut reader = DocumentReader::default();
        let seen = frames(&mut reader, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], 1024);
        assert_eq!(seen, [format!("oversized {}", u32::MAX)]);
        assert!(reader.body.capacity() == 0);
    }
}
