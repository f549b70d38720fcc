#!/usr/bin/env bash
# Builds pg_token (release) and installs it into Debian's PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config 2>&1 \
  | grep -vE '^\s*(Compiling|Checking)' || true
test -f /usr/share/postgresql/15/extension/pg_token.control
