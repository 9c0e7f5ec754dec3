//! Settings: defaults, then a TOML file (`--config`), then `PARLEY_*` environment
//! variables, then flags. One table below defines each setting once; the struct, the
//! file format, the environment names, the flags and `--help` all come from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use parley_router::directory::MAX_SHARDS;
use parley_router::limits::{ChatLimits, MAX_GROUP_MEMBERS_CEILING};
use parley_router::record::MAX_RECORD_OVERHEAD_BYTES;
use parley_router::session::SessionLimits;
use parley_wal::format::{MAX_SEGMENT_SIZE, RECORD_HEADER};
use parley_wal::WalOptions;

/// Why the configuration could not be used. Each renders as one line naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])+ $name:ident : $ty:ty = $default:expr $(, note $note:literal)?; )*) => {
        /// Every setting of `parleyd`, resolved.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Settings { $( $(#[doc = $doc])+ pub $name: $ty, )* }

        impl Default for Settings {
            fn default() -> Self { Self { $( $name: $default, )* } }
        }

        /// The same settings as optional overrides, for the file and the environment.
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileSettings { $( $name: Option<$ty>, )* }

        /// The same settings as flags.
        #[derive(Debug, Default, clap::Args)]
        pub struct SettingsArgs {
            $( #[arg(long, value_name = stringify!($ty), help = Settings::flag_help(stringify!($name)))]
               $name: Option<$ty>, )*
        }

        impl Settings {
            /// Every setting's name, default (shown as the built-in value renders, with
            /// what it means where the value alone does not say) and description, for
            /// `--help`, documentation and its test.
            pub fn docs() -> Vec<SettingDoc> {
                let defaults = Settings::default();
                vec![ $( SettingDoc {
                    name: stringify!($name),
                    default: shown_default(&defaults.$name, None $(.or(Some($note)))?),
                    description: concat!($($doc),+),
                }, )* ]
            }

            fn apply_file(&mut self, file: FileSettings) {
                $( if let Some(value) = file.$name { self.$name = value; } )*
            }

            fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
                $(
                    let name = env_name(stringify!($name));
                    if let Some(value) = env(&name) {
                        self.$name = parse_env::<$ty>(&name, &value)?;
                    }
                )*
                Ok(())
            }

            fn apply_args(&mut self, args: SettingsArgs) {
                $( if let Some(value) = args.$name { self.$name = value; } )*
            }
        }
    };
}

/// One setting as documented.
#[derive(Debug, Clone)]
pub struct SettingDoc {
    pub name: &'static str,
    pub default: String,
    pub description: &'static str,
}

/// How a default value is written in `--help` and docs/configuration.md.
trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_by_display {
    ($($ty:ty),*) => { $( impl ShowDefault for $ty {
        fn show(&self) -> String { self.to_string() }
    } )* };
}
show_by_display!(u32, u64, usize, i32, bool, SocketAddr);

impl ShowDefault for String {
    fn show(&self) -> String {
        if self.is_empty() {
            "\"\"".to_string()
        } else {
            self.clone()
        }
    }
}

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string().show()
    }
}

/// `value` as shown, with `note` (what the value means) in parentheses after it.
fn shown_default(value: &impl ShowDefault, note: Option<&str>) -> String {
    match note {
        Some(note) => format!("{} ({note})", value.show()),
        None => value.show(),
    }
}

impl Settings {
    /// A flag's `--help` line: the setting's description and its default.
    fn flag_help(name: &str) -> String {
        let doc = Settings::docs().into_iter().find(|doc| doc.name == name);
        match doc {
            Some(doc) => format!("{} [default: {}]", doc.description, doc.default),
            None => String::new(),
        }
    }
}

