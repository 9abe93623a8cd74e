"""PrefixHomes: one home pod per prompt prefix, spread evenly, bounded; PendingPrefill: the
prefill still ahead on each pod."""

from __future__ import annotations

import pytest

from extproc.scheduling.prefix import PendingPrefill, PrefixHomes


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


def test_place_moves_a_prefix_to_its_new_home() -> None:
    homes = PrefixHomes(capacity=2)
    homes.place(1, "a")
    homes.place(1, "b")  # moved, not copied
    assert (homes.homed("a"), homes.homed("b"), len(homes)) == (0, 1, 1)
    assert homes.home(1, ["a"]) == "b"
    homes.place(2, "a")
    homes.place(3, "a")  # at capacity: the least recently used (1) goes
    assert (homes.homed("a"), homes.homed("b"), len(homes)) == (2, 0, 2)


def test_pending_prefill_falls_as_the_pod_reports_blocks_stored() -> None:
    stored: dict[str, set[int]] = {"a": set()}

    def holds(pod: str, h: int) -> bool:
        return h in stored.get(pod, set())

    pending = PendingPrefill()
    pending.add("a", "r1", 7, [10, 11, 12, 13], 16)
    assert pending.tokens("a", holds) == 64 and pending.tokens("b", holds) == 0
    assert pending.sending(7) and not pending.sending(8)
    pending.add("a", "r2", 7, [10, 11, 12, 13, 14], 16)  # the same prefix: computed once
    assert pending.tokens("a", holds) == 80
    stored["a"] |= {10, 11}  # the first chunk is computed
    assert pending.tokens("a", holds) == 48
    stored["a"] |= {12, 13}  # r1's prompt is all stored: it leaves
    assert pending.tokens("a", holds) == 16
    pending.finish("a", "r2")
    assert pending.tokens("a", holds) == 0 and not pending.sending(7)


def test_pending_prefill_of_a_forgotten_pod_is_gone() -> None:
    pending = PendingPrefill()
    pending.add("a", "r1", 7, [10, 11], 16)
    pending.add("a", "r1", 8, [20, 21], 16)  # the same request again: replaces it
    assert not pending.sending(7) and pending.sending(8)
    pending.forget_pod("a")
    assert not pending.sending(8) and pending.tokens("a", lambda pod, h: False) == 0
