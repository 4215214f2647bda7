#!/usr/bin/env python3
"""Redis cost of creditd's hot-path scripts, per operation.

Drives one redis-server (started by scripts/lua-cost.sh under valgrind's
callgrind) through N Reserves, N Commits of those holds, their finalizes (32
holds per call) and N replays of each, the way creditd calls the scripts
(a user drawing on its organization's pool, no alert thresholds), and prints
per phase the instructions redis-server executed per operation (callgrind:
repeatable, unlike CPU time on a shared machine), the Redis commands the
scripts ran and the memory left behind.

Usage: lua_cost.py REPO PORT REDIS_PID CALLGRIND_DIR [N]
"""
import glob
import os
import socket
import subprocess
import sys

REPO, PORT, RPID, CG_DIR = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
N = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
BATCH = 200
FINALIZE_GROUP = 32
P = "creditd:{t:T}:"

sock = socket.create_connection(("127.0.0.1", PORT))
rd = sock.makefile("rb")


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read():
    line = rd.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else rd.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [read() for _ in range(n)]
    raise RuntimeError(f"bad reply {line!r}")


def call(*args):
    sock.sendall(enc(*args))
    return read()


def pipeline(cmds):
    sock.sendall(b"".join(enc(*c) for c in cmds))
    return [read() for _ in cmds]


def used_memory():
    for line in call("INFO", "memory").decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    return 0


def commandstats():
    out = {}
    for line in call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[8:].split(":", 1)
            calls = int(dict(f.split("=") for f in fields.split(","))["calls"])
            out[name] = calls
    return out


def instructions_since_zero():
    for f in glob.glob(os.path.join(CG_DIR, "callgrind.out.*")):
        os.remove(f)
    subprocess.run(["callgrind_control", "-d", RPID], capture_output=True, check=False)
    total = None
    for f in glob.glob(os.path.join(CG_DIR, "callgrind.out.*")):
        with open(f) as fh:
            for line in fh:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
    return total


def phase(name, ops, gen):
    call("CONFIG", "RESETSTAT")
    m0 = used_memory()
    subprocess.run(["callgrind_control", "-z", RPID], capture_output=True, check=False)
    for start in range(0, ops, BATCH):
        for r in pipeline([gen(i) for i in range(start, min(ops, start + BATCH))]):
            ok = isinstance(r, list) and r and r[0] in (b"granted", b"prepared", b"ok")
            if not ok:
                sys.exit(f"{name}: unexpected reply {r!r}")
    instr = instructions_since_zero()
    m1 = used_memory()
    stats = commandstats()
    cmds = ", ".join(
        f"{k} {v / ops:.2g}" for k, v in sorted(stats.items()) if k not in ("evalsha", "config|resetstat", "info")
    )
    per = f"{instr / ops / 1000:7.1f}k instructions/op" if instr else "   (no callgrind)   "
    print(f"{name:<22} {per}   memory {int((m1 - m0) / ops):+5d} B/op   commands/op: {cmds}")


prelude = open(os.path.join(REPO, "src/lua/prelude.lua")).read()


def load(name):
    body = open(os.path.join(REPO, f"src/lua/{name}.lua")).read()
    return call("SCRIPT", "LOAD", prelude + "\n" + body).decode()


call("FLUSHALL")
call("SET", P + "epoch", "1")
call("HSET", P + "a:org", "p", "", "pa", "0", "cap", "", "s", "0", "pe", "0", "ra", "0", "th", "", "rt", "0",
     "b", "1000000000000000", "h", "0", "u", "0", "uh", "0", "pc", "0", "af", "")
for u in range(100):
    call("HSET", P + f"a:u{u}", "p", "org", "pa", "1", "cap", "", "s", "0", "pe", "0", "ra", "0", "th", "", "rt", "0",
         "b", "0", "h", "0", "u", "0", "uh", "0", "pc", "0", "af", "")
reserve, commit, settle = load("reserve"), load("commit"), load("settle")


def hold(i):
    return f"0190c0de-0000-8000-8000-{i:012d}"


def reserve_call(i):
    return ("EVALSHA", reserve, 5, P + "epoch", P + f"a:u{i % 100}", P + "holds", P + f"i:r:r{i}", P + "h:" + hold(i),
            P, 1000, 1800000, f"ph{i}", hold(i), 86400000, "reserve", "", 8, "")


def commit_call(i):
    return ("EVALSHA", commit, 5, P + "epoch", P + "h:" + hold(i), P + "holds", P + f"i:c:c{i}", P + "committing",
            P, 600, f"cph{i}", 86400000, 30000, f"0190c0de-1111-7000-8000-{i:012d}", f"c{i}", 8)


def finalize_call(g):
    keys = [P + "h:" + hold(j) for j in range(g * FINALIZE_GROUP, (g + 1) * FINALIZE_GROUP)]
    return ["EVALSHA", settle, 1 + len(keys), P + "committing", *keys, P, "finalize", 86400000, "0"]


phase("Reserve", N, reserve_call)
phase("Commit", N, commit_call)
phase(f"finalize, per call of {FINALIZE_GROUP}", N // FINALIZE_GROUP, finalize_call)
phase("Reserve replay", N, reserve_call)
phase("Commit replay", N, commit_call)
print(f"keys after {N} committed pairs: {call('DBSIZE')}; "
      f"hold tombstone {call('MEMORY', 'USAGE', P + 'h:' + hold(5))} B, "
      f"reserve record {call('MEMORY', 'USAGE', P + 'i:r:r5')} B, "
      f"commit record {call('MEMORY', 'USAGE', P + 'i:c:c5')} B (MEMORY USAGE)")
