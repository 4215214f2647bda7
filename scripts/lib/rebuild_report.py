#!/usr/bin/env python3
"""Markdown report of scripts/bench-rebuild.sh's JSON lines (one per phase)."""
import json
import statistics
import sys


def med(xs):
    return statistics.median(xs) if xs else 0.0


def main():
    path, label = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    phases = [json.loads(line) for line in open(path) if line.strip()]
    out = []
    out.append("# Hot-state rebuild after a Redis loss (scripts/bench-rebuild.sh)")
    out.append("")
    out.append(f"{label}; release build; 2-core machine; PostgreSQL durable, Redis without persistence, all on loopback.")
    out.append("Each row: one data set (own database, fresh creditd), one warm-up FLUSHALL, then the measured")
    out.append("rounds: FLUSHALL, then until every tenant answers GetBalance with the seeded balance.")
    out.append("*serving* = FLUSHALL to the last tenant's first correct answer (median of rounds; all rounds in brackets).")
    out.append("*took_ms* = the server's `hot state rebuilt from postgres` lines (one tenant's rebuild, lock to fence).")
    out.append("CPU = seconds of CPU per process during the median round; *other* = machine busy time of no process")
    out.append("measured here (the machine's other load). load = /proc/loadavg before the median round.")
    out.append("")
    out.append("| phase | PG jit | tenants | accounts | serving s | accounts/s | took_ms p50 / max | tenants loading max | CPU creditd / redis / postgres / other s | verified (mismatches) | load before |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in phases:
        rounds = p["rounds"]
        times = [r["all_serving_s"] for r in rounds]
        m = sorted(rounds, key=lambda r: r["all_serving_s"])[len(rounds) // 2]
        cpu = m["cpu"]
        verified = sum(r["verified"] for r in rounds)
        bad = sum(r["mismatches"] for r in rounds)
        out.append(
            f"| {p['name']} | {p.get('jit', 'on')} | {p['tenants']} | {m['accounts']:,} | {med(times):.3f} ({', '.join(f'{t:.3f}' for t in times)}) "
            f"| {m['accounts_per_s']:,.0f} | {m['rebuild_took_ms']['p50']:.0f} / {m['rebuild_took_ms']['max']:.0f} "
            f"| {m['tenants_loading_max']} | {cpu['creditd_s']} / {cpu['redis_s']} / {cpu['postgres_s']} / {cpu['other_processes_s']} "
            f"| {verified} ({bad}) | {m['loadavg_before']} |"
        )
    # Ratios within the run.
    by = {p["name"]: med([r["all_serving_s"] for r in p["rounds"]]) for p in phases}
    out.append("")
    out.append("Ratios within this run (serving time):")
    for a, b, what in [("acc10k", "acc1k", "data 10x"), ("acc100k", "acc10k", "data 10x"),
                       ("ten100", "ten10", "data 10x"), ("ten1000", "ten100", "data 10x"),
                       ("ten1000nj", "ten100nj", "data 10x"),
                       ("acc1k", "acc1knj", "jit on / off"), ("acc100k", "acc100knj", "jit on / off"),
                       ("ten100", "ten100nj", "jit on / off"), ("ten1000", "ten1000nj", "jit on / off")]:
        if a in by and b in by and by[b] > 0:
            out.append(f"- {a} / {b}: {by[a] / by[b]:.1f}x ({what})")
    out.append("")
    for p in phases:
        u = p.get("untouched")
        if not u:
            continue
        out.append(f"## An untouched 1,000-account tenant while {p['name']}'s tenant is rebuilt")
        out.append("")
        out.append("4 closed-loop workers on the untouched tenant, alternating GetBalance and Reserve (0.01 credit, 2 s hold).")
        out.append("*lost*: the big tenant's fence key deleted in Redis (Redis lost it); *behind*: PostgreSQL's fence position")
        out.append("raised by one (a Redis rolled back), found by the health job. Window = the big tenant's first UNAVAILABLE")
        out.append("to its first answer after it.")
        out.append("")
        out.append("| window | big tenant unavailable s | calls | failed | p50 ms | p99 ms | max ms | GetBalance p50 / p99 | Reserve p50 / p99 | first call after trigger ms | load |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        rows = [("at rest", None, u["at_rest"], None, u.get("load", ""))]
        for how in ("lost", "behind"):
            if how in u:
                v = u[how]
                rows.append((f"during rebuild ({how})", v["big_unavailable_s"], v["during_rebuild"], v["first_call_after_trigger_ms"], v["load"]))
        for name, window, lat, first, load in rows:
            a, g, r = lat["all"], lat["get_balance"], lat["reserve"]
            out.append(
                f"| {name} | {'' if window is None else window} | {a['calls']} | {a['failed']} | {a['p50_ms']} | {a['p99_ms']} | {a['max_ms']} "
                f"| {g['p50_ms']} / {g['p99_ms']} | {r['p50_ms']} / {r['p99_ms']} | {'' if first is None else first} | {load} |"
            )
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
