//! The process lifecycle: configuration, data directory, secret, listeners, shards,
//! readiness, and the drain on SIGTERM/SIGINT. Every startup failure is one line that
//! says what failed and where, and a non-zero exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use parley_router::auth::JwtKey;
use parley_router::session::SessionConfig;
use signal_hook::consts::{SIGINT, SIGTERM};
use socket2::{Domain, Socket, Type};

use crate::admin::{self, AdminState};
use crate::config::{Cli, ConfigError, Settings};
use crate::metrics::ShardMetrics;
use crate::quic::cert::{self as quic_cert, CertError};
use crate::quic::QuicKeys;
use crate::runtime::{spawn_shard, EnginePlan, QuicPlan, ShardControl, ShardEvent, ShardPlan};
use crate::uring::RingSizes;
use crate::ws::WsLimits;
use parley_wal::WalOptions;

/// Name of the generated secret inside the data directory.
pub const JWT_SECRET_FILE: &str = "jwt-secret";
/// Lock file that keeps two daemons off one data directory.
pub const LOCK_FILE: &str = "LOCK";
/// How long shards get to report ready before startup is declared failed.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time past drain_timeout before the process gives up on a stuck drain.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("data dir {path} is in use by another parleyd (lock file {path}/{LOCK_FILE})")]
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

/// The io_uring socket engine where the kernel has what it needs (and the settings allow
/// it), else glommio's streams on regular descriptors; logged either way.
fn choose_socket_engine(settings: &Settings) -> Result<Option<EnginePlan>, StartupError> {
    if settings.socket_engine == "descriptors" {
        tracing::info!("socket engine: descriptors (socket_engine = descriptors)");
        return Ok(None);
    }
    if let Err(reason) = crate::uring::probe() {
        if settings.socket_engine == "io_uring" {
            return Err(StartupError::NoUring(reason));
        }
        tracing::warn!(%reason, "socket engine: descriptors, because io_uring is unusable; connections per process are capped by the descriptor limit");
        return Ok(None);
    }
    // One ring's fixed-file table may not exceed the process descriptor limit.
    let descriptor_limit = descriptor_limit();
    let files = settings.socket_ring_files.min(descriptor_limit);
    let ring = RingSizes {
        entries: settings.socket_ring_entries,
        files,
        recv_buffers: settings.socket_recv_buffers as u16,
        recv_buffer_bytes: settings.socket_recv_buffer_bytes,
    };
    tracing::info!(
        files_per_ring = files,
        descriptor_limit,
        recv_buffers = settings.socket_recv_buffers,
        recv_buffer_bytes = settings.socket_recv_buffer_bytes,
        "socket engine: io_uring (direct descriptors, multishot accept and receive, provided buffers)"
    );
    Ok(Some(EnginePlan {
        ring,
        listen_backlog: u32::try_from(settings.listen_backlog).unwrap_or(0),
    }))
}

