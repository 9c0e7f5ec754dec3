# Sourced by the benches/load scripts: start and stop the servers under test.
# Needs OUT (the output directory) and PORT (parleyd's WebSocket port; admin is
# PORT + 2, QUIC PORT + 1, nats-server's WebSocket PORT + 11) set by the caller.

PARLEYD_PID=
# wait_port_free PORT: until a TCP socket can bind 127.0.0.1:PORT (at most 60 s). A
# parleyd that exited with sessions still open (a drain past drain_timeout_ms) leaves
# them to the kernel, which closes its io_uring instances after the process: their
# sockets can hold the address a while. A new parleyd on another data directory cannot
# know that one went before it (on the same one it waits: restart_after_kill_wait_ms).
wait_port_free() {
    python3 - "$1" <<'PY'
import socket, sys, time
port, start = int(sys.argv[1]), time.monotonic()
while True:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        break
    except OSError as error:
        if time.monotonic() - start > 60:
            sys.exit(f"port {port} still in use after 60 s: {error}")
        time.sleep(0.1)
    finally:
        s.close()
waited = time.monotonic() - start
if waited >= 0.1:
    print(f"port {port} was in use for {waited:.1f} s before this parleyd", file=sys.stderr)
PY
}

# start_parleyd [FLAG ...]: a fresh release parleyd (new data dir), once it listens.
start_parleyd() {
    stop_parleyd
    rm -rf "$OUT/data"
    restart_parleyd "$@"
}
# restart_parleyd [FLAG ...]: a release parleyd on the data dir as it is, once it listens
# (its recovery may take a while: at most 60 s).
restart_parleyd() {
    stop_parleyd
    wait_port_free "$PORT"
    "${CARGO_TARGET_DIR:-target}"/release/parleyd --data-dir "$OUT/data" --ws-listen 127.0.0.1:$PORT \
        --admin-listen 127.0.0.1:$((PORT + 2)) --quic-listen 127.0.0.1:$((PORT + 1)) \
        "$@" >"$OUT/parleyd.log" 2>&1 &
    PARLEYD_PID=$!
    for _ in $(seq 600); do
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
