#!/usr/bin/env bash
# Installs everything pg_token needs to build, test and benchmark, skipping what is present.
# Safe to run repeatedly; needs root (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo \
         pgbouncer libipc-run-perl hyperfine python3-venv; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  # Installing the dev package can upgrade server binaries under a running cluster.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h | awk '$4=="online"{print $1, $2}' | while read -r v c; do
      $SUDO pg_ctlcluster "$v" "$c" restart || true
    done
  fi
fi

# The Debian package starts its own cluster on 5432; our scripts start their own, so keep
# the packaged one out of the way only if it is running and we never asked for it.

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
  echo "setup: installing cargo-pgrx 0.18.0 (takes a few minutes)"
  cargo install cargo-pgrx --version 0.18.0 --locked
fi

PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if ! grep -q '^pg15' "$PGRX_HOME/config.toml" 2>/dev/null; then
  echo "setup: cargo pgrx init --pg15"
  cargo pgrx init --pg15 /usr/lib/postgresql/15/bin/pg_config
fi

# Python clients for the end-to-end tests and the benchmark chart, in a private venv.
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  $SUDO python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import psycopg, matplotlib, pytest' 2>/dev/null; then
  echo "setup: installing psycopg, matplotlib and pytest into $VENV"
  $SUDO "$VENV/bin/pip" install -q 'psycopg[binary]==3.2.*' 'matplotlib==3.9.*' 'pytest==8.*'
fi
echo "setup: ready"
