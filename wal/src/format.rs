//! The on-disk format, as pure functions over bytes.
//!
//! A segment file is one 4 KiB header block, then records. Every record starts on an
//! 8-byte boundary; every flush starts on a fresh 4 KiB block, so acknowledged blocks are
//! never rewritten, and the gap up to the next block is zeros (padding).
//!
//! Record (little-endian), 32-byte header then payload, padded with zeros to 8 bytes:
//!
//! | offset | size | field                                                       |
//! |--------|------|-------------------------------------------------------------|
//! | 0      | 4    | crc32c of bytes 4..32 of the header and the payload         |
//! | 4      | 4    | payload length                                              |
//! | 8      | 8    | LSN                                                         |
//! | 16     | 4    | epoch                                                       |
//! | 20     | 1    | record type (the owner's; 0 is reserved)                    |
//! | 21     | 1    | flags: bit 0 = last record of its batch, bit 1 = first record of a flush |
//! | 22     | 2    | reserved, zero                                              |
//! | 24     | 8    | timestamp (the owner's clock, for example ms since epoch)   |

/// Alignment of direct I/O: offsets, lengths and buffer addresses.
pub const BLOCK: usize = 4096;
/// Records start on this boundary.
pub const RECORD_ALIGN: usize = 8;
pub const RECORD_HEADER: usize = 32;
/// The segment header occupies the first block.
pub const SEGMENT_HEADER: usize = BLOCK;
pub const SEGMENT_MAGIC: &[u8; 8] = b"PRLYWAL1";
pub const FORMAT_VERSION: u32 = 1;

/// Flag: this record ends its batch (a batch is applied whole or not at all).
pub const FLAG_BATCH_END: u8 = 1;
/// Flag: this record starts a flush (one write + fdatasync), at a block boundary. A flush
/// is issued only after the previous one's fdatasync returned, so bytes before a flush
/// start were durable: damage there is corruption, not a torn write.
pub const FLAG_FLUSH_START: u8 = 2;

pub type Lsn = u64;

/// The largest first LSN a segment header may give. LSNs start at 1 and a log would take
/// millennia to pass 2^62 records; a header beyond it was not written by the log, and
/// taking it would leave LSNs (u64) no room to count on.
pub const MAX_FIRST_LSN: Lsn = 1 << 62;

/// The sizes a segment may have: room for its header and one block of records, and at
/// most 1 TiB. A header recording a size outside them was not written by the log; taken,
/// it would be the bound of every write into the segment (and a size near 2^64 overflows
/// the arithmetic on it).
pub const MIN_SEGMENT_SIZE: u64 = (SEGMENT_HEADER + BLOCK) as u64;
pub const MAX_SEGMENT_SIZE: u64 = 1 << 40;

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub payload_len: u32,
    pub lsn: Lsn,
    pub epoch: u32,
    pub record_type: u8,
    pub flags: u8,
    pub timestamp: u64,
}

impl RecordHeader {
    pub fn batch_end(&self) -> bool {
        self.flags & FLAG_BATCH_END != 0
    }

    pub fn flush_start(&self) -> bool {
        self.flags & FLAG_FLUSH_START != 0
    }

