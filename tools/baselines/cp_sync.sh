#!/usr/bin/env bash
# cp + sync of WAL segment files into a fresh directory: the peer baseline benches/ship.rs runs.
# Usage: tools/baselines/cp_sync.sh SRC_DIR DST_DIR
# Caches are not dropped: the source should be hot in the page cache (read it once first), as it
# is for every contender in the bench. Prints bytes, seconds and GB/s (10^9 B/s).
set -euo pipefail
src="${1:?usage: $0 SRC_DIR DST_DIR}"
dst="${2:?usage: $0 SRC_DIR DST_DIR}"
[ ! -e "$dst" ] || { echo "$dst exists: give a fresh directory" >&2; exit 2; }
mkdir -p "$dst"
cat "$src"/* > /dev/null   # warm
sync
bytes=$(find "$src" -maxdepth 1 -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
start=$(date +%s.%N)
cp -- "$src"/* "$dst"/
sync
end=$(date +%s.%N)
awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { t = e - s; printf "cp+sync: %d bytes in %.3f s = %.2f GB/s\n", b, t, b / t / 1e9 }'
