//! The process lifecycle: configuration, data directory, secret, listeners, shards,
//! readiness, and the drain on SIGTERM/SIGINT. Every startup failure is one line that
//! says what failed and where, and a non-zero exit.
//!
//! - `data_dir`: the directory's lock, its shard-count record and the JWT secret;
//! - `listeners`: the per-shard SO_REUSEPORT sockets and the admin listener;
//! - `shards`: the socket engine, each shard's plan, and the wait until all serve;
//! - `signals`: the drain on the first signal, the exit on a second or a stuck drain.

mod data_dir;
mod listeners;
mod shards;
mod signals;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use parley_router::auth::JwtKey;
use parley_router::session::SessionConfig;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::admin::{self, AdminState};
use crate::config::{Cli, ConfigError, Settings};
use crate::kernel_tcp::{self, KernelTcpMetrics};
use crate::quic::cert::CertError;

pub use data_dir::{JWT_SECRET_FILE, LOCK_FILE, SHARDS_FILE};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("data dir {path} is in use by another parleyd (lock file {path}/{LOCK_FILE})", LOCK_FILE = data_dir::LOCK_FILE)]
    DataDirLocked { path: PathBuf },
    #[error("jwt secret file {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("cannot listen on {setting} {addr}: {source}")]
    Listen {
        setting: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("QUIC certificate: {0}")]
    Cert(#[from] CertError),
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: io::Error },
    #[error("shard {index}: {reason}")]
    Shard { index: usize, reason: String },
    #[error("data dir {path} was written by {found} shards, and this start has {configured}; conversations are homed by shard, so start with --shards {found}")]
    ShardCountChanged {
        path: PathBuf,
        found: usize,
        configured: usize,
    },
    #[error("shards did not become ready within {0:?}")]
    NotReady(Duration),
    #[error("socket_engine is io_uring, but {0}")]
    NoUring(String),
}

/// Run `parleyd`; the exit code is the process's.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            stderr_line(format_args!("parleyd: {first}"));
            return ExitCode::from(2);
        }
    };
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            stderr_line(format_args!("parleyd: error: {error}"));
            ExitCode::from(1)
        }
    }
}

/// One line to standard error, whatever became of it: `eprintln!` panics when stderr is
/// gone (a closed pipe, a supervisor that went away), and the threads that use this are
/// the ones that must then still exit the process (the drain watchdog, a failed log).
pub(crate) fn stderr_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false)
        // Its report of a failed write is an eprintln!, which panics when stderr is gone
        // (a closed pipe): the thread that logged, a shard among them, would die of it.
        // A log line that cannot be written is dropped instead.
        .log_internal_errors(false)
        .init();
}

fn run(cli: Cli) -> Result<ExitCode, StartupError> {
    // Handlers first, so a SIGTERM during startup waits for the drain instead of killing
    // the process outright; the signal thread starts once there are shards to drain.
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|source| {
        StartupError::Spawn {
            what: "signal handling".into(),
            source,
        }
    })?;
    let settings = Settings::resolve(cli, &|name| std::env::var(name).ok())?;
    let shard_count = settings.shard_count();
    let lock = data_dir::lock(
        &settings.data_dir,
        Duration::from_millis(settings.restart_after_kill_wait_ms),
    )?;
    if let Some(pid) = lock.previous_unclean_exit {
        tracing::warn!(
            previous_pid = pid,
            "the previous parleyd on this data dir did not exit cleanly; recovering"
        );
    }
    let listeners =
        listeners::Listeners::bind(&settings, shard_count, lock.previous_unclean_exit.is_some())?;
    // After the listeners, so a start that fails on a port leaves no new secret behind.
    let secret = data_dir::jwt_secret(&settings)?;
    let session_config = Arc::new(SessionConfig {
        limits: settings.session_limits(),
        chat: settings.chat_limits(),
        jwt: JwtKey::new(secret.as_bytes()),
        node: settings.node_name.clone(),
    });
    data_dir::check_layout(&settings.data_dir, shard_count)?;
    let (ws_addr, quic_addr) = (listeners.ws_addr, listeners.quic_addr);
    let (admin_listener, admin_addr) = (listeners.admin, listeners.admin_addr);
    let quic = (listeners.quic, quic_addr, listeners.gso);
    let started = shards::start(&settings, listeners.ws, quic, session_config)?;

    let draining = Arc::new(AtomicBool::new(false));
    let kernel_tcp = Arc::new(KernelTcpMetrics::default());
    if settings.tcp_memory_check_ms > 0 {
        let interval = Duration::from_millis(settings.tcp_memory_check_ms);
        kernel_tcp::spawn(interval, kernel_tcp.clone()).map_err(|source| StartupError::Spawn {
            what: "the TCP memory watch".into(),
            source,
        })?;
    }
    admin::spawn(
        admin_listener,
        AdminState {
            shards: started.metrics.clone(),
            draining: draining.clone(),
            kernel_tcp,
        },
    )
    .map_err(|source| StartupError::Spawn {
        what: "the admin thread".into(),
        source,
    })?;
    signals::spawn_signal_thread(
        signals,
        started.controls,
        draining.clone(),
        Duration::from_millis(settings.drain_timeout_ms),
    )?;
    shards::wait_until_serving(&started.events, shard_count)?;
    tracing::info!(
        shards = shard_count,
        data_dir = %settings.data_dir.display(),
        "listening ws={ws_addr} admin={admin_addr} quic={quic_addr}"
    );
    let _no_systemd_is_fine = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    for thread in started.threads {
        let _ = thread.join();
    }
    if draining.load(Ordering::Acquire) {
        tracing::info!("drained; exiting");
        Ok(ExitCode::SUCCESS)
    } else {
        tracing::error!("a shard stopped without a drain request");
        Ok(ExitCode::from(1))
    }
}
