"""Prompt tokens served from the engines' prefix caches against what is achievable.

``python -m bench.suite.cache_bounds bench/reports/prefix.json`` regenerates each open-loop
point's conversations (same generator, seed and sizes as the suite) and prints, per workload:

- three bounds on the fraction of prompt tokens a router could serve from cache (the shared
  system prompt's full blocks of every request but the first of its group): an unbounded cache;
  one LRU of prefixes the size of the fleet's KV cache; groups partitioned over the pods by
  popularity, each pod an LRU of the prefixes its own cache holds. All ignore the blocks running
  requests occupy, so they are upper bounds;
- the fraction of requests that must prefill their whole shared prefix under each of them, and
  a lower bound on it for any router: one cache of prefixes the size of the whole fleet's,
  managed by the offline optimum (Belady: on a miss, drop whichever prefix, the new one
  included, is next asked for furthest in the future). Any placement of prefixes over the pods
  is one way to run that single cache, so no router misses fewer. Above a tenth of the
  requests, no router's p90 TTFT is below one unloaded prefill of the prompt;
- per contender, the engines' own counters (``/sim/state`` deltas, the numbers behind
  ``vllm:prefix_cache_hits``/``_queries``): hits / queries, prefill tokens computed / prompt
  tokens (1 minus the served-from-cache fraction, recomputation after preemption included),
  preemptions; and the client's ``usage.prompt_tokens_details.cached_tokens`` fraction.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import Conversation
from bench.workloads import WORKLOADS
from sim.tokenizer import Tokenizer, apply_chat_template

__all__ = [
    "CacheBounds",
    "blocks_per_pod",
    "cache_bounds",
    "conversations",
    "main",
    "optimal_misses",
    "served_from_cache",
]

BLOCK = 16


class CacheBounds:
    """Fractions of prompt tokens served from cache under each bound, and fractions of requests
    that must prefill their whole shared prefix (``cold_*``: no bound serves them from cache)."""

    __slots__ = (
        "cold_fleet_lru",
        "cold_optimal",
        "cold_partitioned",
        "cold_unbounded",
        "fleet_lru",
        "partitioned",
        "prompt_tokens",
        "unbounded",
    )

    def __init__(
        self,
        prompt: int,
        unbounded: int,
        fleet_lru: int,
        partitioned: int,
        cold: tuple[int, int, int] = (0, 0, 0),
        requests: int = 1,
        cold_optimal: int = 0,
    ) -> None:
        self.prompt_tokens = prompt
        self.unbounded = unbounded / prompt
        self.fleet_lru = fleet_lru / prompt
        self.partitioned = partitioned / prompt
        n = max(requests, 1)
        self.cold_unbounded, self.cold_fleet_lru, self.cold_partitioned = (x / n for x in cold)
        self.cold_optimal = cold_optimal / n


def optimal_misses(tags: Sequence[str], capacity: int) -> int:
    """Misses of one cache of ``capacity`` prefixes under the offline optimum (Belady, with the
    choice of not keeping the new prefix): a lower bound for any way of caching the sequence."""
    n = len(tags)
    following = [n] * n  # index of the next request for the same prefix
    last: dict[str, int] = {}
    for i in range(n - 1, -1, -1):
        following[i] = last.get(tags[i], n)
        last[tags[i]] = i
    cache: dict[str, int] = {}  # prefix -> index of its next request
    misses = 0
    for i, tag in enumerate(tags):
        if tag not in cache:
            misses += 1
            if len(cache) >= capacity:
                furthest = max(cache, key=cache.__getitem__)
                if cache[furthest] <= following[i]:
                    continue  # the new prefix is the one asked for last: do not keep it
                del cache[furthest]
        cache[tag] = following[i]
    return misses


def cache_bounds(convs: Sequence[Conversation], replicas: int, blocks_per_pod: int) -> CacheBounds:
    """The three bounds of the module doc for single-turn conversations with a system prompt."""
    tok = Tokenizer()
    counts: dict[str, int] = {}
    for c in convs:
        counts[c.tag] = counts.get(c.tag, 0) + 1
    home = {g: i % replicas for i, g in enumerate(sorted(counts, key=lambda g: -counts[g]))}
    fleet: OrderedDict[str, None] = OrderedDict()
    pods: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(replicas)]
    seen: set[str] = set()
    most_per_pod = 1  # prefixes of the shortest shared prompt one pod holds (optimistic)
    prompt = unbounded = fleet_lru = partitioned = 0
    cold = [0, 0, 0]  # requests missing their prefix: unbounded, fleet LRU, partitioned
    for c in convs:
        system = c.prefix[0][1]
        prompt += tok.count(apply_chat_template([("system", system), ("user", c.turns[0])]))
        shared = tok.count(apply_chat_template([("system", system)], False)) // BLOCK * BLOCK
        per_pod = max(1, blocks_per_pod * BLOCK // max(shared, 1))  # prefixes one pod holds
        most_per_pod = max(most_per_pod, per_pod)
        unbounded += shared if c.tag in seen else 0
        cold[0] += c.tag not in seen
        seen.add(c.tag)
        for cache, cap in ((fleet, per_pod * replicas), (pods[home[c.tag]], per_pod)):
            if c.tag in cache:
                cache.move_to_end(c.tag)
                if cache is fleet:
                    fleet_lru += shared
                else:
                    partitioned += shared
            else:
                cold[1 if cache is fleet else 2] += 1
                cache[c.tag] = None
                if len(cache) > cap:
                    cache.popitem(last=False)
    return CacheBounds(
        prompt,
        unbounded,
        fleet_lru,
        partitioned,
        (cold[0], cold[1], cold[2]),
        len(convs),
        optimal_misses([c.tag for c in convs], most_per_pod * replicas),
    )


def conversations(cfg: dict[str, Any], workload: str) -> list[Conversation]:
    if workload == cfg["sweep_workload"]:
        qps = cfg["sweep_qps"][0]
        return WORKLOADS[workload](
            qps=qps, duration=cfg["duration"], seed=cfg["seed"], **cfg["sweep_args"]
        )
    j, ex = next((j, e) for j, e in enumerate(cfg["extra"]) if e["workload"] == workload)
    return WORKLOADS[workload](
        qps=ex["qps"],
        duration=ex["duration"] or cfg["duration"],
        seed=cfg["seed"] + 100 + j,
        **ex["args"],
    )


def blocks_per_pod(sim_args: list[str]) -> int:
    return int(sim_args[sim_args.index("--num-gpu-blocks") + 1])


def served_from_cache(point: dict[str, Any]) -> float:
    """1 - prefill tokens the engines computed / prompt tokens, summed over a point's sims
    (recomputation after preemption counts as computed)."""
    states = point.get("sim_state", {}).values()
    prompt = sum(s.get("prompt_tokens", 0) for s in states)
    computed = sum(s.get("prefill_computed_tokens", 0) for s in states)
    return 1 - computed / prompt if prompt else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suite.cache_bounds", description=__doc__)
    p.add_argument("result", type=Path, help="a suite's <name>.json")
    args = p.parse_args(argv)
    result = json.loads(args.result.read_text())["result"]
    cfg = result["config"]
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for point in result["points"]:
        if point["mode"] == "open":
            by_workload.setdefault(point["workload"], []).append(point)
    for workload, points in by_workload.items():
        if len({pt["qps"] for pt in points}) > 1:
            print(f"{workload}: several QPS points; the bounds below are for the first")
        b = cache_bounds(
            conversations(cfg, workload), cfg["replicas"], blocks_per_pod(cfg["sim_args"])
        )
        print(
            f"\n{workload}: achievable from cache {b.unbounded:.2f} (unbounded cache), "
            f"{b.fleet_lru:.2f} (fleet-sized LRU), {b.partitioned:.2f} (partitioned, per-pod LRU)"
        )
        print(
            f"requests that must prefill their whole shared prefix: {b.cold_unbounded:.2f} "
            f"(unbounded), {b.cold_fleet_lru:.2f} (fleet-sized LRU), {b.cold_partitioned:.2f} "
            f"(partitioned), at least {b.cold_optimal:.2f} under any router (fleet-sized "
            "optimal cache); above 0.10, no router's p90 TTFT is below one unloaded prefill"
        )
        print(
            "| contender | engine hits / queries | prefill computed / prompt | preemptions "
            "| served from cache (1 - computed/prompt) | / partitioned bound | client cached |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for pt in points:
            st = pt["sim_state"].values()
            hits = sum(s.get("prefix_cache_hits", 0) for s in st)
            queries = sum(s.get("prefix_cache_queries", 0) for s in st)
            prompt = sum(s.get("prompt_tokens", 0) for s in st)
            computed = sum(s.get("prefill_computed_tokens", 0) for s in st)
            pre = sum(s.get("preemptions", 0) for s in st)
            served = served_from_cache(pt)
            print(
                f"| {pt['contender']} | {hits / max(queries, 1):.2f} | "
                f"{computed / max(prompt, 1):.2f} | {pre} | {served:.2f} | "
                f"{served / b.partitioned:.2f} | {pt['summary'].get('cached_fraction', 0):.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
