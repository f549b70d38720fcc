#!/usr/bin/env bash
# `make bench`: pg_token against SELECT 1, a primary-key lookup and the plain SQL + pgcrypto
# validation a user would otherwise write, on a throwaway cluster with 1M tokens, plus the CPU
# cost of one validation inside one statement at 10k, 1M and 10M tokens. Prints the table and
# writes it to bench/results/latest.md, with a chart in bench/results/latest.png. What each
# row measures: bench/README.md.
#
#   BENCH_SECONDS        seconds per pgbench run                    (default 8)
#   BENCH_FLOOD_SECONDS  seconds of the refusal flood and of each good-traffic run (default 30)
#   BENCH_FLOOD_ROUNDS   good traffic alone / beside a flood, rounds (default 3)
#   BENCH_ROUNDS         rounds over all workloads (median reported) (default 5)
#   BENCH_RATE_SECONDS   seconds 4 sessions share one rate-limited token (default 20)
#   BENCH_RATE_LIMIT     that token's limit per second              (default 2000)
#   BENCH_TOKENS         tokens in the table for the pgbench runs   (default 1000000)
#   BENCH_CHURN_SECONDS  seconds of each admin-churn run              (default 10)
#   BENCH_STEADY_WARM    seconds of uniform traffic before the steady-state last-use rounds (default 120)
#   BENCH_CHURN_RATE     revocations or rotations per second in it   (default 200)
#   BENCH_CHURN_ROUNDS   alone / beside trivial commits / revocations / rotations, rounds (default 5)
#   BENCH_SIZES          table sizes for the one-statement cost     (default 10000,1000000,10000000)
#   BENCH_LOOKUPS        validations in that one statement          (default 200000)
#   BENCH_JWT_HS256      distinct HS256 legacy JWTs for the first-presentation row (default 50000 x BENCH_SECONDS)
#   BENCH_JWT_RS256      distinct RS256 legacy JWTs for the first-presentation row (default 20000 x BENCH_SECONDS)
#   BENCH_SHARED_BUFFERS shared_buffers of the throwaway cluster    (default 6GB, fits 10M tokens)
#   BENCH_SHARED_CACHE   token.shared_cache_size of that cluster     (default 1GB, 2.3M tokens)
#   BENCH_HUGE_PAGES     on: back shared memory with 2 MB huge pages, reserved for the run and
#                        given back after (needs root); off: 4 kB pages  (default on)
#   BENCH_DIR            where the cluster lives (removed on exit)  (default /tmp/pg_token-bench)
#   BENCH_RESULTS        where latest.md and latest.png go          (default bench/results)
#
# A quick run that leaves the committed results alone:
#   BENCH_SECONDS=5 BENCH_TOKENS=100000 BENCH_SIZES=10000,100000 BENCH_RESULTS=bench/out make bench
# Needs root, like scripts/setup.sh (the cluster runs as `postgres`; we use its socket).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_RUN=${BENCH_SECONDS:-8}
FLOOD_SECONDS=${BENCH_FLOOD_SECONDS:-30}
FLOOD_ROUNDS=${BENCH_FLOOD_ROUNDS:-3}
ROUNDS=${BENCH_ROUNDS:-5}
RATE_SECONDS=${BENCH_RATE_SECONDS:-20}
RATE_LIMIT=${BENCH_RATE_LIMIT:-2000}
NTOKENS=${BENCH_TOKENS:-1000000}
SIZES=${BENCH_SIZES:-10000,1000000,10000000}
CHURN_SECONDS=${BENCH_CHURN_SECONDS:-10}
STEADY_WARM=${BENCH_STEADY_WARM:-120}
CHURN_RATE=${BENCH_CHURN_RATE:-200}
CHURN_ROUNDS=${BENCH_CHURN_ROUNDS:-5}
LOOKUPS=${BENCH_LOOKUPS:-200000}
# Enough JWTs that no session meets one twice within a run at up to 50,000 (HS256) or 20,000
# (RS256) validations per second; the report says if a run went faster than that.
JWT_HS256=${BENCH_JWT_HS256:-$((50000 * SECONDS_PER_RUN))}
JWT_RS256=${BENCH_JWT_RS256:-$((20000 * SECONDS_PER_RUN))}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-6GB}
SHARED_CACHE=${BENCH_SHARED_CACHE:-1GB}
DIR=${BENCH_DIR:-/tmp/pg_token-bench}
RESULTS=${BENCH_RESULTS:-bench/results}
VENV="${PG_TOKEN_VENV:-/opt/pg_token-venv}"
PGBIN=/usr/lib/postgresql/15/bin
OUT=bench/out
started=$(date +%s)

