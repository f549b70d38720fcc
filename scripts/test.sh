#!/usr/bin/env bash
# Runs every test pg_token has, from a fresh machine: `make test` (and `.ci/run`) call this.
#
#   1. set-up (idempotent): apt packages, cargo-pgrx 0.18.0, the Python venv
#   2. the layout check (scripts/check_layout.py), then the pure core's unit and property
#      tests: cargo test -p pg_token_core, no pgrx, no Postgres
#   3. in-database tests: cargo pgrx test pg15 (pgrx's own throwaway cluster)
#   4. the extension is installed (release build) and a throwaway cluster is started
#   5. the README's demo command, checked for the lifecycle it must print
#   6. end-to-end tests from real clients over TCP: Python psycopg (pytest), Rust
#      tokio-postgres, pgbouncer, isolation specs (pg_isolation_regress), a hot standby (TAP)
#   7. every server log written during the run is searched for every token the run generated
#
# Everything it starts is stopped on exit. Set PG_TOKEN_KEEP=1 to keep the run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "set-up"
bash scripts/setup.sh
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

step "layout: pure core, no import cycles, one error map"
python3 scripts/check_layout.py

step "unit and property tests of the pure core (no pgrx, no Postgres)"
cargo test -p pg_token_core

step "in-database tests: cargo pgrx test pg15"
PGRX_DATA=/tmp/pg_token-pgrx-test
mkdir -p "$PGRX_DATA" && chown postgres:postgres "$PGRX_DATA"
if [ "$(id -u)" -eq 0 ]; then
  env -u RUST_BACKTRACE CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$PGRX_DATA" cargo pgrx test pg15
else
  env -u RUST_BACKTRACE cargo pgrx test pg15
fi

step "install the extension (release build)"
bash scripts/install.sh

step "the demo command (README): the whole lifecycle, narrated"
bash tests/demo/run.sh

# One run directory for everything the end-to-end stage starts, owned by postgres.
RUN=/tmp/pg_token-test-run
for d in "$RUN"/*/; do [ -f "$d/PG_VERSION" ] && bash scripts/cluster.sh stop "$d"; done 2>/dev/null || true
rm -rf "$RUN"
mkdir -p "$RUN" && chown postgres:postgres "$RUN" && chmod 755 "$RUN"
export PGT_RUN=$RUN
export PGT_TOKENS=$RUN/generated-tokens.txt   # every plaintext token a test receives; never a log
: >"$PGT_TOKENS"; chmod 666 "$PGT_TOKENS"
export PGT_DATA=$RUN/primary
export PGT_HOST=127.0.0.1
PGT_PORT=$(bash scripts/cluster.sh free-port); export PGT_PORT
export PGT_SOCKET=$PGT_DATA
cleanup() {
  for d in "$RUN"/*/; do [ -f "$d/postmaster.pid" ] && bash scripts/cluster.sh stop "$d"; done 2>/dev/null || true
  pkill -f "pgbouncer.*$RUN" 2>/dev/null || true
  [ "${PG_TOKEN_KEEP:-0}" = 1 ] || rm -rf "$RUN"
}
trap cleanup EXIT

step "end-to-end: throwaway cluster on 127.0.0.1:$PGT_PORT"
# Log every statement: the leak check at the end then proves statements carrying tokens are
# kept out of the log, not merely that nobody logged them.
bash scripts/cluster.sh start "$PGT_DATA" "$PGT_PORT" \
  "log_statement = 'all'" "log_connections = on" "log_min_error_statement = error" \
  "log_parameter_max_length = 4096" \
  "token.last_used_interval = 1"

step "end-to-end: Python psycopg (pytest)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e

for suite in tests/client-rust tests/isolation tests/standby; do
  if [ -x "$suite/run.sh" ]; then
    step "end-to-end: $suite"
    bash "$suite/run.sh"
  fi
done

step "no token in any log"
# The clusters, pgbouncer logs and dumps this run started and wrote. (cargo pgrx test's own
# cluster is gone by now: pgrx deletes its data directory and keeps its log in a pipe.)
"$VENV/bin/python" tests/leakcheck.py "$PGT_TOKENS" "$RUN"

step "all tests passed"
