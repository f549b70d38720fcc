#!/usr/bin/env bash
# Builds what a DBA installs, for each PostgreSQL major version given (default: all supported):
#
#   dist/postgresql-<NN>-pg-token_<version>-1_amd64.deb
#       Debian/Ubuntu (PGDG layout): /usr/lib/postgresql/<NN>/lib/pg_token.so and
#       /usr/share/postgresql/<NN>/extension/pg_token*; depends on postgresql-<NN>.
#   dist/pg_token-<version>-pg<NN>-linux-x86_64.tar.gz
#       lib/pg_token.so, extension/ (control file, install and upgrade scripts) and install.sh,
#       which copies them where any PostgreSQL <NN>'s pg_config says (PG_CONFIG=...).
#
# Both carry the same release build (cargo pgrx package), the released install scripts kept in
# sql/ (CREATE EXTENSION pg_token VERSION '0.1.0' works) and every upgrade script.
#
#   bash scripts/package.sh            # every supported version (make package)
#   bash scripts/package.sh 15 17      # those only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/versions.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
majors=${*:-$PG_TOKEN_ALL_VERSIONS}
mkdir -p dist

for major in $majors; do
  pgc=$(pg_config_for "$major")
  [ -x "$pgc" ] || { echo "package: no PostgreSQL $major at $pgc (run scripts/setup.sh)" >&2; exit 1; }
  work="$ROOT/target/package/pg$major"
  rm -rf "$work"
  echo "package: PostgreSQL $major: release build"
  cargo pgrx package --no-default-features --features "pg$major" --pg-config "$pgc" --out-dir "$work/build" 2>&1 \
    | grep -vE '^\s*(Compiling|Checking)' | grep -E 'error|warning|Finished' || true
  lib="$work/build$("$pgc" --pkglibdir)/pg_token.so"
  ext="$work/build$("$pgc" --sharedir)/extension"
  [ -f "$lib" ] && [ -f "$ext/pg_token.control" ] && [ -f "$ext/pg_token--$version.sql" ] \
    || { echo "package: cargo pgrx package did not produce the library, control file and install script" >&2; exit 1; }
  # Released install scripts (upgrade scripts were copied by pgrx).
  for f in sql/pg_token--[0-9]*.sql; do
    case "$f" in *--*--*) ;; *) install -m 644 "$f" "$ext/" ;; esac
  done

  # The tarball: any layout, installed with its own pg_config.
  name="pg_token-$version-pg$major"
  tree="$work/$name"
  mkdir -p "$tree/lib" "$tree/extension"
  install -m 755 "$lib" "$tree/lib/"
  install -m 644 "$ext"/pg_token* "$tree/extension/"
  cat >"$tree/install.sh" <<EOF
#!/bin/sh
# Installs pg_token $version into the PostgreSQL $major that PG_CONFIG belongs to
# (default: the pg_config on PATH). Then: shared_preload_libraries = 'pg_token', restart,
# CREATE EXTENSION pg_token (or ALTER EXTENSION pg_token UPDATE where an older one is installed).
set -eu
here=\$(cd "\$(dirname "\$0")" && pwd)
PG_CONFIG=\${PG_CONFIG:-pg_config}
major=\$("\$PG_CONFIG" --version | sed 's/^PostgreSQL \([0-9]*\).*/\1/')
if [ "\$major" != "$major" ]; then
  echo "this package is for PostgreSQL $major; \$PG_CONFIG is PostgreSQL \$major" >&2
  exit 1
fi
install -m 755 "\$here/lib/pg_token.so" "\$("\$PG_CONFIG" --pkglibdir)/"
install -m 644 "\$here"/extension/* "\$("\$PG_CONFIG" --sharedir)/extension/"
echo "pg_token $version installed into \$("\$PG_CONFIG" --pkglibdir)"
EOF
  chmod 755 "$tree/install.sh"
  tar -C "$work" --owner=0 --group=0 -czf "dist/$name-linux-x86_64.tar.gz" "$name"

  # The .deb, in Debian's (and PGDG's) paths.
  deb="$work/deb"
  mkdir -p "$deb/DEBIAN" "$deb/usr/lib/postgresql/$major/lib" "$deb/usr/share/postgresql/$major/extension" \
           "$deb/usr/share/doc/postgresql-$major-pg-token"
  install -m 644 "$lib" "$deb/usr/lib/postgresql/$major/lib/"
  install -m 644 "$ext"/pg_token* "$deb/usr/share/postgresql/$major/extension/"
  install -m 644 README.md "$deb/usr/share/doc/postgresql-$major-pg-token/README.md"
  # The newest glibc symbol version the library needs is the libc6 it depends on.
  glibc=$(objdump -T "$lib" | sed -n 's/.*GLIBC_\([0-9.]*\).*/\1/p' | sort -V | tail -1)
  size=$(du -sk "$deb/usr" | cut -f1)
  cat >"$deb/DEBIAN/control" <<EOF
Package: postgresql-$major-pg-token
Version: $version-1
Architecture: amd64
Maintainer: pg_token developers <pg-token@localhost>
Depends: postgresql-$major, libc6 (>= ${glibc:-2.17})
Section: database
Priority: optional
Installed-Size: $size
Description: opaque, prefixed, instantly revocable API tokens for PostgreSQL $major
 pg_token issues short opaque API tokens (a registered prefix naming key type and
 environment, random bytes and a checksum), stores only their SHA-256, validates
 them with one SQL call and revokes them instantly. Add pg_token to
 shared_preload_libraries, restart, then CREATE EXTENSION pg_token.
EOF
  (cd "$deb" && find usr -type f -exec md5sum {} + >DEBIAN/md5sums)
  dpkg-deb --root-owner-group -Zxz --build "$deb" "dist/postgresql-$major-pg-token_${version}-1_amd64.deb" >/dev/null
  echo "package: dist/postgresql-$major-pg-token_${version}-1_amd64.deb, dist/$name-linux-x86_64.tar.gz"
done
