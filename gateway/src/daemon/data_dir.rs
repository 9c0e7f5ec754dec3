//! The data directory: a lock that keeps two daemons off it, the record of how many
//! shards wrote it, and the JWT secret generated into it on first start.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// The data directory's lock, held for the life of the process. The lock file names
/// the process that holds it, and returning from `run` empties it (on drop): a start
/// that finds a name there knows the previous parleyd on this directory was killed
/// (or exited from its drain watchdog) rather than returning.
pub(super) struct DataDirLock {
    file: File,
    /// The pid the lock file named when this process took the lock.
    pub previous_unclean_exit: Option<u32>,
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Best effort: a name left behind only makes the next start patient with a busy
        // listen address.
        let _ = self.file.set_len(0);
    }
}

/// Create the data directory and take its lock. A lock held by a parleyd that is
/// exiting (killed a moment ago: the kernel still closes its files) is waited for, up to
/// `patience`; one held by a live process fails at once.
pub(super) fn lock(path: &Path, patience: Duration) -> Result<DataDirLock, StartupError> {
    let data_dir_error = |source| StartupError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(data_dir_error)?;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(data_dir_error)?;
    let give_up = Instant::now() + patience;
    let mut logged = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = read_holder(&file).map_err(data_dir_error)?;
                let exiting = holder.is_some_and(is_exiting);
                if !exiting || Instant::now() >= give_up {
                    return Err(StartupError::DataDirLocked {
                        path: path.to_path_buf(),
                    });
                }
                if !logged {
                    tracing::warn!(
                        holder = holder.unwrap_or_default(),
                        "the parleyd holding this data dir is exiting; waiting up to \
                         {patience:?} for its lock (restart_after_kill_wait_ms)"
                    );
                    logged = true;
                }
                std::thread::sleep(RESTART_WAIT_PAUSE);
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(data_dir_error(source)),
        }
    }
    let previous_unclean_exit = read_holder(&file).map_err(data_dir_error)?;
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "pid {}", std::process::id()))
        .map_err(data_dir_error)?;
    Ok(DataDirLock {
        file,
        previous_unclean_exit,
    })
}

/// Pause between two tries at what a just-killed parleyd still holds.
pub(super) const RESTART_WAIT_PAUSE: Duration = Duration::from_millis(20);

/// The pid the lock file names, read from its start whatever the file's position.
fn read_holder(file: &File) -> io::Result<Option<u32>> {
    // Bounded: the file holds one short line; anything longer is not ours.
    let mut bytes = [0u8; 64];
    let read = file.read_at(&mut bytes, 0)?;
    Ok(parse_holder(&String::from_utf8_lossy(&bytes[..read])))
}

/// Whether process `pid` is gone or on its way out: a zombie, or flagged PF_EXITING
/// (a SIGKILL was delivered and the kernel is tearing it down).
fn is_exiting(pid: u32) -> bool {
    /// PF_EXITING in the task's flags (include/linux/sched.h).
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold
    // spaces and parentheses, so the fields are counted after the last ')'.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    zombie || flags & PF_EXITING != 0
}

/// The pid in a lock file's `pid N` line; anything else (an empty file, an older
/// parleyd's, garbage) names no one.
fn parse_holder(text: &str) -> Option<u32> {
    text.trim().strip_prefix("pid ")?.parse().ok()
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
