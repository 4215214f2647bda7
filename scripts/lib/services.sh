# shellcheck shell=bash
# Helpers for running private PostgreSQL and Redis instances on loopback ports.
#
# Source this file; it is safe under `set -euo pipefail`. It never touches a
# system-wide PostgreSQL/Redis (no pg_ctlcluster, no systemctl, no fixed ports):
# every instance lives in a directory of its own and listens on 127.0.0.1 only.
#
#   ensure_packages                  install postgresql/redis-server if missing; require cargo
#   ensure_cargo                     require cargo (adds ~/.cargo/bin to PATH if needed)
#   free_port                        print a free loopback TCP port
#   start_postgres DIR PORT [throwaway]
#                                    initdb DIR if needed, start on 127.0.0.1:PORT; with
#                                    "throwaway" (or CREDITD_PG_THROWAWAY=1) durability is off
#   stop_postgres DIR [MODE]         pg_ctl stop (MODE defaults to immediate); never fails
#   postgres_running DIR             true if the instance in DIR is running
#   start_redis DIR PORT [persistent]
#                                    redis-server on 127.0.0.1:PORT; "persistent" enables AOF
#   stop_redis DIR                   stop the redis started in DIR; never fails
#   redis_running DIR                true if the redis started in DIR is running
#   pg_bin TOOL                      print the path of a PostgreSQL tool (initdb, pg_ctl, psql...)

if [[ -n "${_CREDITD_SERVICES_SH:-}" ]]; then
    return 0
fi
_CREDITD_SERVICES_SH=1

_svc_log() { printf '[services] %s\n' "$*" >&2; }
_svc_die() {
    printf '[services] ERROR: %s\n' "$*" >&2
    exit 1
}

_svc_is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Directory holding initdb/pg_ctl/pg_isready/psql of a single PostgreSQL version.
# Prefers the highest /usr/lib/postgresql/*/bin; falls back to initdb on PATH.
_pg_bindir() {
    if [[ -n "${_CREDITD_PG_BINDIR:-}" ]]; then
        printf '%s\n' "$_CREDITD_PG_BINDIR"
        return 0
    fi
    local d best="" bestver=-1 ver
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] || continue
        ver="${d#/usr/lib/postgresql/}"
        ver="${ver%%/*}"
        ver="${ver%%.*}"
        [[ "$ver" =~ ^[0-9]+$ ]] || continue
        if ((ver > bestver)); then
            bestver=$ver
            best=$d
        fi
    done
    if [[ -z "$best" ]]; then
        local p
        if p="$(command -v initdb 2>/dev/null)" && [[ -n "$p" ]]; then
            p="$(readlink -f "$p")"
            best="$(dirname "$p")"
        fi
    fi
    [[ -n "$best" ]] || return 1
    _CREDITD_PG_BINDIR="$best"
    printf '%s\n' "$best"
}

# pg_bin TOOL: path of a PostgreSQL client/server tool, preferring the same
# version directory as initdb (Debian's /usr/bin wrappers are the fallback).
pg_bin() {
    local tool="$1" dir
    if dir="$(_pg_bindir)" && [[ -x "$dir/$tool" ]]; then
        printf '%s\n' "$dir/$tool"
        return 0
    fi
    if command -v "$tool" >/dev/null 2>&1; then
        command -v "$tool"
        return 0
    fi
    return 1
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
        PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
        export PATH
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        cat >&2 <<'EOF'
[services] ERROR: `cargo` was not found on PATH.
  Install the Rust toolchain (stable) with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile default
    . "$HOME/.cargo/env"
    rustup component add rustfmt clippy
  then re-run this script.
EOF
        exit 1
    fi
}

_svc_have_services() {
    _pg_bindir >/dev/null 2>&1 || return 1
    pg_bin pg_isready >/dev/null 2>&1 || return 1
    pg_bin psql >/dev/null 2>&1 || return 1
    command -v redis-server >/dev/null 2>&1 || return 1
    command -v redis-cli >/dev/null 2>&1 || return 1
}

