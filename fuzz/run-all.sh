#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), starting from the checked-in seed
# corpus (corpus/<target>/, never written to: new inputs go to target/corpus-work/<target>/),
# and fails on the first crash, leak of memory past the RSS limit, or hang. A failing input is
# saved under artifacts/<target>/ and the command to reproduce it is printed.
#
#   fuzz/run-all.sh 30          # CI: half a minute per target
#   fuzz/run-all.sh 3600        # a long run: an hour per target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); works on stable with
# `--sanitizer none` (release build with debug assertions and overflow checks).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 SECONDS_PER_TARGET" >&2
    exit 2
fi

targets=$(cargo fuzz list)
start=$(date +%s)
echo "== building fuzz targets"
cargo fuzz build --sanitizer none
echo "   built in $(($(date +%s) - start)) s"

# Targets run side by side, one per core (CKPT_FUZZ_JOBS to change): libFuzzer is single-
# threaded, so each target still gets a core of its own for its SECONDS, and the stage takes
# SECONDS x targets / cores of wall time instead of SECONDS x targets.
jobs="${CKPT_FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"

# Runs target $1 and writes its summary line to target/fuzz-$1.line (exit status: libFuzzer's).
fuzz_one() {
    local t="$1"
    local work="target/corpus-work/$t"
    local log="target/fuzz-$t.log"
    rm -f "target/fuzz-$t.line"
    mkdir -p "$work" "corpus/$t" "artifacts/$t"
    # -rss_limit_mb: no input may make a target allocate without bound. -timeout: no hang.
    cargo fuzz run --sanitizer none "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
        >"$log" 2>&1 || return 1
    local execs rate corpus
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus=$(find "$work" "corpus/$t" -type f | wc -l)
    printf '%-16s %12s execs %10s exec/s  corpus %s\n' "$t" "$execs" "$rate" "$corpus" \
        >"target/fuzz-$t.line"
}

# Each wave holds up to $jobs targets; every target of a wave is waited for, and the first
# that failed stops the run with its log's tail and how to reproduce it.
set -- $targets
while [ $# -gt 0 ]; do
    wave=()
    pids=()
    while [ $# -gt 0 ] && [ ${#wave[@]} -lt "$jobs" ]; do
        echo "== fuzz $1 for ${secs} s"
        fuzz_one "$1" &
        pids+=($!)
        wave+=("$1")
        shift
    done
    failed=""
    for i in "${!wave[@]}"; do
        if ! wait "${pids[$i]}"; then
            failed="${failed:-${wave[$i]}}"
        fi
    done
    for t in "${wave[@]}"; do
        [ -f "target/fuzz-$t.line" ] && echo "   $(cat "target/fuzz-$t.line")"
    done
    if [ -n "$failed" ]; then
        tail -n 60 "target/fuzz-$failed.log"
        echo "FAIL: fuzz target $failed crashed; input in fuzz/artifacts/$failed/" >&2
        echo "reproduce: (cd fuzz && cargo fuzz run --sanitizer none $failed artifacts/$failed/<file>)" >&2
        exit 1
    fi
done
echo "== fuzzing passed ($(($(date +%s) - start)) s in all)"
for t in $targets; do
    cat "target/fuzz-$t.line"
done
