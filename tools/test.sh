#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the tests need when it is missing (PostgreSQL from Debian's packages, for the
# real-server replay test), then runs every unit, property, simulation and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

if [ -z "$(pg_bin_dir)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tools/test.sh: installing PostgreSQL (Debian package) for the replay test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  else
    echo "tools/test.sh: PostgreSQL is not installed and cannot be installed here (not root / no apt-get);"
    echo "               the real-PostgreSQL replay test will be skipped"
  fi
fi
if [ -n "$(pg_bin_dir)" ]; then
  # With PostgreSQL present, its tests must run, never skip.
  export WALSHIP_REQUIRE_PG=1
fi

log="$(mktemp /tmp/walship-test.XXXXXX.log)"
set +e
cargo test --release "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "tests: $passed passed, $failed failed"
exit "$status"
