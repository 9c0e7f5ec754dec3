//! A Parley client over QUIC (PROTOCOL.md section 1), sans-IO: the caller moves
//! datagrams between a UDP socket and [`QuicSession`], and passes the clock by calling
//! [`QuicSession::on_timeout`] at [`QuicSession::timeout`]. `parley connect --quic`
//! drives it with a blocking socket ([`BlockingQuic`]), `parley-load --quic` from its
//! epoll workers.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use parley_router::framing::{frame_document, DocumentReader, Frame};
use sha2::{Digest, Sha256};

/// The ALPN of the Parley protocol over QUIC.
pub const ALPN: &[u8] = b"parley/1";
/// The session runs on the client's first bidirectional stream.
pub const SESSION_STREAM: u64 = 0;
/// Largest UDP payload this client sends or takes.
pub const MAX_UDP_PAYLOAD: usize = 1350;
/// Largest document accepted from the server.
const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// Flow-control windows the client grants the server.
const STREAM_WINDOW: u64 = 1 << 20;
const CONNECTION_WINDOW: u64 = 4 << 20;
const DATAGRAM_QUEUE: usize = 64;
const IDLE_TIMEOUT_MS: u64 = 120_000;

/// How the client trusts the server's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Verify against this CA (or self-signed) PEM file and the server name.
    Ca(PathBuf),
    /// Accept only a certificate with this SHA-256 fingerprint (`AB:CD:...`, as parleyd logs it).
    Pin(String),
    /// Accept any certificate (development only).
    Insecure,
}

/// Why the client could not start or went on.
#[derive(Debug, thiserror::Error)]
pub enum QuicClientError {
    #[error("QUIC configuration: {0}")]
    Config(String),
    #[error("the server's certificate fingerprint {found} is not the pinned {pinned}")]
    PinMismatch { found: String, pinned: String },
    #[error("connection closed by the server: code {code} {reason}")]
    Closed { code: u64, reason: String },
    #[error("connection closed: {0}")]
    Ended(String),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
}

/// Options of one client connection.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    pub trust: Trust,
    /// Name checked against the certificate with `Trust::Ca`.
    pub server_name: String,
    /// Offer DATAGRAM frames (typing may then arrive as one).
    pub datagrams: bool,
}

/// SHA-256 of DER bytes as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A quiche client configuration for Parley.
pub fn client_config(options: &QuicOptions) -> Result<quiche::Config, QuicClientError> {
    let error = |e: quiche::Error| QuicClientError::Config(e.to_string());
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(error)?;
    config.set_application_protos(&[ALPN]).map_err(error)?;
    match &options.trust {
        Trust::Ca(path) => {
            let path = path
                .to_str()
                .ok_or_else(|| QuicClientError::Config("CA path is not UTF-8".into()))?;
            config
                .load_verify_locations_from_file(path)
                .map_err(|e| QuicClientError::Config(format!("CA file {path}: {e}")))?;
            config.verify_peer(true);
        }
        Trust::Pin(_) | Trust::Insecure => config.verify_peer(false),
    }
    config.set_max_idle_timeout(IDLE_TIMEOUT_MS);
    config.set_max_recv_udp_payload_size(MAX_UDP_PAYLOAD);
    config.set_max_send_udp_payload_size(MAX_UDP_PAYLOAD);
    config.set_initial_max_data(CONNECTION_WINDOW);
    config.set_initial_max_stream_data_bidi_local(STREAM_WINDOW);
    config.set_initial_max_stream_data_bidi_remote(STREAM_WINDOW);
    config.set_initial_max_streams_bidi(0);
    config.set_initial_max_streams_uni(0);
    config.set_disable_active_migration(false);
    config.enable_dgram(options.datagrams, DATAGRAM_QUEUE, DATAGRAM_QUEUE);
    Ok(config)
}

/// One client connection and its session stream.
pub struct QuicSession {
    pub conn: quiche::Connection,
    trust: Trust,
    verified: bool,
    reader: DocumentReader,
    /// Framed documents the stream did not take yet (flow control).
    pending: Vec<u8>,
    documents: VecDeque<String>,
    /// Typing events that arrived as DATAGRAM frames.
    pub datagrams_received: u64,
}

