//! The listening sockets, bound before anything else starts so that a busy port fails
//! the start at once, with the setting named: one SO_REUSEPORT WebSocket listener and one
//! QUIC socket per shard, and the admin listener.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::StartupError;
use crate::config::Settings;

/// Every socket the process listens on.
pub(super) struct Listeners {
    pub ws_addr: SocketAddr,
    /// One per shard.
    pub ws: Vec<OwnedFd>,
    pub quic_addr: SocketAddr,
    /// One per shard.
    pub quic: Vec<OwnedFd>,
    /// The QUIC sockets take UDP_SEGMENT (GSO) sends.
    pub gso: bool,
    pub admin: TcpListener,
    pub admin_addr: SocketAddr,
}

impl Listeners {
    /// Bind every listener. `after_unclean_exit`: the previous parleyd on this data
    /// directory was killed, so an address in use may still be held by its io_uring
    /// instances, which the kernel tears down a little after the process (about 0.3 s
    /// here); then the whole set is tried again until `restart_after_kill_wait_ms` has
    /// passed. Otherwise a busy address fails the start at once.
    pub(super) fn bind(
        settings: &Settings,
        shards: usize,
        after_unclean_exit: bool,
    ) -> Result<Self, StartupError> {
        let patience = Duration::from_millis(settings.restart_after_kill_wait_ms);
        let give_up = Instant::now()
            + if after_unclean_exit {
                patience
            } else {
                Duration::ZERO
            };
        let mut logged = false;
        loop {
            match Self::bind_once(settings, shards) {
                Err(StartupError::Listen {
                    setting,
                    addr,
                    source,
                }) if source.kind() == io::ErrorKind::AddrInUse && Instant::now() < give_up => {
                    if !logged {
                        tracing::warn!(
                            "{setting} {addr} is still in use after the previous parleyd on \
                             this data dir was killed; retrying for up to {patience:?} \
                             (restart_after_kill_wait_ms)"
                        );
                        logged = true;
                    }
                    std::thread::sleep(super::data_dir::RESTART_WAIT_PAUSE);
                }
                Ok(listeners) => {
                    if logged {
                        tracing::info!("listen addresses free again; binding succeeded");
                    }
                    return Ok(listeners);
                }
                Err(other) => return Err(other),
            }
        }
    }

    fn bind_once(settings: &Settings, shards: usize) -> Result<Self, StartupError> {
        let (ws_addr, ws) = bind_ws(settings.ws_listen, shards, settings.listen_backlog)?;
        let (quic_addr, quic, gso) = bind_quic(
            settings.quic_listen,
            shards,
            settings.quic_max_udp_payload_bytes,
        )?;
        let admin_error = |source| StartupError::Listen {
            setting: "admin_listen",
            addr: settings.admin_listen,
            source,
        };
        let admin = TcpListener::bind(settings.admin_listen).map_err(admin_error)?;
        let admin_addr = admin.local_addr().map_err(admin_error)?;
        debug_assert!(ws.len() == shards && quic.len() == shards);
        Ok(Self {
            ws_addr,
            ws,
            quic_addr,
            quic,
            gso,
            admin,
            admin_addr,
        })
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
