#!/usr/bin/env bash
# Quickstart: run creditd locally with a migrated database and a demo tenant.
#
#   scripts/run.sh [serve args...]   build and run `creditd serve --migrate --demo [args]`
#                                    (the demo admin API key goes to .data/demo.key)
#   scripts/run.sh services          only start the local PostgreSQL/Redis and print their URLs
#   scripts/run.sh stop              stop the local PostgreSQL/Redis started by this script
#
# If DATABASE_URL and REDIS_URL are both set they are used as-is. Otherwise a
# persistent PostgreSQL and Redis are kept under .data/ (git-ignored) on
# loopback ports chosen once and saved in .data/ports.env; they keep running
# after this script exits (stop them with `scripts/run.sh stop`).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

DATA_DIR="$REPO_ROOT/.data"
PG_DIR="$DATA_DIR/pg"
REDIS_DIR="$DATA_DIR/redis"
PORTS_FILE="$DATA_DIR/ports.env"

stop_local_services() {
    if [[ ! -d "$DATA_DIR" ]]; then
        echo "run.sh: nothing to stop ($DATA_DIR does not exist)"
        return 0
    fi
    stop_postgres "$PG_DIR" fast
    stop_redis "$REDIS_DIR"
    echo "run.sh: stopped local PostgreSQL and Redis (data kept in $DATA_DIR; delete it to reset)"
}

_start_failed_hint() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "run.sh: starting local services failed; if a port is taken by something else," \
            "delete $PORTS_FILE and retry (logs: $PG_DIR/postgres.log, $REDIS_DIR/redis.log)" >&2
    fi
}

start_local_services() {
    ensure_packages
    mkdir -p "$DATA_DIR" "$PG_DIR" "$REDIS_DIR"
    chmod 0755 "$DATA_DIR"

    if [[ -f "$PORTS_FILE" ]]; then
        # shellcheck source=/dev/null
        source "$PORTS_FILE"
    fi
    if [[ ! "${PGPORT:-}" =~ ^[0-9]+$ || ! "${REDISPORT:-}" =~ ^[0-9]+$ ]]; then
        PGPORT="$(free_port)"
        REDISPORT="$(free_port)"
        while [[ "$REDISPORT" == "$PGPORT" ]]; do
            REDISPORT="$(free_port)"
        done
        printf 'PGPORT=%s\nREDISPORT=%s\n' "$PGPORT" "$REDISPORT" >"$PORTS_FILE"
        echo "run.sh: chose ports PostgreSQL=$PGPORT Redis=$REDISPORT (saved in $PORTS_FILE)"
    fi

    # On failure (e.g. a saved port now used by something else), say how to recover.
    trap _start_failed_hint EXIT
    if postgres_running "$PG_DIR" "$PGPORT"; then
        echo "run.sh: PostgreSQL already running on 127.0.0.1:$PGPORT"
    else
        stop_postgres "$PG_DIR" fast # clears a crashed/half-started instance
        start_postgres "$PG_DIR" "$PGPORT"
    fi
    if redis_running "$REDIS_DIR"; then
        echo "run.sh: Redis already running on 127.0.0.1:$REDISPORT"
    else
        start_redis "$REDIS_DIR" "$REDISPORT" persistent
    fi
    trap - EXIT

    local psql
    psql="$(pg_bin psql)"
    if [[ "$("$psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'creditd'")" != 1 ]]; then
        "$psql" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c 'CREATE DATABASE creditd' 2>&1 |
            grep -v 'already exists' >&2 || true
    fi

    export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/creditd"
    export REDIS_URL="redis://127.0.0.1:$REDISPORT/"
    echo "run.sh: local services keep running after exit; stop them with: scripts/run.sh stop"
}

case "${1:-}" in
stop)
    stop_local_services
    exit 0
    ;;
services)
    start_local_services
    echo "DATABASE_URL=$DATABASE_URL"
    echo "REDIS_URL=$REDIS_URL"
    exit 0
    ;;
esac

if [[ -n "${DATABASE_URL:-}" && -n "${REDIS_URL:-}" ]]; then
    ensure_cargo
    # Not echoed: they may carry passwords.
    echo "run.sh: using DATABASE_URL and REDIS_URL from the environment"
else
    start_local_services
    echo "DATABASE_URL=$DATABASE_URL"
    echo "REDIS_URL=$REDIS_URL"
fi

cargo build --bin creditd
BIN="${CARGO_TARGET_DIR:-target}/debug/creditd"
mkdir -p "$DATA_DIR"
echo "run.sh: starting creditd (gRPC on 127.0.0.1:50051 unless overridden);" \
    "the demo admin key is printed below and written to .data/demo.key"
exec "$BIN" serve --migrate --demo --demo-key-file "$DATA_DIR/demo.key" "$@"
