"""A small closed-loop load run against the HTTP example: N concurrent clients, each sending
GET /projects with a token drawn from a hot set, for a fixed time. Used by tests/http (which
checks every answer) and reusable by a benchmark.

    python examples/http/load.py http://127.0.0.1:8000 --seconds 10 --clients 4 < tokens.txt

Tokens are read from standard input, one per line (never from the command line, where `ps`
would show them). Prints one JSON line: requests, requests/s, p50/p99 latency in ms and the
count of each status. With `account` known per token (run(..., accounts=)), it also counts
answers whose rows belong to another tenant.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    seconds: float
    latencies: list = field(default_factory=list)  # seconds, one per answered request
    statuses: Counter = field(default_factory=Counter)
    wrong_tenant: int = 0
    errors: Counter = field(default_factory=Counter)  # transport errors, by exception type

    @property
    def requests(self):
        return len(self.latencies)

    @property
    def rps(self):
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p):
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def summary(self):
        return {"requests": self.requests, "rps": round(self.rps, 1),
                "p50_ms": round(self.percentile(50) * 1000, 2), "p99_ms": round(self.percentile(99) * 1000, 2),
                "statuses": dict(sorted(self.statuses.items())), "wrong_tenant": self.wrong_tenant,
                "errors": dict(self.errors)}


async def run(base_url, tokens, seconds=10.0, clients=4, path="/projects", accounts=None, seed=1):
    """Drives `clients` concurrent loops for `seconds`; returns a Result."""
    if not tokens:
        raise ValueError("no tokens")
    result = Result(seconds=seconds)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10.0) as http:
        deadline = time.perf_counter() + seconds

        async def client(i):
            rng = random.Random(seed + i)
            while time.perf_counter() < deadline:
                token = rng.choice(tokens)
                t0 = time.perf_counter()
                try:
                    r = await http.get(path, headers={"Authorization": f"Bearer {token}"})
                except httpx.HTTPError as e:
                    result.errors[type(e).__name__] += 1
                    continue
                result.latencies.append(time.perf_counter() - t0)
                result.statuses[r.status_code] += 1
                if accounts is not None and r.status_code == 200:
                    want = accounts[token]
                    if any(p["tenant"] != want for p in r.json()["projects"]):
                        result.wrong_tenant += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        result.seconds = time.perf_counter() - t0
    return result


def main():
    parser = argparse.ArgumentParser(description="closed-loop load on the pg_token HTTP example")
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--path", default="/projects")
    args = parser.parse_args()
    tokens = [line.strip() for line in sys.stdin if line.strip()]
    result = asyncio.run(run(args.url, tokens, args.seconds, args.clients, args.path))
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
