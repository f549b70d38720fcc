#!/usr/bin/env bash
# The packages install and work: for PostgreSQL <NN>, install what scripts/package.sh built into
# a clean server and run CREATE EXTENSION and one validation there.
#
#   bash tests/package/run.sh 15        dpkg -i the .deb into Debian's PostgreSQL 15 (a real
#                                       package install), then a fresh cluster of it
#   bash tests/package/run.sh 17 DIR    copy the relocatable PostgreSQL 17 to DIR/server-17 with
#                                       no pg_token in it, install the tarball with its own
#                                       install.sh, check the .deb carries the same files, then a
#                                       fresh cluster of that copy
#
# Prints the server's bin directory on its last line (where the extension now is), so the
# caller can run more tests against exactly what the package installed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$ROOT/scripts/versions.sh"
major=$1
RUN=${2:-$(mktemp -d /tmp/pg_token-package-XXXXXX)}
mkdir -p "$RUN" && chmod 755 "$RUN"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -1)
deb="$ROOT/dist/postgresql-$major-pg-token_${version}-1_amd64.deb"
tarball="$ROOT/dist/pg_token-$version-pg$major-linux-x86_64.tar.gz"
[ -f "$deb" ] && [ -f "$tarball" ] || { echo "package: build them first: bash scripts/package.sh $major" >&2; exit 1; }
log() { echo "package pg$major: $*" >&2; }

if [ "$major" = 15 ]; then
  dpkg -i "$deb" >/dev/null
  dpkg -s "postgresql-$major-pg-token" | grep -q "^Version: $version-1$"
  bindir=/usr/lib/postgresql/15/bin
  log "installed $(basename "$deb") with dpkg"
else
  server="$RUN/server-$major"
  rm -rf "$server"
  cp -a "$PG_TOKEN_SERVERS/$major" "$server"
  # Clean: whatever earlier builds installed into the original is not in the copy.
  rm -f "$server/lib/pg_token.so" "$server"/share/extension/pg_token*
  tmp=$(mktemp -d)
  tar -xzf "$tarball" -C "$tmp"
  PG_CONFIG="$server/bin/pg_config" sh "$tmp/pg_token-$version-pg$major/install.sh" >&2
  # The .deb carries exactly the files the tarball installed, in Debian's paths.
  dpkg-deb -x "$deb" "$tmp/deb"
  cmp "$tmp/deb/usr/lib/postgresql/$major/lib/pg_token.so" "$server/lib/pg_token.so"
  for f in "$tmp/deb/usr/share/postgresql/$major/extension"/*; do cmp "$f" "$server/share/extension/$(basename "$f")"; done
  rm -rf "$tmp"
  chmod -R a+rX "$server"
  bindir="$server/bin"
  log "installed the tarball into a clean copy of PostgreSQL $major ($server); the .deb holds the same files"
fi

data="$RUN/package-check-$major"
rm -rf "$data"
port=$(bash "$ROOT/scripts/cluster.sh" free-port)
PGBIN=$bindir bash "$ROOT/scripts/cluster.sh" start "$data" "$port"
trap 'PGBIN=$bindir bash "$ROOT/scripts/cluster.sh" stop "$data"' EXIT
out=$(runuser -u postgres -- "$bindir/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$data" -p "$port" -U postgres -d postgres <<'SQL'
CREATE EXTENSION pg_token;
SELECT token.create_key_type('agent');
SELECT token.register_prefix('pkg-', 'agent', 'dev');
CREATE TEMP TABLE issued AS SELECT token FROM token.generate_token('acme', 'agent');
SELECT format('%s %s %s', extversion, (SELECT account FROM token.validate_token((SELECT token FROM issued))),
              (SELECT reason FROM token.check_token('pkg-' || repeat('x', 28))))
  FROM pg_extension WHERE extname = 'pg_token';
SQL
)
expected="$version acme bad_checksum"
[ "$(echo "$out" | tail -1)" = "$expected" ] || { echo "package pg$major: expected '$expected', got: $out" >&2; exit 1; }
log "CREATE EXTENSION pg_token ($version) and a validation work"
echo "$bindir"
