#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (Rust, against the
# real parleyd), and the independent-client suite (Python websockets). Installs what it
# needs that a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the build needs go here as they arrive (cmake and libclang-dev for
# quiche's BoringSSL once QUIC lands); today the build needs none beyond the toolchain.

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

if ! python3 -c 'import websockets, pytest' 2>/dev/null; then
    echo "== installing the Python test client (websockets, pytest)"
    python3 -m pip install -q --disable-pip-version-check -r gateway/tests/python/requirements.txt
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== independent client suite (Python websockets)"
cargo build -q -p parley-gateway
python3 -m pytest -q -p no:cacheprovider gateway/tests/python
