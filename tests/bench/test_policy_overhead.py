"""bench.policy_overhead's confidence interval of a median of paired differences."""

from __future__ import annotations

import random
import statistics

from bench.policy_overhead import median_ci


def test_median_ci_holds_the_median_and_narrows_with_more_rounds() -> None:
    rng = random.Random(7)
    few = [rng.gauss(0.3, 2.0) for _ in range(20)]
    many = [rng.gauss(0.3, 2.0) for _ in range(500)]
    lo_few, hi_few = median_ci(few)
    lo_many, hi_many = median_ci(many)
    assert lo_few <= statistics.median(few) <= hi_few
    assert lo_many <= statistics.median(many) <= hi_many
    assert lo_many < 0.3 < hi_many  # the true median, with 500 rounds
    assert hi_many - lo_many < (hi_few - lo_few) / 2
    assert median_ci(few) == (lo_few, hi_few)  # reproducible from the same rounds


def test_median_ci_of_identical_rounds_is_that_value() -> None:
    assert median_ci([0.25] * 30) == (0.25, 0.25)


def test_median_ci_over_blocks_holds_the_bias_between_blocks() -> None:
    """Rounds of one block share that block's bias (a stack's placement): drawn over blocks, the
    interval widens to hold it; drawn over rounds alone it would claim a precision it lacks."""
    rng = random.Random(3)
    values: list[float] = []
    groups: list[int] = []
    for block, bias in enumerate((-0.4, 0.0, 0.4, 0.1, -0.2)):
        for _ in range(40):
            values.append(0.3 + bias + rng.gauss(0, 0.1))
            groups.append(block)
    lo_r, hi_r = median_ci(values)
    lo_b, hi_b = median_ci(values, groups=groups)
    assert lo_b <= statistics.median(values) <= hi_b
    assert hi_b - lo_b > 2 * (hi_r - lo_r)
    assert median_ci(values, groups=[0] * len(values)) == (lo_r, hi_r)  # one block: as before
