#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (Rust, against the
# real parleyd), and the independent-client suite (Python websockets, aioquic). Installs what it
# needs that a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

# quiche builds BoringSSL with cmake, and its boring-sys bindings need libclang.
missing=""
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || missing="$missing libclang-dev"
if [ -n "$missing" ]; then
    echo "== installing build packages:$missing (quiche's BoringSSL)"
    sudo_if_needed=""
    [ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq
    $sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

# Headless Chromium: tools/tests/report_render.rs screenshots parley-load's HTML report
# to check the plots really draw, and fails (rather than skips) without it.
if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing chromium (headless screenshots of the load report)"
    sudo_if_needed=""
    [ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq
    # With recommends: they bring the fonts the report's text is drawn in.
    $sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

if ! python3 -c 'import websockets, pytest, aioquic' 2>/dev/null; then
    echo "== installing the Python test clients (websockets, aioquic, pytest)"
    python3 -m pip install -q --disable-pip-version-check -r gateway/tests/python/requirements.txt
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== independent client suite (Python websockets and aioquic)"
cargo build -q -p parley-gateway
python3 -m pytest -q -p no:cacheprovider gateway/tests/python