bash scripts/setup.sh

# Measure the release build of this tree: install it every time (cargo rebuilds only what
# changed), so neither a debug/test build left by `cargo pgrx test` nor a stale release build is
# measured instead.
echo "bench: installing the release build of this tree"
bash scripts/install.sh >/dev/null
libdir=$("$PGBIN/pg_config" --pkglibdir)
sharedir=$("$PGBIN/pg_config" --sharedir)
version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$sharedir/extension/pg_token.control")
built=$(date -u -r "$libdir/pg_token.so" '+%Y-%m-%d %H:%M UTC')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src sql Cargo.toml 2>/dev/null)" ]; then commit="$commit + uncommitted changes"; fi

# The throwaway cluster. Never take over a directory another run is using.
if [ -f "$DIR/postmaster.pid" ] && kill -0 "$(head -1 "$DIR/postmaster.pid")" 2>/dev/null; then
  echo "bench: a server is running in $DIR; stop it or set BENCH_DIR" >&2
  exit 1
fi
rm -rf "$DIR"
huge_before=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
cleanup() {
  bash scripts/cluster.sh stop "$DIR" || true
  rm -rf "$DIR"
  if [ "${huge:-off}" = on ]; then echo "$huge_before" >/proc/sys/vm/nr_hugepages || true; fi
}
trap cleanup EXIT
PORT=$(bash scripts/cluster.sh free-port)
CONF=("shared_buffers = '$SHARED_BUFFERS'" "max_wal_size = '16GB'" "checkpoint_timeout = '30min'"
      "autovacuum = off" "jit = off" "max_connections = 20" "token.shared_cache_size = '$SHARED_CACHE'")
bash scripts/cluster.sh start "$DIR" "$PORT" "${CONF[@]}"

# Huge pages, as a DBA with gigabytes of shared_buffers configures them: a miss touches two
# random pages of a multi-gigabyte table, and with 4 kB pages most of its cost is address
# translation (measured: 11.8 vs 6.1 us per miss at 3M tokens, same cluster restarted).
# The one-statement cost at the largest size is measured with 4 kB pages too.
huge=off
if [ "${BENCH_HUGE_PAGES:-on}" = on ] && [ -w /proc/sys/vm/nr_hugepages ]; then
  need=$("$PGBIN/psql" -X -Atc "SHOW shared_memory_size_in_huge_pages" -h "$DIR" -p "$PORT" -U postgres postgres)
  echo $((huge_before + need + 16)) >/proc/sys/vm/nr_hugepages
  huge=on
  set_huge_pages() {  # on|off: restart the cluster with that setting
    bash scripts/cluster.sh stop "$DIR"
    sed -i "/^huge_pages = /d" "$DIR/postgresql.conf"
    echo "huge_pages = $1" >>"$DIR/postgresql.conf"
    bash scripts/cluster.sh start "$DIR" "$PORT"
  }
  set_huge_pages on
  echo "bench: shared memory in huge pages ($need of 2 MB)"
fi

psql_su() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d bench "$@"; }
py() { "$VENV/bin/python" bench/bench.py "$@"; }
"$PGBIN/createdb" -h "$DIR" -p "$PORT" -U postgres bench
psql_su -f bench/schema.sql -f bench/baseline.sql >/dev/null

mkdir -p "$OUT" "$RESULTS"
: >"$OUT/per_token.csv"
: >"$OUT/load.csv"
: >"$OUT/per_token_small_pages.csv"
IFS=, read -r -a sizes <<<"$SIZES"
per_token() {  # the one-statement cost at table size $1
  py load --host "$DIR" --port "$PORT" --to "$1" --timings "$OUT/load.csv"
  py per-token --host "$DIR" --port "$PORT" --size "$1" --lookups "$LOOKUPS" --csv "$OUT/per_token.csv"
}
# The table only grows: sizes up to NTOKENS, the pgbench suite at NTOKENS, then larger sizes.
for size in "${sizes[@]}"; do if [ "$size" -le "$NTOKENS" ]; then per_token "$size"; fi; done
py load --host "$DIR" --port "$PORT" --to "$NTOKENS" --timings "$OUT/load.csv"

