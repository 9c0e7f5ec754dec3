#!/usr/bin/env bash
# The socket-engine figures of docs/BENCHMARKS.md, in one run on one machine: memory per
# idle session and ping latency at 100,000 sessions, connects per second, the most idle
# sessions one parleyd holds (target 1,000,000), and the same idle test against
# nats-server. Release parleyd (2 shards, io_uring engine) and the generator share the
# box; parley-load uses its io_uring engine for the parleyd runs.
#
#   benches/load/engine.sh [OUT_DIR]            # default /tmp/parley-engine
#   STAGES="mem100k peer" benches/load/engine.sh  # only some stages
#   MAX_SESSIONS=1000000 STAGES=max benches/load/engine.sh
#
# Every run's report is OUT_DIR/<name>.json; summary.txt has one line per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/parley-engine}
STAGES=${STAGES:-"mem100k accept max peer"}
MAX_SESSIONS=${MAX_SESSIONS:-1000000}
mkdir -p "$OUT"
cargo build -q --release -p parley-gateway -p parley-tools
LOAD=${CARGO_TARGET_DIR:-target}/release/parley-load
PORT=18270

source benches/load/daemons.sh
# A fresh port per daemon: the previous run's TIME_WAIT connections share no 4-tuple
# with this one's, so they cannot slow its connects.
start_fresh_parleyd() {
    stop_parleyd
    PORT=$((PORT + 20))
    start_parleyd "$@"
}

# idle NAME PID TARGET ARGS...: one idle run, its one-line summary appended. A run that
# failed or was stopped still leaves its report (exit 1, 2, or 128 + signal) with why it
# stopped: summarised as it is. A missing or unreadable report is said, not fatal.
idle() {
    local name=$1 pid=$2 target=$3 status=0
    shift 3
    echo "== $name: parley-load idle --target $target $*" | tee -a "$OUT/commands.txt"
    "$LOAD" idle --target "$target" --pid "$pid" --json --quiet "$@" >"$OUT/$name.json" || status=$?
    python3 - "$OUT/$name.json" "$name" "$status" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
path, name, status = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    r = json.load(open(path))
except (OSError, ValueError) as error:
    print(f'{name}: NO REPORT (parley-load exit {status}: {error})')
    sys.exit(0)
lat = {l["name"]: l for l in r.get("latencies", [])}
c, s, e = r.get("connections", {}), r.get("server") or {}, r.get("extra", {})
stop = r.get("stop") or {}
ping = lat.get("ping", {})
ended = ''
if stop.get("reason", "completed") != "completed" or status != "0":
    ended = (f'; STOPPED: {stop.get("reason", "?")} in {stop.get("phase", "?")} at '
             f'{stop.get("at_s", 0):.1f} s ({stop.get("detail", "")}), exit {status}')
print(f'{name}: {c.get("established", 0)}/{c.get("target", 0)} sessions in {c.get("setup_s", 0):.1f} s '
      f'({e.get("connect_per_s", 0):,.0f}/s, {c.get("failed_attempts", 0)} failed), '
      f'server RSS {s.get("rss_kib_before", 0):,} -> {s.get("rss_kib_after", 0):,} KiB = '
      f'{s.get("rss_bytes_per_session", 0):,.0f} B/session, ping p50 {ping.get("p50_us", 0)/1000:.2f} ms '
      f'p99 {ping.get("p99_us", 0)/1000:.2f} ms, generator {e.get("generator_rss_bytes_per_session", 0):,.0f} B/session, '
      f'errors {r.get("errors", {})}{ended}')
PY
}

# The host's TCP buffer memory and its limit, before and after a stage (pages).
tcp_mem() {
    echo "$1: TCP mem $(awk '/^TCP:/ {for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1)}' /proc/net/sockstat) pages of tcp_mem $(cat /proc/sys/net/ipv4/tcp_mem | tr '\t' ' '), pressures $(awk '/^TcpExt:/ {if (!h) {for (i = 1; i <= NF; i++) if ($i == "TCPMemoryPressures") f = i; h = 1} else print $f}' /proc/net/netstat)" | tee -a "$OUT/summary.txt"
}

if [[ $STAGES == *mem100k* ]]; then
    for round in 1 2 3; do
        start_fresh_parleyd
        idle "mem100k-$round" "$PARLEYD_PID" 127.0.0.1:$PORT --data-dir "$OUT/data" \
            --connections 100000 --connect-rate 20000 --sources 8 --hold 2s
    done
    stop_parleyd
fi

