#!/usr/bin/env bash
# Redis cost of the hot-path Lua scripts, repeatable: starts a throwaway
# redis-server under valgrind's callgrind on a free loopback port, drives
# Reserve, Commit, finalize and replays through it the way creditd calls
# them (scripts/lib/lua_cost.py), prints instructions per operation, and
# stops it. Needs valgrind and python3. Takes about a minute.
#
# Usage: scripts/lua-cost.sh [operations per phase, default 2000]
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/services.sh
source "$REPO_ROOT/scripts/lib/services.sh"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
DIR="$(mktemp -d "${TMPDIR:-/tmp}/creditd-lua-cost.XXXXXX")"
PORT="$(free_port)"
PID=""
cleanup() {
    [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
valgrind --tool=callgrind --callgrind-out-file="$DIR/callgrind.out.%p" \
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
    sleep 0.2
done
python3 "$REPO_ROOT/scripts/lib/lua_cost.py" "$REPO_ROOT" "$PORT" "$PID" "$DIR" "${1:-2000}"
