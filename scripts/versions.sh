# Sourced by the scripts: which PostgreSQL versions pg_token supports and where each one is.
# 15 is Debian's (postgresql-15); 14, 16, 17 and 18 are the relocatable builds scripts/setup.sh
# unpacks from PyPI under $PG_TOKEN_SERVERS.
PG_TOKEN_DEFAULT_VERSION=15
PG_TOKEN_ALL_VERSIONS="14 15 16 17 18"
PG_TOKEN_SERVERS="${PG_TOKEN_SERVERS:-/opt/pg_token-servers}"

# pg_config of a major version.
pg_config_for() {
  if [ "$1" = 15 ]; then echo /usr/lib/postgresql/15/bin/pg_config; else echo "$PG_TOKEN_SERVERS/$1/bin/pg_config"; fi
}

# Its bin directory.
pg_bindir_for() {
  "$(pg_config_for "$1")" --bindir
}
