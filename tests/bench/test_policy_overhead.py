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
