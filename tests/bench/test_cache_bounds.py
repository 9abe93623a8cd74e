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


def test_the_optimal_cache_misses_least_and_may_decline_a_prefix() -> None:
    from bench.suite.cache_bounds import optimal_misses

    # capacity 2: on the miss of c, drop the prefix asked for furthest ahead (b, never again)
    assert optimal_misses(list("abcacaca"), 2) == 3  # a, b, c; then a and c stay
    # LRU with the same capacity misses every request of a cycle one longer than the cache
    cycle = list("abc" * 4)
    assert optimal_misses(cycle, 2) < len(cycle)
    # a one-off prefix is not kept when both cached ones come back sooner
    assert optimal_misses(list("abzab"), 2) == 3
    assert optimal_misses(list("aaaa"), 1) == 1
    assert optimal_misses([], 3) == 0


def test_the_optimal_bound_is_below_every_policy_it_bounds() -> None:
    rng = random.Random(1)
    systems = [words(rng, 160) for _ in range(6)]  # ~10 blocks each
    groups = [rng.choice([0, 0, 0, 1, 1, 2, 3, 4, 5]) for _ in range(60)]
    b = cache_bounds([conv(g, systems[g]) for g in groups], replicas=2, blocks_per_pod=20)
    assert b.cold_unbounded <= b.cold_optimal <= min(b.cold_fleet_lru, b.cold_partitioned)
    assert b.cold_optimal < b.cold_fleet_lru  # the LRU drops the hot prefix now and then
