#!/usr/bin/env bash
# End-to-end test from a Node.js application: node-postgres (`pg` from npm) over TCP with a
# SCRAM password, as ordinary roles (client.mjs says what it proves).
#
#   Under scripts/test.sh: uses the cluster it started (PGT_HOST, PGT_PORT, PGT_SOCKET,
#   PGT_DATA, PGT_RUN, PGT_TOKENS) and its own database, pgt_node.
#   Standalone (`bash tests/client-node/run.sh`, PGT_PORT unset): starts a throwaway cluster
#   with scripts/cluster.sh, runs the test and the leak check, and stops it on exit
#   (PG_TOKEN_KEEP=1 keeps its directory).
#
# Needs Node.js 18 or later and npm (the registry, on the first run). Exits non-zero on any
# failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
export PGT_DB=${PGT_DB:-pgt_node}

# Install exactly what package-lock.json pins, first: a missing package should not leave a
# half set-up database behind.
(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

standalone=0
if [ -z "${PGT_PORT:-}" ]; then
  standalone=1
  RUN=$(mktemp -d /tmp/pg_token-client-node-XXXXXX)
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
  echo "[node] standalone cluster on $PGT_HOST:$PGT_PORT in $PGT_DATA"
fi

# A fresh database of our own; the cluster is shared with the other suites.
PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h "$PGT_SOCKET" -p "$PGT_PORT" -U postgres -d postgres \
  -c "DROP DATABASE IF EXISTS $PGT_DB WITH (FORCE)" -c "CREATE DATABASE $PGT_DB"

node "$HERE/client.mjs"

if [ "$standalone" = 1 ]; then
  # What scripts/test.sh does at the end, for this run only: no token on disk anywhere.
  python3 "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN"
fi
