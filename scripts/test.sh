#!/usr/bin/env bash
# Runs every test pg_token has, from a fresh machine: `make test` (and `.ci/run`) call this.
#
#   bash scripts/test.sh            the full suite on PostgreSQL 15, then the version matrix
#                                   (14, 16, 17, 18)
#   bash scripts/test.sh --pg 17    one version only, for development (repeatable: --pg 14 --pg 18)
#
# The full suite (the default version, 15):
#   1. set-up (idempotent): apt packages, cargo-pgrx 0.18.0, the Python venv, the other servers
#   2. the layout check (scripts/check_layout.py), then the pure core's unit and property tests:
#      cargo test -p pg_token_core, no pgrx, no Postgres
#   3. in-database tests: cargo pgrx test pg15 (pgrx's own throwaway cluster)
#   4. packages: the .deb built by scripts/package.sh, installed with dpkg, CREATE EXTENSION and a
#      validation on a fresh cluster
#   5. the README's demo command, checked for the lifecycle it must print
#   6. end-to-end tests from real clients over TCP on a throwaway cluster: Python psycopg
#      (pytest, on a fresh install and again on a database upgraded from 0.1.0; PostgREST's
#      transaction, pgbouncer), Rust tokio-postgres, Node.js pg, the HTTP example over real
#      HTTP (uvicorn + httpx, with a load run), isolation specs (pg_isolation_regress), a hot
#      standby (TAP), logical replication between a publisher and a subscriber cluster
#      (tests/logical, about 15 s), random input at the SQL surface (tests/fuzz: 100,000
#      seeded cases against every function a pg_token role may call, about a minute and a half
#      on two cores; the seed is printed, FUZZ_SEED replays it, FUZZ_CASES changes the count),
#      and a model-checked mixed load of 15 s (tests/model: validators racing administrators,
#      every verdict replayed against the committed history)
# The matrix, for each other version: cargo pgrx test pgNN; the package (tarball) installed into
# a clean copy of that server; the end-to-end pytest suite on a fresh install and on an upgraded
# one; the isolation specs.
# Finally every server log and data file written during the run is searched for every token the
# run generated.
#
# Everything it starts is stopped on exit. Set PG_TOKEN_KEEP=1 to keep the run directory, and
# PG_TOKEN_RUN=/some/dir to use another one than /tmp/pg_token-test-run (two checkouts
# testing at once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/versions.sh

versions=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pg) versions+=("$2"); shift 2 ;;
    *) echo "usage: $0 [--pg NN]..." >&2; exit 2 ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || read -r -a versions <<<"$PG_TOKEN_ALL_VERSIONS"
# The default version first: its full suite fails fastest on a real problem.
ordered=()
for v in "${versions[@]}"; do [ "$v" = "$PG_TOKEN_DEFAULT_VERSION" ] && ordered+=("$v"); done
for v in "${versions[@]}"; do [ "$v" != "$PG_TOKEN_DEFAULT_VERSION" ] && ordered+=("$v"); done

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started=$(date +%s)
timings=()
took() { timings+=("$1: $(( $(date +%s) - $2 )) s"); }

step "set-up"
PG_TOKEN_VERSIONS="${ordered[*]}" bash scripts/setup.sh
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

step "layout: pure core, no import cycles, one error map"
python3 scripts/check_layout.py

step "unit and property tests of the pure core (no pgrx, no Postgres)"
cargo test -p pg_token_core

# One run directory for everything the end-to-end stages start, owned by postgres.
RUN=${PG_TOKEN_RUN:-/tmp/pg_token-test-run}
for d in "$RUN"/*/; do [ -f "$d/postmaster.pid" ] && PGBIN=$(cat "$d/.pgbin" 2>/dev/null || echo /usr/lib/postgresql/15/bin) bash scripts/cluster.sh stop "$d"; done 2>/dev/null || true
rm -rf "$RUN"
mkdir -p "$RUN" && chown postgres:postgres "$RUN" && chmod 755 "$RUN"
export PGT_RUN=$RUN
export PGT_TOKENS=$RUN/generated-tokens.txt   # every plaintext token a test receives; never a log
: >"$PGT_TOKENS"; chmod 666 "$PGT_TOKENS"
export PGT_HOST=127.0.0.1
cleanup() {
  for d in "$RUN"/*/; do
    [ -f "$d/postmaster.pid" ] && PGBIN=$(cat "$d/.pgbin" 2>/dev/null || echo /usr/lib/postgresql/15/bin) bash scripts/cluster.sh stop "$d"
  done 2>/dev/null || true
  pkill -f "pgbouncer.*$RUN" 2>/dev/null || true
  [ "${PG_TOKEN_KEEP:-0}" = 1 ] || rm -rf "$RUN"
}
trap cleanup EXIT

