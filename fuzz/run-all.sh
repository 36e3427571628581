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

summary=""
for t in $targets; do
    work="target/corpus-work/$t"
    mkdir -p "$work" "corpus/$t" "artifacts/$t"
    log="target/fuzz-$t.log"
    echo "== fuzz $t for ${secs} s"
    # -rss_limit_mb: no input may make a target allocate without bound. -timeout: no hang.
    if ! cargo fuzz run --sanitizer none "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAIL: fuzz target $t crashed; input in fuzz/artifacts/$t/" >&2
        echo "reproduce: (cd fuzz && cargo fuzz run --sanitizer none $t artifacts/$t/<file>)" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus=$(find "$work" "corpus/$t" -type f | wc -l)
    line=$(printf '%-16s %12s execs %10s exec/s  corpus %s' "$t" "$execs" "$rate" "$corpus")
    echo "   $line"
    summary="$summary$line"$'\n'
done
echo "== fuzzing passed ($(($(date +%s) - start)) s in all)"
printf '%s' "$summary"
