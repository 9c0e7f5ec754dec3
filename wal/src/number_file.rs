//! Small decimal files beside the segments (the epoch, the snapshot LSN): one number and
//! a newline, replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory), so a crash leaves the old value or the new one.

use std::fs::File;
use std::path::Path;

use crate::error::WalError;
use crate::recovery::sync_dir;

pub(crate) fn write_number(path: &Path, value: u64) -> Result<(), WalError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n"))
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WalError::io("write", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
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
