#!/usr/bin/env bash
# The hot-state rebuild benchmark (issue 13), end to end on this machine:
#
#   1. builds the release binaries (creditd, creditd-rebuild-bench);
#   2. starts a throwaway PostgreSQL (durable settings, as scripts/bench.sh)
#      and Redis (no persistence) on free loopback ports;
#   3. per phase: a database of its own, `creditd migrate`, an operator key
#      (`creditd keys create --role operator`), `creditd serve --migrate`
#      with JSON logs and the metrics listener, then creditd-rebuild-bench:
#      tenants through the API, users seeded in PostgreSQL, one warm-up
#      FLUSHALL and REPS measured ones (each until every tenant answers
#      GetBalance with its seeded balances);
#   4. EXPLAIN (ANALYZE, BUFFERS) of the snapshot's statements for the
#      largest single tenant (bench/results/rebuild-explain-<date>.txt);
#   5. writes bench/results/rebuild-<date>.jsonl and rebuild-<date>.md;
#      stops everything it started, whatever the outcome.
#
# Usage: scripts/bench-rebuild.sh [PHASE...]
#   PHASE is name:tenants:accounts_per_tenant[:FLAGS], FLAGS comma-separated:
#     untouched  also measure an untouched tenant during a rebuild
#     nojit      the phase's database runs with jit = off (ALTER DATABASE),
#                to compare: creditd's code is the same
#     reps=N     measured rounds of this phase
#   default:
#     acc1k:1:1000 acc10k:1:10000 acc100k:1:100000:untouched
#     ten10:10:1000 ten100:100:1000 ten1000:1000:1000:reps=1
#     acc1knj:1:1000:nojit acc100knj:1:100000:nojit,untouched ten100nj:100:1000:nojit
#     ten1000nj:1000:1000:nojit,reps=2
#   CREDITD_REBUILD_REPS=3         measured rounds per phase
#   CREDITD_REBUILD_APPEND=1       append to today's rebuild-<date>.jsonl
#   CREDITD_BENCH_OUT=DIR          write results elsewhere
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

