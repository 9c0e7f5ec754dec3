//! A small file beside the segments replaced atomically: written whole to `<name>.tmp`,
//! synced, renamed over the file, and the directory synced, so a crash leaves the old
//! contents or the new, never a mix.

use std::fs::File;
use std::path::Path;

use crate::error::WalError;
use crate::recovery::sync_dir;

/// Replace the file at `path` with `bytes`. On failure the old file is as it was and the
/// temporary file is removed: on a full disk (ENOSPC is the likely failure here) a
/// partial one would hold space the log needs.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), WalError> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(WalError::io("write", path, error));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
