# Sourced by the benches/load scripts: start and stop the servers under test.
# Needs OUT (the output directory) and PORT (parleyd's WebSocket port; admin is
# PORT + 2, QUIC PORT + 1, nats-server's WebSocket PORT + 11) set by the caller.

PARLEYD_PID=
# start_parleyd [FLAG ...]: a fresh release parleyd (new data dir), once it listens.
start_parleyd() {
    stop_parleyd
    rm -rf "$OUT/data"
    "${CARGO_TARGET_DIR:-target}"/release/parleyd --data-dir "$OUT/data" --ws-listen 127.0.0.1:$PORT \
        --admin-listen 127.0.0.1:$((PORT + 2)) --quic-listen 127.0.0.1:$((PORT + 1)) \
        "$@" >"$OUT/parleyd.log" 2>&1 &
    PARLEYD_PID=$!
    for _ in $(seq 100); do
        grep -q listening "$OUT/parleyd.log" && return 0
        sleep 0.1
    done
    echo "parleyd did not start" >&2
    cat "$OUT/parleyd.log" >&2
    exit 1
}
stop_parleyd() {
    if [ -n "$PARLEYD_PID" ]; then
        kill "$PARLEYD_PID" 2>/dev/null || true
        wait "$PARLEYD_PID" 2>/dev/null || true
        PARLEYD_PID=
    fi
}

NATS_PID=
# start_nats: nats-server with its WebSocket listener on PORT + 11, once it is ready.
start_nats() {
    cat >"$OUT/nats.conf" <<CONF
listen: 127.0.0.1:$((PORT + 10))
max_connections: 100000
websocket {
  listen: "127.0.0.1:$((PORT + 11))"
  no_tls: true
  compression: false
}
CONF
    nats-server -c "$OUT/nats.conf" >"$OUT/nats.log" 2>&1 &
    NATS_PID=$!
    for _ in $(seq 100); do
        grep -q "Server is ready" "$OUT/nats.log" && return 0
        sleep 0.1
    done
}
stop_nats() {
    if [ -n "$NATS_PID" ]; then
        kill "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
        NATS_PID=
    fi
}
trap 'stop_parleyd; stop_nats' EXIT
