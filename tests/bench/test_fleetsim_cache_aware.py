"""The fleet simulation's model of vllm-router's cache_aware policy (bench.fleetsim.cache_aware)."""

from __future__ import annotations

import pytest

from bench.fleetsim.cache_aware import CHUNK, CacheAwareArgs, CacheAwareModel
from bench.fleetsim.core import FleetSpec, contender_named, simulate
from bench.fleetsim.trace import make_workload

SYSTEM = "s" * (10 * CHUNK)


def test_matching_text_sticks_to_its_worker_and_new_text_goes_to_the_smallest_tree() -> None:
    m = CacheAwareModel(3)
    first = m.choose(SYSTEM + "q1", [0, 0, 0])
    assert m.choose(SYSTEM + "q2", [5, 0, 0]) == first  # match > 30 %: load ignored
    other = m.choose("t" * (4 * CHUNK), [0, 0, 0])  # no match: an empty tree
    assert other != first
    third = m.choose("u" * (20 * CHUNK), [0, 0, 0])
    assert third not in (first, other)
    # all trees hold something now: the smallest (other's, 4 pieces) takes the next new text
    assert m.choose("v" * CHUNK, [0, 0, 0]) == other


def test_an_imbalanced_fleet_goes_to_the_shortest_queue() -> None:
    m = CacheAwareModel(2, CacheAwareArgs(balance_abs=4, balance_rel=1.5))
    first = m.choose(SYSTEM, [0, 0])
    loads = [0, 0]
    loads[first] = 10  # 10 - 0 > 4 and 10 > 1.5 x 0
    assert m.choose(SYSTEM + "q", loads) == 1 - first
    loads[1 - first] = 7  # 10 - 7 <= 4: balanced again, the longest match wins
    assert m.choose(SYSTEM + "q", loads) == 1 - first  # it holds SYSTEM + "q" now
    loads[1 - first] = 0
    assert m.choose(SYSTEM + "q", loads) == 1 - first


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        CacheAwareModel(0)


def test_the_model_runs_as_a_virtual_time_contender() -> None:
    sessions = make_workload(
        "shared_prefix:qps=20,groups=4,system_tokens=1000,question_tokens=16", seed=1, duration=3
    )
    res = simulate(sessions, contender_named("model-cache_aware"), fleet=FleetSpec(replicas=4))
    s = res.summary()
    assert s.ok == s.requests > 0
    # one pod per group: every request but each group's first finds its system prompt cached
    assert s.cached_fraction > 0.8
    assert len({r.pod for r in res.records}) <= 4