OUT_DIR="${CREDITD_BENCH_OUT:-$REPO_ROOT/bench/results}"
REPS="${CREDITD_REBUILD_REPS:-3}"
export CREDITD_PG_THROWAWAY=0
PHASES=("$@")
if [[ ${#PHASES[@]} -eq 0 ]]; then
    PHASES=(acc1k:1:1000 acc10k:1:10000 acc100k:1:100000:untouched ten10:10:1000 ten100:100:1000
        ten1000:1000:1000:reps=1
        acc1knj:1:1000:nojit acc100knj:1:100000:nojit,untouched ten100nj:100:1000:nojit ten1000nj:1000:1000:nojit,reps=2)
fi

step() { printf '\n==> %s\n' "$*"; }

ensure_packages

TMP_DIR=""
SERVER_PID=""
CHILD_PID=""
PG_DIR=""
REDIS_DIR=""

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 75); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$CHILD_PID" ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill -TERM "$CHILD_PID" 2>/dev/null
        wait "$CHILD_PID" 2>/dev/null
    fi
    stop_server
    [[ -n "$PG_DIR" ]] && stop_postgres "$PG_DIR" fast
    [[ -n "$REDIS_DIR" ]] && stop_redis "$REDIS_DIR"
    if [[ $rc -ne 0 && -n "$TMP_DIR" && -f "$TMP_DIR/creditd.log" ]]; then
        echo "--- last lines of the creditd log ---" >&2
        tail -n 30 "$TMP_DIR/creditd.log" >&2
    fi
    [[ -n "$TMP_DIR" ]] && rm -rf "$TMP_DIR"
    if [[ $rc -ne 0 ]]; then
        printf '\n==> scripts/bench-rebuild.sh: FAILED (exit code %s)\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

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
BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/creditd-rebuild.XXXXXX")"
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
PSQL="$(pg_bin psql)"
REDIS_PID="$(head -n 1 "$REDIS_DIR/redis.pid")"
PG_PID="$(head -n 1 "$PG_DIR/postmaster.pid")"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/"

DATE="$(date -u +%Y-%m-%d)"
mkdir -p "$OUT_DIR"
JSONL="$OUT_DIR/rebuild-$DATE.jsonl"
# CREDITD_REBUILD_APPEND=1: add to today's results instead of starting over.
[[ "${CREDITD_REBUILD_APPEND:-0}" == 1 ]] || : >"$JSONL"
LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+changes')"

for phase in "${PHASES[@]}"; do
    IFS=: read -r name tenants accounts extra <<<"$phase"
    flags=()
    reps="$REPS"
    jit=on
    IFS=, read -r -a opts <<<"${extra:-}"
    for o in "${opts[@]}"; do
        case "$o" in
            untouched) flags+=(--untouched) ;;
            nojit) jit=off ;;
            reps=*) reps="${o#reps=}" ;;
            "") ;;
            *) echo "unknown phase flag: $o" >&2; exit 2 ;;
        esac
    done
    step "phase $name: $tenants tenant(s) x $accounts accounts (jit $jit, $reps rounds)"
    db="rb_$name"
    "$PSQL" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null
    "$PSQL" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "ALTER DATABASE $db SET jit = $jit" >/dev/null
    export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/$db"
    # Each phase starts from a Redis holding nothing of the others.
    redis-cli -h 127.0.0.1 -p "$REDISPORT" flushall >/dev/null
    LOG="$TMP_DIR/creditd-$name.log"
    : >"$LOG"
    ln -sf "$LOG" "$TMP_DIR/creditd.log"
    "$BIN/creditd" migrate 2>>"$LOG"
    CREDITD_BENCH_OPERATOR_KEY="$("$BIN/creditd" keys create --role operator --name rebuild-bench 2>>"$LOG")"
    export CREDITD_BENCH_OPERATOR_KEY
    PORT="$(free_port)"
    MPORT="$(free_port)"
    CREDITD_LOG__FORMAT=json CREDITD_LOG__FILTER=info CREDITD_METRICS__LISTEN="127.0.0.1:$MPORT" \
        "$BIN/creditd" serve --listen "127.0.0.1:$PORT" --migrate >>"$LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 150); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || {
            echo "creditd exited at start" >&2
            exit 1
        }
        sleep 0.2
    done
    run "$BIN/creditd-rebuild-bench" --addr "127.0.0.1:$PORT" --server-log "$LOG" \
        --metrics-addr "127.0.0.1:$MPORT" --server-pid "$SERVER_PID" --redis-pid "$REDIS_PID" \
        --postgres-pid "$PG_PID" --clk-tck "$(getconf CLK_TCK)" --redis-prefix "creditd:" \
        --name "$name" --tenants "$tenants" --accounts "$accounts" --reps "$reps" --jit "$jit" --out "$JSONL" "${flags[@]}"
    if [[ " ${flags[*]} " == *" --untouched "* ]]; then
        step "EXPLAIN ANALYZE of the snapshot's statements ($name-0000, jit $jit)"
        "$PSQL" -X -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$db" -v tenant="$name-0000" \
            -f "$REPO_ROOT/scripts/lib/snapshot-explain.sql" >"$OUT_DIR/rebuild-explain-$name-$DATE.txt" 2>&1 || true
    fi
    stop_server
    # Keep the log's rebuild lines for the record.
    grep '"hot state rebuilt' "$LOG" | tail -n 5 || true
done

step "results"
python3 "$REPO_ROOT/scripts/lib/rebuild_report.py" "$JSONL" "$LABEL" >"$OUT_DIR/rebuild-$DATE.md"
cat "$OUT_DIR/rebuild-$DATE.md"
printf '\n==> scripts/bench-rebuild.sh: done in %s s\n' "$SECONDS"
