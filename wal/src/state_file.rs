//! The state snapshot file, the log's second on-disk format: the owner's state as of a
//! durable LSN, so that recovery replays only the records after it.
//!
//! One file, `state`, beside the segments. It is written whole to `state.tmp`, synced,
//! renamed over `state`, and the directory synced: a crash leaves the old snapshot or the
//! new one, never a mix, and a failed save (a full disk) leaves the old one. Only then is its LSN recorded as the snapshot LSN (retention's
//! file `snapshot`), so the snapshot LSN never names a state that was not saved.
//!
//! Layout (little-endian), a 28-byte header then the state:
//!
//! | offset | size | field                                                  |
//! |--------|------|--------------------------------------------------------|
//! | 0      | 8    | magic `PARLEYS1`                                       |
//! | 8      | 8    | LSN the state is as of                                 |
//! | 16     | 8    | length of the state in bytes                           |
//! | 24     | 4    | crc32c of bytes 8..24 (LSN and length) and the state   |
//! | 28     | len  | the state (the owner's bytes; the log does not read them) |
//!
//! A file shorter than the header or with another magic is "not a state snapshot"; a
//! state of another length than recorded is "truncated"; a checksum mismatch is damage.
//! Each is a [`WalError::Corruption`] naming the file.

use crate::error::WalError;
use crate::format::Lsn;
use crate::log::Wal;
use crate::replace_file::replace_file;

const STATE_FILE: &str = "state";
const STATE_MAGIC: &[u8; 8] = b"PARLEYS1";
/// magic, LSN, length, crc32c.
const STATE_HEADER: usize = 8 + 8 + 8 + 4;

/// The file's bytes for `state` as of `lsn`.
pub fn encode_state(lsn: Lsn, state: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(STATE_HEADER + state.len());
    bytes.extend_from_slice(STATE_MAGIC);
    bytes.extend_from_slice(&lsn.to_le_bytes());
    bytes.extend_from_slice(&(state.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[8..24]), state);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(state);
    bytes
}

/// The LSN and state in a file's bytes, checked whole; `Err` says what is wrong.
pub fn decode_state(bytes: &[u8]) -> Result<(Lsn, &[u8]), &'static str> {
    if bytes.len() < STATE_HEADER || &bytes[..8] != STATE_MAGIC {
        return Err("not a state snapshot");
    }
    let number = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (lsn, len) = (number(8), number(16));
    let stored_crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    let state = &bytes[STATE_HEADER..];
    if state.len() as u64 != len {
        return Err("state snapshot is truncated");
    }
    if crc32c::crc32c_append(crc32c::crc32c(&bytes[8..24]), state) != stored_crc {
        return Err("state snapshot checksum mismatch");
    }
    Ok((lsn, state))
}

impl Wal {
    /// Save the owner's state as of `lsn`, which must be durable: written whole to a
    /// temporary file, synced and renamed, then recorded as the snapshot LSN. Recovery
    /// loads it ([`load_state`](Self::load_state)) and replays only the records after it.
    pub fn save_state(&self, lsn: Lsn, state: &[u8]) -> Result<(), WalError> {
        if lsn > self.durable_lsn() {
            return Err(WalError::NotFound(lsn));
        }
        // A failure (a full disk, say) leaves the previous snapshot as it was.
        replace_file(&self.shared.dir.join(STATE_FILE), &encode_state(lsn, state))?;
        self.record_snapshot(lsn)
    }

    /// The state saved last and its LSN, checked whole; `None` when none was saved.
    pub fn load_state(&self) -> Result<Option<(Lsn, Vec<u8>)>, WalError> {
        let path = self.shared.dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WalError::io("read", &path, e)),
        };
        match decode_state(&bytes) {
            Ok((lsn, state)) => Ok(Some((lsn, state.to_vec()))),
            Err(detail) => Err(WalError::Corruption {
                path,
                offset: 0,
                detail: detail.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_as_documented() {
        let bytes = encode_state(0x0102, b"abc");
        assert_eq!(&bytes[..8], b"PARLEYS1");
        assert_eq!(bytes[8..16], 0x0102u64.to_le_bytes());
        assert_eq!(bytes[16..24], 3u64.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[8..24]), b"abc");
        assert_eq!(bytes[24..28], crc.to_le_bytes());
        assert_eq!(&bytes[28..], b"abc");
        assert_eq!(decode_state(&bytes), Ok((0x0102, &b"abc"[..])));
    }

    #[test]
    fn damage_is_named() {
        let bytes = encode_state(7, b"state");
        assert_eq!(decode_state(&bytes[..20]), Err("not a state snapshot"));
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] ^= 1;
        assert_eq!(decode_state(&wrong_magic), Err("not a state snapshot"));
        assert_eq!(
            decode_state(&bytes[..bytes.len() - 1]),
            Err("state snapshot is truncated")
        );
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert_eq!(
            decode_state(&flipped),
            Err("state snapshot checksum mismatch")
        );
    }
}