settings! {
    /// Directory for the log, the generated JWT secret and the lock file.
    data_dir: PathBuf = PathBuf::from("./parley-data");
    /// WebSocket listener address; every shard listens on it (SO_REUSEPORT). Port 0 picks a free port.
    ws_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7070));
    /// QUIC (UDP) listener address, ALPN parley/1; every shard has a socket on it (SO_REUSEPORT). Port 0 picks a free port.
    quic_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7071));
    /// PEM certificate chain for QUIC's TLS. Empty (with quic_key empty): a self-signed development certificate in the data dir, its fingerprint logged.
    quic_cert: PathBuf = PathBuf::new(), note "development certificate";
    /// PEM private key of quic_cert.
    quic_key: PathBuf = PathBuf::new(), note "development certificate";
    /// Validate a new QUIC client's address with a stateless retry (one round trip) before keeping any state for it.
    quic_retry: bool = true;
    /// QUIC idle timeout negotiated with clients, in milliseconds.
    quic_idle_timeout_ms: u64 = 75_000;
    /// Bidirectional streams a QUIC client may open; the session uses the first, others are refused.
    quic_max_streams: u64 = 4;
    /// QUIC flow-control window per stream, in bytes.
    quic_stream_window_bytes: u64 = 256 * 1024;
    /// QUIC flow-control window per connection, in bytes.
    quic_connection_window_bytes: u64 = 1024 * 1024;
    /// Open QUIC connections per shard (handshaking ones included); new ones beyond are dropped.
    quic_max_connections_per_shard: usize = 100_000;
    /// Largest UDP payload sent or received, in bytes (1200-65527); also the GSO segment size.
    quic_max_udp_payload_bytes: usize = 1350;
    /// DATAGRAM frames queued per QUIC connection, each way (typing); more are shed.
    quic_datagram_queue_len: usize = 64;
    /// Client addresses one QUIC connection may use over its life (NAT rebindings, migrations); 3-64.
    quic_max_client_addresses: u64 = 4;
    /// Admin HTTP listener: /healthz, /readyz, /metrics.
    admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7072));
    /// Number of shards, one pinned executor each; 0 means one per online CPU.
    shards: usize = 0, note "online CPUs";
    /// HS256 secret for client tokens. Empty: use (or create) <data_dir>/jwt-secret.
    jwt_secret: String = String::new(), note "generated file";
    /// This node's name, reported to clients in welcome.
    node_name: String = "local".to_string();
    /// Time a new connection has to authenticate before close 4002, in milliseconds.
    auth_timeout_ms: u64 = 10_000;
    /// Silence after which the server sends a WebSocket ping, in milliseconds.
    heartbeat_interval_ms: u64 = 30_000;
    /// Silence after which the session is closed with 1001, in milliseconds.
    idle_timeout_ms: u64 = 75_000;
    /// Largest text frame served; larger frames get too_large and the session stays open.
    max_frame_bytes: usize = 64 * 1024;
    /// Largest frame read at all; larger ones close the connection with 1009.
    max_frame_hard_bytes: usize = 1024 * 1024;
    /// Bytes of the WebSocket upgrade request accepted before the connection is dropped.
    max_handshake_bytes: usize = 8 * 1024;
    /// Sustained inbound commands per second per session.
    rate_limit_per_sec: u32 = 100;
    /// Commands per session allowed in a burst above the sustained rate.
    rate_limit_burst: u32 = 200;
    /// Consecutive rejected documents (rate-limited, malformed, unknown op, oversized or binary frame) before close 4008.
    abuse_strikes: u32 = 50;
    /// Documents queued for a slow client before close 4009.
    outbound_queue_len: usize = 1024;
    /// Bytes queued for a slow client before close 4009.
    outbound_queue_bytes: usize = 1024 * 1024;
    /// Bytes handed to the socket per write batch; more waits in the outbound queue.
    write_batch_bytes: usize = 64 * 1024;
    /// Initial WebSocket read buffer per connection (tungstenite's default is 128 KiB).
    ws_read_buffer_bytes: usize = 128;
    /// Open connections per shard (lingering ones included); more are refused at accept with HTTP 503. The io_uring engine makes, at start, every ring this needs (with room for the refusals and the armed accepts), so a limit the kernel cannot hold fails the start.
    max_connections_per_shard: usize = 100_000;
    /// Refused connections per shard being answered at once: HTTP 503 (at the limit or while draining), then closed like a session (close_linger_ms at most). Past this many, a refused connection is closed without an answer.
    max_refusing_connections_per_shard: usize = 1024;
    /// How client sockets are served: auto (io_uring where the kernel supports it, else descriptors), io_uring (refuse to start without it), or descriptors (readiness-based streams; every connection holds a process descriptor, so the descriptor limit caps connections).
    socket_engine: String = "auto".to_string();
    /// Submission queue entries of each io_uring socket ring (its completion queue is four times larger).
    socket_ring_entries: u32 = 1024;
    /// Fixed-file slots (direct descriptors) per io_uring socket ring, at most the process descriptor limit; a shard makes as many rings as its connections need.
    socket_ring_files: u32 = 20_000;
    /// Provided receive buffers per io_uring socket ring (a power of two, at most 32768), shared by the ring's connections.
    socket_recv_buffers: u32 = 512;
    /// Size of each provided receive buffer, in bytes.
    socket_recv_buffer_bytes: u32 = 2048;
    /// Listen backlog of each shard's socket.
    listen_backlog: i32 = 4096;
    /// How often the host's TCP buffer memory is read against net.ipv4.tcp_mem (shown in /metrics, logged once per episode of pressure), in milliseconds; 0 never.
    tcp_memory_check_ms: u64 = 1_000;
    /// Time a closing connection gets to flush its close frame, in milliseconds.
    close_linger_ms: u64 = 5_000;
    /// Longest a SIGTERM/SIGINT drain may take before parleyd exits anyway, in milliseconds.
    drain_timeout_ms: u64 = 10_000;
    /// Right after a kill -9, how long a start waits for what the dying parleyd still holds (its data dir lock, listen addresses held by io_uring instances the kernel tears down after the process), in milliseconds; 0 fails at once.
    restart_after_kill_wait_ms: u64 = 5_000;
    /// Largest message body, in bytes; larger sends get too_large.
    max_body_bytes: usize = 16 * 1024;
    /// Largest media object of a message, in bytes of JSON.
    max_media_bytes: usize = 4 * 1024;
    /// Members per group, the creator included (at most 100000).
    max_group_members: usize = 1_000;
    /// Largest history page a client may ask for (the default page is 50, or this if smaller).
    history_page_max: usize = 200;
    /// Resent cmids are recognised for at least this long, in milliseconds...
    dedupe_window_ms: u64 = 24 * 3600 * 1000;
    /// ...and for at least this many of each conversation's latest sends.
    dedupe_window_sends: usize = 10_000;
    /// Messages one sync or hello resume replays in all, shared by the named conversations; the rest is named in synced.more.
    sync_max_messages: usize = 500;
    /// Cursors one sync or resume may name.
    sync_max_convs: usize = 256;
    /// Users one presence.get may name.
    presence_get_max_users: usize = 500;
    /// Newest messages per conversation kept in memory; older ones are read from the log.
    message_cache_per_conv: usize = 64;
    /// Entries each shard-to-shard ring holds; a full ring stops reading client sockets.
    mesh_ring_entries: usize = 4096;
    /// Size each WAL segment file is preallocated to, in bytes.
    wal_segment_bytes: u64 = 64 << 20;
    /// How full the active WAL segment is, in percent, when the next one is allocated ahead of need (100: only when a write needs it); a full disk then shows while the active segment still has room.
    wal_next_segment_at_percent: u32 = 50;
    /// While the disk has no room for the next WAL segment, how often the log tries to allocate it again, in milliseconds.
    wal_disk_full_retry_ms: u64 = 1000;
    /// Records a shard writes between snapshots of its chat state (recovery replays only the log after the last one); 0 never snapshots.
    snapshot_every_records: u64 = 1_000_000;
    /// Period of each shard's loop-lag probe (parley_shard_loop_lag_seconds), in milliseconds, at most 1000; 0 turns it off.
    loop_lag_probe_ms: u64 = 10;
    /// Full-text search: each shard indexes its log's messages (tantivy, under <data_dir>/search) on a thread of its own; false serves no search command (unavailable) and keeps no index.
    search: bool = true;
    /// Indexing memory per shard before the indexer writes a segment, in bytes (at least 15 MiB, tantivy's floor).
    search_index_heap_bytes: usize = 32 << 20;
    /// How often each shard's indexer commits what it indexed, in milliseconds (50-60000): a message is searchable about this long after its ok.
    search_commit_interval_ms: u64 = 500;
    /// Hits one search can page through; cursors stop there.
    search_max_results: usize = 1_000;
    /// Searches waiting for the search thread at most; more get unavailable at once.
    search_queue_len: usize = 64;
    /// Nice value (0-19) at which a shard's search indexer catches up with more than 10,000 records of log (a rebuild, a restart after long with search off): above 0 the shards' threads (at 0) win a core both want. Following the live tail runs at the shards' priority.
    search_rebuild_nice: i32 = 10;
}

