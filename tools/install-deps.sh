#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks, through apt (as root, or with sudo) and pip.
#
#   tools/install-deps.sh build   cmake and libclang-dev: quiche builds BoringSSL with cmake,
#                                 and boring-sys's bindgen loads libclang at build time
#   tools/install-deps.sh test    the above, plus headless Chromium (tools/tests/report_render.rs)
#                                 and the Python client suite's packages (websockets, aioquic, pytest)
#
# `tools/install-deps.sh probe` prints the build packages that are missing (nothing when all are
# there) and installs nothing; tools/test-setup.sh uses it to check that a machine is bare.
set -euo pipefail
cd "$(dirname "$0")/.."

# bindgen (through clang-sys) dlopens libclang.so or libclang-<N>.so from LIBCLANG_PATH or the
# usual llvm directories, and needs clang's own headers beside it. libclang-cpp<N> (preinstalled
# here) matches `libclang*.so*` but is neither, so the probe asks dpkg for the development
# package that brings both, unless LIBCLANG_PATH names a directory that holds the library.
libclang_present() {
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        compgen -G "$LIBCLANG_PATH/libclang.so*" >/dev/null || compgen -G "$LIBCLANG_PATH/libclang-[0-9]*.so*" >/dev/null
        return
    fi
    command -v dpkg-query >/dev/null 2>&1 || return 1
    dpkg-query -W -f='${Package} ${db:Status-Status}\n' 'libclang*-dev' 2>/dev/null |
        grep -E '^libclang(-[0-9]+)?-dev installed$' >/dev/null
}

missing_build_packages() {
    local missing=""
    command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
    libclang_present || missing="$missing libclang-dev"
    echo "${missing# }"
}

apt_install() {
    local sudo_if_needed=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "install-deps: need root or sudo to install: $*" >&2
            exit 1
        }
        sudo_if_needed="sudo"
    fi
    command -v apt-get >/dev/null 2>&1 || {
        echo "install-deps: no apt-get on this machine; install these yourself: $*" >&2
        exit 1
    }
    echo "== installing with apt: $*"
    $sudo_if_needed apt-get update -qq
    $sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

install_build() {
    local missing
    missing=$(missing_build_packages)
    # Word splitting is wanted: one package per word.
    # shellcheck disable=SC2086
    [ -z "$missing" ] || apt_install $missing
    missing=$(missing_build_packages)
    if [ -n "$missing" ]; then
        echo "install-deps: still missing after apt: $missing" >&2
        exit 1
    fi
}

install_test() {
    install_build
    # tools/tests/report_render.rs screenshots parley-load's HTML report to check the plots
    # really draw, and fails (rather than skips) without Chromium. Recommends bring the fonts.
    command -v chromium >/dev/null 2>&1 || apt_install chromium
    if ! python3 -c 'import websockets, pytest, aioquic' 2>/dev/null; then
        echo "== installing the Python test clients (websockets, aioquic, pytest)"
        python3 -m pip install -q --disable-pip-version-check -r gateway/tests/python/requirements.txt
    fi
}

case "${1:-}" in
    build) install_build ;;
    test) install_test ;;
    probe) missing_build_packages ;;
    *)
        echo "usage: tools/install-deps.sh build|test|probe" >&2
        exit 2
        ;;
esac
