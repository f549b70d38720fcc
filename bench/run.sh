#!/usr/bin/env bash
# `make bench`: pg_token against SELECT 1, a primary-key lookup and the plain SQL + pgcrypto
# validation a user would otherwise write, on a throwaway cluster with 1M tokens, plus the
# per-validation CPU cost in one statement at several table sizes. Writes
# bench/results/latest.md (the table) and bench/results/latest.png (the chart).
#
#   BENCH_SECONDS   seconds per pgbench run           (default 20)
#   BENCH_TOKENS    tokens for the pgbench runs        (default 1000000)
#   BENCH_SIZES     table sizes for the per-token cost (default 10000,1000000,10000000)
#   BENCH_LOOKUPS   validations in the one statement   (default 200000)
#
# pgbench runs -M prepared -c 4 -j 2. Timings are only comparable within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_RUN=${BENCH_SECONDS:-20}
NTOKENS=${BENCH_TOKENS:-1000000}
SIZES=${BENCH_SIZES:-10000,1000000,10000000}
LOOKUPS=${BENCH_LOOKUPS:-200000}
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"
PGBIN=/usr/lib/postgresql/15/bin

bash scripts/setup.sh
# Always (re)install the release build: `cargo pgrx test` leaves a debug build with test
# objects installed, which would be measured instead.
bash scripts/install.sh >/dev/null
make -s -C bench/pg_token_bench install >/dev/null

DIR=/tmp/pg_token-bench
OUT=bench/out
mkdir -p "$OUT" bench/results
[ -f "$DIR/postmaster.pid" ] && bash scripts/cluster.sh stop "$DIR"
rm -rf "$DIR"
PORT=$(bash scripts/cluster.sh free-port)
bash scripts/cluster.sh start "$DIR" "$PORT" \
  "shared_buffers = '6GB'" "max_wal_size = '16GB'" "checkpoint_timeout = '30min'" \
  "synchronous_commit = off" "autovacuum = off" "max_connections = 30"
trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$DIR"' EXIT

