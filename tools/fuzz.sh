#!/usr/bin/env bash
# Runs Parley's fuzz targets (tools/fuzz, cargo-fuzz and libFuzzer with AddressSanitizer)
# for a bounded time each, on a copy of the checked-in corpora, and prints each target's
# executions and executions per second. docs/fuzzing.md describes the targets.
#
#   tools/fuzz.sh TARGET SECONDS     one target (a file of tools/fuzz/fuzz_targets/), or
#                                    several, comma-separated
#   tools/fuzz.sh all SECONDS        every target
#
# Needs only the stable toolchain: cargo-fuzz passes nightly flags (-Zsanitizer), which
# stable accepts under RUSTC_BOOTSTRAP=1, set here. Installs cargo-fuzz (`cargo install
# --locked`) and the build packages (tools/install-deps.sh build) when they are missing.
#
# A crash, a leak, a timeout or an allocation over the limits fails the script; the
# input that caused it stays in the run's directory, whose path is printed, and can be
# replayed on stable with the harness's run_input test (docs/fuzzing.md). The corpora in
# the checkout are never changed: inputs the fuzzer finds stay in the run's copy.
#
# Environment: FUZZ_TARGET_DIR (default tools/fuzz/target); FUZZ_PARALLEL targets at a
# time (default: one per CPU); FUZZ_KEEP=1 keeps the run's directory (logs, the grown
# corpus copies) after a clean run too.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() {
    echo "usage: tools/fuzz.sh TARGET[,TARGET...]|all SECONDS" >&2
    exit 2
}
[ $# -eq 2 ] || usage
which=$1
seconds=$2
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || usage

all_targets=$(cd tools/fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//' | sort)
if [ "$which" = all ]; then
    targets=$all_targets
else
    targets=${which//,/ }
    for target in $targets; do
        grep -qx -- "$target" <<<"$all_targets" || {
            echo "fuzz: no target '$target'; targets: $(echo $all_targets)" >&2
            exit 2
        }
    done
fi

# Stable Rust with the nightly flags cargo-fuzz passes; a toolchain named by the caller wins.
export RUSTUP_TOOLCHAIN=${RUSTUP_TOOLCHAIN:-stable}
export RUSTC_BOOTSTRAP=1
target_dir=${FUZZ_TARGET_DIR:-$repo/tools/fuzz/target}

tools/install-deps.sh build
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

# Per target: the longest input (segment files are larger than anything else), and the
# memory one run may hold (the whole process, and any one allocation).
max_len() {
    case $1 in
        wal_recovery) echo 65536 ;;
        quic | ws | session) echo 16384 ;;
        *) echo 8192 ;;
    esac
}
RSS_LIMIT_MB=2048
MALLOC_LIMIT_MB=256
# An input that runs this long is a hang.
INPUT_TIMEOUT_S=10

echo "== building the fuzz targets (AddressSanitizer, debug assertions)"
build_started=$(date +%s)
cargo fuzz build --fuzz-dir tools/fuzz --target-dir "$target_dir"
echo "fuzz: built in $(($(date +%s) - build_started)) s"

run=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-run.XXXXXX")

# One target's run: its corpus copy, libFuzzer's log, and a result line
# (executions, exec/s, new units, peak RSS, exit status) in $run/<target>.result.
fuzz_one() {
    local target=$1 corpus="$run/corpus/$1" artifacts="$run/artifacts/$1" log="$run/$1.log"
    mkdir -p "$corpus" "$artifacts"
    for source in tools/fuzz/corpus/"$target" tools/fuzz/regressions/"$target"; do
        if [ -d "$source" ]; then
            find "$source" -maxdepth 1 -type f ! -name README.md -exec cp -t "$corpus" {} +
        fi
    done
    local status=0
    cargo fuzz run --fuzz-dir tools/fuzz --target-dir "$target_dir" "$target" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 -max_len="$(max_len "$target")" \
        -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$MALLOC_LIMIT_MB" \
        -timeout="$INPUT_TIMEOUT_S" -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    stat() { grep -h "^stat::$1:" "$log" | awk '{ print $2 }' | tail -1; }
    echo "$(stat number_of_executed_units) $(stat average_exec_per_sec) $(stat new_units_added) $(stat peak_rss_mb) $status" \
        >"$run/$target.result"
}

# Targets run side by side, one per CPU: each gets its SECONDS of a core of its own.
parallel=${FUZZ_PARALLEL:-$(nproc 2>/dev/null || echo 1)}
running=0
for target in $targets; do
    if [ "$running" -ge "$parallel" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    echo "== fuzzing $target for ${seconds}s"
    fuzz_one "$target" &
    running=$((running + 1))
done
wait || true

failed=()
summary=()
for target in $targets; do
    read -r execs per_sec added rss status <"$run/$target.result" || status=missing
    reproducers=$(find "$run/artifacts/$target" -type f 2>/dev/null | sort)
    result=ok
    if [ "$status" != 0 ] || [ -n "$reproducers" ]; then
        result=FAILED
        failed+=("$target")
        echo "== $target FAILED (exit status $status); the end of $run/$target.log:"
        grep -E -A1 "^(==[0-9]+==|thread '|SUMMARY|Test unit written)|panicked|out-of-memory|malloc\(" \
            "$run/$target.log" | head -20 || true
        echo "reproducer(s):"
        for file in $reproducers; do echo "  $file"; done
        echo "replay on stable: FUZZ_TARGET=$target FUZZ_INPUT=<file> cargo test -p parley-fuzz-harness --test corpus -- --ignored run_input"
    fi
    summary+=("$(printf '%-14s %12s %10s %9s %7s  %s' "$target" "${execs:-?}" "${per_sec:-?}" "${added:-?}" "${rss:-?}" "$result")")
done

echo "== fuzz summary: ${seconds}s per target, $parallel at a time (logs and corpus copies in $run)"
printf '%-14s %12s %10s %9s %7s  %s\n' target executions exec/s new_units rss_mb result
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (reproducers under $run/artifacts)" >&2
    exit 1
fi
if [ "${FUZZ_KEEP:-0}" != 1 ]; then
    rm -rf "$run"
fi
echo "fuzz: OK"
