//! The shards: the socket engine they use, one plan each (its listeners, its log, its
//! rings to the others, its CPU), their threads, and the wait until all serve.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parley_router::limits::ChatLimits;
use parley_router::mesh::MeshEnds;
use parley_router::session::SessionConfig;
use parley_router::shard::MeshEntry;
use parley_wal::WalOptions;

use super::StartupError;
use crate::config::Settings;
use crate::metrics::ShardMetrics;
use crate::quic::cert::{self as quic_cert, TlsFiles};
use crate::quic::{QuicKeys, QuicSettings};
use crate::runtime::{
    spawn_shard, EnginePlan, ForwardedDatagram, QuicPlan, ShardControl, ShardEvent, ShardPlan,
};
use crate::search::{SearchService, SearchSettings};
use crate::uring::RingSizes;
use crate::ws::WsLimits;

/// How long shards get to report ready before startup is declared failed.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The shards, started: what the admin thread, the signal thread and `run` keep of them.
pub(super) struct Started {
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub controls: Vec<Arc<ShardControl>>,
    pub threads: Vec<JoinHandle<()>>,
    /// What the shards say of their start and end.
    pub events: Receiver<ShardEvent>,
}

/// Start one shard per listener pair, each on its CPU.
pub(super) fn start(
    settings: &Settings,
    ws: Vec<OwnedFd>,
    (quic, quic_addr, gso): (Vec<OwnedFd>, SocketAddr, bool),
    session_config: Arc<SessionConfig>,
) -> Result<Started, StartupError> {
    let shard_count = settings.shard_count();
    assert!(ws.len() == shard_count && quic.len() == shard_count);
    let common = CommonPlan::new(settings, (quic_addr, gso), session_config)?;
    let cpus = core_affinity_cpus();
    let meshes = parley_router::mesh::mesh(shard_count, settings.mesh_ring_entries);
    let quic_meshes = parley_router::mesh::mesh(shard_count, settings.mesh_ring_entries);
    let (lifecycle, events) = std::sync::mpsc::channel();
    let metrics: Vec<Arc<ShardMetrics>> = (0..shard_count)
        .map(|_| Arc::new(ShardMetrics::default()))
        .collect();
    let search = start_search(settings, &metrics)?;
    let mut started = Started {
        metrics: Vec::with_capacity(shard_count),
        controls: Vec::with_capacity(shard_count),
        threads: Vec::with_capacity(shard_count),
        events,
    };
    let per_shard = ws.into_iter().zip(quic).zip(meshes).zip(quic_meshes);
    for (index, (((ws_listener, quic_socket), mesh), quic_mesh)) in per_shard.enumerate() {
        let cpu = cpus[index % cpus.len()];
        let sockets = (ws_listener, quic_socket);
        let mut plan = common.plan(index, cpu, sockets, (mesh, quic_mesh), lifecycle.clone());
        plan.metrics = metrics[index].clone();
        plan.search = search.clone();
        started.metrics.push(plan.metrics.clone());
        started.controls.push(plan.control.clone());
        let thread = spawn_shard(plan).map_err(|source| StartupError::Spawn {
            what: format!("shard {index} on CPU {cpu}"),
            source,
        })?;
        started.threads.push(thread);
    }
    Ok(started)
}

/// The search service (its thread; each shard starts its own indexer once its log is
/// recovered), unless `search = false`.
fn start_search(
    settings: &Settings,
    metrics: &[Arc<ShardMetrics>],
) -> Result<Option<Arc<SearchService>>, StartupError> {
    if !settings.search {
        return Ok(None);
    }
    let search_settings = SearchSettings {
        dir: settings.data_dir.join("search"),
        heap_bytes: settings.search_index_heap_bytes,
        commit_interval: Duration::from_millis(settings.search_commit_interval_ms),
        max_results: settings.search_max_results,
        queue_len: settings.search_queue_len,
        rebuild_nice: settings.search_rebuild_nice,
    };
    SearchService::start(search_settings, metrics.to_vec())
        .map(Some)
        .map_err(|source| StartupError::Spawn {
            what: "the search thread".into(),
            source,
        })
}

