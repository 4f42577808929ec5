#!/usr/bin/env bash
# Raw O_DIRECT sequential write, no network: the same fio job benches/ship.rs runs.
# Usage: tools/baselines/fio_odirect.sh DIR [BYTES]   (DIR: fresh, on the receiver's filesystem; BYTES default 2GiB)
# 1 MiB writes at depth 16 through io_uring into 16 MiB files (like WAL segments), one file after
# another, fsync at the end of each file. GB/s: fio's own job runtime (its start-up, ~0.25 s, excluded).
set -euo pipefail
dir="${1:?usage: $0 DIR [BYTES]}"
bytes="${2:-2GiB}"
case "$bytes" in
    *GiB) bytes=$(( ${bytes%GiB} * 1024 * 1024 * 1024 )) ;;
    *MiB) bytes=$(( ${bytes%MiB} * 1024 * 1024 )) ;;
esac
seg=$(( 16 * 1024 * 1024 ))
command -v fio >/dev/null || { echo "skipped: fio not installed (apt-get install fio)"; exit 0; }
mkdir -p "$dir"
[ "$(stat -f -c %T "$dir")" != tmpfs ] || { echo "$dir is tmpfs: O_DIRECT refused; use a real filesystem" >&2; exit 2; }
fio --name=walship-odirect --directory="$dir" --ioengine=io_uring --direct=1 --bs=1m --iodepth=16 \
    --rw=write --size="$bytes" --nrfiles=$(( bytes / seg )) --filesize=16m \
    --file_service_type=sequential --end_fsync=1
rm -f "$dir"/walship-odirect.*
