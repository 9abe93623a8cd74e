"""PrefixHomes: one home pod per prompt prefix, spread evenly, bounded."""

from __future__ import annotations

import pytest

from extproc.scheduling.prefix import PrefixHomes


def test_new_prefixes_go_to_the_pod_homing_fewest_and_stay() -> None:
    homes = PrefixHomes()
    assert homes.home(1, ["a", "b"]) == "a"  # a tie: the caller's order (best first)
    assert homes.home(2, ["a", "b"]) == "b"
    assert homes.home(3, ["b", "a"]) == "b"
    assert homes.home(4, ["a", "b"]) == "a"
    assert homes.home(1, ["b"]) == "a"  # homed: the candidates do not move it
    assert (homes.homed("a"), homes.homed("b")) == (2, 2)
    assert homes.home(5, []) is None and len(homes) == 4


def test_least_recently_used_prefix_is_dropped_at_capacity() -> None:
    homes = PrefixHomes(capacity=2)
    homes.home(1, ["a"])
    homes.home(2, ["b"])
    homes.home(1, ["b"])  # 1 used again: 2 is now the oldest
    homes.home(3, ["c"])
    assert len(homes) == 2 and homes.homed("b") == 0
    assert homes.home(2, ["c", "b"]) == "b"  # homed afresh


def test_get_reads_a_home_without_homing_and_counts_as_a_use() -> None:
    homes = PrefixHomes(capacity=2)
    assert homes.get(1) is None and len(homes) == 0  # not homed by a read
    homes.home(1, ["a"])
    homes.home(2, ["b"])
    assert homes.get(1) == "a"  # 1 used again: 2 is now the oldest
    homes.home(3, ["c"])
    assert homes.get(2) is None and homes.get(1) == "a"


def test_a_forgotten_pod_homes_nothing() -> None:
    homes = PrefixHomes()
    homes.home(1, ["a"])
    homes.home(2, ["b"])
    homes.forget_pod("a")
    assert homes.homed("a") == 0 and homes.home(1, ["b", "a"]) == "a"  # fewest again: a


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        PrefixHomes(capacity=0)