fn env_name(setting: &str) -> String {
    format!("PARLEY_{}", setting.to_ascii_uppercase())
}

fn parse_env<T: FromStr>(name: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|error: T::Err| ConfigError::Env {
        name: name.to_string(),
        value: value.to_string(),
        reason: error.to_string(),
    })
}

/// `parleyd` command line.
#[derive(Debug, Parser)]
#[command(
    name = "parleyd",
    version,
    about = "Parley chat gateway daemon",
    after_help = "Every setting can also be given in the TOML file (--config) under its \
                  name, or as the environment variable PARLEY_<NAME> (for example \
                  PARLEY_AUTH_TIMEOUT_MS). Flags win, then the environment, then the file."
)]
pub struct Cli {
    /// TOML file of settings (also PARLEY_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

impl Settings {
    /// Defaults, then the file, then the environment, then the flags; then validation.
    pub fn resolve(
        cli: Cli,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut settings = Settings::default();
        let config_path = cli
            .config
            .or_else(|| env("PARLEY_CONFIG").map(PathBuf::from));
        if let Some(path) = config_path {
            let text = std::fs::read_to_string(&path).map_err(|error| ConfigError::File {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            settings.apply_file(parse_file(&path, &text)?);
        }
        settings.apply_env(env)?;
        settings.apply_args(cli.settings);
        settings.validate()?;
        Ok(settings)
    }

    /// The settings of a configuration file's text alone (no environment, no flags),
    /// validated: what `parleyd --config PATH` resolves to. The entry the fuzz target
    /// `config` drives with arbitrary text.
    pub fn from_toml(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let mut settings = Settings::default();
        settings.apply_file(parse_file(path, text)?);
        settings.validate()?;
        Ok(settings)
    }

    /// Every setting within its range, and the settings that depend on each other
    /// consistent; the first that is not is named.
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in self.must_be_positive() {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        self.validate_choices()?;
        self.validate_ranges()?;
        self.validate_timing_and_frames()?;
        self.validate_queue_fits()
    }

    /// The settings for which 0 is meaningless.
    fn must_be_positive(&self) -> [(&'static str, u64); 31] {
        [
            ("wal_disk_full_retry_ms", self.wal_disk_full_retry_ms),
            ("socket_ring_entries", u64::from(self.socket_ring_entries)),
            ("socket_ring_files", u64::from(self.socket_ring_files)),
            (
                "socket_recv_buffer_bytes",
                u64::from(self.socket_recv_buffer_bytes),
            ),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_media_bytes", self.max_media_bytes as u64),
            ("history_page_max", self.history_page_max as u64),
            ("dedupe_window_sends", self.dedupe_window_sends as u64),
            ("sync_max_messages", self.sync_max_messages as u64),
            ("sync_max_convs", self.sync_max_convs as u64),
            ("presence_get_max_users", self.presence_get_max_users as u64),
            ("mesh_ring_entries", self.mesh_ring_entries as u64),
            ("auth_timeout_ms", self.auth_timeout_ms),
            ("rate_limit_per_sec", u64::from(self.rate_limit_per_sec)),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_handshake_bytes", self.max_handshake_bytes as u64),
            ("rate_limit_burst", u64::from(self.rate_limit_burst)),
            ("abuse_strikes", u64::from(self.abuse_strikes)),
            ("outbound_queue_len", self.outbound_queue_len as u64),
            ("outbound_queue_bytes", self.outbound_queue_bytes as u64),
            ("write_batch_bytes", self.write_batch_bytes as u64),
            ("ws_read_buffer_bytes", self.ws_read_buffer_bytes as u64),
            (
                "max_connections_per_shard",
                self.max_connections_per_shard as u64,
            ),
            ("quic_idle_timeout_ms", self.quic_idle_timeout_ms),
            ("quic_max_streams", self.quic_max_streams),
            ("quic_stream_window_bytes", self.quic_stream_window_bytes),
            (
                "quic_connection_window_bytes",
                self.quic_connection_window_bytes,
            ),
            (
                "quic_max_connections_per_shard",
                self.quic_max_connections_per_shard as u64,
            ),
            (
                "quic_datagram_queue_len",
                self.quic_datagram_queue_len as u64,
            ),
        ]
    }

    fn validate_choices(&self) -> Result<(), ConfigError> {
        if !["auto", "io_uring", "descriptors"].contains(&self.socket_engine.as_str()) {
            return Err(invalid(
                "socket_engine",
                format!(
                    "{:?} is not one of auto, io_uring, descriptors",
                    self.socket_engine
                ),
            ));
        }
        if !self.socket_recv_buffers.is_power_of_two() || self.socket_recv_buffers > 1 << 15 {
            return Err(invalid(
                "socket_recv_buffers",
                "must be a power of two from 1 to 32768",
            ));
        }
        Ok(())
    }

    fn validate_ranges(&self) -> Result<(), ConfigError> {
        if !(3..=64).contains(&self.quic_max_client_addresses) {
            return Err(invalid("quic_max_client_addresses", "must be 3-64"));
        }
        if !(1200..=65_527).contains(&self.quic_max_udp_payload_bytes) {
            return Err(invalid("quic_max_udp_payload_bytes", "must be 1200-65527"));
        }
        if self.listen_backlog <= 0 {
            return Err(invalid("listen_backlog", "must be greater than 0"));
        }
        let cpus = online_cpus();
        if self.shards > cpus {
            return Err(invalid(
                "shards",
                format!(
                    "{} exceeds the {cpus} online CPUs (one pinned shard per CPU)",
                    self.shards
                ),
            ));
        }
        if !(2..=MAX_GROUP_MEMBERS_CEILING).contains(&self.max_group_members) {
            return Err(invalid(
                "max_group_members",
                format!("must be 2-{MAX_GROUP_MEMBERS_CEILING}"),
            ));
        }
        if self.shard_count() > MAX_SHARDS {
            return Err(invalid("shards", format!("at most {MAX_SHARDS}")));
        }
        if self.search_index_heap_bytes < 15 << 20 {
            return Err(invalid(
                "search_index_heap_bytes",
                "must be at least 15728640 (tantivy's floor)",
            ));
        }
        if !(50..=60_000).contains(&self.search_commit_interval_ms) {
            return Err(invalid("search_commit_interval_ms", "must be 50-60000"));
        }
        if !(1..=100_000).contains(&self.search_max_results) {
            return Err(invalid("search_max_results", "must be 1-100000"));
        }
        if !(0..=19).contains(&self.search_rebuild_nice) {
            return Err(invalid("search_rebuild_nice", "must be 0-19"));
        }
        if !(1..=100_000).contains(&self.search_queue_len) {
            return Err(invalid("search_queue_len", "must be 1-100000"));
        }
        if self.loop_lag_probe_ms > 1000 {
            return Err(invalid("loop_lag_probe_ms", "must be 0 (off) to 1000"));
        }
        if !(1 << 20..=MAX_SEGMENT_SIZE).contains(&self.wal_segment_bytes) {
            return Err(invalid(
                "wal_segment_bytes",
                format!("must be 1048576 to {}", MAX_SEGMENT_SIZE),
            ));
        }
        if self.wal_next_segment_at_percent > 100 {
            return Err(invalid("wal_next_segment_at_percent", "must be 0-100"));
        }
        if !parley_router::auth::is_valid_id(&self.node_name) {
            return Err(invalid(
                "node_name",
                "must be 1-64 bytes of [A-Za-z0-9._@-]",
            ));
        }
        Ok(())
    }

    fn validate_timing_and_frames(&self) -> Result<(), ConfigError> {
        if self.idle_timeout_ms <= self.heartbeat_interval_ms {
            return Err(invalid(
                "idle_timeout_ms",
                format!(
                    "must exceed heartbeat_interval_ms ({}), or no ping is ever answered in time",
                    self.heartbeat_interval_ms
                ),
            ));
        }
        if self.max_frame_hard_bytes < self.max_frame_bytes {
            return Err(invalid(
                "max_frame_hard_bytes",
                format!(
                    "must be at least max_frame_bytes ({})",
                    self.max_frame_bytes
                ),
            ));
        }
        // Every record the chat core writes comes of one frame (chunked cursor records
        // aside), so the largest frame it takes, with what the sequencer adds, must fit
        // one batch of the log; past it the record would be refused.
        let batch_limit = self.wal_options().max_batch_size();
        let largest_record = self
            .max_frame_bytes
            .saturating_add(MAX_RECORD_OVERHEAD_BYTES);
        if parley_wal::format::stored_len(largest_record) > batch_limit {
            return Err(invalid(
                "max_frame_bytes",
                format!(
                    "must leave room for one chat record in a log batch: at most {} with \
                     wal_segment_bytes {} (a batch holds {batch_limit} bytes)",
                    batch_limit.saturating_sub(RECORD_HEADER + MAX_RECORD_OVERHEAD_BYTES),
                    self.wal_segment_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The log's options of every shard.
    pub fn wal_options(&self) -> WalOptions {
        WalOptions {
            segment_size: self.wal_segment_bytes,
            // Checked to be at most 100.
            next_segment_at_percent: self.wal_next_segment_at_percent.min(100) as u8,
            disk_full_retry: Duration::from_millis(self.wal_disk_full_retry_ms),
            ..WalOptions::default()
        }
    }

    /// What one frame or one sync makes the server send must fit a prompt reader's queue.
    fn validate_queue_fits(&self) -> Result<(), ConfigError> {
        // One frame's replies (every token of the burst, the welcome's `synced`, and the
        // rejections up to the abuse close) must fit the queue, or a client that reads
        // promptly could still be closed as too slow.
        let one_frame = u64::from(self.rate_limit_burst) + u64::from(self.abuse_strikes) + 1;
        if (self.outbound_queue_len as u64) < one_frame {
            return Err(invalid(
                "outbound_queue_len",
                format!(
                    "must be at least rate_limit_burst + abuse_strikes + 1 ({one_frame}), \
                     so the replies to one frame fit"
                ),
            ));
        }
        // A replay (every named conversation gets at least one message) and its reply and
        // `synced` must fit the queue of a client that reads promptly.
        let replay = self.sync_max_messages.max(self.sync_max_convs) as u64 + 2;
        if (self.outbound_queue_len as u64) < replay {
            return Err(invalid(
                "outbound_queue_len",
                format!(
                    "must be at least the larger of sync_max_messages and sync_max_convs, plus 2 ({replay}), so one sync's replay fits"
                ),
            ));
        }
        Ok(())
    }

    /// Shards to run: the setting, or one per online CPU.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            online_cpus()
        } else {
            self.shards
        }
    }

    pub fn chat_limits(&self) -> ChatLimits {
        ChatLimits {
            max_body_bytes: self.max_body_bytes,
            max_media_bytes: self.max_media_bytes,
            max_group_members: self.max_group_members,
            history_page_default: 50.min(self.history_page_max),
            history_page_max: self.history_page_max,
            dedupe_window: Duration::from_millis(self.dedupe_window_ms),
            dedupe_window_sends: self.dedupe_window_sends,
            sync_max_messages: self.sync_max_messages,
            sync_max_convs: self.sync_max_convs,
            presence_get_max_users: self.presence_get_max_users,
            message_cache_per_conv: self.message_cache_per_conv,
            search_max_results: self.search_max_results,
        }
    }

    pub fn quic_settings(&self) -> crate::quic::QuicSettings {
        crate::quic::QuicSettings {
            idle_timeout: Duration::from_millis(self.quic_idle_timeout_ms),
            max_streams_bidi: self.quic_max_streams,
            stream_window_bytes: self.quic_stream_window_bytes,
            connection_window_bytes: self.quic_connection_window_bytes,
            max_connections: self.quic_max_connections_per_shard,
            retry: self.quic_retry,
            max_udp_payload_bytes: self.quic_max_udp_payload_bytes,
            datagram_queue_len: self.quic_datagram_queue_len,
            write_batch_bytes: self.write_batch_bytes,
            max_client_addresses: self.quic_max_client_addresses,
        }
    }

    pub fn ws_limits(&self) -> crate::ws::WsLimits {
        crate::ws::WsLimits {
            max_frame_hard_bytes: self.max_frame_hard_bytes,
            max_handshake_bytes: self.max_handshake_bytes,
            write_batch_bytes: self.write_batch_bytes,
            read_buffer_bytes: self.ws_read_buffer_bytes,
            close_linger: Duration::from_millis(self.close_linger_ms),
        }
    }

    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            auth_timeout: Duration::from_millis(self.auth_timeout_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_frame_bytes: self.max_frame_bytes,
            rate_per_sec: self.rate_limit_per_sec,
            rate_burst: self.rate_limit_burst,
            abuse_strikes: self.abuse_strikes,
            outbound_queue_len: self.outbound_queue_len,
            outbound_queue_bytes: self.outbound_queue_bytes,
        }
    }
}

/// A configuration file's settings, as written in it.
fn parse_file(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    toml::from_str(text).map_err(|error| {
        // toml gives some errors (a control character in a comment) no message at all;
        // the place is always worth saying.
        let message = match error.message() {
            "" => "not valid TOML",
            message => message,
        };
        let reason = match error.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                format!("line {line}, column {column}: {message}")
            }
            None => message.to_string(),
        };
        ConfigError::File {
            path: path.to_path_buf(),
            reason,
        }
    })
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("parleyd").chain(args.iter().copied()))
            .expect("flags parse");
        Settings::resolve(cli, &|name| env.get(name).cloned())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings = resolve(&[], &[]).expect("defaults are valid");
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.ws_listen.to_string(), "127.0.0.1:7070");
        assert_eq!(settings.data_dir, PathBuf::from("./parley-data"));
    }

