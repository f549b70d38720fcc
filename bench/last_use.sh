#!/usr/bin/env bash
# What last-use updates cost, alone: the three uniform rows of `make bench` (primary-key lookup,
# validate_token with and without last-use updates) on a throwaway cluster with 1M tokens made
# by bench.py, interleaved round by round, plus the event writer's WAL per last-use update and
# the share of its updates that were HOT. A smaller, faster cousin of bench/run.sh for work on
# the writer; ratios are only meaningful within one run.
#
#   PGBIN=/opt/lastuse/16/bin bash bench/last_use.sh
#
#   PGBIN            the PostgreSQL to run (pg_token installed in it)  (default Debian's 15)
#   LU_TOKENS        tokens in the table                              (default 1000000)
#   LU_SECONDS       seconds per pgbench run                          (default 8)
#   LU_ROUNDS        rounds                                           (default 3)
#   LU_DIR           the cluster's directory (removed on exit)        (default /tmp/pg_token-last-use)
#   LU_SHARED_CACHE  token.shared_cache_size, as make bench sets it   (default 1GB)
#   LU_STEADY        intervals (s) whose steady state to measure after the rounds (default 60;
#                    empty: none). Each: validate_uniform under that token.last_used_interval for
#                    the interval plus LU_WARM seconds, unmeasured, then LU_ROUNDS rounds of
#                    pk_lookup and validate_uniform under it, with the writes per validation.
#   LU_WARM          seconds of warm-up beyond the interval                  (default 60)
# Needs root or sudo (the cluster runs as `postgres`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NTOKENS=${LU_TOKENS:-1000000}
SECONDS_PER_RUN=${LU_SECONDS:-8}
ROUNDS=${LU_ROUNDS:-3}
DIR=${LU_DIR:-/tmp/pg_token-last-use}
SHARED_CACHE=${LU_SHARED_CACHE:-1GB}
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"
OUT=$(mktemp -d)

if [ -f "$DIR/postmaster.pid" ] && kill -0 "$(head -1 "$DIR/postmaster.pid")" 2>/dev/null; then
  echo "last_use: a server is running in $DIR; stop it or set LU_DIR" >&2
  exit 1
fi
rm -rf "$DIR"
cleanup() {
  bash scripts/cluster.sh stop "$DIR" || true
  rm -rf "$DIR" "$OUT"
}
trap cleanup EXIT
PORT=$(bash scripts/cluster.sh free-port)
bash scripts/cluster.sh start "$DIR" "$PORT" "shared_buffers = '2GB'" "max_wal_size = '16GB'" \
  "checkpoint_timeout = '30min'" "autovacuum = off" "jit = off" "max_connections = 20" \
  "token.shared_cache_size = '$SHARED_CACHE'"
psql_su() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d bench "$@"; }
"$PGBIN/createdb" -h "$DIR" -p "$PORT" -U postgres bench
psql_su -f bench/schema.sql >/dev/null
"$VENV/bin/python" bench/bench.py load --host "$DIR" --port "$PORT" --to "$NTOKENS"
psql_su >/dev/null <<'SQL'
CREATE EXTENSION pg_prewarm;
SELECT pg_prewarm(c.oid) FROM pg_class c
 WHERE c.relnamespace IN ('token'::regnamespace, 'bench'::regnamespace) AND c.relkind IN ('r', 'i');
SQL
# As make bench: the shared cache holds every token before the rounds (a running server's).
PGOPTIONS="-c token.last_used_interval=-1 -c token.cache_size=0" \
  psql_su -c "SELECT count(token.validate_token(token)) FROM bench.plain" >/dev/null
echo "last_use: PostgreSQL $("$PGBIN/pg_config" --version), $NTOKENS tokens, token.tokens" \
  "$(psql_su -Atc "SELECT pg_size_pretty(pg_relation_size('token.tokens')) || ', reloptions ' || coalesce(reloptions::text, '{}') FROM pg_class WHERE oid = 'token.tokens'::regclass")"

