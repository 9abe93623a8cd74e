"""``RequestHistogram`` (the request path's cheaper observe) exposes what the stock one does."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from extproc.metrics import RequestHistogram

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)


def _page(cls: type[Histogram], values: list[float], labelled: bool) -> list[str]:
    registry = CollectorRegistry()
    labels = ["server"] if labelled else []
    metric = cls("h", "help", labels, buckets=BUCKETS, registry=registry)
    for i, v in enumerate(values):
        (metric.labels(f"s{i % 3}") if labelled else metric).observe(v)
    # the _created series differ by the creation time: compare everything else
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@pytest.mark.parametrize("labelled", [False, True])
def test_request_histogram_exposes_what_the_stock_histogram_does(labelled: bool) -> None:
    gen = random.Random(3)
    values = [gen.choice([0.0, -1.0, math.inf, *BUCKETS]) for _ in range(200)]  # on the bounds
    values += [gen.uniform(0, 0.2) for _ in range(2000)] + [
        gen.expovariate(100) for _ in range(500)
    ]
    values.append(math.nan)
    assert _page(RequestHistogram, values, labelled) == _page(Histogram, values, labelled)


def test_a_labelled_parent_still_refuses_an_observation() -> None:
    metric = RequestHistogram(
        "h", "help", ["server"], buckets=BUCKETS, registry=CollectorRegistry()
    )
    with pytest.raises(ValueError, match="missing label values"):
        metric.observe(0.1)
