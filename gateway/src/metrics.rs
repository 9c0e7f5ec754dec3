//! Per-shard counters: each shard writes only its own (relaxed atomics, no contention);
//! the admin thread reads them all on scrape and renders Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parley_router::protocol::{CloseCode, ErrorCode};

use crate::kernel_tcp::KernelTcpMetrics;

#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Set once the shard is serving and its state is recovered.
    pub ready: AtomicBool,
    pub connections_open: AtomicU64,
    /// `max_connections_per_shard`, set when the shard starts.
    pub connection_limit: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Refused connections closed without the 503 (more were being answered than
    /// `max_refusing_connections_per_shard`), and the ones being answered now.
    pub connections_refused_unanswered: AtomicU64,
    pub connections_refusing: AtomicU64,
    /// Accepts that failed other than by the peer's abort (ENOMEM, EMFILE...).
    pub accept_errors: AtomicU64,
    pub sessions_authenticated: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// The io_uring socket engine's resources, for leak checks: rings, fixed-file slots
    /// holding a socket, provided buffers not yet given back, sends in flight, and the
    /// connections it holds (lingering ones included). A provided buffer is given back
    /// in the turn that filled it, so `recv_buffers_held` reads 0 between turns unless
    /// one leaks; `recv_buffers_filled` counts the buffers the kernel filled, to show
    /// that the receive path a leak check watches was used.
    pub socket_rings: AtomicU64,
    pub socket_slots: AtomicU64,
    /// Fixed-file slots of all the shard's rings, and the accepts armed on them.
    pub socket_slots_capacity: AtomicU64,
    pub accepts_armed: AtomicU64,
    pub recv_buffers_held: AtomicU64,
    pub recv_buffers_filled: AtomicU64,
    pub send_buffers_in_flight: AtomicU64,
    pub engine_connections: AtomicU64,
    pub quic_connections_open: AtomicU64,
    pub quic_handshakes: AtomicU64,
    pub quic_retries: AtomicU64,
    pub quic_bad_tokens: AtomicU64,
    pub quic_dropped: AtomicU64,
    pub quic_forwarded: AtomicU64,
    /// Copied from the shard's chat core by its router task.
    pub messages_sequenced: AtomicU64,
    pub sends_deduplicated: AtomicU64,
    pub conversations: AtomicU64,
    pub ephemeral_shed: AtomicU64,
    pub mesh_backlog: AtomicU64,
    pub wal_flushes: AtomicU64,
    pub wal_bytes_written: AtomicU64,
    /// Set and cleared by the log's writer thread as a full-disk episode starts and ends.
    pub wal_disk_full: AtomicBool,
    pub wal_appends_refused: AtomicU64,
    /// How late the shard's loop ran its lag probe (`runtime/loop_lag.rs`).
    pub loop_lag: LagHistogram,
    /// The shard's search indexer (search/indexer.rs): messages indexed, records it could
    /// not decode, its index's bytes on disk, the LSN its last commit covers, and how far
    /// that trails the log's durable end (records, and the age of the oldest record not
    /// yet searchable).
    pub search_docs_indexed: AtomicU64,
    pub search_records_undecodable: AtomicU64,
    pub search_index_bytes: AtomicU64,
    pub search_indexed_lsn: AtomicU64,
    pub search_lag_records: AtomicU64,
    pub search_lag_ms: AtomicU64,
    /// Searches of this shard's sessions run, refused for a full queue, and their time
    /// from queued to answered.
    pub search_queries: AtomicU64,
    pub search_queries_refused: AtomicU64,
    pub search_query_latency: LagHistogram,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    closes: [AtomicU64; CloseCode::ALL.len()],
}

impl ShardMetrics {
    pub fn error_sent(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    pub fn close_sent(&self, code: CloseCode) {
        self.closes[code.index()].fetch_add(1, Relaxed);
    }

    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code.index()].load(Relaxed)
    }
}