run() {  # script [server options]: prints its TPS
  local log="$OUT/$1.log"
  psql_su -c "SELECT token.flush_events('60 s')" -c "CHECKPOINT" >/dev/null
  PGOPTIONS="${2:-}" "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c 4 -j 2 \
    -T "$SECONDS_PER_RUN" -D ntokens="$NTOKENS" -f "$ROOT/bench/scripts/$1.pgbench" bench >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
  sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log"
}
for round in $(seq 1 "$ROUNDS"); do
  pk=$(run pk_lookup)
  no_touch=$(run validate_uniform "-c token.last_used_interval=-1")
  # With last-use updates: bench.py's last-use row (a CHECKPOINT first, then WAL, HOT share).
  "$VENV/bin/python" bench/bench.py last-use --host "$DIR" --port "$PORT" --pgbin "$PGBIN" --scripts "$ROOT/bench/scripts" \
    --out "$OUT" --seconds "$SECONDS_PER_RUN" --tokens "$NTOKENS" --json "$OUT/last-use-$round.json" >/dev/null
  "$VENV/bin/python" - "$round" "$pk" "$no_touch" "$OUT/last-use-$round.json" <<'PY'
import json, sys
r, pk, nt, j = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), json.load(open(sys.argv[4]))
t = j["tps"]
fpi = "" if j["fpi_bytes"] is None else f" ({j['wal_per_update_without_fpi']:,.0f} without full-page images)"
print(f"round {r}: pk_lookup {pk:,.0f} tps | validate_uniform_no_touch {nt:,.0f} ({nt / pk:.0%}) | "
      f"validate_uniform {t:,.0f} ({t / pk:.0%}) | {j['updates']:,} last-use updates, "
      f"{j['wal_per_update']:,.0f} WAL bytes each{fpi}, HOT {j['hot_share']:.0%} ({j['hot']:,}/{j['hot'] + j['cold']:,}), "
      f"queue written/dropped {j['touch_written']:,}/{j['touch_dropped']:,}, writer CPU {j['writer_cpu_s'] or 0:.2f} s", flush=True)
PY
  if [ "$round" = 1 ]; then echo "WAL records of round 1's validate_uniform (type, count, FPI bytes):"; head -12 "$OUT/last-use-wal.txt" 2>/dev/null; fi
done

# Steady state: a server validating uniform traffic for longer than the interval has spread its
# tokens' last writes over time, so only the tokens whose interval ran out are written (the
# rounds above start each run with every token due: the first interval after enabling it).
steady_run() {  # interval: prints "TPS writes-per-validation"
  local t0 t1 tps n
  t0=$(psql_su -Atc "SELECT clock_timestamp()")
  tps=$(run validate_uniform "-c token.last_used_interval=$1")
  psql_su -c "SELECT token.flush_events('60 s')" >/dev/null
  t1=$(psql_su -Atc "SELECT clock_timestamp()")
  n=$(psql_su -Atc "SELECT count(*) FROM token.tokens WHERE last_used_at BETWEEN '$t0' AND '$t1'")
  echo "$tps $(awk -v n="$n" -v t="$tps" -v s="$SECONDS_PER_RUN" 'BEGIN { printf "%.3f", n / (t * s) }')"
}
for interval in ${LU_STEADY-60}; do
  warm=$((interval + ${LU_WARM:-60}))
  echo "steady state, token.last_used_interval = $interval s: $warm s of validate_uniform first"
  PGOPTIONS="-c token.last_used_interval=$interval" "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared \
    -c 4 -j 2 -T "$warm" -D ntokens="$NTOKENS" -f "$ROOT/bench/scripts/validate_uniform.pgbench" bench >"$OUT/warm.log" 2>&1 \
    || { cat "$OUT/warm.log" >&2; exit 1; }
  for round in $(seq 1 "$ROUNDS"); do
    pk=$(run pk_lookup)
    read -r tps per < <(steady_run "$interval")
    awk -v r="$round" -v pk="$pk" -v t="$tps" -v w="$per" -v i="$interval" 'BEGIN {
      printf "steady %d s, round %d: pk_lookup %.0f tps | validate_uniform %.0f (%.0f%%), %.2f writes per validation\n", i, r, pk, t, 100 * t / pk, w }'
  done
done