/// The soft RLIMIT_NOFILE.
fn descriptor_limit() -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    u32::try_from(limit.rlim_cur).unwrap_or(u32::MAX)
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
    let _lock = lock_data_dir(&settings.data_dir)?;

    let (ws_addr, ws_listeners) =
        bind_ws(settings.ws_listen, shard_count, settings.listen_backlog)?;
    let (quic_addr, quic_sockets, gso) = bind_quic(
        settings.quic_listen,
        shard_count,
        settings.quic_max_udp_payload_bytes,
    )?;
    let admin_listener =
        TcpListener::bind(settings.admin_listen).map_err(|source| StartupError::Listen {
            setting: "admin_listen",
            addr: settings.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartupError::Listen {
            setting: "admin_listen",
            addr: settings.admin_listen,
            source,
        })?;

    // After the listeners, so a start that fails on a port leaves no new secret behind.
    let secret = jwt_secret(&settings)?;
    let chat_limits = settings.chat_limits();
    let session_config = Arc::new(SessionConfig {
        limits: settings.session_limits(),
        chat: chat_limits.clone(),
        jwt: JwtKey::new(secret.as_bytes()),
        node: settings.node_name.clone(),
    });
    let ws_limits = WsLimits {
        max_frame_hard_bytes: settings.max_frame_hard_bytes,
        max_handshake_bytes: settings.max_handshake_bytes,
        write_batch_bytes: settings.write_batch_bytes,
        read_buffer_bytes: settings.ws_read_buffer_bytes,
        close_linger: Duration::from_millis(settings.close_linger_ms),
    };
    let socket_engine = choose_socket_engine(&settings)?;
    let cpus = core_affinity_cpus();
    let mut metrics = Vec::with_capacity(shard_count);
    let mut controls = Vec::with_capacity(shard_count);
    let mut threads = Vec::with_capacity(shard_count);
    let (lifecycle, shard_events) = std::sync::mpsc::channel();
    check_layout(&settings.data_dir, shard_count)?;
    let chat_limits = Arc::new(chat_limits);
    let wal_options = WalOptions {
        segment_size: settings.wal_segment_bytes,
        ..WalOptions::default()
    };
    let tls =
        quic_cert::load_or_create(&settings.data_dir, &settings.quic_cert, &settings.quic_key)?;
    if tls.generated {
        tracing::info!(cert = %tls.cert.display(), "generated a self-signed QUIC development certificate");
    }
    tracing::info!(
        cert = %tls.cert.display(),
        sha256 = %tls.fingerprint,
        gso,
        retry = settings.quic_retry,
        "QUIC certificate (clients may pin this fingerprint: parley connect --quic --pin)"
    );
    let quic_keys = quic_keys();
    let quic_settings = settings.quic_settings();
    let meshes = parley_router::mesh::mesh(shard_count, settings.mesh_ring_entries);
    let quic_meshes = parley_router::mesh::mesh(shard_count, settings.mesh_ring_entries);
    let per_shard = ws_listeners.into_iter().zip(quic_sockets).zip(quic_meshes);
    for ((index, ((ws_listener, quic_socket), quic_mesh)), mesh) in
        per_shard.enumerate().zip(meshes)
    {
        let shard_metrics = Arc::new(ShardMetrics::default());
        let control = Arc::new(ShardControl::default());
        let cpu = cpus[index % cpus.len()];
        let plan = ShardPlan {
            index,
            cpu,
            ws_listener,
            metrics: shard_metrics.clone(),
            control: control.clone(),
            ws_limits: ws_limits.clone(),
            session_config: session_config.clone(),
            max_connections: settings.max_connections_per_shard,
            drain_timeout: Duration::from_millis(settings.drain_timeout_ms),
            lifecycle: lifecycle.clone(),
            shards: shard_count,
            wal_dir: settings.data_dir.join(format!("shard-{index}")),
            wal_options: wal_options.clone(),
            chat_limits: chat_limits.clone(),
            mesh,
            snapshot_every_records: settings.snapshot_every_records,
            socket_engine,
            quic: QuicPlan {
                socket: quic_socket,
                local: quic_addr,
                settings: quic_settings.clone(),
                tls: tls.clone(),
                keys: quic_keys.clone(),
                gso,
                mesh: quic_mesh,
            },
        };
        let thread = spawn_shard(plan).map_err(|source| StartupError::Spawn {
            what: format!("shard {index} on CPU {cpu}"),
            source,
        })?;
        metrics.push(shard_metrics);
        controls.push(control);
        threads.push(thread);
    }

    let draining = Arc::new(AtomicBool::new(false));
    admin::spawn(
        admin_listener,
        AdminState {
            shards: metrics.clone(),
            draining: draining.clone(),
        },
    )
    .map_err(|source| StartupError::Spawn {
        what: "the admin thread".into(),
        source,
    })?;
    spawn_signal_thread(
        signals,
        controls,
        draining.clone(),
        Duration::from_millis(settings.drain_timeout_ms),
    )?;

    drop(lifecycle);
    wait_until_serving(&shard_events, shard_count)?;
    tracing::info!(
        shards = shard_count,
        data_dir = %settings.data_dir.display(),
        "listening ws={ws_addr} admin={admin_addr} quic={quic_addr}"
    );
    let _no_systemd_is_fine = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    for thread in threads {
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

/// Name of the file that records how many shards wrote the data directory.
pub const SHARDS_FILE: &str = "shards";

/// Conversations live in the log of their home shard, and the home depends on the shard
/// count: a data directory is only usable with the count that wrote it.
fn check_layout(data_dir: &Path, shards: usize) -> Result<(), StartupError> {
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
fn lock_data_dir(path: &Path) -> Result<File, StartupError> {
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
fn jwt_secret(settings: &Settings) -> Result<String, StartupError> {
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

/// One SO_REUSEPORT socket of `kind` per shard on the same address, each set up by
/// `configure` (which binds it).
///
/// A probe without SO_REUSEPORT binds first: it fails if anything uses the address
/// already, including another parleyd, which SO_REUSEPORT alone would silently share the
/// port with. With port 0 the probe also picks the port every shard then binds.
fn bind_per_shard(
    setting: &'static str,
    addr: SocketAddr,
    kind: Type,
    shards: usize,
    mut configure: impl FnMut(&Socket, SocketAddr) -> io::Result<()>,
) -> Result<(SocketAddr, Vec<OwnedFd>), StartupError> {
    let listen_error = |source| StartupError::Listen {
        setting,
        addr,
        source,
    };
    let domain = Domain::for_address(addr);
    let probe = Socket::new(domain, kind, None).map_err(listen_error)?;
    if kind == Type::STREAM {
        probe.set_reuse_address(true).map_err(listen_error)?;
    }
    probe.bind(&addr.into()).map_err(listen_error)?;
    let bound = probe
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| listen_error(io::Error::other("no local address")))?;
    drop(probe);
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = Socket::new(domain, kind, None).map_err(listen_error)?;
        socket.set_reuse_port(true).map_err(listen_error)?;
        socket.set_nonblocking(true).map_err(listen_error)?;
        configure(&socket, bound).map_err(listen_error)?;
        sockets.push(OwnedFd::from(socket));
    }
    Ok((bound, sockets))
}

/// The WebSocket listening sockets, one per shard.
fn bind_ws(
    addr: SocketAddr,
    shards: usize,
    backlog: i32,
) -> Result<(SocketAddr, Vec<OwnedFd>), StartupError> {
    bind_per_shard("ws_listen", addr, Type::STREAM, shards, |socket, bound| {
        socket.set_reuse_address(true)?;
        socket.bind(&bound.into())?;
        socket.listen(backlog)
    })
}

/// The QUIC UDP sockets, one per shard, and whether the kernel takes GSO sends of
/// `segment`-byte datagrams on every one.
fn bind_quic(
    addr: SocketAddr,
    shards: usize,
    segment: usize,
) -> Result<(SocketAddr, Vec<OwnedFd>, bool), StartupError> {
    let mut gso = true;
    let (bound, sockets) =
        bind_per_shard("quic_listen", addr, Type::DGRAM, shards, |socket, bound| {
            // Best effort: the kernel caps these at net.core.{r,w}mem_max (tuning/ raises it).
            let _capped = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
            let _capped = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
            socket.bind(&bound.into())?;
            gso &= enable_gso(socket, segment);
            Ok(())
        })?;
    Ok((bound, sockets, gso))
}

/// Socket buffer asked for each QUIC socket.
const QUIC_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Set UDP_SEGMENT on the socket: a send longer than `segment` leaves as several
/// datagrams of `segment` bytes (the last may be shorter). False where unsupported.
fn enable_gso(socket: &Socket, segment: usize) -> bool {
    use std::os::fd::AsRawFd;
    let size = segment as libc::c_int;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    result == 0
}

/// Fresh process-wide keys for retry tokens and TLS session tickets.
fn quic_keys() -> QuicKeys {
    let mut keys = QuicKeys {
        retry: [0; 32],
        tickets: [0; 48],
    };
    crate::quic::random(&mut keys.retry);
    crate::quic::random(&mut keys.tickets);
    keys
}

/// The CPUs this process may run on, in order; shard k is pinned to the k-th.
fn core_affinity_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we pass; CPU_ISSET reads it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let cpus: Vec<usize> = if ok {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        (0..crate::config::online_cpus()).collect()
    } else {
        cpus
    }
}

fn spawn_signal_thread(
    mut signals: signal_hook::iterator::Signals,
    controls: Vec<Arc<ShardControl>>,
    draining: Arc<AtomicBool>,
    drain_timeout: Duration,
) -> Result<(), StartupError> {
    let spawn_error = |source| StartupError::Spawn {
        what: "the signal thread".into(),
        source,
    };
    std::thread::Builder::new()
        .name("parley-signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(signal) = signals.next() {
                tracing::info!(
                    signal,
                    "draining: no new connections, sessions closed with 1001"
                );
                let _no_systemd_is_fine =
                    sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                draining.store(true, Ordering::Release);
                for control in &controls {
                    control.request_drain();
                }
                let started = Instant::now();
                std::thread::spawn(move || {
                    std::thread::sleep(drain_timeout + DRAIN_GRACE);
                    stderr_line(format_args!(
                        "parleyd: error: drain did not finish in {:?}; exiting",
                        started.elapsed()
                    ));
                    std::process::exit(1);
                });
            }
            if signals.next().is_some() {
                stderr_line(format_args!(
                    "parleyd: second signal during drain; exiting now"
                ));
                std::process::exit(1);
            }
        })
        .map_err(spawn_error)?;
    Ok(())
}

/// Block until every shard says it serves; a shard that stops first fails the start.
fn wait_until_serving(
    events: &std::sync::mpsc::Receiver<ShardEvent>,
    shards: usize,
) -> Result<(), StartupError> {
    let mut deadline = Instant::now() + SHARD_START_TIMEOUT;
    let mut serving = 0;
    while serving < shards {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ShardEvent::Serving(_)) => serving += 1,
            // A long recovery is progress, not a hung start.
            Ok(ShardEvent::Recovering(_)) => deadline = Instant::now() + SHARD_START_TIMEOUT,
            Ok(ShardEvent::Failed(index, reason)) => {
                return Err(StartupError::Shard { index, reason })
            }
            Ok(ShardEvent::Stopped(index)) => {
                return Err(StartupError::Spawn {
                    what: format!("shard {index}"),
                    source: io::Error::other("its executor stopped during startup"),
                })
            }
            Err(_) => return Err(StartupError::NotReady(SHARD_START_TIMEOUT)),
        }
    }
    Ok(())
}