    #[test]
    fn flags_win_over_env_over_file() {
        let dir = std::env::temp_dir().join(format!("parley-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("parley.toml");
        std::fs::write(
            &file,
            "auth_timeout_ms = 1\nidle_timeout_ms = 99000\nnode_name = \"from-file\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let settings = resolve(
            &["--config", file, "--auth-timeout-ms", "3"],
            &[
                ("PARLEY_AUTH_TIMEOUT_MS", "2"),
                ("PARLEY_NODE_NAME", "from-env"),
            ],
        )
        .unwrap();
        assert_eq!(settings.auth_timeout_ms, 3);
        assert_eq!(settings.node_name, "from-env");
        assert_eq!(settings.idle_timeout_ms, 99_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_setting() {
        let error = resolve(&[], &[("PARLEY_MAX_FRAME_BYTES", "lots")]).unwrap_err();
        assert!(
            error.to_string().contains("PARLEY_MAX_FRAME_BYTES"),
            "{error}"
        );
        let error = resolve(&["--max-frame-bytes", "0"], &[]).unwrap_err();
        assert!(
            error.to_string().starts_with("setting max_frame_bytes"),
            "{error}"
        );
        let error = resolve(
            &["--outbound-queue-len", "100", "--rate-limit-burst", "200"],
            &[],
        )
        .unwrap_err();
        assert!(
            error.to_string().starts_with("setting outbound_queue_len"),
            "{error}"
        );
        let error = resolve(&["--loop-lag-probe-ms", "1001"], &[]).unwrap_err();
        assert!(
            error.to_string().starts_with("setting loop_lag_probe_ms"),
            "{error}"
        );
        assert!(
            resolve(&["--loop-lag-probe-ms", "0"], &[]).is_ok(),
            "0 is off"
        );
        let error = resolve(&["--rate-limit-per-sec", "0"], &[]).unwrap_err();
        assert!(
            error.to_string().starts_with("setting rate_limit_per_sec"),
            "{error}"
        );
        let error = resolve(&["--node-name", ""], &[]).unwrap_err();
        assert!(
            error.to_string().starts_with("setting node_name"),
            "{error}"
        );
        let error = resolve(
            &["--idle-timeout-ms", "10", "--heartbeat-interval-ms", "20"],
            &[],
        )
        .unwrap_err();
        assert!(error.to_string().contains("idle_timeout_ms"), "{error}");
    }

    /// A frame the log could not take as one record is refused at start, not at the
    /// first such message (where the shard would have to refuse it).
    #[test]
    fn the_largest_frame_must_fit_one_log_batch() {
        let segment = 1 << 20;
        let batch = WalOptions {
            segment_size: segment,
            ..WalOptions::default()
        }
        .max_batch_size();
        let fits = batch - RECORD_HEADER - MAX_RECORD_OVERHEAD_BYTES;
        let with_frame = |frame: usize| {
            let (frame, segment) = (frame.to_string(), segment.to_string());
            let args = [
                "--wal-segment-bytes",
                segment.as_str(),
                "--max-frame-bytes",
                frame.as_str(),
                "--max-frame-hard-bytes",
                frame.as_str(),
            ];
            resolve(&args, &[])
        };
        with_frame(fits).expect("the largest frame that fits is taken");
        let error = with_frame(fits + 1).unwrap_err().to_string();
        assert!(
            error.starts_with("setting max_frame_bytes") && error.contains(&fits.to_string()),
            "{error}"
        );
    }

    #[test]
    fn a_file_error_says_where_even_when_toml_says_nothing() {
        let error = Settings::from_toml(Path::new("p.toml"), "# a\u{1}b\nshards = 1\n")
            .expect_err("a control character in a comment");
        assert_eq!(
            error.to_string(),
            "config file p.toml: line 1, column 4: not valid TOML"
        );
        let error = Settings::from_toml(Path::new("p.toml"), "\nshards = \"x\"\n")
            .expect_err("a string for a number");
        assert!(
            error
                .to_string()
                .starts_with("config file p.toml: line 2, column 10: invalid type"),
            "{error}"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("parley-config-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("parley.toml");
        std::fs::write(&file, "auth_timeout = 5\n").unwrap();
        let error = resolve(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(error.to_string().contains("auth_timeout"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn configuration_doc_lists_every_setting() {
        let doc = include_str!("../../docs/configuration.md");
        // Each setting's own row: | `name` | `--flag` | `PARLEY_NAME` | `default` | meaning |
        let rows: HashMap<&str, Vec<&str>> = doc
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line
                    .strip_prefix('|')?
                    .split(" | ")
                    .map(str::trim)
                    .collect();
                let name = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
                Some((name, cells))
            })
            .collect();
        let docs = Settings::docs();
        for setting in &docs {
            let name = setting.name;
            let row = rows
                .get(name)
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{name}`"));
            let want = [
                format!("`--{}`", name.replace('_', "-")),
                format!("`{}`", env_name(name)),
                format!("`{}`", setting.default),
            ];
            let got: Vec<String> = row.iter().skip(1).take(3).map(|c| c.to_string()).collect();
            assert_eq!(
                got, want,
                "docs/configuration.md's row for `{name}`: flag, environment, default"
            );
        }
        // And no row for a setting that does not exist.
        let table_rows = doc.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(table_rows, docs.len(), "rows in the settings table");
    }

    #[test]
    fn shown_defaults_are_the_built_in_values() {
        let docs = Settings::docs();
        let shown = |name: &str| {
            docs.iter()
                .find(|doc| doc.name == name)
                .map(|doc| doc.default.clone())
        };
        assert_eq!(shown("ws_listen").as_deref(), Some("127.0.0.1:7070"));
        assert_eq!(shown("shards").as_deref(), Some("0 (online CPUs)"));
        assert_eq!(
            shown("jwt_secret").as_deref(),
            Some("\"\" (generated file)")
        );
        assert_eq!(shown("data_dir").as_deref(), Some("./parley-data"));
        assert_eq!(shown("quic_retry").as_deref(), Some("true"));
        assert_eq!(shown("no_such_setting"), None);
    }
}