    /// Bytes the record occupies on disk, padding included.
    pub fn stored_len(&self) -> usize {
        stored_len(self.payload_len as usize)
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub fn stored_len(payload_len: usize) -> usize {
    align_up(RECORD_HEADER + payload_len, RECORD_ALIGN)
}

pub fn align_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Encode one record at the start of `out`, which must hold `stored_len(payload.len())`
/// bytes; returns the bytes used (padding zeroed).
pub fn encode_record_into(out: &mut [u8], header: &RecordHeader, payload: &[u8]) -> usize {
    debug_assert_eq!(header.payload_len as usize, payload.len());
    let len = stored_len(payload.len());
    let out = &mut out[..len];
    out[4..8].copy_from_slice(&header.payload_len.to_le_bytes());
    out[8..16].copy_from_slice(&header.lsn.to_le_bytes());
    out[16..20].copy_from_slice(&header.epoch.to_le_bytes());
    out[20] = header.record_type;
    out[21] = header.flags;
    out[22..24].fill(0);
    out[24..32].copy_from_slice(&header.timestamp.to_le_bytes());
    out[RECORD_HEADER..RECORD_HEADER + payload.len()].copy_from_slice(payload);
    out[RECORD_HEADER + payload.len()..].fill(0);
    let crc = crc32c::crc32c(&out[4..RECORD_HEADER + payload.len()]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    len
}

/// Append one record to `out` (which must end on a record boundary).
pub fn encode_record(out: &mut Vec<u8>, header: &RecordHeader, payload: &[u8]) {
    debug_assert!(out.len().is_multiple_of(RECORD_ALIGN));
    let start = out.len();
    out.resize(start + stored_len(payload.len()), 0);
    encode_record_into(&mut out[start..], header, payload);
}

/// Mark the record at the start of `record` as the first of a flush, re-sealing its checksum.
pub fn set_flush_start(record: &mut [u8]) {
    record[21] |= FLAG_FLUSH_START;
    let payload_len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    let crc = crc32c::crc32c(&record[4..RECORD_HEADER + payload_len]);
    record[..4].copy_from_slice(&crc.to_le_bytes());
}

/// What is at a record position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record whose checksum verifies.
    Record(RecordHeader, &'a [u8]),
    /// A zero header: padding up to the next block, or the end of the log.
    Zero,
    /// Fewer bytes than a header or than the length says: a record cut short.
    Short,
    /// Bytes that are not a valid record (checksum or field mismatch).
    Invalid,
}

/// Decode the record at the start of `bytes`, which hold at most the rest of the segment.
pub fn decode_record(bytes: &[u8]) -> Decoded<'_> {
    if bytes.len() < RECORD_HEADER {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::Zero
        } else {
            Decoded::Short
        };
    }
    let head = &bytes[..RECORD_HEADER];
    if head.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let header = RecordHeader {
        payload_len: u32_at(4),
        lsn: u64_at(8),
        epoch: u32_at(16),
        record_type: head[20],
        flags: head[21],
        timestamp: u64_at(24),
    };
    let payload_end = RECORD_HEADER + header.payload_len as usize;
    if payload_end > bytes.len() {
        return Decoded::Short;
    }
    let crc = crc32c::crc32c(&bytes[4..payload_end]);
    if crc != u32_at(0) || head[22..24] != [0, 0] || header.lsn == 0 {
        return Decoded::Invalid;
    }
    Decoded::Record(header, &bytes[RECORD_HEADER..payload_end])
}

/// The first block of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_lsn: Lsn,
    pub segment_size: u64,
}

pub fn encode_segment_header(header: &SegmentHeader) -> Vec<u8> {
    let mut block = vec![0u8; SEGMENT_HEADER];
    block[..8].copy_from_slice(SEGMENT_MAGIC);
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    block[12..20].copy_from_slice(&header.first_lsn.to_le_bytes());
    block[20..28].copy_from_slice(&header.segment_size.to_le_bytes());
    let crc = crc32c::crc32c(&block[..28]);
    block[28..32].copy_from_slice(&crc.to_le_bytes());
    block
}

/// Why a segment header is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentHeaderError {
    TooShort,
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u32),
}

pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
    if bytes.len() < 32 {
        return Err(SegmentHeaderError::TooShort);
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err(SegmentHeaderError::BadMagic);
    }
    let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..28]) {
        return Err(SegmentHeaderError::BadChecksum);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SegmentHeaderError::UnsupportedVersion(version));
    }
    Ok(SegmentHeader {
        first_lsn: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
        segment_size: u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(lsn: Lsn, payload: &[u8]) -> RecordHeader {
        RecordHeader {
            payload_len: payload.len() as u32,
            lsn,
            epoch: 3,
            record_type: 7,
            flags: FLAG_BATCH_END,
            timestamp: 1234,
        }
    }

    #[test]
    fn round_trip_and_padding() {
        let mut out = Vec::new();
        encode_record(&mut out, &header(1, b"hello"), b"hello");
        assert_eq!(out.len(), 40);
        encode_record(&mut out, &header(2, b""), b"");
        assert_eq!(out.len(), 72);
        assert_eq!(
            decode_record(&out),
            Decoded::Record(header(1, b"hello"), b"hello")
        );
        assert_eq!(
            decode_record(&out[40..]),
            Decoded::Record(header(2, b""), b"")
        );
        assert_eq!(decode_record(&out[72..]), Decoded::Zero);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut out = Vec::new();
        encode_record(&mut out, &header(9, b"payload!"), b"payload!");
        let used = RECORD_HEADER + 8;
        for byte in 0..used {
            for bit in 0..8 {
                let mut copy = out.clone();
                copy[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode_record(&copy), Decoded::Record(..)),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn cut_records_are_short() {
        let mut out = Vec::new();
        encode_record(&mut out, &header(1, &[5; 100]), &[5; 100]);
        assert_eq!(decode_record(&out[..20]), Decoded::Short);
        assert_eq!(decode_record(&out[..RECORD_HEADER + 50]), Decoded::Short);
    }

    #[test]
    fn segment_header_round_trip() {
        let header = SegmentHeader {
            first_lsn: 42,
            segment_size: 1 << 26,
        };
        let block = encode_segment_header(&header);
        assert_eq!(block.len(), BLOCK);
        assert_eq!(decode_segment_header(&block), Ok(header));
        let mut bad = block.clone();
        bad[13] ^= 1;
        assert_eq!(
            decode_segment_header(&bad),
            Err(SegmentHeaderError::BadChecksum)
        );
        assert_eq!(
            decode_segment_header(&[0; 64]),
            Err(SegmentHeaderError::BadMagic)
        );
    }
}