if [[ $STAGES == *accept* ]]; then
    # Offered far above what the pair can do, so the setup rate is the ceiling.
    start_fresh_parleyd
    idle "accept-100k" "$PARLEYD_PID" 127.0.0.1:$PORT --data-dir "$OUT/data" \
        --connections 100000 --connect-rate 100000 --sources 8 --hold 1s
    stop_parleyd
fi

if [[ $STAGES == *max* ]]; then
    # Heartbeat and idle timeout far out: while the generator ramps up on the same two
    # cores it answers the server's pings late, and the default 75 s idle timeout would
    # measure the generator, not what parleyd holds.
    # ~28,000 ports per source address, some still in TIME_WAIT from earlier runs:
    # plenty of addresses, so the kernel finds a free port quickly.
    sources=$(( MAX_SESSIONS / 10000 + 1 ))
    # SO_REUSEPORT spreads connections by hash: one shard may get a few thousand more
    # than half (500,350 / 499,650 at 1,000,000). The margin covers that; past it a shard
    # answers 503 (parley_connections_refused_total) and parley-load retries.
    per_shard=$(( MAX_SESSIONS / 2 + 10000 ))
    # The previous stage's sockets still hold TCP buffer memory while they close: start
    # once it is back near idle (bounded), or tcp_mem's high mark comes early.
    for _ in $(seq 120); do
        pages=$(awk '/^TCP:/ {for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1)}' /proc/net/sockstat)
        [ "${pages:-0}" -lt 10000 ] && break
        sleep 1
    done
    tcp_mem "max-$MAX_SESSIONS before"
    # Closing a million sessions with 1001 takes the pair longer than the default 10 s
    # drain (216,687 of shard 0's were still open 4 s in): past it parleyd exits with
    # the rest open, which the kernel then closes, holding the port a while.
    start_fresh_parleyd --max-connections-per-shard "$per_shard" \
        --heartbeat-interval-ms 300000 --idle-timeout-ms 600000 --drain-timeout-ms 120000
    # Its own ping round offers every session's ping within one second (600,000/s at
    # 600,000 sessions), which measures the overload, so it is reported but the ping
    # figure is a probe's: 1,000 more sessions pinging once while the others are held.
    idle "max-$MAX_SESSIONS" "$PARLEYD_PID" 127.0.0.1:$PORT --data-dir "$OUT/data" \
        --connections "$MAX_SESSIONS" --connect-rate 10000 --sources "$sources" \
        --setup-timeout 5m --drain-timeout 2m --hold $((60 + MAX_SESSIONS / 10000))s &
    HOLDER=$!
    for _ in $(seq 600); do
        held=$(curl -s 127.0.0.1:$((PORT + 2))/metrics | awk '/^parley_sessions\{/ {s += $2} END {print s + 0}')
        [ "$held" -ge "$MAX_SESSIONS" ] && break
        sleep 1
    done
    # Past the holder's own ping round, which takes the pair about a second per 20,000
    # sessions to work off, and well before its hold ends.
    sleep $((15 + MAX_SESSIONS / 20000))
    idle "max-$MAX_SESSIONS-probe" "$PARLEYD_PID" 127.0.0.1:$PORT --data-dir "$OUT/data" \
        --connections 1000 --connect-rate 1000 --sources 2 --hold 1s --engine uring
    wait "$HOLDER" || true
    tcp_mem "max-$MAX_SESSIONS after"
    curl -s 127.0.0.1:$((PORT + 2))/metrics | grep -E '^parley_(connections_refused|connections_refused_unanswered|accept_errors)_total|^parley_kernel_tcp_mem_level|^parley_socket_rings' \
        | tee -a "$OUT/summary.txt"
    stop_parleyd
fi

if [[ $STAGES == *peer* ]]; then
    # Below the 20,000-descriptor limit, which nats-server (one descriptor per
    # connection) and parley-load's epoll engine both live under.
    PEER_SESSIONS=${PEER_SESSIONS:-18000}
    start_fresh_parleyd
    idle "peer-parleyd" "$PARLEYD_PID" 127.0.0.1:$PORT --data-dir "$OUT/data" \
        --connections "$PEER_SESSIONS" --connect-rate 10000 --sources 4 --hold 2s --engine epoll
    stop_parleyd
    start_nats
    idle "peer-nats" "$NATS_PID" 127.0.0.1:$((PORT + 11)) --protocol nats \
        --connections "$PEER_SESSIONS" --connect-rate 10000 --sources 4 --hold 2s --engine epoll
    stop_nats
fi
