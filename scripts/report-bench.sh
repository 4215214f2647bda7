#!/usr/bin/env bash
# Report benchmark: one tenant with 10 million usage events in one month,
# then SummarizeUsage and the other report calls timed through gRPC, a check
# of the summary against a recomputation from the events, and what the
# rollup triggers cost the write path (examples/report_bench.rs; the events
# come from scripts/report-bench.sql, written by generate_series).
#
#   scripts/report-bench.sh [options]   e.g. --events 1000000 --runs 10 (--help lists them)
#   scripts/report-bench.sh clean       remove the generated data
#
# Starts its own PostgreSQL (default settings, fsync off) and Redis on free
# loopback ports, with data in .data/report-bench/, and stops them on exit.
# The data is kept: a second run with the same --events reuses it. Writing
# 10 million events takes about 15 minutes on 2 cores and 10 GB of disk; the
# release build of the example a few minutes the first time. Not part of
# scripts/test.sh.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

DATA_DIR="$REPO_ROOT/.data/report-bench"
PG_DIR="$DATA_DIR/pg"
REDIS_DIR="$DATA_DIR/redis"

if [[ "${1:-}" == clean ]]; then
    stop_postgres "$PG_DIR" fast
    stop_redis "$REDIS_DIR"
    rm -rf "$DATA_DIR"
    echo "report-bench: removed $DATA_DIR"
    exit 0
fi

ensure_packages
mkdir -p "$DATA_DIR" "$PG_DIR" "$REDIS_DIR"
# The postgres user (when we run as root) must be able to traverse it.
chmod 0755 "$REPO_ROOT/.data" "$DATA_DIR"

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_postgres "$PG_DIR" fast
    stop_redis "$REDIS_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "report-bench: building the benchmark (release)"
cargo build --release --locked --example report_bench

PGPORT="$(free_port)"
REDISPORT="$(free_port)"
while [[ "$REDISPORT" == "$PGPORT" ]]; do
    REDISPORT="$(free_port)"
done
stop_postgres "$PG_DIR" fast # a crashed earlier run
start_postgres "$PG_DIR" "$PGPORT" throwaway
start_redis "$REDIS_DIR" "$REDISPORT" persistent

PSQL="$(pg_bin psql)"
if [[ "$("$PSQL" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'creditd_bench'")" != 1 ]]; then
    "$PSQL" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE creditd_bench"
fi

export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/creditd_bench"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/"
"${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/report_bench" "$@"
