#!/usr/bin/env bash
# Random input at the SQL surface (tests/fuzz/fuzz.py says what it sends and what must hold):
# FUZZ_CASES cases (default 100,000) against every function a pg_token role may call, seeded
# (FUZZ_SEED replays a run; the seed is printed first).
#
#   Under scripts/test.sh: uses the cluster it started (PGT_HOST, PGT_PORT, PGT_SOCKET,
#   PGT_DATA, PGT_RUN, PGT_TOKENS) and its own database, pgt_fuzz; the final leak check of
#   scripts/test.sh covers what it wrote.
#   Standalone (`bash tests/fuzz/run.sh`, PGT_PORT unset): starts a throwaway cluster with
#   scripts/cluster.sh (PGBIN picks the server), runs the fuzzer and the leak check, and stops
#   it on exit (PG_TOKEN_KEEP=1 keeps its directory).
#
# Exits non-zero on any failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

standalone=0
if [ -z "${PGT_PORT:-}" ]; then
  standalone=1
  RUN=$(mktemp -d /tmp/pg_token-fuzz-XXXXXX)
  chmod 755 "$RUN"   # the cluster runs as postgres, below this directory
  export PGT_RUN=$RUN PGT_DATA=$RUN/primary PGT_HOST=127.0.0.1 PGT_TOKENS=$RUN/generated-tokens.txt
  export PGT_SOCKET=$PGT_DATA
  PGT_PORT=$(bash "$CLUSTER" free-port); export PGT_PORT
  : >"$PGT_TOKENS"
  stop_cluster() {
    bash "$CLUSTER" stop "$PGT_DATA" || true
    if [ "${PG_TOKEN_KEEP:-0}" = 1 ]; then echo "kept $RUN"; else rm -rf "$RUN"; fi
  }
  trap stop_cluster EXIT
  # As scripts/test.sh starts its cluster: every statement logged, so the leak check proves
  # the statements and parameters carrying tokens are masked.
  bash "$CLUSTER" start "$PGT_DATA" "$PGT_PORT" "log_statement = 'all'" "log_connections = on" \
    "log_min_error_statement = error" "log_parameter_max_length = 4096" "token.last_used_interval = 1"
  echo "[fuzz] standalone cluster on $PGT_HOST:$PGT_PORT in $PGT_DATA"
fi

"$VENV/bin/python" "$HERE/fuzz.py"

if [ "$standalone" = 1 ]; then
  "$VENV/bin/python" "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN"
fi
