//! QUIC, sans-IO: a shard's endpoint takes datagrams (with the clock) and gives back
//! datagrams to send and session updates for the shard's core; the runtime's
//! `quic_tasks` moves them between the endpoint and the socket.
//!
//! - **Connection ids encode the owning shard** (first byte), so a packet the kernel's
//!   SO_REUSEPORT hash delivers elsewhere (after a NAT rebinding or a migration changed
//!   the client's address) is recognised and forwarded to its owner over a ring.
//! - **Stateless retry** (on by default): a new client first proves its address by echoing
//!   a token bound to that address; nothing is allocated for a spoofed Initial.
//! - **Bounded**: unknown connection ids and malformed packets are dropped without
//!   allocating; connections per shard are capped (`quic_max_connections_per_shard`).
//! - **Pacing**: each datagram carries quiche's `send_info.at`; the runtime sends it then.
//! - **GSO**: runs of equal-size packets to one peer leave as one buffer the kernel splits
//!   (`UDP_SEGMENT`), when the socket supports it.

//!
//! - `endpoint`: connections by id, routing, accepting, timers;
//! - `connection`: one connection's session stream and its chat session;
//! - `retry`: stateless retry tokens;
//! - `transmit`: datagrams waiting to leave, paced and joined for GSO;
//! - `server_config`: quiche's configuration from the named settings;
//! - `cert`: the TLS certificate and key files.

pub mod cert;
pub mod connection;
pub mod endpoint;
mod retry;
mod server_config;
mod transmit;

use std::time::Duration;

pub use endpoint::{QuicEndpoint, Route, SessionUpdate, CID_LEN, QUIC_SESSION_ID_BIT};
pub use server_config::server_config;
pub use transmit::Transmit;

/// Spare connection ids offered to each client, so it can migrate to a new path.
const SPARE_CIDS: usize = 2;

/// The QUIC settings of a shard (each a named setting of `parleyd`).
#[derive(Debug, Clone)]
pub struct QuicSettings {
    pub idle_timeout: Duration,
    pub max_streams_bidi: u64,
    pub stream_window_bytes: u64,
    pub connection_window_bytes: u64,
    pub max_connections: usize,
    pub retry: bool,
    pub max_udp_payload_bytes: usize,
    pub datagram_queue_len: usize,
    pub write_batch_bytes: usize,
    pub max_client_addresses: u64,
}

/// Keys shared by every shard of the process.
#[derive(Clone)]
pub struct QuicKeys {
    /// Authenticates retry tokens, so any shard can check one another minted.
    pub retry: [u8; 32],
    /// Encrypts TLS session tickets, so a resumption (0-RTT) works on any shard.
    pub tickets: [u8; 48],
}

/// Fill `bytes` from the operating system's CSPRNG (BoringSSL's).
pub fn random(bytes: &mut [u8]) {
    if boring::rand::rand_bytes(bytes).is_err() {
        // BoringSSL's RNG aborts rather than fail; this is unreachable in practice.
        for byte in bytes.iter_mut() {
            *byte = 0;
        }
    }
}

/// The ALPN of the Parley protocol over QUIC (PROTOCOL.md section 1).
pub const ALPN: &[u8] = b"parley/1";
