#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1 for the usage-sink tests (tests/integration/test_usage_sink.py).
#
#   eval "$(sudo .ci/postgres.sh)"     # then ./dev test (or pytest) runs the PostgreSQL tests
#
# Needs root (CI runs as root). Installs Debian's `postgresql` package when it is missing,
# starts the first cluster (creating one when there is none), allows password logins from
# 127.0.0.1, creates the role and database `chunkstitch_test` (the role may create
# databases: each test makes its own) and prints the export line of
# CHUNKSTITCH_TEST_POSTGRES_DSN on stdout. Everything else goes to stderr. Idempotent.
set -euo pipefail

ROLE=chunkstitch_test
PASSWORD=chunkstitch_test
DB=chunkstitch_test

say() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (apt-get, pg_ctlcluster); or point CHUNKSTITCH_TEST_POSTGRES_DSN at a server of yours"
  exit 2
fi

if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  say "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi

# The first cluster (version, name, port); create one when the package came without.
read -r VERSION NAME PORT _ < <(pg_lsclusters --no-header | head -n 1) || true
if [ -z "${VERSION:-}" ]; then
  VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  NAME=main
  say "creating cluster $VERSION/$NAME"
  pg_createcluster "$VERSION" "$NAME" >&2
  read -r VERSION NAME PORT _ < <(pg_lsclusters --no-header | head -n 1)
fi

HBA=/etc/postgresql/$VERSION/$NAME/pg_hba.conf
RULE="host    all             $ROLE           127.0.0.1/32            scram-sha-256"
if [ -f "$HBA" ] && ! grep -qF "$RULE" "$HBA"; then
  # first matching line wins: put the test role's rule before everything else
  { echo "$RULE"; cat "$HBA"; } >"$HBA.new" && cat "$HBA.new" >"$HBA" && rm -f "$HBA.new"
  RELOAD=1
fi

STATUS=$(pg_lsclusters --no-header | awk -v v="$VERSION" -v n="$NAME" '$1==v && $2==n {print $4}')
if [ "$STATUS" != online ]; then
  say "starting cluster $VERSION/$NAME on port $PORT"
  # The server outlives this script: close every descriptor it would inherit beyond the
  # standard three (a caller's `flock` lock file would otherwise stay held until it stops).
  for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then  # 255: bash's own, reading this script
      eval "exec $fd>&-" 2>/dev/null || true
    fi
  done
  pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start >&2
elif [ -n "${RELOAD:-}" ]; then
  pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" reload >&2
fi

for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { say "server on 127.0.0.1:$PORT does not answer"; exit 1; }

psql_admin() { runuser -u postgres -- psql -p "$PORT" -X -q -v ON_ERROR_STOP=1 "$@"; }
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
  psql_admin -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE $DB OWNER $ROLE" >&2
fi

say "PostgreSQL $VERSION ready on 127.0.0.1:$PORT"
echo "export CHUNKSTITCH_TEST_POSTGRES_DSN=postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
