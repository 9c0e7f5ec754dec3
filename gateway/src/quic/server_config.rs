//! quiche's configuration of a shard's endpoint, from the named settings.

use super::cert::TlsFiles;
use super::{QuicKeys, QuicSettings, ALPN, SPARE_CIDS};

/// quiche's configuration for a shard's endpoint: TLS from `tls`, ALPN `parley/1`, the
/// named limits, DATAGRAM frames, 0-RTT, and the process-wide ticket key.
pub fn server_config(
    settings: &QuicSettings,
    tls: &TlsFiles,
    keys: &QuicKeys,
) -> Result<quiche::Config, String> {
    let path = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: not UTF-8", p.display()))
    };
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
    config
        .load_cert_chain_from_pem_file(&path(&tls.cert)?)
        .map_err(|error| format!("certificate {}: {error}", tls.cert.display()))?;
    config
        .load_priv_key_from_pem_file(&path(&tls.key)?)
        .map_err(|error| format!("key {}: {error}", tls.key.display()))?;
    config
        .set_application_protos(&[ALPN])
        .map_err(|e| e.to_string())?;
    config
        .set_ticket_key(&keys.tickets)
        .map_err(|e| format!("ticket key: {e}"))?;
    config.enable_early_data();
    config.set_max_idle_timeout(settings.idle_timeout.as_millis() as u64);
    config.set_max_recv_udp_payload_size(settings.max_udp_payload_bytes);
    config.set_max_send_udp_payload_size(settings.max_udp_payload_bytes);
    config.set_initial_max_data(settings.connection_window_bytes);
    config.set_initial_max_stream_data_bidi_remote(settings.stream_window_bytes);
    config.set_initial_max_stream_data_bidi_local(settings.stream_window_bytes);
    config.set_initial_max_streams_bidi(settings.max_streams_bidi);
    config.set_initial_max_streams_uni(0);
    config.set_max_connection_window(settings.connection_window_bytes);
    config.set_max_stream_window(settings.stream_window_bytes);
    // quiche keeps a path per client address while the client reuses its connection id (a
    // NAT rebinding does), and sizes its path table by this limit.
    config.set_active_connection_id_limit(settings.max_client_addresses.max(SPARE_CIDS as u64 + 1));
    config.set_disable_active_migration(false);
    config.enable_dgram(
        true,
        settings.datagram_queue_len,
        settings.datagram_queue_len,
    );
    config.enable_pacing(true);
    Ok(config)
}
