//! Target `quic`: datagrams into one shard's [`QuicEndpoint`] (gateway/src/quic/), a server
//! with the development certificate and `now` passed in.
//!
//! Two sources of datagrams: raw bytes from the input (headers, Initials, garbage, from
//! one of a few addresses), and a real client (quiche) that connects when the input first
//! gives it something to send, so that what it sends on the session stream (the input's
//! bytes, unframed: the length prefixes are the input's too) and as DATAGRAM frames
//! reaches the connection's document reader and the session behind it; the encryption
//! would hide any mutation of its packets from the server's parsers otherwise.
//!
//! Input: one option byte (bit 0: stateless retry on), then chunks. Chunk kinds: 0-1 a raw
//! datagram; 2 client stream bytes; 3 a client DATAGRAM; 4 the clock moves on; 5 client
//! stream bytes with FIN; larger kinds wrap around (kind / 6 picks the raw sender).
//!
//! Invariants:
//! - a datagram whose header does not parse, a non-Initial for no known connection, an
//!   Initial under 1200 bytes, or (with retry) an Initial without a token, makes no
//!   connection; `route` drops whatever does not parse; connections stay within the cap;
//! - the open-connections gauge is the endpoint's count; every datagram sent fits the
//!   UDP payload limit;
//! - session updates make sense: one first `Chat` per session before any other, none
//!   after its `Closed`, one `Closed`, saying `opened` exactly when a `Chat` was reported,
//!   commands within the limits (as in target `session`), valid user and device ids;
//! - what the client reads on its stream is length-prefixed JSON objects;
//! - after the drain (and the close linger) every connection accepted was reported
//!   closed, however its session had ended (by the server, or by the peer finishing
//!   or resetting its stream);
//! - dropping the endpoint leaves the authenticated-sessions gauge at zero.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parley_gateway::metrics::ShardMetrics;
use parley_gateway::quic::{
    server_config, QuicEndpoint, QuicKeys, QuicSettings, Route, SessionUpdate, CID_LEN,
};
use parley_router::auth::is_valid_id;
use parley_router::clock::Now;
use parley_router::framing::{DocumentReader, Frame};
use parley_router::protocol::Doc;

use crate::fixture::{self, later};
use crate::input::Input;
use crate::session::check_command;

const MAX_UDP_PAYLOAD: usize = 1350;
const MAX_CONNECTIONS: usize = 4;
/// Rounds of datagram exchange after each input chunk; a handshake takes three or four.
const EXCHANGE_ROUNDS: usize = 12;

pub fn settings(retry: bool) -> QuicSettings {
    QuicSettings {
        idle_timeout: Duration::from_secs(30),
        max_streams_bidi: 4,
        stream_window_bytes: 64 * 1024,
        connection_window_bytes: 256 * 1024,
        max_connections: MAX_CONNECTIONS,
        retry,
        max_udp_payload_bytes: MAX_UDP_PAYLOAD,
        datagram_queue_len: 8,
        write_batch_bytes: 4096,
        max_client_addresses: 4,
    }
}

pub fn keys() -> QuicKeys {
    QuicKeys {
        retry: [7; 32],
        tickets: [9; 48],
    }
}

pub fn server_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7071))
}

pub fn client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50_000))
}

pub fn quic(data: &[u8]) {
    let mut input = Input::new(data);
    let options = input.byte();
    let retry = options & 1 != 0;
    let mut world = World::new(retry);
    while let Some((kind, bytes)) = input.chunk() {
        match kind % 6 {
            0 | 1 => {
                let port = 40_000 + u16::from(kind / 6 % 4);
                world.raw_datagram(bytes, SocketAddr::from(([127, 0, 0, 1], port)));
            }
            2 => world.client_stream(bytes, false),
            3 => world.client_datagram(bytes),
            4 => {
                let step = bytes
                    .iter()
                    .take(3)
                    .fold(0u64, |n, &b| n << 8 | u64::from(b));
                world.now = later(world.now, step);
                world.endpoint.on_timers(world.now);
            }
            _ => world.client_stream(bytes, true),
        }
        world.exchange();
    }
    world.endpoint.drain(world.now);
    world.exchange();
    for _ in 0..4 {
        world.now = later(world.now, 1000);
        world.endpoint.on_timers(world.now);
        world.exchange();
    }
    // The drain closed every connection, however its session had ended: each was
    // reported closed, once.
    let closed = world.sessions.values().filter(|s| s.closed).count() as u64;
    let opened = world.metrics.quic_handshakes.load(Ordering::Relaxed);
    assert_eq!(
        closed, opened,
        "{opened} connections, {closed} reported closed after the drain"
    );
    assert!(world.sessions.values().all(|s| s.closed || !s.chat));
    let metrics = world.metrics.clone();
    drop(world);
    assert_eq!(metrics.sessions_authenticated.load(Ordering::Relaxed), 0);
}

