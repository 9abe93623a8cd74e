"""CPU per request of Redis admission + settlement in this process (not product code).

``python -m bench.experiments.redis_admission --redis 127.0.0.1:PORT [--n 3000] [--paced]``:
``extproc.policies.Policies`` with one Redis-limited route, driven like the request path does —
``admit`` (awaited) then the usage settlement (``Policies._settle``, which queues it for Redis) —
against a local redis-server. Tight loop, or ``--paced``: one request every 5 ms (200 req/s, as
``bench.policy_overhead``; the timer flush then has its chance). Reports CPU time
(``time.process_time``) per request, best of 5 rounds, on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from prometheus_client import CollectorRegistry

from extproc.auth import Identity
from extproc.policies import Policies, PolicySettings, RoutePolicy
from extproc.ratelimit import Limits
from extproc.usage import Usage


async def main_async(address: str, n: int, paced: bool) -> list[float]:
    policies = Policies(PolicySettings(), CollectorRegistry())
    big = 1_000_000_000
    limits = Limits(big, big, big, 60.0, "user", address)
    policy = RoutePolicy("default/limited", "limited", None, limits, 1000, 60.0, None)
    who = Identity("bench", "bench", (), "api-key")
    usage = Usage(250, 20, True, "reported")

    async def one() -> None:
        charge = await policies.admit(who, policy, 250, "chat", "m")
        policies._settle(charge, usage)

    for _ in range(200):
        await one()
    out = []
    for _ in range(5):
        c0 = time.process_time()
        for _ in range(n):
            await one()
            if paced:
                await asyncio.sleep(0.005)
        await policies.flush()
        out.append((time.process_time() - c0) / n * 1e6)
    await policies.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.redis_admission")
    p.add_argument("--redis", required=True, help="host:port of a redis-server to use")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--paced", action="store_true", help="one request every 5 ms")
    args = p.parse_args(argv)
    us = uvloop.run(main_async(args.redis, args.n, args.paced))
    print(
        f"admit + settle, {'paced 200/s' if args.paced else 'tight loop'}: best {min(us):.1f} "
        f"us CPU/request, rounds {', '.join(f'{x:.1f}' for x in us)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
