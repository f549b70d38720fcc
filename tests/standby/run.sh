#!/usr/bin/env bash
# pg_token on a real streaming hot standby: t/*.pl, TAP tests on PostgreSQL::Test::Cluster
# (the Perl modules Debian ships in postgresql-server-dev-15), run with prove as the postgres
# user. The test starts its own primary and standby; it does not use scripts/test.sh's cluster.
#
#   bash tests/standby/run.sh     alone: a throwaway run directory, the leak check over
#                                 everything the run wrote, then the directory is removed
#   scripts/test.sh               runs it with PGT_RUN and PGT_TOKENS set (all it uses)
#
# Everything goes under $PGT_RUN/standby: tmp_check/ (the clusters' data directories, kept
# so that the leak check searches them too, and tmp_check/log/ with the server logs and
# regress_log_*) and tmp/ (the clusters' socket directories). Every token the test receives
# is appended to $PGT_TOKENS. PG_TOKEN_KEEP=1 keeps a standalone run's directory; a failed
# standalone run always keeps it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGXS=${PGXS:-/usr/lib/postgresql/15/lib/pgxs}

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@";
  elif [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@";
  else sudo -u postgres -- "$@"; fi
}

standalone=0
if [ -z "${PGT_RUN:-}" ] || [ -z "${PGT_TOKENS:-}" ]; then
  standalone=1
  PGT_RUN=$(mktemp -d /tmp/pg_token-standby-XXXXXX)
  chown postgres:postgres "$PGT_RUN" 2>/dev/null || sudo chown postgres:postgres "$PGT_RUN"
  chmod 755 "$PGT_RUN"
  PGT_TOKENS=$PGT_RUN/generated-tokens.txt
  : >"$PGT_TOKENS"
  chmod 666 "$PGT_TOKENS"
fi

TESTDIR=$PGT_RUN/standby
status=1
finish() {
  # The test stops its clusters itself; this catches a test that was killed or crashed.
  local pid
  for pid in "$TESTDIR"/tmp_check/t_*_data/pgdata/postmaster.pid; do
    if [ -f "$pid" ]; then
      as_postgres "$PGBIN/pg_ctl" -D "$(dirname "$pid")" -m immediate -w stop >/dev/null 2>&1 || true
    fi
  done
  if [ "$standalone" = 1 ]; then
    if [ "$status" = 0 ]; then
      python3 "$ROOT/tests/leakcheck.py" "$PGT_TOKENS" "$PGT_RUN" || status=1
    fi
    if [ "$status" = 0 ] && [ "${PG_TOKEN_KEEP:-0}" != 1 ]; then
      rm -rf "$PGT_RUN"
    else
      echo "standby: run directory kept: $PGT_RUN" >&2
    fi
  fi
  exit "$status"
}
trap finish EXIT

rm -rf "$TESTDIR"
as_postgres mkdir -p "$TESTDIR/tmp"

start=$(date +%s%N)
# From here prove finds t/; the TAP modules put tmp_check/ under TESTDIR.
# No Rust backtrace variables: pgrx would append backtraces to error details.
if (cd "$HERE" && as_postgres env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE \
      PATH="$PGBIN:$PATH" \
      PERL5LIB="$PGXS/src/test/perl" \
      PG_REGRESS="$PGXS/src/test/regress/pg_regress" \
      TESTDIR="$TESTDIR" \
      TMPDIR="$TESTDIR/tmp" \
      PG_TEST_NOCLEAN=1 \
      PGT_TOKENS="$PGT_TOKENS" \
      prove t/*.pl); then
  status=0
else
  echo "standby: failed; logs in $TESTDIR/tmp_check/log" >&2
fi
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf 'standby: done in %d.%03d s\n' $((ms / 1000)) $((ms % 1000))
