"""bench.suite.cache_bounds: what a router could serve from the prefix caches."""

from __future__ import annotations

import random

import pytest

from bench.loadgen import Conversation
from bench.suite.cache_bounds import cache_bounds
from bench.workloads import words


def conv(group: int, system: str) -> Conversation:
    return Conversation(0.0, "m", (("system", system),), ("q",), 4, f"g{group}")


def test_repeats_hit_up_to_what_the_caches_hold() -> None:
    rng = random.Random(0)
    systems = [words(rng, 160) for _ in range(3)]  # ~10 blocks each
    convs = [conv(g, systems[g]) for g in (0, 1, 0, 2, 0, 1)]
    per = cache_bounds(convs, replicas=1, blocks_per_pod=10_000)
    assert 0 < per.unbounded < 1
    # the 3 repeats (two of g0, one of g1) of 6 requests of about equal length hit
    assert per.unbounded == pytest.approx(0.5, abs=0.02)
    assert per.fleet_lru == per.partitioned == per.unbounded  # everything fits
    tight = cache_bounds(convs, replicas=1, blocks_per_pod=10)  # one prefix at a time
    assert tight.fleet_lru == 0 and tight.partitioned == 0  # the groups alternate
    two = cache_bounds(convs, replicas=2, blocks_per_pod=10)  # g0 alone on its pod
    assert 0 < two.partitioned < per.partitioned
