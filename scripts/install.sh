#!/usr/bin/env bash
# Builds pg_token and installs it into one PostgreSQL: Debian's 15 by default.
#
#   scripts/install.sh                 release build into PostgreSQL 15
#   scripts/install.sh 17              release build into the PostgreSQL 17 setup.sh unpacked
#   PROFILE=dev scripts/install.sh 17  a debug build (faster to compile)
#
# Besides what pgrx installs (the library, the control file, the generated install script of
# this version and the upgrade scripts sql/pg_token--A--B.sql), the released install scripts
# kept in sql/ (pg_token--0.1.0.sql, ...) are installed too, so CREATE EXTENSION pg_token
# VERSION '0.1.0' works, which the upgrade tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/versions.sh
major=${1:-$PG_TOKEN_DEFAULT_VERSION}
pgc=$(pg_config_for "$major")
profile=()
[ "${PROFILE:-release}" = release ] && profile=(--release)
cargo pgrx install "${profile[@]}" --no-default-features --features "pg$major" --pg-config "$pgc" 2>&1 \
  | grep -vE '^\s*(Compiling|Checking)' || true
ext=$("$pgc" --sharedir)/extension
test -f "$ext/pg_token.control"
for f in sql/pg_token--[0-9]*.sql; do
  case "$f" in *--*--*) ;; *) install -m 644 "$f" "$ext/" ;; esac
done
