#!/usr/bin/env python3
"""Summarizes `perf script -F comm,ip,sym` output (DWARF call graphs) for
scripts/bench.sh: self time by symbol, samples charged to the innermost frame
of a known crate (so kernel and libc time counts against the code that asked
for it), the creditd functions among them, and the callers of allocation and
copying.

Usage: perf script -i FILE -F comm,ip,sym | python3 scripts/lib/perf_summary.py
"""
import collections
import re
import sys

OWNERS = [
    ("creditd: auth (API key check)", r"creditd::auth|creditd::grpc::caller"),
    ("creditd: service::credit", r"creditd::service::credit"),
    ("creditd: store::hot (script call, reply parsing)", r"creditd::store::hot"),
    ("creditd: store::pg / committer", r"creditd::store::pg|creditd::service::committer"),
    ("creditd: grpc convert/validation", r"creditd::grpc::convert"),
    ("creditd: other", r"creditd::"),
    ("sqlx (PostgreSQL client)", r"sqlx"),
    ("redis crate (Redis client)", r"redis::"),
    ("tonic", r"tonic::|tonic_"),
    ("prost (protobuf)", r"prost::|prost_"),
    ("h2 (HTTP/2)", r"h2::"),
    ("hyper", r"hyper"),
]
RUNTIME = ("tokio runtime", r"tokio::")
INCLUSIVE = {
    "kernel (leaf in the kernel)": None,
    "syscalls: send/write": r"__send|__libc_send|writev|__GI___writev",
    "syscalls: recv/read": r"__libc_recv|recvfrom|__GI___read|__libc_read",
    "epoll_wait": r"epoll_wait",
    "futex (thread wake/park)": r"futex",
    "malloc/free": r"^(malloc|cfree|_int_malloc|_int_free|__GI___libc_malloc|__GI___libc_free|realloc|malloc_consolidate|unlink_chunk)",
    "memmove/memcpy": r"memmove|memcpy",
    "sha2": r"sha2::",
    "serde_json": r"serde_json",
    "uuid": r"uuid::",
    "chrono": r"chrono::",
}
LIBC = r"memmove|memcpy|malloc|free|unlink_chunk|consolidate|realloc|alloc::|core::ptr|drop_in_place|raw_vec|RawVec|__rust|bytes::"


def read_samples(lines):
    samples, cur = [], None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if cur is not None:
                samples.append(cur)
            cur = None
            continue
        if not line.startswith((" ", "\t")):
            cur = []
            continue
        parts = line.strip().split(None, 1)
        sym = parts[1] if len(parts) > 1 else "?"
        sym = re.sub(r"\s*\(([^()]*)\)\s*$", "", sym)
        if parts[0].startswith("ffffffff"):
            sym = "[k] " + sym
        if cur is not None:
            cur.append(sym)
    if cur:
        samples.append(cur)
    return samples


def main():
    samples = read_samples(sys.stdin)
    n = len(samples)
    print(f"samples: {n}")
    if n == 0:
        return

    def pct(c):
        return f"{100 * c / n:6.2f}%"

    print("\n## self time, top symbols")
    for sym, c in collections.Counter(s[0] if s else "?" for s in samples).most_common(25):
        print(f"{pct(c)}  {sym[:150]}")

    owner, creditd_fn = collections.Counter(), collections.Counter()
    for s in samples:
        got = None
        for f in s:
            got = next((name for name, pat in OWNERS if re.search(pat, f)), None)
            if got:
                if got.startswith("creditd"):
                    creditd_fn[re.sub(r"<[^<>]*>", "", re.sub(r"<[^<>]*>", "", f))[:110]] += 1
                break
        if not got:
            got = RUNTIME[0] if any(re.search(RUNTIME[1], f) for f in s) else "other (no known owner)"
        owner[got] += 1
    print("\n## samples by owner (innermost frame of a known crate; kernel and libc time included)")
    for k, c in owner.most_common():
        print(f"{pct(c)}  {k}")
    print("\n## creditd functions owning samples")
    for k, c in creditd_fn.most_common(15):
        print(f"{pct(c)}  {k}")

    callers = collections.Counter()
    for s in samples:
        if s and re.search(r"memmove|memcpy|malloc|free|unlink_chunk|malloc_consolidate", s[0]):
            for f in s[1:]:
                if not re.search(LIBC, f):
                    callers[f[:120]] += 1
                    break
    print("\n## callers of memcpy/malloc/free (first frame outside allocation and copying)")
    for k, c in callers.most_common(12):
        print(f"{pct(c)}  {k}")

    inclusive = collections.Counter()
    for s in samples:
        for name, pat in INCLUSIVE.items():
            if pat is None:
                if s and s[0].startswith("[k]"):
                    inclusive[name] += 1
            elif any(re.search(pat, f) for f in s):
                inclusive[name] += 1
    print("\n## inclusive time of selected frames")
    for k, c in inclusive.most_common():
        print(f"{pct(c)}  {k}")


if __name__ == "__main__":
    main()
