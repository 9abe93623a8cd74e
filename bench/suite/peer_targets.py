"""Targets against the best ``vllm-router`` policy, and the p90 floor no router can beat.

At every open-loop point where the baseline's p90 TTFT is at least 5x its unloaded TTFT (the
load the prefix suite's targets are stated at), ``ours-default`` is checked against the best
``vllm-router-*`` contender of the same point:

- p90 TTFT <= 0.5x the lowest ``vllm-router`` p90;
- prompt tokens served from the engines' prefix caches (their own counters: 1 - prefill tokens
  computed / prompt tokens) >= 0.9 of the achievable (``cache_bounds``' partitioned bound);
- output tokens/s >= the highest ``vllm-router`` output tokens/s.

The floor: some requests must prefill their whole prompt under any router - the first of each
prefix group, and those whose prefix even the offline-optimal cache the size of the whole fleet's
would have dropped (``cache_bounds.optimal_misses``). Where such requests are more than a tenth
of a point's requests, no router's p90 TTFT is below one unloaded prefill (the baseline's probe:
one request at a time on cold caches), so ``floor / best peer p90`` is the lowest p90 ratio any
router can reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.suite.cache_bounds import (
    CacheBounds,
    blocks_per_pod,
    cache_bounds,
    conversations,
    served_from_cache,
)

__all__ = ["PeerCheck", "check_peer_targets", "peer_target_rows"]

OURS = "ours-default"
PEERS = "vllm-router-"
P90_RATIO = 0.5
CACHE_SHARE = 0.9
TOK_LEVEL = 0.99
COLD_SHARE = 0.1  # above this share of whole-prompt prefills, p90 >= one unloaded prefill


@dataclass(frozen=True, slots=True)
class PeerCheck:
    workload: str
    qps: float
    ours_p90: float
    peer_p90: float
    peer_p90_name: str
    floor: float | None  # unloaded full prefill when it bounds every router's p90, else None
    served: float
    achievable: float
    ours_tok: float
    peer_tok: float
    peer_tok_name: str
    all_served: bool = False  # ours and that peer both completed every request they were sent

    @property
    def p90_ratio(self) -> float:
        return self.ours_p90 / self.peer_p90 if self.peer_p90 > 0 else math.nan

    @property
    def floor_ratio(self) -> float | None:
        return None if self.floor is None else self.floor / self.peer_p90

    @property
    def cache_ratio(self) -> float:
        return self.served / self.achievable if self.achievable > 0 else math.nan

    @property
    def tok_ratio(self) -> float:
        return self.ours_tok / self.peer_tok if self.peer_tok > 0 else math.nan

    @property
    def p90_ok(self) -> bool:
        return self.ours_p90 <= P90_RATIO * self.peer_p90

    @property
    def cache_ok(self) -> bool:
        return self.cache_ratio >= CACHE_SHARE

    @property
    def tok_ok(self) -> bool:
        """Ours at least the peer's; where both completed every request, their output rate is
        the offered load's, so within 1% (when the last answer ended) counts as level."""
        return self.ours_tok >= (TOK_LEVEL if self.all_served else 1.0) * self.peer_tok


def check_peer_targets(
    result: dict[str, Any], bounds: dict[str, CacheBounds] | None = None
) -> list[PeerCheck]:
    """One check per open point with ours and at least one ``vllm-router`` contender, where the
    baseline is loaded to a p90 TTFT >= 5x unloaded. ``bounds``: per workload (computed from
    the result's config when not given)."""
    cfg = result["config"]
    base = cfg["baseline"]
    probe = next(
        (
            p
            for p in result["points"]
            if p["contender"] == base
            and p["mode"] == "probe"
            and p["workload"] == cfg["sweep_workload"]
        ),
        None,
    )
    if probe is None:
        return []
    unloaded = probe["summary"]["ttft_p50"]
    opened: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for p in result["points"]:
        if p["mode"] == "open":
            opened.setdefault((p["workload"], p["qps"]), {})[p["contender"]] = p
    known = dict(bounds or {})
    checks = []
    for (workload, qps), by in opened.items():
        peers = {c: p for c, p in by.items() if c.startswith(PEERS)}
        ours, b = by.get(OURS), by.get(base)
        if ours is None or b is None or not peers:
            continue
        if not b["summary"]["ttft_p90"] >= 5 * unloaded:
            continue
        if workload not in known:
            known[workload] = cache_bounds(
                conversations(cfg, workload), cfg["replicas"], blocks_per_pod(cfg["sim_args"])
            )
        bound = known[workload]
        p90_name = min(peers, key=lambda c: peers[c]["summary"]["ttft_p90"])
        tok_name = max(peers, key=lambda c: peers[c]["summary"]["output_tok_per_s"])
        checks.append(
            PeerCheck(
                workload=workload,
                qps=qps,
                ours_p90=ours["summary"]["ttft_p90"],
                peer_p90=peers[p90_name]["summary"]["ttft_p90"],
                peer_p90_name=p90_name,
                floor=unloaded if bound.cold_optimal > COLD_SHARE else None,
                served=served_from_cache(ours),
                achievable=bound.partitioned,
                ours_tok=ours["summary"]["output_tok_per_s"],
                peer_tok=peers[tok_name]["summary"]["output_tok_per_s"],
                peer_tok_name=tok_name,
                all_served=_all_served(ours) and _all_served(peers[tok_name]),
            )
        )
    return checks


def _all_served(point: dict[str, Any]) -> bool:
    s = point["summary"]
    return bool(s["requests"]) and s["ok"] == s["requests"]


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def peer_target_rows(checks: list[PeerCheck]) -> list[str]:
    """The report's section (Markdown lines); empty without checks."""
    if not checks:
        return []
    out = [
        "## Targets against the best `vllm-router` policy",
        "",
        f"At every point where the baseline's p90 TTFT is at least 5x its unloaded TTFT: {OURS} "
        f"p90 TTFT <= {P90_RATIO}x the lowest `vllm-router` p90; prompt tokens served from the "
        f"engines' caches (their counters) >= {CACHE_SHARE} of the achievable (the partitioned "
        "bound of `python -m bench.suite.cache_bounds`); output tokens/s >= the highest "
        "`vllm-router`'s (within 1% where both completed every request: their rate is then the "
        "offered load's). **Floor**: where more than a tenth of the requests must prefill their "
        "whole prompt under any router (the first of each prefix group, and the misses of an "
        "offline-optimal cache the size of the whole fleet's), no router's p90 is below one "
        "unloaded prefill (the baseline's probe); the column gives floor / best p90, the lowest "
        "ratio any router can reach.",
        "",
        "| workload | QPS | ours p90 | best vllm-router p90 | ratio (<= 0.5) | floor ratio "
        "| served from cache / achievable (>= 0.9) | ours tok/s | best vllm-router tok/s "
        "| ratio (>= 1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        floor = c.floor_ratio
        out.append(
            f"| {c.workload} | {c.qps:g} | {c.ours_p90 * 1000:.0f} ms "
            f"| {c.peer_p90 * 1000:.0f} ms ({c.peer_p90_name}) "
            f"| {c.p90_ratio:.2f} {_met(c.p90_ok)} "
            f"| {'-' if floor is None else f'{floor:.2f}'} "
            f"| {c.served:.2f} / {c.achievable:.2f} = {c.cache_ratio:.2f} {_met(c.cache_ok)} "
            f"| {c.ours_tok:.0f} | {c.peer_tok:.0f} ({c.peer_tok_name}) "
            f"| {c.tok_ratio:.2f} {_met(c.tok_ok)} |"
        )
    out.append("")
    return out
