#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for SECONDS each (default 20); exit non-zero if any target crashes
# (or fails to build/run). Installs cargo-fuzz when missing. Stable Rust: RUSTC_BOOTSTRAP=1 unlocks the
# nightly flags cargo-fuzz passes (-Zsanitizer=address).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
#
# Env: CARGO_TARGET_DIR (default fuzz/target), FUZZ_JOBS (libFuzzer -jobs, default 1),
#      FUZZ_ARGS (extra libFuzzer flags, e.g. "-rss_limit_mb=4096").
# Crash inputs land in fuzz/artifacts/<target>/; reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
set -uo pipefail

secs="${1:-20}"
shift || true
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]  (SECONDS must be a whole number, got '$secs')" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz" || { echo "fuzz.sh: no fuzz/ directory under $root" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    # A copy built earlier on this machine, else install it.
    if [ -x /tmp/cfz/root/bin/cargo-fuzz ]; then
        export PATH="/tmp/cfz/root/bin:$PATH"
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked || { echo "fuzz.sh: could not install cargo-fuzz" >&2; exit 2; }
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
echo "fuzz.sh: $(cargo fuzz --version)"

export RUSTC_BOOTSTRAP=1
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
[ "${#targets[@]}" -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 2; }

failed=()
summary=()
for t in "${targets[@]}"; do
    echo "=== fuzz target $t for ${secs}s ==="
    log="$(mktemp "/tmp/walship-fuzz-$t.XXXXXX.log")"
    # shellcheck disable=SC2086
    cargo fuzz run "$t" -- -max_total_time="$secs" -jobs="${FUZZ_JOBS:-1}" -workers="${FUZZ_JOBS:-1}" \
        -print_final_stats=1 ${FUZZ_ARGS:-} 2>&1 | tee "$log" | grep -E '^(#[0-9]+[[:space:]]+(DONE|INITED)|Done|==[0-9]+==|SUMMARY|thread .* panicked|artifact_prefix|Test unit written|stat::number_of_executed_units|error)' 
    rc=${PIPESTATUS[0]}
    runs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)"
    cov="$(grep -Eo 'DONE[[:space:]]+cov: [0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)"
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        summary+=("$t: FAILED (exit $rc, log $log)")
    elif [ -z "$runs" ] || [ "$runs" -eq 0 ]; then
        failed+=("$t")
        summary+=("$t: FAILED (no executions recorded, log $log)")
    else
        summary+=("$t: ok, ${runs} runs, cov ${cov:-?} in ${secs}s")
        rm -f "$log"
    fi
done

echo "=== fuzz summary ==="
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crash or failure in: ${failed[*]}" >&2
    exit 1
fi
