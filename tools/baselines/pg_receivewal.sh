#!/usr/bin/env bash
# TODO: pg_receivewal peer baseline (needs a PostgreSQL server streaming the same WAL).
# Plan: initdb + start a server on a low 127.0.0.1 port as the postgres user (runuser -u postgres),
# generate WAL, then time `pg_receivewal --synchronous --no-loop -E <end lsn> -D fresh_dir` and
# report bytes / wall seconds next to walship's numbers. See DESIGN.md "Testing against a real PostgreSQL".
echo "skipped: pg_receivewal baseline not implemented yet (TODO in tools/baselines/pg_receivewal.sh)"
