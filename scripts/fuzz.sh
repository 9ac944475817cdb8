#!/usr/bin/env bash
# Runs cargo-fuzz targets (default: all of them) for SECONDS each (default 600) and prints, per
# target, the executions, executions per second and whether it crashed:
#     scripts/fuzz.sh [SECONDS] [TARGET...]
# Bounded: each target stops at its time limit. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-600}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(frames messages exact_checks fraud_proof)
cargo +nightly fuzz build
status=0
for target in "${targets[@]}"; do
    log="$(mktemp)"
    # One job, one worker: the machine has 2 cores and a build may run beside it.
    if cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        verdict="no crash"
    else
        verdict="CRASHED (see fuzz/artifacts/$target)"
        status=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    per_sec=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    echo "$target: ${seconds}s, $runs executions ($per_sec/s), $cov, $verdict"
    rm -f "$log"
done
exit "$status"