echo "bench: the hot-set function and the baseline table (pgcrypto digest of each token)"
psql_su >/dev/null <<'SQL'
-- The hot set, tokens 1..1000, as one inlinable function over a constant name[] (fixed-width
-- elements, so the subscript costs the same for every n): pgbench can only draw integers,
-- and this hands a statement the n-th hot token for about the cost of a parameter.
-- Two more hot sets of 1,000 for the rows that measure what limits cost: tokens 1001..2000
-- carry a rate limit they never reach, 2001..3000 a usage cap they never spend.
DO $do$
DECLARE hot text; fn text; first int;
BEGIN
  FOR fn, first IN SELECT * FROM (VALUES ('hot', 0), ('hot_limited', 1000), ('hot_capped', 2000)) v LOOP
    SELECT '{' || string_agg(token, ',' ORDER BY n) || '}' INTO hot FROM bench.plain WHERE n > first AND n <= first + 1000;
    EXECUTE format('CREATE FUNCTION bench.%I(n integer) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                   fn, format('SELECT (%L::pg_catalog.name[])[n]::text', hot));
  END LOOP;
END
$do$;
UPDATE token.tokens t SET rate_limits = '{"(1000000000,\"1 second\")","(2000000000,\"1 hour\")"}'
  FROM bench.plain p WHERE p.id = t.id AND p.n > 1000 AND p.n <= 2000;
UPDATE token.tokens t SET uses_remaining = 1000000000000
  FROM bench.plain p WHERE p.id = t.id AND p.n > 2000 AND p.n <= 3000;
INSERT INTO baseline.api_keys (id, key_hash, account, scopes, expires_at)
SELECT p.id, public.digest(p.token, 'sha256'), t.account, t.scopes, t.expires_at
  FROM bench.plain p JOIN token.tokens t USING (id)
 ORDER BY 2;  -- hash order: the unique index is built by appending
VACUUM ANALYZE baseline.api_keys;
SQL
py check-suite --host "$DIR" --port "$PORT" --tokens "$NTOKENS"
echo "bench: legacy JWTs (migrating from JWTs): issuers and pre-made JWTs"
py jwts --host "$DIR" --port "$PORT" --hs256 "$JWT_HS256" --rs256 "$JWT_RS256"

echo "round,name,tps,latency_ms,touch_written,touch_dropped" >"$OUT/pgbench.csv"
queue_totals() {  # last-use updates the event writer has written and dropped, all time
  psql_su -Atc "SELECT coalesce(sum(touches_written), 0) || ',' || coalesce(sum(touches_dropped), 0) FROM token.worker_status()"
}
run_pgbench() {  # name script user [server options] [pgbench options]
  local name=$1 script=$2 user=$3 options=${4:-} extra=${5:-} log="$OUT/pgbench-$1.log" before after tps latency
  # Same start for every run: the event writer idle, no dirty buffers.
  psql_su -c "SELECT token.flush_events('60 s')" -c "CHECKPOINT" >/dev/null
  before=$(queue_totals)
  PGOPTIONS="$options" "$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U "$user" -n -M prepared -c 4 -j 2 \
    -T "$SECONDS_PER_RUN" -D ntokens="$NTOKENS" $extra -f "$ROOT/bench/scripts/$script.pgbench" bench >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
  grep -q '^number of failed transactions: 0 ' "$log" || { cat "$log" >&2; exit 1; }
  psql_su -c "SELECT token.flush_events('60 s')" >/dev/null
  after=$(queue_totals)
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log")
  latency=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$log")
  echo "$round,$name,$tps,$latency,$((${after%,*} - ${before%,*})),$((${after#*,} - ${before#*,}))" >>"$OUT/pgbench.csv"
  printf 'bench: round %d/%d %-26s %9.0f tps\n' "$round" "$ROUNDS" "$name" "$tps"
}
# Every table and index the runs read, in shared buffers: no run pays for a first read.
psql_su >/dev/null <<'SQL'
CREATE EXTENSION pg_prewarm;
SELECT pg_prewarm(c.oid) FROM pg_class c
 WHERE c.relnamespace IN ('token'::regnamespace, 'bench'::regnamespace, 'baseline'::regnamespace)
   AND c.relkind IN ('r', 'i');
SQL
# The shared cache as a server that has validated for a while holds it: every token once (at
# these rates uniform traffic visits a million tokens within a minute). Without last-use updates,
# so that every row starts from the same table.
echo "bench: one validation of each of the $NTOKENS tokens (the shared cache warm, as in a running server)"
PGOPTIONS="-c token.last_used_interval=-1 -c token.cache_size=0" \
  psql_su -c "SELECT count(token.validate_token(token)) FROM bench.plain" >/dev/null
# The machine is shared and drifts: every workload runs once per round, rounds interleave
# them, and the report takes each workload's median over the rounds.
for round in $(seq 1 "$ROUNDS"); do
  run_pgbench select1 select1 postgres
  run_pgbench pick_hot pick_hot postgres
  run_pgbench hash_hot hash_hot postgres
  run_pgbench identity_constant identity_constant postgres
  run_pgbench pick_uniform pick_uniform postgres
  run_pgbench pk_lookup pk_lookup postgres
  run_pgbench baseline_hot baseline_hot postgres
  run_pgbench baseline_uniform baseline_uniform postgres
  run_pgbench validate_hot validate_hot postgres
  run_pgbench validate_hot_narrow validate_hot_narrow postgres
  run_pgbench validate_hot_limited validate_hot_limited postgres
  run_pgbench validate_hot_capped validate_hot_capped postgres
  run_pgbench validate_uniform_no_touch validate_uniform postgres "-c token.last_used_interval=-1"
  run_pgbench validate_uniform validate_uniform postgres
  run_pgbench one_token one_token postgres
  run_pgbench four_tokens four_tokens postgres
  # Legacy JWTs, without the NOTICE each accepted one sends (pgbench would print them all).
  # The first-presentation rows give each client its own quarter of the JWTs, in order
  # (i counts the client's transactions), so a session validates each JWT once.
  run_pgbench validate_jwt_cached validate_jwt_cached postgres "-c token.legacy_notice=off"
  run_pgbench validate_jwt_first_hs256 validate_jwt_first_hs256 postgres "-c token.legacy_notice=off" \
    "-D i=0 -D per_client=$((JWT_HS256 / 4))"
  run_pgbench validate_jwt_first_rs256 validate_jwt_first_rs256 postgres "-c token.legacy_notice=off" \
    "-D i=0 -D per_client=$((JWT_RS256 / 4))"
  run_pgbench authenticate_rls authenticate_rls bench_app
done

echo "bench: what the event writer's last-use updates write (WAL, HOT share)"
py last-use --host "$DIR" --port "$PORT" --pgbin "$PGBIN" --scripts "$ROOT/bench/scripts" --out "$OUT" \
  --seconds "$SECONDS_PER_RUN" --tokens "$NTOKENS" --json "$OUT/last_use.json"

# The rounds (and the WAL row) start validate_uniform with every token due a last-use update (the last
# round's were more than a minute before): the first interval after the updates are turned on.
# A server that has validated uniform traffic for longer has spread its tokens' last updates
# over time, and writes only for those whose interval ran out. Those rounds, after STEADY_WARM
# seconds of that traffic, beside the primary-key lookup again.
echo "bench: steady-state last-use updates: ${STEADY_WARM} s of validate_uniform (unmeasured), then $ROUNDS rounds"
"$PGBIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c 4 -j 2 -T "$STEADY_WARM" -D ntokens="$NTOKENS" \
  -f "$ROOT/bench/scripts/validate_uniform.pgbench" bench >"$OUT/pgbench-steady-warm.log" 2>&1 \
  || { cat "$OUT/pgbench-steady-warm.log" >&2; exit 1; }
for round in $(seq 1 "$ROUNDS"); do
  run_pgbench pk_lookup_steady pk_lookup postgres
  run_pgbench validate_uniform_steady validate_uniform postgres
done

echo "bench: refusal flood (${FLOOD_SECONDS} s)"
py flood --host "$DIR" --port "$PORT" --pgbin "$PGBIN" --scripts "$ROOT/bench/scripts" --out "$OUT" \
  --log "$DIR/server.log" --json "$OUT/flood.json" --seconds "$FLOOD_SECONDS" --rounds "$FLOOD_ROUNDS"

echo "bench: a rate limit shared by 4 sessions"
py rate-accuracy --host "$DIR" --port "$PORT" --json "$OUT/rate.json" --seconds "$RATE_SECONDS" --limit "$RATE_LIMIT"

for size in "${sizes[@]}"; do if [ "$size" -gt "$NTOKENS" ]; then per_token "$size"; fi; done
largest=$(printf '%s\n' "${sizes[@]}" | sort -n | tail -1)
if [ "$huge" = on ]; then
  echo "bench: the one-statement cost at $largest tokens again, with 4 kB pages"
  set_huge_pages off
  psql_su -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" -c "SELECT pg_prewarm('token.tokens'), pg_prewarm('token.tokens_token_hash_excl'), pg_prewarm('bench.plain')" >/dev/null
  py per-token --host "$DIR" --port "$PORT" --size "$largest" --lookups "$LOOKUPS" --csv "$OUT/per_token_small_pages.csv"
  set_huge_pages on
fi

# Last: it revokes and rotates tokens, which the uniform rows above would trip over.
echo "bench: admin churn (${CHURN_RATE} revocations or rotations per second beside a hot set)"
py churn --host "$DIR" --port "$PORT" --pgbin "$PGBIN" --scripts "$ROOT/bench/scripts" --out "$OUT" \
  --json "$OUT/churn.json" --seconds "$CHURN_SECONDS" --rounds "$CHURN_ROUNDS" --rate "$CHURN_RATE"

cache_kb=$(psql_su -Atc "SHOW token.cache_size")
cache_bytes=$(psql_su -Atc "SELECT budget FROM token.cache_stats()")
shared_capacity=$(psql_su -Atc "SELECT capacity FROM token.shared_cache_stats()")
settings=(
  "Cluster: ${CONF[*]}; fsync = off (scripts/cluster.sh). Tables are VACUUM ANALYZEd after loading; autovacuum off so that it cannot run during a measurement."
  "pgbench over the Unix socket as \`postgres\` (superuser), except the RLS row: \`bench_app\`, a login role in \`token_validator\` that does not own \`bench.docs\`. A CHECKPOINT and \`token.flush_events()\` before each run."
  "pgbench rows use pg_token's defaults: \`token.cache_size\` = $cache_kb per backend, \`token.last_used_interval\` = 60 s, except where the row says otherwise; \`token.shared_cache_size\` = $SHARED_CACHE ($shared_capacity tokens), where the default is 64MB."
  "Hot set: after its first pass each backend's cache holds all 1,000 tokens, so validations are cache hits and a token's last use is queued at most once a minute per backend."
  "Legacy JWT rows: issuers \`bench_hs256\` (HS256) and \`bench_rs256\` (RS256, 2048-bit key) for the bench key type; $JWT_HS256 and $JWT_RS256 pre-made JWTs in \`bench.jwt_hs256\` / \`bench.jwt_rs256\`, each client reading its own quarter in order; \`token.legacy_notice\` = off."
  "One statement: \`token.cache_size\` = 1GB (hit) or 0 (shared cache, table read), \`token.shared_cache\` = off (table read) and \`token.last_used_interval\` = -1, set in that session only."
)
py report --pgbench "$OUT/pgbench.csv" --per-token "$OUT/per_token.csv" --seconds "$SECONDS_PER_RUN" --rounds "$ROUNDS" --steady-warm "$STEADY_WARM" \
  --tokens "$NTOKENS" --lookups "$LOOKUPS" --cache-bytes "$cache_bytes" --shared-capacity "$shared_capacity" --version "$version, release build installed $built; repository at $commit" \
  --huge-pages "$huge" --small-pages "$OUT/per_token_small_pages.csv" \
  --flood "$OUT/flood.json" --rate "$OUT/rate.json" --last-use "$OUT/last_use.json" --churn "$OUT/churn.json" --loads "$OUT/load.csv" --jwt-counts "hs256=$JWT_HS256,rs256=$JWT_RS256" --md "$RESULTS/latest.md" --png "$RESULTS/latest.png" "${settings[@]/#/--setting=}"
cat "$RESULTS/latest.md"
echo "bench: done in $(( ($(date +%s) - started) / 60 )) min; $RESULTS/latest.md and latest.png"
