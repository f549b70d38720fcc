#!/usr/bin/env bash
# Throwaway Postgres clusters owned by the `postgres` user, for the demo, the tests and the
# benchmark. Postgres refuses to run as root, so everything runs through runuser/sudo.
#
#   cluster.sh start DIR PORT [conf lines...]   initdb (if needed) + start on 127.0.0.1:PORT
#   cluster.sh stop DIR                         fast shutdown (no error if not running)
#   cluster.sh free-port                        prints a free loopback TCP port
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@";
  elif [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@";
  else sudo -u postgres -- "$@"; fi
}

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

start() {
  local dir=$1 port=$2; shift 2
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    chown postgres:postgres "$dir" 2>/dev/null || sudo chown postgres:postgres "$dir"
    chmod 700 "$dir"
    as_postgres "$PGBIN/initdb" -D "$dir" -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null
    {
      echo "listen_addresses = '127.0.0.1'"
      echo "port = $port"
      echo "unix_socket_directories = '$dir'"
      echo "shared_preload_libraries = 'pg_token'"
      echo "token.environment = 'dev'"
      echo "max_worker_processes = 16"
      echo "fsync = off"
      echo "log_line_prefix = '%m [%p] %q%u@%d '"
      for line in "$@"; do echo "$line"; done
    } | as_postgres tee -a "$dir/postgresql.conf" >/dev/null
    # Password authentication over TCP, as an application would connect; trust on the socket.
    {
      echo "local all all trust"
      echo "host all all 127.0.0.1/32 scram-sha-256"
    } | as_postgres tee "$dir/pg_hba.conf" >/dev/null
  fi
  # A backtrace variable in our environment would make pgrx append Rust backtraces to details.
  as_postgres env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
}

stop() {
  local dir=$1
  if [ -f "$dir/postmaster.pid" ]; then
    as_postgres "$PGBIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
  fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  free-port) free_port ;;
  *) echo "usage: $0 start DIR PORT [conf...] | stop DIR | free-port" >&2; exit 2 ;;
esac
