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
LOAD=target/release/parley-load
PORT=18270

source benches/load/daemons.sh
# A fresh port per daemon: the previous run's TIME_WAIT connections share no 4-tuple
# with this one's, so they cannot slow its connects.
start_fresh_parleyd() {
    stop_parleyd
    PORT=$((PORT + 20))
    start_parleyd "$@"
}

# idle NAME PID TARGET ARGS...: one idle run, its one-line summary appended.
idle() {
    local name=$1 pid=$2 target=$3
    shift 3
    echo "== $name: parley-load idle --target $target $*" | tee -a "$OUT/commands.txt"
    # A failed run still leaves its report (and exit status 1 or 2): summarise it.
    "$LOAD" idle --target "$target" --pid "$pid" --json --quiet "$@" >"$OUT/$name.json" || true
    python3 - "$OUT/$name.json" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
lat = {l["name"]: l for l in r["latencies"]}
c, s, e = r["connections"], r["server"] or {}, r["extra"]
ping = lat.get("ping", {})
print(f'{sys.argv[2]}: {c["established"]}/{c["target"]} sessions in {c["setup_s"]:.1f} s '
      f'({e.get("connect_per_s", 0):,.0f}/s, {c["failed_attempts"]} failed), '
      f'server RSS {s.get("rss_kib_before", 0):,} -> {s.get("rss_kib_after", 0):,} KiB = '
      f'{s.get("rss_bytes_per_session", 0):,.0f} B/session, ping p50 {ping.get("p50_us", 0)/1000:.2f} ms '
      f'p99 {ping.get("p99_us", 0)/1000:.2f} ms, generator {e.get("generator_rss_bytes_per_session", 0):,.0f} B/session, '
      f'errors {r["errors"]}')
PY
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
    per_shard=$(( MAX_SESSIONS / 2 + 10000 ))
    start_fresh_parleyd --max-connections-per-shard "$per_shard" \
        --heartbeat-interval-ms 300000 --idle-timeout-ms 600000
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
    wait "$HOLDER"
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
