"""bench/run.sh's measuring and reporting half.

  measure.py per-token --host DIR --port P --size N --lookups L
      Prints CSV rows "size,kind,us_per_validation": the CPU cost of one validation inside
      one statement that validates L tokens drawn across the table's N tokens.
        miss: token.cache_size = 0, so every validation takes the index path;
        hit:  a cache big enough for every token, warmed by one pass, then timed.
      The statement without the validation (generating the same L tokens) is timed too and
      subtracted, so the figure is the validation alone. Best of 3 runs each.

  measure.py report --pgbench CSV --per-token CSV ... --md FILE --png FILE
      The markdown table (TPS, ratio to SELECT 1, targets) and the chart.
"""

import argparse
import csv
import datetime
import os
import platform
import subprocess
import time

import psycopg

STMT = ("SELECT count({expr}) FROM generate_series(0, {lookups} - 1) g, "
        "LATERAL (SELECT bench_token('bench_', 1 + (g * 7919) % {size}) AS t) x")


def timed(conn, sql):
    start = time.perf_counter()
    conn.execute(sql).fetchone()
    return time.perf_counter() - start


def per_token(args):
    base = STMT.format(expr="x.t", lookups=args.lookups, size=args.size)
    validate = STMT.format(expr="token.validate_token(x.t)", lookups=args.lookups, size=args.size)
    results = {}
    for kind, cache in (("miss", "0"), ("hit", "1GB")):
        best = None
        for _ in range(3):
            # A fresh backend each time: nothing cached from an earlier run.
            with psycopg.connect(host=args.host, port=args.port, user="postgres", dbname="bench",
                                 autocommit=True) as c:
                c.execute(f"SET token.cache_size = '{cache}'")
                t_base = min(timed(c, base) for _ in range(2))
                if kind == "hit":
                    timed(c, validate)  # warm: every token is now cached
                    entries = c.execute("SELECT entries FROM token.cache_stats()").fetchone()[0]
                    assert entries >= min(args.size, args.lookups), f"cache holds only {entries} entries"
                t = timed(c, validate)
                per = (t - t_base) / args.lookups * 1e6
                best = per if best is None else min(best, per)
        results[kind] = best
    for kind in ("hit", "miss"):
        print(f"{args.size},{kind},{results[kind]:.3f}")


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    pg = subprocess.run(["/usr/lib/postgresql/15/bin/postgres", "--version"], capture_output=True,
                        text=True).stdout.strip()
    return f"{cpu}, {cores} cores, {mem_kb / 1024 / 1024:.0f} GiB RAM, {platform.system()} {platform.release()}, {pg}"


LABELS = {
    "select1": "`SELECT 1` (the floor)",
    "pk_lookup": "primary-key lookup of a token row",
    "plain_pgcrypto": "plain SQL + pgcrypto validation (bench/baseline.sql)",
    "validate_hot": "`token.validate_token`, hot set of 1,000 tokens",
    "validate_hot_narrow": "the same, `SELECT account, scopes` instead of `SELECT *`",
    "validate_uniform": "`token.validate_token`, uniform over all tokens",
    "validate_uniform_no_last_used": "the same with `token.last_used_interval = -1` (no last-use writes)",
    "authenticate_rls": "`token.authenticate` + RLS-filtered select (one transaction)",
    "one_token_4_sessions": "4 sessions validating one token",
    "own_token_4_sessions": "4 sessions validating 4 different tokens",
}


