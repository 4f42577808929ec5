#!/usr/bin/env bash
# A/B of walship recv --spare-segments on a catch-up ship (1 GiB synthetic WAL by default), interleaved.
# Usage: BYTES=1GiB REPS=3 tools/spares_ab.sh   (build first: cargo build --release)
set -u
cd "$(dirname "$0")/.."
B=$PWD/target/release/walship
S=${S:-$PWD/target/spares-ab}
BYTES=${BYTES:-1GiB}
REPS=${REPS:-3}
export WALSHIP_INSECURE_NO_AUTH=true NO_COLOR=1
if [ ! -d $S/src ]; then $B gen-wal --dir $S/src --wal-bytes $BYTES --seg-size 16777216 >/dev/null; fi
cat $S/src/* > /dev/null
port=57311
for rep in $(seq 1 $REPS); do
  for cfg in "0" "2" "8" "2 always"; do
    set -- $cfg; n=$1; pol=${2:-idle}
    dst=$S/dst; rm -rf $dst; mkdir -p $dst; sync
    $B recv --listen 127.0.0.1:$port --dir $dst --spare-segments $n --spare-refill $pol > $S/recv.log 2>&1 &
    rp=$!
    for i in $(seq 1 200); do grep -q listening $S/recv.log && break; sleep 0.01; done
    sleep 0.7
    t0=$(date +%s.%N)
    $B send --pg-wal $S/src --to 127.0.0.1:$port --once --report-json $S/rep.json > $S/send.log 2>&1 || { echo SEND FAILED; tail $S/send.log; }
    t1=$(date +%s.%N)
    kill -TERM $rp; wait $rp
    mbs=$(grep -o '"mb_per_s":[0-9.]*' $S/rep.json | cut -d: -f2)
    line=$(grep "receiver stopped" $S/recv.log | tail -1 | sed 's/.*;//')
    echo "rep $rep spares $n/$pol MB/s $mbs | $(echo "$line" | grep -oE '[0-9]+ fdatasyncs in [0-9]+ batches|p50 [0-9]+ us p99 [0-9]+ us max [0-9]+ us|spare segments [0-9]+ created [0-9]+ used [0-9]+ missed' | tr '\n' ' ')"
  done
done