in_database() {
  local v=$1 data=$RUN-pgrx-$1
  step "PostgreSQL $v: in-database tests (cargo pgrx test pg$v)"
  mkdir -p "$data" && chown postgres:postgres "$data"
  if [ "$(id -u)" -eq 0 ]; then
    env -u RUST_BACKTRACE CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$data" \
      cargo pgrx test --no-default-features --features "pg$v" "pg$v"
  else
    env -u RUST_BACKTRACE cargo pgrx test --no-default-features --features "pg$v" "pg$v"
  fi
}

# Starts the version's end-to-end cluster; exports what the suites read.
start_cluster() {
  local v=$1 bindir=$2
  export PGBIN=$bindir
  export PGT_DATA=$RUN/pg$v
  PGT_PORT=$(bash scripts/cluster.sh free-port); export PGT_PORT
  export PGT_SOCKET=$PGT_DATA
  step "PostgreSQL $v: throwaway cluster on 127.0.0.1:$PGT_PORT ($bindir)"
  # Log every statement: the leak check at the end then proves statements carrying tokens are
  # kept out of the log, not merely that nobody logged them.
  bash scripts/cluster.sh start "$PGT_DATA" "$PGT_PORT" \
    "log_statement = 'all'" "log_connections = on" "log_min_error_statement = error" \
    "log_parameter_max_length = 4096" \
    "token.last_used_interval = 1"
  echo "$bindir" >"$PGT_DATA/.pgbin"
}

stop_cluster() {
  bash scripts/cluster.sh stop "$PGT_DATA"
}

e2e() {
  local v=$1 label=$2; shift 2
  step "PostgreSQL $v: end-to-end, Python psycopg (pytest), $label"
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

isolation() {
  local v=$1 bindir=$2
  step "PostgreSQL $v: isolation specs (pg_isolation_regress)"
  ISOLATION="$("$bindir/pg_config" --pkglibdir)/pgxs/src/test/isolation" bash tests/isolation/run.sh
}

full_suite() {
  local v=$1 t=$(date +%s)
  in_database "$v"
  step "PostgreSQL $v: the packages"
  bash scripts/package.sh "$v"
  bash tests/package/run.sh "$v" "$RUN" >/dev/null
  step "the demo command (README): the whole lifecycle, narrated"
  bash tests/demo/run.sh
  start_cluster "$v" "$(pg_bindir_for "$v")"
  e2e "$v" "fresh install" tests/e2e
  PGT_UPGRADE_FROM=0.1.0 e2e "$v" "on a database upgraded from 0.1.0" tests/e2e
  for suite in tests/client-rust tests/client-node tests/http tests/standby tests/logical tests/fuzz; do
    step "PostgreSQL $v: end-to-end, $suite"
    bash "$suite/run.sh"
  done
  step "PostgreSQL $v: model-checked mixed load, 15 s (full length: bash tests/model/run.sh)"
  MODEL_SECONDS=15 bash tests/model/run.sh
  isolation "$v" "$PGBIN"
  stop_cluster
  took "PostgreSQL $v (full suite)" "$t"
}

matrix() {
  local v=$1 t=$(date +%s) bindir
  in_database "$v"
  step "PostgreSQL $v: the packages, installed into a clean copy of the server"
  bash scripts/package.sh "$v"
  bindir=$(bash tests/package/run.sh "$v" "$RUN" | tail -1)
  start_cluster "$v" "$bindir"
  e2e "$v" "fresh install" tests/e2e
  PGT_UPGRADE_FROM=0.1.0 e2e "$v" "on a database upgraded from 0.1.0" tests/e2e
  isolation "$v" "$bindir"
  stop_cluster
  took "PostgreSQL $v (matrix)" "$t"
}

for v in "${ordered[@]}"; do
  if [ "$v" = "$PG_TOKEN_DEFAULT_VERSION" ]; then full_suite "$v"; else matrix "$v"; fi
done

step "no token in any log"
# The clusters, pgbouncer logs and dumps this run started and wrote. (cargo pgrx test's own
# clusters are gone by now: pgrx deletes their data directories and keeps their logs in a pipe.)
"$VENV/bin/python" tests/leakcheck.py "$PGT_TOKENS" "$RUN"

took "total" "$started"
step "all tests passed (${ordered[*]})"
printf '  %s\n' "${timings[@]}"
