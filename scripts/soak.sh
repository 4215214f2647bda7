#!/usr/bin/env bash
# The creditd soak test: minutes of mixed traffic over two replicas while
# faults are injected at random times, then an audit of the invariants.
#
#   1. builds creditd and creditd-soak (release by default: realistic
#      throughput; --debug for a quicker build);
#   2. starts a throwaway PostgreSQL (durable settings, so that an
#      immediate stop loses nothing acknowledged) and Redis (with an AOF
#      fsynced every second, as production runs it) on free loopback ports, bootstraps an operator key with
#      `creditd keys create --role operator`, and starts two
#      `creditd serve` replicas on free loopback ports;
#   3. `creditd-soak run` seeds tenants, pooled accounts and grants through
#      the API, then drives closed-loop mixed traffic over both replicas;
#   4. meanwhile this script injects faults at seeded random times, each
#      logged with its time: a replica killed with SIGKILL and restarted;
#      Redis emptied (FLUSHALL, or killed and restarted with no data);
#      Redis rolled back (its AOF copied, 2 to 6 s of traffic, then killed
#      with SIGKILL and restarted from the copy: the writes of those
#      seconds lost, as a restore or a host crash under everysec loses
#      them); PostgreSQL stopped (fast or immediate) for about 10 s; Redis
#      paused (CLIENT PAUSE) for 0.3 to 3 s. Every kind is injected at least once when the
#      run is long enough; faults stop 25 s before the traffic does;
#   5. `creditd-soak audit` waits for both replicas to serve and for every
#      hold to expire or settle, checks the invariants, and writes
#      soak/results/latest.md and latest.json; `creditd check --tenant`
#      then runs for every tenant as a second opinion;
#   6. stops everything it started, whatever the outcome.
#
# Usage: scripts/soak.sh [--minutes N] [--seed S] [--workers W] [--debug]
#   --minutes N   traffic duration (default 5; fractions allowed: 1.5)
#   --seed S      seed of the traffic and of the fault schedule (default:
#                 from the clock; printed and recorded)
#   --workers W   closed-loop traffic workers (default 24)
#   --debug       debug build instead of release
#   CREDITD_SOAK_OUT=DIR   write results elsewhere (default soak/results)
#   CREDITD_SOAK_KEEP=1    keep the temporary directory (logs, records)
# Exit status: 0 when every invariant holds, non-zero otherwise.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"

