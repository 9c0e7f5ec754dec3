#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (Rust, against the
# real parleyd), and the independent-client suite (Python websockets, aioquic). Installs what it
# needs that a fresh machine lacks (tools/install-deps.sh test).
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-deps.sh test

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== independent client suite (Python websockets and aioquic)"
cargo build -q -p parley-gateway
python3 -m pytest -q -p no:cacheprovider gateway/tests/python
