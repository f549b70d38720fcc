#!/usr/bin/env bash
# End-to-end test of the HTTP example (examples/http): the service runs as uvicorn processes on
# 127.0.0.1 (free ports) in front of the cluster, and pytest drives it over real HTTP with
# httpx (tests/http/test_http.py says what it proves), ending with a 10 s load run against
# both variants (pg_token, and plain SQL + pgcrypto) that prints requests/s and p99.
#
#   Under scripts/test.sh: uses the cluster it started (PGT_HOST, PGT_PORT, PGT_SOCKET,
#   PGT_DATA, PGT_RUN, PGT_TOKENS) and its own databases, pgt_http and pgt_http_prod.
#   Standalone (`bash tests/http/run.sh`, PGT_PORT unset): starts a throwaway cluster with
#   scripts/cluster.sh, runs the test and the leak check, and stops it on exit
#   (PG_TOKEN_KEEP=1 keeps its directory).
#
# Needs examples/http/requirements.txt in the venv. Exits non-zero on any failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

if ! "$VENV/bin/python" -c 'import fastapi, uvicorn, httpx, psycopg_pool' 2>/dev/null; then
  echo "tests/http: missing packages; run: $VENV/bin/pip install -r examples/http/requirements.txt" >&2
  exit 1
fi

standalone=0
if [ -z "${PGT_PORT:-}" ]; then
  standalone=1
  RUN=$(mktemp -d /tmp/pg_token-http-XXXXXX)
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
  bash "$CLUSTER" start "$PGT_DATA" "$PGT_PORT" "log_statement = 'all'" "log_connections = on" \
    "log_min_error_statement = error" "token.last_used_interval = 1"
  echo "[http] standalone cluster on $PGT_HOST:$PGT_PORT in $PGT_DATA"
fi

# The fixtures drop and create the suite's databases and role; the services log into $PGT_RUN.
cd "$HERE"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider test_http.py

if [ "$standalone" = 1 ]; then
  # What scripts/test.sh does at the end, for this run only: no token on disk anywhere
  # (server log, data files, and the services' logs).
  "$VENV/bin/python" "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN"
fi
