#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the tests and print its URL on stdout.
#   url=$(PGTEST_DIR=/tmp/pg bash .ci/postgres.sh)   # stop it with: pg_ctl -D /tmp/pg/data stop
# PGTEST_DIR (default: a new temp dir) holds the data; PGTEST_PORT (default: a free port) the port.
# Installs Debian's postgresql package if it is missing (needs root, or sudo). The server runs as the
# current user, or as the 'postgres' system user when this runs as root (initdb refuses root).
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else
        echo "postgres: not installed and no root to install it" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq postgresql >&2
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
port=${PGTEST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
dir=${PGTEST_DIR:-$(mktemp -d /tmp/einstruct-pg.XXXXXX)}
mkdir -p "$dir"
run=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$dir"
    run=(runuser -u postgres --)
fi
"${run[@]}" "$bin/initdb" -D "$dir/data" -U einstruct --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
"${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-k $dir -p $port -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2
"${run[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U einstruct einstruct_test >&2
echo "postgresql://einstruct@127.0.0.1:$port/einstruct_test"