/// What every shard's plan shares, derived once from the settings.
struct CommonPlan<'a> {
    settings: &'a Settings,
    session_config: Arc<SessionConfig>,
    ws_limits: WsLimits,
    chat_limits: Arc<ChatLimits>,
    wal_options: WalOptions,
    socket_engine: Option<EnginePlan>,
    quic_settings: QuicSettings,
    quic_keys: QuicKeys,
    tls: TlsFiles,
    quic_addr: SocketAddr,
    gso: bool,
}

impl<'a> CommonPlan<'a> {
    fn new(
        settings: &'a Settings,
        (quic_addr, gso): (SocketAddr, bool),
        session_config: Arc<SessionConfig>,
    ) -> Result<Self, StartupError> {
        let ws_limits = settings.ws_limits();
        let socket_engine = choose_socket_engine(settings)?;
        Ok(Self {
            settings,
            chat_limits: Arc::new(session_config.chat.clone()),
            session_config,
            ws_limits,
            wal_options: settings.wal_options(),
            socket_engine,
            quic_settings: settings.quic_settings(),
            quic_keys: quic_keys(),
            tls: quic_tls(settings, gso)?,
            quic_addr,
            gso,
        })
    }

    /// Shard `index`'s plan: its (WebSocket, QUIC) sockets and its ends of the (chat,
    /// QUIC forwarding) meshes.
    fn plan(
        &self,
        index: usize,
        cpu: usize,
        (ws_listener, quic_socket): (OwnedFd, OwnedFd),
        (mesh, quic_mesh): (MeshEnds<MeshEntry>, MeshEnds<ForwardedDatagram>),
        lifecycle: Sender<ShardEvent>,
    ) -> ShardPlan {
        let settings = self.settings;
        ShardPlan {
            index,
            cpu,
            ws_listener,
            metrics: Arc::new(ShardMetrics::default()),
            control: Arc::new(ShardControl::default()),
            ws_limits: self.ws_limits.clone(),
            session_config: self.session_config.clone(),
            max_connections: settings.max_connections_per_shard,
            max_refusing: settings.max_refusing_connections_per_shard,
            drain_timeout: Duration::from_millis(settings.drain_timeout_ms),
            lifecycle,
            shards: settings.shard_count(),
            wal_dir: settings.data_dir.join(format!("shard-{index}")),
            wal_options: self.wal_options.clone(),
            chat_limits: self.chat_limits.clone(),
            mesh,
            snapshot_every_records: settings.snapshot_every_records,
            loop_lag_probe: (settings.loop_lag_probe_ms > 0)
                .then(|| Duration::from_millis(settings.loop_lag_probe_ms)),
            socket_engine: self.socket_engine,
            quic: QuicPlan {
                socket: quic_socket,
                local: self.quic_addr,
                settings: self.quic_settings.clone(),
                tls: self.tls.clone(),
                keys: self.quic_keys.clone(),
                gso: self.gso,
                mesh: quic_mesh,
            },
            search: None,
        }
    }
}

/// The QUIC certificate: the configured one, or a development pair generated into the
/// data directory; its fingerprint is logged for clients to pin.
fn quic_tls(settings: &Settings, gso: bool) -> Result<TlsFiles, StartupError> {
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
    Ok(tls)
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
        "socket engine: io_uring (direct descriptors, accepts into reserved slots, multishot receive, provided buffers)"
    );
    let plan = EnginePlan {
        ring,
        listen_backlog: u32::try_from(settings.listen_backlog).unwrap_or(0),
        max_refusing: settings.max_refusing_connections_per_shard,
    };
    tracing::info!(
        rings_per_shard = plan.rings_needed(settings.max_connections_per_shard),
        max_connections_per_shard = settings.max_connections_per_shard,
        "socket engine: rings made at start, enough for every connection the limit admits"
    );
    Ok(Some(plan))
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

/// Block until every shard says it serves; a shard that stops first fails the start.
pub(super) fn wait_until_serving(
    events: &Receiver<ShardEvent>,
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
