//! Per-shard counters: each shard writes only its own (relaxed atomics, no contention);
//! the admin thread reads them all on scrape and renders Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use parley_router::protocol::{CloseCode, ErrorCode};

#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Set once the shard is serving and its state is recovered.
    pub ready: AtomicBool,
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub sessions_authenticated: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub handshake_failures: AtomicU64,
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

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

pub fn dec(counter: &AtomicU64) {
    counter.fetch_sub(1, Relaxed);
}

/// A per-shard series: name, type, help, and where its value lives.
type PerShardGauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardMetrics) -> &AtomicU64,
);

/// Prometheus text exposition of every shard's counters.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>], draining: bool) -> String {
    let mut out = String::with_capacity(4096);
    let per_shard: [PerShardGauge; 7] = [
        (
            "parley_connections",
            "gauge",
            "Open client connections.",
            |m| &m.connections_open,
        ),
        ("parley_sessions", "gauge", "Authenticated sessions.", |m| {
            &m.sessions_authenticated
        }),
        (
            "parley_connections_accepted_total",
            "counter",
            "Connections accepted.",
            |m| &m.connections_accepted,
        ),
        (
            "parley_connections_refused_total",
            "counter",
            "Connections refused at max_connections_per_shard.",
            |m| &m.connections_refused,
        ),
        (
            "parley_frames_in_total",
            "counter",
            "WebSocket data frames received.",
            |m| &m.frames_in,
        ),
        (
            "parley_frames_out_total",
            "counter",
            "WebSocket data frames sent.",
            |m| &m.frames_out,
        ),
        (
            "parley_handshake_failures_total",
            "counter",
            "Connections dropped before a WebSocket session started.",
            |m| &m.handshake_failures,
        ),
    ];
    for (name, kind, help, field) in per_shard {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (shard, metrics) in shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\"}} {}",
                field(metrics).load(Relaxed)
            );
        }
    }
    let name = "parley_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Error replies sent, by code.\n# TYPE {name} counter"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        for code in ErrorCode::ALL {
            let value = metrics.errors[code.index()].load(Relaxed);
            let code = code.as_str();
            let _ = writeln!(out, "{name}{{shard=\"{shard}\",code=\"{code}\"}} {value}");
        }
    }
    let name = "parley_closes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Close frames sent, by close code.\n# TYPE {name} counter"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        for code in CloseCode::ALL {
            let value = metrics.closes[code.index()].load(Relaxed);
            let code = code.code();
            let _ = writeln!(out, "{name}{{shard=\"{shard}\",code=\"{code}\"}} {value}");
        }
    }
    let name = "parley_shard_ready";
    let _ = writeln!(
        out,
        "# HELP {name} 1 when the shard serves and its state is recovered.\n# TYPE {name} gauge"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{shard=\"{shard}\"}} {}",
            u8::from(metrics.ready.load(Relaxed))
        );
    }
    let name = "parley_draining";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while the process drains.\n# TYPE {name} gauge\n{name} {}",
        u8::from(draining)
    );
    out
}
