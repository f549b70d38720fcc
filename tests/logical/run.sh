#!/usr/bin/env bash
# Logical replication between two real clusters (tests/logical/test_logical.py says what it
# proves): a publisher (wal_level = logical) and a subscriber, both started with
# scripts/cluster.sh on free loopback ports under $PGT_RUN/logical and stopped by the test.
# Prints the measured lag from the publisher's commit to the refusal on the subscriber for a
# revoke, a disable, a key-type change and a legacy issuer cut-off, and the subscriber's cache
# hits and misses under a stream of replicated last-use updates. About 15 s.
#
#   bash tests/logical/run.sh     alone: a throwaway run directory, the leak check over
#                                 everything the run wrote, then the directory is removed
#                                 (PG_TOKEN_KEEP=1 keeps it; a failed run always keeps it)
#   scripts/test.sh               runs it with PGT_RUN and PGT_TOKENS set (all it uses)
#
# PGBIN picks the server (default: Debian's PostgreSQL 15).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"

standalone=0
if [ -z "${PGT_RUN:-}" ] || [ -z "${PGT_TOKENS:-}" ]; then
  standalone=1
  PGT_RUN=$(mktemp -d /tmp/pg_token-logical-XXXXXX)
  chmod 755 "$PGT_RUN"   # the clusters run as postgres, below this directory
  PGT_TOKENS=$PGT_RUN/generated-tokens.txt
  : >"$PGT_TOKENS"
  chmod 666 "$PGT_TOKENS"
  export PGT_RUN PGT_TOKENS
fi

status=1
finish() {
  # The test stops its clusters itself; this catches a test that was killed.
  for d in "$PGT_RUN"/logical/*/; do
    [ -f "$d/postmaster.pid" ] && bash "$ROOT/scripts/cluster.sh" stop "$d"
  done 2>/dev/null || true
  if [ "$standalone" = 1 ]; then
    if [ "$status" = 0 ]; then
      "$VENV/bin/python" "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN" || status=1
    fi
    if [ "$status" = 0 ] && [ "${PG_TOKEN_KEEP:-0}" != 1 ]; then
      rm -rf "$PGT_RUN"
    else
      echo "logical: run directory kept: $PGT_RUN" >&2
    fi
  fi
  exit "$status"
}
trap finish EXIT

cd "$HERE"
if "$VENV/bin/python" -m pytest -q -s -p no:cacheprovider test_logical.py; then
  status=0
fi