def report(args):
    tps = {row[0]: float(row[1]) for row in csv.reader(open(args.pgbench)) if row}
    per = {}
    for size, kind, us in csv.reader(open(args.per_token)):
        per[(int(size), kind)] = float(us)
    floor = tps["select1"]
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} on {machine()}.",
        f"pgbench -M prepared -c 4 -j 2 -T {args.seconds}, {args.tokens:,} tokens; "
        "shared_buffers 6GB, synchronous_commit off, pg_token defaults (token.cache_size 8MB, "
        "token.last_used_interval 60 s). Ratios are within this run.",
        "",
        "| workload | TPS | vs SELECT 1 |",
        "|---|---:|---:|",
    ]
    for key, label in LABELS.items():
        if key in tps:
            lines.append(f"| {label} | {tps[key]:,.0f} | {tps[key] / floor:.0%} |")
    sizes = sorted({s for s, _ in per})
    lines += ["", f"Cost of one validation inside one statement that validates {args.lookups:,} tokens "
              "(the statement's own cost subtracted; best of 3):", "",
              "| tokens in the table | cache hit | cache miss (index path) |", "|---:|---:|---:|"]
    for s in sizes:
        lines.append(f"| {s:,} | {per.get((s, 'hit'), float('nan')):.2f} µs | {per.get((s, 'miss'), float('nan')):.2f} µs |")

    def verdict(ok):
        return "met" if ok else "**missed**"

    targets = []
    if "validate_hot" in tps:
        r = tps["validate_hot"] / floor
        targets.append(("validate_token on the hot set ≥ 85% of SELECT 1", f"{r:.0%}", verdict(r >= 0.85)))
    if "validate_uniform" in tps and "pk_lookup" in tps:
        r = tps["validate_uniform"] / tps["pk_lookup"]
        targets.append(("validate_token uniform ≥ primary-key lookup", f"{r:.0%} of it", verdict(r >= 1.0)))
    if sizes:
        big, small = max(sizes), min(sizes)
        hit = max(per.get((s, "hit"), 0) for s in sizes)
        miss = max(per.get((s, "miss"), 0) for s in sizes)
        targets.append(("≤ 1 µs per validation on cache hits (worst size)", f"{hit:.2f} µs", verdict(hit <= 1.0)))
        targets.append(("≤ 4 µs per validation on misses (worst size)", f"{miss:.2f} µs", verdict(miss <= 4.0)))
        if big != small and (small, "miss") in per:
            g = per[(big, "miss")] / per[(small, "miss")]
            targets.append((f"{big:,} tokens ≤ 1.3× the cost of {small:,} (misses)", f"{g:.2f}×", verdict(g <= 1.3)))
    if "one_token_4_sessions" in tps and "own_token_4_sessions" in tps:
        r = tps["one_token_4_sessions"] / tps["own_token_4_sessions"]
        targets.append(("4 sessions on one token ≥ 90% of 4 sessions on 4 tokens", f"{r:.0%}", verdict(r >= 0.9)))
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    keys = [k for k in LABELS if k in tps]
    ax1.barh(range(len(keys)), [tps[k] for k in keys], color=["#888" if k in ("select1", "pk_lookup", "plain_pgcrypto") else "#2a7" for k in keys])
    ax1.set_yticks(range(len(keys)), [LABELS[k].replace("`", "") for k in keys], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("transactions per second (pgbench -M prepared -c 4 -j 2)")
    ax1.set_title(f"{args.tokens:,} tokens")
    for i, k in enumerate(keys):
        ax1.text(tps[k], i, f" {tps[k] / floor:.0%}", va="center", fontsize=8)
    for kind, style in (("hit", "o-"), ("miss", "s-")):
        xs = [s for s in sizes if (s, kind) in per]
        ax2.plot(xs, [per[(s, kind)] for s in xs], style, label=f"cache {kind}")
    ax2.set_xscale("log")
    ax2.set_xlabel("tokens in the table")
    ax2.set_ylabel("µs per validation (one statement)")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    ax2.set_title(f"{args.lookups:,} validations in one statement")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("per-token")
    a.add_argument("--host", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--size", type=int, required=True)
    a.add_argument("--lookups", type=int, required=True)
    r = sub.add_parser("report")
    for opt in ("--pgbench", "--per-token", "--md", "--png"):
        r.add_argument(opt, required=True)
    r.add_argument("--seconds", type=int, required=True)
    r.add_argument("--tokens", type=int, required=True)
    r.add_argument("--lookups", type=int, required=True)
    args = p.parse_args()
    (per_token if args.cmd == "per-token" else report)(args)


if __name__ == "__main__":
    main()
