#!/usr/bin/env bash
# Tests the set-up a new user goes through: clones this repository's HEAD into a temporary
# directory and runs the README's two Quick-start commands there, as the README writes them
# (read from the clone's README, not copied here), each on a machine without the build
# packages (cmake, libclang-dev) and without LIBCLANG_PATH:
#
#   1. the run command: it must install what the build needs, build, and start parleyd on
#      the safe local defaults; passes when http://127.0.0.1:7072/readyz answers 200 and
#      parleyd then drains on SIGTERM with exit status 0;
#   2. the test command: the whole suite, from a bare machine again.
#
#   tools/test-setup.sh [--remove-build-packages] [--keep]
#
# --remove-build-packages  where cmake or libclang's development packages are installed, remove
#                          them (apt-get remove) before each command, so that it starts bare.
#                          Without it the script refuses to run on a machine that has them.
# --keep                   keep the temporary clone (and its target directory) afterwards.
#
# Environment: SETUP_BUILD_TIMEOUT_S (default 2700) bounds the run command's wait for /readyz.
set -euo pipefail
trap 'echo "setup: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
repo=$(cd "$(dirname "$0")/.." && pwd)

remove_packages=0
keep=0
for arg in "$@"; do
    case "$arg" in
        --remove-build-packages) remove_packages=1 ;;
        --keep) keep=1 ;;
        *)
            echo "usage: tools/test-setup.sh [--remove-build-packages] [--keep]" >&2
            exit 2
            ;;
    esac
done
build_timeout_s=${SETUP_BUILD_TIMEOUT_S:-2700}
readyz=http://127.0.0.1:7072/readyz

# Nothing the developer's shell set may stand in for the set-up under test.
unset LIBCLANG_PATH CARGO_TARGET_DIR

work=$(mktemp -d /tmp/parley-setup.XXXXXX)
run_pgid=""
cleanup() {
    if [ -n "$run_pgid" ]; then kill -KILL -- "-$run_pgid" 2>/dev/null || true; fi
    if [ "$keep" -eq 1 ]; then echo "setup: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

fail() {
    echo "setup: FAILED: $*" >&2
    exit 1
}

# The build packages this machine has, by the same probe the commands use.
installed_build_packages() {
    command -v dpkg-query >/dev/null 2>&1 || return 0
    # dpkg-query exits 1 when a pattern matches no package, which here is the good case.
    { dpkg-query -W -f='${Package} ${db:Status-Status}\n' 'cmake' 'cmake-data' 'libclang*' 2>/dev/null || true; } |
        awk '$2 == "installed" && $1 !~ /^libclang-cpp/ { print $1 }'
}

make_bare() {
    local present
    present=$(installed_build_packages | tr '\n' ' ')
    if [ -n "${present// /}" ]; then
        [ "$remove_packages" -eq 1 ] ||
            fail "build packages are installed ($present); run on a machine without them, or pass --remove-build-packages"
        echo "== setup: removing the build packages so the command starts bare: $present"
        local sudo_if_needed=""
        [ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"
        # shellcheck disable=SC2086
        $sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq $present >/dev/null
    fi
    [ "$("$clone/tools/install-deps.sh" probe)" = "cmake libclang-dev" ] ||
        fail "the machine is not bare after removal: probe says missing='$("$clone/tools/install-deps.sh" probe)'"
    ! command -v cmake >/dev/null 2>&1 || fail "cmake is still on PATH at $(command -v cmake)"
}

readyz_status() {
    python3 - "$readyz" <<'EOF'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
EOF
}

# The README's Quick-start commands: the lines of its first ```sh block under "## Quick start"
# whose comments say what they do. A README that no longer has them fails here, loudly.
readme_command() {
    local comment=$1
    awk -v want="$comment" '
        /^## Quick start/ { in_section = 1; next }
        /^## / && in_section { exit }
        in_section && /^```sh/ { in_block = 1; next }
        in_block && /^```/ { exit }
        in_block && index($0, "# " want) {
            sub(/[ \t]*#.*/, ""); print; exit
        }' "$clone/README.md"
}

clone="$work/parley"
commit=$(git -C "$repo" rev-parse HEAD)
git -C "$repo" diff --quiet HEAD || echo "setup: note: uncommitted changes in $repo are not tested (HEAD $commit only)"
echo "== setup: cloning $repo at $commit into $clone"
git clone -q "$repo" "$clone"
git -C "$clone" checkout -q "$commit"

run_cmd=$(readme_command "run parleyd")
test_cmd=$(readme_command "run the whole test suite")
[ -n "$run_cmd" ] || fail "README.md's Quick start has no command commented '# run parleyd ...'"
[ -n "$test_cmd" ] || fail "README.md's Quick start has no command commented '# run the whole test suite'"
echo "setup: run command:  $run_cmd"
echo "setup: test command: $test_cmd"

# 1. The run command, from bare: set-up, build, parleyd on the local defaults.
make_bare
[ "$(readyz_status)" = 0 ] || fail "something already answers $readyz; stop it first"
started=$(date +%s)
(cd "$clone" && exec setsid bash -c "$run_cmd") >"$work/run.log" 2>&1 &
run_pid=$!
run_pgid=$run_pid
last_report=$started
while :; do
    status=$(readyz_status)
    [ "$status" = 200 ] && break
    now=$(date +%s)
    kill -0 "$run_pid" 2>/dev/null || {
        tail -n 40 "$work/run.log" >&2
        fail "the run command exited before $readyz answered 200 (last status $status)"
    }
    [ $((now - started)) -lt "$build_timeout_s" ] || {
        tail -n 40 "$work/run.log" >&2
        fail "no 200 from $readyz within ${build_timeout_s}s"
    }
    if [ $((now - last_report)) -ge 30 ]; then
        echo "setup: waiting for $readyz ($((now - started)) s): $(tail -n 1 "$work/run.log" | cut -c1-150)"
        last_report=$now
    fi
    sleep 1
done
run_s=$(($(date +%s) - started))
echo "setup: $readyz answered 200 after ${run_s} s; stopping parleyd with SIGTERM"
grep -m1 'listening' "$work/run.log" || true
kill -TERM -- "-$run_pgid"
stop_status=0
wait "$run_pid" || stop_status=$?
run_pgid=""
[ "$stop_status" -eq 0 ] || {
    tail -n 20 "$work/run.log" >&2
    fail "parleyd exited with status $stop_status on SIGTERM, not 0 (a clean drain)"
}

# 2. The test command, from bare again.
make_bare
started=$(date +%s)
(cd "$clone" && bash -c "$test_cmd") || fail "the test command failed (exit status $?)"
test_s=$(($(date +%s) - started))
echo "setup: OK: run command ready in ${run_s} s, test command passed in ${test_s} s (commit $commit)"
