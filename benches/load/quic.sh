#!/usr/bin/env bash
# QUIC against WebSocket on one parleyd (2 shards): 1:1 throughput and latency, memory per
# idle connection, and handshakes per second. Reproduces the QUIC figures of
# docs/BENCHMARKS.md. Runs alternate WS and QUIC so both see the same machine state.
#   benches/load/quic.sh [OUT_DIR]      (default /tmp/parley-quic-bench)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/parley-quic-bench}
PORT=${PORT:-19070}
rm -rf "$OUT" && mkdir -p "$OUT"
cargo build -q --release -p parley-gateway -p parley-tools
LOAD=target/release/parley-load

start() { # start NAME [parleyd flags...]: a fresh daemon, its pid in $PID
    local name=$1; shift
    target/release/parleyd --data-dir "$OUT/data-$name" --ws-listen 127.0.0.1:$PORT \
        --quic-listen 127.0.0.1:$((PORT + 1)) --admin-listen 127.0.0.1:$((PORT + 2)) \
        --jwt-secret bench --shards 2 --rate-limit-per-sec 100000 "$@" >"$OUT/parleyd-$name.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$OUT/parleyd-$name.log" && return; sleep 0.1; done
    echo "parleyd did not start"; exit 1
}
stop() { kill "$PID"; wait "$PID" || true; }
ws() { echo "--target 127.0.0.1:$PORT"; }
quic() { echo "--quic --target 127.0.0.1:$((PORT + 1))"; }

start chat
for round in 1 2 3; do
    for rate in 10000 20000 30000; do
        for proto in ws quic; do
            echo "== chat-1to1 $proto $rate (round $round)"
            $LOAD chat-1to1 $($proto) --secret bench --connections 1000 --rate $rate \
                --warmup 2s --duration 10s --pid "$PID" --quiet --json >"$OUT/chat-$proto-$rate-$round.json"
        done
    done
done
stop

for proto in ws quic; do
    start "idle-$proto"
    echo "== idle $proto 10000"
    $LOAD idle $($proto) --secret bench --connections 10000 --connect-rate 3000 \
        --duration 5s --pid "$PID" --quiet --json >"$OUT/idle-$proto.json"
    stop
done

for retry in true false; do
    start "handshake-$retry" --quic-retry "$retry"
    echo "== handshakes quic retry=$retry"
    $LOAD idle $(quic) --secret bench --connections 10000 --connect-rate 20000 \
        --duration 2s --setup-timeout 60s --quiet --json >"$OUT/handshake-quic-retry-$retry.json"
    stop
done
start handshake-ws
echo "== handshakes ws"
$LOAD idle $(ws) --secret bench --connections 10000 --connect-rate 20000 \
    --duration 2s --setup-timeout 60s --quiet --json >"$OUT/handshake-ws.json"
stop
echo "results in $OUT"
