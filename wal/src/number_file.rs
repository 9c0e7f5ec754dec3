//! Small decimal files beside the segments (the epoch, the snapshot LSN): one number and
//! a newline, replaced atomically ([`replace_file`]), so a crash leaves the old value or
//! the new one.

use std::path::Path;

use crate::error::WalError;
use crate::replace_file::replace_file;

pub(crate) fn write_number(path: &Path, value: u64) -> Result<(), WalError> {
    replace_file(path, format!("{value}\n").as_bytes())
}

/// The number in `path`; `None` when the file does not exist.
pub(crate) fn read_number(path: &Path) -> Result<Option<u64>, WalError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| WalError::Corruption {
                path: path.to_path_buf(),
                offset: 0,
                detail: format!("not a number: {:?}", text.trim()),
            }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(WalError::io("read", path, error)),
    }
}
