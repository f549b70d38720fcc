#!/usr/bin/env bash
# Model-checked mixed load (issue 16): validators and administrators race for MODEL_SECONDS,
# every call is recorded with its start and end, and a checker replays the history and reports
# every verdict no ordering consistent with those times allows (tests/model/mixed_load.py says
# what runs, tests/model/checker.py what the model is). The checker's self-test
# (test_checker.py: fabricated histories with known violations) runs first.
#
#   bash tests/model/run.sh                       60 s, 16 validators, 4 admins at 100 ops/s
#   MODEL_SECONDS=15 bash tests/model/run.sh      the short form scripts/test.sh runs
#   (also MODEL_VALIDATORS, MODEL_ADMINS, MODEL_RATE)
#
#   Under scripts/test.sh: uses the cluster it started (PGT_HOST, PGT_PORT, PGT_SOCKET,
#   PGT_DATA, PGT_RUN, PGT_TOKENS) and a database of its own, pgt_model.
#   Standalone (PGT_PORT unset): starts a throwaway cluster with scripts/cluster.sh (PGBIN
#   picks the server), runs the load and the leak check, and stops it on exit
#   (PG_TOKEN_KEEP=1 keeps its directory).
#
# Prints the counts; exits non-zero on any anomaly or unexpected error. The history (token ids
# and hints, never a token) stays in the run directory only when something failed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$HERE/test_checker.py"

standalone=0
if [ -z "${PGT_PORT:-}" ]; then
  standalone=1
  RUN=$(mktemp -d /tmp/pg_token-model-XXXXXX)
  chmod 755 "$RUN"   # the cluster runs as postgres, below this directory
  export PGT_RUN=$RUN PGT_DATA=$RUN/primary PGT_HOST=127.0.0.1 PGT_TOKENS=$RUN/generated-tokens.txt
  export PGT_SOCKET=$PGT_DATA
  PGT_PORT=$(bash "$CLUSTER" free-port); export PGT_PORT
  : >"$PGT_TOKENS"
  stop_cluster() {
    bash "$CLUSTER" stop "$PGT_DATA" || true
    if [ "${PG_TOKEN_KEEP:-0}" = 1 ] || [ -e "$RUN/model-anomalies.json" ]; then echo "kept $RUN"; else rm -rf "$RUN"; fi
  }
  trap stop_cluster EXIT
  bash "$CLUSTER" start "$PGT_DATA" "$PGT_PORT" "log_statement = 'all'" "log_connections = on" \
    "log_min_error_statement = error" "token.last_used_interval = 1" "max_connections = 100"
  echo "[model] standalone cluster on $PGT_HOST:$PGT_PORT in $PGT_DATA"
fi

"$VENV/bin/python" "$HERE/mixed_load.py"

if [ "$standalone" = 1 ]; then
  "$VENV/bin/python" "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN"
fi
