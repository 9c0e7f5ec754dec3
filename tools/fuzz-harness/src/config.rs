//! Target `config`: a TOML configuration file (gateway/src/config.rs `Settings::from_toml`:
//! parse, then validate).
//!
//! Input: the file's bytes (not UTF-8: parleyd refuses it when reading, before TOML).
//!
//! Invariants:
//! - the file is accepted, or refused with `ConfigError::File` (TOML or a key's type) or
//!   `ConfigError::Invalid` naming a setting that exists; never anything else;
//! - accepted settings keep what validation promises of each other;
//! - everything parleyd builds from accepted settings before and while serving builds
//!   and runs without a panic: the limits, the log's options, quiche's configuration and
//!   an endpoint, and a WebSocket connection and its session taken through an upgrade,
//!   a hello, a long silence (as long as the settings allow), a ping and the timers.

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use parley_gateway::config::{ConfigError, Settings};
use parley_gateway::metrics::ShardMetrics;
use parley_gateway::quic::{server_config, QuicEndpoint};
use parley_gateway::ws::WsConnection;
use parley_router::record::MAX_RECORD_OVERHEAD_BYTES;
use parley_router::session::SessionConfig;
use parley_wal::format::stored_len;

use crate::fixture::{self, later};

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Settings::from_toml(Path::new("fuzz.toml"), text) {
        Ok(settings) => accepted(&settings),
        Err(ConfigError::File { path, reason }) => {
            assert_eq!(path, Path::new("fuzz.toml"));
            assert!(!reason.is_empty());
        }
        Err(ConfigError::Invalid { name, reason }) => {
            assert!(
                Settings::docs().iter().any(|doc| doc.name == name),
                "{name}"
            );
            assert!(!reason.is_empty());
        }
        Err(error @ ConfigError::Env { .. }) => panic!("no environment was read: {error}"),
    }
}

fn accepted(settings: &Settings) {
    assert!(settings.idle_timeout_ms > settings.heartbeat_interval_ms);
    assert!(settings.max_frame_hard_bytes >= settings.max_frame_bytes);
    let wal = settings.wal_options();
    let largest_record = settings
        .max_frame_bytes
        .saturating_add(MAX_RECORD_OVERHEAD_BYTES);
    assert!(stored_len(largest_record) <= wal.max_batch_size());
    let one_frame = u64::from(settings.rate_limit_burst) + u64::from(settings.abuse_strikes) + 1;
    assert!(settings.outbound_queue_len as u64 >= one_frame);
    assert!(settings.shard_count() >= 1);

    let quic = settings.quic_settings();
    let keys = crate::quic::keys();
    let quiche_config = server_config(&quic, fixture::tls(), &keys)
        .unwrap_or_else(|e| panic!("accepted QUIC settings make no quiche config: {e}"));
    let metrics = Arc::new(ShardMetrics::default());
    let session_config = Arc::new(SessionConfig {
        limits: settings.session_limits(),
        chat: settings.chat_limits(),
        jwt: fixture::key(),
        node: settings.node_name.clone(),
    });
    let endpoint = QuicEndpoint::new(
        0,
        settings.shard_count(),
        crate::quic::server_addr(),
        quiche_config,
        quic,
        session_config.clone(),
        metrics.clone(),
        &keys,
        true,
    );
    assert_eq!(endpoint.connections(), 0);

    let now = fixture::start();
    let mut conn = WsConnection::new(
        Rc::new(settings.ws_limits()),
        session_config,
        metrics,
        "fuzz.1".into(),
        now,
    );
    let upgrade = crate::seeds::upgrade_request(None);
    conn.on_bytes(now, &upgrade);
    let hello = format!(r#"{{"id":1,"op":"hello","token":"{}"}}"#, fixture::token());
    conn.on_bytes(
        now,
        &crate::ws::client_frame(&[&[0x81][..], hello.as_bytes()].concat()),
    );
    let _ = conn.next_deadline();
    let quiet = later(now, settings.heartbeat_interval_ms);
    conn.on_tick(quiet);
    let ping = br#"{"id":2,"op":"ping"}"#;
    conn.on_bytes(
        quiet,
        &crate::ws::client_frame(&[&[0x81][..], ping].concat()),
    );
    let _ = conn.next_deadline();
    conn.on_tick(later(quiet, settings.idle_timeout_ms));
    let written = conn.output().len();
    conn.consume_output(written, quiet);
}