runas=()
[ "$(id -u)" -eq 0 ] && runas=(runuser -u postgres --)
psql_su() { "${runas[@]}" "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d bench "$@"; }
"${runas[@]}" "$PGBIN/createdb" -h "$DIR" -p "$PORT" -U postgres bench

psql_su <<'SQL'
CREATE EXTENSION pg_token;
CREATE EXTENSION pg_token_bench;
SELECT token.create_key_type('agent');
SELECT token.register_prefix('bench_', 'agent', 'dev');
SQL
psql_su -f bench/baseline.sql

# Grows token.tokens to $1 rows: the n-th row is bench_token('bench_', n), written the way
# generate_token writes it (hash, hint, prefix, account, key type, environment).
grow_to() {
  local target=$1 have
  have=$(psql_su -Atc "SELECT count(*) FROM token.tokens")
  [ "$have" -ge "$target" ] && return
  echo "bench: loading tokens $((have + 1))..$target"
  psql_su <<SQL
SET session_replication_role = replica;  -- skip the key-type FK check per row; checked below
INSERT INTO token.tokens (id, token_hash, hint, prefix, account, key_type, environment)
SELECT bench_id(n), sha256(convert_to(t, 'UTF8')), left(t, 10), 'bench_', 'acct' || (n % 100000), 'agent', 'dev'
  FROM generate_series($((have + 1))::bigint, $target) n, LATERAL bench_token('bench_', n) t;
RESET session_replication_role;
VACUUM ANALYZE token.tokens;
SQL
  # The fixture must agree with the extension: real tokens, valid checksums, right rows.
  local check
  check=$(psql_su -Atc "SELECT bool_and(v.valid AND v.token_id = bench_id(n) AND v.account = 'acct' || (n % 100000))
                          FROM unnest(ARRAY[1, $target / 2, $target]::bigint[]) n,
                               LATERAL token.check_token(bench_token('bench_', n)) v")
  [ "$check" = t ] || { echo "bench: generated tokens do not validate" >&2; exit 1; }
}

IFS=, read -r -a sizes <<<"$SIZES"
per_token() {  # the per-validation cost in one statement at table size $1
  grow_to "$1"
  "$VENV/bin/python" bench/measure.py per-token --host "$DIR" --port "$PORT" --size "$1" \
    --lookups "$LOOKUPS" >>"$OUT/per_token.csv"
}
: >"$OUT/per_token.csv"
# Sizes up to NTOKENS first (the table only grows), then the pgbench suite, then the rest.
for size in "${sizes[@]}"; do if [ "$size" -le "$NTOKENS" ]; then per_token "$size"; fi; done

# The pgbench suite at NTOKENS.
grow_to "$NTOKENS"
psql_su <<SQL
INSERT INTO plain.api_keys (id, key_hash, account, scopes, expires_at, revoke_after, revoked_at)
SELECT id, token_hash, account, scopes, expires_at, revoke_after, revoked_at FROM token.tokens
 WHERE NOT EXISTS (SELECT 1 FROM plain.api_keys);
VACUUM ANALYZE plain.api_keys;
-- authenticate + RLS: 10 rows per account, read by a role the policy applies to.
CREATE SCHEMA bench;
CREATE TABLE bench.docs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant text NOT NULL, body text);
INSERT INTO bench.docs (tenant, body) SELECT 'acct' || (i % 100000), 'doc ' || i FROM generate_series(1, 1000000) i;
CREATE INDEX ON bench.docs (tenant);
ALTER TABLE bench.docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON bench.docs USING (tenant = token.current_account());
VACUUM ANALYZE bench.docs;
CREATE ROLE bench_app LOGIN IN ROLE token_validator;
GRANT USAGE ON SCHEMA bench TO bench_app;
GRANT SELECT ON bench.docs TO bench_app;
SQL
check=$(psql_su -Atc "SELECT (SELECT count(*) FROM plain.validate(bench_token('bench_', 7))) = 1")
[ "$check" = t ] || { echo "bench: the plain SQL baseline does not validate" >&2; exit 1; }

: >"$OUT/pgbench.csv"
run_pgbench() {  # name script user [server options]
  local name=$1 script=$2 user=$3 options=${4:-} log="$OUT/pgbench-$1.log"
  psql_su -c "CHECKPOINT" >/dev/null
  "${runas[@]}" env PGOPTIONS="$options" "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U "$user" -n -M prepared -c 4 -j 2 \
    -T "$SECONDS_PER_RUN" -D ntokens="$NTOKENS" -f "$ROOT/bench/scripts/$script" bench >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
  local tps
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log")
  echo "$name,$tps" >>"$OUT/pgbench.csv"
  printf 'bench: %-28s %12.0f tps\n' "$name" "$tps"
}
# Warm the caches the same way for every run: one untimed pass over the tables.
psql_su -c "SELECT count(*) FROM token.tokens" -c "SELECT count(*) FROM plain.api_keys" >/dev/null
run_pgbench select1 select1.pgbench postgres
run_pgbench pk_lookup pk_lookup.pgbench postgres
run_pgbench plain_pgcrypto plain_pgcrypto.pgbench postgres
run_pgbench validate_hot validate_hot.pgbench postgres
run_pgbench validate_hot_narrow validate_hot_narrow.pgbench postgres
run_pgbench validate_uniform validate_uniform.pgbench postgres
run_pgbench validate_uniform_no_last_used validate_uniform.pgbench postgres "-c token.last_used_interval=-1"
run_pgbench authenticate_rls authenticate_rls.pgbench bench_app
run_pgbench one_token_4_sessions one_token.pgbench postgres
run_pgbench own_token_4_sessions own_token.pgbench postgres
for size in "${sizes[@]}"; do if [ "$size" -gt "$NTOKENS" ]; then per_token "$size"; fi; done

"$VENV/bin/python" bench/measure.py report --pgbench "$OUT/pgbench.csv" --per-token "$OUT/per_token.csv" \
  --seconds "$SECONDS_PER_RUN" --tokens "$NTOKENS" --lookups "$LOOKUPS" \
  --md bench/results/latest.md --png bench/results/latest.png
cat bench/results/latest.md