/// Bytes read from quiche per call (on the stack: a session keeps no read buffer).
const READ_CHUNK: usize = 4096;

impl QuicSession {
    pub fn connect(
        config: &mut quiche::Config,
        options: &QuicOptions,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Self, QuicClientError> {
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        random_bytes(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(Some(&options.server_name), &scid, local, peer, config)
            .map_err(|e| QuicClientError::Config(e.to_string()))?;
        Ok(Self {
            conn,
            trust: options.trust.clone(),
            verified: false,
            reader: DocumentReader::default(),
            pending: Vec::new(),
            documents: VecDeque::new(),
            datagrams_received: 0,
        })
    }

    /// A datagram from the socket.
    pub fn on_datagram(&mut self, packet: &mut [u8], from: SocketAddr, to: SocketAddr) {
        let _dropped_by_quiche = self.conn.recv(packet, quiche::RecvInfo { from, to });
        self.read();
    }

    /// The connection is established and the server's certificate is trusted.
    pub fn is_ready(&mut self) -> Result<bool, QuicClientError> {
        self.check_closed()?;
        if !self.conn.is_established() {
            return Ok(false);
        }
        if !self.verified {
            if let Trust::Pin(pinned) = &self.trust {
                let found = self.conn.peer_cert().map(fingerprint).unwrap_or_default();
                if !found.eq_ignore_ascii_case(pinned) {
                    let _ = self.conn.close(true, 0, b"certificate not pinned");
                    return Err(QuicClientError::PinMismatch {
                        found,
                        pinned: pinned.clone(),
                    });
                }
            }
            self.verified = true;
        }
        Ok(true)
    }

    /// Queue one JSON document on the session stream.
    pub fn send_document(&mut self, document: &str) {
        frame_document(&mut self.pending, document.as_bytes());
        self.flush_stream();
    }

    /// Send one document as a DATAGRAM frame; false when datagrams are not negotiated.
    pub fn send_datagram(&mut self, document: &str) -> bool {
        self.conn.dgram_send(document.as_bytes()).is_ok()
    }

    /// Documents received, oldest first.
    pub fn next_document(&mut self) -> Option<String> {
        self.documents.pop_front()
    }

    /// The next datagram to send: its length in `out` and where it goes.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        self.flush_stream();
        match self.conn.send(out) {
            Ok((len, info)) => Some((len, info.to)),
            Err(_) => None,
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.conn.timeout()
    }

    pub fn on_timeout(&mut self) {
        self.conn.on_timeout();
    }

    /// The server (or quiche) closed the connection: its code and reason.
    pub fn check_closed(&self) -> Result<(), QuicClientError> {
        if let Some(error) = self.conn.peer_error() {
            return Err(QuicClientError::Closed {
                code: error.error_code,
                reason: String::from_utf8_lossy(&error.reason).into_owned(),
            });
        }
        if self.conn.is_closed() {
            let why = if self.conn.is_timed_out() {
                "idle timeout".to_string()
            } else {
                format!("{:?}", self.conn.local_error())
            };
            return Err(QuicClientError::Ended(why));
        }
        Ok(())
    }

    /// Close with an application code.
    pub fn close(&mut self, code: u64, reason: &str) {
        let _ = self.conn.close(true, code, reason.as_bytes());
    }

    fn flush_stream(&mut self) {
        if self.pending.is_empty() || !self.conn.is_established() {
            return;
        }
        if let Ok(n) = self.conn.stream_send(SESSION_STREAM, &self.pending, false) {
            self.pending.drain(..n);
        }
    }

    fn read(&mut self) {
        let mut chunk = [0u8; READ_CHUNK];
        while let Ok(n) = self.conn.dgram_recv(&mut chunk) {
            self.datagrams_received += 1;
            self.documents
                .push_back(String::from_utf8_lossy(&chunk[..n]).into_owned());
        }
        while let Ok((n, _fin)) = self.conn.stream_recv(SESSION_STREAM, &mut chunk) {
            let documents = &mut self.documents;
            self.reader
                .push(&chunk[..n], MAX_DOCUMENT_BYTES, |frame| match frame {
                    Frame::Document(bytes) => {
                        documents.push_back(String::from_utf8_lossy(bytes).into_owned())
                    }
                    Frame::Oversized(len) => documents.push_back(format!(
                        "{{\"client_error\":\"document of {len} bytes skipped\"}}"
                    )),
                });
        }
    }
}

/// A [`QuicSession`] over a blocking std UDP socket, for the CLI and tests.
pub struct BlockingQuic {
    pub socket: UdpSocket,
    pub session: QuicSession,
    local: SocketAddr,
    buffer: Box<[u8]>,
}

impl BlockingQuic {
    /// Connect and wait (up to `wait`) for the handshake and the certificate check.
    pub fn connect(
        peer: SocketAddr,
        options: &QuicOptions,
        wait: Duration,
    ) -> Result<Self, QuicClientError> {
        let bind: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(peer)?;
        let local = socket.local_addr()?;
        let mut config = client_config(options)?;
        let session = QuicSession::connect(&mut config, options, local, peer)?;
        let mut client = Self {
            socket,
            session,
            local,
            buffer: vec![0; 64 * 1024].into_boxed_slice(),
        };
        let deadline = Instant::now() + wait;
        while !client.session.is_ready()? {
            client.step(deadline, "for the QUIC handshake")?;
        }
        Ok(client)
    }

    /// Send everything quiche has, then wait for one datagram or a timer (bounded by
    /// `deadline`), and process it.
    pub fn step(&mut self, deadline: Instant, what: &'static str) -> Result<(), QuicClientError> {
        self.flush()?;
        let now = Instant::now();
        if now >= deadline {
            return Err(QuicClientError::Timeout(what));
        }
        let mut wait = deadline - now;
        if let Some(timer) = self.session.timeout() {
            wait = wait.min(timer);
        }
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        match self.socket.recv_from(&mut self.buffer) {
            Ok((len, from)) => {
                let mut packet = self.buffer[..len].to_vec();
                self.session.on_datagram(&mut packet, from, self.local);
            }
            // ConnectionRefused: an ICMP error from an earlier send (the server went
            // away); datagrams it sent before still wait behind it.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if self.session.timeout().is_some_and(|t| t.is_zero()) {
                    self.session.on_timeout();
                }
            }
            Err(error) => return Err(error.into()),
        }
        if self.session.timeout().is_some_and(|t| t.is_zero()) {
            self.session.on_timeout();
        }
        self.flush()
    }

