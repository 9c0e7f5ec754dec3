//! What the targets share: the JWT key and tokens, the limits sessions run under (small,
//! so that inputs reach them), the clock, a scratch directory and the QUIC certificate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parley_gateway::quic::cert::{load_or_create, TlsFiles};
use parley_router::auth::{Claims, JwtKey};
use parley_router::clock::Now;
use parley_router::limits::ChatLimits;
use parley_router::session::{SessionConfig, SessionLimits};

/// The HS256 secret of every target's server side.
pub const SECRET: &[u8] = b"parley-fuzz-secret";
/// The wall clock every target runs at (2025-06-15), in ms since the epoch.
pub const NOW_MS: u64 = 1_750_000_000_000;
/// Expiry of the fixture's tokens (2100-01-01): valid at [`NOW_MS`] and long after.
pub const TOKEN_EXP: u64 = 4_102_444_800;

pub fn key() -> JwtKey {
    JwtKey::new(SECRET)
}

/// A valid token for `alice` (no device), as the seed corpora carry it.
pub fn token() -> String {
    key().sign(&Claims {
        sub: "alice".into(),
        exp: TOKEN_EXP,
        dev: None,
    })
}

/// A valid token for `alice` on device `phone`.
pub fn device_token() -> String {
    key().sign(&Claims {
        sub: "alice".into(),
        exp: TOKEN_EXP,
        dev: Some("phone".into()),
    })
}

/// The instant the targets' clocks start at (one per process; inputs only add to it).
pub fn start() -> Now {
    static START: OnceLock<Instant> = OnceLock::new();
    Now {
        instant: *START.get_or_init(Instant::now),
        unix_ms: NOW_MS,
    }
}

/// `now` moved on by `ms`, at most a century (settings may ask for silences that long).
pub fn later(now: Now, ms: u64) -> Now {
    let ms = ms.min(100 * 365 * 24 * 3600 * 1000);
    Now {
        instant: now.instant + Duration::from_millis(ms),
        unix_ms: now.unix_ms + ms,
    }
}

/// Limits small enough that an input of a few hundred bytes reaches each of them. They
/// satisfy what the settings' validation requires of each other (the queue holds the
/// replies to one frame: burst + strikes + 1).
pub fn session_limits() -> SessionLimits {
    SessionLimits {
        auth_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(75),
        max_frame_bytes: 2048,
        rate_per_sec: 200,
        rate_burst: 48,
        abuse_strikes: 16,
        outbound_queue_len: 96,
        outbound_queue_bytes: 32 * 1024,
    }
}

pub fn chat_limits() -> ChatLimits {
    ChatLimits {
        max_body_bytes: 512,
        max_media_bytes: 256,
        max_group_members: 8,
        history_page_default: 5,
        history_page_max: 10,
        sync_max_messages: 16,
        sync_max_convs: 4,
        presence_get_max_users: 4,
        message_cache_per_conv: 8,
        ..ChatLimits::default()
    }
}

pub fn session_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        limits: session_limits(),
        chat: chat_limits(),
        jwt: key(),
        node: "fuzz".into(),
    })
}

/// A fresh empty directory for one run of a target, removed when dropped. Under
/// /dev/shm where there is one: the WAL target opens a log per run.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = scratch_root().join(format!("run-{}-{n}", std::process::id()));
        // A directory left by a crashed run of the same pid and number goes first.
        let _absent = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _gone_already = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("parley-fuzz-{}", users_id()))
}

fn users_id() -> u32 {
    // Per user, so that two users' runs do not share files.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

/// The development certificate parleyd makes for itself (quic::cert), made once and
/// shared by every process of this user: a new pair goes into a private directory that
/// is then renamed into place, so a concurrent process never sees half a pair.
pub fn tls() -> &'static TlsFiles {
    static TLS: OnceLock<TlsFiles> = OnceLock::new();
    TLS.get_or_init(|| {
        // Every quiche configuration loads BoringSSL's default trust store (hundreds of
        // system CA certificates), which here no side uses (the client does not verify,
        // the server asks for no client certificate): an empty one makes the QUIC target
        // some ten times faster. Set before the first configuration, once.
        std::env::set_var("SSL_CERT_FILE", "/dev/null");
        std::env::set_var("SSL_CERT_DIR", "/nonexistent");
        let dir = scratch_root().join("tls");
        if !dir.join(parley_gateway::quic::cert::DEV_KEY_FILE).exists() {
            let making = scratch_root().join(format!("tls-{}", std::process::id()));
            std::fs::create_dir_all(&making).expect("scratch directory");
            load_or_create(&making, Path::new(""), Path::new("")).expect("development pair");
            if std::fs::rename(&making, &dir).is_err() {
                // Another process put its pair there first: use that one.
                let _ = std::fs::remove_dir_all(&making);
            }
        }
        load_or_create(&dir, Path::new(""), Path::new("")).expect("development pair")
    })
}
