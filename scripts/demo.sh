#!/usr/bin/env bash
# The README's first command: installs what is missing, builds and installs pg_token, starts a
# throwaway cluster owned by `postgres`, and runs the narrated lifecycle demo
# (sql/examples/demo.sql). The cluster is stopped and removed at the end; set
# PG_TOKEN_KEEP=1 to keep it running for exploring (the script prints how to connect).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/install.sh

DIR=/tmp/pg_token-demo
[ -f "$DIR/postmaster.pid" ] && bash scripts/cluster.sh stop "$DIR"
rm -rf "$DIR"
PORT=$(bash scripts/cluster.sh free-port)
bash scripts/cluster.sh start "$DIR" "$PORT"
if [ "${PG_TOKEN_KEEP:-0}" != 1 ]; then
  trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$DIR"' EXIT
fi

runas=()
[ "$(id -u)" -eq 0 ] && runas=(runuser -u postgres --)
"${runas[@]}" psql -X -h "$DIR" -p "$PORT" -U postgres -d postgres -q \
  -v app_conninfo="host=127.0.0.1 port=$PORT dbname=postgres user=demo_app password=demo-password" \
  -v admin_conninfo="host=$DIR port=$PORT dbname=postgres user=postgres" \
  -v prod_app_conninfo="host=127.0.0.1 port=$PORT dbname=demo_prod user=demo_app password=demo-password" \
  -v prod_admin_conninfo="host=$DIR port=$PORT dbname=demo_prod user=postgres" \
  -f sql/examples/demo.sql

echo
if [ "${PG_TOKEN_KEEP:-0}" = 1 ]; then
  echo "demo cluster kept: psql -h $DIR -p $PORT -U postgres   (stop: bash scripts/cluster.sh stop $DIR)"
else
  echo "demo finished; the throwaway cluster is stopped and removed"
fi
