#!/usr/bin/env bash
# End-to-end WAL shipping throughput with its baselines, measured side by side in one run
# (raw loopback TCP, raw O_DIRECT write, cp + sync, walship send -> recv).
# Writes results/ship-<date>.json and appends a section to results/REPORT.md.
#
# Usage: tools/bench.sh [--bytes SIZE] [--reps N] [--dir DIR] [--keep] [--no-fio] [CONTENDER...]
#   --bytes SIZE   WAL to ship, e.g. 256MiB, 2GiB (default 2GiB; env WALSHIP_BENCH_BYTES)
#   --reps N       repetitions of every contender, interleaved; medians reported (default 3)
#   --dir DIR      scratch parent on a real filesystem, never tmpfs (default <target>/bench-scratch)
#   --keep         keep the scratch dir (logs of every command are in it)
#   --no-fio       skip fio even if installed (the Rust O_DIRECT baseline always runs)
#   CONTENDER      substring filters: raw_tcp raw_odirect_fio raw_odirect_rust cp_sync walship
# The machine should be otherwise idle for numbers worth keeping: 2 shared cores make them noisy.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

filters=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bytes) export WALSHIP_BENCH_BYTES="$2"; shift 2 ;;
        --reps) export WALSHIP_BENCH_REPS="$2"; shift 2 ;;
        --dir) export WALSHIP_BENCH_DIR="$2"; shift 2 ;;
        --keep) export WALSHIP_BENCH_KEEP=1; shift ;;
        --no-fio) export WALSHIP_BENCH_FIO=0; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
        *) filters+=("$1"); shift ;;
    esac
done

if ! grep -Eq '^name = "ship"' Cargo.toml; then
    cat >&2 <<'MSG'
bench.sh: Cargo.toml has no [[bench]] entry for benches/ship.rs; add:

[[bench]]
name = "ship"
harness = false
MSG
    exit 2
fi

if [ "${WALSHIP_BENCH_FIO:-1}" != 0 ] && ! command -v fio >/dev/null; then
    echo "bench.sh: fio not installed (Debian: apt-get install fio); raw O_DIRECT uses the Rust baseline only" >&2
fi

# cargo bench builds the walship binary with the bench profile (= release) and hands the bench its
# path (CARGO_BIN_EXE_walship); WALSHIP_BIN overrides it.
exec cargo bench --bench ship -- ${filters[@]+"${filters[@]}"}
