//! Target `framing`: QUIC's document framing (router/src/framing.rs), the reader every
//! QUIC session stream goes through.
//!
//! Input: one byte for the document limit (0-255 bytes), one for the first piece's
//! length, then the stream's bytes, which are fed whole, in two pieces, and one byte at a
//! time.
//!
//! Invariants:
//! - the frames found do not depend on how the stream is cut into pushes;
//! - they are exactly what a plain reading of the stream gives (written here apart from
//!   the reader): each 4-byte big-endian length, then a document of that many bytes when
//!   it is within the limit, or `Oversized(length)` when it is not;
//! - a document is never over the limit, and the reader keeps no document it skips.

use parley_router::framing::{frame_document, DocumentReader, Frame, PREFIX_BYTES};

#[derive(Debug, PartialEq)]
enum Found {
    Document(Vec<u8>),
    Oversized(usize),
}

pub fn framing(data: &[u8]) {
    let [limit, split, stream @ ..] = data else {
        return;
    };
    let max = usize::from(*limit);
    let split = usize::from(*split).min(stream.len());
    let expected = plain_reading(stream, max);
    let whole = read(&[stream], max);
    let halves = read(&[&stream[..split], &stream[split..]], max);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let bytewise = read(&bytes, max);
    assert_eq!(whole, expected);
    assert_eq!(halves, expected);
    assert_eq!(bytewise, expected);
    // What a sender frames reads back as it was sent.
    if let Found::Document(first) = expected.first().unwrap_or(&Found::Oversized(0)) {
        let mut wire = Vec::new();
        frame_document(&mut wire, first);
        assert_eq!(read(&[&wire], max), vec![Found::Document(first.clone())]);
    }
}

fn read(pieces: &[&[u8]], max: usize) -> Vec<Found> {
    let mut reader = DocumentReader::default();
    let mut found = Vec::new();
    for piece in pieces {
        reader.push(piece, max, |frame| match frame {
            Frame::Document(bytes) => {
                assert!(bytes.len() <= max, "a document of {} bytes", bytes.len());
                found.push(Found::Document(bytes.to_vec()));
            }
            Frame::Oversized(len) => found.push(Found::Oversized(len)),
        });
    }
    found
}

/// The frames of a complete reading: an oversized document is named when its length
/// has arrived, a document only once all of it has.
fn plain_reading(mut stream: &[u8], max: usize) -> Vec<Found> {
    let mut found = Vec::new();
    while stream.len() >= PREFIX_BYTES {
        let (prefix, rest) = stream.split_at(PREFIX_BYTES);
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > max {
            found.push(Found::Oversized(len));
            stream = &rest[len.min(rest.len())..];
            continue;
        }
        if rest.len() < len {
            break;
        }
        found.push(Found::Document(rest[..len].to_vec()));
        stream = &rest[len..];
    }
    found
}
