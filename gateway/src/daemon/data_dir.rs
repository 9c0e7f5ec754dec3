//! The data directory: a lock that keeps two daemons off it, the record of how many
//! shards wrote it, and the JWT secret generated into it on first start.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::StartupError;
use crate::config::Settings;

/// Name of the generated secret inside the data directory.
pub const JWT_SECRET_FILE: &str = "jwt-secret";
/// Lock file that keeps two daemons off one data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Name of the file that records how many shards wrote the data directory.
pub const SHARDS_FILE: &str = "shards";

/// Conversations live in the log of their home shard, and the home depends on the shard
/// count: a data directory is only usable with the count that wrote it.
pub(super) fn check_layout(data_dir: &Path, shards: usize) -> Result<(), StartupError> {
    let path = data_dir.join(SHARDS_FILE);
    let data_dir_error = |source| StartupError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found: usize = text.trim().parse().map_err(|_| {
                data_dir_error(io::Error::other(format!(
                    "holds {:?}, not a shard count",
                    text.trim()
                )))
            })?;
            if found != shards {
                return Err(StartupError::ShardCountChanged {
                    path: data_dir.to_path_buf(),
                    found,
                    configured: shards,
                });
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let temporary = data_dir.join(format!("{SHARDS_FILE}.tmp"));
            let mut file = File::create(&temporary).map_err(data_dir_error)?;
            file.write_all(format!("{shards}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(data_dir_error)?;
            std::fs::rename(&temporary, &path).map_err(data_dir_error)?;
            File::open(data_dir)
                .and_then(|dir| dir.sync_all())
                .map_err(data_dir_error)
        }
        Err(error) => Err(data_dir_error(error)),
    }
}

/// Create the data directory and take its lock. The lock lives as long as the process.
pub(super) fn lock(path: &Path) -> Result<File, StartupError> {
    let data_dir_error = |source| StartupError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(data_dir_error)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(data_dir_error)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::DataDirLocked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(data_dir_error(source)),
    }
}

/// The configured secret, or the one in the data directory, created on first start.
pub(super) fn jwt_secret(settings: &Settings) -> Result<String, StartupError> {
    if !settings.jwt_secret.is_empty() {
        return Ok(settings.jwt_secret.clone());
    }
    let path = settings.data_dir.join(JWT_SECRET_FILE);
    let secret_error = |reason: String| StartupError::Secret {
        path: path.clone(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim().to_string();
            if secret.is_empty() {
                return Err(secret_error("file is empty".into()));
            }
            tracing::info!(path = %path.display(), "using the JWT secret in the data dir");
            Ok(secret)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut bytes))
                .map_err(|error| secret_error(format!("reading /dev/urandom: {error}")))?;
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|error| secret_error(error.to_string()))?;
            writeln!(file, "{secret}")
                .and_then(|()| file.sync_all())
                .map_err(|error| secret_error(error.to_string()))?;
            tracing::info!(path = %path.display(), "generated a JWT secret (mint tokens with: parley token --data-dir)");
            Ok(secret)
        }
        Err(error) => Err(secret_error(error.to_string())),
    }
}