ensure_packages() {
    if ! _svc_have_services; then
        _svc_log "PostgreSQL and/or Redis binaries not found; installing postgresql + redis-server via apt-get"
        local -a sudo=()
        if ! _svc_is_root; then
            if command -v sudo >/dev/null 2>&1; then
                sudo=(sudo -n)
            else
                _svc_die "not root and sudo is unavailable; install postgresql and redis-server manually (apt-get install -y postgresql redis-server)"
            fi
        fi
        command -v apt-get >/dev/null 2>&1 ||
            _svc_die "apt-get not available; install PostgreSQL (initdb, pg_ctl, psql) and redis-server manually"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            postgresql postgresql-client redis-server redis-tools </dev/null
        unset _CREDITD_PG_BINDIR
        _svc_have_services || _svc_die "PostgreSQL/Redis binaries still missing after apt-get install"
    fi
    # The failover tests run real Sentinels (redis-server's sentinel mode,
    # packaged as redis-sentinel).
    if ! command -v redis-sentinel >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        _svc_log "redis-sentinel not found; installing it via apt-get"
        local -a sudo2=()
        _svc_is_root || sudo2=(sudo -n)
        "${sudo2[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-sentinel </dev/null ||
            { "${sudo2[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null &&
              "${sudo2[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-sentinel </dev/null; } ||
            _svc_log "redis-sentinel could not be installed; the tests fall back to redis-server --sentinel"
    fi
    if _svc_is_root && ! id -u postgres >/dev/null 2>&1; then
        _svc_log "creating system user 'postgres'"
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    ensure_cargo
}

# free_port: print a TCP port on 127.0.0.1 that is currently free.
free_port() {
    local port
    if command -v python3 >/dev/null 2>&1 &&
        port="$(python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' 2>/dev/null)" && [[ "$port" =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$port"
        return 0
    fi
    local i
    for ((i = 0; i < 200; i++)); do
        port=$((20000 + RANDOM % 40000))
        # A refused connection means nobody is listening there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    _svc_die "could not find a free TCP port on 127.0.0.1"
}

# Run a PostgreSQL server-side tool; as root, drop to the `postgres` user.
_pg_as_owner() {
    if _svc_is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

_svc_abspath() {
    local p="$1"
    mkdir -p "$p"
    (cd "$p" && pwd -P)
}

# postgres_running DIR [PORT]: the instance in DIR is running (and, if PORT is
# given, answers on 127.0.0.1:PORT).
postgres_running() {
    local dir="$1" port="${2:-}" pg_ctl pg_isready
    [[ -f "$dir/PG_VERSION" ]] || return 1
    pg_ctl="$(pg_bin pg_ctl)" || return 1
    _pg_as_owner "$pg_ctl" -D "$dir" status >/dev/null 2>&1 || return 1
    if [[ -n "$port" ]]; then
        pg_isready="$(pg_bin pg_isready)" || return 1
        "$pg_isready" -q -h 127.0.0.1 -p "$port" -t 2 || return 1
    fi
}

# start_postgres DIR PORT [throwaway]
start_postgres() {
    local dir port mode="${3:-}"
    dir="$(_svc_abspath "$1")"
    port="$2"
    if [[ "${CREDITD_PG_THROWAWAY:-0}" == 1 ]]; then
        mode=throwaway
    fi
    local initdb pg_ctl pg_isready
    initdb="$(pg_bin initdb)" || _svc_die "initdb not found (run ensure_packages)"
    pg_ctl="$(pg_bin pg_ctl)" || _svc_die "pg_ctl not found"
    pg_isready="$(pg_bin pg_isready)" || _svc_die "pg_isready not found"

    if _svc_is_root; then
        id -u postgres >/dev/null 2>&1 ||
            useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
        chown postgres: "$dir"
        runuser -u postgres -- test -w "$dir" ||
            _svc_die "user 'postgres' cannot access $dir (a parent directory is not traversable); use a location such as /tmp or fix permissions"
    fi
    chmod 0700 "$dir"

    if [[ ! -f "$dir/PG_VERSION" ]]; then
        _svc_log "initdb $dir"
        _pg_as_owner "$initdb" -D "$dir" -A trust -U postgres --no-sync -E UTF8 --locale=C >"$dir.initdb.log" 2>&1 || {
            cat "$dir.initdb.log" >&2
            _svc_die "initdb failed for $dir"
        }
        rm -f "$dir.initdb.log"
    fi

    local opts="-h 127.0.0.1 -p $port -k $dir -c max_connections=400"
    if [[ "$mode" == throwaway ]]; then
        opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    _svc_log "starting postgres ($dir) on 127.0.0.1:$port${mode:+ [$mode]}"
    if ! _pg_as_owner "$pg_ctl" -D "$dir" -w -t 60 -o "$opts" -l "$dir/postgres.log" start >/dev/null; then
        tail -n 30 "$dir/postgres.log" >&2 2>/dev/null || true
        _svc_die "postgres failed to start on port $port (log: $dir/postgres.log)"
    fi
    local i
    for ((i = 0; i < 120; i++)); do
        if "$pg_isready" -q -h 127.0.0.1 -p "$port" -t 1; then
            return 0
        fi
        sleep 0.5
    done
    tail -n 30 "$dir/postgres.log" >&2 2>/dev/null || true
    _svc_die "postgres on 127.0.0.1:$port did not become ready"
}

# stop_postgres DIR [MODE]  (MODE: immediate (default), fast or smart)
stop_postgres() {
    local dir="${1:-}" mode="${2:-immediate}" pg_ctl pid
    [[ -n "$dir" && -f "$dir/PG_VERSION" ]] || return 0
    if pg_ctl="$(pg_bin pg_ctl 2>/dev/null)"; then
        _pg_as_owner "$pg_ctl" -D "$dir" -m "$mode" -w -t 30 stop >/dev/null 2>&1 || true
    fi
    # Last resort: the postmaster is still alive (e.g. pg_ctl unavailable).
    if [[ -f "$dir/postmaster.pid" ]]; then
        pid="$(head -n 1 "$dir/postmaster.pid" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        # A dead (or zombie, not yet reaped) postmaster leaves a stale lock file.
        if [[ "$pid" =~ ^[0-9]+$ ]] &&
            { ! kill -0 "$pid" 2>/dev/null || [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]]; }; then
            rm -f "$dir/postmaster.pid"
        fi
    fi
    return 0
}

_redis_pid() {
    local dir="$1" pid
    [[ -f "$dir/redis.pid" ]] || return 1
    pid="$(head -n 1 "$dir/redis.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse.
    grep -q redis "/proc/$pid/comm" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

redis_running() {
    local dir="$1" port
    _redis_pid "$dir" >/dev/null || return 1
    port="$(cat "$dir/redis.port" 2>/dev/null || true)"
    [[ -n "$port" ]] || return 1
    [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]]
}

# start_redis DIR PORT [persistent]
start_redis() {
    local dir port mode="${3:-}"
    dir="$(_svc_abspath "$1")"
    port="$2"
    local -a persist=(--save "" --appendonly no)
    if [[ "$mode" == persistent ]]; then
        persist=(--save "" --appendonly yes)
    elif [[ "$mode" == everysec ]]; then
        # As production runs it: an AOF fsynced every second (a crash may
        # lose the last second), which creditd's fence must survive.
        persist=(--save "" --appendonly yes --appendfsync everysec --aof-load-truncated yes)
    fi
    rm -f "$dir/redis.pid"
    printf '%s\n' "$port" >"$dir/redis.port"
    _svc_log "starting redis ($dir) on 127.0.0.1:$port${mode:+ [$mode]}"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" "${persist[@]}" \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" </dev/null >/dev/null ||
        _svc_die "redis-server failed to start (log: $dir/redis.log)"
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]] && _redis_pid "$dir" >/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    tail -n 30 "$dir/redis.log" >&2 2>/dev/null || true
    stop_redis "$dir"
    _svc_die "redis on 127.0.0.1:$port did not answer PING"
}

stop_redis() {
    local dir="${1:-}" pid port i
    [[ -n "$dir" && -d "$dir" ]] || return 0
    if pid="$(_redis_pid "$dir")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    else
        # No usable pidfile: shut down whatever answers on our port, but only
        # if it really is the instance whose working dir is DIR.
        port="$(cat "$dir/redis.port" 2>/dev/null || true)"
        if [[ "$port" =~ ^[0-9]+$ ]] &&
            [[ "$(redis-cli -h 127.0.0.1 -p "$port" config get dir 2>/dev/null | sed -n 2p)" == "$(cd "$dir" && pwd -P)" ]]; then
            redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        fi
    fi
    rm -f "$dir/redis.pid"
    return 0
}

# start_redis_cluster DIR N: N cluster-enabled Redis masters on free loopback
# ports (one sub-directory each), joined into one cluster with no replicas.
# Prints nothing; the seed URLs end up in DIR/urls (comma-separated).
start_redis_cluster() {
    local dir n i port ports=() addrs=() urls=()
    dir="$(_svc_abspath "$1")"
    n="${2:-3}"
    local attempt ok
    for ((i = 0; i < n; i++)); do
        mkdir -p "$dir/node$i"
        # A free port can be taken by someone else before redis binds it
        # (daemonized redis fails after we return): retry on another port.
        ok=""
        for ((attempt = 0; attempt < 5; attempt++)); do
            port="$(free_port)"
            printf '%s\n' "$port" >"$dir/node$i/redis.port"
            _svc_log "starting redis cluster node $i on 127.0.0.1:$port"
            redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
                --cluster-enabled yes --cluster-config-file "$dir/node$i/nodes.conf" --cluster-node-timeout 5000 \
                --dir "$dir/node$i" --pidfile "$dir/node$i/redis.pid" --logfile "$dir/node$i/redis.log" \
                </dev/null >/dev/null || true
            local w
            for ((w = 0; w < 30; w++)); do
                if [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]]; then
                    ok=1
                    break
                fi
                sleep 0.1
            done
            [[ -n "$ok" ]] && break
            stop_redis "$dir/node$i"
            rm -f "$dir/node$i/nodes.conf"
        done
        [[ -n "$ok" ]] || _svc_die "redis cluster node $i did not start (log: $dir/node$i/redis.log)"
        ports+=("$port")
        addrs+=("127.0.0.1:$port")
        urls+=("redis://127.0.0.1:$port")
    done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes </dev/null >"$dir/create.log" 2>&1 ||
        { cat "$dir/create.log" >&2; _svc_die "redis-cli --cluster create failed"; }
    for ((i = 0; i < 100; i++)); do
        if redis-cli -h 127.0.0.1 -p "${ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
            (IFS=,; printf '%s\n' "${urls[*]}") >"$dir/urls"
            return 0
        fi
        sleep 0.2
    done
    _svc_die "the redis cluster did not reach cluster_state:ok"
}

# stop_redis_cluster DIR: stops every node started by start_redis_cluster.
stop_redis_cluster() {
    local dir="${1:-}" node
    [[ -n "$dir" && -d "$dir" ]] || return 0
    for node in "$dir"/node*; do
        [[ -d "$node" ]] && stop_redis "$node"
    done
    return 0
}
