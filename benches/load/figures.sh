#!/usr/bin/env bash
# The parley-load figures of docs/BENCHMARKS.md, in one run on one machine:
# durable 1:1 (a rate ladder, then 25/50/90% of the sustained rate), group fan-out,
# a 10,000-session reconnect storm, and nats-server as the peer, each against a
# fresh release parleyd (2 shards, one per core) with the generator on the same box.
#
#   benches/load/figures.sh [OUT_DIR]        # default /tmp/parley-figures
#   STAGES="ladder storm" benches/load/figures.sh   # only some stages
#
# Every run's full report is OUT_DIR/<name>.json (and .html); summary.txt has one line
# per run. About 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/parley-figures}
STAGES=${STAGES:-"ladder percentiles group storm nats"}
mkdir -p "$OUT"
cargo build -q --release -p parley-gateway -p parley-tools
LOAD=target/release/parley-load
PORT=18170
# Per-session rate limiting is a defence against abusive clients, not a capacity
# limit: a load run's sessions send faster than the default 100/s, so raise it.
export PARLEY_RATE_LIMIT_PER_SEC=1000000

source benches/load/daemons.sh

# run NAME SCENARIO ARGS...: one parley-load run against parleyd; exit status 2
# (verification failed) is recorded, not fatal.
run() {
    local name=$1
    shift
    echo "== $name: parley-load $*" | tee -a "$OUT/commands.txt"
    "$LOAD" "$@" --target 127.0.0.1:$PORT --data-dir "$OUT/data" --pid "$PARLEYD_PID" \
        --json --quiet --report "$OUT/$name.html" >"$OUT/$name.json" || true
    summarize "$name"
}
summarize() {
    python3 - "$OUT/$1.json" "$1" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
lat = {l["name"]: l for l in r["latencies"]}
def l(name):
    x = lat.get(name)
    return f"{x['p50_us']/1000:.2f}/{x['p99_us']/1000:.2f}/{x['p999_us']/1000:.2f}" if x else "-"
t = r["throughput"]; v = r["verification"]; s = r.get("server") or {}; g = r["generator"]
errors = sum(r["errors"].values())
print(f"{sys.argv[2]:<24} offered {t['offered_per_s']:>9.0f}/s acked {t['acked_per_s']:>9.0f}/s "
      f"delivered {t['delivered_per_s']:>10.0f}/s  e2e ms p50/p99/p99.9 {l('e2e'):<20} "
      f"ack {l('ack'):<20} errors {errors:<6} verified {'ok' if v['ok'] else 'FAILED' if v['checked'] else '-'} "
      f"cpu server {s.get('cpu_s', 0):.2f}s gen {g['cpu_s']:.2f}s extra {json.dumps(r['extra'])}")
PY
}

COMMON="--warmup 2s --duration 10s --sources 8"

if [[ $STAGES == *ladder* ]]; then
    for conns in 1000 10000; do
        start_parleyd
        for rate in 10000 20000 30000 40000 50000 60000; do
            run "1to1-c$conns-r$rate" chat-1to1 --connections $conns --rate $rate $COMMON
        done
    done
fi

if [[ $STAGES == *percentiles* ]]; then
    # SUSTAINED: the ladder's highest rate with acked >= 99% of offered, no errors and
    # e2e p99 under 100 ms (measured in the ladder stage; pass it in to re-run).
    SUSTAINED=${SUSTAINED:?set SUSTAINED to the sustained rate from the ladder}
    for conns in 1000 10000; do
        start_parleyd
        for pct in 25 50 90; do
            rate=$((SUSTAINED * pct / 100))
            run "1to1-c$conns-p$pct" chat-1to1 --connections $conns --rate $rate $COMMON
        done
    done
fi

if [[ $STAGES == *group* ]]; then
    start_parleyd
    for rate in 2000 4000 8000; do
        run "group10-r$rate" group --connections 1000 --group-size 10 --senders 1 --rate $rate $COMMON
    done
    start_parleyd
    for rate in 250 500 1000 2000; do
        run "group100-r$rate" group --connections 1000 --group-size 100 --senders 1 --rate $rate $COMMON
    done
    start_parleyd
    for rate in 50 100 200; do
        run "group1000-r$rate" group --connections 2000 --group-size 1000 --senders 1 --rate $rate $COMMON
    done
fi

if [[ $STAGES == *storm* ]]; then
    start_parleyd
    run "storm-10k" reconnect-storm --connections 10000 --drop 100 --rate 5000 \
        --storm-at 3s --jitter 1s --warmup 1s --duration 15s --sources 8
fi

if [[ $STAGES == *nats* ]]; then
    stop_parleyd
    start_nats
    for rate in 10000 20000 40000 80000; do
        name="nats-1to1-c1000-r$rate"
        echo "== $name: parley-load chat-1to1 --protocol nats --connections 1000 --rate $rate $COMMON" | tee -a "$OUT/commands.txt"
        "$LOAD" chat-1to1 --protocol nats --target 127.0.0.1:$((PORT + 11)) --pid "$NATS_PID" \
            --connections 1000 --rate $rate $COMMON --json --quiet >"$OUT/$name.json" || true
        summarize "$name"
    done
    stop_nats
fi
echo "== summary: $OUT/summary.txt"
