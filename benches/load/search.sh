#!/usr/bin/env bash
# Search under chat load (docs/BENCHMARKS.md, "Search"): a release parleyd (2 shards, one
# per core) and parley-load on the same two cores.
#
#   benches/load/search.sh [OUT_DIR]          # default /tmp/parley-search
#   RATE=15000 FILL_SECONDS=60 benches/load/search.sh
#
# - visible: with default settings and no other load, how soon each of 200 messages is
#   found by a search after its ok (benches/load/search_visible.py).
# - steady: durable 1:1 chat at RATE (default 15,000/s, half the sustained 30,000/s of
#   BENCHMARKS.md) with search off and on, twice: the chat's latency each way, and with
#   search on how many messages each shard's indexer indexed per second and how far the
#   index trailed the log (/metrics sampled every 500 ms).
# - rebuild: FILL_SECONDS of chat at 30,000/s with search off; then a restart with search
#   on (the index is built from the whole log) while chat runs at RATE: each shard's
#   indexing rate while it catches up, and the time to catch up (REBUILD_NICE: the
#   catch-up's nice value, search_rebuild_nice, default 10).
#
# OUT_DIR/summary.txt has the figures; OUT_DIR/*.json the reports, *.samples the metrics.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/parley-search}
RATE=${RATE:-15000}
FILL_SECONDS=${FILL_SECONDS:-60}
STAGES=${STAGES:-"visible steady rebuild"}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
cargo build -q --release -p parley-gateway -p parley-tools
LOAD=target/release/parley-load
PORT=18270
ADMIN=$((PORT + 2))
export PARLEY_RATE_LIMIT_PER_SEC=1000000

source benches/load/daemons.sh

# sample FILE: /metrics every 500 ms into FILE (one JSON line each) until killed.
sample() {
    python3 - "$ADMIN" "$1" <<'PY' &
import json, sys, time, urllib.request
admin, path = sys.argv[1], sys.argv[2]
names = ("parley_search_docs_indexed_total", "parley_search_index_lag_records",
         "parley_search_index_lag_ms", "parley_search_indexed_lsn", "parley_search_index_bytes")
with open(path, "w") as out:
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
        except Exception:
            time.sleep(0.5)
            continue
        row = {"t": time.monotonic()}
        for line in text.splitlines():
            for name in names:
                if line.startswith(name + "{"):
                    shard = line.split('shard="')[1].split('"')[0]
                    row[f"{name}.{shard}"] = float(line.rsplit(" ", 1)[1])
        out.write(json.dumps(row) + "\n")
        out.flush()
        time.sleep(0.5)
PY
    SAMPLER=$!
}

# run NAME ARGS...: one parley-load run; its summary line.
run() {
    local name=$1
    shift
    echo "== $name: parley-load $*" | tee -a "$OUT/commands.txt"
    "$LOAD" "$@" --target 127.0.0.1:$PORT --data-dir "$OUT/data" --pid "$PARLEYD_PID" \
        --json --quiet >"$OUT/$name.json" || true
    python3 - "$OUT/$name.json" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
lat = {l["name"]: l for l in r["latencies"]}
e = lat["e2e"]; t = r["throughput"]; v = r["verification"]
print(f"{sys.argv[2]:<22} offered {t['offered_per_s']:>7.0f}/s acked {t['acked_per_s']:>7.0f}/s "
      f"e2e ms p50 {e['p50_us']/1000:.2f} p99 {e['p99_us']/1000:.2f} p99.9 {e['p999_us']/1000:.2f} "
      f"errors {sum(r['errors'].values())} verified {'ok' if v['ok'] else 'FAILED'} "
      f"server cpu {(r.get('server') or {}).get('cpu_s', 0):.1f}s")
PY
}

# indexing NAME SAMPLES: per shard, messages indexed per second over the samples while it
# trailed (rebuild) or over all of them (steady), and the lag.
indexing() {
    python3 - "$2" "$1" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "parley_search_docs_indexed_total.0" in r]
for shard in ("0", "1"):
    docs = [(r["t"], r[f"parley_search_docs_indexed_total.{shard}"], r[f"parley_search_index_lag_records.{shard}"],
             r[f"parley_search_index_lag_ms.{shard}"]) for r in rows]
    behind = [d for d in docs if d[2] > 10000]
    span = behind if len(behind) >= 2 else docs
    rate = (span[-1][1] - span[0][1]) / max(span[-1][0] - span[0][0], 1e-9)
    lags = sorted(d[3] for d in docs)
    p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
    if not behind:
        caught = "never behind by over 10,000 records; "
    else:
        after = [d for d in docs if d[0] > behind[-1][0]]
        caught = (f"caught up {after[0][0] - docs[0][0]:.1f} s into the run; " if after
                  else "not caught up within the run; ")
    how = "while catching up" if len(behind) >= 2 else "over the run"
    print(f"{sys.argv[2]:<22} shard {shard}: indexed {rate:>8.0f} messages/s ({how}; "
          f"{span[-1][1]:.0f} in all); lag ms p50 {p(0.5):.0f} p99 {p(0.99):.0f} max {lags[-1]:.0f}; "
          f"{caught}index {rows[-1][f'parley_search_index_bytes.{shard}'] / 2**20:.0f} MiB")
PY
}

COMMON="--connections 1000 --warmup 2s --duration 10s --sources 8"

if [[ $STAGES == *visible* ]]; then
    start_parleyd --shards 2
    python3 benches/load/search_visible.py --port "$PORT" --data-dir "$OUT/data" -n 200 |
        tee -a "$OUT/summary.txt"
fi

if [[ $STAGES == *steady* ]]; then
    # Search off and on, twice over, so that the machine's drift shows.
    for conf in ${CONFS:-off on off on}; do
        case $conf in
            off) start_parleyd --shards 2 --search false ;;
            on) start_parleyd --shards 2 --search true
                sample "$OUT/steady-$conf.samples" ;;
        esac
        run "steady-$conf" chat-1to1 --rate "$RATE" $COMMON
        if [ "$conf" != off ]; then
            kill "$SAMPLER"
            indexing "steady-$conf" "$OUT/steady-$conf.samples"
        fi
    done
fi

if [[ $STAGES == *rebuild* ]]; then
    start_parleyd --shards 2 --search false
    run "fill" chat-1to1 --rate 30000 --connections 1000 --warmup 2s --duration "${FILL_SECONDS}s" --sources 8
    restart_parleyd --shards 2 --search true --search-rebuild-nice "${REBUILD_NICE:-10}"
    sample "$OUT/rebuild.samples"
    run "rebuild-chat" chat-1to1 --rate "$RATE" --connections 1000 --warmup 2s --duration 60s --sources 8
    kill "$SAMPLER"
    indexing "rebuild" "$OUT/rebuild.samples"
    grep -E "search index (created|rebuilt|caught up)" "$OUT/parleyd.log" | tee -a "$OUT/summary.txt" || true
fi
stop_parleyd
echo "summary: $OUT/summary.txt"
