#!/usr/bin/env bash
# WAL shipping throughput against the machine's limits and the tools users would pick instead, in one run:
# micro benches (criterion: CRC32C, page validation, record walk, frame encode/decode), then raw loopback TCP,
# raw O_DIRECT, the durable ceiling (fio: fresh 16 MiB files, each fsynced before the next), cp + sync and
# walship on synthetic WAL, then (PostgreSQL installed, run as root) real WAL from
# a throw-away cluster: pg_receivewal, pgBackRest archive-push (sync; async process-max 2 none/lz4), cp + sync
# and walship on the same segments. Writes results/ship-<date>.json, two SVG charts and a REPORT.md section.
#
# Usage: tools/bench.sh [--bytes SIZE] [--reps N] [--dir DIR] [--keep] [--no-fio] [--sweep] [--pg-bytes SIZE]
#                       [--no-pg] [--no-micro] [CONTENDER...]
#   --bytes SIZE   synthetic WAL to ship, e.g. 256MiB, 2GiB (default 2GiB; env WALSHIP_BENCH_BYTES)
#   --reps N       repetitions of every contender, interleaved; medians reported (default 3)
#   --dir DIR      scratch parent on a real filesystem, never tmpfs (default <target>/bench-scratch)
#   --keep         keep the scratch dir (logs of every command are in it)
#   --no-fio       skip fio even if installed (the Rust O_DIRECT baseline always runs)
#   --sweep        also sweep walship's knobs one at a time (zero-copy, frame bytes, in-flight, fsync batch)
#                  (env WALSHIP_BENCH_SWEEP=1; WALSHIP_BENCH_SWEEP_REPS=N, default 1)
#   --pg-bytes S   real WAL to generate with pgbench (default 1GiB; env WALSHIP_BENCH_PG_BYTES)
#   --no-pg        skip the real-WAL peers (env WALSHIP_BENCH_PG=0)
#   --no-micro     skip the criterion micro benches
#   CONTENDER      substring filters: raw_tcp raw_odirect_fio raw_durable_fio raw_odirect_rust cp_sync walship walship_sweep
#                  real_walship real_cp_sync pg_receivewal pgbackrest_sync pgbackrest_async_none pgbackrest_async_lz4
# Missing tools (fio, pgbackrest, PostgreSQL) are skipped with a message, never a failure.
# The machine should be otherwise idle for numbers worth keeping: 2 shared cores make them noisy.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

filters=()
micro=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bytes) export WALSHIP_BENCH_BYTES="$2"; shift 2 ;;
        --reps) export WALSHIP_BENCH_REPS="$2"; shift 2 ;;
        --dir) export WALSHIP_BENCH_DIR="$2"; shift 2 ;;
        --keep) export WALSHIP_BENCH_KEEP=1; shift ;;
        --no-fio) export WALSHIP_BENCH_FIO=0; shift ;;
        --sweep) export WALSHIP_BENCH_SWEEP=1; shift ;;
        --pg-bytes) export WALSHIP_BENCH_PG_BYTES="$2"; shift 2 ;;
        --no-pg) export WALSHIP_BENCH_PG=0; shift ;;
        --no-micro) micro=0; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
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

if [ "${WALSHIP_BENCH_PG:-1}" != 0 ]; then
    ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 \
        || echo "bench.sh: PostgreSQL not installed (Debian: apt-get install postgresql); real-WAL peers are skipped" >&2
    command -v pgbackrest >/dev/null \
        || echo "bench.sh: pgbackrest not installed (Debian: apt-get install pgbackrest); pgBackRest rows are skipped" >&2
    [ "$(id -u)" = 0 ] || echo "bench.sh: not root; real-WAL peers are skipped (PostgreSQL runs via runuser -u postgres)" >&2
fi

if [ "$micro" = 1 ]; then
    # Micro benches first: the ship report quotes their criterion results.
    cargo bench --bench micro
fi

# cargo bench builds the walship binary with the bench profile (= release) and hands the bench its
# path (CARGO_BIN_EXE_walship); WALSHIP_BIN overrides it.
exec cargo bench --bench ship -- ${filters[@]+"${filters[@]}"}