/// Upper bounds of the loop-lag buckets, in microseconds: 100 µs (a timer's own slack)
/// to 1 s (a shard that stalls that long is broken); a last bucket, `+Inf`, takes the
/// rest. 10 ms is a bound, so "p99 under 10 ms" reads exactly off the histogram.
pub const LOOP_LAG_BOUNDS_US: [u64; 13] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A Prometheus histogram of durations, written by one thread (relaxed atomics) and read
/// by the scrape. The buckets hold their own counts (not cumulative): one add per sample.
#[derive(Debug, Default)]
pub struct LagHistogram {
    buckets: [AtomicU64; LOOP_LAG_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl LagHistogram {
    pub fn record(&self, lag: Duration) {
        let micros = lag.as_micros();
        let bucket = LOOP_LAG_BOUNDS_US
            .iter()
            .position(|&bound| micros <= u128::from(bound))
            .unwrap_or(LOOP_LAG_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(nanos, Relaxed);
    }

    /// Cumulative counts, one per bound and then `+Inf` (the total).
    fn cumulative(&self) -> [u64; LOOP_LAG_BOUNDS_US.len() + 1] {
        let mut running = 0;
        self.buckets.each_ref().map(|bucket| {
            running += bucket.load(Relaxed);
            running
        })
    }
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

pub fn dec(counter: &AtomicU64) {
    counter.fetch_sub(1, Relaxed);
}

/// A per-shard series: name, type, help, and where its value lives.
type PerShardSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardMetrics) -> u64,
);

const PER_SHARD: [PerShardSeries; 43] = [
    (
        "parley_messages_sequenced_total",
        "counter",
        "Messages sequenced by the conversations homed on the shard.",
        |m| m.messages_sequenced.load(Relaxed),
    ),
    (
        "parley_sends_deduplicated_total",
        "counter",
        "Resent cmids answered with the original seq.",
        |m| m.sends_deduplicated.load(Relaxed),
    ),
    (
        "parley_conversations",
        "gauge",
        "Conversations homed on the shard.",
        |m| m.conversations.load(Relaxed),
    ),
    (
        "parley_ephemeral_shed_total",
        "counter",
        "Typing and presence events dropped because a ring was full.",
        |m| m.ephemeral_shed.load(Relaxed),
    ),
    (
        "parley_mesh_backlog",
        "gauge",
        "Entries waiting for room in the shard's outgoing rings.",
        |m| m.mesh_backlog.load(Relaxed),
    ),
    (
        "parley_wal_flushes_total",
        "counter",
        "WAL flushes (one write and one fdatasync each).",
        |m| m.wal_flushes.load(Relaxed),
    ),
    (
        "parley_wal_bytes_written_total",
        "counter",
        "Bytes written to the WAL.",
        |m| m.wal_bytes_written.load(Relaxed),
    ),
    (
        "parley_wal_disk_full",
        "gauge",
        "1 while the disk has no room for the shard's next log segment.",
        |m| u64::from(m.wal_disk_full.load(Relaxed)),
    ),
    (
        "parley_wal_appends_refused_total",
        "counter",
        "Log appends refused because the disk was full (each command answered unavailable).",
        |m| m.wal_appends_refused.load(Relaxed),
    ),
    (
        "parley_connections",
        "gauge",
        "Open client connections.",
        |m| m.connections_open.load(Relaxed),
    ),
    ("parley_sessions", "gauge", "Authenticated sessions.", |m| {
        m.sessions_authenticated.load(Relaxed)
    }),
    (
        "parley_connections_accepted_total",
        "counter",
        "Connections accepted.",
        |m| m.connections_accepted.load(Relaxed),
    ),
    (
        "parley_connections_refused_total",
        "counter",
        "Connections refused at max_connections_per_shard or during a drain (answered HTTP 503, or closed unanswered).",
        |m| m.connections_refused.load(Relaxed),
    ),
    (
        "parley_connections_refused_unanswered_total",
        "counter",
        "Refused connections closed without the 503: max_refusing_connections_per_shard were being answered.",
        |m| m.connections_refused_unanswered.load(Relaxed),
    ),
    (
        "parley_connections_refusing",
        "gauge",
        "Refused connections being answered 503 and closed.",
        |m| m.connections_refusing.load(Relaxed),
    ),
    (
        "parley_connection_limit",
        "gauge",
        "max_connections_per_shard: the open connections the shard admits.",
        |m| m.connection_limit.load(Relaxed),
    ),
    (
        "parley_accept_errors_total",
        "counter",
        "Accepts that failed other than by the peer's abort (each pauses accepting 10 ms).",
        |m| m.accept_errors.load(Relaxed),
    ),
    (
        "parley_frames_in_total",
        "counter",
        "Data frames received (WebSocket frames, QUIC documents and datagrams).",
        |m| m.frames_in.load(Relaxed),
    ),
    (
        "parley_frames_out_total",
        "counter",
        "Data frames sent (WebSocket frames, QUIC documents and datagrams).",
        |m| m.frames_out.load(Relaxed),
    ),
    (
        "parley_handshake_failures_total",
        "counter",
        "Connections dropped before a WebSocket session started.",
        |m| m.handshake_failures.load(Relaxed),
    ),
    (
        "parley_socket_rings",
        "gauge",
        "io_uring socket rings of the shard's socket engine.",
        |m| m.socket_rings.load(Relaxed),
    ),
    (
        "parley_socket_slots",
        "gauge",
        "Fixed-file slots holding a client socket (direct descriptors).",
        |m| m.socket_slots.load(Relaxed),
    ),
    (
        "parley_socket_slots_capacity",
        "gauge",
        "Fixed-file slots of the shard's rings: connections, refusals being answered and armed accepts.",
        |m| m.socket_slots_capacity.load(Relaxed),
    ),
    (
        "parley_socket_accepts_armed",
        "gauge",
        "Accepts armed on the shard's listener, each into a slot of its own.",
        |m| m.accepts_armed.load(Relaxed),
    ),
    (
        "parley_recv_buffers_held",
        "gauge",
        "Provided receive buffers filled and not yet given back to the kernel.",
        |m| m.recv_buffers_held.load(Relaxed),
    ),
    (
        "parley_recv_buffers_filled_total",
        "counter",
        "Provided receive buffers the kernel filled (each is given back in the same turn).",
        |m| m.recv_buffers_filled.load(Relaxed),
    ),
    (
        "parley_send_buffers_in_flight",
        "gauge",
        "Send buffers the kernel has not finished with.",
        |m| m.send_buffers_in_flight.load(Relaxed),
    ),
    (
        "parley_engine_connections",
        "gauge",
        "Connections the socket engine holds, lingering ones included.",
        |m| m.engine_connections.load(Relaxed),
    ),
    (
        "parley_quic_connections",
        "gauge",
        "Open QUIC connections, including handshaking and closing ones.",
        |m| m.quic_connections_open.load(Relaxed),
    ),
    (
        "parley_quic_handshakes_total",
        "counter",
        "QUIC connections accepted (address validated when retry is on).",
        |m| m.quic_handshakes.load(Relaxed),
    ),
    (
        "parley_quic_retries_total",
        "counter",
        "Stateless retries sent to new QUIC clients.",
        |m| m.quic_retries.load(Relaxed),
    ),
    (
        "parley_quic_bad_tokens_total",
        "counter",
        "Initials with an invalid or expired retry token, dropped.",
        |m| m.quic_bad_tokens.load(Relaxed),
    ),
    (
        "parley_quic_dropped_total",
        "counter",
        "UDP datagrams dropped: not QUIC, unknown connection id, too short, or refused by quiche.",
        |m| m.quic_dropped.load(Relaxed),
    ),
    (
        "parley_quic_forwarded_total",
        "counter",
        "QUIC datagrams forwarded to the shard owning their connection id.",
        |m| m.quic_forwarded.load(Relaxed),
    ),
    (
        "parley_search_docs_indexed_total",
        "counter",
        "Messages the shard's search indexer added to its index.",
        |m| m.search_docs_indexed.load(Relaxed),
    ),
    (
        "parley_search_records_undecodable_total",
        "counter",
        "Chat records of the shard's log the search indexer could not decode (and skipped).",
        |m| m.search_records_undecodable.load(Relaxed),
    ),
    (
        "parley_search_index_bytes",
        "gauge",
        "Bytes of the shard's search index on disk, as of its last commit.",
        |m| m.search_index_bytes.load(Relaxed),
    ),
    (
        "parley_search_indexed_lsn",
        "gauge",
        "The LSN of the shard's log that its search index's last commit covers.",
        |m| m.search_indexed_lsn.load(Relaxed),
    ),
    (
        "parley_search_index_lag_records",
        "gauge",
        "Durable log records not yet searchable (the log's durable LSN less the index's).",
        |m| m.search_lag_records.load(Relaxed),
    ),
    (
        "parley_search_index_lag_ms",
        "gauge",
        "Age of the oldest durable record not yet searchable, in milliseconds; 0 when caught up.",
        |m| m.search_lag_ms.load(Relaxed),
    ),
    (
        "parley_search_queries_total",
        "counter",
        "Searches of the shard's sessions answered (hits or an error).",
        |m| m.search_queries.load(Relaxed),
    ),
    (
        "parley_search_queries_refused_total",
        "counter",
        "Searches answered unavailable at once: search_queue_len searches were waiting.",
        |m| m.search_queries_refused.load(Relaxed),
    ),
    (
        "parley_shard_ready",
        "gauge",
        "1 when the shard serves and its state is recovered.",
        |m| u64::from(m.ready.load(Relaxed)),
    ),
];

/// A duration histogram per shard: the buckets (cumulative, as Prometheus wants them),
/// their sum and count.
fn render_histogram(
    out: &mut String,
    (name, help): (&str, &str),
    shards: &[std::sync::Arc<ShardMetrics>],
    histogram_of: fn(&ShardMetrics) -> &LagHistogram,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (shard, metrics) in shards.iter().enumerate() {
        let histogram = histogram_of(metrics);
        let cumulative = histogram.cumulative();
        for (bound, count) in LOOP_LAG_BOUNDS_US.iter().zip(cumulative) {
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {count}"
            );
        }
        let total = cumulative[LOOP_LAG_BOUNDS_US.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {total}"
        );
        let sum = histogram.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {total}");
    }
}

/// One metric: its header, then one line per (labels, value).
fn series(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    rows: impl Iterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in rows {
        let _ = match labels.is_empty() {
            true => writeln!(out, "{name} {value}"),
            false => writeln!(out, "{name}{{{labels}}} {value}"),
        };
    }
}

/// Prometheus text exposition of every shard's counters, and the process-wide ones.
pub fn render(
    shards: &[std::sync::Arc<ShardMetrics>],
    draining: bool,
    kernel_tcp: &KernelTcpMetrics,
) -> String {
    let mut out = String::with_capacity(4096);
    let by_shard = || shards.iter().enumerate();
    for (name, kind, help, value) in PER_SHARD {
        let rows = by_shard().map(|(shard, m)| (format!("shard=\"{shard}\""), value(m)));
        series(&mut out, (name, kind, help), rows);
    }
    let errors = by_shard().flat_map(|(shard, m)| {
        ErrorCode::ALL.map(|code| {
            let labels = format!("shard=\"{shard}\",code=\"{}\"", code.as_str());
            (labels, m.errors[code.index()].load(Relaxed))
        })
    });
    let header = (
        "parley_errors_total",
        "counter",
        "Error replies sent, by code.",
    );
    series(&mut out, header, errors);
    let closes = by_shard().flat_map(|(shard, m)| {
        CloseCode::ALL.map(|code| {
            let labels = format!("shard=\"{shard}\",code=\"{}\"", code.code());
            (labels, m.closes[code.index()].load(Relaxed))
        })
    });
    let header = (
        "parley_closes_total",
        "counter",
        "Close frames sent, by close code.",
    );
    series(&mut out, header, closes);
    let loop_lag = (
        "parley_shard_loop_lag_seconds",
        "How late the shard's loop ran a task it scheduled (the loop-lag probe, every loop_lag_probe_ms).",
    );
    render_histogram(&mut out, loop_lag, shards, |m| &m.loop_lag);
    let search_latency = (
        "parley_search_query_seconds",
        "Time from a search queued to its answer, by the shard of the session that asked.",
    );
    render_histogram(&mut out, search_latency, shards, |m| {
        &m.search_query_latency
    });
    let header = ("parley_draining", "gauge", "1 while the process drains.");
    series(
        &mut out,
        header,
        std::iter::once((String::new(), u64::from(draining))),
    );
    render_kernel_tcp(&mut out, kernel_tcp);
    out
}

/// The host's TCP buffer memory (kernel_tcp.rs), once it has been read.
fn render_kernel_tcp(out: &mut String, m: &KernelTcpMetrics) {
    if m.readable.load(Relaxed) == 0 {
        return;
    }
    let rows: [(&str, &str, &str, &AtomicU64); 6] = [
        ("parley_kernel_tcp_mem_pages", "gauge", "TCP buffer memory in use on the host, in pages (/proc/net/sockstat).", &m.pages),
        ("parley_kernel_tcp_mem_low_pages", "gauge", "net.ipv4.tcp_mem low: below it the kernel does not regulate TCP memory.", &m.low),
        ("parley_kernel_tcp_mem_pressure_pages", "gauge", "net.ipv4.tcp_mem pressure: from here the kernel shrinks socket buffers.", &m.pressure),
        ("parley_kernel_tcp_mem_high_pages", "gauge", "net.ipv4.tcp_mem high: here the kernel refuses TCP buffer memory.", &m.high),
        ("parley_kernel_tcp_memory_pressures_total", "counter", "Entries of the kernel into TCP memory pressure (TcpExtTCPMemoryPressures).", &m.pressures_total),
        ("parley_kernel_tcp_mem_level", "gauge", "0 normal, 1 under pressure, 2 exhausted: the worst of the current episode (logged once each).", &m.level),
    ];
    for (name, kind, help, value) in rows {
        series(
            out,
            (name, kind, help),
            std::iter::once((String::new(), value.load(Relaxed))),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_samples_land_in_the_bucket_of_their_upper_bound() {
        let histogram = LagHistogram::default();
        for micros in [0, 100, 101, 9_999, 10_000, 10_001, 1_000_000, 5_000_000] {
            histogram.record(Duration::from_micros(micros));
        }
        let cumulative = histogram.cumulative();
        let at = |bound_us: u64| {
            let index = LOOP_LAG_BOUNDS_US.iter().position(|&b| b == bound_us);
            cumulative[index.expect("a bound")]
        };
        assert_eq!(at(100), 2, "0 and exactly 100 µs");
        assert_eq!(at(250), 3);
        assert_eq!(at(10_000), 5, "9,999 and exactly 10,000 µs");
        assert_eq!(at(25_000), 6);
        assert_eq!(at(1_000_000), 7);
        assert_eq!(cumulative[LOOP_LAG_BOUNDS_US.len()], 8, "+Inf holds all");
        assert_eq!(histogram.sum_ns.load(Relaxed), 6_030_201_000);
    }

    #[test]
    fn the_scrape_renders_a_cumulative_histogram_per_shard() {
        let shards: Vec<_> = (0..2)
            .map(|_| std::sync::Arc::new(ShardMetrics::default()))
            .collect();
        shards[1].loop_lag.record(Duration::from_micros(300));
        shards[1].loop_lag.record(Duration::from_millis(20));
        let text = render(&shards, false, &KernelTcpMetrics::default());
        let line = |series: &str| {
            text.lines()
                .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let name = "parley_shard_loop_lag_seconds";
        assert!(text.contains(&format!("# TYPE {name} histogram")));
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"0\",le=\"+Inf\"}}")),
            "0"
        );
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"1\",le=\"0.00025\"}}")),
            "0"
        );
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"1\",le=\"0.0005\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"1\",le=\"0.01\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"1\",le=\"0.025\"}}")),
            "2"
        );
        assert_eq!(line(&format!("{name}_bucket{{shard=\"1\",le=\"1\"}}")), "2");
        assert_eq!(
            line(&format!("{name}_bucket{{shard=\"1\",le=\"+Inf\"}}")),
            "2"
        );
        assert_eq!(line(&format!("{name}_count{{shard=\"1\"}}")), "2");
        assert_eq!(line(&format!("{name}_sum{{shard=\"1\"}}")), "0.0203");
    }
}
