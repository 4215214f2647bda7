#!/usr/bin/env bash
# The creditd benchmark, end to end on this machine:
#
#   1. builds the release binaries (creditd, creditd-bench);
#   2. starts a throwaway PostgreSQL and Redis on free loopback ports.
#      PostgreSQL keeps its default, durable settings (fsync on,
#      synchronous_commit on): a Commit's answer waits for its WAL flush, as
#      in production. Redis runs without persistence, as creditd allows (its
#      state is rebuilt from PostgreSQL);
#   3. bootstraps an operator key with `creditd keys create --role operator`,
#      starts `creditd serve --migrate` on a free loopback port;
#   4. runs creditd-bench: it seeds tenants, pools and users through the
#      API, runs every scenario at concurrency 1 and 64 plus the gRPC floor
#      and the Redis ceiling, the footprint and growth measurements, and
#      writes bench/results/latest.json and bench/results/latest.md;
#   5. stops everything it started, whatever the outcome.
#
# Usage: scripts/bench.sh [creditd-bench args...]
#   scripts/bench.sh --seconds 10          longer runs
#   scripts/bench.sh --scale 1000,100000   smaller growth runs
#   CREDITD_BENCH_PROFILE=1 scripts/bench.sh
#        afterwards, also profiles creditd, redis-server and PostgreSQL with
#        perf during extra Reserve and Reserve+Commit runs at concurrency 64,
#        into bench/results/profile-*.txt (needs perf: apt-get install linux-perf)
#   CREDITD_BENCH_OUT=DIR                  write results elsewhere
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

OUT_DIR="${CREDITD_BENCH_OUT:-$REPO_ROOT/bench/results}"
PROFILE="${CREDITD_BENCH_PROFILE:-0}"
# Durable PostgreSQL, whatever the caller's environment says.
export CREDITD_PG_THROWAWAY=0

step() { printf '\n==> %s\n' "$*"; }

ensure_packages

TMP_DIR=""
SERVER_PID=""
CHILD_PID=""
PG_DIR=""
REDIS_DIR=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$CHILD_PID" ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill -TERM "$CHILD_PID" 2>/dev/null
        wait "$CHILD_PID" 2>/dev/null
    fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 75); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    [[ -n "$PG_DIR" ]] && stop_postgres "$PG_DIR" fast
    [[ -n "$REDIS_DIR" ]] && stop_redis "$REDIS_DIR"
    if [[ $rc -ne 0 && -n "$TMP_DIR" && -f "$TMP_DIR/creditd.log" ]]; then
        echo "--- last lines of the creditd log ---" >&2
        tail -n 30 "$TMP_DIR/creditd.log" >&2
    fi
    [[ -n "$TMP_DIR" ]] && rm -rf "$TMP_DIR"
    if [[ $rc -ne 0 ]]; then
        printf '\n==> scripts/bench.sh: FAILED (exit code %s)\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in the background and waits, so INT/TERM reach the trap.
run() {
    "$@" &
    CHILD_PID=$!
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

step "cargo build --release --bins --locked"
BUILD_START=$SECONDS
run cargo build --release --bins --locked
echo "built in $((SECONDS - BUILD_START)) s"
BIN="$REPO_ROOT/target/release"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/creditd-bench.XXXXXX")"
chmod 0755 "$TMP_DIR"
PG_DIR="$TMP_DIR/pg"
REDIS_DIR="$TMP_DIR/redis"

step "throwaway PostgreSQL (durable settings) and Redis on loopback"
PGPORT="$(free_port)"
REDISPORT="$(free_port)"
while [[ "$REDISPORT" == "$PGPORT" ]]; do REDISPORT="$(free_port)"; done
start_postgres "$PG_DIR" "$PGPORT"
mkdir -p "$REDIS_DIR"
start_redis "$REDIS_DIR" "$REDISPORT"
"$(pg_bin psql)" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE creditd" >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/creditd"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/"

step "operator key, creditd serve --migrate"
"$BIN/creditd" migrate 2>>"$TMP_DIR/creditd.log"
CREDITD_BENCH_OPERATOR_KEY="$("$BIN/creditd" keys create --role operator --name bench 2>>"$TMP_DIR/creditd.log")"
export CREDITD_BENCH_OPERATOR_KEY
PORT="$(free_port)"
CREDITD_LOG__FILTER=warn "$BIN/creditd" serve --listen "127.0.0.1:$PORT" --migrate >>"$TMP_DIR/creditd.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || {
        echo "creditd exited at start" >&2
        exit 1
    }
    sleep 0.2
done
echo "creditd pid $SERVER_PID on 127.0.0.1:$PORT"

REDIS_PID="$(head -n 1 "$REDIS_DIR/redis.pid")"
PG_PID="$(head -n 1 "$PG_DIR/postmaster.pid")"
LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+changes')"
COMMON=(--addr "127.0.0.1:$PORT" --server-pid "$SERVER_PID" --redis-pid "$REDIS_PID" --postgres-pid "$PG_PID"
    --clk-tck "$(getconf CLK_TCK)" --redis-prefix "creditd:")

step "creditd-bench"
mkdir -p "$OUT_DIR"
run "$BIN/creditd-bench" "${COMMON[@]}" --out "$OUT_DIR" --label "$LABEL" "$@"

if [[ "$PROFILE" == 1 ]]; then
    step "profile: Reserve and Reserve+Commit at concurrency 64 under perf"
    if command -v perf >/dev/null 2>&1 && perf record -o /dev/null -- true >/dev/null 2>&1; then
        run "$BIN/creditd-bench" "${COMMON[@]}" --only reserve_spread,reserve_commit --concurrency 64 --seconds 8 \
            --perf "$TMP_DIR/perf" >"$TMP_DIR/profile-run.json"
        for f in "$TMP_DIR"/perf/*.perf; do
            name="$(basename "$f" .perf)"
            {
                echo "# perf profile: $name (figures of this run are not benchmark results: perf slows it)"
                if [[ "$name" != *postgres && -x "$(command -v python3)" ]]; then
                    perf script -i "$f" -F comm,ip,sym 2>/dev/null | python3 "$REPO_ROOT/scripts/lib/perf_summary.py" || true
                fi
                echo
                echo "## perf report --no-children (self time)"
                perf report -i "$f" --no-children --stdio --percent-limit 0.8 -g none --sort symbol 2>/dev/null |
                    grep -v '^#' | grep -v '^$' | sed 's/  */ /g' | cut -c1-160 | head -n 40 || true
                echo
                echo "## perf report --children (inclusive)"
                perf report -i "$f" --children --stdio --percent-limit 4 -g none --sort symbol 2>/dev/null |
                    grep -v '^#' | grep -v '^$' | grep -v ' 0x0000' | sed 's/  */ /g' | cut -c1-160 | head -n 60 || true
            } >"$OUT_DIR/profile-$name.txt"
        done
        echo "wrote $OUT_DIR/profile-*.txt"
    else
        echo "perf is unavailable (apt-get install linux-perf) or not permitted here: no profile" >&2
    fi
fi

step "results"
cat "$OUT_DIR/latest.md"
printf '\n==> scripts/bench.sh: done in %s s\n' "$SECONDS"
