#!/usr/bin/env bash
# Builds and runs parleyd, from a bare machine of this kind: installs the build packages
# (tools/install-deps.sh build), builds the release binaries (parleyd, parley, parley-load,
# parley-wal), then runs parleyd with the arguments given; with none, on the safe local
# defaults (loopback listeners, data in ./parley-data; docs/operations.md).
#
#   tools/run.sh                      build, then run parleyd
#   tools/run.sh --config FILE ...    build, then run parleyd with these flags
#   tools/run.sh --build-only         build, and stop (installing under systemd: operations.md)
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-deps.sh build
echo "== cargo build --release (parleyd and the tools)"
cargo build --release -p parley-gateway -p parley-tools
if [ "${1:-}" = "--build-only" ]; then
    echo "built: target/release/parleyd target/release/parley target/release/parley-load target/release/parley-wal"
    exit 0
fi
# exec: parleyd is the process a supervisor or Ctrl-C signals, so SIGTERM drains it.
exec target/release/parleyd "$@"
