#!/usr/bin/env python3
"""What a refusal flood takes from good traffic, with the refusal tarpit at its default cap and
turned off, measured in one run on a throwaway cluster (not part of `make bench`, which
reports the same comparison in its "Refusal flood" section).

2 pgbench connections validate one good token (`token.validate_token`, prepared) for --seconds
alone; then beside --flooders pgbench connections as a token_validator running
`SELECT valid FROM token.check_token('hk_live_' || md5(random()::text))` with
token.max_refusal_rate at its default; then beside the same flood with token.max_refusal_rate = 0.
--rounds rounds, interleaved; medians, and the ratios within the run. The flood's pgbench runs at
`nice 19` as in bench.py: it stands in for an attacker's client on another machine.

    sudo PGBIN=/opt/tarpit/16/bin /opt/pg_token-venv/bin/python bench/flood_cap.py --seconds 10 --rounds 3

Needs root or the `postgres` user (the cluster runs as `postgres`), pg_token installed into PGBIN's
PostgreSQL, and psycopg.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import psycopg

from bench import tps_of  # bench/bench.py, beside this file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster.sh"
GOOD = "SELECT * FROM token.validate_token(:tok);\n"
FLOOD = "SELECT valid FROM token.check_token('hk_live_' || md5(random()::text));\n"


def pgbench(args, script, clients, user, log, defines=(), nice=0):
    cmd = ["nice", "-n", str(nice), f"{args.pgbin}/pgbench", "-h", args.socket, "-p", str(args.port), "-U", user,
           "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(args.seconds),
           "-f", script, *[f"-D{d}" for d in defines], "flood"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def cpu_seconds(pids):
    """User + system CPU seconds of these processes (all their threads) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--flooders", type=int, default=4)
    p.add_argument("--pgbin", default=os.environ.get("PGBIN", "/opt/tarpit/16/bin"))
    args = p.parse_args()

    run = pathlib.Path(tempfile.mkdtemp(prefix="pg_token-flood-cap-"))
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    data = run / "data"
    args.port = int(subprocess.run(["bash", CLUSTER, "free-port"], check=True, capture_output=True, text=True).stdout)
    args.socket = str(data)
    env = dict(os.environ, PGBIN=args.pgbin)
    subprocess.run(["bash", CLUSTER, "start", str(data), str(args.port)], check=True, env=env)
    try:
        with psycopg.connect(host=args.socket, port=args.port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE flood")
        with psycopg.connect(host=args.socket, port=args.port, user="postgres", dbname="flood", autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_token")
            c.execute("SELECT token.create_key_type('good')")
            c.execute("SELECT token.register_prefix('good_', 'good', 'dev')")
            token = c.execute("SELECT token FROM token.generate_token('acct-1', 'good')").fetchone()[0]
            c.execute("CREATE ROLE bench_app LOGIN IN ROLE token_validator")
            default_cap = c.execute("SELECT boot_val FROM pg_settings WHERE name = 'token.max_refusal_rate'").fetchone()[0]
            (run / "good.pgbench").write_text(GOOD)
            (run / "flood.pgbench").write_text(FLOOD)
            subprocess.run(["chown", "-R", "postgres:postgres", str(run)], check=True)

            def set_cap(value):
                if value is None:
                    c.execute("ALTER SYSTEM RESET token.max_refusal_rate")
                else:
                    c.execute(f"ALTER SYSTEM SET token.max_refusal_rate = {int(value)}")
                c.execute("SELECT pg_reload_conf()")
                time.sleep(0.5)

            def phase(tag, r, flood):
                c.execute("SELECT token.flush_events('60 s')")
                c.execute("CHECKPOINT")
                g = pgbench(args, run / "good.pgbench", 2, "bench_app", run / f"good-{tag}-{r}.log", [f"tok={token}"])
                f = pgbench(args, run / "flood.pgbench", args.flooders, "bench_app", run / f"flood-{tag}-{r}.log",
                            nice=19) if flood else None
                g.wait()
                if f:
                    f.wait()
                return tps_of(run / f"good-{tag}-{r}.log"), tps_of(run / f"flood-{tag}-{r}.log") if f else 0.0

            def flood_cpu(tag):
                """CPU the flood alone takes (its backends and its pgbench), in cores, and its
                refusals per second: less noisy on a shared machine than throughput."""
                f = pgbench(args, run / "flood.pgbench", args.flooders, "bench_app", run / f"flood-cpu-{tag}.log", nice=19)
                time.sleep(1.5)
                pids = [f.pid] + [p for (p,) in c.execute(
                    "SELECT pid FROM pg_stat_activity WHERE usename = 'bench_app' AND backend_type = 'client backend'")]
                t0, cpu0 = time.monotonic(), cpu_seconds(pids)
                time.sleep(max(args.seconds - 3, 1))
                t1, cpu1 = time.monotonic(), cpu_seconds(pids)
                f.wait()
                return (cpu1 - cpu0) / (t1 - t0), tps_of(run / f"flood-cpu-{tag}.log")

            set_cap(None)
            cpu_capped = flood_cpu("capped")
            set_cap(0)
            cpu_uncapped = flood_cpu("uncapped")
            set_cap(None)
            print(f"flood alone: {cpu_capped[0]:.2f} cores at the default cap ({cpu_capped[1]:,.0f} refusals/s), "
                  f"{cpu_uncapped[0]:.2f} cores uncapped ({cpu_uncapped[1]:,.0f} refusals/s)", flush=True)

            runs = {"alone": [], "capped": [], "uncapped": []}
            for r in range(args.rounds):
                set_cap(None)
                runs["alone"].append(phase("alone", r, False))
                runs["capped"].append(phase("capped", r, True))
                set_cap(0)
                runs["uncapped"].append(phase("uncapped", r, True))
                set_cap(None)
                print(f"round {r + 1}: good alone {runs['alone'][-1][0]:,.0f} tps; beside the flood at the default cap "
                      f"{runs['capped'][-1][0]:,.0f} tps (flood {runs['capped'][-1][1]:,.0f} refusals/s); beside it "
                      f"uncapped {runs['uncapped'][-1][0]:,.0f} tps (flood {runs['uncapped'][-1][1]:,.0f} refusals/s)",
                      flush=True)
    finally:
        subprocess.run(["bash", CLUSTER, "stop", str(data)], check=False, env=env)

    med = {k: statistics.median(x[0] for x in v) for k, v in runs.items()}
    flood = {k: statistics.median(x[1] for x in v) for k, v in runs.items()}
    print(f"\n{args.rounds} rounds of {args.seconds} s, 2 good connections, {args.flooders} flooding (medians):")
    print(f"  token.max_refusal_rate in force: {default_cap} refusals/s per backend (default) vs 0 (off)")
    print(f"  good alone:                    {med['alone']:>10,.0f} tps")
    print(f"  beside the flood, cap {default_cap:>5}:   {med['capped']:>10,.0f} tps ({med['capped'] / med['alone']:.0%}); "
          f"flood {flood['capped']:,.0f} refusals/s")
    print(f"  beside the flood, cap off:     {med['uncapped']:>10,.0f} tps ({med['uncapped'] / med['alone']:.0%}); "
          f"flood {flood['uncapped']:,.0f} refusals/s")
    kept = {k: statistics.median(x[0] / a[0] for x, a in zip(runs[k], runs["alone"])) for k in ("capped", "uncapped")}
    print(f"  median of the per-round ratios: capped {kept['capped']:.0%}, uncapped {kept['uncapped']:.0%}")
    print(f"  the flood alone: {cpu_capped[0]:.2f} cores at cap {default_cap} ({cpu_capped[1]:,.0f} refusals/s), "
          f"{cpu_uncapped[0]:.2f} cores uncapped ({cpu_uncapped[1]:,.0f} refusals/s)")
    print(f"  per-round ratios (capped, uncapped): " + ", ".join(
        f"({c[0] / a[0]:.0%}, {u[0] / a[0]:.0%})" for a, c, u in zip(runs["alone"], runs["capped"], runs["uncapped"])))
    print(f"  logs in {run}")


if __name__ == "__main__":
    main()