MINUTES=5
SEED=""
WORKERS=24
PROFILE=release
while [[ $# -gt 0 ]]; do
    case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (see --help)" >&2
        exit 2
        ;;
    esac
done
[[ "$MINUTES" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "--minutes: a number of minutes" >&2; exit 2; }
[[ -z "$SEED" || "$SEED" =~ ^[0-9]+$ ]] || { echo "--seed: a non-negative integer" >&2; exit 2; }
[[ "$WORKERS" =~ ^[0-9]+$ && "$WORKERS" -ge 1 ]] || { echo "--workers: a positive integer" >&2; exit 2; }
SEED="${SEED:-$(( $(date +%s) % 1000000 ))}"
SECONDS_OF_TRAFFIC="$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 }')"
((SECONDS_OF_TRAFFIC >= 30)) || { echo "--minutes: at least 0.5" >&2; exit 2; }

OUT_DIR="${CREDITD_SOAK_OUT:-$REPO_ROOT/soak/results}"
KEEP="${CREDITD_SOAK_KEEP:-0}"
# Durable PostgreSQL whatever the caller's environment says: an immediate
# stop must not lose an acknowledged commit.
export CREDITD_PG_THROWAWAY=0

step() { printf '\n==> %s\n' "$*"; }
ts() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }

ensure_packages

TMP_DIR=""
PG_DIR=""
REDIS_DIR=""
DRIVER_PID=""
CHILD_PID=""
REPLICA_PIDS=()
REPLICA_PORTS=()

stop_replica() {
    local i="$1" signal="${2:-TERM}" pid="${REPLICA_PIDS[$1]:-}"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "-$signal" "$pid" 2>/dev/null || true
        local n
        for ((n = 0; n < 75; n++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    REPLICA_PIDS[i]=""
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for pid in "$CHILD_PID" "$DRIVER_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    local i
    for i in "${!REPLICA_PIDS[@]}"; do
        stop_replica "$i" TERM
    done
    [[ -n "$PG_DIR" ]] && stop_postgres "$PG_DIR" fast
    [[ -n "$REDIS_DIR" ]] && stop_redis "$REDIS_DIR"
    if [[ $rc -ne 0 && -n "$TMP_DIR" ]]; then
        for f in "$TMP_DIR"/replica-*.log; do
            [[ -f "$f" ]] || continue
            echo "--- last lines of $(basename "$f") ---" >&2
            tail -n 15 "$f" >&2
        done
    fi
    if [[ -n "$TMP_DIR" ]]; then
        if [[ "$KEEP" == 1 ]]; then
            echo "kept $TMP_DIR" >&2
        else
            rm -rf "$TMP_DIR"
        fi
    fi
    if [[ $rc -ne 0 ]]; then
        printf '\n==> scripts/soak.sh: FAILED (exit code %s)\n' "$rc" >&2
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

# Sleeps in the background so that INT/TERM are handled at once.
nap() {
    sleep "$1" &
    CHILD_PID=$!
    wait "$CHILD_PID" || true
    CHILD_PID=""
}

BUILD_ARGS=(--bins --locked)
[[ "$PROFILE" == release ]] && BUILD_ARGS+=(--release)
step "cargo build ${BUILD_ARGS[*]}"
BUILD_START=$SECONDS
run cargo build "${BUILD_ARGS[@]}"
echo "built in $((SECONDS - BUILD_START)) s"
BIN="$REPO_ROOT/target/$PROFILE"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/creditd-soak.XXXXXX")"
chmod 0755 "$TMP_DIR"
PG_DIR="$TMP_DIR/pg"
REDIS_DIR="$TMP_DIR/redis"
FAULTS="$TMP_DIR/faults.log"
: >"$FAULTS"

step "throwaway PostgreSQL (durable) and Redis on loopback"
PGPORT="$(free_port)"
REDISPORT="$(free_port)"
while [[ "$REDISPORT" == "$PGPORT" ]]; do REDISPORT="$(free_port)"; done
start_postgres "$PG_DIR" "$PGPORT"
mkdir -p "$REDIS_DIR"
start_redis "$REDIS_DIR" "$REDISPORT" everysec
"$(pg_bin psql)" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE creditd" >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/creditd"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/"

step "migrate, operator key"
"$BIN/creditd" migrate 2>>"$TMP_DIR/creditd.log"
CREDITD_SOAK_OPERATOR_KEY="$("$BIN/creditd" keys create --role operator --name soak 2>>"$TMP_DIR/creditd.log")"
export CREDITD_SOAK_OPERATOR_KEY

# Replica settings: a short statement timeout and commit deadline so that
# in-doubt commits settle within seconds of a fault (the deadline must be at
# least 3 × the statement timeout). The reconciler measures every 5 s and
# repairs nothing: any drift it sees during the run fails the soak below
# instead of being repaired out of the audit's sight.
start_replica() {
    local i="$1" port="${REPLICA_PORTS[$1]}" n
    CREDITD_SERVER__LISTEN="127.0.0.1:$port" \
        CREDITD_POSTGRES__MAX_CONNECTIONS=16 \
        CREDITD_POSTGRES__STATEMENT_TIMEOUT=1s \
        CREDITD_HOT__COMMIT_DEADLINE=5s \
        CREDITD_RECONCILE__INTERVAL=5s \
        CREDITD_RECONCILE__REPAIR=false \
        CREDITD_LOG__FILTER=warn \
        "$BIN/creditd" serve >>"$TMP_DIR/replica-$i.log" 2>&1 &
    REPLICA_PIDS[i]=$!
    for ((n = 0; n < 150; n++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "${REPLICA_PIDS[$i]}" 2>/dev/null || {
            echo "replica $i exited at start (log: replica-$i.log)" >&2
            tail -n 20 "$TMP_DIR/replica-$i.log" >&2
            return 1
        }
        sleep 0.2
    done
    echo "replica $i did not listen on 127.0.0.1:$port" >&2
    return 1
}

step "two creditd replicas"
for i in 0 1; do
    port="$(free_port)"
    while [[ "$port" == "$PGPORT" || "$port" == "$REDISPORT" || "$port" == "${REPLICA_PORTS[0]:-}" ]]; do
        port="$(free_port)"
    done
    REPLICA_PORTS[i]="$port"
    start_replica "$i"
    echo "replica $i: pid ${REPLICA_PIDS[$i]} on 127.0.0.1:$port"
done
ADDRS="127.0.0.1:${REPLICA_PORTS[0]},127.0.0.1:${REPLICA_PORTS[1]}"

# ---------------------------------------------------------------------------
# Faults

fault_log() {
    local line
    line="$(ts)	$1	$2"
    printf '%s\n' "$line" >>"$FAULTS"
    printf '[fault] %s\n' "$line"
}

fault_replica_kill() {
    local i=$((RANDOM % 2)) down
    down="$((1 + RANDOM % 4))"
    fault_log replica_kill "kill -9 replica $i (pid ${REPLICA_PIDS[$i]}), restart after ${down} s"
    # (bash's "Killed" notice for its child is expected: silence it)
    { stop_replica "$i" KILL; } 2>/dev/null
    nap "$down"
    start_replica "$i"
    fault_log replica_kill_end "replica $i restarted (pid ${REPLICA_PIDS[$i]})"
}

fault_redis_empty() {
    local pid
    if ((RANDOM % 2 == 0)); then
        fault_log redis_empty "FLUSHALL"
        redis-cli -h 127.0.0.1 -p "$REDISPORT" FLUSHALL >/dev/null
    else
        pid="$(head -n 1 "$REDIS_DIR/redis.pid")"
        fault_log redis_empty "kill -9 redis-server (pid $pid), restart empty"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        rm -rf "$REDIS_DIR/appendonlydir"
        start_redis "$REDIS_DIR" "$REDISPORT" everysec 2>/dev/null
        fault_log redis_empty_end "redis-server restarted empty (pid $(head -n 1 "$REDIS_DIR/redis.pid"))"
    fi
}

fault_redis_rollback() {
    local pid keep
    keep="$((2 + RANDOM % 5))"
    rm -rf "$REDIS_DIR/aof-copy"
    cp -r "$REDIS_DIR/appendonlydir" "$REDIS_DIR/aof-copy"
    fault_log redis_rollback "AOF copied; ${keep} s of traffic, then kill -9 and restart from the copy"
    nap "$keep"
    pid="$(head -n 1 "$REDIS_DIR/redis.pid")"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -rf "$REDIS_DIR/appendonlydir"
    mv "$REDIS_DIR/aof-copy" "$REDIS_DIR/appendonlydir"
    start_redis "$REDIS_DIR" "$REDISPORT" everysec 2>/dev/null
    fault_log redis_rollback_end "redis-server restarted ${keep} s behind (pid $(head -n 1 "$REDIS_DIR/redis.pid"))"
}

fault_pg_stop() {
    local mode down
    mode=immediate
    ((RANDOM % 2 == 0)) && mode=fast
    down="$((8 + RANDOM % 5))"
    fault_log pg_stop "pg_ctl stop -m $mode, start again after ${down} s"
    stop_postgres "$PG_DIR" "$mode"
    nap "$down"
    start_postgres "$PG_DIR" "$PGPORT" 2>/dev/null
    fault_log pg_stop_end "PostgreSQL started"
}

fault_redis_slow() {
    local ms=$((300 + RANDOM % 2701))
    fault_log redis_slow "CLIENT PAUSE $ms ALL"
    redis-cli -h 127.0.0.1 -p "$REDISPORT" CLIENT PAUSE "$ms" ALL >/dev/null
    nap "$(awk -v ms="$ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
    fault_log redis_slow_end "paused clients resumed"
}

step "creditd-soak run: ${SECONDS_OF_TRAFFIC} s of traffic, seed $SEED, $PROFILE build"
"$BIN/creditd-soak" run --addr "$ADDRS" --seconds "$SECONDS_OF_TRAFFIC" --seed "$SEED" --workers "$WORKERS" \
    --records "$TMP_DIR/records.json" --tenants-file "$TMP_DIR/tenants" --ready-file "$TMP_DIR/ready" &
DRIVER_PID=$!
for _ in $(seq 1 600); do
    [[ -s "$TMP_DIR/ready" ]] && break
    kill -0 "$DRIVER_PID" 2>/dev/null || break
    sleep 0.2
done
[[ -s "$TMP_DIR/ready" ]] || { echo "creditd-soak did not start its traffic" >&2; exit 1; }
TRAFFIC_END="$(cat "$TMP_DIR/ready")"
FAULTS_END=$((TRAFFIC_END - 25))

# The schedule: seeded; the first four faults are every kind once, in a
# seeded order, then kinds at random; 8 to 22 s between faults.
RANDOM=$SEED
KINDS=(replica_kill redis_empty redis_rollback pg_stop redis_slow)
for ((i = ${#KINDS[@]} - 1; i > 0; i--)); do
    j=$((RANDOM % (i + 1)))
    tmp="${KINDS[i]}"
    KINDS[i]="${KINDS[j]}"
    KINDS[j]="$tmp"
done
N_FAULTS=0
while :; do
    gap=$((8 + RANDOM % 15))
    now="$(date +%s)"
    ((now + gap + 15 <= FAULTS_END)) || break
    nap "$gap"
    kill -0 "$DRIVER_PID" 2>/dev/null || break
    if ((N_FAULTS < ${#KINDS[@]})); then
        kind="${KINDS[$N_FAULTS]}"
    else
        kind="${KINDS[$((RANDOM % ${#KINDS[@]}))]}"
    fi
    "fault_$kind"
    N_FAULTS=$((N_FAULTS + 1))
done
fault_log note "no more faults ($N_FAULTS injected)"

rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=""
[[ $rc -eq 0 ]] || { echo "creditd-soak run failed ($rc)" >&2; exit "$rc"; }

# Everything must be up for the audit (each fault restores what it broke).
for i in 0 1; do
    kill -0 "${REPLICA_PIDS[$i]}" 2>/dev/null || { echo "replica $i is down after the run" >&2; exit 1; }
done
postgres_running "$PG_DIR" "$PGPORT" || { echo "PostgreSQL is down after the run" >&2; exit 1; }
redis_running "$REDIS_DIR" || { echo "Redis is down after the run" >&2; exit 1; }

step "creditd-soak audit"
LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+changes'), $PROFILE build, $MINUTES min"
mkdir -p "$OUT_DIR"
audit_rc=0
run "$BIN/creditd-soak" audit --addr "$ADDRS" --records "$TMP_DIR/records.json" --faults "$FAULTS" \
    --out "$OUT_DIR" --label "$LABEL" || audit_rc=$?
[[ -f "$OUT_DIR/latest.md" ]] || exit "${audit_rc:-1}"

step "creditd check --tenant, every tenant"
check_rc=0
{
    printf '\n## creditd check\n\n```\n'
    while read -r t; do
        printf '$ creditd check --tenant %s\n' "$t"
        CREDITD_LOG__FILTER=error "$BIN/creditd" check --tenant "$t" 2>&1 || check_rc=$?
    done <"$TMP_DIR/tenants"
    printf '```\n'
} >"$TMP_DIR/check.md"
cat "$TMP_DIR/check.md"
cat "$TMP_DIR/check.md" >>"$OUT_DIR/latest.md"

step "reconciler: drift seen during the run"
drift_lines="$(cat "$TMP_DIR"/replica-*.log | grep -c 'hot balance drifts from the ledger' || true)"
{
    printf '\n## Reconciler\n\n'
    printf 'Drift reported by the reconciler (every 5 s, repair off) during the run: %s log lines.\n' "$drift_lines"
    if [[ "$drift_lines" != 0 ]]; then
        printf '\n```\n'
        cat "$TMP_DIR"/replica-*.log | grep 'hot balance drifts from the ledger' | head -n 20
        printf '```\n'
    fi
} >>"$OUT_DIR/latest.md"
echo "reconciler drift lines: $drift_lines"

step "results"
# Everything but the fault log (it is in the file) and the check output (above).
sed -e '/^<details>/,/^<\/details>/d' -e '/^## creditd check/,$d' "$OUT_DIR/latest.md"
if [[ $audit_rc -ne 0 || $check_rc -ne 0 || "$drift_lines" != 0 ]]; then
    printf '\n==> scripts/soak.sh: invariants FAILED (audit %s, creditd check %s, reconciler drift lines %s); see %s\n' \
        "$audit_rc" "$check_rc" "$drift_lines" "$OUT_DIR/latest.md" >&2
    exit 1
fi
printf '\n==> scripts/soak.sh: all invariants hold (%s s in all)\n' "$SECONDS"
