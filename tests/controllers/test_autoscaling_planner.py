"""The autoscaling planner: examples of each rule, then hypothesis properties over metric
sequences (a fake clock; no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crds
from controllers.autoscaling.planner import (
    Backend,
    Disaggregated,
    Heterogeneous,
    Homogeneous,
    InvalidPolicy,
    MetricGoal,
    PanicRule,
    Planner,
    RateRule,
    Settings,
    allocate_by_cost,
    shape_of,
    split_roles,
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Q = "queue"
KV = "kv"  # a second metric, usually absent from a step (missing)


@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


def planner(
    lo: int = 1,
    hi: int = 10,
    *,
    up: RateRule | None = None,
    down: RateRule | None = None,
    panic: PanicRule | None = None,
    tol: int = 10,
    stable_window: float = 60.0,
    panic_window: float = 6.0,
    idle: float | None = None,
    with_kv: bool = False,
) -> tuple[Planner, Clock]:
    clock = Clock()
    s = Settings(
        metrics=(MetricGoal(Q, 10.0), MetricGoal(KV, 0.8)) if with_kv else (MetricGoal(Q, 10.0),),
        tolerance_percent=tol,
        up=up or RateRule(instances=100, period=1.0),
        down=down or RateRule(instances=100, period=1.0),
        panic=panic,
        stable_window=stable_window,
        panic_window=panic_window,
        idle_window=idle,
    )
    return Planner(s, Homogeneous("mi", lo, hi), clock), clock


def test_desired_is_ceil_of_sum_over_target_and_the_largest_metric_wins() -> None:
    clock = Clock()
    s = Settings(
        metrics=(MetricGoal("a", 10.0), MetricGoal("b", 0.8)),
        up=RateRule(instances=100, period=1.0),
        stable_window=1.0,
    )
    p = Planner(s, Homogeneous("mi", 1, 20), clock)
    d = p.step({"a": 31.0, "b": 1.0}, {"mi": 1})
    assert d.replicas == {"mi": 4} and d.reason == "ScaleUp"  # ceil(31/10)=4 > ceil(1/0.8)=2
    clock.t += 2
    d = p.step({"a": 1.0, "b": 4.0}, {"mi": 4})
    assert d.replicas == {"mi": 5}  # ceil(4/0.8)=5


def test_within_tolerance_nothing_changes() -> None:
    p, clock = planner(tol=10, stable_window=1.0)
    assert p.step({Q: 40.0}, {"mi": 4}).reason == "Steady"
    clock.t += 2
    assert p.step({Q: 43.0}, {"mi": 4}).replicas == {"mi": 4}  # 7.5 % over: tolerated
    clock.t += 2
    assert p.step({Q: 46.0}, {"mi": 4}).replicas == {"mi": 5}  # 15 % over: scale


def test_stable_window_averages_samples() -> None:
    p, clock = planner(stable_window=60.0)
    p.step({Q: 0.0}, {"mi": 1})
    clock.t += 10
    d = p.step({Q: 60.0}, {"mi": 1})  # average of 0 and 60 = 30 → 3
    assert d.replicas == {"mi": 3}


def test_missing_or_stale_metric_never_scales_down_and_is_reported() -> None:
    p, clock = planner(stable_window=1.0)
    d = p.step({Q: None}, {"mi": 5})
    assert d.replicas == {"mi": 5} and d.missing == (Q,)
    clock.t += 2
    d = p.step({}, {"mi": 5})
    assert d.missing == (Q,) and d.replicas == {"mi": 5}
    clock.t += 2
    assert p.step({Q: 0.0}, {"mi": 5}).replicas["mi"] < 5  # present again: scales down


def test_panic_mode_enters_over_threshold_holds_and_blocks_scale_down() -> None:
    p, clock = planner(
        panic=PanicRule(percent=1000, period=1.0, threshold_percent=200, hold=30.0),
        stable_window=60.0,
        panic_window=6.0,
        down=RateRule(instances=100, period=1.0),
    )
    for _ in range(6):  # a quiet minute at 2 replicas
        p.step({Q: 20.0}, {"mi": 2})
        clock.t += 10
    d = p.step({Q: 100.0}, {"mi": 2})  # panic window 100 > 200 % of 2x10
    assert d.mode == "Panic" and d.reason == "PanicScaleUp" and d.replicas == {"mi": 10}
    clock.t += 10
    d = p.step({Q: 0.0}, {"mi": 10})  # load gone, but held
    assert d.mode == "Panic" and d.replicas == {"mi": 10}
    clock.t += 25
    d = p.step({Q: 0.0}, {"mi": 10})  # 35 s after the last over-threshold step: stable again
    assert d.mode == "Stable" and d.replicas["mi"] < 10


def test_no_panic_policy_no_panic_mode() -> None:
    p, _ = planner(up=RateRule(instances=1, period=10.0))
    d = p.step({Q: 1000.0}, {"mi": 1})
    assert d.mode == "Stable" and d.replicas == {"mi": 2}


def test_scale_up_rate_limited_per_period_or_and() -> None:
    p, clock = planner(up=RateRule(instances=2, percent=100, period=30.0, select="Or"), hi=50)
    assert p.step({Q: 500.0}, {"mi": 4}).replicas == {"mi": 8}  # max(4+2, 4*2)
    clock.t += 10
    assert p.step({Q: 500.0}, {"mi": 8}).replicas == {"mi": 8}  # same period: no more
    clock.t += 25
    assert p.step({Q: 500.0}, {"mi": 8}).replicas == {"mi": 16}
    p, clock = planner(up=RateRule(instances=2, percent=100, period=30.0, select="And"), hi=50)
    assert p.step({Q: 500.0}, {"mi": 4}).replicas == {"mi": 6}  # min(4+2, 4*2)


def test_scale_down_stabilisation_keeps_the_highest_recent_recommendation() -> None:
    p, clock = planner(down=RateRule(percent=100, period=1.0, stabilization=60.0), stable_window=1)
    p.step({Q: 50.0}, {"mi": 5})
    clock.t += 30
    assert p.step({Q: 10.0}, {"mi": 5}).replicas == {"mi": 5}
    clock.t += 31
    assert p.step({Q: 10.0}, {"mi": 5}).replicas == {"mi": 1}


def test_scale_up_stabilisation_takes_the_lowest_recent_recommendation() -> None:
    p, clock = planner(up=RateRule(instances=100, period=1.0, stabilization=20.0), stable_window=1)
    p.step({Q: 10.0}, {"mi": 1})
    clock.t += 5
    assert p.step({Q: 50.0}, {"mi": 1}).replicas == {"mi": 1}
    clock.t += 16
    assert p.step({Q: 50.0}, {"mi": 1}).replicas == {"mi": 5}


def test_bounds_win() -> None:
    p, clock = planner(lo=2, hi=4, stable_window=1)
    d = p.step({Q: 1000.0}, {"mi": 1})
    assert d.replicas == {"mi": 4}
    clock.t += 2
    d = p.step({Q: 1000.0}, {"mi": 9})  # a human set 9; the max brings it back
    assert d.replicas == {"mi": 4} and d.reason == "Bounds"
    clock.t += 2
    d = p.step({Q: 0.0}, {"mi": 4})
    assert d.replicas == {"mi": 2} and d.reason == "ScaleDown"


def test_scale_to_zero_after_idle_window_and_wake_on_demand() -> None:
    p, clock = planner(lo=0, idle=120.0, stable_window=10.0)
    p.step({Q: 5.0}, {"mi": 1})
    clock.t += 60
    d = p.step({Q: 0.0}, {"mi": 1})
    assert d.replicas == {"mi": 1}  # idle only 60 s
    clock.t += 61
    d = p.step({Q: 0.0}, {"mi": 1})
    assert d.replicas == {"mi": 0} and d.reason == "ScaleToZero"
    clock.t += 1
    d = p.step({Q: 1.0}, {"mi": 0})  # one request waiting in the gateway's queue
    assert d.replicas == {"mi": 1} and d.reason == "WakeUp"


def test_wake_up_skips_the_up_stabilisation_window() -> None:
    p, _ = planner(lo=0, up=RateRule(instances=1, period=60.0, stabilization=300.0))
    d = p.step({Q: 3.0}, {"mi": 0})
    assert d.replicas == {"mi": 1} and d.reason == "WakeUp"


def test_settings_and_shape_from_the_example_policy() -> None:
    import pathlib

    import yaml

    doc = yaml.safe_load(pathlib.Path("examples/autoscalingpolicy.yaml").read_text())
    policy = crds.parse_object(doc, "AutoscalingPolicy")
    s = Settings.from_rules(policy.spec)
    assert s.up.instances == 2 and s.up.stabilization == 60.0
    assert s.panic == PanicRule(percent=200, period=10.0, threshold_percent=300, hold=120.0)
    assert s.down.instances == 1 and s.down.stabilization == 300.0
    assert shape_of(policy.spec) == Homogeneous("llama-3-8b-pd", 0, 8)


def test_heterogeneous_fills_cheapest_then_expands_then_removes_most_expensive() -> None:
    shape = Heterogeneous(
        (Backend("l4", 1.0, 1, 3), Backend("a10", 1.5, 0, 3), Backend("h100", 4.5, 0, 4)),
        expansion_percent=150,
    )
    a = allocate_by_cost(shape, 3, {"l4": 1})
    assert a == {"l4": 2, "a10": 1, "h100": 0}  # a10 is within 150 % of l4
    a = allocate_by_cost(shape, 7, a)
    assert a == {"l4": 3, "a10": 3, "h100": 1}  # h100 only after both cheaper are full
    a = allocate_by_cost(shape, 5, a)
    assert a == {"l4": 3, "a10": 2, "h100": 0}
    # a human-made allocation using h100 while l4 has headroom is rebalanced
    assert allocate_by_cost(shape, 3, {"l4": 1, "h100": 2}) == {"l4": 2, "a10": 1, "h100": 0}


def test_disaggregated_keeps_ratio_and_bounds() -> None:
    shape = Disaggregated("pd", "prefill", "decode", (1, 4), (2, 8), (1, 2))
    assert split_roles(shape, 6, {}) == {"pd/prefill": 2, "pd/decode": 4}
    assert split_roles(shape, 100, {}) == {"pd/prefill": 4, "pd/decode": 8}
    assert split_roles(shape, 0, {}) == {"pd/prefill": 1, "pd/decode": 2}
    with pytest.raises(InvalidPolicy, match="ratioConstraint 1:1 cannot be met"):
        Disaggregated("pd", "prefill", "decode", (1, 2), (5, 8), (1, 1))


def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(InvalidPolicy, match="metrics"):
        Settings(metrics=())


# ----------------------------------------------------------------------------------------------
# properties


rate_rules = st.builds(
    RateRule,
    instances=st.one_of(st.none(), st.integers(1, 4)),
    percent=st.one_of(st.none(), st.integers(1, 200)),
    period=st.sampled_from([1.0, 5.0, 15.0, 30.0]),
    select=st.sampled_from(["Or", "And"]),
    stabilization=st.sampled_from([0.0, 10.0, 60.0]),
).filter(lambda r: r.instances is not None or r.percent is not None)
panic_rules = st.one_of(
    st.none(),
    st.builds(
        PanicRule,
        percent=st.integers(10, 1000),
        period=st.sampled_from([1.0, 5.0]),
        threshold_percent=st.integers(110, 400),
        hold=st.sampled_from([5.0, 30.0, 60.0]),
    ),
)
values = st.one_of(st.none(), st.floats(0, 400, allow_nan=False))
# a step: seconds passing, then a metric value (None: missing)
steps = st.lists(
    st.tuples(st.sampled_from([0.5, 1.0, 3.0, 10.0, 40.0]), values),
    min_size=1,
    max_size=40,
)
# the same with the second metric's value
steps2 = st.lists(
    st.tuples(
        st.sampled_from([0.5, 1.0, 3.0, 10.0, 40.0]),
        values,
        st.one_of(st.none(), st.floats(0, 8, allow_nan=False)),
    ),
    min_size=1,
    max_size=40,
)


def _allowed(rule: RateRule, timeline: list[tuple[float, int]], t: float, up: bool) -> int:
    """Recomputed from the replica timeline: the limit at time t."""
    in_effect = [n for (ts, n) in timeline if ts > t - rule.period]
    before = [n for (ts, n) in timeline if ts <= t - rule.period]
    if before:
        in_effect.append(before[-1])
    if up:
        base = min(in_effect)
        lims = []
        if rule.instances is not None:
            lims.append(base + rule.instances)
        if rule.percent is not None:
            lims.append(max(base + 1, math.ceil(base * (1 + rule.percent / 100))))
        return max(lims) if rule.select == "Or" else min(lims)
    base = max(in_effect)
    lims = []
    if rule.instances is not None:
        lims.append(base - rule.instances)
    if rule.percent is not None:
        lims.append(min(base - 1, math.floor(base * (1 - rule.percent / 100))))
    return min(lims) if rule.select == "Or" else max(lims)


@SETTINGS
@given(
    bounds=st.tuples(st.integers(0, 5), st.integers(1, 12)).filter(lambda b: b[0] <= b[1]),
    up=rate_rules,
    down=rate_rules,
    panic=panic_rules,
    tol=st.integers(0, 30),
    seq=steps2,
    data=st.data(),
)
def test_homogeneous_properties(
    bounds: tuple[int, int],
    up: RateRule,
    down: RateRule,
    panic: PanicRule | None,
    tol: int,
    seq: list[tuple[float, float | None, float | None]],
    data: st.DataObject,
) -> None:
    """Never outside bounds; never down in panic or on missing metrics; rate limits hold."""
    lo, hi = bounds
    p, clock = planner(lo, hi, up=up, down=down, panic=panic, tol=tol, idle=20.0, with_kv=True)
    current = data.draw(st.integers(lo, hi))
    timeline: list[tuple[float, int]] = [(clock.t, current)]
    for dt, value, kv in seq:
        clock.t += dt
        d = p.step({Q: value, KV: kv}, {"mi": current})
        new = d.replicas["mi"]
        assert lo <= new <= hi
        if d.mode == "Panic" or value is None or kv is None:
            assert new >= current, d
        if new > current:
            limit = _allowed(up, timeline, clock.t, up=True)
            if d.mode == "Panic" and panic is not None:
                prule = RateRule(percent=panic.percent, period=panic.period)
                limit = max(limit, _allowed(prule, timeline, clock.t, up=True))
            assert new <= limit, (d, timeline)
        if new < current:
            assert new >= _allowed(down, timeline, clock.t, up=False), (d, timeline)
        if new != current:
            timeline.append((clock.t, new))
        current = new


backends = st.lists(
    st.tuples(st.floats(0.5, 10, allow_nan=False), st.integers(0, 3), st.integers(1, 6)).filter(
        lambda b: b[1] <= b[2]
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(
    specs=backends,
    rate=st.integers(100, 400),
    totals=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    start=st.lists(st.integers(0, 8), min_size=4, max_size=4),
)
def test_heterogeneous_allocation_properties(
    specs: list[tuple[float, int, int]], rate: int, totals: list[int], start: list[int]
) -> None:
    """Each backend within its bounds; the total as asked (within the sums of bounds); never a
    pricier backend above its min while one cheaper beyond the expansion rate has headroom."""
    shape = Heterogeneous(
        tuple(Backend(f"b{i}", c, lo, hi) for i, (c, lo, hi) in enumerate(specs)), rate
    )
    alloc = {f"b{i}": start[i] for i in range(len(specs))}
    lo_t, hi_t = shape.total_bounds()
    for total in totals:
        before = dict(alloc)
        alloc = allocate_by_cost(shape, total, alloc)
        assert sum(alloc.values()) == min(max(total, lo_t), hi_t)
        for b in shape.backends:
            assert b.min_replicas <= alloc[b.name] <= b.max_replicas
        for pricey in shape.backends:
            if alloc[pricey.name] <= pricey.min_replicas:
                continue
            for cheap in shape.backends:
                if cheap.cost * rate < pricey.cost * 100:
                    assert alloc[cheap.name] == cheap.max_replicas, (alloc, shape)
        # scaling down removes from the most expensive first: no cheaper backend lost replicas
        # while a pricier one above its min kept them
        if sum(alloc.values()) < sum(before.values()) and all(
            shape.backends[i].min_replicas <= before[f"b{i}"] <= shape.backends[i].max_replicas
            for i in range(len(specs))
        ):
            for cheap in shape.backends:
                if alloc[cheap.name] < before[cheap.name]:
                    for pricey in shape.backends:
                        if pricey.cost > cheap.cost:
                            assert alloc[pricey.name] <= pricey.min_replicas or (
                                alloc[pricey.name] > before[pricey.name]
                            ), (before, alloc)


@SETTINGS
@given(
    p_bounds=st.tuples(st.integers(0, 3), st.integers(1, 8)).filter(lambda b: b[0] <= b[1]),
    d_bounds=st.tuples(st.integers(0, 3), st.integers(1, 12)).filter(lambda b: b[0] <= b[1]),
    ratio=st.tuples(st.integers(1, 3), st.integers(1, 4)),
    seq=steps,
)
def test_disaggregated_ratio_always_holds(
    p_bounds: tuple[int, int],
    d_bounds: tuple[int, int],
    ratio: tuple[int, int],
    seq: list[tuple[float, float | None]],
) -> None:
    try:
        shape = Disaggregated("pd", "prefill", "decode", p_bounds, d_bounds, ratio)
    except InvalidPolicy:
        return  # bounds that cannot meet the ratio are rejected up front
    clock = Clock()
    s = Settings(metrics=(MetricGoal(Q, 10.0),), up=RateRule(instances=3, period=5.0))
    p = Planner(s, shape, clock)
    current = split_roles(shape, 0, {})
    for dt, value in seq:
        clock.t += dt
        d = p.step({Q: value}, current)
        pn, dn = d.replicas["pd/prefill"], d.replicas["pd/decode"]
        assert p_bounds[0] <= pn <= p_bounds[1] and d_bounds[0] <= dn <= d_bounds[1]
        exact = dn * ratio[0] / ratio[1]
        assert math.floor(exact) <= pn <= math.ceil(exact), d
        if d.mode == "Panic" or value is None:
            assert d.total_desired >= d.total_current
        current = d.replicas
