#!/usr/bin/env bash
# pgBackRest archive-push peer baseline, standalone (benches/ship.rs does the same, with CPU accounting).
# Usage: tools/baselines/pgbackrest_push.sh CONFIG STANZA PG_WAL_DIR [pgbackrest options...]
#   e.g. ... /tmp/pgbr.conf bench /var/lib/postgresql/15/main/pg_wal --archive-async --process-max=2 --compress-type=lz4
#   Pushes every complete segment in PG_WAL_DIR in name order, as PostgreSQL's archiver would: a .ready file
#   per segment in archive_status (async mode pushes ahead from them), renamed to .done after each success.
#   The stanza must exist (stanza-create) and the repository's archive should be empty.
set -euo pipefail
conf="${1:?usage: $0 CONFIG STANZA PG_WAL_DIR [options...]}"; stanza="${2:?}"; pg_wal="${3:?}"; shift 3
command -v pgbackrest >/dev/null || { echo "skipped: pgbackrest not installed (apt-get install pgbackrest)"; exit 0; }
mapfile -t segs < <(find "$pg_wal" -maxdepth 1 -type f -regex '.*/[0-9A-F]\{24\}' -printf '%f\n' | sort)
mkdir -p "$pg_wal/archive_status"
for s in "${segs[@]}"; do touch "$pg_wal/archive_status/$s.ready"; done
bytes=$(( ${#segs[@]} * $(stat -c %s "$pg_wal/${segs[0]}") ))
start=$(date +%s.%N)
for s in "${segs[@]}"; do
    pgbackrest --config="$conf" --stanza="$stanza" "$@" archive-push "$pg_wal/$s"
    mv "$pg_wal/archive_status/$s.ready" "$pg_wal/archive_status/$s.done"
done
end=$(date +%s.%N)
awk -v b="$bytes" -v s="$start" -v e="$end" -v n="${#segs[@]}" 'BEGIN { t = e - s; printf "pgbackrest archive-push: %d segments, %d bytes in %.3f s = %.2f GB/s\n", n, b, t, b / t / 1e9 }'
