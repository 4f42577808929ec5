#!/usr/bin/env bash
# A/B of two walship binaries on the same catch-up ship (synthetic WAL, loopback, O_DIRECT +
# group commit as deployed), interleaved A B A B ... so both see the same machine noise.
# Reports durable MB/s and sender/receiver CPU seconds per GiB for each run, and the medians.
# Usage: tools/ab.sh BIN_A BIN_B [LABEL_A LABEL_B]
#   env: BYTES=1GiB REPS=5 OUT=results/ab-....md RECV_EXTRA="--write-mode buffered" (takes the disk out)
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "$1"); B=$(realpath "$2")
LA=${3:-A}; LB=${4:-B}
BYTES=${BYTES:-1GiB}
REPS=${REPS:-5}
RECV_EXTRA=${RECV_EXTRA:-}
S=${S:-$PWD/target/ab-scratch}
OUT=${OUT:-results/ab-$(date -u +%Y%m%dT%H%M%SZ).md}
export WALSHIP_INSECURE_NO_AUTH=true NO_COLOR=1
mkdir -p "$S"
rm -rf "$S/src"
"$B" gen-wal --dir "$S/src" --wal-bytes "$BYTES" --seg-size 16777216 >/dev/null
cat "$S"/src/* >/dev/null
rows=()
one() { # bin label rep
  local bin=$1 label=$2 rep=$3 dst=$S/dst port
  # A port nobody listens on (never ship into somebody else's receiver).
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$dst"; mkdir -p "$dst"; sync
  /usr/bin/time -f "%U %S" -o "$S/recv.time" "$bin" recv --listen 127.0.0.1:$port --dir "$dst" $RECV_EXTRA >"$S/recv.log" 2>&1 &
  local rp=$!
  for _ in $(seq 1 500); do grep -q listening "$S/recv.log" && break; sleep 0.01; done
  grep -q listening "$S/recv.log" || { echo "receiver did not start ($label rep $rep):"; tail "$S/recv.log"; exit 1; }
  /usr/bin/time -f "%U %S" -o "$S/send.time" "$bin" send --pg-wal "$S/src" --to 127.0.0.1:$port --once --report-json "$S/rep.json" >"$S/send.log" 2>&1 \
    || { echo "send failed ($label rep $rep):"; tail "$S/send.log"; exit 1; }
  pkill -TERM -P $rp; wait $rp || true
  local mbs bytes scpu rcpu
  mbs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mb_per_s"])' "$S/rep.json")
  bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' "$S/rep.json")
  scpu=$(awk -v b="$bytes" '{printf "%.3f", ($1+$2)/(b/1073741824)}' "$S/send.time")
  rcpu=$(awk -v b="$bytes" '{printf "%.3f", ($1+$2)/(b/1073741824)}' "$S/recv.time")
  echo "| $rep | $label | $(printf %.0f "$mbs") | $scpu | $rcpu |"
}
{
  echo "# A/B: $LA vs $LB"
  echo
  echo "- command: \`tools/ab.sh $* \` (BYTES=$BYTES REPS=$REPS RECV_EXTRA=\"$RECV_EXTRA\"), interleaved; catch-up ship of synthetic WAL over loopback, receiver group commit (O_DIRECT unless RECV_EXTRA says buffered)"
  echo "- $LA: \`$A\`"
  echo "- $LB: \`$B\`"
  echo "- commit $(git rev-parse --short HEAD), kernel $(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load before: $(cut -d' ' -f1-3 /proc/loadavg), date $(date -u +%FT%TZ)"
  echo
  echo "| rep | binary | durable MB/s | sender CPU s/GiB | receiver CPU s/GiB |"
  echo "|---|---|---|---|---|"
} >"$OUT"
for rep in $(seq 1 "$REPS"); do
  one "$A" "$LA" "$rep" | tee -a "$OUT"
  one "$B" "$LB" "$rep" | tee -a "$OUT"
done
python3 - "$OUT" "$LA" "$LB" <<'PY' | tee -a "$OUT"
import sys, statistics as st
rows = [l.split('|')[1:-1] for l in open(sys.argv[1]) if l.startswith('| ') and l.split('|')[2].strip() in sys.argv[2:4]]
print("\n| binary | median MB/s | min..max MB/s | median sender CPU s/GiB | median receiver CPU s/GiB |\n|---|---|---|---|---|")
med = {}
for label in sys.argv[2:4]:
    r = [x for x in rows if x[1].strip() == label]
    mbs = [float(x[2]) for x in r]; s = [float(x[3]) for x in r]; c = [float(x[4]) for x in r]
    med[label] = st.median(mbs)
    print(f"| {label} | {st.median(mbs):.0f} | {min(mbs):.0f}..{max(mbs):.0f} | {st.median(s):.3f} | {st.median(c):.3f} |")
a, b = sys.argv[2], sys.argv[3]
print(f"\nRatio of medians {b}/{a}: {med[b]/med[a]:.2f}x")
PY
echo "wrote $OUT"
