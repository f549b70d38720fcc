#!/usr/bin/env bash
# Concurrency promises, proven with pg_isolation_regress: what one session sees while another
# revokes, rotates, locks or changes the registry. Specs in specs/, expected outputs in
# expected/ (checked in), shared helpers in helpers.sql.
#
#   bash tests/isolation/run.sh     alone: starts a throwaway cluster, runs the specs, runs the
#                                   leak check over everything the run wrote, stops the cluster
#   scripts/test.sh                 runs it against its own cluster (PGT_* variables set)
#
# The specs run in a database of their own (pgt_iso), created here and dropped at the end;
# the plaintext tokens they received are appended to $PGT_TOKENS first. Outputs go to
# $PGT_RUN/isolation (results/, regression.diffs). PG_TOKEN_KEEP=1 keeps a standalone run's
# directory; a failed standalone run always keeps it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ISOLATION=${ISOLATION:-/usr/lib/postgresql/15/lib/pgxs/src/test/isolation}
DB=pgt_iso
SPECS=(revoke_vs_validate rotate_vs_rotate last_used_no_wait registry_vs_validate token_change_vs_validate
       revoke_tree_vs_rotate account_revoke_vs_generate registry_serializable
       family_reuse_vs_validate family_rotate_vs_rotate revoke_a_while_b_cached)

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@";
  elif [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@";
  else sudo -u postgres -- "$@"; fi
}

standalone=0
if [ -z "${PGT_PORT:-}" ]; then
  standalone=1
  PGT_RUN=$(mktemp -d /tmp/pg_token-isolation-XXXXXX)
  chown postgres:postgres "$PGT_RUN" 2>/dev/null || sudo chown postgres:postgres "$PGT_RUN"
  chmod 755 "$PGT_RUN"
  PGT_DATA=$PGT_RUN/primary
  PGT_SOCKET=$PGT_DATA
  PGT_PORT=$(bash "$ROOT/scripts/cluster.sh" free-port)
  PGT_TOKENS=$PGT_RUN/generated-tokens.txt
  : >"$PGT_TOKENS"
  chmod 666 "$PGT_TOKENS"
  # The settings scripts/test.sh gives its cluster.
  bash "$ROOT/scripts/cluster.sh" start "$PGT_DATA" "$PGT_PORT" \
    "log_statement = 'all'" "log_connections = on" "log_min_error_statement = error" \
    "token.last_used_interval = 1"
fi

psql_su() {
  as_postgres env PGOPTIONS='-c client_min_messages=warning' "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGT_SOCKET" -p "$PGT_PORT" -U postgres "$@"
}

status=1
finish() {
  # Record every token the specs received, then drop the database that held them.
  psql_su -d "$DB" -At -c "SELECT token FROM iso.issued" >>"$PGT_TOKENS" 2>/dev/null || true
  psql_su -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || status=1
  if [ "$standalone" = 1 ]; then
    bash "$ROOT/scripts/cluster.sh" stop "$PGT_DATA"
    if [ "$status" = 0 ]; then
      python3 "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN" || status=1
    fi
    if [ "$status" = 0 ] && [ "${PG_TOKEN_KEEP:-0}" != 1 ]; then
      rm -rf "$PGT_RUN"
    else
      echo "isolation: run directory kept: $PGT_RUN" >&2
    fi
  fi
  exit "$status"
}
trap finish EXIT

OUT=$PGT_RUN/isolation
rm -rf "$OUT"
as_postgres mkdir -p "$OUT"

psql_su -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
psql_su -d "$DB" -f "$HERE/helpers.sql" >/dev/null

start=$(date +%s%N)
if as_postgres "$ISOLATION/pg_isolation_regress" --use-existing \
    --host="$PGT_SOCKET" --port="$PGT_PORT" --user=postgres --dbname="$DB" \
    --inputdir="$HERE" --outputdir="$OUT" "${SPECS[@]}"; then
  status=0
else
  [ -f "$OUT/regression.diffs" ] && cat "$OUT/regression.diffs"
fi
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf 'isolation: %d specs in %d.%03d s\n' "${#SPECS[@]}" $((ms / 1000)) $((ms % 1000))