/// A client connection and what it has read from the server.
struct Client {
    conn: quiche::Connection,
    reader: DocumentReader,
}

#[derive(Default)]
struct Reported {
    chat: bool,
    closed: bool,
}

struct World {
    endpoint: QuicEndpoint,
    metrics: Arc<ShardMetrics>,
    retry: bool,
    now: Now,
    client: Option<Client>,
    sessions: HashMap<u64, Reported>,
    buffer: Vec<u8>,
}

impl World {
    fn new(retry: bool) -> Self {
        let settings = settings(retry);
        let keys = keys();
        let config = server_config(&settings, fixture::tls(), &keys).expect("server config");
        let metrics = Arc::new(ShardMetrics::default());
        let endpoint = QuicEndpoint::new(
            0,
            2,
            server_addr(),
            config,
            settings,
            fixture::session_config(),
            metrics.clone(),
            &keys,
            false,
        );
        Self {
            endpoint,
            metrics,
            retry,
            now: fixture::start(),
            client: None,
            sessions: HashMap::new(),
            buffer: vec![0; 65_536],
        }
    }

    fn raw_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let mut packet = bytes.to_vec();
        let header = quiche::Header::from_slice(&mut packet.clone(), CID_LEN)
            .ok()
            .map(|h| (h.ty, h.version, h.token.unwrap_or_default()));
        let route = self.endpoint.route(&mut packet.clone());
        if header.is_none() {
            assert_eq!(route, Route::Drop, "an unparsable datagram was routed");
        }
        let (before, dropped) = (
            self.endpoint.connections(),
            self.metrics.quic_dropped.load(Ordering::Relaxed),
        );
        self.endpoint.on_datagram(self.now, &mut packet, from, true);
        let after = self.endpoint.connections();
        assert!(after <= MAX_CONNECTIONS, "{after} connections");
        let Some((ty, version, token)) = header else {
            assert_eq!(after, before, "an unparsable datagram made a connection");
            let now_dropped = self.metrics.quic_dropped.load(Ordering::Relaxed);
            assert_eq!(
                now_dropped,
                dropped + 1,
                "an unparsable datagram was not counted"
            );
            return;
        };
        if after > before {
            assert_eq!(ty, quiche::Type::Initial, "a {ty:?} made a connection");
            assert!(
                bytes.len() >= 1200,
                "an Initial of {} bytes made a connection",
                bytes.len()
            );
            assert!(quiche::version_is_supported(version));
            assert!(
                !self.retry || !token.is_empty(),
                "an Initial without a token made a connection"
            );
        }
    }

    /// The client, connected (its handshake exchanged) on first use.
    fn client(&mut self) -> Option<&mut Client> {
        if self.client.is_none() {
            let mut config = client_config();
            let scid = quiche::ConnectionId::from_ref(&[0xc1; 16]);
            let conn = quiche::connect(
                Some("localhost"),
                &scid,
                client_addr(),
                server_addr(),
                &mut config,
            )
            .expect("client connection");
            self.client = Some(Client {
                conn,
                reader: DocumentReader::default(),
            });
            self.exchange();
        }
        self.client.as_mut().filter(|c| c.conn.is_established())
    }

    fn client_stream(&mut self, bytes: &[u8], fin: bool) {
        if let Some(client) = self.client() {
            let _flow_control_or_closed = client.conn.stream_send(0, bytes, fin);
        }
    }

    fn client_datagram(&mut self, bytes: &[u8]) {
        if let Some(client) = self.client() {
            let _queue_full_or_closed = client.conn.dgram_send(bytes);
        }
    }

    /// Move datagrams both ways until neither side has more (pacing is not modelled:
    /// every datagram goes at once), answering each session's commands on the way.
    fn exchange(&mut self) {
        for _ in 0..EXCHANGE_ROUNDS {
            let mut moved = false;
            self.endpoint.flush(self.now);
            self.take_updates();
            let horizon = self.now.instant + Duration::from_secs(3600);
            while let Some(mut transmit) = self.endpoint.take_due(horizon) {
                assert!(
                    transmit.data.len() <= MAX_UDP_PAYLOAD.max(1200),
                    "a datagram of {} bytes",
                    transmit.data.len()
                );
                assert_eq!(transmit.segment, transmit.data.len(), "GSO is off");
                if let Some(client) = self
                    .client
                    .as_mut()
                    .filter(|_| transmit.to == client_addr())
                {
                    let info = quiche::RecvInfo {
                        from: server_addr(),
                        to: client_addr(),
                    };
                    let _dropped_by_quiche = client.conn.recv(&mut transmit.data, info);
                    moved = true;
                }
            }
            if let Some(client) = self.client.as_mut() {
                client.read(&mut self.buffer);
                while let Ok((len, info)) = client.conn.send(&mut self.buffer) {
                    assert_eq!(info.to, server_addr());
                    let packet = &mut self.buffer[..len];
                    self.endpoint
                        .on_datagram(self.now, packet, client_addr(), true);
                    moved = true;
                }
            }
            let open = self.metrics.quic_connections_open.load(Ordering::Relaxed);
            assert_eq!(
                open as usize,
                self.endpoint.connections(),
                "the gauge drifted"
            );
            if !moved {
                break;
            }
        }
    }

    fn take_updates(&mut self) {
        let updates: Vec<SessionUpdate> = self.endpoint.take_updates().collect();
        for update in updates {
            match update {
                SessionUpdate::Chat {
                    id,
                    first,
                    user,
                    device,
                    requests,
                } => {
                    let reported = self.sessions.entry(id).or_default();
                    assert!(!reported.closed, "a Chat after Closed for {id}");
                    assert_eq!(first, !reported.chat, "first is {first} for session {id}");
                    reported.chat = true;
                    assert!(is_valid_id(&user) && is_valid_id(&device));
                    let chat = fixture::chat_limits();
                    for request in &requests {
                        check_command(&request.command, &chat);
                    }
                    // The core's answers: an empty ok per command, and a typing event,
                    // so that replies and datagrams go back out.
                    let replies: Vec<(Doc, bool)> = requests
                        .iter()
                        .map(|r| (Doc::Owned(format!(r#"{{"re":{},"ok":{{}}}}"#, r.re)), false))
                        .chain(std::iter::once((
                            Doc::Owned(
                                r#"{"ev":"typing","conv":"c","user":"bob","on":true}"#.into(),
                            ),
                            true,
                        )))
                        .collect();
                    self.endpoint
                        .push_documents(self.now, id, replies.into_iter());
                }
                SessionUpdate::Closed { id, opened } => {
                    let reported = self.sessions.entry(id).or_default();
                    assert!(!reported.closed, "session {id} closed twice");
                    assert_eq!(opened, reported.chat, "opened is {opened} for session {id}");
                    reported.closed = true;
                }
            }
        }
    }
}

impl Client {
    /// Read the session stream (documents must be JSON objects) and any datagrams.
    fn read(&mut self, buffer: &mut [u8]) {
        let readable: Vec<u64> = self.conn.readable().collect();
        for stream in readable {
            while let Ok((len, _fin)) = self.conn.stream_recv(stream, buffer) {
                self.reader
                    .push(&buffer[..len], 1 << 20, |frame| match frame {
                        Frame::Document(bytes) => {
                            let value: serde_json::Value = serde_json::from_slice(bytes)
                                .unwrap_or_else(|e| panic!("the server sent non-JSON ({e})"));
                            assert!(value.is_object());
                        }
                        Frame::Oversized(len) => {
                            panic!("the server sent a document of {len} bytes")
                        }
                    });
            }
        }
        while let Ok(len) = self.conn.dgram_recv(buffer) {
            let value: serde_json::Value =
                serde_json::from_slice(&buffer[..len]).expect("a datagram is JSON");
            assert_eq!(value["ev"], "typing", "only typing travels as a datagram");
        }
    }
}

pub fn client_config() -> quiche::Config {
    let _trust_store_emptied = fixture::tls();
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("quiche config");
    config
        .set_application_protos(&[parley_gateway::quic::ALPN])
        .expect("ALPN");
    config.verify_peer(false);
    config.set_max_idle_timeout(30_000);
    config.set_max_recv_udp_payload_size(MAX_UDP_PAYLOAD);
    config.set_max_send_udp_payload_size(MAX_UDP_PAYLOAD);
    config.set_initial_max_data(1 << 20);
    config.set_initial_max_stream_data_bidi_local(1 << 20);
    config.set_initial_max_stream_data_bidi_remote(1 << 20);
    config.set_initial_max_streams_bidi(0);
    config.set_initial_max_streams_uni(0);
    config.enable_dgram(true, 8, 8);
    config
}
