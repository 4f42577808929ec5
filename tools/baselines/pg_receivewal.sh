#!/usr/bin/env bash
# pg_receivewal peer baseline, standalone (benches/ship.rs does the same, with CPU accounting).
# Usage: tools/baselines/pg_receivewal.sh SOCKET_DIR PORT SLOT ENDPOS DST_DIR
#   Streams from a running server through physical slot SLOT (created before the WAL was written, so it
#   catches up from the start) until ENDPOS (an LSN, e.g. the flush LSN after pg_switch_wal()), then syncs.
#   Prints bytes of complete segments, seconds and GB/s (10^9 B/s). Run as root or any user the server trusts.
set -euo pipefail
sock="${1:?usage: $0 SOCKET_DIR PORT SLOT ENDPOS DST_DIR}"; port="${2:?}"; slot="${3:?}"; endpos="${4:?}"; dst="${5:?}"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/pg_receivewal" ] || { echo "skipped: pg_receivewal not installed (apt-get install postgresql-client)"; exit 0; }
[ ! -e "$dst" ] || { echo "$dst exists: give a fresh directory" >&2; exit 2; }
mkdir -p "$dst"
start=$(date +%s.%N)
"$bin/pg_receivewal" -h "$sock" -p "$port" -U postgres -D "$dst" --slot="$slot" --no-loop -E "$endpos"
sync
end=$(date +%s.%N)
bytes=$(find "$dst" -maxdepth 1 -type f -regex '.*/[0-9A-F]\{24\}' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { t = e - s; printf "pg_receivewal+sync: %d bytes (complete segments) in %.3f s = %.2f GB/s\n", b, t, b / t / 1e9 }'