    /// Move to a new UDP socket (a new source port) as a NAT rebinding would: quiche is not
    /// told, so to the server the client's address simply changes mid-session.
    pub fn rebind_source_port(&mut self) -> Result<(), QuicClientError> {
        let peer = self.socket.peer_addr()?;
        let socket = UdpSocket::bind(SocketAddr::new(self.socket.local_addr()?.ip(), 0))?;
        socket.connect(peer)?;
        self.socket = socket;
        Ok(())
    }

    /// Send every datagram quiche has ready.
    pub fn flush(&mut self) -> Result<(), QuicClientError> {
        let mut out = [0u8; MAX_UDP_PAYLOAD];
        while let Some((len, to)) = self.session.poll_transmit(&mut out) {
            self.socket.send_to(&out[..len], to)?;
        }
        Ok(())
    }

    /// The next document, waiting up to `wait`.
    pub fn recv_document(&mut self, wait: Duration) -> Result<String, QuicClientError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(document) = self.session.next_document() {
                return Ok(document);
            }
            self.session.check_closed()?;
            self.step(deadline, "for a document")?;
        }
    }

    pub fn send_document(&mut self, document: &str) -> Result<(), QuicClientError> {
        self.session.send_document(document);
        self.flush()
    }
}

/// Random bytes for connection ids (a clock-seeded xorshift is enough: ids need to be
/// unique, not secret, on the client side).
pub fn random_bytes(bytes: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut state = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    for byte in bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
}
