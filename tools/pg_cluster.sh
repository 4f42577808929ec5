#!/usr/bin/env bash
# Throw-away PostgreSQL clusters for manual walship runs and benchmarks (the automated end-to-end check is
# tests/pg_replay.rs: `cargo test --test pg_replay -- --nocapture`).
#
#   tools/pg_cluster.sh wal DIR [SCALE] [SECONDS]   initdb DIR/primary, base backup DIR/base (-X none),
#                                                   pgbench -i -s SCALE (default 10) + SECONDS (default 5) of
#                                                   pgbench, clean stop. Ship DIR/primary/pg_wal afterwards.
#   tools/pg_cluster.sh standby DIR RECV_DIR [WALSHIP]
#                                                   DIR/standby from DIR/base with an EMPTY pg_wal and
#                                                   restore_command = 'WALSHIP restore %f %p --dir RECV_DIR';
#                                                   starts it and waits until replay reaches the primary's end
#                                                   of WAL, then compares pgbench_accounts checksums.
#   tools/pg_cluster.sh stop DIR                    stop whatever runs in DIR (immediate)
#
# As root, PostgreSQL runs as the `postgres` OS user (initdb/postgres refuse root). Ports 5481/5482 on a
# unix socket in DIR/sock only (listen_addresses = ''), so nothing collides with other servers.
set -euo pipefail

PGBIN=${WALSHIP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL not installed (no /usr/lib/postgresql/*/bin)" >&2; exit 2; }
PPORT=5481 SPORT=5482

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
own() { if [ "$(id -u)" = 0 ]; then chown -R postgres: "$@"; fi; }
psql_() { local port=$1; shift; as_pg "$PGBIN/psql" -h "$SOCK" -p "$port" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }
sums() { psql_ "$1" -c "SELECT count(*) || ' ' || md5(string_agg(md5(t::text), '' ORDER BY aid)) FROM pgbench_accounts t"; }

cmd=${1:-}; DIR=$(realpath -m "${2:?usage: $0 wal|standby|stop DIR ...}"); SOCK=$DIR/sock
cd /   # the postgres user may not be able to read our cwd

case $cmd in
wal)
  SCALE=${3:-10} SECS=${4:-5}
  mkdir -p "$SOCK"; chmod 755 "$DIR"; own "$DIR"
  as_pg "$PGBIN/initdb" -D "$DIR/primary" -U postgres --auth=trust --locale=C -E UTF8 --no-sync >/dev/null
  cat >>"$DIR/primary/postgresql.conf" <<EOF
port = $PPORT
listen_addresses = ''
unix_socket_directories = '$SOCK'
wal_level = replica
max_wal_senders = 4
synchronous_commit = off
EOF
  as_pg "$PGBIN/pg_ctl" -D "$DIR/primary" -l "$DIR/primary.log" -w start >/dev/null
  psql_ $PPORT -c "SELECT pg_create_physical_replication_slot('walship', true)" >/dev/null
  as_pg "$PGBIN/pg_basebackup" -h "$SOCK" -p $PPORT -U postgres -D "$DIR/base" -c fast -X none --no-sync
  as_pg "$PGBIN/pgbench" -h "$SOCK" -p $PPORT -U postgres -i -s "$SCALE" -q postgres 2>&1 | grep -E '^done' || true
  psql_ $PPORT -c CHECKPOINT
  as_pg "$PGBIN/pgbench" -h "$SOCK" -p $PPORT -U postgres -n -c 2 -j 2 -T "$SECS" postgres | grep -E '^tps' || true
  sums $PPORT >"$DIR/primary.sums"
  as_pg "$PGBIN/pg_ctl" -D "$DIR/primary" -m fast -w stop >/dev/null
  ckpt=$(as_pg "$PGBIN/pg_controldata" -D "$DIR/primary" | sed -n 's/^Latest checkpoint location: *//p')
  # pg_waldump stops (exit 1) at the end of WAL: "invalid record length at X/Y: wanted 24, got 0"
  end=$( (as_pg "$PGBIN/pg_waldump" -p "$DIR/primary/pg_wal" -s "$ckpt" 2>&1 >/dev/null || true) \
        | sed -n 's/.*invalid record length at \([0-9A-F/]*\):.*/\1/p')
  echo "$end" >"$DIR/primary.end_lsn"
  echo "pg_wal:  $DIR/primary/pg_wal ($(du -sh "$DIR/primary/pg_wal" | cut -f1))"
  echo "latest checkpoint $ckpt, end of WAL $end; accounts checksum $(cat "$DIR/primary.sums")"
  ;;
standby)
  RECV=$(realpath "${3:?RECV_DIR}") WALSHIP=$(realpath "${4:-$(dirname "$0")/../target/release/walship}")
  rm -rf "$DIR/standby"; cp -a "$DIR/base" "$DIR/standby"; rm -rf "$DIR/standby/pg_wal/"*
  touch "$DIR/standby/standby.signal"
  cat >>"$DIR/standby/postgresql.auto.conf" <<EOF
port = $SPORT
restore_command = '$WALSHIP restore %f %p --dir $RECV'
hot_standby = on
wal_retrieve_retry_interval = '1s'
EOF
  own "$DIR/standby"; chmod -R a+rX "$RECV"
  as_pg "$PGBIN/pg_ctl" -D "$DIR/standby" -l "$DIR/standby.log" -W start >/dev/null
  want=$(cat "$DIR/primary.end_lsn")
  for _ in $(seq 240); do
    got=$(psql_ $SPORT -c "SELECT pg_last_wal_replay_lsn() >= '$want', pg_last_wal_replay_lsn()" 2>/dev/null || true)
    [ "${got%%|*}" = t ] && break; sleep 0.5
  done
  echo "replayed to ${got#*|} (primary end of WAL $want)"
  [ "${got%%|*}" = t ] || { tail -20 "$DIR/standby.log"; exit 1; }
  s=$(sums $SPORT); p=$(cat "$DIR/primary.sums")
  [ "$s" = "$p" ] && echo "checksums equal: $s" || { echo "CHECKSUM MISMATCH: primary $p standby $s"; exit 1; }
  ;;
stop)
  for d in standby primary; do
    [ -f "$DIR/$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/$d" -m immediate -w stop || true
  done
  ;;
*) sed -n '2,17p' "$0"; exit 2 ;;
esac
