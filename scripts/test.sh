#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run).
#
# Starts a throwaway PostgreSQL and Redis on free 127.0.0.1 ports, exports
#   CREDITD_TEST_DATABASE_URL, CREDITD_TEST_REDIS_URL and (a 3-master Redis
#   Cluster) CREDITD_TEST_REDIS_CLUSTER_URL,
# then runs cargo fmt --check, cargo clippy (also with the otlp feature the
# Docker image builds with), the Helm chart check
# (scripts/helm-check.sh) and cargo test, then loads the chart's rendered
# configurations with the creditd binary just built. Everything is torn down
# on exit, whatever the outcome.
#
# Usage: scripts/test.sh [extra cargo test args...]   e.g. scripts/test.sh exactness
#   CREDITD_SKIP_LINT=1 scripts/test.sh               skip fmt + clippy (the chart check still runs)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

ensure_packages

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/creditd-test.XXXXXX")"
# The postgres user (when we run as root) must be able to traverse it.
chmod 0755 "$TMP_DIR"
PG_DIR="$TMP_DIR/pg"
REDIS_DIR="$TMP_DIR/redis"
CLUSTER_DIR="$TMP_DIR/redis-cluster"

CHILD_PID=""

# Kill a process and all of its descendants (by pid).
kill_tree() {
    local pid="$1" kid
    for kid in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        kill_tree "$kid"
    done
    kill -TERM "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$CHILD_PID" ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill_tree "$CHILD_PID"
        wait "$CHILD_PID" 2>/dev/null
    fi
    stop_postgres "$PG_DIR" immediate
    stop_redis "$REDIS_DIR"
    stop_redis_cluster "$CLUSTER_DIR"
    rm -rf "$TMP_DIR"
    if [[ $rc -ne 0 ]]; then
        printf '\n==> scripts/test.sh: FAILED (exit code %s)\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PGPORT="$(free_port)"
REDISPORT="$(free_port)"
while [[ "$REDISPORT" == "$PGPORT" ]]; do
    REDISPORT="$(free_port)"
done

start_postgres "$PG_DIR" "$PGPORT" throwaway
mkdir -p "$REDIS_DIR"
start_redis "$REDIS_DIR" "$REDISPORT"

start_redis_cluster "$CLUSTER_DIR" 3

export CREDITD_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"
export CREDITD_TEST_REDIS_URL="redis://127.0.0.1:$REDISPORT/"
CREDITD_TEST_REDIS_CLUSTER_URL="$(cat "$CLUSTER_DIR/urls")"
export CREDITD_TEST_REDIS_CLUSTER_URL
echo "CREDITD_TEST_DATABASE_URL=$CREDITD_TEST_DATABASE_URL"
echo "CREDITD_TEST_REDIS_URL=$CREDITD_TEST_REDIS_URL"
echo "CREDITD_TEST_REDIS_CLUSTER_URL=$CREDITD_TEST_REDIS_CLUSTER_URL"

step() { printf '\n==> %s\n' "$*"; }

# Run a command in the background and wait for it, so that INT/TERM reach our
# trap immediately (bash defers traps while a foreground child runs).
run() {
    "$@" &
    CHILD_PID=$!
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

if [[ "${CREDITD_SKIP_LINT:-0}" == 1 ]]; then
    step "CREDITD_SKIP_LINT=1: skipping cargo fmt and cargo clippy"
else
    step "cargo fmt --check"
    run cargo fmt --check
    step "cargo clippy --all-targets --locked -- -D warnings"
    run cargo clippy --all-targets --locked -- -D warnings
    step "cargo clippy --locked --features otlp --bin creditd -- -D warnings (the image's build)"
    run cargo clippy --locked --features otlp --bin creditd -- -D warnings
fi

step "scripts/helm-check.sh: helm lint --strict, helm template, kubernetes-validate --strict"
run bash scripts/helm-check.sh

step "cargo test --all-targets --locked $*"
run cargo test --all-targets --locked "$@"

CREDITD_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/creditd"
if [[ -x "$CREDITD_BIN" ]]; then
    step "scripts/helm-check.sh --config-only: the chart's rendered creditd.toml loads in creditd"
    run bash scripts/helm-check.sh --config-only --creditd "$CREDITD_BIN"
fi

printf '\n==> scripts/test.sh: ALL CHECKS PASSED\n'
